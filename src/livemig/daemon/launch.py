"""Start one daemon per test bed host (idempotent), each inside its host's namespace.

A daemon is detached (``setsid -f``): it belongs to no caller, outlives the command that
started it, and is reaped by init when 'testbed down' ends it. It writes its own pid file.
It runs under ``daemon.supervise``, which starts it again if it dies, as systemd would.

Before that, the test bed gets what real hosts get from 'livemig keys': a CA (in the run
directory) and for each host its certificate, key, the CA certificate and the CA's CRL in
its own TLS directory, so the daemons speak mutual TLS with no manual step. Only an explicit
``plaintext=True`` (``testbed up --insecure-plaintext``) starts them without.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
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
    the host's name and LAN address. Keeps what is there and matches the CA, and gives
    every host the CA's current CRL, as an operator copies it after 'keys revoke'."""
    ca_dir = paths.pki_dir()
    if not (ca_dir / keys.CA_CERT).exists():
        ca_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(ca_dir, 0o700)
        keys.init_ca(ca_dir, name="livemig test bed CA", force=True)
    if not (ca_dir / keys.CA_CRL).exists():  # a test bed from before CRLs
        keys.sign_crl(ca_dir)
    ca = (ca_dir / keys.CA_CERT).read_bytes()
    for node in testbed.hosts():
        files = keys.HostFiles.in_dir(paths.tls_dir(node.name), node.name)
        if files.missing() or files.ca.read_bytes() != ca:
            paths.tls_dir(node.name).mkdir(parents=True, exist_ok=True)
            os.chmod(paths.tls_dir(node.name), 0o700)
            keys.issue_host(ca_dir, node.name, [str(node.ip)], out=paths.tls_dir(node.name))
        distribute_crl(files)


def distribute_crl(files: keys.HostFiles) -> None:
    """Copy the test bed CA's CRL to a host's TLS directory, if it differs there."""
    crl = (paths.pki_dir() / keys.CA_CRL).read_bytes()
    assert files.crl is not None
    if not files.crl.is_file() or files.crl.read_bytes() != crl:
        keys.write_public(files.crl, crl)  # atomic: a daemon never reads half of it


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


def stop_daemons(hosts: list[str], timeout: float = 15.0) -> None:
    """Stop these hosts' daemons for good: their supervisors pass SIGTERM on and do not
    restart them."""
    pids = []
    for host in hosts:
        for path in (Path(supervise.pid_file(host)), pid_file(host)):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(path.read_text()))
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(Path(supervise.pid_file(host)).read_text()), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        if time.monotonic() > deadline:
            raise DaemonUnavailable(", ".join(hosts), f"a daemon did not stop in {timeout:g} s")
        time.sleep(0.05)


def ensure_daemons(*, plaintext: bool = False) -> None:
    """A daemon on every host that is up; starts only the missing ones. With
    ``plaintext`` the ones it starts run with --insecure-plaintext."""
    ensure_key()
    ensure_pki()
    started = []
    for node in testbed.hosts():
        # A supervisor whose daemon is gone is restarting it, or on its way out after a
        # clean stop: wait for one or the other before deciding.
        grace = time.monotonic() + supervise.RESTART_DELAY_S + 2.0
        while (_supervised(node.name) and not _running(node.name)
               and time.monotonic() < grace):
            time.sleep(0.05)
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
