"""Shared fixtures: one embedded broker per test session, uuid-named topics per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import settings

from sferp.broker import EmbeddedBroker

# CI replays the same examples on every run (a red CI must mean a change broke
# something, not that a new random example turned up); local runs and `make fuzz`
# draw new ones each time, which is where new failures are found.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """One in-memory Tansu broker for the whole session; stopped at the end."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def topics(broker: EmbeddedBroker) -> Callable[[dict[str, int]], dict[str, str]]:
    """Factory: `topics({"sf.cdc": 3})` creates `sf.cdc.<uuid>` with 3 partitions.

    Returns role -> actual topic name. Names are unique per call, so tests
    sharing the session broker never see each other's messages.
    """

    def make(spec: dict[str, int]) -> dict[str, str]:
        suffix = uuid.uuid4().hex[:12]
        names = {role: f"{role}.{suffix}" for role in spec}
        broker.create_topics({names[role]: n for role, n in spec.items()})
        return names

    return make
