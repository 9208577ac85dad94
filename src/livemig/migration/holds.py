"""Hold points: stop a migration at a named point until someone lets it go.

Fault drills need a migration to be *at* a given point when the fault strikes, and most
points last milliseconds (the stop-and-copy of an idle VM takes ~1 ms), far too short to
hit by watching progress. A migration started with ``hold_at=POINT`` creates the file
``holds/VM@POINT`` in the run directory of the host that holds (the source, or for the
commitment the target) when it gets there and waits until the file is removed, or
``HOLD_TIMEOUT_S`` has passed. A drill, seeing every host's files, looks on all of them.
``livemig migrate --hold-at`` exposes it for drills by hand; the fault-matrix tests use it
to inject each fault at each point.

A hold adds no behaviour: while held, every time-out that can fire (the peer's idle
time-out, say) fires as it would if the engine were merely slow.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from livemig import paths
from livemig.wire.messages import HoldPoint as HoldPoint

HOLD_TIMEOUT_S = 120.0
POLL_S = 0.01


def hold_file(host: str, vm: str, point: HoldPoint) -> Path:
    return paths.host_dir(host) / "holds" / f"{vm}@{point}"


async def hold(host: str, vm: str, point: HoldPoint, wanted: HoldPoint | None) -> float:
    """Wait here, on ``host``, while ``holds/VM@POINT`` exists, if the migration asked to
    hold here; returns the seconds held (a deadline running across a hold moves by as
    much)."""
    if wanted is not point:
        return 0.0
    path = hold_file(host, vm, point)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    started = time.monotonic()
    try:
        while path.exists() and time.monotonic() < started + HOLD_TIMEOUT_S:
            await asyncio.sleep(POLL_S)
    finally:
        path.unlink(missing_ok=True)
    return time.monotonic() - started


async def wait_until_held(vm: str, point: HoldPoint, timeout: float) -> None:
    """The drill's side: return once the migration of ``vm`` waits at ``point``, on
    whichever host."""
    deadline = time.monotonic() + timeout
    while not any(hold_file(h, vm, point).exists() for h in paths.visible_hosts()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the migration of {vm} did not reach {point} in {timeout} s")
        await asyncio.sleep(POLL_S)


def release(vm: str, point: HoldPoint) -> None:
    for host in paths.visible_hosts():
        hold_file(host, vm, point).unlink(missing_ok=True)
