"""The typed messages (``wire.messages``): what goes out comes back equal, and what does
not fit is refused with an error that names the field and says what to do."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import msgspec
import pytest
from served import KEY, LOOPBACK, Served, run

from livemig import cli
from livemig.errors import LivemigError
from livemig.migration.planner import RateLimits
from livemig.migration.source import MigrationOptions
from livemig.units import MBIT
from livemig.vm.dirtylog import TrackerKind
from livemig.vm.spec import VMSpec, Workload
from livemig.wire import frames
from livemig.wire import messages as m
from livemig.wire.channel import Channel, connect

# -- samples ------------------------------------------------------------------------------


def a_report(**overrides: Any) -> m.MigrationReport:
    fields: dict[str, Any] = dict(
        vm="v1", source="hostA", target="hostB", mode="precopy", tracker="uffd",
        ram_bytes=256 << 20, downtime_ms=41.5, total_time_s=3.25, bytes_sent=300 << 20,
        rounds=[m.RoundStats(number=1, pages_planned=65536, pages_sent=60000,
                             pages_skipped=500, pages_dirtied=1200, rate_bps=1e8,
                             duration_s=2.5, dirty_rate_bps=1.5e7, pages_zero=5036)],
        stop_reason="few-pages-left", final_pages=40, device_state_ms=5.5, verify_ms=1.25,
        verified=True, source_checksum="ab12", destination_checksum="ab12",
        stages=[("reservation", 0.0), ("iterative pre-copy", 0.4)],
        stopped_at=1000.5, cont_returned_at=1000.54,
        stop_window_ms={"final_pages": 3.0, "device_state": 5.5},
        data_sent_ratio=1.1719,
    )
    fields.update(overrides)
    return m.MigrationReport(**fields)


def a_spec() -> VMSpec:
    return VMSpec(name="v1", ip=IPv4Address("10.77.0.123"), mem_mib=256,
                  workload=Workload.WEB, image="default", kernel=Path("/k"),
                  initrd=Path("/i"), options=(("web_kb", "64"),))


CONTROL_MESSAGES: list[m.ControlRequest | m.ControlReply] = [
    m.Migrate(vm="v1", to="hostB"),
    m.Migrate(vm="v1", to="hostB", options=m.MigrateOptions(
        mode=m.Mode.STOP_AND_COPY, min_rate_mbps=20, max_rate_mbps=40, increment_mbps=0,
        tracker="shadow", verify=False, seed=7, stall_timeout_s=3.0, timeout_s=1.5,
        hold_at=m.HoldPoint.DEVICE_STATE)),
    m.Cancel(vm="v1"),
    m.Ping(),
    m.MemoryQuery(),
    m.Progress(stage="iterative pre-copy", round=2, pages_left=10, rate_mbps=150.0,
               dirty_rate_mbps=12.5, bytes_sent=1 << 20,
               elapsed_s=1.5),
    m.Migrated(report=a_report()),
    m.Migrated(report=a_report(verified=None, source_checksum=None,
                               destination_checksum=None, rounds=[])),
    m.Failed(message="it failed", stage="reservation", vm_runs_on="hostA"),
    m.Failed(message="in doubt", stage="activation", vm_runs_on=None),
    m.Pong(host="hostA"),
    m.Cancelled(vm="v1"),
    m.MemoryFigures(python_blocks=100, rss_kib=50_000, heap_in_use_kib=None),
]


def control_line(**fields: Any) -> bytes:
    return json.dumps(fields).encode() + b"\n"


# -- the control protocol -------------------------------------------------------------------


@pytest.mark.parametrize("message", CONTROL_MESSAGES, ids=lambda x: type(x).__name__)
def test_every_control_message_comes_back_equal(message: m.ControlMessage) -> None:
    line = m.encode_control(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one JSON line
    decode = (m.decode_control_request if isinstance(message, m.ControlRequest)
              else m.decode_control_reply)
    assert decode(line) == message


def test_a_request_is_not_a_reply() -> None:
    # Both directions have their own tags: a daemon's reply is no request, and back.
    with pytest.raises(m.ControlMessageError):
        m.decode_control_request(m.encode_control(m.Pong(host="hostA")))
    with pytest.raises(m.ControlMessageError):
        m.decode_control_reply(m.encode_control(m.Ping()))


@pytest.mark.parametrize(("line", "field"), [
    (control_line(v=1, op="teleport", vm="v1"), "op"),  # unknown op
    (control_line(v=1, op="cancel"), "vm"),  # missing field
    (control_line(v=1, op="cancel", vm="v1", force=True), "force"),  # extra field
    (control_line(v=1, op="cancel", vm=7), "vm"),  # wrong type
    (control_line(v=1, op="migrate", vm="v1", to="hostB",
                  options={"min_rate_mbps": "fast"}), "min_rate_mbps"),
    (control_line(v=1, op="migrate", vm="v1", to="hostB",
                  options={"min_rate_mbps": 0}), "min_rate_mbps"),  # out of range
    (control_line(v=1, op="migrate", vm="v1", to="hostB",
                  options={"mode": "teleport"}), "mode"),
    (control_line(v=1, op="migrate", vm="v1", to="hostB",
                  options={"hold_at": "lunch"}), "hold_at"),
    (control_line(v=1, op="migrate", vm="v1", to="hostB",
                  options={"tracker": "guess"}), "tracker"),
    (control_line(v=1, op="migrate", vm="v1", to="hostB",
                  options={"stall_timeout_s": -1}), "stall_timeout_s"),
    # Valid each alone, not together.
    (control_line(v=1, op="migrate", vm="v1", to="hostB",
                  options={"min_rate_mbps": 600}), "options"),
    # Last release's flat request: its options are fields the typed one does not have.
    (control_line(v=1, op="migrate", vm="v1", to="hostB", min_rate_mbps=300),
     "min_rate_mbps"),
])
def test_a_request_that_does_not_fit_is_refused_naming_the_field(line: bytes,
                                                                 field: str) -> None:
    with pytest.raises(m.ControlMessageError) as caught:
        m.decode_control_request(line)
    assert not isinstance(caught.value, m.ControlVersionMismatch)
    assert caught.value.what == "control request"
    assert field in caught.value.detail


def test_a_line_of_a_release_before_versions_says_so() -> None:
    # What the CLI of the previous release sent.
    with pytest.raises(m.ControlVersionMismatch) as caught:
        m.decode_control_request(b'{"op": "ping"}\n')
    assert caught.value.theirs is None and caught.value.ours == m.CONTROL_VERSION
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("version", [0, m.CONTROL_VERSION + 1])
def test_another_version_is_refused_before_its_fields_are_read(version: int) -> None:
    # Even a line that would fit this version: its meaning may differ in that one.
    line = control_line(v=version, op="cancel", vm="v1")
    for decode in (m.decode_control_request, m.decode_control_reply):
        with pytest.raises(m.ControlVersionMismatch) as caught:
            decode(line)
        assert caught.value.theirs == version


@pytest.mark.parametrize("line", [
    b"", b"\n", b"hello\n", b"[1, 2]\n", b'"ping"\n', b"\xff\xfe\n", b'{"v": "1"}\n',
    b'{"v": 1, "op": "ping"',
])
def test_garbage_is_a_control_message_error_in_one_line(line: bytes) -> None:
    with pytest.raises(m.ControlMessageError) as caught:
        m.decode_control_request(line)
    assert "\n" not in str(caught.value)


def test_a_report_survives_a_result_file() -> None:
    report = a_report()
    assert m.MigrationReport.from_json(json.loads(json.dumps(report.to_json()))) == report
    data = report.to_json()
    del data["downtime_ms"]
    with pytest.raises(m.ControlMessageError) as caught:
        m.MigrationReport.from_json(data)
    assert "downtime_ms" in caught.value.detail


# -- the options' defaults and units --------------------------------------------------------


def test_options_default_to_xen_and_the_engine_uses_the_same_numbers() -> None:
    options = m.MigrateOptions()
    assert (options.min_rate_mbps, options.max_rate_mbps, options.increment_mbps) == (
        100.0, 500.0, 50.0)
    assert options == m.DEFAULT_OPTIONS
    assert m.Migrate(vm="v1", to="hostB").options == m.DEFAULT_OPTIONS
    # A request that names no option gets the same defaults after the wire.
    assert m.decode_control_request(
        control_line(v=1, op="migrate", vm="v1", to="hostB")) == m.Migrate(vm="v1", to="hostB")
    # The engine's defaults are the request's, in bit/s.
    assert RateLimits() == RateLimits.of(options) == RateLimits(100e6, 500e6, 50e6)
    engine = MigrationOptions.of(options)
    assert engine == MigrationOptions()
    assert engine.limits.max_bps == options.max_rate_mbps * MBIT


def test_options_convert_to_the_engine_once_and_keep_every_field() -> None:
    options = CONTROL_MESSAGES[1]
    assert isinstance(options, m.Migrate)
    engine = MigrationOptions.of(options.options)
    assert engine.limits == RateLimits(20e6, 40e6, 0.0)
    assert (engine.mode, engine.tracker, engine.verify, engine.seed, engine.stall_timeout_s,
            engine.timeout_s, engine.hold_at) == (
        m.Mode.STOP_AND_COPY, "shadow", False, 7, 3.0, 1.5, m.HoldPoint.DEVICE_STATE)


def test_the_command_line_defaults_are_the_options_defaults() -> None:
    args = cli.build_parser().parse_args(["migrate", "v1", "--to", "hostB"])
    assert cli._migrate_options(args) == m.DEFAULT_OPTIONS


def test_the_command_line_builds_a_downtime_target_or_the_papers_rates() -> None:
    parse = cli.build_parser().parse_args
    auto = cli._migrate_options(parse(["migrate", "v1", "--to", "hostB", "--downtime", "50",
                                       "--max-impact", "30%", "--on-timeout", "switchover"]))
    assert (auto.rates, auto.downtime_ms, auto.max_impact_pct, auto.on_timeout) == (
        m.Rates.AUTO, 50.0, 30.0, m.OnTimeout.SWITCHOVER)
    paper = cli._migrate_options(parse(["migrate", "v1", "--to", "hostB", "--rates", "paper",
                                        "--min-rate", "300", "--max-rate", "1G"]))
    assert (paper.rates, paper.min_rate_mbps, paper.max_rate_mbps) == (
        m.Rates.PAPER, 300.0, 1000.0)
    engine = MigrationOptions.of(paper)
    assert engine.target is None and engine.limits.min_bps == 300e6
    with pytest.raises(LivemigError, match="--min-rate apply to --rates paper only"):
        cli._migrate_options(parse(["migrate", "v1", "--to", "hostB", "--min-rate", "300"]))


@pytest.mark.parametrize("bad", [
    {"min_rate_mbps": float("nan")}, {"max_rate_mbps": float("inf")},
    {"min_rate_mbps": 300.0, "max_rate_mbps": 200.0},
])
def test_options_built_in_python_are_checked_too(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="mbps"):
        m.MigrateOptions(**bad)


def test_the_tracker_names_are_the_dirty_logs() -> None:
    kinds = {v for k, v in vars(TrackerKind).items() if not k.startswith("_")}
    assert set(m.Tracker.__args__) == kinds  # type: ignore[attr-defined]


# -- the peer protocol ---------------------------------------------------------------------


PEER_REQUESTS: list[m.PeerRequest] = [
    m.Reserve(spec=msgspec.convert(a_spec().to_json(), m.VMSpecFields), source="hostA"),
    m.Reserve(spec=msgspec.convert(a_spec().to_json(), m.VMSpecFields), source="hostA",
              hold_at=m.HoldPoint.COMMITMENT),
    m.Image(verify=True),
    m.Commit(),
    m.Locate(vm="v1"),
]


@pytest.mark.parametrize("request_", PEER_REQUESTS, ids=lambda x: type(x).__name__)
def test_every_peer_request_comes_back_equal_through_a_frame(request_: m.PeerRequest) -> None:
    frame = frames.decode(frames.encode(m.request_frame(request_)))
    assert isinstance(frame, frames.Request)
    assert frame.kind == request_.__struct_config__.tag
    assert m.read_request(frame, "hostA") == request_


def test_a_reserved_spec_is_the_vm_spec_it_was() -> None:
    reserve = PEER_REQUESTS[0]
    assert isinstance(reserve, m.Reserve)
    assert VMSpec.from_json(msgspec.structs.asdict(reserve.spec)) == a_spec()


@pytest.mark.parametrize(("reply", "expected"), [
    (m.Reserved(), m.Reserved),
    (m.ImageConsistent(consistent=True, checksum="ab12", verify_ms=1.5), m.ImageConsistent),
    (m.ImageConsistent(consistent=True), m.ImageConsistent),
    (m.Activated(cont_returned_at=1000.25), m.Activated),
    (m.Location("running", 1000.25), m.Location),
    (m.Location("absent"), m.Location),
    (m.Refusal(error="no room"), m.Reserved),
    (m.Refusal(error="cont failed", running=False), m.Activated),
])
def test_every_peer_reply_comes_back_equal_through_a_frame(
        reply: m.PeerReply, expected: type[m.Reserved]) -> None:
    frame = frames.decode(frames.encode(m.reply_frame(reply)))
    assert isinstance(frame, frames.Reply)
    assert frame.ok is not isinstance(reply, m.Refusal)
    assert m.read_reply(frame, expected, "hostB") == reply


@pytest.mark.parametrize("frame", [
    frames.Request("teleport", {"vm": "v1"}),  # unknown kind
    frames.Request("locate", {}),  # missing field
    frames.Request("locate", {"vm": "v1", "and": "more"}),  # extra field
    frames.Request("image", {"verify": "yes"}),  # wrong type
    frames.Request("reserve", {"spec": {"name": "v1"}, "source": "hostA"}),  # half a spec
    frames.Request("reserve", {"spec": a_spec().to_json(), "source": "hostA",
                               "hold_at": "lunch"}),
])
def test_a_peer_request_that_does_not_fit_is_the_peers_breach(frame: frames.Request) -> None:
    with pytest.raises(frames.RemoteProtocolError) as caught:
        m.read_request(frame, "hostA")
    assert caught.value.peer == "hostA" and caught.value.msg_type == "Request"


def test_a_body_cannot_smuggle_another_kind() -> None:
    # The frame's kind decides, whatever the body says.
    frame = frames.Request("locate", {"vm": "v1", "kind": "commit"})
    assert m.read_request(frame, "hostA") == m.Locate(vm="v1")


@pytest.mark.parametrize(("frame", "expected"), [
    (frames.Reply(True, {"cont_returned_at": "soon"}), m.Activated),
    (frames.Reply(True, {}), m.Activated),
    (frames.Reply(True, {"state": "elsewhere"}), m.Location),
    (frames.Reply(True, {"tunnel": True, "port": 4444}), m.Reserved),
    (frames.Reply(False, {}), m.Reserved),  # a refusal without its reason
    (frames.Reply(False, {"error": "no", "running": "maybe"}), m.Activated),
])
def test_a_reply_that_does_not_fit_is_the_peers_breach(frame: frames.Reply,
                                                       expected: type[m.Reserved]) -> None:
    with pytest.raises(frames.RemoteProtocolError) as caught:
        m.read_reply(frame, expected, "hostB")
    assert caught.value.peer == "hostB" and caught.value.msg_type == "Reply"


def test_asking_a_peer_that_answers_nonsense_ends_the_channel() -> None:
    async def nonsense(channel: Channel) -> None:
        request = await channel.recv(timeout=5)
        assert isinstance(request, frames.Request) and request.kind == "locate"
        await channel.send(frames.Reply(True, {"state": "on the moon"}))
        with pytest.raises(frames.PeerLost):
            await channel.recv(timeout=5)

    async def main() -> None:
        async with Served(nonsense) as served:
            channel = await connect(LOOPBACK, served.port, key=KEY, me="hostA", timeout=5)
            async with channel:
                with pytest.raises(frames.RemoteProtocolError):
                    await channel.ask(m.Locate(vm="v1"), m.Location, timeout=5)
                assert channel.is_closing
            assert await served.done.get() is None
    run(main())


def test_asking_a_peer_gives_its_typed_answer_or_its_refusal() -> None:
    async def answer(channel: Channel) -> None:
        for _ in range(2):
            message = await channel.recv(timeout=5)
            assert isinstance(message, frames.Request)
            match m.read_request(message, channel.peer):
                case m.Locate(vm="v1"):
                    await channel.send(m.reply_frame(m.Location("absent")))
                case m.Commit():
                    await channel.send(m.reply_frame(m.Refusal(error="no", running=False)))
                case other:
                    raise AssertionError(other)

    async def main() -> None:
        async with Served(answer) as served:
            channel = await connect(LOOPBACK, served.port, key=KEY, me="hostA", timeout=5)
            async with channel:
                assert await channel.ask(m.Locate(vm="v1"), m.Location) == m.Location("absent")
                assert await channel.ask(m.Commit(), m.Activated) == m.Refusal(
                    error="no", running=False)
            assert await served.done.get() is None
    run(main())


def test_peer_bodies_are_the_json_the_last_release_sent_and_read() -> None:
    # The frame's version is unchanged: a peer of the last release must read ours...
    assert m.reply_frame(m.Location("absent")).body == {"state": "absent"}
    assert m.reply_frame(m.ImageConsistent(consistent=True)).body == {"consistent": True}
    assert m.reply_frame(m.Refusal(error="no", running=False)) == frames.Reply(
        False, {"error": "no", "running": False})
    assert m.request_frame(m.Image(verify=True)) == frames.Request("image", {"verify": True})
    assert m.request_frame(m.Commit()) == frames.Request("commit", {})
    # ... and we read what it sent.
    old_reserve = frames.Request("reserve", {"spec": a_spec().to_json(), "source": "hostA"})
    assert isinstance(m.read_request(old_reserve, "hostA"), m.Reserve)
    old_locate_reply = frames.Reply(True, {"state": "running", "cont_returned_at": None})
    assert m.read_reply(old_locate_reply, m.Location, "hostB") == m.Location("running")
