"""Dirty trackers against a process that plays QEMU: both trackers, the same semantics.

A child Python process maps a /dev/shm file named like a VM's RAM file, MAP_SHARED, with
the preload shim in LD_PRELOAD (so the shim registers the mapping exactly as it does in
QEMU), and writes pages on command through a pipe. The test reads the same file through
a ``GuestMemory``, as the source engine does, and plays the source: round 1 sends every
data page, later rounds send what ``collect()`` returns.

The contract checked for both trackers, every round: pages whose bytes differ from what
the destination holds are all reported (nothing missed), and nothing that was not written
is reported. The kernel log may over-report a page rewritten with the same bytes; the
shadow compare must not.
"""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from livemig.vm import dirtylog
from livemig.vm.dirtylog import DirtyLogUnavailable, DirtyTracker, ShadowTracker, UffdTracker
from livemig.vm.memory import GuestMemory
from livemig.vm.spec import PAGE_SIZE

NPAGES = 256
SIZE = NPAGES * PAGE_SIZE
# Pages that hold data before the child maps the file; every other page is a hole.
DATA_PAGES = [*range(0, 32), *range(100, 110), 200]

CHILD = r"""
import mmap, os, resource, sys
path, size, starve = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "starve"
fd = os.open(path, os.O_RDWR)
if starve:
    # No file descriptor left for the shim's userfaultfd: its registration must fail
    # without taking the process down.
    lowest = max(int(n) for n in os.listdir("/proc/self/fd")) + 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, lowest))
ram = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
print("ready", flush=True)
for line in sys.stdin:
    op, *args = line.split()
    if op == "fill":  # fill PAGE BYTE: the whole page becomes BYTE
        page, value = int(args[0]), int(args[1])
        ram[page * 4096 : (page + 1) * 4096] = bytes([value]) * 4096
    elif op == "poke":  # poke OFFSET BYTE: one byte
        ram[int(args[0])] = int(args[1])
    elif op == "steal":  # steal NR API REGISTER: a userfaultfd of our own, as QEMU's postcopy
        import ctypes, fcntl, struct
        nr, api, register = (int(a) for a in args)
        uffd = ctypes.CDLL(None, use_errno=True).syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK)
        fcntl.ioctl(uffd, api, bytearray(struct.pack("QQQ", 0xAA, 0, 0)))
        start = ctypes.addressof(ctypes.c_char.from_buffer(ram))
        fcntl.ioctl(uffd, register, bytearray(struct.pack("QQQQ", start, size, 1, 0)))
    print("ok", flush=True)
"""


class Child:
    """The stand-in for QEMU: one process, one RAM file, a command pipe."""

    def __init__(self, path: Path, *, shim: Path | None, starve: bool = False) -> None:
        self.path = path
        env = dict(os.environ)
        env.pop("LD_PRELOAD", None)
        if shim is not None:
            env["LD_PRELOAD"] = str(shim)
        argv = [sys.executable, "-c", CHILD, str(path), str(SIZE), "starve" if starve else "-"]
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._expect("ready")

    @property
    def pid(self) -> int:
        return self.process.pid

    def _expect(self, word: str) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if line != word:
            self.process.kill()
            _, stderr = self.process.communicate()
            raise AssertionError(f"child said {line!r}, not {word!r}: {stderr}")

    def _send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        self._expect("ok")

    def fill(self, page: int, value: int) -> None:
        self._send(f"fill {page} {value}")

    def poke(self, offset: int, value: int) -> None:
        self._send(f"poke {offset} {value}")

    def steal(self) -> None:
        """Register the RAM with a userfaultfd of its own (missing mode), as QEMU's
        postcopy does on a destination; the child fails unless the shim gives way."""
        api, register = dirtylog._UFFDIO_API, dirtylog._UFFDIO_REGISTER
        self._send(f"steal {dirtylog._SYS_USERFAULTFD} {api} {register}")

    def stop(self) -> str:
        """End the child (by its PID, through its handle); its stderr."""
        self.process.kill()
        _, stderr = self.process.communicate()
        return stderr


@pytest.fixture
def shim() -> Path:
    library = dirtylog.preload_library()
    if library is None:
        pytest.skip("this kernel keeps no userfaultfd dirty log (Linux 6.7+ needed)")
    return library


