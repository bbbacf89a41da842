"""The lazy current span (asynctrace_context): no OpenTelemetry context attached per task.

On the fast path a traced task's span is current without a ``Context`` being attached: the
runtime context builds one when code asks for the current span. These tests check that it is
made only when asked, that it is exactly what attaching it would give (nesting, attach and
detach inside the task, children), the fallback where another runtime context is in use, the
swap and its undoing, and the ``OTEL_PYTHON_CONTEXT=asynctrace`` entry point.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context.context import Context, _RuntimeContext
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import asynctrace
from asynctrace_context import TASK_SPAN, TaskSpanRuntimeContext


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def _install(provider: TracerProvider) -> None:
    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False, tracer_provider=provider)


def _raw_context() -> Context:
    """What the runtime context's ContextVar holds: what was attached, nothing lazy."""
    return otel_context._RUNTIME_CONTEXT._current_context.get()  # type: ignore[attr-defined,no-any-return]


def test_task_span_is_current_without_a_context_attached(
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    sdk, exporter = provider
    seen: dict[str, Any] = {}

    async def leaf() -> None:
        seen["raw"] = _raw_context()
        seen["handle"] = TASK_SPAN.get()
        seen["current"] = trace.get_current_span().get_span_context()  # the first ask
        seen["raw_after"] = _raw_context()
        seen["again"] = otel_context.get_current()

    async def main() -> None:
        _install(sdk)
        seen["outside"] = _raw_context()
        await asynctrace.create_task(leaf(), operation_name="leaf")
        seen["outside_after"] = _raw_context()

    asyncio.run(main())
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "leaf"]
    assert seen["raw"] is seen["outside"]  # nothing attached for the task
    assert seen["current"].span_id == span.context.span_id
    assert seen["current"].trace_id == span.context.trace_id
    # The first ask made the context holding the span current in the task's context (built
    # once, then found there), and in no other context.
    assert trace.get_current_span(seen["raw_after"]) is seen["handle"]
    assert seen["again"] is seen["raw_after"]
    assert seen["outside_after"] is seen["outside"]
    assert seen["handle"].current_context() == seen["again"]  # made anew at each call


