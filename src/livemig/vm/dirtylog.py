"""Which guest pages were written: exact, and cheap in proportion to the pages dirtied.

Two trackers behind one interface:

- ``UffdTracker``: QEMU starts with ``LD_PRELOAD`` of a tiny shim (``preload_library()``,
  source in ``uffd_shim.c``) that registers userfaultfd write-protection in async mode on
  the guest RAM mapping in QEMU's own process. We read and re-arm the written pages from
  outside with the ``PAGEMAP_SCAN`` ioctl on ``/proc/PID/pagemap``. Cost O(pages dirtied).
- ``ShadowTracker``: an exact comparison of RAM against a shadow copy of what was last
  *sent*. Cost O(RAM) per collect. Used where the kernel lacks the dirty log, or where
  QEMU was started without the shim (``LIVEMIG_NO_UFFD_SHIM=1`` does that on purpose).

What "exact" means for each. The kernel log reports every page written through QEMU's
page tables, which is how both the vCPUs (TCG stores) and QEMU's devices (virtio "DMA"
is a memcpy in QEMU) reach guest RAM; a page rewritten with the same bytes is reported
too (over-reporting is safe). The shadow compare reports exactly the pages whose bytes
differ from what the destination holds, so a page written and written back (ABA) since
it was sent is not reported, and must not be: the destination already has those bytes.

Neither sees a write that does not go through QEMU's mapping: a hole punched into the RAM
file (QEMU does that only for balloon, virtio-mem and postcopy, none of which we use), or
another process writing the file through its own mapping (a destination engine does; a
source never does).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import logging
import mmap
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from livemig import config, paths
from livemig.errors import LivemigError
from livemig.units import PAGE_SIZE
from livemig.vm.memory import GuestMemory

log = logging.getLogger(__name__)

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


class DirtyLogUnavailable(LivemigError):
    """The kernel dirty log of a QEMU process cannot be used, or stopped working.

    ``reason`` says why in words; ``errno`` is the failing call's error number, if any.
    The shadow tracker (``--tracker shadow``, or ``auto``) works wherever this is raised.
    """

    def __init__(self, pid: int, reason: str, errno_: int | None = None) -> None:
        super().__init__(
            f"the kernel dirty log of QEMU process {pid} cannot be used: {reason}; "
            "use the shadow tracker instead"
        )
        self.pid = pid
        self.reason = reason
        self.errno = errno_


# -- the kernel's ABI -------------------------------------------------------------------
# Debian 12's headers (6.1) predate PAGEMAP_SCAN and WP_ASYNC (both Linux 6.7), so the
# numbers are written out here, from include/uapi/linux/{userfaultfd,fs}.h. Whether the
# running kernel accepts them is checked at run time (_kernel_self_test).

_SYS_USERFAULTFD: Final = {"x86_64": 323, "aarch64": 282}.get(platform.machine())
_UFFD_API: Final = 0xAA
_UFFD_USER_MODE_ONLY: Final = 1
_UFFD_FEATURE_WP_HUGETLBFS_SHMEM: Final = 1 << 12
_UFFD_FEATURE_WP_UNPOPULATED: Final = 1 << 13
_UFFD_FEATURE_WP_ASYNC: Final = 1 << 15
_UFFD_FEATURES: Final = (
    _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_HUGETLBFS_SHMEM | _UFFD_FEATURE_WP_UNPOPULATED
)
_UFFDIO_REGISTER_MODE_WP: Final = 1 << 1

_PM_SCAN_WP_MATCHING: Final = 1 << 0
_PM_SCAN_CHECK_WPASYNC: Final = 1 << 1
_PAGE_IS_WRITTEN: Final = 1 << 1


def _iowr(kind: int, number: int, size: int) -> int:
    """Linux's _IOWR(): direction read|write, argument size, type and number."""
    return (3 << 30) | (size << 16) | (kind << 8) | number


class _UffdioApi(ctypes.Structure):
    _fields_ = (
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    )


class _UffdioRegister(ctypes.Structure):
    _fields_ = (
        ("start", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    )


class _PmScanArg(ctypes.Structure):
    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in (
            "size",
            "flags",
            "start",
            "end",
            "walk_end",
            "vec",
            "vec_len",
            "max_pages",
            "category_inverted",
            "category_mask",
            "category_anyof_mask",
            "return_mask",
        )
    )


