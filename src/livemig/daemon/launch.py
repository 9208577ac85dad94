"""Start one daemon per test bed host (idempotent), each inside its host's namespace.

A daemon is detached (``setsid -f``): it belongs to no caller, outlives the command that
started it, and is reaped by init when 'testbed down' ends it. It writes its own pid file.
It runs under ``daemon.supervise``, which starts it again if it dies, as systemd would.

Before that, the test bed gets what real hosts get from 'livemig keys': a CA (in the run
directory) and for each host its certificate, key and the CA certificate in its own TLS
directory, so the daemons speak mutual TLS with no manual step. Only an explicit
``plaintext=True`` (``testbed up --insecure-plaintext``) starts them without.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from livemig import keys, paths
from livemig.daemon import control, supervise
from livemig.daemon.control import DaemonUnavailable
from livemig.net import testbed

START_TIMEOUT_S = 15.0


def ensure_key() -> None:
    path = control.key_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))


def ensure_pki() -> None:
    """A test bed CA, and a certificate of it for every host that is up, each with
    the host's name and LAN address. Keeps what is there and matches the CA."""
    ca_dir = paths.pki_dir()
    if not (ca_dir / keys.CA_CERT).exists():
        ca_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(ca_dir, 0o700)
        keys.init_ca(ca_dir, name="livemig test bed CA", force=True)
    ca = (ca_dir / keys.CA_CERT).read_bytes()
    for node in testbed.hosts():
        files = keys.HostFiles.in_dir(paths.tls_dir(node.name), node.name)
        if not files.missing() and files.ca.read_bytes() == ca:
            continue
        paths.tls_dir(node.name).mkdir(parents=True, exist_ok=True)
        os.chmod(paths.tls_dir(node.name), 0o700)
        keys.issue_host(ca_dir, node.name, [str(node.ip)], out=paths.tls_dir(node.name))


def pid_file(host: str) -> Path:
    return paths.host_dir(host) / "livemigd.pid"


def _running(host: str, module: str = "livemig.daemon.server", pid_path: Path | None = None
             ) -> bool:
    try:
        pid = int((pid_path or pid_file(host)).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return module.encode() in cmdline and host.encode() in cmdline


def _supervised(host: str) -> bool:
    """A supervisor runs for ``host``: its daemon runs, or soon will again."""
    return _running(host, "livemig.daemon.supervise", Path(supervise.pid_file(host)))


def ensure_daemons(*, plaintext: bool = False) -> None:
    """A daemon on every host that is up; starts only the missing ones. With
    ``plaintext`` the ones it starts run with --insecure-plaintext."""
    ensure_key()
    ensure_pki()
    started = []
    for node in testbed.hosts():
        if _supervised(node.name):
            started.append(node.name)  # wait for its daemon below, start no second one
            continue
        paths.host_dir(node.name).mkdir(parents=True, exist_ok=True)
        control.socket_path(node.name).unlink(missing_ok=True)  # a dead daemon's
        argv = ["setsid", "-f", sys.executable, "-m", "livemig.daemon.supervise",
                "--host", node.name] + (["--insecure-plaintext"] if plaintext else [])
        log = paths.host_dir(node.name) / "livemigd.log"
        with log.open("ab") as out:
            subprocess.run(node.exec_argv(argv), stdin=subprocess.DEVNULL, stdout=out,
                           stderr=out, check=True)
        started.append(node.name)
    deadline = time.monotonic() + START_TIMEOUT_S
    for host in started:
        while not (control.socket_path(host).exists() and _running(host)):
            if time.monotonic() > deadline:
                raise DaemonUnavailable(host, f"it did not start within {START_TIMEOUT_S:g} s; "
                                        f"see {paths.host_dir(host) / 'livemigd.log'}")
            time.sleep(0.05)
