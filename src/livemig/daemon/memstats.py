"""Where a daemon's memory is: the kernel's view (RSS) beside the C heap's (glibc).

RSS alone cannot tell a leak from a heap that keeps freed memory: glibc returns freed
chunks to the kernel only from the top of a heap, or when asked (``malloc_trim``). So
the daemon answers a ``MemoryQuery`` with both views (``wire.messages.MemoryFigures``),
and the soak benchmark reads them after every migration:

- ``rss_kib``: resident memory, what the kernel charges us, and its parts: anonymous
  (``rss_anon_kib``: heaps, Python's arenas), file-backed (``rss_file_kib``) and shared
  memory (``rss_shmem_kib``: pages of a guest's RAM file while it is mapped);
- ``heap_in_use_kib``: bytes malloc has handed out and not had back (``mallinfo2``:
  uordblks + hblkhd), which grows with a leak in C or Python objects;
- ``heap_free_kib``: bytes freed but still held by malloc's arenas (fordblks), which
  is what fragmentation grows;
- ``python_blocks``: the interpreter's live object memory blocks.

Off glibc (musl, macOS) the heap figures are None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from pathlib import Path
from typing import ClassVar

from livemig.wire.messages import MemoryFigures


class _MallInfo2(ctypes.Structure):
    # struct mallinfo2 of glibc >= 2.33: ten size_t fields, in this order.
    _fields_: ClassVar = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc, or one older than 2.33
        return None
    return libc


_LIBC = _libc()


_STATUS_FIELDS = {"VmRSS": "rss_kib", "RssAnon": "rss_anon_kib", "RssFile": "rss_file_kib",
                  "RssShmem": "rss_shmem_kib"}


def _resident() -> dict[str, int]:
    figures = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in _STATUS_FIELDS:
            figures[_STATUS_FIELDS[key]] = int(value.split()[0])
    return figures


def report() -> MemoryFigures:
    """This process's memory, as the module docstring describes."""
    heap_in_use = heap_free = None
    if _LIBC is not None:
        info = _LIBC.mallinfo2()
        heap_in_use = (info.uordblks + info.hblkhd) // 1024
        heap_free = info.fordblks // 1024
    return MemoryFigures(python_blocks=sys.getallocatedblocks(), heap_in_use_kib=heap_in_use,
                         heap_free_kib=heap_free, **_resident())


def give_back() -> bool:
    """Return the C heap's free memory to the kernel (``malloc_trim(0)``); False when
    there was nothing to return or this is not glibc.

    The daemon calls it when a migration ends: a migration's transient buffers (TLS
    records, page batches, the device state) leave 5-15 MiB free in malloc's arenas,
    which an idle daemon has no use for. It takes a millisecond or two."""
    return _LIBC is not None and bool(_LIBC.malloc_trim(0))
