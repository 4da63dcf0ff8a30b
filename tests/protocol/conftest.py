from collections.abc import Iterator

import pytest

from tests.support.machine import World


@pytest.fixture(params=[False, True], ids=["whole", "byte_at_a_time"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    """Feed input whole, then again one byte per event: the outcome must not differ."""
    return bool(request.param)


@pytest.fixture
def both_ways(bytewise: bool) -> Iterator[None]:
    """Run a connection machine test twice: what it feeds and answers through ``World``
    arrives whole, then one byte per event (unless the test says how for a call)."""
    World.byte_at_a_time = bytewise
    try:
        yield
    finally:
        World.byte_at_a_time = False
