"""Prometheus metrics: durations, created and in-flight tasks, exemplars, lag, blocked loops."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

import asynctrace
from asynctrace._state import STATE


async def ok(delay: float = 0) -> None:
    await asyncio.sleep(delay)


async def fail() -> None:
    await asyncio.sleep(0)
    raise ValueError("x")


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_counts_durations_and_outcomes() -> None:
    """Created counter, duration histogram by operation and outcome, sum and buckets."""
    registry = CollectorRegistry()

    async def main() -> None:
        asynctrace.install(registry=registry, loop_monitor=False)
        tasks = [asynctrace.create_task(ok(0.002), operation_name="fetch") for _ in range(5)]
        tasks += [asynctrace.create_task(fail(), operation_name="fetch") for _ in range(2)]
        slow = asynctrace.create_task(ok(10), operation_name="slow")
        await asyncio.sleep(0)
        slow.cancel()
        await asyncio.gather(*tasks, slow, return_exceptions=True)

    asyncio.run(main())
    assert value(registry, "asynctrace_tasks_created_total", operation="fetch") == 7
    assert value(registry, "asynctrace_task_duration_seconds_count", operation="fetch",
                 outcome="finished") == 5  # fmt: skip
    assert value(registry, "asynctrace_task_duration_seconds_count", operation="fetch",
                 outcome="exception") == 2  # fmt: skip
    assert value(registry, "asynctrace_task_duration_seconds_count", operation="slow",
                 outcome="cancelled") == 1  # fmt: skip
    total = value(registry, "asynctrace_task_duration_seconds_sum", operation="fetch",
                  outcome="finished")  # fmt: skip
    assert total is not None
    assert 5 * 0.002 <= total < 5.0
    # none of the 2 ms tasks fits in the 1 ms bucket; all fit by 1 s
    assert value(registry, "asynctrace_task_duration_seconds_bucket", operation="fetch",
                 outcome="finished", le="0.001") == 0  # fmt: skip
    assert value(registry, "asynctrace_task_duration_seconds_bucket", operation="fetch",
                 outcome="finished", le="1.0") == 5  # fmt: skip
    assert value(registry, "asynctrace_tasks_in_flight", operation="fetch") == 0


def test_in_flight_gauge() -> None:
    """The in-flight gauge counts tasks created and not yet done."""
    registry = CollectorRegistry()

    async def main() -> None:
        asynctrace.install(registry=registry, loop_monitor=False)
        ev = asyncio.Event()
        waiting = [asynctrace.create_task(ev.wait(), operation_name="wait") for _ in range(4)]
        await asyncio.sleep(0)
        assert value(registry, "asynctrace_tasks_in_flight", operation="wait") == 4
        ev.set()
        await asyncio.gather(*waiting)
        await asyncio.sleep(0)
        assert value(registry, "asynctrace_tasks_in_flight", operation="wait") == 0

    asyncio.run(main())


def test_operation_label_is_capped() -> None:
    """Past max_operations distinct values, operations are reported as `_other`."""
    registry = CollectorRegistry()

    async def main() -> None:
        asynctrace.install(registry=registry, max_operations=3, loop_monitor=False)
        await asyncio.gather(
            *(asynctrace.create_task(ok(), operation_name=f"op{i}") for i in range(10))
        )
        await asyncio.create_task(ok())

    asyncio.run(main())
    text = generate_latest(registry).decode()
    ops = {
        line.split('operation="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("asynctrace_tasks_created_total")
    }
    assert ops == {"op0", "op1", "op2", "_other", "unnamed"}
    assert value(registry, "asynctrace_tasks_created_total", operation="_other") == 7
    assert "correlation" not in text  # ids never become labels


@pytest.mark.parametrize("sites", [False, True], ids=["lean", "records"])
def test_exemplars_carry_trace_ids(sites: bool) -> None:
    """Sampled tasks put their trace id on the duration bucket as an OpenMetrics exemplar.

    On the lean path (no record per task) and with records (``creation_sites=True``).
    """
    registry = CollectorRegistry()
    provider = TracerProvider()
    tracer = provider.get_tracer("t")

    async def main() -> int:
        asynctrace.install(
            registry=registry,
            tracer_provider=provider,
            loop_monitor=False,
            creation_sites=sites,
        )
        assert STATE.hooks.lean is not sites
        with tracer.start_as_current_span("request") as span:
            await asynctrace.create_task(ok(), operation_name="traced")
        return span.get_span_context().trace_id

    trace_id = asyncio.run(main())
    text = generate_openmetrics(registry).decode()
    lines = [
        line for line in text.splitlines()
        if line.startswith("asynctrace_task_duration_seconds_bucket{")
        and 'operation="traced"' in line
        and " # " in line
    ]  # fmt: skip
    assert len(lines) == 1
    assert f'trace_id="{trace_id:032x}"' in lines[0]


def test_loop_lag_and_blocked_episode_names_the_task(caplog: pytest.LogCaptureFixture) -> None:
    """A task blocking the loop is counted under its operation, and the stack is logged."""
    registry = CollectorRegistry()

    async def blocker() -> None:
        time.sleep(0.4)  # noqa: ASYNC251 - blocking the loop is the point

    async def main() -> None:
        asynctrace.install(registry=registry, lag_interval=0.02, blocked_threshold=0.05)
        await asyncio.sleep(0.1)  # a few healthy heartbeats
        await asynctrace.create_task(blocker(), operation_name="cpu-bound")
        await asyncio.sleep(0.1)

    with caplog.at_level(logging.WARNING, logger="asynctrace"):
        asyncio.run(main())
    assert value(registry, "asynctrace_event_loop_blocked_total", operation="cpu-bound") == 1
    lag_count = value(registry, "asynctrace_event_loop_lag_seconds_count")
    assert lag_count is not None
    assert lag_count >= 3
    lag_over = value(registry, "asynctrace_event_loop_lag_seconds_bucket", le="0.25")
    assert lag_over is not None
    assert lag_over < lag_count  # the 0.4 s beat is above the 0.25 bucket
    messages = [r.getMessage() for r in caplog.records]
    assert any("event loop blocked" in m and "blocker" in m and "time.sleep" in m
               for m in messages), messages  # fmt: skip


def test_telemetry_error_metric() -> None:
    """Telemetry failures are exported as a metric by source."""
    registry = CollectorRegistry()

    class Boom(asynctrace.Instrument):
        def task_created(self, task: object, record: object) -> None:  # type: ignore[override]  # noqa: ARG002
            raise RuntimeError

    async def main() -> list[float | None]:
        asynctrace.install(registry=registry, instruments=[Boom()], loop_monitor=False)
        seen = []
        for _ in range(2):
            await asyncio.create_task(ok())
            seen.append(
                value(registry, "asynctrace_telemetry_errors_total", source="instrument Boom")
            )
        return seen

    assert asyncio.run(main()) == [1, 2]  # each failure counted, the hook still called


def test_metrics_are_unregistered_on_uninstall() -> None:
    """Uninstalling removes asynctrace's collector: nothing is left in the registry."""
    registry = CollectorRegistry()
    asynctrace.install(registry=registry, loop_monitor=False)
    assert "asynctrace_tasks_created" in generate_latest(registry).decode()
    asynctrace.uninstall()
    assert "asynctrace_" not in generate_latest(registry).decode()


