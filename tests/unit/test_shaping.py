"""The test bed link's parameters, sans-IO: parsing, the tbf/netem values, reading back."""

from __future__ import annotations

import argparse

import pytest

from livemig import argtypes
from livemig.net import shaping
from livemig.net.shaping import End, Link


@pytest.mark.parametrize(("text", "bps"), [
    ("1gbit", 10**9), ("10gbit", 10**10), ("100mbit", 10**8), ("512kbit", 512_000),
    ("2.5Gbit", 2_500_000_000), (" 1GBIT ", 10**9), ("unlimited", None), ("Unlimited", None),
])
def test_rates_parse_to_bits_per_second(text: str, bps: int | None) -> None:
    assert shaping.parse_rate(text) == bps


@pytest.mark.parametrize("text", ["", "1g", "1000", "gbit", "-1gbit", "1 gbit", "1e3mbit",
                                  "1kbit", "100gbit", "nan", "1gbps"])
def test_what_is_not_a_link_rate_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        shaping.parse_rate(text)
    with pytest.raises(argparse.ArgumentTypeError):
        argtypes.link_rate(text)


@pytest.mark.parametrize(("text", "ms"), [("0.1", 0.1), ("0", 0.0), ("2ms", 2.0)])
def test_latencies_parse_to_ms(text: str, ms: float) -> None:
    assert argtypes.latency_ms(text) == ms


@pytest.mark.parametrize("text", ["-0.1", "inf", "nan", "fast", "1001"])
def test_what_is_not_a_latency_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        argtypes.latency_ms(text)


def test_rates_format_back_as_they_are_written() -> None:
    for text in ("100mbit", "1gbit", "10gbit", "2.5gbit", "512kbit", "unlimited"):
        assert shaping.format_rate(shaping.parse_rate(text)) == text


def test_the_default_link_is_the_papers_gigabit_lan() -> None:
    assert shaping.DEFAULT_LINK == Link.parse(shaping.DEFAULT_RATE) == Link(10**9, 100)
    assert str(shaping.DEFAULT_LINK) == "1gbit, 0.1 ms one-way"


def test_only_the_nodes_end_delays_so_a_path_meets_the_latency_once() -> None:
    link = Link.parse("1gbit", 0.1)
    assert link.end(delays=True).latency_us == 100
    assert link.end(delays=False).latency_us == 0
    assert link.end(delays=True).rate_bps == link.end(delays=False).rate_bps == 10**9


def test_bursts_pass_a_whole_gso_packet_and_grow_with_the_rate() -> None:
    for text in ("512kbit", "100mbit", "1gbit", "10gbit", "32gbit"):
        rate = Link.parse(text).rate_bytes
        assert rate is not None
        assert shaping.burst_bytes(rate) >= 64 * 1024 + 1514
        assert shaping.burst_bytes(rate) >= rate * 0.001 - 1
        # The queue holds the burst and a couple of ms more: short, as a switch's is.
        assert shaping.burst_bytes(rate) < shaping.queue_bytes(rate) <= (
            shaping.burst_bytes(rate) + max(256 * 1024, rate * 0.002) + 1)
    # tbf's rate goes to the kernel as 32 bits of bytes/s.
    assert Link.parse("32gbit").rate_bytes < 1 << 32  # type: ignore[operator]


def test_an_unlimited_link_has_no_token_bucket() -> None:
    end = Link.parse("unlimited", 0.1).end(delays=True)
    assert end == End(None, None, 100)
    assert end.describe() == {"rate": "unlimited", "rate_bps": None, "latency_ms": 0.1}


def test_the_link_reads_back_from_the_qdiscs_as_it_was_asked() -> None:
    tick_per_us = 15.625  # /proc/net/psched of a 1 GHz clock: 64 ns ticks
    want = Link.parse("100mbit", 0.1).end(delays=True)
    assert want.limit_bytes is not None
    qdiscs = [("netem", {"delay": int(100 * tick_per_us)}),
              ("tbf", {"rate": 12_500_000, "limit": want.limit_bytes})]
    assert shaping.end_from_qdiscs(qdiscs, tick_per_us) == want
    assert shaping.end_from_qdiscs([("noqueue", {})], tick_per_us) == End(None, None, 0)
