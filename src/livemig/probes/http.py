"""HTTP load generator on asyncio streams, for busybox httpd in the guest.

N clients each loop on ``GET path HTTP/1.0`` (or, for a mix item so marked, ``POST``
of a small form, as SPECweb99's registrations): one request per connection, because
busybox httpd closes after every response. A response body is read up to its
Content-Length when it has one, and to end-of-file when it does not (CGI output).

A migration must show up as a dip in the throughput series, not as a crashed probe, so
every failure (connection refused, reset, timeout, a broken response) is counted by kind
with its time and the client retries after a short back-off. Every completed request is
recorded with its completion time, body bytes and latency; ``timeseries`` turns those into
100 ms buckets and into service impact (throughput during a window over throughput
before it).

The request and response-head codec (``build_request``, ``parse_response_head``) is
sans-IO; ``run_http`` is the asyncio loop around it and ``run_http_blocking`` its thin
synchronous face.
"""

from __future__ import annotations

import array
import asyncio
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from livemig.errors import LivemigError
from livemig.probes.echo import StopFlag, error_kind
from livemig.probes.timeseries import (
    NS_PER_MS,
    NS_PER_S,
    IntArray,
    ServiceImpact,
    as_int_array,
    bucketize,
    distribution,
    service_impact,
)

DEFAULT_CLIENTS = 8
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_BACKOFF_S = 0.05
DEFAULT_BUCKET_MS = 100
DEFAULT_THINK_S = 0.0  # closed loop: the next request as soon as the last one is done
USER_AGENT = "livemig-probe"

# A response head longer than this is not from busybox httpd; refuse to buffer more.
_HEAD_LIMIT_BYTES = 64 * 1024
_CHUNK_BYTES = 64 * 1024
# How often the loop looks at the stop flag and the clock; a stop takes at most this long.
_POLL_S = 0.02
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?")
METHODS = ("GET", "POST")
# A POST's body: a registration form of SPECweb99's size class (a few hundred bytes).
POST_FORM = ("name=livemig+probe&email=probe%40example.test&city=Cambridge&age=42&"
             "comment=" + "x" * 180).encode("ascii")
# Only what may appear in a request-target unescaped; no spaces, no CR/LF to inject headers.
_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/%?]*")


class ResponseError(LivemigError):
    """The server's answer was not a successful HTTP response (the peer's doing).

    ``kind`` is how it is counted: ``http_NNN`` for a status outside 2xx, ``protocol``
    for a malformed head, ``truncated`` for a body shorter than its Content-Length.
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"HTTP response error ({kind}): {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class WeightedPath:
    """A request (method and path) and its relative weight in a mixed load."""

    path: str
    weight: float
    method: str = "GET"

    @property
    def label(self) -> str:
        """How results name it: the path, with the method when it is not GET."""
        return self.path if self.method == "GET" else f"{self.method} {self.path}"


@dataclass(frozen=True)
class HttpTarget:
    """Where requests go: host and port to connect to, Host header, default path."""

    host: str
    port: int
    host_header: str
    path: str


def check_path(path: str) -> str:
    """``path`` if it is a safe origin-form request target (``/...``), else ValueError."""
    if not _PATH.fullmatch(path):
        raise ValueError(f"not a request path: {path!r} (must start with '/', no spaces)")
    return path


def parse_url(url: str) -> HttpTarget:
    """Split an ``http://host[:port]/path`` URL; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, not {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    port = parts.port or 80  # .port itself raises ValueError for a bad port
    host = parts.hostname
    bracketed = f"[{host}]" if ":" in host else host  # an IPv6 literal
    host_header = bracketed if port == 80 else f"{bracketed}:{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return HttpTarget(host=host, port=port, host_header=host_header, path=check_path(path))


