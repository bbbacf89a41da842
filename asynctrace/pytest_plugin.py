"""The pytest plugin (registered as ``pytest11``): one test's task telemetry, and task hygiene.

- The ``asynctrace_capture`` fixture (async, for pytest-asyncio tests) installs asynctrace on
  the test's running loop with an in-memory span exporter and a registry of its own, and
  uninstalls it after the test: nothing stays installed. It yields a :class:`Captured`.
- ``@pytest.mark.asynctrace(leaks=True, never_retrieved=True, max_block_ms=N, timeout=S)`` on
  an async test uses that fixture and fails the test when, at its end, tasks it created are
  still pending, a task's exception was never retrieved, or the loop was blocked longer than
  N ms; after ``timeout`` seconds it cancels the test and prints every task's await graph with
  its ids (who awaits whom on Python 3.14, each task's stack before).
  ``--asynctrace-strict`` applies ``leaks`` and ``never_retrieved`` to every test that uses
  the fixture.

Nothing here runs unless a test asks for it: the plugin only adds the fixture, the marker
and the option.
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest

__all__ = ["Captured", "asynctrace_capture", "await_graph"]


class Captured:
    """What one test's tasks produced.

    Attributes:
        records: Every task's ``TaskRecord``, in creation order (outcome once done).
        registry: The ``prometheus_client`` registry the test's metrics went to.
    """

    def __init__(self, registry: Any, exporter: Any) -> None:  # noqa: ANN401
        """Empty, for one test."""
        self.records: list[Any] = []
        self.registry = registry
        self._exporter = exporter
        self._tasks: list[tuple[weakref.ref[asyncio.Task[Any]], Any]] = []
        # Tasks that failed, kept until the test ends: a task nobody references is freed as
        # it ends (asyncio then logs its exception), before the check could see it.
        self._failed: list[tuple[asyncio.Task[Any], Any]] = []
        self.timed_out: str | None = None  # the await graph, when the test timed out

    @property
    def spans(self) -> list[Any]:
        """The finished spans (``ReadableSpan``), tasks' and correlation blocks'."""
        return list(self._exporter.get_finished_spans())

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """A metric sample's value, as ``registry.get_sample_value`` reads it."""
        return self.registry.get_sample_value(name, labels or {})  # type: ignore[no-any-return]

    def pending(self) -> list[tuple[asyncio.Task[Any], Any]]:
        """Tasks created during the test that are not done, with their records."""
        current = asyncio.current_task()  # the fixture's own teardown (pytest-asyncio's)
        out = []
        for ref, record in self._tasks:
            task = ref()
            if task is not None and task is not current and not task.done():
                out.append((task, record))
        return out

    def never_retrieved(self) -> list[tuple[asyncio.Task[Any], Any]]:
        """Tasks that ended with an exception nobody retrieved (asyncio would log it)."""
        return [(t, r) for t, r in self._failed if getattr(t, "_log_traceback", False)]


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--asynctrace-strict``."""
    parser.addoption(
        "--asynctrace-strict",
        action="store_true",
        help="asynctrace: fail tests using asynctrace_capture that leak tasks or leave "
        "exceptions never retrieved",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Declare the marker."""
    config.addinivalue_line(
        "markers",
        "asynctrace(leaks=True, never_retrieved=True, max_block_ms=None): capture this async "
        "test's task telemetry and fail it on leaked tasks, exceptions never retrieved, or a "
        "loop blocked longer than max_block_ms",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test with the marker uses the fixture."""
    for item in items:
        if item.get_closest_marker("asynctrace") is not None:
            names = getattr(item, "fixturenames", None)
            if names is not None and "asynctrace_capture" not in names:
                names.append("asynctrace_capture")


def _describe(pairs: list[tuple[asyncio.Task[Any], Any]]) -> str:
    lines = []
    for task, record in pairs[:20]:
        meta = record.metadata
        lines.append(
            f"  {task.get_name()} (operation {meta.operation_name!r}, correlation_id "
            f"{meta.correlation_id!r}), coroutine {getattr(task.get_coro(), '__qualname__', '?')}"
        )
    if len(pairs) > 20:  # noqa: PLR2004
        lines.append(f"  ... and {len(pairs) - 20} more")
    return "\n".join(lines)


def _problems(captured: Captured, settings: dict[str, Any]) -> list[str]:
    """What the test's settings forbid and its tasks did."""
    problems = []
    if settings.get("leaks") and (pending := captured.pending()):
        problems.append(f"{len(pending)} task(s) still pending:\n{_describe(pending)}")
    if settings.get("never_retrieved") and (lost := captured.never_retrieved()):
        problems.append(f"{len(lost)} exception(s) never retrieved:\n{_describe(lost)}")
    max_block_ms = settings.get("max_block_ms")
    if max_block_ms is not None:
        blocked = sum(
            s.value
            for metric in captured.registry.collect()
            if metric.name == "asynctrace_event_loop_blocked"
            for s in metric.samples
            if s.name.endswith("_total")
        )
        if blocked:
            problems.append(f"the event loop was blocked longer than {max_block_ms} ms")
    return problems


def _arm_timeout(
    request: pytest.FixtureRequest, captured: Captured, timeout: float | None
) -> asyncio.TimerHandle | None:
    """After ``timeout`` seconds: note the await graph of every task, cancel the test's."""
    if timeout is None:
        return None
    loop = asyncio.get_running_loop()
    test_name = getattr(getattr(request.node, "function", None), "__qualname__", None)

    def on_timeout() -> None:
        tasks = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task(loop)]
        captured.timed_out = (
            f"the test timed out after {timeout} s; its tasks then, with their ids:\n"
            + await_graph(tasks)
        )
        sys.stderr.write(f"asynctrace: {captured.timed_out}\n")
        for task in tasks:
            if getattr(task.get_coro(), "__qualname__", None) == test_name:
                task.cancel(f"asynctrace: the test timed out after {timeout} s")

    return loop.call_later(timeout, on_timeout)


