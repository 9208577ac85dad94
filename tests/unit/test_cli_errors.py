"""Bad input at the command line ends as one sentence on stderr and a non-zero status.

Everything here runs without root, QEMU or a test bed: each test gets a run directory and
an image cache of its own (LIVEMIG_RUN, LIVEMIG_DATA) and an instance no test bed uses,
so "unknown VM" and "the test bed is down" are what the CLI really finds. The cases that
need a running test bed are in tests/integration/test_cli_errors.py.

Each case checks the status, that stderr is exactly one line naming the bad input, and
that no traceback got out; the wording itself is free to change.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from livemig import argtypes, cli, paths
from livemig.errors import BadName, GuestTimeout, QEMUCrashed
from livemig.image import builder
from livemig.vm.spec import VMSpec, Workload

UNUSED_INSTANCE = "ucli"  # no test bed of this name exists on the machine


@pytest.fixture(autouse=True)
def private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LIVEMIG_INSTANCE", UNUSED_INSTANCE)
    monkeypatch.setenv("LIVEMIG_RUN", str(tmp_path / "run"))
    monkeypatch.setenv("LIVEMIG_DATA", str(tmp_path / "data"))
    return tmp_path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        status = cli.main(argv)
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_sentence(err: str, *mentions: str) -> None:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("livemig")
    for mention in mentions:
        assert mention in lines[0], (mention, lines[0])


# (argv, exit status, what the sentence must name)
USAGE_ERRORS = [
    (["migrate", "v1", "--to", "hostB", "--min-rate", "-5"], ["--min-rate", "-5"]),
    (["migrate", "v1", "--to", "hostB", "--min-rate", "0"], ["--min-rate", "'0'"]),
    (["migrate", "v1", "--to", "hostB", "--min-rate", "abc"], ["abc"]),
    (["migrate", "v1", "--to", "hostB", "--max-rate", "1e400"], ["1e400"]),
    (["migrate", "v1", "--to", "hostB", "--max-rate", "inf"], ["inf"]),
    (["migrate", "v1", "--to", "hostB", "--max-rate", "nan"], ["nan"]),
    (["migrate", "v1", "--to", "hostB", "--max-rate", "200G"], ["200G"]),
    (["migrate", "v1", "--to", "hostB", "--min-rate", "10k"], ["10k"]),
    (["migrate", "v1", "--to", "hostB", "--mode", "postcopy"], ["postcopy"]),
    (["migrate", "v1"], ["--to"]),
    (["migrate", "v1", "--to", "hostB", "--json", "/nonexistent-dir/r.json"], ["/nonexistent-dir"]),
    (["migrate", "v1", "--to", "hostB", "--json", "/"], ["/"]),
    (["vm", "start", "v1", "--host", "hostA", "--workload", "idle", "--mem", "10"], ["10"]),
    (["vm", "start", "v1", "--host", "hostA", "--workload", "idle", "--mem", "80"], ["80"]),
    (["vm", "start", "v1", "--host", "hostA", "--workload", "idle", "--mem", "-256"], ["-256"]),
    (["vm", "start", "v1", "--host", "hostA", "--workload", "idle", "--mem", "99999999"],
     ["99999999"]),
    (["vm", "start", "v1", "--host", "hostA", "--workload", "idle", "--mem", "1.5G"], ["1.5G"]),
    (["vm", "start", "v1", "--host", "hostA", "--workload", "nope"], ["nope"]),
    (["vm", "start", "../escape", "--host", "hostA", "--workload", "idle"], ["../escape"]),
    (["vm", "start", "a/b", "--host", "hostA", "--workload", "idle"], ["a/b"]),
    (["vm", "start", "", "--host", "hostA", "--workload", "idle"], ["''"]),
    (["vm", "start", "x" * 33, "--host", "hostA", "--workload", "idle"], ["x" * 33]),
    (["vm", "start", "v1", "--host", "hostA", "--workload", "idle", "--image", "../../etc"],
     ["../../etc"]),
    (["vm", "stop"], ["name"]),
    (["vm", "frobnicate"], ["frobnicate"]),
    (["image", "build", "--name", "/etc"], ["/etc"]),
    (["image", "build", "--name", ".."], [".."]),
    (["testbed", "up", "--hosts", "a_b"], ["a_b"]),
    (["testbed", "up", "--hosts", "alpha,,beta"], ["''"]),
    (["testbed", "up", "--lan", "10.99.0.1/24"], ["10.99.0.1/24"]),
    (["testbed", "sideways"], ["sideways"]),
    (["cancel"], ["name"]),
    (["demo", "--mem", "10"], ["10"]),
    (["demo", "--workload", "custom"], ["custom"]),
    (["demo", "--plot", "/nonexistent-dir/d.png"], ["/nonexistent-dir"]),
    (["probe", "echo", "10.77.0.100", "--duration", "abc"], ["abc"]),
    (["probe", "echo", "10.77.0.100", "--duration", "-1"], ["-1"]),
    (["probe", "echo", "10.77.0.100", "--interval-ms", "0"], ["0"]),
    (["probe", "echo", "10.77.0.100", "--port", "70000"], ["70000"]),
    (["probe", "http", "ftp://x/"], ["ftp://x/"]),
    (["probe", "http", "http://10.77.0.100/", "--clients", "zero"], ["zero"]),
    (["probe", "game", "10.77.0.100", "--players", "0"], ["0"]),
    (["probe", "tcp", "10.77.0.100", "-o", "/etc/hostname/t.json"], ["/etc/hostname"]),
    (["trace", "record", "v1", "-o", "/nonexistent-dir/t.npz"], ["/nonexistent-dir"]),
    (["trace", "record", "v1", "-o", "t.npz", "--interval", "0"], ["--interval"]),
    (["wws", "t.npz", "--windows", "x"], ["x"]),
    (["wws", "t.npz", "--rates", "inf"], ["inf"]),
    (["wws", "t.npz", "--plot", "/nonexistent-dir/w.png"], ["/nonexistent-dir"]),
    (["simulate", "--model", "hotset", "--ram", "1e400"], ["1e400"]),
    (["simulate", "--model", "hotset", "--min-rate", "nan"], ["nan"]),
    (["simulate", "--model", "hotset", "--json", "/nonexistent-dir/s.json"],
     ["/nonexistent-dir"]),
    (["simulate"], ["--model"]),
    (["keys", "host", "hostA", "--dir", "ca", "--days", "0"], ["--days", "0"]),
    (["keys", "host", "hostA", "--dir", "ca", "--days", "99999999"], ["99999999"]),
    (["keys", "revoke", "--dir", "ca"], ["HOST", "--cert"]),
    (["keys", "revoke", "hostA", "--cert", "hostA.crt", "--dir", "ca"], ["--cert", "HOST"]),
    (["keys", "revoke", "hostA", "--dir", "ca", "--reason", "bored"], ["bored"]),
    (["bogus"], ["bogus"]),
    ([], ["COMMAND"]),
]


@pytest.mark.parametrize(("argv", "mentions"), USAGE_ERRORS,
                         ids=[" ".join(a)[:60] or "nothing" for a, _ in USAGE_ERRORS])
def test_a_bad_argument_is_a_one_line_usage_error(
    argv: list[str], mentions: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_cli(argv, capsys)
    assert status == 2
    assert out == ""
    assert_one_sentence(err, *mentions)
    assert "--help" in err  # where to read on


# Well-formed arguments that name something that is not there, or do not fit together.
COMMAND_ERRORS = [
    (["migrate", "v1", "--to", "hostB", "--min-rate", "600", "--max-rate", "500"],
     ["--min-rate", "--max-rate"]),
    (["migrate", "v1", "--to", "hostB"], ["hostB", "testbed up"]),  # the test bed is down
    (["migrate", "v1", "--to", "pluto"], ["pluto"]),
    (["migrate", "v1", "--to", "host"], ["host"]),
    (["vm", "stop", "v1"], ["livemig host", "testbed up"]),  # no host to ask
    (["vm", "pause", "v1"], ["livemig host", "testbed up"]),  # no host to ask
    (["vm", "resume", "v1"], ["livemig host", "testbed up"]),  # no host to ask
    (["cancel", "v1"], ["livemig host", "testbed up"]),  # no host to ask
    (["vm", "start", "v1", "--host", "hostA", "--workload", "idle"], ["hostA", "testbed up"]),
    (["vm", "start", "v1", "--host", "hostA", "--workload", "idle", "--opt", "mm_mib"],
     ["mm_mib"]),
    (["vm", "start", "v1", "--host", "hostA", "--workload", "idle", "--opt", "=5"], ["=5"]),
    (["vm", "start", "v1", "--host", "hostA", "--workload", "idle", "--opt", "colour=red"],
     ["colour"]),
    (["vm", "start", "v1", "--host", "hostA", "--workload", "mmuncher", "--opt", "mm_mib=lots"],
     ["lots"]),
    (["vm", "start", "v1", "--host", "hostA", "--workload", "web", "--opt", "web_kb=-1"],
     ["-1"]),
    (["vm", "start", "v1", "--host", "hostA", "--workload", "web", "--opt", "web_kb=1 2"],
     ["1 2"]),
    (["vm", "start", "v1", "--host", "hostA", "--workload", "mmuncher", "--mem", "128"],
     ["mm_mib", "64", "128"]),  # mmuncher's default region
    (["vm", "start", "v1", "--host", "hostA", "--workload", "mmuncher", "--mem", "128",
      "--opt", "mm_mib=100"], ["100", "128"]),
    (["vm", "start", "v1", "--host", "pluto", "--workload", "idle"], ["pluto"]),
    (["image", "build", "--add", "nocolon"], ["nocolon"]),
    (["image", "build", "--add", "/nonexistent-file:/x"], ["/nonexistent-file"]),
    (["image", "build", "--add", "/etc/hostname:relative"], ["relative"]),
    (["image", "build", "--add", "/etc/hostname:/../../outside"], ["/../../outside"]),
    (["image", "build", "--add", "/etc/hostname:/init"], ["/init"]),
    (["testbed", "up", "--hosts", "0"], ["0"]),
    (["testbed", "up", "--hosts", "27"], ["27"]),
    (["--config", "/nonexistent.toml", "daemon"], ["/nonexistent.toml"]),
    (["--config", "/etc/hostname", "vm", "list"], ["/etc/hostname"]),
    (["demo", "--workload", "mmuncher", "--mem", "128"], ["mm_mib"]),
    (["trace", "info", "/nonexistent.npz"], ["/nonexistent.npz"]),
    (["wws", "/etc/hostname"], ["/etc/hostname"]),
    (["simulate", "--model", "hotset", "--skew", "2"], ["--skew"]),
    (["simulate", "--model", "hotset", "--hot-set", "2GiB", "--ram", "1GiB"], ["--hot-set"]),
    (["simulate", "--model", "uniform", "--zero-fraction", "3"], ["--zero-fraction"]),
    (["simulate", "--model", "uniform", "--ram", "0"], ["--ram"]),
    (["simulate", "--model", "uniform", "--min-rate", "600"], ["--min-rate"]),
    (["keys", "show", "/nonexistent.crt"], ["/nonexistent.crt"]),
    (["keys", "show", "/etc/hostname"], ["/etc/hostname"]),
    (["keys", "init", "--dir", "/proc/livemig-ca"], ["/proc/livemig-ca"]),
    (["keys", "host", "hostA", "--dir", "/nonexistent-ca"], ["/nonexistent-ca"]),
    (["keys", "revoke", "hostA", "--dir", "/nonexistent-ca"], ["/nonexistent-ca"]),
    (["keys", "crl", "--dir", "/nonexistent-ca"], ["/nonexistent-ca"]),
]


@pytest.mark.parametrize(("argv", "mentions"), COMMAND_ERRORS,
                         ids=[" ".join(a)[:60] for a, _ in COMMAND_ERRORS])
def test_a_foreseen_failure_is_one_sentence_with_status_1(
    argv: list[str], mentions: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_cli(argv, capsys)
    assert status == 1
    assert out == ""
    assert_one_sentence(err, *mentions)


def test_revoking_what_the_ca_never_issued_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca"
    assert run_cli(["keys", "init", "--dir", str(ca)], capsys)[0] == 0
    status, out, err = run_cli(["keys", "revoke", "hostZ", "--dir", str(ca)], capsys)
    assert status == 1 and out == ""
    assert_one_sentence(err, "hostZ", "--cert")
    status, out, err = run_cli(["keys", "revoke", "--cert", "/etc/hostname", "--dir", str(ca)],
                               capsys)
    assert status == 1 and out == ""
    assert_one_sentence(err, "/etc/hostname")


def host_config(tmp_path: Path, **keys: str) -> Path:
    """A configuration of host hostA at 10.77.0.11 (which this namespace does not have),
    its files in ``tmp_path``."""
    settings = {"key": str(tmp_path / "peer.key"), "tls": str(tmp_path / "tls"),
                "run": str(tmp_path / "run"), **keys}
    path = tmp_path / "livemig.toml"
    path.write_text(f"""
