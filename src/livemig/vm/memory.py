"""The guest's RAM, as the file QEMU maps with ``memory-backend-file,share=on``.

A host maps the file once for the VM's lifetime (a fresh mapping of 256 MiB costs about
400 ms of page faults): read-only on a source, which only reads pages to send them, and
writable on a destination, which writes pages straight into it. Neither populates the
mapping up front: that would allocate every hole, and the faults of a destination's
writes are spread over the pre-copy, where they cost no downtime.

Pages the guest never wrote are holes in the file. Reading one through a mapping makes
the kernel allocate it, which would double the source's memory and slow round 1, so
``data_ranges`` finds them with ``SEEK_DATA``/``SEEK_HOLE`` without touching them.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from livemig.units import PAGE_SIZE

CHECKSUM_CHUNK_PAGES = 1024  # 4 MiB at a time: bounded temporaries
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1


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
            self._map = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED, prot=prot)
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

    def checksum(self) -> str:
        """The image's checksum (see ``page_checksums``), holes read as zero.

        Only data ranges are read: a hole contributes nothing, as a page of zeros does,
        so equal contents give equal checksums however they were stored.
        """
        total = 0
        for start, end in self.data_ranges():
            for chunk in range(start, end, CHECKSUM_CHUNK_PAGES):
                stop = min(end, chunk + CHECKSUM_CHUNK_PAGES)
                sums = page_checksums(self.pages[chunk:stop], np.arange(chunk, stop))
                total = (total + int(np.add.reduce(sums, dtype=np.uint64))) & _MASK64
        return image_checksum(total)

    def close(self) -> None:
        # The numpy view holds an export of the mapping; it must go before the mapping.
        del self.pages
        self._map.close()
        os.close(self._fd)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def page_checksums(
    pages: npt.NDArray[np.uint8], indexes: npt.NDArray[np.integer[Any]]
) -> npt.NDArray[np.uint64]:
    """A 64-bit checksum of each page that also depends on where the page lies.

    The image's checksum is the sum of its pages' (mod 2**64), so a destination can keep
    one per page as pages arrive and sum them at the switchover instead of reading its
    whole RAM while the VM is stopped. An all-zero page sums to 0, like a hole. Not
    cryptographic: it catches lost, misplaced or torn pages.
    """
    words = pages.view(np.uint64).reshape(len(pages), PAGE_SIZE // 8)
    offsets = np.arange(PAGE_SIZE // 8, dtype=np.uint64)
    position = indexes.astype(np.uint64)[:, None] * np.uint64(PAGE_SIZE // 8) + offsets
    # Odd multipliers from the word's position: no nonzero word can vanish.
    mixed = (words ^ (words >> np.uint64(31))) * (position * _GOLDEN | np.uint64(1))
    result: npt.NDArray[np.uint64] = np.add.reduce(mixed, axis=1, dtype=np.uint64)
    return result


def image_checksum(total: int) -> str:
    return f"{total & _MASK64:016x}"


def sum_checksums(sums: npt.NDArray[np.uint64]) -> str:
    return image_checksum(int(np.add.reduce(sums, dtype=np.uint64)))
