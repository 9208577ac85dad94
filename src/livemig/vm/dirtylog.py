"""Which guest pages were written: exact, and cheap in proportion to the pages dirtied.

STUB — interface fixed, implementation to come. See DESIGN.md "A kernel dirty log works
here" and issue 3 item 4.

Two trackers behind one interface:

- ``UffdTracker``: QEMU starts with ``LD_PRELOAD`` of a tiny shim (``preload_library()``)
  that registers userfaultfd write-protection in async mode on the guest RAM mapping in
  QEMU's own process. We read and re-arm the written pages from outside with the
  ``PAGEMAP_SCAN`` ioctl on ``/proc/PID/pagemap``. Cost O(pages dirtied).
- ``ShadowTracker``: an exact comparison of RAM against a shadow copy of what was last
  *sent*. Cost O(RAM) per collect. Used where the kernel lacks the dirty log, or where
  QEMU was started without the shim.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

PageIndexes = npt.NDArray[np.int64]


class DirtyTracker(Protocol):
    name: str

    def start(self) -> None:
        """Arm tracking. From now on every page the guest (or a device by DMA) writes is
        reported by the next ``collect()``."""

    def collect(self) -> PageIndexes:
        """Pages written since ``start()`` or the previous ``collect()``, sorted, and
        re-arm them. Exact: a page whose content changed is never missing."""

    def peek(self, pages: PageIndexes) -> npt.NDArray[np.bool_]:
        """For each of ``pages``: was it written since the last ``collect()``? Does not
        re-arm. The pre-copy uses it to skip pages that will be sent again anyway."""

    def sent(self, pages: PageIndexes, data: npt.NDArray[np.uint8]) -> None:
        """The exact bytes of ``pages`` that went on the wire (shape (n, 4096)). The
        shadow tracker keeps them; the kernel log ignores them."""

    def close(self) -> None: ...


def preload_library() -> Path | None:
    """The shim for QEMU's LD_PRELOAD, built (cached) if this kernel supports the dirty
    log; None where it does not."""
    return None


class TrackerKind:
    AUTO = "auto"
    UFFD = "uffd"
    SHADOW = "shadow"


def open_tracker(pid: int, memory: object, kind: str = TrackerKind.AUTO) -> DirtyTracker:
    """The best tracker for QEMU process ``pid`` whose guest RAM is ``memory`` (a
    ``livemig.vm.memory.GuestMemory``, read-only mapping of the same file).

    ``auto`` picks the kernel log when QEMU runs with the shim and the kernel accepts the
    scan, else the shadow compare. Forcing ``uffd`` where it cannot work raises
    ``livemig.errors.LivemigError`` with a sentence saying why."""
    raise NotImplementedError