[host]
name = "hostA"
address = "10.77.0.11"
[vms]
network = "10.77.0.0/24"
pool = "10.77.0.64-10.77.0.79"
[paths]
run = "{settings['run']}"
state = "{tmp_path / 'state'}"
[tls]
dir = "{settings['tls']}"
peer_key = "{settings['key']}"
""")
    return path


@pytest.mark.parametrize(("text", "mentions"), [
    ("[host]\nname = 'a'\n", ["address"]),  # a key missing
    ("[host]\nname = 'a'\naddress = 'x'\n[vms]\nnetwork = '10.0.0.0/24'\n"
     "pool = '10.0.0.5-10.0.0.9'\n", ["'x'"]),
    ("[host]\nname = 'a_b'\naddress = '10.0.0.1'\n[vms]\nnetwork = '10.0.0.0/24'\n"
     "pool = '10.0.0.5-10.0.0.9'\n", ["a_b"]),
    ("[host]\nname = 'a'\naddress = '10.0.0.1'\ncolour = 'red'\n[vms]\n"
     "network = '10.0.0.0/24'\npool = '10.0.0.5-10.0.0.9'\n", ["colour"]),
    ("[host]\nname = 'a'\naddress = '10.0.0.1'\n[vms]\nnetwork = '10.0.0.0/24'\n"
     "pool = '10.0.1.5-10.0.1.9'\n", ["10.0.1.5", "10.0.0.0/24"]),
    ("not toml [", ["TOML"]),
])
def test_a_wrong_configuration_is_one_sentence_naming_the_file(
    tmp_path: Path, text: str, mentions: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "livemig.toml"
    path.write_text(text)
    status, out, err = run_cli(["--config", str(path), "vm", "list"], capsys)
    assert (status, out) == (1, "")
    assert_one_sentence(err, str(path), *mentions)


def test_a_short_peer_key_is_refused_before_the_daemon_listens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "short.key"
    key.write_bytes(b"0123")
    status, _, err = run_cli(["--config", str(host_config(tmp_path, key=str(key))),
                              "daemon"], capsys)
    assert status == 1
    assert_one_sentence(err, str(key))
    assert not (tmp_path / "run").exists()  # it touched nothing


def test_a_daemon_elsewhere_than_its_address_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "peer.key").write_bytes(os.urandom(32))
    conf = str(host_config(tmp_path))
    # Without its TLS files first: one sentence that says how to make them.
    status, _, err = run_cli(["--config", conf, "daemon"], capsys)
    assert status == 1
    assert_one_sentence(err, "livemig keys")
    # Here, in the machine's own namespace, the host's address does not exist.
    status, _, err = run_cli(["--config", conf, "daemon", "--insecure-plaintext"], capsys)
    assert status == 1
    assert_one_sentence(err, "10.77.0.11", "[host] address")
    # It gave its control socket up again: a real daemon started later finds no stale one.
    assert not (tmp_path / "run" / "livemigd.sock").exists()


def test_a_certificate_of_another_name_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon's identity is its certificate's name: hostB's files under hostA's."""
    (tmp_path / "peer.key").write_bytes(os.urandom(32))
    ca = tmp_path / "ca"
    assert run_cli(["keys", "init", "--dir", str(ca)], capsys)[0] == 0
    assert run_cli(["keys", "host", "hostB", "--dir", str(ca), "--out", str(ca / "b")],
                   capsys)[0] == 0
    tls = tmp_path / "tls"
    tls.mkdir()
    for name in ("ca.crt", "ca.crl"):
        (tls / name).write_bytes((ca / "b" / name).read_bytes())
    (tls / "hostA.crt").write_bytes((ca / "b" / "hostB.crt").read_bytes())
    (tls / "hostA.key").write_bytes((ca / "b" / "hostB.key").read_bytes())
    status, _, err = run_cli(["--config", str(host_config(tmp_path)), "daemon"], capsys)
    assert status == 1
    assert_one_sentence(err, "'hostB'", "'hostA'", "livemig keys host hostA")


