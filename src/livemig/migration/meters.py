"""What the link delivers and what the VM's own service sends, measured, sans-IO.

The downtime target needs the link's real throughput, not a configured rate: the last
dirty pages cross at whatever the link delivers. The source samples two counters as it
sends and feeds them here with the time:

- the bytes the peer has acknowledged (TCP_INFO's ``tcpi_bytes_acked``): what got across,
  not what was queued in our socket's buffer;
- the bytes the guest sent out of its NIC (its tap's counter on this host): the VM's own
  traffic, which leaves by the same uplink as the migration and must keep its share.

Both become rates over windows of ``WINDOW_S``. A window in which the migration was
paced below the link measures the pace, not the link: it only shows the link carries at
least that much, so it can raise the estimate but not lower it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW_S = 0.1  # long enough to hold many frames at any rate worth measuring
LINK_SMOOTHING = 0.3  # weight of a new link-limited window in the estimate
PACE_LIMITED = 0.9  # a window this close to its pace was held back by the pacer
# A paced sender learns nothing of a link faster than its pace, and a pace below the
# link keeps it there: so at least this often one window goes unpaced, to measure.
PROBE_INTERVAL_S = 1.0
MIN_PACE_BPS = 10e6  # below this, a "link rate" is a stall we measured, not a link


@dataclass
class _Window:
    started: float
    counter: int


class WindowedRate:
    """A counter's rate in bit/s, over windows of at least ``window_s``."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self._window_s = window_s
        self._open: _Window | None = None
        self.last_bps: float | None = None

    def sample(self, now: float, counter: int) -> float | None:
        """The rate of the window this sample closes, or None while it is still open."""
        if self._open is None or counter < self._open.counter:
            self._open = _Window(now, counter)  # the first sample, or a counter reset
            return None
        elapsed = now - self._open.started
        if elapsed < self._window_s:
            return None
        rate = (counter - self._open.counter) * 8 / elapsed
        self._open = _Window(now, counter)
        self.last_bps = rate
        return rate

    def restart(self) -> None:
        """Forget the open window: a gap in which the caller sent nothing (between
        rounds, say) is not a measure of anything."""
        self._open = None


class LinkMeter:
    """The link's throughput from the bytes the peer acknowledged while we sent."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self._window = WindowedRate(window_s)
        self._estimate: float | None = None
        self._unpaced_at: float | None = None  # when a window last measured the link

    @property
    def link_bps(self) -> float | None:
        return self._estimate

    def sample(self, now: float, bytes_acked: int, paced_bps: float | None) -> None:
        """After a send: ``bytes_acked`` so far, and the pace the sender kept meanwhile
        (None: unpaced)."""
        rate = self._window.sample(now, bytes_acked)
        if rate is None or rate <= 0:
            return
        if paced_bps is not None and rate >= PACE_LIMITED * paced_bps:
            # Held back by our own pacer: the link carries at least this much.
            self._estimate = rate if self._estimate is None else max(self._estimate, rate)
            return
        self._unpaced_at = now
        if self._estimate is None:
            self._estimate = rate
        else:
            self._estimate += LINK_SMOOTHING * (rate - self._estimate)

    def probing(self, now: float) -> bool:
        """Whether the sender should go unpaced for a window now: none has measured the
        link for PROBE_INTERVAL_S (see there)."""
        return self._unpaced_at is not None and now - self._unpaced_at >= PROBE_INTERVAL_S

    def restart(self) -> None:
        self._window.restart()


NEGLIGIBLE_SHARE = 0.05  # of the link: a service share below this is not paced for


def pace_bps(link_bps: float | None, service_share_bps: float) -> float | None:
    """The migration's pace: the link less the service's share. None (unpaced) until
    the link has been measured, and whenever the share is negligible: a pace at the
    estimate itself could never learn that the link is faster."""
    if link_bps is None or not math.isfinite(link_bps):
        return None
    if service_share_bps < NEGLIGIBLE_SHARE * link_bps:
        return None
    return max(link_bps - service_share_bps, 0.1 * link_bps, MIN_PACE_BPS)
