"""``python -m livemig.lab.supervise --config FILE``: keep a host's daemon running.

What systemd's ``Restart=on-failure`` does on a real host (dist/systemd/livemigd.service),
for the test bed: a daemon
that dies (a crash, a SIGKILL) starts again within a second, and its first act is to
settle what it left behind (``server.Daemon._recover``): incoming copies that never ran
go, and VMs it had stopped in a switchover are resumed or released. A daemon that exits
cleanly is not restarted; SIGTERM to the supervisor passes on to the daemon.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from livemig import config, paths
from livemig.daemon.server import EX_CONFIG

RESTART_DELAY_S = 0.5
MAX_QUICK_RESTARTS = 5  # within QUICK_S: a daemon that cannot start is not retried for ever
QUICK_S = 30.0


def pid_file(host: str) -> str:
    return str(paths.host_dir(host) / "supervisor.pid")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m livemig.lab.supervise")
    parser.add_argument("--config", type=Path, default=config.DEFAULT_PATH)
    args, daemon_args = parser.parse_known_args(argv)
    here = config.load(args.config)
    config.use(here)
    host = here.name
    paths.host_dir(host).mkdir(parents=True, exist_ok=True)
    with open(pid_file(host), "w") as f:
        f.write(str(os.getpid()))
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    starts: list[float] = []
    while not stopping:
        starts = [t for t in starts if time.monotonic() - t < QUICK_S] + [time.monotonic()]
        if len(starts) > MAX_QUICK_RESTARTS:
            print(f"livemigd on {host} died {MAX_QUICK_RESTARTS} times in {QUICK_S:g} s; "
                  "not restarting it", file=sys.stderr, flush=True)
            return 1
        child = subprocess.Popen([sys.executable, "-m", "livemig.daemon.server",
                                  "--config", str(args.config), *daemon_args])
        code = child.wait()
        if stopping or code == 0:
            break
        if code == EX_CONFIG:  # as systemd's RestartPreventExitStatus: no use trying again
            print(f"livemigd on {host} cannot start as configured (status {code}); not "
                  "restarting it", file=sys.stderr, flush=True)
            return 1
        print(f"livemigd on {host} exited with status {code}; restarting it",
              file=sys.stderr, flush=True)
        time.sleep(RESTART_DELAY_S)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