class _PageRegion(ctypes.Structure):
    _fields_ = (
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("categories", ctypes.c_uint64),
    )


assert ctypes.sizeof(_PmScanArg) == 96 and ctypes.sizeof(_PageRegion) == 24

_UFFDIO_API: Final = _iowr(_UFFD_API, 0x3F, ctypes.sizeof(_UffdioApi))
_UFFDIO_REGISTER: Final = _iowr(_UFFD_API, 0x00, ctypes.sizeof(_UffdioRegister))
_PAGEMAP_SCAN: Final = _iowr(ord("f"), 16, ctypes.sizeof(_PmScanArg))

_libc = ctypes.CDLL(None, use_errno=True)


def _userfaultfd() -> int:
    if _SYS_USERFAULTFD is None:
        raise OSError(errno.ENOSYS, f"no userfaultfd syscall number for {platform.machine()}")
    err = 0
    # UFFD_USER_MODE_ONLY is what vm.unprivileged_userfaultfd=0 still allows a non-root
    # process; async write-protection never delivers a fault, so it loses us nothing.
    for extra in (0, _UFFD_USER_MODE_ONLY):
        fd = int(_libc.syscall(_SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | extra))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EPERM:
            break
    raise OSError(err, os.strerror(err))


class _Scanner:
    """PAGEMAP_SCAN over one address range of one process, into a reused output vector.

    The kernel merges neighbouring pages into one region, so a vector of ``vec_len``
    regions holds at least that many pages; when it is full the kernel stops and tells us
    where (``walk_end``), and we go on from there."""

    def __init__(self, pagemap_fd: int, start: int, end: int, vec_len: int) -> None:
        self._fd = pagemap_fd
        self.start = start
        self.end = end
        self._vec = (_PageRegion * vec_len)()
        self._regions = np.frombuffer(memoryview(self._vec).cast("B"), np.uint64).reshape(-1, 3)
        self._arg = _PmScanArg(
            size=ctypes.sizeof(_PmScanArg),
            vec=ctypes.addressof(self._vec),
            vec_len=vec_len,
            category_mask=_PAGE_IS_WRITTEN,
            return_mask=_PAGE_IS_WRITTEN,
        )

    def written(
        self, *, rearm: bool, start: int | None = None, end: int | None = None
    ) -> PageIndexes:
        """Page indexes, relative to ``self.start``, of the written pages in the range."""
        arg = self._arg
        # CHECK_WPASYNC: fail (EPERM) rather than silently skip a range that is not
        # registered, which would read as "nothing written" and lose pages.
        arg.flags = _PM_SCAN_CHECK_WPASYNC | (_PM_SCAN_WP_MATCHING if rearm else 0)
        address = self.start if start is None else start
        stop = self.end if end is None else end
        found: list[npt.NDArray[np.uint64]] = []
        # If a call fails after earlier ones re-armed part of the range, those pages are
        # lost to the log: the caller must then give the tracker up (the migration fails
        # and the VM runs on here), never carry on with it.
        while address < stop:
            arg.start = address
            arg.end = stop
            n = fcntl.ioctl(self._fd, _PAGEMAP_SCAN, arg)
            if n:
                # Copied: the next call overwrites the vector.
                found.append(self._regions[:n, :2].copy())
            if arg.walk_end <= address:  # no progress: never loop forever on a kernel bug
                raise OSError(errno.EIO, f"PAGEMAP_SCAN made no progress at {address:#x}")
            address = arg.walk_end
        if not found:
            return np.empty(0, np.int64)
        regions = np.concatenate(found).astype(np.int64)
        return _expand(regions, self.start)

    def probe(self) -> None:
        """Walk the whole range without output or re-arming: raises OSError (EPERM) if
        any of it is not registered for async write-protection."""
        arg = _PmScanArg(
            size=ctypes.sizeof(_PmScanArg),
            flags=_PM_SCAN_CHECK_WPASYNC,
            start=self.start,
            end=self.end,
            category_mask=_PAGE_IS_WRITTEN,
            return_mask=_PAGE_IS_WRITTEN,
        )
        # No vector: the kernel checks every VMA in the range and outputs nothing.
        fcntl.ioctl(self._fd, _PAGEMAP_SCAN, arg)


