"""Hold points: stop a migration at a named point until someone lets it go.

Fault drills need a migration to be *at* a given point when the fault strikes, and most
points last milliseconds (the stop-and-copy of an idle VM takes ~1 ms), far too short to
hit by watching progress. A migration started with ``hold_at=POINT`` creates the file
``holds/VM@POINT`` in the run directory when it gets there and waits until the file is
removed, or ``HOLD_TIMEOUT_S`` has passed. ``livemig migrate --hold-at`` exposes it for
drills by hand; the fault-matrix tests use it to inject each fault at each point.

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


def hold_file(vm: str, point: HoldPoint) -> Path:
    return paths.run_dir() / "holds" / f"{vm}@{point}"


async def hold(vm: str, point: HoldPoint, wanted: HoldPoint | None) -> float:
    """Wait here while ``holds/VM@POINT`` exists, if the migration asked to hold here;
    returns the seconds held (a deadline running across a hold moves by as much)."""
    if wanted is not point:
        return 0.0
    path = hold_file(vm, point)
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
    """The drill's side: return once the migration of ``vm`` waits at ``point``."""
    path = hold_file(vm, point)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the migration of {vm} did not reach {point} in {timeout} s")
        await asyncio.sleep(POLL_S)


def release(vm: str, point: HoldPoint) -> None:
    hold_file(vm, point).unlink(missing_ok=True)