def parse_mix(text: str) -> tuple[WeightedPath, ...]:
    """Parse ``/a:0.7,/b?x=1:0.25,POST /c:0.05`` into weighted requests; ValueError on
    bad input.

    The weight is what follows the last colon of each item; weights are relative and need
    not sum to 1. An item is a GET unless it starts with ``POST `` (``POST_FORM`` is sent).
    """
    mix: list[WeightedPath] = []
    for item in text.split(","):
        request, sep, weight_text = item.strip().rpartition(":")
        if not sep:
            raise ValueError(f"mix item {item!r} is not [POST ]PATH:WEIGHT")
        method, _, path = request.rpartition(" ")
        method = method or "GET"
        if method not in METHODS:
            raise ValueError(f"mix item {item!r}: the method must be GET or POST")
        weight = float(weight_text)
        if not weight > 0 or weight == float("inf"):
            raise ValueError(f"weight of {path!r} must be a positive number, not {weight_text}")
        mix.append(WeightedPath(path=check_path(path), weight=weight, method=method))
    return tuple(mix)


def build_request(path: str, host_header: str, method: str = "GET") -> bytes:
    """The bytes of ``GET path HTTP/1.0``, or of a ``POST`` of ``POST_FORM``; the server
    closes the connection after it."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    head = (
        f"{method} {check_path(path)} HTTP/1.0\r\n"
        f"Host: {host_header}\r\n"
        f"User-Agent: {USER_AGENT}\r\n"
        "Accept: */*\r\n"
    )
    if method == "GET":
        return (head + "\r\n").encode("ascii")
    return (head + "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(POST_FORM)}\r\n\r\n").encode("ascii") + POST_FORM


@dataclass(frozen=True)
class ResponseHead:
    """Status and body length (None: read to end-of-file) of a response."""

    status: int
    content_length: int | None


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse a response head up to and including its blank line; ResponseError if bad.

    Lines may end in CRLF or in a bare LF: busybox httpd passes a CGI script's header
    lines through as the script wrote them, and scripts often write bare LFs (RFC 9112
    lets a recipient accept those).
    """
    if not (head.endswith(b"\n\n") or head.endswith(b"\n\r\n")):
        raise ResponseError("protocol", "head does not end with an empty line")
    # The split leaves two empty strings at the end: the blank line and what follows it.
    lines = [line.removesuffix(b"\r") for line in head.split(b"\n")][:-2]
    if not lines or not all(lines):
        raise ResponseError("protocol", "empty line inside the head")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise ResponseError("protocol", f"bad status line {lines[0][:80]!r}")
    status = int(match.group(1))
    lengths: set[int] = set()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ResponseError("protocol", f"bad header line {line[:80]!r}")
        if name.lower() == b"content-length":
            text = value.strip()
            if not text.isdigit() or len(text) > 18:
                raise ResponseError("protocol", f"bad Content-Length {text[:20]!r}")
            lengths.add(int(text))
    if len(lengths) > 1:
        raise ResponseError("protocol", f"conflicting Content-Length values {sorted(lengths)}")
    if status in (204, 304):
        return ResponseHead(status=status, content_length=0)
    return ResponseHead(status=status, content_length=lengths.pop() if lengths else None)


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """Read a response head, line by line, up to and including its blank line.

    Raises ``asyncio.IncompleteReadError`` if the connection ends first, and
    ResponseError if the head grows beyond 64 KiB.
    """
    head = bytearray()
    while True:
        line = await reader.readuntil(b"\n")
        head += line
        if len(head) > _HEAD_LIMIT_BYTES:
            raise ResponseError("protocol", f"response head longer than {_HEAD_LIMIT_BYTES}")
        if line in (b"\n", b"\r\n"):
            return bytes(head)


async def _read_body(reader: asyncio.StreamReader, length: int | None) -> int:
    """Read and discard the body; returns its size in bytes."""
    total = 0
    if length is None:
        while chunk := await reader.read(_CHUNK_BYTES):
            total += len(chunk)
        return total
    while total < length:
        chunk = await reader.read(min(_CHUNK_BYTES, length - total))
        if not chunk:
            raise ResponseError("truncated", f"body ended after {total} of {length} bytes")
        total += len(chunk)
    return total


