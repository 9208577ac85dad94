"""Dirty-page traces, sans-IO: a VM's page-granular dirty sets over time, and their file.

A trace is a sequence of intervals. Interval ``k`` (0-based) covers
``(times[k], times[k + 1]]`` seconds after the tracker was armed, and holds the sorted,
distinct indexes of the pages written in it, exactly as the dirty tracker's ``collect()``
reported them. The intervals are stored concatenated (``pages``) with ``offsets`` into
them, so that a minute of a busy guest stays a few megabytes. The file format is
documented in docs/trace-format.md; this module reads and writes it and does no other I/O.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from livemig.errors import LivemigError
from livemig.units import PAGE_SIZE

FORMAT = "livemig-trace"
VERSION = 1

Int32s = npt.NDArray[np.int32]
Int64s = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]


class TraceFormatError(LivemigError):
    """A file is not a trace this version can read, or its contents contradict each other."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source} is not a usable livemig trace: {reason}")
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class TraceMeta:
    """What is needed to read a trace back and to know what it shows."""

    vm: str
    workload: str
    tracker: str  # "uffd" (pages written) or "shadow" (pages whose bytes changed)
    npages: int
    interval_s: float  # the nominal interval; ``Trace.times`` holds the real ones
    started_at: float  # Unix time at which the tracker was armed
    page_size: int = PAGE_SIZE
    options: dict[str, str] = field(default_factory=dict)  # the workload's options
    format: str = FORMAT
    version: int = VERSION

    @property
    def ram_bytes(self) -> int:
        return self.npages * self.page_size


@dataclass(frozen=True)
class Trace:
    meta: TraceMeta
    times: Floats  # n + 1 interval boundaries, seconds since the tracker was armed
    offsets: Int64s  # n + 1: interval k is pages[offsets[k]:offsets[k + 1]]
    pages: Int32s  # every interval's dirty pages, concatenated
    zero_pages: Int32s  # pages that read as zero when recording began (holes included)
    collect_ms: Floats = field(default_factory=lambda: np.zeros(0))  # cost of each collect
    # Per entry of ``pages``: the page read as all zeros right after its interval (a
    # kernel zeroing a page it allocates); empty when not recorded, i.e. none did.
    zeroed: Bools = field(default_factory=lambda: np.zeros(0, np.bool_))

    def __post_init__(self) -> None:
        _validate(self)

    # -- building -------------------------------------------------------------------

    @classmethod
    def from_intervals(
        cls,
        meta: TraceMeta,
        times: Sequence[float] | Floats,
        intervals: Sequence[npt.NDArray[np.integer[Any]]],
        zero_pages: npt.NDArray[np.integer[Any]] | None = None,
        collect_ms: Sequence[float] | Floats | None = None,
        zeroed: Sequence[Bools] | None = None,
    ) -> Trace:
        """A trace from one dirty set per interval (sorted and deduplicated here), and
        optionally for each set which of its pages read as zero after the interval."""
        sets, flags = [], []
        for k, pages in enumerate(intervals):
            unique, first = np.unique(np.asarray(pages, dtype=np.int64), return_index=True)
            sets.append(unique)
            if zeroed is not None:
                flags.append(np.asarray(zeroed[k], dtype=np.bool_)[first])
        offsets = np.zeros(len(sets) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(s) for s in sets])
        pages = np.concatenate(sets) if sets else np.empty(0, np.int64)
        return cls(
            meta=meta,
            times=np.asarray(times, dtype=np.float64),
            offsets=offsets,
            pages=_as_int32(pages, meta.npages, "pages"),
            zero_pages=_as_int32(
                np.unique(zero_pages) if zero_pages is not None else np.empty(0, np.int64),
                meta.npages,
                "zero_pages",
            ),
            collect_ms=np.asarray(collect_ms if collect_ms is not None else [], np.float64),
            zeroed=np.concatenate(flags) if flags else np.zeros(0, np.bool_),
        )

    # -- questions ------------------------------------------------------------------

    @property
    def n_intervals(self) -> int:
        return len(self.offsets) - 1

    @property
    def duration_s(self) -> float:
        return float(self.times[-1] - self.times[0])

    @property
    def durations_s(self) -> Floats:
        return np.diff(self.times)

    @property
    def counts(self) -> Int64s:
        """Pages dirtied in each interval."""
        return np.diff(self.offsets)

    def interval(self, k: int) -> Int32s:
        return self.pages[self.offsets[k] : self.offsets[k + 1]]

    def __iter__(self) -> Iterator[Int32s]:
        for k in range(self.n_intervals):
            yield self.interval(k)

    @property
    def zeroed_flags(self) -> Bools:
        """``zeroed`` for every entry of ``pages`` (all False when it was not recorded)."""
        return self.zeroed if self.zeroed.size else np.zeros(self.pages.size, np.bool_)

    def interval_ids(self) -> Int64s:
        """For each entry of ``pages``, the interval it belongs to."""
        return np.repeat(np.arange(self.n_intervals, dtype=np.int64), self.counts)

    # -- the file -------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            meta=np.array(json.dumps(asdict(self.meta), sort_keys=True)),
            times=self.times,
            offsets=self.offsets,
            pages=self.pages,
            zero_pages=self.zero_pages,
            collect_ms=self.collect_ms,
            zeroed=self.zeroed,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "the data") -> Trace:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, EOFError) as exc:
            raise TraceFormatError(source, f"not an .npz file ({exc})") from exc
        missing = {"meta", "times", "offsets", "pages", "zero_pages"} - arrays.keys()
        if missing:
            raise TraceFormatError(source, f"missing arrays: {', '.join(sorted(missing))}")
        try:
            raw = json.loads(str(arrays["meta"]))
        except ValueError as exc:
            raise TraceFormatError(source, f"metadata is not JSON ({exc})") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise TraceFormatError(source, f"its metadata does not say format {FORMAT!r}")
        if raw.get("version") != VERSION:
            raise TraceFormatError(
                source, f"format version {raw.get('version')!r}; this livemig reads {VERSION}"
            )
        try:
            meta = TraceMeta(**raw)
        except TypeError as exc:
            raise TraceFormatError(source, f"unexpected metadata ({exc})") from exc
        try:
            return cls(
                meta=meta,
                times=arrays["times"].astype(np.float64, copy=False),
                offsets=arrays["offsets"].astype(np.int64, copy=False),
                pages=arrays["pages"].astype(np.int32, copy=False),
                zero_pages=arrays["zero_pages"].astype(np.int32, copy=False),
                collect_ms=arrays.get("collect_ms", np.zeros(0)).astype(np.float64, copy=False),
                zeroed=arrays.get("zeroed", np.zeros(0, np.bool_)).astype(np.bool_, copy=False),
            )
        except ValueError as exc:
            raise TraceFormatError(source, str(exc)) from exc

    def save(self, path: Path) -> None:
        path.write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> Trace:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TraceFormatError(str(path), exc.strerror or str(exc)) from exc
        return cls.from_bytes(data, str(path))


