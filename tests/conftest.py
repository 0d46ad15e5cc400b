"""Shared fixtures: one embedded broker per test session, uuid-named topics per test."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from sferp.broker import EmbeddedBroker


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