def test_collector_describes_its_families_so_clashes_are_caught() -> None:
    """describe() names the collector's families: a registry refuses a clashing metric."""
    from prometheus_client import Counter  # noqa: PLC0415

    registry = CollectorRegistry()
    asynctrace.install(registry=registry, loop_monitor=False)
    with pytest.raises(ValueError, match="asynctrace_tasks_created"):
        Counter("asynctrace_tasks_created", "a user metric of the same name", registry=registry)
    with pytest.raises(ValueError, match="asynctrace_task_duration_seconds"):
        Counter("asynctrace_task_duration_seconds", "another clash", registry=registry)


def test_a_hung_loop_shows_while_it_is_hung() -> None:
    """event_loop_blocked_seconds, read from another thread, grows while the loop is stuck."""
    import threading  # noqa: PLC0415

    registry = CollectorRegistry()
    hung = threading.Event()

    async def main() -> None:
        asynctrace.install(registry=registry, lag_interval=0.05, blocked_threshold=0.1)
        await asyncio.sleep(0.2)  # heartbeats run
        hung.set()
        time.sleep(1.2)  # noqa: ASYNC251 - the hang under test
        await asyncio.sleep(0.2)

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    try:
        assert hung.wait(10)
        time.sleep(0.8)
        during = value(registry, "asynctrace_event_loop_blocked_seconds")
    finally:
        thread.join(10)
    assert during is not None
    assert 0.5 < during < 1.5
    assert value(registry, "asynctrace_event_loop_blocked_seconds") == 0  # the loop is gone


def test_known_label_sets_start_at_zero() -> None:
    """Blocked episodes by operation and failures by source are served from 0."""

    class Quiet(asynctrace.Instrument):
        def task_done(self, task: object, record: object) -> None:  # type: ignore[override]
            pass

    registry = CollectorRegistry()

    async def main() -> None:
        asynctrace.install(registry=registry, instruments=[Quiet()])
        await asynctrace.create_task(ok(), operation_name="w")

    asyncio.run(main())
    assert value(registry, "asynctrace_event_loop_blocked_total", operation="unknown") == 0
    assert value(registry, "asynctrace_event_loop_blocked_total", operation="w") == 0
    assert value(registry, "asynctrace_telemetry_errors_total", source="instrument Quiet") == 0
    assert asynctrace.telemetry_errors() == {}  # the API lists failures only
