"""The daemon, the engine, the VMs and the wire know nothing of the test bed: it is one
user of a host's configuration like any operator, not what the daemons are made of."""

from __future__ import annotations

from pathlib import Path

import pytest

import livemig

ROOT = Path(livemig.__file__).parent
HOST_SIDE = ("daemon", "migration", "vm", "wire")


@pytest.mark.parametrize("package", HOST_SIDE)
def test_the_host_side_never_names_the_test_bed(package: str) -> None:
    sources = sorted((ROOT / package).rglob("*.py")) + sorted((ROOT / package).rglob("*.c"))
    assert sources, package  # the check sees files where there are some
    naming = [str(path.relative_to(ROOT)) for path in sources
              if any(word in path.read_text().lower()
                     for word in ("testbed", "test bed", "livemig.lab", "livemig.experiments"))]
    assert naming == []