async def fetch(target: HttpTarget, path: str, method: str = "GET") -> int:
    """One request on a fresh connection; returns the response body's size in bytes.

    Raises OSError (refused, reset, unreachable), ``asyncio.IncompleteReadError`` (closed
    before a full head), ``asyncio.LimitOverrunError`` (a head line over 64 KiB) or
    ResponseError.
    If cancelled, the request may or may not have reached the server.
    """
    reader, writer = await asyncio.open_connection(
        target.host, target.port, limit=_HEAD_LIMIT_BYTES
    )
    try:
        writer.write(build_request(path, target.host_header, method))
        await writer.drain()
        head = parse_response_head(await read_head(reader))
        if not 200 <= head.status < 300:
            raise ResponseError(f"http_{head.status}",
                                f"status {head.status} for {method} {path}")
        return await _read_body(reader, head.content_length)
    finally:
        # close() only schedules the socket's closing; the caller's event loop finishes
        # it on its next iteration, which run_http makes sure happens.
        writer.close()


COMPLETION_COLUMNS = ("done_ns", "bytes", "latency_ns", "path")


@dataclass(frozen=True, eq=False)
class HttpResult:
    """One load run. ``to_json()`` fields (times in ns of the prober's monotonic clock):

    - ``probe``: ``"http"``; ``url``; ``clients``: concurrent clients;
    - ``duration_s``: the configured duration (null: ran until stopped);
      ``elapsed_s``: how long it really ran; ``timeout_s``: per-request timeout;
    - ``paths``: ``[{"path", "weight"}]``, the load mix;
    - ``started_ns`` / ``stopped_ns``: the run;
    - ``buckets``: ``{"start_ns", "width_ms", "requests": [...], "bytes": [...],
      "errors": [...]}``: completed requests, body bytes of those, and failures, per
      window of ``width_ms`` from ``start_ns`` (the last window may be shorter);
    - ``errors``: failures by kind: ``refused``, ``reset``, ``timeout``, ``eof``
      (closed before a full response head), ``truncated``, ``protocol``, ``http_NNN``,
      ``host_unreachable``, ... Requests cut short by the end of the run are not counted;
    - ``completion_columns``: ``["done_ns", "bytes", "latency_ns", "path"]``;
      ``completions``: one row per completed request (``path`` indexes ``paths``);
    - ``summary``: ``requests``, ``bytes``, ``errors`` (totals), ``requests_per_s``,
      ``mb_per_s`` (10**6 body bytes per second), ``latency_median_ms``,
      ``latency_p99_ms``, ``latency_max_ms`` (null without requests), ``requests_by_path``.
    """

    url: str
    clients: int
    paths: Sequence[WeightedPath]
    duration_s: float | None
    timeout_s: float
    bucket_ms: int
    started_ns: int
    stopped_ns: int
    done_ns: IntArray
    body_bytes: IntArray
    latency_ns: IntArray
    path_index: IntArray
    error_ns: IntArray
    error_kinds: Sequence[str]

    @property
    def elapsed_s(self) -> float:
        return (self.stopped_ns - self.started_ns) / NS_PER_S

    def errors(self) -> dict[str, int]:
        return dict(Counter(self.error_kinds))

    def service_impact(
        self, start_ns: int, end_ns: int, *, by_bytes: bool = False
    ) -> ServiceImpact:
        """Requests/s (or bytes/s) over ``[start_ns, end_ns)`` against the run before it."""
        return service_impact(
            self.done_ns,
            before_start_ns=self.started_ns,
            during_start_ns=start_ns,
            during_end_ns=end_ns,
            weights=self.body_bytes if by_bytes else None,
        )

    def summary(self) -> dict[str, Any]:
        elapsed_s = self.elapsed_s
        latency = distribution(self.latency_ns)
        total_bytes = int(self.body_bytes.sum())
        by_path = np.bincount(self.path_index, minlength=len(self.paths))
        return {
            "requests": int(self.done_ns.size),
            "bytes": total_bytes,
            "errors": len(self.error_kinds),
            "requests_per_s": self.done_ns.size / elapsed_s if elapsed_s > 0 else 0.0,
            "mb_per_s": total_bytes / 1e6 / elapsed_s if elapsed_s > 0 else 0.0,
            "latency_median_ms": None if latency is None else latency.median_ms,
            "latency_p99_ms": None if latency is None else latency.p99_ms,
            "latency_max_ms": None if latency is None else latency.max_ms,
            "requests_by_path": {p.label: int(n) for p, n in zip(self.paths, by_path, strict=True)},
        }

    def to_json(self) -> dict[str, Any]:
        width_ns = self.bucket_ms * NS_PER_MS
        done = bucketize(
            self.done_ns,
            start_ns=self.started_ns,
            end_ns=self.stopped_ns,
            width_ns=width_ns,
            weights=self.body_bytes,
        )
        failed = bucketize(
            self.error_ns, start_ns=self.started_ns, end_ns=self.stopped_ns, width_ns=width_ns
        )
        completions = np.column_stack(
            (self.done_ns, self.body_bytes, self.latency_ns, self.path_index)
        ).tolist()
        return {
            "probe": "http",
            "url": self.url,
            "clients": self.clients,
            "duration_s": self.duration_s,
            "elapsed_s": self.elapsed_s,
            "timeout_s": self.timeout_s,
            "paths": mix_to_json(self.paths),
            "started_ns": self.started_ns,
            "stopped_ns": self.stopped_ns,
            "buckets": {
                "start_ns": self.started_ns,
                "width_ms": self.bucket_ms,
                "requests": done.counts.tolist(),
                "bytes": done.totals.tolist(),
                "errors": failed.counts.tolist(),
            },
            "errors": self.errors(),
            "completion_columns": list(COMPLETION_COLUMNS),
            "completions": completions,
            "summary": self.summary(),
        }

    def one_line(self) -> str:
        s = self.summary()
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors().items())) or "none"
        return (
            f"http {self.url}: {s['requests']} requests in {self.elapsed_s:.1f} s "
            f"({s['requests_per_s']:.1f} req/s, {s['mb_per_s']:.2f} MB/s) "
            f"with {self.clients} clients; errors: {errors}"
        )