@pytest.fixture
def ram_file() -> Iterator[Path]:
    # Named like a VM's RAM file, or the shim leaves it alone; "unit" never matches the
    # test bed's "livemig-[inst-]host*" sweeps.
    path = Path(f"/dev/shm/livemig-unit{os.getpid()}-{time.monotonic_ns()}.ram")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, SIZE)
        for page in DATA_PAGES:  # in the page cache, not yet in the child's page tables
            os.pwrite(fd, bytes([page % 251 + 1]) * PAGE_SIZE, page * PAGE_SIZE)
    finally:
        os.close(fd)
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def spawn(ram_file: Path) -> Iterator[Callable[..., Child]]:
    children: list[Child] = []

    def start(shim: Path | None, *, starve: bool = False) -> Child:
        child = Child(ram_file, shim=shim, starve=starve)
        children.append(child)
        return child

    yield start
    for child in children:
        child.stop()


@pytest.fixture
def memory(ram_file: Path) -> Iterator[GuestMemory]:
    with GuestMemory(ram_file, SIZE, writable=False) as mem:
        yield mem


class Source:
    """Plays the migration source: sends pages, and models what the destination holds."""

    def __init__(self, tracker: DirtyTracker, memory: GuestMemory) -> None:
        self.tracker = tracker
        self.memory = memory
        # A fresh destination file reads as zero everywhere.
        self.destination = np.zeros((NPAGES, PAGE_SIZE), np.uint8)

    def send(self, pages: np.ndarray) -> None:
        pages = np.asarray(pages, dtype=np.int64)
        data = self.memory.pages[pages].copy()  # the bytes that go on the wire
        self.destination[pages] = data
        self.tracker.sent(pages, data)

    def round_one(self) -> None:
        """Arm, then send every page holding data; holes stay zero at the destination."""
        self.tracker.start()
        for first, last in self.memory.data_ranges():
            self.send(np.arange(first, last))

    def stale(self) -> set[int]:
        """Pages whose bytes at the destination differ from the guest's."""
        differ = (self.memory.pages != self.destination).any(axis=1)
        return set(np.flatnonzero(differ).tolist())


@pytest.fixture(params=["uffd", "shadow"])
def source(
    request: pytest.FixtureRequest, spawn: Callable[..., Child], memory: GuestMemory
) -> Iterator[tuple[Source, Child]]:
    """Both trackers, each on its own child: the shadow's child runs without the shim."""
    kind: str = request.param
    if kind == "uffd":
        child = spawn(request.getfixturevalue("shim"))
        tracker: DirtyTracker = UffdTracker(child.pid, memory.path, memory.size)
    else:
        child = spawn(None)
        tracker = ShadowTracker(memory)
    yield Source(tracker, memory), child
    tracker.close()


def collected(tracker: DirtyTracker) -> list[int]:
    pages = tracker.collect()
    assert pages.dtype == np.int64
    assert list(pages) == sorted(set(pages.tolist())), "collect() must be sorted, unique"
    return [int(p) for p in pages]


def test_round_one_then_collect_returns_exactly_the_written_pages(
    source: tuple[Source, Child],
) -> None:
    src, child = source
    src.round_one()
    assert collected(src.tracker) == []
    written = [3, 10, 11, 12, 101, 255]  # data pages, and a hole (255)
    for page in written:
        child.fill(page, 0xEE)
    assert collected(src.tracker) == written
    assert src.stale() == set(written)


def test_collect_rearms(source: tuple[Source, Child]) -> None:
    src, child = source
    src.round_one()
    child.fill(7, 0x55)
    assert collected(src.tracker) == [7]
    src.send(np.array([7]))
    assert collected(src.tracker) == []
    child.fill(7, 0x56)  # the same page again, in a later round
    assert collected(src.tracker) == [7]


def test_peek_does_not_rearm(source: tuple[Source, Child]) -> None:
    src, child = source
    src.round_one()
    collected(src.tracker)
    child.fill(5, 0x99)
    asked = np.array([5, 6, 5, 200], dtype=np.int64)
    assert src.tracker.peek(asked).tolist() == [True, False, True, False]
    assert src.tracker.peek(asked).tolist() == [True, False, True, False]
    assert collected(src.tracker) == [5]
    # Collected: from now on "written" means written after that collect.
    assert src.tracker.peek(np.array([5], dtype=np.int64)).tolist() == [False]
    child.fill(5, 0x9A)
    assert src.tracker.peek(np.array([5], dtype=np.int64)).tolist() == [True]
    assert src.tracker.peek(np.array([], dtype=np.int64)).tolist() == []


def test_pages_the_process_never_touched(source: tuple[Source, Child]) -> None:
    """Holes of the file, and data pages in the page cache but not yet in the process's
    page tables: their first write after arming is reported all the same."""
    src, child = source
    src.round_one()
    assert collected(src.tracker) == []
    child.poke(60 * PAGE_SIZE + 123, 1)  # a hole
    child.poke(105 * PAGE_SIZE + 9, 0)  # data, never mapped by the child
    assert collected(src.tracker) == [60, 105]
    src.send(np.array([60, 105]))
    assert collected(src.tracker) == []


