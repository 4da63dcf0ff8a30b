import pytest


@pytest.fixture(params=[False, True], ids=["whole", "byte_at_a_time"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    """Feed input whole, then again one byte per event: the outcome must not differ."""
    return bool(request.param)