def mix_to_json(mix: Sequence[WeightedPath]) -> list[dict[str, Any]]:
    """The mix as JSON: ``[{"path", "weight", "method"}]``."""
    return [{"path": p.path, "weight": p.weight, "method": p.method} for p in mix]


class _Recorder:
    """Completions and failures of all clients (one event loop, so no locking)."""

    def __init__(self) -> None:
        self.done_ns = array.array("q")
        self.body_bytes = array.array("q")
        self.latency_ns = array.array("q")
        self.path_index = array.array("q")
        self.error_ns = array.array("q")
        self.error_kinds: list[str] = []

    def done(self, started_ns: int, done_ns: int, nbytes: int, path_index: int) -> None:
        self.done_ns.append(done_ns)
        self.body_bytes.append(nbytes)
        self.latency_ns.append(done_ns - started_ns)
        self.path_index.append(path_index)

    def failed(self, when_ns: int, kind: str) -> None:
        self.error_ns.append(when_ns)
        self.error_kinds.append(kind)


async def _client(
    target: HttpTarget,
    paths: Sequence[WeightedPath],
    recorder: _Recorder,
    rng: random.Random,
    timeout_s: float,
    backoff_s: float,
    think_s: float,
) -> None:
    """One client: request after request until cancelled, ``think_s`` apart."""
    indices = range(len(paths))
    weights = [p.weight for p in paths]
    while True:
        index = rng.choices(indices, weights)[0]
        started_ns = time.monotonic_ns()
        try:
            async with asyncio.timeout(timeout_s):
                nbytes = await fetch(target, paths[index].path, paths[index].method)
        # TimeoutError is an OSError, so it must come first to be told apart.
        except TimeoutError:
            kind = "timeout"
        except ResponseError as exc:
            kind = exc.kind
        except asyncio.IncompleteReadError:
            kind = "eof"
        except asyncio.LimitOverrunError:
            kind = "protocol"
        except OSError as exc:
            kind = error_kind(exc)
        else:
            recorder.done(started_ns, time.monotonic_ns(), nbytes, index)
            if think_s:
                await asyncio.sleep(think_s)
            continue
        recorder.failed(time.monotonic_ns(), kind)
        # Back off so that a dead server is probed a few times a second per client, not
        # hammered; the dip in throughput is what we measure, not our retry storm.
        await asyncio.sleep(backoff_s)