def test_spans_opened_inside_nest_and_detach_returns_to_the_task_span(
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    sdk, exporter = provider
    tracer = sdk.get_tracer("app")
    ids: dict[str, int] = {}

    async def child() -> None:
        ids["child_sees"] = trace.get_current_span().get_span_context().span_id

    async def work() -> None:
        with tracer.start_as_current_span("db") as db:
            ids["inner"] = trace.get_current_span().get_span_context().span_id
            ids["db"] = db.get_span_context().span_id
            await asynctrace.create_task(child(), operation_name="in-db")
        ids["after"] = trace.get_current_span().get_span_context().span_id
        token = otel_context.attach(otel_context.set_value("k", "v"))
        ids["with_value"] = trace.get_current_span().get_span_context().span_id
        otel_context.detach(token)
        await asynctrace.create_task(child(), operation_name="after-db")

    async def main() -> None:
        _install(sdk)
        await asynctrace.create_task(work(), operation_name="work")

    asyncio.run(main())
    spans = {s.name: s for s in exporter.get_finished_spans()}
    work_id = spans["work"].context.span_id
    parents = {name: s.parent.span_id if s.parent else None for name, s in spans.items()}
    assert parents["db"] == work_id
    assert ids["inner"] == ids["db"]
    assert parents["in-db"] == ids["db"]
    assert ids["after"] == work_id
    assert ids["with_value"] == work_id  # a context derived from the lazy one keeps the span
    assert parents["after-db"] == work_id
    assert len({s.context.trace_id for s in spans.values()}) == 1


def test_install_swaps_the_default_runtime_context_and_uninstall_puts_it_back(
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    sdk, _ = provider
    original = otel_context._RUNTIME_CONTEXT  # type: ignore[attr-defined]
    var = original._current_context
    token = otel_context.attach(otel_context.set_value("before", 1))
    try:
        _install(sdk)
        swapped = otel_context._RUNTIME_CONTEXT  # type: ignore[attr-defined]
        assert isinstance(swapped, TaskSpanRuntimeContext)
        assert swapped._current_context is var  # the same variable: old tokens stay valid
        assert otel_context.get_value("before") == 1
        asynctrace.uninstall()
        assert otel_context._RUNTIME_CONTEXT is original  # type: ignore[attr-defined]
    finally:
        otel_context.detach(token)  # a token from before the swap, detached after it
    assert otel_context.get_value("before") is None


class _DictRuntimeContext(_RuntimeContext):
    """Another runtime context (not OpenTelemetry's contextvars one): left alone."""

    def __init__(self) -> None:
        self._var: ContextVar[Context | None] = ContextVar("other", default=None)
        self._empty = Context()

    def attach(self, context: Context) -> object:
        return self._var.set(context)

    def get_current(self) -> Context:
        current = self._var.get()
        return self._empty if current is None else current

    def detach(self, token: object) -> None:
        self._var.reset(token)  # type: ignore[arg-type]


def test_another_runtime_context_keeps_attaching_per_task(
    provider: tuple[TracerProvider, InMemorySpanExporter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sdk, exporter = provider
    other = _DictRuntimeContext()
    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", other)
    seen: dict[str, Any] = {}

    async def leaf() -> None:
        seen["lazy"] = TASK_SPAN.get()
        seen["current"] = trace.get_current_span().get_span_context().span_id

    async def main() -> None:
        _install(sdk)
        assert otel_context._RUNTIME_CONTEXT is other  # type: ignore[attr-defined]
        await asynctrace.create_task(leaf(), operation_name="leaf")

    asyncio.run(main())
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "leaf"]
    assert seen["lazy"] is None  # the eager path: a context attached in the task
    assert seen["current"] == span.context.span_id


def test_runtime_context_replaced_after_install_falls_back(
    provider: tuple[TracerProvider, InMemorySpanExporter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sdk, exporter = provider
    seen: dict[str, Any] = {}

    async def leaf() -> None:
        seen["current"] = trace.get_current_span().get_span_context().span_id

    async def main() -> None:
        _install(sdk)
        monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", _DictRuntimeContext())
        await asynctrace.create_task(leaf(), operation_name="leaf")

    asyncio.run(main())
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "leaf"]
    assert seen["current"] == span.context.span_id


def test_entry_point_selects_it_before_opentelemetry_is_imported(tmp_path: Any) -> None:
    """``OTEL_PYTHON_CONTEXT=asynctrace``: loaded while opentelemetry.context is imported."""
    script = tmp_path / "check.py"
    script.write_text(
        "import asyncio\n"
        "from opentelemetry import context, trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from prometheus_client import CollectorRegistry\n"
        "import asynctrace\n"
        "from asynctrace_context import TaskSpanRuntimeContext\n"
        "first = context._RUNTIME_CONTEXT\n"
        "assert type(first) is TaskSpanRuntimeContext, first\n"
        "async def leaf():\n"
        "    return trace.get_current_span().get_span_context().span_id\n"
        "async def main():\n"
        "    asynctrace.install(registry=CollectorRegistry(), loop_monitor=False,\n"
        "                       tracer_provider=TracerProvider())\n"
        "    assert context._RUNTIME_CONTEXT is first\n"
        "    assert await asynctrace.create_task(leaf()) != 0\n"
        "    asynctrace.uninstall()\n"
        "    assert context._RUNTIME_CONTEXT is first\n"
        "asyncio.run(main())\n"
        "print('ok')\n"
    )
    env = {**os.environ, "OTEL_PYTHON_CONTEXT": "asynctrace"}
    done = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert "Failed to load context" not in done.stderr
