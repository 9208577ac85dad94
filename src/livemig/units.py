"""Units every layer shares, each defined here once.

The bottom of the import graph: it imports nothing, so the wire codec, the planner, the
backends and the analysis can all take their page size and rate unit from one place.
Rates cross boundaries (the command line, the control protocol, reports) in Mbit/s, the
unit people read; the engine computes in bit/s. The conversion happens once, where a
message becomes the engine's ``RateLimits``.
"""

from __future__ import annotations

from typing import Final

PAGE_SIZE: Final = 4096  # bytes: x86-64 guest pages, and the unit of the dirty log
MBIT: Final = 1_000_000  # bit/s in one Mbit/s (decimal, as link speeds are quoted)