async def _wait_for_end(end_ns: int | None, stop: StopFlag | None) -> None:
    while stop is None or not stop.is_set():
        if end_ns is None:
            await asyncio.sleep(_POLL_S)
            continue
        remaining_s = (end_ns - time.monotonic_ns()) / NS_PER_S
        if remaining_s <= 0:
            return
        await asyncio.sleep(min(remaining_s, _POLL_S))


async def run_http(
    url: str,
    *,
    clients: int = DEFAULT_CLIENTS,
    duration_s: float | None = None,
    stop: StopFlag | None = None,
    mix: Sequence[WeightedPath] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    backoff_s: float = DEFAULT_BACKOFF_S,
    bucket_ms: int = DEFAULT_BUCKET_MS,
    think_s: float = DEFAULT_THINK_S,
    seed: int | None = None,
) -> HttpResult:
    """Load ``url`` with ``clients`` concurrent clients until ``duration_s`` or ``stop``.

    ``mix`` replaces the URL's path with weighted paths on the same host. ``stop`` may be
    a ``threading.Event`` or an ``asyncio.Event``; it is polled every 20 ms. ``seed``
    makes the choice of paths repeatable. ``think_s`` is each client's pause after a
    completed request, as a user reads a page: the load a service has, rather than all
    it can take. Requests in flight at the end are abandoned and not counted.
    """
    target = parse_url(url)
    paths = tuple(mix) if mix else (WeightedPath(target.path, 1.0),)
    if clients < 1:
        raise ValueError(f"clients must be >= 1, not {clients}")
    if duration_s is None and stop is None:
        raise ValueError("give duration_s or stop, or the probe never ends")
    if timeout_s <= 0 or backoff_s < 0 or bucket_ms <= 0 or think_s < 0:
        raise ValueError("timeout_s and bucket_ms must be > 0, backoff_s and think_s >= 0")
    for p in paths:
        check_path(p.path)
    seeder = random.Random(seed)
    recorder = _Recorder()
    started_ns = time.monotonic_ns()
    end_ns = None if duration_s is None else started_ns + round(duration_s * NS_PER_S)
    # A client that fails in an unexpected way takes the group down with it, so that a
    # bug in the probe is an error, not a silent drop in measured throughput.
    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(
                _client(
                    target,
                    paths,
                    recorder,
                    random.Random(seeder.getrandbits(64)),
                    timeout_s,
                    backoff_s,
                    think_s,
                )
            )
            for _ in range(clients)
        ]
        await _wait_for_end(end_ns, stop)
        stopped_ns = time.monotonic_ns()
        for task in tasks:
            task.cancel()
    # Cancelled clients closed their transports; one more turn of the loop actually
    # closes the sockets before asyncio.run() closes the loop.
    await asyncio.sleep(0)
    return HttpResult(
        url=url,
        clients=clients,
        paths=paths,
        duration_s=duration_s,
        timeout_s=timeout_s,
        bucket_ms=bucket_ms,
        started_ns=started_ns,
        stopped_ns=stopped_ns,
        done_ns=as_int_array(recorder.done_ns),
        body_bytes=as_int_array(recorder.body_bytes),
        latency_ns=as_int_array(recorder.latency_ns),
        path_index=as_int_array(recorder.path_index),
        error_ns=as_int_array(recorder.error_ns),
        error_kinds=tuple(recorder.error_kinds),
    )


def run_http_blocking(
    url: str,
    *,
    clients: int = DEFAULT_CLIENTS,
    duration_s: float | None = None,
    stop: StopFlag | None = None,
    mix: Sequence[WeightedPath] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    backoff_s: float = DEFAULT_BACKOFF_S,
    bucket_ms: int = DEFAULT_BUCKET_MS,
    think_s: float = DEFAULT_THINK_S,
    seed: int | None = None,
) -> HttpResult:
    """``run_http`` in a fresh event loop, for callers without one (threads, the CLI)."""
    return asyncio.run(
        run_http(
            url,
            clients=clients,
            duration_s=duration_s,
            stop=stop,
            mix=mix,
            timeout_s=timeout_s,
            backoff_s=backoff_s,
            bucket_ms=bucket_ms,
            think_s=think_s,
            seed=seed,
        )
    )
