"""Where livemig keeps things, and where a host's things are as this process sees them.

A host's directories are its configuration's (``config.HostConfig``): run-time state
(sockets, VM records, logs) in ``/run/livemig``, gone at reboot like the QEMU processes it
describes; RAM files in ``/dev/shm``; what outlives a reboot in ``/var/lib/livemig/state``.
A daemon, and the CLI on its machine, see their own host's files there and no other's.

Two other kinds of process see hosts' files too:

- the test bed's lab, whose hosts are isolated machines (``net.testbed``): it sees each
  host's files through that host's root (``/proc/PID/root``), as a hypervisor's operator
  reads a guest's disk. The test bed registers that view (``see_lab_hosts``); nothing in
  the daemon, the engine or the VM layer knows of it;
- a process with neither (a unit test playing two hosts in one process): every host gets
  a tree of its own under the run directory.

``LIVEMIG_INSTANCE=NAME`` gives a whole separate test bed (its namespaces and the lab's
run-time state), so that a developer's bed and a test run never touch each other. Built
images are shared: hosts only ever read them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from livemig import config
from livemig.errors import BadName

SHM_DIR = Path("/dev/shm")
NAME_RULE = "use 1 to 32 letters, digits, '.', '_' or '-', starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


def check_name(name: str, what: str = "the name") -> str:
    """``name`` if it can be a VM's or an image's name, else ``BadName``.

    Names become file names (/run/livemig/vms/NAME, /dev/shm/livemig-NAME.ram,
    /var/lib/livemig/images/NAME), removed recursively on stop or rebuild: a name with a
    '/' or a leading '.' would reach outside them.
    """
    if not _NAME.fullmatch(name):
        raise BadName(what, name, NAME_RULE)
    return name


def instance() -> str:
    """'' for the default instance, else a short name of letters and digits."""
    name = os.environ.get("LIVEMIG_INSTANCE", "")
    if not (name.isalnum() and name.isascii() and len(name) <= 4) and name:
        raise BadName("LIVEMIG_INSTANCE", name, "use up to 4 letters or digits")
    return name


def netns_prefix() -> str:
    return f"lm{instance()}-"


def ram_file_prefix() -> str:
    return f"livemig-{instance()}-" if instance() else "livemig-"


def ram_file_glob() -> str:
    """Matches this instance's RAM files of hosts without a configuration (the lab's
    tree: host names start with 'host'), and no configured host's (livemig-VM.ram): a
    'testbed down' must never sweep away a real host's VMs in the same /dev/shm."""
    return ram_file_prefix() + "host*"


def run_dir() -> Path:
    """This process's run-time directory: its host's, else the lab's (one per instance)."""
    own = config.current()
    if own is not None:
        return own.run_dir
    default = f"/run/livemig-{instance()}" if instance() else "/run/livemig"
    return Path(os.environ.get("LIVEMIG_RUN", default))


def data_dir() -> Path:
    """Where images are built and the kernel package is cached (the build machine's)."""
    return Path(os.environ.get("LIVEMIG_DATA", "/var/lib/livemig"))


def images_dir() -> Path:
    own = config.current()
    return own.images_dir if own is not None else data_dir() / "images"


def kernel_cache_dir() -> Path:
    return data_dir() / "kernel"


def pki_dir() -> Path:
    """The test bed's CA (its private key included), in the lab's run directory. On real
    hosts the CA lives with the operator, never on a host."""
    return run_dir() / "pki"


# -- a host's files, as this process sees them -------------------------------------------


@dataclass(frozen=True)
class HostView:
    """Another host's files seen from here: its configuration, and where its root is."""

    root: Path
    config: config.HostConfig

    def outside(self, path: Path) -> Path:
        return self.root / path.relative_to("/")


# Set by the test bed when it is imported: its hosts' views, by name (None: no such host);
# and the names of the hosts it has up.
_lab_view: Callable[[str], HostView | None] | None = None
_lab_hosts: Callable[[], list[str]] | None = None


def see_lab_hosts(view: Callable[[str], HostView | None], hosts: Callable[[], list[str]]
                  ) -> None:
    global _lab_view, _lab_hosts
    _lab_view, _lab_hosts = view, hosts


def _own(host: str) -> config.HostConfig | None:
    own = config.current()
    return own if own is not None and own.name == host else None


def _view(host: str) -> HostView | None:
    return _lab_view(host) if _lab_view is not None and config.current() is None else None


def visible_hosts() -> list[str]:
    """The hosts whose files this process can see: its own, or the lab's, or (neither)
    those with a tree under the run directory."""
    own = config.current()
    if own is not None:
        return [own.name]
    if _lab_hosts is not None and (hosts := _lab_hosts()):
        return hosts
    tree = run_dir() / "hosts"
    return sorted(p.name for p in tree.iterdir()) if tree.is_dir() else []


def _host_path(host: str, pick: Callable[[config.HostConfig], Path], own_tree: str) -> Path:
    if (own := _own(host)) is not None:
        return pick(own)
    if (view := _view(host)) is not None:
        return view.outside(pick(view.config))
    return run_dir() / "hosts" / host / own_tree


def host_dir(host: str) -> Path:
    """``host``'s run-time directory: its daemon's socket, pid file and log, its VMs."""
    return _host_path(host, lambda c: c.run_dir, "")


def state_dir(host: str) -> Path:
    """What ``host`` keeps across reboots: the switchover history."""
    return _host_path(host, lambda c: c.state_dir, "state")


def tls_dir(host: str) -> Path:
    """A host's CA certificate, CRL, its own certificate and its key (``livemig.keys``)."""
    return _host_path(host, lambda c: c.tls_dir, "tls")


def vm_dir(host: str, vm: str) -> Path:
    return host_dir(host) / "vms" / vm


def ram_file(host: str, vm: str) -> Path:
    """``vm``'s RAM file on ``host``, as this process sees it."""
    if (own := _own(host)) is not None:
        return own.ram_dir / f"livemig-{vm}.ram"
    if (view := _view(host)) is not None:
        return view.outside(ram_file_on_host(host, vm))
    return SHM_DIR / f"{ram_file_prefix()}{host}-{vm}.ram"


def ram_file_on_host(host: str, vm: str) -> Path:
    """``vm``'s RAM file as ``host`` itself names it: the path on QEMU's command line."""
    if (view := _view(host)) is not None:
        return view.config.ram_dir / f"livemig-{vm}.ram"
    return ram_file(host, vm)
