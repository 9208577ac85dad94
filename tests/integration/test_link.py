"""The test bed's LAN has a speed: TCP between two hosts runs at the link's rate.

One stream for two seconds at 100 Mbit/s and at 1 Gbit/s, measured at the receiver as
frames (TCP's payload plus each segment's headers, what the token bucket counts). Within
10 % of the set rate, from above as well: the shaper really limits. The bed goes back to
its default link afterwards, whatever happens.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from livemig.net import linkcheck, shaping, testbed

pytestmark = pytest.mark.integration


@pytest.fixture
def reshaped(bed: list[testbed.Node]) -> Iterator[None]:
    yield
    testbed.up(3)


def _qdisc_bytes(node: testbed.Node) -> int:
    with testbed._ipr(node.netns) as ipr:
        index = ipr.link_lookup(ifname=testbed.HOST_UPLINK)[0]
        return sum(msg.get_attr("TCA_STATS")["bytes"] for msg in ipr.get_qdiscs(index=index))


@pytest.mark.parametrize("rate", ["100mbit", "1gbit"])
def test_host_to_host_tcp_runs_at_the_links_rate(rate: str, reshaped: None) -> None:
    link = shaping.Link.parse(rate)
    assert link.rate_bps is not None
    testbed.up(3, link)
    a, b = testbed.host_node("hostA"), testbed.host_node("hostB")
    for node in testbed.status()["nodes"]:  # type: ignore[attr-defined]
        assert node["link"]["send"]["rate_bps"] == link.rate_bps
        assert node["link"]["receive"]["rate_bps"] == link.rate_bps
    # A second try only when the first falls short: on a shared 2-core machine one slow
    # run is the CPU's, and a shaper that lets too much through fails either way.
    for _ in range(2):
        got = linkcheck.tcp_throughput(a, b, seconds=2.0).frame_bps
        assert got <= link.rate_bps * 1.10
        if got >= link.rate_bps * 0.90:
            break
    assert link.rate_bps * 0.90 <= got <= link.rate_bps * 1.10, f"{got / 1e6:.0f} Mbit/s"
    # The same link again changes nothing: the qdiscs stay, counters and all.
    sent = _qdisc_bytes(a)
    assert sent > 0
    testbed.up(3, link)
    assert _qdisc_bytes(a) >= sent
