"""Where livemig keeps things on a host.

Run-time state (sockets, logs, VM records) lives under ``/run/livemig`` and vanishes at
reboot, like the QEMU processes it describes. Built images and the cached kernel package
live under ``/var/lib/livemig`` so that a rebuild is a cache hit. Both can be moved with
environment variables, which the tests use to stay out of an operator's way.
"""

from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
RAM_FILE_PREFIX = "livemig-"


def run_dir() -> Path:
    return Path(os.environ.get("LIVEMIG_RUN", "/run/livemig"))


def data_dir() -> Path:
    return Path(os.environ.get("LIVEMIG_DATA", "/var/lib/livemig"))


def host_dir(host: str) -> Path:
    """Everything one (simulated) host owns: on real hardware, that host's own disk."""
    return run_dir() / "hosts" / host


def vm_dir(host: str, vm: str) -> Path:
    return host_dir(host) / "vms" / vm


def ram_file(host: str, vm: str) -> Path:
    return SHM_DIR / f"{RAM_FILE_PREFIX}{host}-{vm}.ram"


def images_dir() -> Path:
    return data_dir() / "images"


def kernel_cache_dir() -> Path:
    return data_dir() / "kernel"