def _as_int32(pages: npt.NDArray[np.integer[Any]], npages: int, name: str) -> Int32s:
    if pages.size and (int(pages.min()) < 0 or int(pages.max()) >= npages):
        raise ValueError(f"{name} holds page indexes outside 0..{npages - 1}")
    return pages.astype(np.int32)


def _validate(trace: Trace) -> None:
    """Raise ValueError unless the arrays fit together; a trace is immutable after this."""
    meta = trace.meta
    if meta.npages < 1 or meta.npages > np.iinfo(np.int32).max:
        raise ValueError(f"npages {meta.npages} is outside what the format holds")
    if not meta.interval_s > 0:
        raise ValueError(f"interval_s must be positive, not {meta.interval_s!r}")
    times, offsets, pages = trace.times, trace.offsets, trace.pages
    if times.ndim != 1 or offsets.ndim != 1 or pages.ndim != 1 or len(times) != len(offsets):
        raise ValueError("times and offsets must be flat and one longer than the intervals")
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(pages):
        raise ValueError("offsets must run from 0 to the number of pages")
    if np.any(np.diff(offsets) < 0) or np.any(np.diff(times) <= 0):
        raise ValueError("offsets must not decrease and times must increase")
    for name, arr in (("pages", pages), ("zero_pages", trace.zero_pages)):
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= meta.npages):
            raise ValueError(f"{name} holds page indexes outside 0..{meta.npages - 1}")
    if trace.collect_ms.size not in (0, trace.n_intervals):
        raise ValueError("collect_ms must have one entry per interval, or none")
    if trace.zeroed.size not in (0, pages.size) or trace.zeroed.ndim != 1:
        raise ValueError("zeroed must have one flag per entry of pages, or none")
    for frozen in (times, offsets, pages, trace.zero_pages, trace.collect_ms, trace.zeroed):
        frozen.setflags(write=False)
