"""Client-side probes: what users of a migrating VM feel, measured from the client namespace.

- ``echo``: UDP echo every millisecond; client downtime is the longest gap in replies.
- ``http``: HTTP/1.0 load from N clients; throughput in 100 ms buckets, errors by kind.
- ``game``: game clients of the guest's ``lm-game``; gaps between snapshots.
- ``timeseries``: sans-IO analysis shared by all of them (gaps, loss, buckets,
  inter-arrival statistics, service impact).

Each probe returns a frozen result whose ``to_json()`` is what ``livemig probe ...``
writes; the CLI commands are added by ``livemig.probes.cli.add_probe_commands``.
"""

from livemig.probes.echo import EchoResult, EchoSummary, ProbeTargetError, StopFlag, run_echo
from livemig.probes.game import GameResult, PlayerResult, SnapshotError, run_game
from livemig.probes.http import (
    HttpResult,
    ResponseError,
    WeightedPath,
    parse_mix,
    run_http,
    run_http_blocking,
)
from livemig.probes.timeseries import (
    Buckets,
    Distribution,
    Gap,
    ServiceImpact,
    bucketize,
    count_lost,
    distribution,
    interarrival,
    longest_gap,
    service_impact,
    throughput_per_s,
)

__all__ = [
    "Buckets",
    "Distribution",
    "EchoResult",
    "EchoSummary",
    "GameResult",
    "Gap",
    "HttpResult",
    "PlayerResult",
    "ProbeTargetError",
    "ResponseError",
    "ServiceImpact",
    "SnapshotError",
    "StopFlag",
    "WeightedPath",
    "bucketize",
    "count_lost",
    "distribution",
    "interarrival",
    "longest_gap",
    "parse_mix",
    "run_echo",
    "run_game",
    "run_http",
    "run_http_blocking",
    "service_impact",
    "throughput_per_s",
]