def test_a_bad_instance_name_is_one_sentence(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LIVEMIG_INSTANCE", "much-too-long")
    status, _, err = run_cli(["vm", "list"], capsys)
    assert status == 1
    assert_one_sentence(err, "LIVEMIG_INSTANCE", "much-too-long")


def test_bad_image_names_never_reach_the_file_system(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    for name in ("../x", "/etc", "", ".hidden", "a/b"):
        status, _, err = run_cli(["image", "build", "--name", name], capsys)
        assert status == 2, name
        assert_one_sentence(err)
    assert not data.exists()
    with pytest.raises(BadName):
        builder.Recipe(name="../../tmp/x")
    with pytest.raises(BadName):
        builder.Image.load("../images")


def test_the_console_script_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    """The real entry point, as an operator runs it, in a process of its own."""
    env = {**os.environ, "LIVEMIG_INSTANCE": UNUSED_INSTANCE,
           "LIVEMIG_RUN": str(tmp_path / "run"), "LIVEMIG_DATA": str(tmp_path / "data")}
    livemig = Path(sys.executable).with_name("livemig")
    for argv, status in ((["migrate", "v1", "--to", "hostB", "--max-rate", "-1"], 2),
                         (["vm", "stop", "nosuchvm"], 1),
                         (["migrate", "v1", "--to", "hostB"], 1)):
        done = subprocess.run([str(livemig), *argv], env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == status, (argv, done.stderr)
        assert done.stdout == ""
        assert_one_sentence(done.stderr)


# -- the pieces behind the sentences --------------------------------------------------------


@pytest.mark.parametrize("name", ["v1", "web-1", "a.b_c", "A" * 32, "0"])
def test_good_names_pass(name: str) -> None:
    assert paths.check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/", "-x", ".x", "a b",
                                  "a\nb", "x" * 33, "é", "v1\n"])
def test_names_that_would_escape_or_confuse_are_refused(name: str) -> None:
    with pytest.raises(BadName):
        paths.check_name(name)


def test_a_vm_spec_from_a_peer_with_a_bad_name_is_a_value_error() -> None:
    """The destination refuses malformed peer specs with ``except ValueError``."""
    good = VMSpec(name="v1", ip=IPv4Address("10.77.0.100"), mem_mib=128,
                  workload=Workload.IDLE, image="default", kernel=Path("/k"),
                  initrd=Path("/i"))
    data = good.to_json() | {"name": "../../../etc"}
    with pytest.raises(ValueError):
        VMSpec.from_json(data)
    assert VMSpec.from_json(good.to_json()) == good


@pytest.mark.parametrize(("text", "mbps"), [("500", 500.0), ("500M", 500.0), ("1g", 1000.0),
                                            ("2000k", 2.0), ("1", 1.0), ("100G", 100_000.0)])
def test_rates_in_range_are_read_in_mbit_per_s(text: str, mbps: float) -> None:
    assert argtypes.rate(text) == pytest.approx(mbps)


@pytest.mark.parametrize("text", ["0", "-1", "0.5", "999k", "100.1G", "inf", "-inf", "nan",
                                  "1e400", "", "M", "fast"])
def test_rates_out_of_range_or_not_numbers_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        argtypes.rate(text)


def test_an_existing_file_stays_untouched_by_the_writability_check(tmp_path: Path) -> None:
    existing = tmp_path / "report.json"
    existing.write_text("keep me")
    assert argtypes.writable_file(str(existing)) == existing
    assert existing.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temp left
    fresh = tmp_path / "new.json"
    assert argtypes.writable_file(str(fresh)) == fresh
    assert not fresh.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="root ignores permissions; non-root is refused")
def test_a_read_only_place_is_refused_even_for_root() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        argtypes.writable_file("/proc/livemig-report.json")


def test_a_guest_that_died_at_boot_says_why_in_one_line() -> None:
    """The console log goes with a VM that failed to start; its telling line must not."""
    panic = ("lm: booting\n[    1.44] Kernel panic - not syncing: System is deadlocked on memory\n"
             "[    1.45] Kernel Offset: 0x2f800000 from 0xffffffff81000000\n")
    crashed = str(QEMUCrashed("v1", 0, "", panic))
    assert "System is deadlocked on memory" in crashed and "\n" not in crashed
    assert "qemu: could not open" in str(QEMUCrashed("v1", 1, "x\nqemu: could not open\n", panic))
    oom = ("lm-agent: serving on /dev/vport1p1\n"
           "[    3.87] Out of memory: Killed process 102 (lm-mmuncher) total-vm:50148kB\n")
    timeout = str(GuestTimeout("v1", "workload ready", 90, oom))
    assert "lm-mmuncher" in timeout and "\n" not in timeout
    assert "console log" in str(GuestTimeout("v1", "workload ready", 90))
