"""Shared fixtures: every test starts and ends with nothing installed."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator

import pytest

import asynctrace.testing

PY312 = sys.version_info >= (3, 12)
PY314 = sys.version_info >= (3, 14)
# Python 3.13 names every unnamed task made through a task factory "None" (any factory,
# asyncio's own eager_task_factory too): python/cpython#130033.
PY313 = sys.version_info[:2] == (3, 13)

_events = asyncio.events
_get_policy = getattr(_events, "_get_event_loop_policy", asyncio.get_event_loop_policy)


@pytest.fixture(autouse=True)
def _reset_asynctrace() -> Iterator[None]:
    """Leave no installation, policy or instrument behind for the next test."""
    policy = _get_policy()
    asynctrace.testing.reset()
    yield
    asynctrace.testing.reset()
    assert _get_policy() is policy, "a test left the event loop policy changed"
