"""Every message livemig sends between processes, declared once, typed and validated.

Sans-IO, like ``frames``: these are types plus the functions that turn them into bytes
(or a frame's JSON body) and back. Nothing here touches a socket, and nothing here
imports from the layers above (daemon, migration) or from the backends.

Two protocols carry them:

- **Control** (``daemon.control``): the CLI, the experiments and the benches talk to
  their host's daemon in JSON lines. Every line carries ``"v": CONTROL_VERSION``;
  requests are tagged by ``"op"``, replies by ``"type"``::

      {"v":1,"op":"migrate","vm":"v1","to":"hostB","options":{"max_rate_mbps":300}}
      {"v":1,"type":"progress","stage":"iterative pre-copy","round":2,...}
      {"v":1,"type":"result","report":{...}}

- **Peer** (``wire.frames``): two daemons. The kinds of ``frames.Request`` (reserve,
  image, commit, locate) and the bodies of their ``frames.Reply``. The frame header
  already carries ``frames.PROTOCOL_VERSION`` and the codec refuses any other, so these
  bodies carry no version of their own: they are that version's bodies, field for field
  the JSON objects version 2 always sent (which is why it is still 2). A change to them
  is a new protocol version.

Decoding is strict. A missing field, an extra one, a value of the wrong type or out of
range, or an unknown op or kind is refused with one sentence naming the field. Control
lines raise ``ControlMessageError`` (``ControlVersionMismatch`` for another version, or a
line of a release before versions); peer bodies raise ``frames.RemoteProtocolError``,
since the peer broke the protocol.

Why msgspec: its Structs are the declaration, the validation and the codec at once,
with tagged unions for the request kinds; its decoder refuses what does not fit, and
reports where (``$.options.min_rate_mbps``). The binary frame codec stays in ``frames``
(fuzzed and capped as it is); the typed peer messages ride in its JSON bodies, converted
from the object the codec has already bounded, so no second parser sees peer bytes.

Rates are in Mbit/s and durations in seconds or milliseconds, as the field names say.
The defaults of a migration's options live on ``MigrateOptions`` and nowhere else.
"""

from __future__ import annotations

import enum
import math
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

from livemig.errors import LivemigError
from livemig.wire import frames

CONTROL_VERSION: Final = 1

# -- vocabulary shared with the engine ------------------------------------------------------


class Mode(enum.StrEnum):
    """How a migration moves memory (the planner's choice of algorithm)."""

    PRECOPY = "precopy"
    STOP_AND_COPY = "stop-and-copy"


class Rates(enum.StrEnum):
    """How pre-copy chooses its rate and when it switches over."""

    # What the link delivers, measured, less a share kept for the VM's own traffic;
    # switch over once the predicted downtime fits the target (``migration.planner``).
    AUTO = "auto"
    # §5.3 of the paper with Xen's numbers: the min/max/increment knobs, its stop rules.
    PAPER = "paper"


class OnTimeout(enum.StrEnum):
    """What a migration does when the downtime target is still out of reach at its
    time-out."""

    ABORT = "abort"  # the VM stays where it runs; the error says what was within reach
    SWITCHOVER = "switchover"  # accept the predicted downtime, and report it


class HoldPoint(enum.StrEnum):
    """Where a fault drill stops a migration (``migration.holds``)."""

    RESERVATION = "reservation"  # the destination has reserved: its QEMU -incoming runs
    ROUND_1 = "round-1"  # round 1 is under way: some pages have gone
    LATER_ROUND = "later-round"  # a round after the first is under way
    STOP_AND_COPY = "stop-and-copy"  # the source VM is paused; the last pages have not gone
    DEVICE_STATE = "device-state"  # all pages are there; QEMU's device state is next
    COMMITMENT = "commitment"  # the destination has the commit, has not run cont yet


# The dirty trackers of ``vm.dirtylog.TrackerKind`` (a test keeps the two in step).
Tracker = Literal["auto", "uffd", "shadow"]

PositiveRate = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeRate = Annotated[float, msgspec.Meta(ge=0)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]
PositiveMs = Annotated[float, msgspec.Meta(gt=0)]
Share = Annotated[float, msgspec.Meta(ge=0, le=90)]  # percent of the link
Count = Annotated[int, msgspec.Meta(ge=0)]