def _expand(regions: npt.NDArray[np.int64], base: int) -> PageIndexes:
    """Regions [start, end) of addresses to the sorted page indexes they cover, without
    a Python loop: one region per page is the common case, long runs the other."""
    starts: PageIndexes = (regions[:, 0] - base) // PAGE_SIZE
    lengths: PageIndexes = (regions[:, 1] - regions[:, 0]) // PAGE_SIZE
    total = int(lengths.sum())
    if total == len(starts):
        return starts
    # Output position p inside region r holds starts[r] + (p - first[r]).
    first = np.cumsum(lengths) - lengths
    pages: PageIndexes = np.arange(total, dtype=np.int64) + np.repeat(starts - first, lengths)
    return pages


# -- the preload shim ---------------------------------------------------------------------

_SHIM_SOURCE: Final = Path(__file__).with_name("uffd_shim.c")
_SHIM_CFLAGS: Final = ("-shared", "-fPIC", "-O2", "-Wall")


def _kernel_self_test() -> str | None:
    """None if this kernel keeps the dirty log as we use it, else why not.

    The same steps as the shim and UffdTracker, in this process, on a 4-page shmem
    mapping: register async WP, arm with a scan, write, and check that a scan reports
    exactly the written pages. Headers cannot tell us this; only the kernel can."""
    npages = 4
    size = npages * PAGE_SIZE
    try:
        fd = os.memfd_create("livemig-dirtylog-selftest", os.MFD_CLOEXEC)
    except OSError as exc:
        return f"memfd_create: {exc.strerror}"
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(
            fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
        ) as region:
            window = (ctypes.c_char * size).from_buffer(region)
            address = ctypes.addressof(window)
            del window  # an exported buffer would keep the mapping from closing
            region[0] = 1  # a page present before arming: arming must cover it too
            return _self_test_on(region, address, size)
    except OSError as exc:
        return f"{exc.strerror or exc}"
    finally:
        os.close(fd)


def _self_test_on(region: mmap.mmap, address: int, size: int) -> str | None:
    try:
        uffd = _userfaultfd()
    except OSError as exc:
        return f"userfaultfd(): {exc.strerror}"
    try:
        api = _UffdioApi(api=_UFFD_API, features=_UFFD_FEATURES)
        try:
            fcntl.ioctl(uffd, _UFFDIO_API, api)
        except OSError as exc:
            return f"UFFDIO_API with WP_ASYNC|WP_HUGETLBFS_SHMEM|WP_UNPOPULATED: {exc.strerror}"
        register = _UffdioRegister(start=address, len=size, mode=_UFFDIO_REGISTER_MODE_WP)
        try:
            fcntl.ioctl(uffd, _UFFDIO_REGISTER, register)
        except OSError as exc:
            return f"UFFDIO_REGISTER on shmem: {exc.strerror}"
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            scanner = _Scanner(pagemap, address, address + size, vec_len=2)
            try:
                armed = scanner.written(rearm=True)
            except OSError as exc:
                return f"PAGEMAP_SCAN: {exc.strerror}"
            region[2 * PAGE_SIZE] = 1
            region[3 * PAGE_SIZE + 7] = 1  # never touched before: unpopulated when armed
            seen = scanner.written(rearm=True)
            again = scanner.written(rearm=True)
        finally:
            os.close(pagemap)
    finally:
        os.close(uffd)
    if 0 not in armed or seen.tolist() != [2, 3] or len(again):
        return f"PAGEMAP_SCAN reported {armed.tolist()}, {seen.tolist()}, {again.tolist()}"
    return None


def _build_shim() -> Path:
    """Compile the shim once per source version; concurrent builders race harmlessly,
    the atomic rename leaves one whole library either way."""
    source = _SHIM_SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(_SHIM_CFLAGS).encode()).hexdigest()[:16]
    own = config.current()
    # A host builds its own, in its state directory: the image cache is read only.
    directory = (own.state_dir if own is not None else paths.data_dir()) / "shim"
    library = directory / f"{digest}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=directory, prefix=f".{digest}-", suffix=".so")
    os.close(fd)
    try:
        subprocess.run(
            ["gcc", *_SHIM_CFLAGS, "-o", partial, str(_SHIM_SOURCE), "-ldl"],
            check=True,
            capture_output=True,
            text=True,
        )
        os.chmod(partial, 0o755)
        os.replace(partial, library)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return library