def test_a_page_written_back_to_bytes_never_sent_is_resent(
    source: tuple[Source, Child],
) -> None:
    """ABA against what was *seen*: the destination holds A; the page becomes B and is
    collected (seen) but skipped as still hot; it is then written back to B. It still
    differs from the destination, so it must come back."""
    src, child = source
    child.fill(9, 0xA0)
    src.round_one()  # the destination holds A
    child.fill(9, 0xB0)
    assert collected(src.tracker) == [9]  # B seen, and about to be sent, but...
    child.fill(9, 0xC0)
    assert src.tracker.peek(np.array([9], dtype=np.int64)).tolist() == [True]  # ...skipped
    child.fill(9, 0xB0)  # back to the bytes seen at the collect
    assert collected(src.tracker) == [9]
    assert src.stale() == {9}


def test_holes_are_never_read(source: tuple[Source, Child]) -> None:
    """Reading a hole through the mapping allocates it: memory doubles, round 1 slows."""
    src, _ = source
    before = src.memory.data_ranges()
    every = np.arange(NPAGES, dtype=np.int64)
    src.tracker.start()
    src.tracker.peek(every)  # round 1 peeks at every page before it sends
    holes = np.ones(NPAGES, dtype=bool)
    for first, last in before:
        holes[first:last] = False
        src.send(np.arange(first, last))
    zero = every[holes]  # holes go as zero pages, never read: the source's own rule
    src.tracker.sent(zero, np.zeros((len(zero), PAGE_SIZE), np.uint8))
    for _ in range(2):
        assert collected(src.tracker) == []
        src.tracker.peek(every)
    assert src.memory.data_ranges() == before


@pytest.mark.parametrize("seed", range(4))
def test_random_rounds_miss_nothing(source: tuple[Source, Child], seed: int) -> None:
    """The contract, round after round: stale pages <= collected <= written pages; and
    the pre-copy's skip rule (skip what peek() calls written again) loses nothing."""
    src, child = source
    rng = np.random.default_rng(seed)

    def guest_runs() -> set[int]:
        written = set()
        for _ in range(int(rng.integers(0, 40))):
            page = int(rng.integers(0, NPAGES))
            # Few values, so rewrites with the same bytes and ABA happen often.
            child.fill(page, int(rng.integers(0, 3)))
            written.add(page)
        return written

    src.round_one()
    written = guest_runs()
    for _ in range(8):
        stale = src.stale()
        got = collected(src.tracker)
        assert stale <= set(got), f"missed {sorted(stale - set(got))}"
        assert set(got) <= written, f"reported unwritten {sorted(set(got) - written)}"
        if src.tracker.name == "shadow":
            assert set(got) == stale  # exact: never a page the destination holds
        at_collect = src.memory.pages.copy()
        written = guest_runs()  # the guest runs on while the round sends
        pages = np.array(got, dtype=np.int64)
        hot = src.tracker.peek(pages)
        changed = (src.memory.pages[pages] != at_collect[pages]).any(axis=1)
        assert not (changed & ~hot).any(), "peek() missed a page changed since collect()"
        assert set(pages[hot].tolist()) <= written
        src.send(pages[~hot])


def test_rewriting_the_same_bytes(
    spawn: Callable[..., Child], memory: GuestMemory, shim: Path
) -> None:
    """Where the two differ: the kernel logs writes, the shadow compares bytes."""
    child = spawn(shim)
    uffd = Source(UffdTracker(child.pid, memory.path, memory.size), memory)
    shadow = Source(ShadowTracker(memory), memory)
    uffd.round_one()
    shadow.round_one()
    child.fill(3, 3 % 251 + 1)  # the bytes the page already holds
    child.fill(4, 0x77)
    child.fill(4, 4 % 251 + 1)  # changed and changed back
    assert collected(uffd.tracker) == [3, 4]
    assert collected(shadow.tracker) == []


def test_a_full_output_vector_is_continued(
    spawn: Callable[..., Child], memory: GuestMemory, shim: Path
) -> None:
    child = spawn(shim)
    # 4 regions per call: every other page written makes 50 regions, 13 calls.
    tracker = UffdTracker(child.pid, memory.path, memory.size, vec_len=4)
    tracker.start()
    written = [*range(1, 100, 2), 150, 151, 152]
    for page in written:
        child.fill(page, 0x42)
    assert tracker.peek(np.array(written, dtype=np.int64)).all()
    assert collected(tracker) == written
    assert collected(tracker) == []
    tracker.close()