def await_graph(tasks: list[asyncio.Task[Any]]) -> str:
    """Each task with its ids, and where it waits: who awaits whom on 3.14, else its stack."""
    from asynctrace._introspect import task_metadata  # noqa: PLC0415

    blocks = []
    for task in tasks:
        meta = task_metadata(task)
        ids = (
            f"operation {meta.operation_name!r}, correlation_id {meta.correlation_id!r}"
            if meta is not None
            else "no asynctrace metadata"
        )
        head = f"{task.get_name()} ({ids})"
        format_graph = getattr(asyncio, "format_call_graph", None)  # Python 3.14
        if format_graph is not None:
            body = format_graph(task)
        else:
            body = "".join(
                f"  at {f.f_code.co_qualname} ({f.f_code.co_filename}:{f.f_lineno})\n"
                for f in task.get_stack()
            )
        blocks.append(f"{head}\n{body}".rstrip())
    return "\n".join(blocks)


def _settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The marker's options (and ``--asynctrace-strict``); an unknown one fails the test."""
    marker = request.node.get_closest_marker("asynctrace")
    settings: dict[str, Any] = {}
    if request.config.getoption("--asynctrace-strict"):
        settings.update(leaks=True, never_retrieved=True)
    if marker is not None:
        settings.update({"leaks": True, "never_retrieved": True}, **marker.kwargs)
    unknown = set(settings) - {"leaks", "never_retrieved", "max_block_ms", "timeout"}
    if unknown:
        pytest.fail(
            f"@pytest.mark.asynctrace: unknown option(s) {sorted(unknown)}; accepted: leaks, "
            "never_retrieved, max_block_ms, timeout",
            pytrace=False,
        )
    return settings


async def _capture(request: pytest.FixtureRequest) -> AsyncIterator[Captured]:
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: PLC0415
        InMemorySpanExporter,
    )
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    import asynctrace  # noqa: PLC0415

    settings = _settings(request)
    max_block_ms = settings.get("max_block_ms")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    captured = Captured(CollectorRegistry(), exporter)

    class Keep(asynctrace.Instrument):
        def task_created(self, task: asyncio.Task[Any], record: Any) -> None:  # noqa: ANN401
            captured.records.append(record)
            captured._tasks.append((weakref.ref(task), record))

        def task_done(self, task: asyncio.Task[Any], record: Any) -> None:  # noqa: ANN401
            if record.outcome == "exception":
                captured._failed.append((task, record))

    monitor: dict[str, Any] = {}
    if max_block_ms is not None:
        threshold = max_block_ms / 1000
        monitor = {"blocked_threshold": threshold, "lag_interval": min(0.05, threshold / 2)}
    asynctrace.install(
        tracer_provider=provider,
        registry=captured.registry,
        instruments=[Keep()],
        loop_monitor=max_block_ms is not None,
        **monitor,
    )
    timer = _arm_timeout(request, captured, settings.get("timeout"))
    try:
        yield captured
        await asyncio.sleep(0)  # let tasks that just finished run their callbacks
        if timer is not None:
            timer.cancel()
        problems = _problems(captured, settings)
        if captured.timed_out is not None:
            problems.insert(0, captured.timed_out)
        if problems:
            pytest.fail("asynctrace: " + "\n".join(problems), pytrace=False)
    finally:
        asynctrace.uninstall()
        captured._failed.clear()  # asyncio logs what was never retrieved, as without us


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixture needs pytest-asyncio
    pass
else:
    asynctrace_capture = pytest_asyncio.fixture(_capture, name="asynctrace_capture")