@functools.cache
def preload_library() -> Path | None:
    """The shim for QEMU's LD_PRELOAD, built (cached) if this kernel supports the dirty
    log; None where it does not.

    Memoized: QEMU starts often, and neither the kernel nor the source changes under a
    running process."""
    why_not = _kernel_self_test()
    if why_not is not None:
        log.info("no kernel dirty log here (%s); VMs will use the shadow compare", why_not)
        return None
    try:
        return _build_shim()
    except (OSError, subprocess.CalledProcessError) as exc:
        # A host without gcc still migrates, only slower: not worth refusing to start VMs.
        detail = getattr(exc, "stderr", None) or str(exc)
        log.warning(
            "cannot build the dirty-log shim (%s); VMs will use the shadow compare", detail.strip()
        )
        return None


# Set to 1 to start every QEMU without the shim: QEMU exactly as shipped, for diagnosis
# (is the shim to blame for what a guest does?). Our engine then finds no dirty log on
# the mapping and uses the shadow compare; nothing else changes.
NO_SHIM_ENV = "LIVEMIG_NO_UFFD_SHIM"


def qemu_preload() -> Path | None:
    """What a QEMU starting now gets in LD_PRELOAD: ``preload_library()``, or None when
    ``LIVEMIG_NO_UFFD_SHIM=1``. Read at every start, unlike the memoized library, so that
    one process can start QEMUs both ways."""
    if os.environ.get(NO_SHIM_ENV) == "1":
        return None
    return preload_library()


# -- the kernel dirty log -----------------------------------------------------------------


def _find_ram_mapping(pid: int, ram_file: Path, size: int) -> int:
    """The address where QEMU ``pid`` maps ``ram_file`` from offset 0 for ``size`` bytes.

    Matched by device and inode, not by name: a name can be reused or shown as
    "(deleted)". The mapping may be split into several VMAs; they must join up."""
    try:
        st = os.stat(ram_file)
        with open(f"/proc/{pid}/maps") as maps:
            lines = maps.readlines()
    except OSError as exc:
        raise DirtyLogUnavailable(
            pid, f"cannot read {exc.filename}: {exc.strerror}", exc.errno
        ) from exc
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    spans: dict[int, list[tuple[int, int]]] = {}
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or fields[4] != str(st.st_ino) or fields[3] != device:
            continue
        if fields[1][3] != "s":  # a private mapping is a copy, not the guest's RAM
            continue
        low, high = (int(x, 16) for x in fields[0].split("-"))
        spans.setdefault(low - int(fields[2], 16), []).append((low, high))
    for base, parts in spans.items():
        reach = base
        for low, high in sorted(parts):
            if low > reach:
                break
            reach = max(reach, high)
        if reach >= base + size:
            return base
    raise DirtyLogUnavailable(pid, f"the process does not map all {size} bytes of {ram_file}")


