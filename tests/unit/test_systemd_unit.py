"""The shipped systemd unit, ``dist/systemd/livemigd.service``: systemd accepts it as it
is, and it keeps what the daemon's design relies on.

``systemd-analyze verify`` checks, among the rest, that ExecStart's program exists. On a
real host that is the venv the runbook makes (``/opt/livemig/venv``), which the machine
running the tests need not have. So the unit is verified inside a throwaway root
(``--root``): the unit byte for byte as shipped, systemd's own units beside it for its
dependencies, and an executable stand-in at ExecStart's path. Only that program is
pretended; ``test_verify_looks_for_the_program_in_the_root`` shows that the check is
live there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from livemig.lab import supervise

UNIT = Path(__file__).resolve().parents[2] / "dist" / "systemd" / "livemigd.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
# systemd's own units (network-online.target, multi-user.target, ...): merged /usr first.
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))

needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian: package systemd); only it can say "
           "whether systemd accepts the unit")


def directives(text: str) -> dict[str, dict[str, str]]:
    """A unit file's settings by section; for a key set twice the last one counts, as
    for every single-valued setting in systemd."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert current is not None and sep, f"not a setting in a section: {line!r}"
        current[key.strip()] = value.strip()
    return sections


def seconds(span: str) -> float:
    """The time spans this unit uses: '30', '30s', '500ms'."""
    for suffix, scale in (("ms", 1e-3), ("s", 1.0)):
        if span.endswith(suffix):
            return float(span[: -len(suffix)]) * scale
    return float(span)


def program(unit: dict[str, dict[str, str]]) -> Path:
    """ExecStart's executable, without systemd's prefixes ('-', '@', '+', '!', ':')."""
    return Path(unit["Service"]["ExecStart"].lstrip("-@+!:").split()[0])


def offline_root(root: Path, *, stand_in: bool = True) -> Path:
    """``root`` made into a root for ``systemd-analyze verify --root``."""
    system_units = next((d for d in SYSTEM_UNIT_DIRS if (d / "sysinit.target").is_file()),
                        None)
    assert system_units is not None, f"systemd's own units are in none of {SYSTEM_UNIT_DIRS}"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copyfile(UNIT, root / "etc/systemd/system" / UNIT.name)
    if stand_in:
        exe = root / program(directives(UNIT.read_text())).relative_to("/")
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    return root


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    # A SYSTEMD_LOG_LEVEL=debug in the caller's environment would fill the output.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    return subprocess.run([SYSTEMD_ANALYZE, "verify", f"--root={root}", UNIT.name],
                          capture_output=True, text=True, env=env, timeout=30, check=False)


@needs_systemd_analyze
def test_systemd_accepts_the_unit_without_a_word(tmp_path: Path) -> None:
    result = verify(offline_root(tmp_path))
    # verify exits 0 on warnings (an unknown key, a deprecated setting): any output fails.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_systemd_analyze
def test_verify_looks_for_the_program_in_the_root(tmp_path: Path) -> None:
    result = verify(offline_root(tmp_path, stand_in=False))
    assert result.returncode != 0
    assert str(program(directives(UNIT.read_text()))) in result.stderr


def test_qemus_outlive_a_restart_of_the_daemon() -> None:
    service = directives(UNIT.read_text())["Service"]
    # Only the daemon is signalled: QEMUs keep running, and the restarted daemon attaches
    # to them again through what /run/livemig holds, which therefore must not be deleted.
    assert service["KillMode"] == "process"
    assert service["RuntimeDirectoryPreserve"] == "yes"


def test_restarts_as_the_test_beds_supervisor_does() -> None:
    unit = directives(UNIT.read_text())
    assert unit["Service"]["Restart"] == "on-failure"
    assert seconds(unit["Service"]["RestartSec"]) == supervise.RESTART_DELAY_S
    # The start limit belongs in [Unit]; systemd counts the first start as the supervisor
    # does: MAX_QUICK_RESTARTS starts in QUICK_S seconds, then no more.
    assert int(unit["Unit"]["StartLimitBurst"]) == supervise.MAX_QUICK_RESTARTS
    assert seconds(unit["Unit"]["StartLimitIntervalSec"]) == supervise.QUICK_S
    # A daemon that cannot start as configured says so with EX_CONFIG: neither retries.
    assert int(unit["Service"]["RestartPreventExitStatus"]) == supervise.EX_CONFIG
