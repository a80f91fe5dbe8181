"""ListingCache: responses expire after their bound, one load per key at a time."""

from __future__ import annotations

import asyncio

import pytest

from service.listing_cache import ListingCache

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class Source:
    """Counts loads and answers with the count; ``gate`` holds loads until set."""

    def __init__(self) -> None:
        self.loads = 0
        self.gate: asyncio.Event | None = None

    async def load(self) -> int:
        self.loads += 1
        if self.gate is not None:
            await self.gate.wait()
        return self.loads


def test_a_response_is_served_until_its_bound_then_reloaded() -> None:
    clock, source = Clock(), Source()
    cache: ListingCache[int] = ListingCache(1.0, clock=clock)

    async def main() -> list[int]:
        first = await cache.get("k", source.load)
        clock.now += 0.9
        within = await cache.get("k", source.load)
        clock.now += 0.2
        after = await cache.get("k", source.load)
        return [first, within, after]

    assert asyncio.run(main()) == [1, 1, 2]
    assert (cache.hits, cache.misses) == (1, 2)


def test_concurrent_calls_share_one_load() -> None:
    clock, source = Clock(), Source()
    cache: ListingCache[int] = ListingCache(1.0, clock=clock)

    async def main() -> list[int]:
        source.gate = asyncio.Event()
        calls = [asyncio.ensure_future(cache.get("k", source.load)) for _ in range(10)]
        await asyncio.sleep(0)
        source.gate.set()
        return list(await asyncio.gather(*calls))

    assert asyncio.run(main()) == [1] * 10
    assert source.loads == 1


def test_clear_forgets_responses_and_ignores_loads_begun_before_it() -> None:
    clock, source = Clock(), Source()
    cache: ListingCache[int] = ListingCache(1.0, clock=clock)

    async def main() -> tuple[int, int]:
        await cache.get("k", source.load)
        cache.clear()
        assert len(cache) == 0
        again = await cache.get("k", source.load)
        source.gate = asyncio.Event()
        early = asyncio.ensure_future(cache.get("j", source.load))
        while source.loads < 3:  # until the load of "j" has begun
            await asyncio.sleep(0)
        cache.clear()  # a write lands while "j" is being loaded
        late = asyncio.ensure_future(cache.get("j", source.load))
        await asyncio.sleep(0)
        source.gate.set()
        await early
        return again, await late

    again, late = asyncio.run(main())
    assert again == 2
    assert late == 4, "a call after clear() must not take a load that began before it"


def test_entries_are_bounded_least_recently_used_first() -> None:
    clock, source = Clock(), Source()
    cache: ListingCache[int] = ListingCache(10.0, max_entries=2, clock=clock)

    async def main() -> None:
        for key in ("a", "b", "a", "c"):
            await cache.get(key, source.load)
        loads = source.loads
        await cache.get("a", source.load)
        assert source.loads == loads, "a was used recently and kept"
        await cache.get("b", source.load)
        assert source.loads == loads + 1, "b was the least recently used and dropped"

    asyncio.run(main())
    assert len(cache) == 2


def test_ttl_zero_always_loads() -> None:
    source = Source()
    cache: ListingCache[int] = ListingCache(0.0)
    assert [asyncio.run(cache.get("k", source.load)) for _ in range(3)] == [1, 2, 3]