class UffdTracker:
    """The kernel's dirty log of QEMU process ``pid``, read from outside.

    Needs QEMU started with ``preload_library()`` in LD_PRELOAD. Opening it checks that
    the RAM mapping is registered, so a QEMU without the shim fails here and not later.
    """

    name = "uffd"

    def __init__(self, pid: int, ram_file: Path, size: int, *, vec_len: int = 1 << 16) -> None:
        # 64 Ki regions (1.5 MiB) cover a 256 MiB guest in one call even at the worst
        # case, every other page written; bigger guests take a few calls.
        self.pid = pid
        self.npages = size // PAGE_SIZE
        base = _find_ram_mapping(pid, ram_file, size)
        try:
            self._pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._translate(exc) from exc
        self._scanner = _Scanner(self._pagemap, base, base + size, vec_len)
        try:
            self._scanner.probe()
        except OSError as exc:
            os.close(self._pagemap)
            raise self._translate(exc) from exc

    def _translate(self, exc: OSError) -> DirtyLogUnavailable:
        if exc.errno == errno.EPERM:
            reason = (
                "its guest RAM is not registered for userfaultfd async write-protection"
                " (QEMU was started without the livemig shim in LD_PRELOAD, or the shim"
                " failed: see QEMU's stderr)"
            )
        elif exc.errno in (errno.ENOTTY, errno.EINVAL):
            reason = "this kernel has no PAGEMAP_SCAN ioctl (Linux 6.7 or later has it)"
        elif exc.errno in (errno.ESRCH, errno.ENOENT):
            reason = "the process has exited"
        else:
            reason = f"PAGEMAP_SCAN failed: {exc.strerror or exc}"
        return DirtyLogUnavailable(self.pid, reason, exc.errno)

    def _written(self, *, rearm: bool, first: int = 0, last: int | None = None) -> PageIndexes:
        start = self._scanner.start
        try:
            return self._scanner.written(
                rearm=rearm,
                start=start + first * PAGE_SIZE,
                end=start + (self.npages if last is None else last) * PAGE_SIZE,
            )
        except OSError as exc:
            raise self._translate(exc) from exc

    def start(self) -> None:
        # Every page QEMU has touched reads as written until protected once.
        self._written(rearm=True)

    def collect(self) -> PageIndexes:
        return self._written(rearm=True)

    def peek(self, pages: PageIndexes) -> npt.NDArray[np.bool_]:
        pages = np.asarray(pages, dtype=np.int64)
        if not len(pages):
            return np.zeros(0, np.bool_)
        # Only the span asked about: the pre-copy peeks a batch at a time.
        lo, hi = int(pages.min()), int(pages.max()) + 1
        written = self._written(rearm=False, first=lo, last=hi)
        where = np.searchsorted(written, pages)
        hit = where < len(written)
        hit[hit] = written[where[hit]] == pages[hit]
        return hit

    def sent(self, pages: PageIndexes, data: npt.NDArray[np.uint8]) -> None:
        pass  # the kernel log does not care what went on the wire

    def close(self) -> None:
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1


# -- the shadow compare -------------------------------------------------------------------