class _Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Immutable, and strict about the fields it is given. (Each subclass says
    ``frozen=True`` again: msgspec inherits it, but mypy's dataclass view does not.)"""


class MigrateOptions(_Struct, frozen=True, kw_only=True):
    """How to migrate; every field has its default here and only here.

    By default (``rates=auto``) there is no rate to choose: pre-copy runs as fast as the
    link delivers, less a share for the VM's own traffic (up to ``max_impact_pct`` of
    the link), and switches over once the predicted downtime fits ``downtime_ms``.
    ``rates=paper`` is §5.3 with Xen's numbers: round 1 at the minimum, each later round
    at the last one's dirty rate plus the increment, stop-and-copy once that would
    exceed the maximum; the three rate fields apply to it alone."""

    mode: Mode = Mode.PRECOPY
    rates: Rates = Rates.AUTO
    downtime_ms: PositiveMs = 100.0  # the target: source's stop to target's cont
    max_impact_pct: Share = 20.0  # the most of the link kept for the VM's own traffic
    on_timeout: OnTimeout = OnTimeout.ABORT
    min_rate_mbps: PositiveRate = 100.0
    max_rate_mbps: PositiveRate = 500.0
    increment_mbps: NonNegativeRate = 50.0
    tracker: Tracker = "auto"
    verify: bool = True  # checksum both images; costs destination time before cont
    seed: int = 0  # of the planner's pseudo-random page order
    stall_timeout_s: PositiveSeconds = 10.0  # pre-copy: the target took no data this long
    # Up to commitment. None: with rates=auto, scaled to RAM over the measured link
    # (``planner.default_timeout_s``); with rates=paper, no limit (Xen's round and data
    # limits end it).
    timeout_s: PositiveSeconds | None = None
    hold_at: HoldPoint | None = None  # fault drills: wait at this point
    # Convergence aid: hold back pages dirtied in each of the last N rounds (0: off).
    hold_hot: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0

    def __post_init__(self) -> None:
        # JSON has no NaN or infinity, but a caller in Python can still pass one.
        for name in ("min_rate_mbps", "max_rate_mbps", "increment_mbps", "downtime_ms",
                     "max_impact_pct"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        if self.min_rate_mbps > self.max_rate_mbps:
            raise ValueError(f"min_rate_mbps ({self.min_rate_mbps:g}) is above "
                             f"max_rate_mbps ({self.max_rate_mbps:g})")
        if self.hold_hot == 1:
            raise ValueError("hold_hot must be 0 (off) or at least 2 rounds: one dirty "
                             "round does not make a page hot")


DEFAULT_OPTIONS: Final = MigrateOptions()


class _PeerBody(_Struct, frozen=True, omit_defaults=True):
    """A peer body leaves out what is at its default: the JSON objects stay the ones
    version 2 sent, and no bigger."""


class VMSpecFields(_PeerBody, frozen=True):
    """A VM's spec as it travels (``vm.spec.VMSpec.to_json``); ``VMSpec.from_json``
    checks the values (a safe name, an address, a known workload) on arrival."""

    name: str
    ip: str
    mem_mib: Annotated[int, msgspec.Meta(ge=1)]
    workload: str
    image: str
    kernel: str
    initrd: str
    options: list[tuple[str, str]] = []
    prefix: Annotated[int, msgspec.Meta(ge=1, le=31)] = 24
    mac: str = ""
    image_digest: str = ""


# -- control protocol: requests -------------------------------------------------------------


class _Control(_Struct, frozen=True, kw_only=True):
    v: int = CONTROL_VERSION


class _ControlRequest(_Control, frozen=True, tag_field="op"):
    pass


class Migrate(_ControlRequest, frozen=True, tag="migrate"):
    """Move VM ``vm``, which runs on the daemon's host, to host ``to``."""

    vm: str
    to: str
    options: MigrateOptions = msgspec.field(default_factory=MigrateOptions)


class Cancel(_ControlRequest, frozen=True, tag="cancel"):
    vm: str


class Ping(_ControlRequest, frozen=True, tag="ping"):
    pass


class MemoryQuery(_ControlRequest, frozen=True, tag="memory"):
    """Where the daemon's memory is (``daemon.memstats``)."""


class StartVM(_ControlRequest, frozen=True, tag="vm-start"):
    """Boot a new VM on the daemon's host. ``ip`` None: the host's pool gives one (see
    ``config``); ``mac`` None: derived from the address."""

    name: str
    workload: str
    mem_mib: Annotated[int, msgspec.Meta(ge=1)]
    image: str
    options: list[tuple[str, str]] = []
    ip: str | None = None
    mac: str | None = None


class StartIncoming(_ControlRequest, frozen=True, tag="vm-incoming"):
    """Start QEMU with -incoming for ``spec``, for QEMU's own migration (the baselines);
    ``userfaultfd`` for its postcopy destination."""

    spec: VMSpecFields
    userfaultfd: bool = False


class StopVM(_ControlRequest, frozen=True, tag="vm-stop"):
    """End the host's copy (or copies) of ``vm`` and remove all of it."""

    vm: str


class PauseVM(_ControlRequest, frozen=True, tag="vm-pause"):
    vm: str
    resume: bool = False


class ListVMs(_ControlRequest, frozen=True, tag="vm-list"):
    pass


class Console(_ControlRequest, frozen=True, tag="vm-console"):
    """``vm``'s serial console: what it printed so far, and with ``follow`` what it
    prints next, until the VM ends or the client hangs up."""

    vm: str
    follow: bool = False


ControlRequest = (Migrate | Cancel | Ping | MemoryQuery | StartVM | StartIncoming | StopVM
                  | PauseVM | ListVMs | Console)

# -- control protocol: replies --------------------------------------------------------------


class _ControlReply(_Control, frozen=True, tag_field="type"):
    pass


class Progress(_ControlReply, frozen=True, tag="progress"):
    """What the operator sees while a migration runs; any number before the last reply.

    ``percent`` is of the bytes the migration is now predicted to send in all, and never
    runs backwards; ``eta_s`` is the time those bytes still take at the measured link
    rate. ``stalled`` says that the last rounds brought the predicted downtime no
    closer to the target."""

    stage: str
    round: Count
    pages_left: Count
    rate_mbps: float
    dirty_rate_mbps: float
    bytes_sent: Count
    elapsed_s: float
    percent: float = 0.0
    eta_s: float | None = None
    link_mbps: float | None = None  # what the link delivered, measured
    service_mbps: float | None = None  # the VM's own outbound traffic, measured
    predicted_downtime_ms: float | None = None  # were the switchover now
    downtime_target_ms: float | None = None
    stalled: bool = False
    held_pages: Count = 0  # hot pages held back for the stop-and-copy (hold-hot)


class RoundStats(_Struct, frozen=True):
    """What one pre-copy round did. ``pages_sent + pages_skipped + pages_zero`` is
    ``pages_planned``: every page of the plan is accounted for exactly once."""

    number: int
    pages_planned: Count
    pages_sent: Count  # sent with their 4096 bytes of data
    pages_skipped: Count  # dirtied again before their turn (§5.4): the next round sends them
    pages_dirtied: Count  # written during the round: the next round's work
    rate_bps: float  # the rate the round was paced at (auto: what it achieved)
    duration_s: float
    dirty_rate_bps: float  # pages_dirtied x page size x 8 / duration
    pages_zero: Count = 0  # all-zero pages, sent as indexes only
    pages_held: Count = 0  # hot pages held back at the round's end, for the stop-and-copy


class MigrationReport(_Struct, frozen=True, kw_only=True):
    """What a completed migration did, measured by the source's engine."""

    vm: str
    source: str
    target: str
    mode: str
    tracker: str
    ram_bytes: Count
    downtime_ms: float  # engine: source's stop returned -> destination's cont returned
    total_time_s: float  # reservation began -> source released after commitment
    bytes_sent: Count  # page bytes on the wire
    rounds: list[RoundStats]
    stop_reason: str
    final_pages: Count  # sent while the VM was stopped
    device_state_ms: float
    verify_ms: float
    verified: bool | None
    source_checksum: str | None
    destination_checksum: str | None
    stages: list[tuple[str, float]]  # stage entered, seconds since the start
    # CLOCK_MONOTONIC of this machine (s): to line the switchover up with the probes'.
    stopped_at: float
    cont_returned_at: float
    stop_window_ms: dict[str, float]  # where the engine's downtime went, step by step
    data_sent_ratio: float  # bytes_sent over ram_bytes
    # QEMU's own view of the same window: its STOP event on the source to its RESUME
    # event on the destination, both QEMU's CLOCK_REALTIME (one machine here; real hosts
    # need synchronized clocks). None when an event was missing (a lost commit reply).
    vcpus_stopped_ms: float | None = None
    device_state_bytes: Count = 0  # QEMU's CPU and device state, as it crossed the tunnel
    cont_ms: float | None = None  # the destination's cont alone, as it timed it
    rates: str = Rates.AUTO.value
    downtime_target_ms: float | None = None  # rates=auto only
    # The engine's prediction of downtime_ms when it decided to switch over, and its
    # parts: the switchover's fixed cost (learnt from past migrations to this target),
    # the last dirty pages at the measured link rate, and the final collect.
    predicted_downtime_ms: float | None = None
    switchover_cost_ms: float | None = None
    link_mbps: float | None = None  # what the link delivered, measured
    service_mbps: float | None = None  # the VM's own outbound traffic, measured
    downtime_over_predicted: float | None = None  # actual / predicted
    final_bytes: Count = 0  # page data sent while the VM was stopped
    final_collect_ms: float = 0.0  # the dirty log's last collect, the VM stopped
    switchover_forced: bool = False  # the target was out of reach; on_timeout=switchover
    aids: list[str] = []  # the convergence aids that acted, e.g. "hold-hot"

    def to_json(self) -> dict[str, Any]:
        """As plain JSON, for the result files of experiments and benches."""
        data: dict[str, Any] = msgspec.to_builtins(self)
        return data

    @classmethod
    def from_json(cls, data: object) -> MigrationReport:
        """A report read back from a result file; raises ``ControlMessageError``."""
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise ControlMessageError("migration report", str(exc)) from exc


class Migrated(_ControlReply, frozen=True, tag="result"):
    report: MigrationReport


class Failed(_ControlReply, frozen=True, tag="error"):
    """The request failed. For a migration, ``stage`` is where, and ``vm_runs_on``
    where the VM runs now: None only when the commit is in doubt."""

    message: str
    stage: str | None = None
    vm_runs_on: str | None = None


class Pong(_ControlReply, frozen=True, tag="pong"):
    host: str


class Cancelled(_ControlReply, frozen=True, tag="cancelled"):
    vm: str


class MemoryFigures(_ControlReply, frozen=True, tag="memory"):
    """A daemon's memory in KiB (``daemon.memstats``); None where the kernel or the C
    library does not say."""

    python_blocks: Count
    rss_kib: Count | None = None
    rss_anon_kib: Count | None = None
    rss_file_kib: Count | None = None
    rss_shmem_kib: Count | None = None
    heap_in_use_kib: Count | None = None
    heap_free_kib: Count | None = None


class VMInfo(_Struct, frozen=True, kw_only=True):
    """One copy of a VM as its host's daemon sees it. ``copy`` tells the two copies of
    a VM in migration apart: the one that runs ("primary") and the one that waits for
    it ("incoming")."""

    name: str
    host: str
    ip: str
    mac: str
    state: str  # QEMU's run state, or "dead", or "unreachable" (QMP busy)
    copy: str
    workload: str
    mem_mib: Count
    pid: Count


class VMs(_ControlReply, frozen=True, tag="vms"):
    vms: list[VMInfo]


class VMDone(_ControlReply, frozen=True, tag="vm"):
    """A VM request is done; ``vm`` is the copy as it stands now (None: it is gone)."""

    vm: VMInfo | None
    # The record of a started copy, for the lab to attach to it (``vm.spec.VMRecord``).
    spec: VMSpecFields | None = None


class ConsoleText(_ControlReply, frozen=True, tag="console"):
    """Some of a console's output; more may follow, then ``ConsoleEnd``."""

    text: str


class ConsoleEnd(_ControlReply, frozen=True, tag="console-end"):
    why: str


ControlReply = (Progress | Migrated | Failed | Pong | Cancelled | MemoryFigures | VMs
                | VMDone | ConsoleText | ConsoleEnd)
# Replies that more replies follow.
Interim = (Progress, ConsoleText)
# The last reply to a request other than migrate.
FinalReply = TypeVar("FinalReply", Pong, Cancelled, MemoryFigures, VMs, VMDone, ConsoleEnd)
ControlMessage = ControlRequest | ControlReply


class ControlMessageError(LivemigError):
    """A control line that is not a message of ours: ``what`` says which kind was
    expected, ``detail`` what is wrong with it."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"malformed {what}: {detail}")
        self.what = what
        self.detail = detail


class ControlVersionMismatch(ControlMessageError):
    """The line comes from another release of livemig. ``theirs`` is None for a line
    from a release before control messages had versions."""

    def __init__(self, what: str, theirs: int | None, ours: int = CONTROL_VERSION) -> None:
        said = "no version" if theirs is None else f"version {theirs}"
        LivemigError.__init__(
            self, f"the {what} speaks {said} of the control protocol, this livemig speaks "
                  f"version {ours}: run the CLI and every daemon from one livemig release "
                  f"(restart daemons that another one started)")
        self.what = what
        self.detail = said
        self.theirs = theirs
        self.ours = ours


class _Envelope(msgspec.Struct):
    """Only the version: read first, so that another release's line is named as such
    rather than as whatever field it happens to lack."""

    v: int | None = None


_ENVELOPE: Final[msgspec.json.Decoder[_Envelope]] = msgspec.json.Decoder(_Envelope)
_REQUESTS: Final[msgspec.json.Decoder[ControlRequest]] = msgspec.json.Decoder(ControlRequest)
_REPLIES: Final[msgspec.json.Decoder[ControlReply]] = msgspec.json.Decoder(ControlReply)
_ENCODER: Final = msgspec.json.Encoder()

_M = TypeVar("_M")


def encode_control(message: ControlMessage) -> bytes:
    """One JSON line."""
    return _ENCODER.encode(message) + b"\n"


def _decode_control(line: bytes, decoder: msgspec.json.Decoder[_M], what: str) -> _M:
    try:
        version = _ENVELOPE.decode(line).v
    except msgspec.DecodeError as exc:
        # Not JSON, or not an object, or a "v" that is no integer: nothing of ours.
        raise ControlMessageError(what, f"{exc} (not a livemig control line)") from exc
    if version != CONTROL_VERSION:
        raise ControlVersionMismatch(what, version)
    try:
        return decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise ControlMessageError(what, str(exc)) from exc


def decode_control_request(line: bytes) -> ControlRequest:
    """A request line from a client of the daemon; raises ``ControlMessageError``."""
    return _decode_control(line, _REQUESTS, "control request")


def decode_control_reply(line: bytes) -> ControlReply:
    """A reply line from a daemon; raises ``ControlMessageError``."""
    return _decode_control(line, _REPLIES, "control reply")


# -- peer protocol ---------------------------------------------------------------------------


class _PeerRequest(_PeerBody, frozen=True, tag_field="kind"):
    pass


class Reserve(_PeerRequest, frozen=True, tag="reserve"):
    """Stage 1: check memory and image, start QEMU -incoming for ``spec``."""

    spec: VMSpecFields
    # Informational: the channel's handshake, not this, says who the peer is.
    source: str | None = None
    # Only the commitment point is held on the destination; the others are the source's.
    hold_at: HoldPoint | None = None


class Image(_PeerRequest, frozen=True, tag="image"):
    """Stage 3 is done on the source: is the image consistent (and its checksum)?"""

    verify: bool


class Commit(_PeerRequest, frozen=True, tag="commit"):
    """Stage 4: the destination is primary from now on; it runs ``cont``."""


class Locate(_PeerRequest, frozen=True, tag="locate"):
    """On a fresh connection: where does ``vm`` stand here? An uncommitted copy is torn
    down before the answer."""

    vm: str


class ControlCall(_PeerRequest, frozen=True, tag="control"):
    """On a fresh connection: a control request from the CLI of another host (``livemig
    --host``), or from a peer daemon (the VMs it runs). Its first reply answers it; after
    an interim reply (``Interim``: progress, console text) the caller asks for the next
    with ``ControlMore``, so every Reply answers a Request, and a slow reader slows the
    stream instead of filling a buffer."""

    request: ControlRequest


class ControlMore(_PeerRequest, frozen=True, tag="more"):
    """The next reply of the ``ControlCall`` on this connection."""


PeerRequest = Reserve | Image | Commit | Locate | ControlCall | ControlMore


class Reserved(_PeerBody, frozen=True):
    """Reply to ``Reserve``: QEMU -incoming waits; device state comes through the channel."""

    tunnel: bool = True


class ImageConsistent(_PeerBody, frozen=True):
    """Reply to ``Image``: the pages and the device state are all here."""

    consistent: bool  # always sent: a source of the last release requires it
    checksum: str | None = None  # only when asked to verify
    verify_ms: float = 0.0


class Activated(_PeerBody, frozen=True):
    """Reply to ``Commit``: ``cont`` returned at this instant (the destination's
    CLOCK_MONOTONIC, which is the source's on one machine)."""

    cont_returned_at: float
    # Added in this release, left out when absent: a source of the last release still
    # reads the body (it ignored what it did not ask for), and one of this release
    # reading a body from the last takes the defaults.
    resumed_at: float | None = None  # QEMU's RESUME event (CLOCK_REALTIME, s)
    cont_ms: float | None = None  # how long cont took, as the destination timed it


class Location(_PeerBody, frozen=True):
    """Reply to ``Locate``. "activating": committed, ``cont`` under way: ask again."""

    state: Literal["running", "absent", "activating"]
    cont_returned_at: float | None = None

    @property
    def final(self) -> bool:
        return self.state != "activating"


class Refusal(_PeerBody, frozen=True):
    """A negative reply (``ok`` false) to any request. For ``Commit``, ``running``
    False proves that the destination did not run the VM and never will."""

    error: str
    running: bool | None = None


PeerReply = Reserved | ImageConsistent | Activated | Location | Refusal

# A positive reply: what a caller of ``read_reply`` expects.
R = TypeVar("R", Reserved, ImageConsistent, Activated, Location)


def _builtins(message: msgspec.Struct) -> dict[str, object]:
    body: dict[str, object] = msgspec.to_builtins(message)
    return body


def request_frame(message: PeerRequest) -> frames.Request:
    """The frame that carries ``message``: its tag is the frame's kind."""
    body = _builtins(message)
    kind = body.pop("kind")
    assert isinstance(kind, str)
    return frames.Request(kind, body)


def reply_frame(message: PeerReply) -> frames.Reply:
    return frames.Reply(ok=not isinstance(message, Refusal), body=_builtins(message))


def control_reply_frame(reply: ControlReply) -> frames.Reply:
    return frames.Reply(ok=not isinstance(reply, Failed), body=_builtins(reply))


def read_control_reply(frame: frames.Reply, peer: str | None) -> ControlReply:
    try:
        reply: ControlReply = msgspec.convert(frame.body, ControlReply)
    except msgspec.ValidationError as exc:
        raise frames.RemoteProtocolError(
            peer, f"malformed control reply: {exc}", "Reply") from exc
    return reply


def read_request(frame: frames.Request, peer: str | None) -> PeerRequest:
    """The typed request in ``frame``; an unknown kind or a body that does not fit
    raises ``frames.RemoteProtocolError``."""
    try:
        request: PeerRequest = msgspec.convert({**frame.body, "kind": frame.kind}, PeerRequest)
    except msgspec.ValidationError as exc:
        raise frames.RemoteProtocolError(
            peer, f"malformed {frame.kind!r} request: {exc}", "Request") from exc
    return request


def read_reply(frame: frames.Reply, expected: type[R], peer: str | None) -> R | Refusal:
    """The typed reply in ``frame``: ``expected`` if the peer said ok, else a
    ``Refusal``. A body that does not fit raises ``frames.RemoteProtocolError``."""
    try:
        if frame.ok:
            return msgspec.convert(frame.body, expected)
        return msgspec.convert(frame.body, Refusal)
    except msgspec.ValidationError as exc:
        answer = expected.__name__ if frame.ok else "Refusal"
        raise frames.RemoteProtocolError(
            peer, f"malformed reply (a {answer} expected): {exc}", "Reply") from exc
