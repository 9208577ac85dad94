"""The guest's RAM, as the file QEMU maps with ``memory-backend-file,share=on``.

A host maps the file once for the VM's lifetime (a fresh mapping of 256 MiB costs about
400 ms of page faults): read-only on a source, which only reads pages to send them, and
writable on a destination, which writes pages straight into it.

Pages the guest never wrote are holes in the file. Reading one through a mapping makes
the kernel allocate it, which would double the source's memory and slow round 1, so
``data_ranges`` finds them with ``SEEK_DATA``/``SEEK_HOLE`` without touching them.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from livemig.vm.spec import PAGE_SIZE


class GuestMemory:
    def __init__(self, path: Path, size: int, *, writable: bool) -> None:
        if size % PAGE_SIZE:
            raise ValueError(f"RAM size {size} is not a whole number of pages")
        self.path = path
        self.size = size
        self.writable = writable
        self._fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            if os.fstat(self._fd).st_size < size:
                raise ValueError(f"{path} is smaller than the guest's {size} bytes of RAM")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            # Populate only where every page is about to be written anyway: populating a
            # read-only mapping would allocate every hole.
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if writable else 0)
            self._map = mmap.mmap(self._fd, size, flags=flags, prot=prot)
        except BaseException:
            os.close(self._fd)
            raise
        self.pages: npt.NDArray[np.uint8] = np.frombuffer(self._map, dtype=np.uint8).reshape(
            -1, PAGE_SIZE
        )

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    def data_ranges(self) -> list[tuple[int, int]]:
        """Page ranges ``[start, end)`` that hold data; everything else reads as zero."""
        ranges = []
        offset = 0
        while offset < self.size:
            try:
                start = os.lseek(self._fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            end = min(os.lseek(self._fd, start, os.SEEK_HOLE), self.size)
            if start >= self.size:
                break
            ranges.append((start // PAGE_SIZE, -(-end // PAGE_SIZE)))
            offset = end
        return ranges

    def close(self) -> None:
        # The numpy view holds an export of the mapping; it must go before the mapping.
        del self.pages
        self._map.close()
        os.close(self._fd)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