def _differ(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Per row (page): do the bytes differ? Compared as uint64 words, 8 bytes a step."""
    differs: npt.NDArray[np.bool_] = (a.view(np.uint64) != b.view(np.uint64)).any(axis=1)
    return differs


class ShadowTracker:
    """An exact compare of RAM against what the destination holds: the bytes last sent.

    Not against what was last *seen*: a page read at t1, dirtied, skipped by the
    pre-copy and written back to its t1 bytes still differs from what the destination
    holds if t1's bytes were never sent, and must be sent.

    Per page, the destination holds one of: bytes passed to ``sent()`` (kept in the
    shadow); zero, for a page that was a hole of the RAM file at ``start()`` (holes read
    as zero, and round 1 skips them); or something unknown, for a page that held data at
    ``start()`` and was never sent: such a page is always dirty.

    Memory: the shadow is a RAM-sized array, backed only where non-zero pages were sent.
    """

    name = "shadow"

    def __init__(self, memory: GuestMemory, *, chunk_pages: int = 1024) -> None:
        # 1024 pages (4 MiB) per step bounds the compare's temporaries to 512 KiB.
        self._memory = memory
        self._chunk = chunk_pages
        n = memory.npages
        self._shadow = np.zeros((n, PAGE_SIZE), np.uint8)  # calloc: zero pages, lazily
        self._unknown = np.ones(n, np.bool_)
        self._nonzero = np.zeros(n, np.bool_)  # shadow row holds something other than 0
        # For peek(): a fingerprint of each page that collect() found dirty, taken then.
        self._print = np.zeros(n, np.uint64)
        self._printed = np.zeros(n, np.bool_)
        seed = np.random.default_rng(int.from_bytes(os.urandom(8)))
        # Odd multipliers: any change of a single 8-byte word changes the sum.
        self._keys = seed.integers(0, 2**63, PAGE_SIZE // 8, dtype=np.uint64) * 2 + 1

    def _data_mask(self) -> npt.NDArray[np.bool_]:
        data = np.zeros(self._memory.npages, np.bool_)
        for first, last in self._memory.data_ranges():
            data[first:last] = True
        return data

    def start(self) -> None:
        n = self._memory.npages
        self._shadow = np.zeros((n, PAGE_SIZE), np.uint8)
        self._unknown = self._data_mask()
        self._nonzero[:] = False
        self._printed[:] = False

    def _fingerprints(self, pages: PageIndexes) -> npt.NDArray[np.uint64]:
        out = np.empty(len(pages), np.uint64)
        ram = self._memory.pages
        for i in range(0, len(pages), self._chunk):
            rows = ram[pages[i : i + self._chunk]].view(np.uint64)
            # uint64 arithmetic wraps, which is what a hash wants.
            out[i : i + self._chunk] = (rows * self._keys).sum(axis=1, dtype=np.uint64)
        return out

    def collect(self) -> PageIndexes:
        ram = self._memory.pages
        n = self._memory.npages
        data = self._data_mask()
        dirty = np.zeros(n, np.bool_)
        for first in range(0, n, self._chunk):
            last = min(first + self._chunk, n)
            here = data[first:last]
            if here.all():
                dirty[first:last] = _differ(ram[first:last], self._shadow[first:last])
            elif here.any():
                # Read only the data pages: reading a hole would allocate it.
                rows = np.flatnonzero(here) + first
                dirty[rows] = _differ(ram[rows], self._shadow[rows])
        # A hole reads as zero: dirty only if the destination holds something else.
        dirty |= self._nonzero & ~data
        dirty |= self._unknown
        pages = np.flatnonzero(dirty).astype(np.int64)
        self._printed[:] = False
        readable = pages[data[pages]]  # a hole needs no print: it reads as zero
        self._print[readable] = self._fingerprints(readable)
        self._printed[readable] = True
        return pages

    def peek(self, pages: PageIndexes) -> npt.NDArray[np.bool_]:
        pages = np.asarray(pages, dtype=np.int64)
        written = np.zeros(len(pages), np.bool_)
        # Dirty at the last collect(): compare with the fingerprint taken then.
        printed = self._printed[pages]
        if printed.any():
            some = pages[printed]
            written[printed] = self._fingerprints(some) != self._print[some]
        # Clean then: RAM equalled the shadow, and sent() since only took newer bytes.
        clean = ~printed & ~self._unknown[pages]
        if clean.any() and not self._nonzero[pages[clean]].all():
            # Where the shadow is zero, a hole still matches it. Do not read holes to
            # find that out: a read would allocate them (round 1 peeks at every page).
            clean &= self._nonzero[pages] | self._data_mask()[pages]
        if clean.any():
            some = pages[clean]
            written[clean] = _differ(self._memory.pages[some], self._shadow[some])
        # Unknown and not yet collected: no reference, so "not written", i.e. send it.
        return written

    def sent(self, pages: PageIndexes, data: npt.NDArray[np.uint8]) -> None:
        pages = np.asarray(pages, dtype=np.int64)
        if data.shape != (len(pages), PAGE_SIZE) or data.dtype != np.uint8:
            raise ValueError(f"sent() wants {len(pages)} pages of uint8, not {data.shape}")
        nonzero = data.view(np.uint64).any(axis=1)
        # A zero page over a zero row changes nothing: not writing it keeps the shadow's
        # memory unbacked for holes and zero pages, which the source sends as indexes.
        change = nonzero | self._nonzero[pages]
        self._shadow[pages[change]] = data[change]
        self._unknown[pages] = False
        self._nonzero[pages] = nonzero

    def close(self) -> None:
        self._shadow = np.zeros((0, PAGE_SIZE), np.uint8)


class TrackerKind:
    AUTO = "auto"
    UFFD = "uffd"
    SHADOW = "shadow"


def open_tracker(pid: int, memory: GuestMemory, kind: str = TrackerKind.AUTO) -> DirtyTracker:
    """The best tracker for QEMU process ``pid`` whose guest RAM is ``memory`` (a
    ``livemig.vm.memory.GuestMemory``, read-only mapping of the same file).

    ``auto`` picks the kernel log when QEMU runs with the shim and the kernel accepts the
    scan, else the shadow compare. Forcing ``uffd`` where it cannot work raises
    ``DirtyLogUnavailable`` (a ``livemig.errors.LivemigError``) saying why."""
    if kind == TrackerKind.SHADOW:
        return ShadowTracker(memory)
    if kind not in (TrackerKind.AUTO, TrackerKind.UFFD):
        raise ValueError(f"unknown tracker kind {kind!r}: auto, uffd or shadow")
    try:
        return UffdTracker(pid, memory.path, memory.size)
    except DirtyLogUnavailable as exc:
        if kind == TrackerKind.UFFD:
            raise
        log.info("%s", exc)
        return ShadowTracker(memory)
