"""The token bucket holds prism_rate_rpm on trio's mock clock, shared across PC and PE clients."""

from __future__ import annotations

import itertools

import httpx
import pytest
import trio
from tests.e2e.e2e_world import World

from ahvbackup.core.config import load_config
from ahvbackup.core.secret import Secret
from ahvbackup.hypervisors.ahv.client import TokenBucket, connect_prism
from ahvbackup.hypervisors.ahv.driver import AhvHypervisor


async def test_bucket_holds_the_rate_after_the_burst(autojump_clock: trio.abc.Clock) -> None:
    bucket = TokenBucket(30, burst=3)
    start = trio.current_time()
    stamps = []
    for _ in range(13):
        await bucket.acquire()
        stamps.append(trio.current_time() - start)
    assert stamps[:3] == [0, 0, 0]
    # 10 requests past the burst at 30/min = one every 2 s
    assert stamps[-1] == pytest.approx(20.0)
    assert all(b - a >= 2.0 - 1e-9 for a, b in itertools.pairwise(stamps[3:]))


async def test_concurrent_callers_share_the_rate(autojump_clock: trio.abc.Clock) -> None:
    bucket = TokenBucket(60, burst=1)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(bucket.acquire)
    assert trio.current_time() - start == pytest.approx(19.0)


async def test_idle_time_refills_only_up_to_the_burst(autojump_clock: trio.abc.Clock) -> None:
    bucket = TokenBucket(60, burst=2)
    for _ in range(2):
        await bucket.acquire()
    await trio.sleep(3600)
    start = trio.current_time()
    for _ in range(4):
        await bucket.acquire()
    assert trio.current_time() - start == pytest.approx(2.0)


async def test_zero_means_unlimited(autojump_clock: trio.abc.Clock) -> None:
    bucket = TokenBucket(0)
    start = trio.current_time()
    for _ in range(1000):
        await bucket.acquire()
    assert trio.current_time() == start


def test_negative_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="rate_rpm"):
        TokenBucket(-1)


async def test_pc_and_pe_requests_draw_from_one_bucket(autojump_clock: trio.abc.Clock) -> None:
    cluster = {
        "metadata": {"uuid": "c1", "kind": "cluster"},
        "status": {"name": "c1", "resources": {"network": {"external_ip": "10.0.0.5"},
                                                "config": {"service_list": ["AOS"]}}},
    }
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if request.url.path.endswith("/clusters/c1"):
            return httpx.Response(200, json=cluster)
        return httpx.Response(200, json={"status": {"name": "backup"}, "metadata": {}})

    async with connect_prism(
        "https://pc.example:9440", user="backup", password=Secret("pw-123456"), rate_rpm=60,
        transport=httpx.MockTransport(handler),
        pe_transport_factory=lambda c: httpx.MockTransport(handler),
    ) as prism:
        pe = await prism.pe("c1")
        assert pe.limiter is prism.pc.limiter
        start = trio.current_time()
        for _ in range(5):
            await prism.pc.me()
            await pe.me()
        elapsed = trio.current_time() - start
    # burst 6 at 60/min: the cluster lookup took one token, five calls ran on the rest,
    # the other five waited 1 s each, whichever endpoint they went to
    assert pe.base_url == "https://10.0.0.5:9440"
    assert hosts.count("10.0.0.5") == 5
    assert elapsed == pytest.approx(5.0)


async def test_prism_rate_rpm_0_turns_the_cap_off_for_a_job(world: World) -> None:
    """The documented `0 = no cap`: the key accepts it and the driver's requests are not paced
    (at the default 30 a minute these 40 would take well over a minute)."""
    cfg = load_config(overrides=world.overrides(prism_rate_rpm=0))
    assert cfg.prism_rate_rpm == 0
    async with AhvHypervisor(cfg).connect() as session:
        with trio.fail_after(30):
            for _ in range(40):
                assert await session.list_vms()
