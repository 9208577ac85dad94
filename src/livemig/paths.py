"""Where livemig keeps things on a host.

Run-time state (sockets, logs, VM records) lives under ``/run/livemig`` and vanishes at
reboot, like the QEMU processes it describes. Built images and the cached kernel package
live under ``/var/lib/livemig`` so that a rebuild is a cache hit.

``LIVEMIG_INSTANCE=NAME`` gives a whole separate set of everything a test bed makes (its
namespaces, RAM files and run-time state), so that two test beds, say a developer's and
a test run, never touch each other. Built images are shared: they are only ever read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from livemig.errors import BadName

SHM_DIR = Path("/dev/shm")
NAME_RULE = "use 1 to 32 letters, digits, '.', '_' or '-', starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


def check_name(name: str, what: str = "the name") -> str:
    """``name`` if it can be a VM's or an image's name, else ``BadName``.

    Names become file names (/run/livemig/hosts/H/vms/NAME, /dev/shm/...-NAME.ram,
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
    """Matches this instance's RAM files and no other's (host names start with 'host')."""
    return ram_file_prefix() + "host*"


def run_dir() -> Path:
    default = f"/run/livemig-{instance()}" if instance() else "/run/livemig"
    return Path(os.environ.get("LIVEMIG_RUN", default))


def data_dir() -> Path:
    return Path(os.environ.get("LIVEMIG_DATA", "/var/lib/livemig"))


def host_dir(host: str) -> Path:
    """Everything one (simulated) host owns: on real hardware, that host's own disk."""
    return run_dir() / "hosts" / host


def pki_dir() -> Path:
    """The test bed's CA (its private key included). On real hosts the CA lives with the
    operator, never on a host."""
    return run_dir() / "pki"


def tls_dir(host: str) -> Path:
    """A host's CA certificate, its own certificate and its key (``livemig.keys``)."""
    return host_dir(host) / "tls"


def vm_dir(host: str, vm: str) -> Path:
    return host_dir(host) / "vms" / vm


def ram_file(host: str, vm: str) -> Path:
    return SHM_DIR / f"{ram_file_prefix()}{host}-{vm}.ram"


def images_dir() -> Path:
    return data_dir() / "images"


def kernel_cache_dir() -> Path:
    return data_dir() / "kernel"
