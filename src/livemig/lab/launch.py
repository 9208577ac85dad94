"""Start one daemon per test bed host (idempotent), each inside its host's namespaces.

A daemon is detached (``setsid -f``): it belongs to no caller, outlives the command that
started it, and is reaped by init when 'testbed down' ends it. It writes its own pid file.
It runs under ``lab.supervise``, which starts it again if it dies, as systemd would.

Before that, the test bed does for each host what an operator does with 'livemig keys'
(docs/real-hosts.md): a CA in the lab's run directory, and in each host's /etc/livemig its
certificate, key, the CA certificate, the CA's CRL and the shared peer key, so the daemons
speak mutual TLS with no manual step. Only an explicit ``plaintext=True`` (``testbed up
--insecure-plaintext``) starts them without.
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
from livemig.daemon import control
from livemig.daemon.control import DaemonUnavailable
from livemig.errors import LivemigError
from livemig.lab import supervise
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
    key = control.key_file().read_bytes()
    for node in testbed.hosts():
        tls_dir = host_tls_dir(node.name)
        files = keys.HostFiles.in_dir(tls_dir, node.name)
        if files.missing() or files.ca.read_bytes() != ca:
            tls_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(tls_dir, 0o700)
            keys.issue_host(ca_dir, node.name, [str(node.ip)], out=tls_dir)
        distribute_crl(files)
        peer_key = testbed.lab_etc(node.name) / "peer.key"
        if not peer_key.is_file() or peer_key.read_bytes() != key:
            fd = os.open(peer_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key)


def host_tls_dir(host: str) -> Path:
    """``host``'s TLS directory, as the lab writes it (the host sees /etc/livemig/tls)."""
    return testbed.lab_etc(host) / "tls"


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
        theirs = os.stat(f"/proc/{pid}/ns/net")
        hosts = os.stat(f"/run/netns/{testbed.host_node(host).netns}")
    except (OSError, ValueError, LivemigError):
        return False
    # Every host's daemon has the same command line: its namespace tells them apart.
    same_host = (theirs.st_dev, theirs.st_ino) == (hosts.st_dev, hosts.st_ino)
    return module.encode() in cmdline and same_host


def _supervised(host: str) -> bool:
    """A supervisor runs for ``host``: its daemon runs, or soon will again."""
    return _running(host, "livemig.lab.supervise", Path(supervise.pid_file(host)))


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
        paths.host_dir(node.name).mkdir(parents=True, exist_ok=True)  # the host's /run/livemig
        # A supervisor whose daemon is gone is restarting it, or on its way out after a
        # clean stop: wait for one or the other before deciding.
        grace = time.monotonic() + supervise.RESTART_DELAY_S + 2.0
        while (_supervised(node.name) and not _running(node.name)
               and time.monotonic() < grace):
            time.sleep(0.05)
        if _supervised(node.name):
            started.append(node.name)  # wait for its daemon below, start no second one
            continue
        control.socket_path(node.name).unlink(missing_ok=True)  # a dead daemon's
        argv = ["setsid", "-f", sys.executable, "-m", "livemig.lab.supervise",
                "--config", str(testbed.HOST_ETC / testbed.CONFIG_FILE)]
        argv += ["--insecure-plaintext"] if plaintext else []
        log = paths.host_dir(node.name) / "livemigd.log"
        with log.open("ab") as out:
            subprocess.run(node.exec_argv(argv), stdin=subprocess.DEVNULL, stdout=out,
                           stderr=out, check=True, env=testbed.host_environment())
        started.append(node.name)
    deadline = time.monotonic() + START_TIMEOUT_S
    for host in started:
        while not (control.socket_path(host).exists() and _running(host)):
            if time.monotonic() > deadline:
                raise DaemonUnavailable(host, f"it did not start within {START_TIMEOUT_S:g} s; "
                                        f"see {paths.host_dir(host) / 'livemigd.log'}")
            time.sleep(0.05)
