"""Task health: exceptions never retrieved counted by operation; asyncio's reports carry ids."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest
from prometheus_client import CollectorRegistry

import asynctrace


async def boom() -> None:
    raise ValueError("lost")


async def forever() -> None:
    await asyncio.Event().wait()


@pytest.mark.asyncio
async def test_never_retrieved_is_counted_and_logged_with_ids(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    asynctrace.install(registry=registry, loop_monitor=False)
    caplog.set_level(logging.ERROR, logger="asyncio")
    with asynctrace.correlation("req-lost"):
        task = asynctrace.create_task(boom(), operation_name="dropped")
    await asyncio.sleep(0.01)
    assert task.done()
    del task
    gc.collect()  # asyncio reports it as the task is collected
    await asyncio.sleep(0)
    value = registry.get_sample_value(
        "asynctrace_task_exceptions_never_retrieved_total", {"operation": "dropped"}
    )
    asynctrace.uninstall()
    assert value == 1
    (record,) = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    text = record.getMessage()
    assert "Task exception was never retrieved" in text  # asyncio's own message stays
    assert "correlation_id: 'req-lost'" in text
    assert "operation: 'dropped'" in text


@pytest.mark.asyncio
async def test_retrieved_exceptions_are_not_counted() -> None:
    registry = CollectorRegistry()
    asynctrace.install(registry=registry, loop_monitor=False)
    task = asynctrace.create_task(boom(), operation_name="handled")
    with pytest.raises(ValueError, match="lost"):
        await task
    del task
    gc.collect()
    await asyncio.sleep(0)
    value = registry.get_sample_value(
        "asynctrace_task_exceptions_never_retrieved_total", {"operation": "handled"}
    )
    asynctrace.uninstall()
    assert value == 0


def test_destroyed_pending_is_logged_with_ids(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    loop = asyncio.new_event_loop()
    caplog.set_level(logging.ERROR, logger="asyncio")
    try:
        asynctrace.install(loop=loop, registry=registry, loop_monitor=False)

        async def start() -> None:
            with asynctrace.correlation("req-gone"):
                asynctrace.create_task(forever(), operation_name="abandoned")
            await asyncio.sleep(0)

        loop.run_until_complete(start())
        gc.collect()  # the pending task is collected while installed: asyncio reports it
        destroyed = registry.get_sample_value(
            "asynctrace_tasks_destroyed_pending_total", {"operation": "abandoned"}
        )
        asynctrace.uninstall(loop)
    finally:
        loop.close()
    assert destroyed == 1
    records = [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]
    assert records
    text = records[0].getMessage()
    assert "correlation_id: 'req-gone'" in text
    assert "operation: 'abandoned'" in text
