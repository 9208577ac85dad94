"""The daemon's account of its memory (``daemon.memstats``), read in this process."""

from __future__ import annotations

import pytest

from livemig.daemon import memstats

MIB = 1024


def test_the_heap_in_use_follows_what_is_allocated_and_freed() -> None:
    before = memstats.report()
    if before.heap_in_use_kib is None:
        pytest.skip("not glibc: no heap figures")
    block = bytearray(32 << 20)  # far past Python's small-object allocator: malloc's
    held = memstats.report()
    del block
    after = memstats.report()
    assert held.heap_in_use_kib - before.heap_in_use_kib >= 32 * MIB
    assert held.heap_in_use_kib - after.heap_in_use_kib >= 32 * MIB
    assert held.rss_kib >= held.rss_anon_kib >= 0


def test_giving_back_returns_freed_memory_to_the_kernel() -> None:
    if memstats.report().heap_in_use_kib is None:
        pytest.skip("not glibc")
    # Many medium blocks below the mmap threshold, every other one freed: the holes stay
    # in malloc's heap until it is trimmed.
    blocks = [bytearray(64 << 10) for _ in range(512)]
    del blocks[::2]
    held = memstats.report().rss_anon_kib
    memstats.give_back()
    assert memstats.report().rss_anon_kib < held - 8 * MIB
    del blocks