def test_auto_picks_the_kernel_log_when_the_shim_registered(
    spawn: Callable[..., Child], memory: GuestMemory, shim: Path
) -> None:
    child = spawn(shim)
    tracker = dirtylog.open_tracker(child.pid, memory)
    assert tracker.name == "uffd"
    tracker.close()
    assert "livemig-shim" not in child.stop()  # registered without complaint


def test_without_the_shim_auto_falls_back_and_uffd_refuses(
    spawn: Callable[..., Child], memory: GuestMemory
) -> None:
    child = spawn(None)
    assert dirtylog.open_tracker(child.pid, memory, "auto").name == "shadow"
    assert dirtylog.open_tracker(child.pid, memory, "shadow").name == "shadow"
    with pytest.raises(DirtyLogUnavailable) as caught:
        dirtylog.open_tracker(child.pid, memory, "uffd")
    assert caught.value.pid == child.pid
    assert caught.value.errno == errno.EPERM  # CHECK_WPASYNC: not registered


def test_a_failed_registration_leaves_the_process_running(
    spawn: Callable[..., Child], memory: GuestMemory, shim: Path
) -> None:
    """The shim must never break QEMU: it says so in one line and carries on."""
    child = spawn(shim, starve=True)
    child.fill(1, 0x11)  # the mapping works
    assert memory.pages[1, 0] == 0x11
    assert dirtylog.open_tracker(child.pid, memory).name == "shadow"
    with pytest.raises(DirtyLogUnavailable):
        dirtylog.open_tracker(child.pid, memory, "uffd")
    stderr = child.stop()
    assert [line for line in stderr.splitlines() if "livemig-shim" in line] == [
        next(line for line in stderr.splitlines() if "userfaultfd()" in line)
    ]


def test_the_shim_gives_way_to_qemus_own_userfaultfd(
    spawn: Callable[..., Child], memory: GuestMemory, shim: Path
) -> None:
    """A range belongs to one userfaultfd: QEMU's postcopy would fail with EBUSY."""
    child = spawn(shim)
    assert dirtylog.open_tracker(child.pid, memory).name == "uffd"
    child.steal()  # raises in the child (and fails here) if the register is refused
    assert dirtylog.open_tracker(child.pid, memory).name == "shadow"
    lines = [line for line in child.stop().splitlines() if "livemig-shim" in line]
    assert len(lines) == 1 and "gives way" in lines[0]


def test_a_process_that_is_gone(
    spawn: Callable[..., Child], memory: GuestMemory, shim: Path
) -> None:
    child = spawn(shim)
    tracker = UffdTracker(child.pid, memory.path, memory.size)
    tracker.start()
    child.stop()
    with pytest.raises(DirtyLogUnavailable):
        tracker.collect()
    tracker.close()
    with pytest.raises(DirtyLogUnavailable):
        UffdTracker(child.pid, memory.path, memory.size)


def test_preload_library_is_built_once_and_cheap_after(shim: Path) -> None:
    assert shim.is_file() and shim.suffix == ".so"
    started = time.perf_counter()
    for _ in range(100):
        assert dirtylog.preload_library() == shim
    assert time.perf_counter() - started < 0.01


def test_regions_expand_to_pages() -> None:
    base = 0x7F0000000000
    regions = np.array(
        [
            [base, base + PAGE_SIZE],
            [base + 3 * PAGE_SIZE, base + 6 * PAGE_SIZE],
            [base + 9 * PAGE_SIZE, base + 10 * PAGE_SIZE],
        ],
        dtype=np.int64,
    )
    assert dirtylog._expand(regions, base).tolist() == [0, 3, 4, 5, 9]
    singles = regions[[0, 2]]
    assert dirtylog._expand(singles, base).tolist() == [0, 9]
    assert list(itertools.chain(dirtylog._expand(regions[:0], base))) == []


def test_shadow_sent_checks_its_input(memory: GuestMemory) -> None:
    tracker = ShadowTracker(memory)
    with pytest.raises(ValueError):
        tracker.sent(np.array([1, 2], dtype=np.int64), np.zeros((1, PAGE_SIZE), np.uint8))


def test_no_shim_switch_leaves_qemu_as_shipped(shim: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dirtylog.NO_SHIM_ENV, "1")
    assert dirtylog.qemu_preload() is None
    monkeypatch.setenv(dirtylog.NO_SHIM_ENV, "0")  # only "1" switches it off
    assert dirtylog.qemu_preload() == shim
    monkeypatch.delenv(dirtylog.NO_SHIM_ENV)
    assert dirtylog.qemu_preload() == shim
