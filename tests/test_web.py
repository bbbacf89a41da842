"""Server middleware against real servers on 127.0.0.1: ASGI under uvicorn, and aiohttp.

Each request gets one correlation scope: the caller's valid X-Request-ID, else the caller's
trace id (the trace continues), else a fresh id; the response carries it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import asynctrace
import asynctrace.web

uvicorn = pytest.importorskip("uvicorn")

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _seen() -> dict[str, Any]:
    """What a handler sees: the id, the metadata's id, the current trace and span."""
    span = trace.get_current_span().get_span_context()
    metadata = asynctrace.task_metadata()
    return {
        "correlation_id": asynctrace.correlation_id(),
        "metadata_id": metadata.correlation_id if metadata is not None else None,
        "trace_id": f"{span.trace_id:032x}",
    }


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    # a task the request creates carries the request's id
    seen = await asynctrace.create_task(asyncio.sleep(0, _seen()), operation_name="work")
    body = json.dumps(seen).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def memory() -> InMemorySpanExporter:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    asynctrace.install(tracer_provider=provider, metrics=False)
    return exporter


@pytest_asyncio.fixture
async def asgi_url(memory: InMemorySpanExporter) -> AsyncIterator[str]:
    port = _free_port()
    config = uvicorn.Config(
        asynctrace.web.ASGIMiddleware(asgi_app),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}/items/7"
    server.should_exit = True
    await serving


@pytest_asyncio.fixture
async def aiohttp_url(memory: InMemorySpanExporter) -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.Response:
        seen = await asynctrace.create_task(asyncio.sleep(0, _seen()), operation_name="work")
        return web.json_response(seen)

    app = web.Application(middlewares=[asynctrace.web.aiohttp_middleware()])
    app.router.add_get("/items/{id}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield f"http://127.0.0.1:{port}/items/7"
    await runner.cleanup()


async def _get(url: str, headers: dict[str, str]) -> tuple[dict[str, Any], str]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
        assert r.status == 200
        return await r.json(), r.headers["X-Request-ID"]


@pytest.fixture(params=["asgi", "aiohttp"])
def url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.mark.asyncio
async def test_valid_request_id_is_the_correlation_id(url: str) -> None:
    seen, echoed = await _get(url, {"X-Request-ID": "req-123"})
    assert echoed == "req-123"
    assert seen["correlation_id"] == seen["metadata_id"] == "req-123"


@pytest.mark.asyncio
async def test_traceparent_continues_the_callers_trace(
    url: str, memory: InMemorySpanExporter
) -> None:
    seen, echoed = await _get(url, {"traceparent": TRACEPARENT})
    assert seen["trace_id"] == CALLER_TRACE
    assert echoed == seen["correlation_id"] == CALLER_TRACE  # no X-Request-ID: the trace's id
    await asyncio.sleep(0.05)
    spans = memory.get_finished_spans()
    request_spans = [s for s in spans if s.name.startswith("GET")]
    assert request_spans
    assert request_spans[0].parent is not None
    assert f"{request_spans[0].parent.span_id:016x}" == CALLER_SPAN
    work = [s for s in spans if s.name == "work"]
    assert work
    assert work[0].parent is not None
    assert work[0].parent.span_id == request_spans[0].context.span_id


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", ["x" * 129, "has\ttab"])
async def test_bad_request_id_is_replaced_and_logged(
    url: str, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asynctrace")
    seen, echoed = await _get(url, {"X-Request-ID": bad})
    assert echoed == seen["correlation_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", echoed)
    assert any("rejected X-Request-ID" in r.getMessage() for r in caplog.records)
    if "\t" in bad:
        assert any("\\t" in r.getMessage() for r in caplog.records)  # escaped


@pytest.mark.asyncio
async def test_each_request_gets_its_own_fresh_id(url: str) -> None:
    (first, one), (second, two) = await asyncio.gather(_get(url, {}), _get(url, {}))
    assert one != two
    assert first["correlation_id"] == one
    assert second["correlation_id"] == two
    assert first["trace_id"] != second["trace_id"]  # one trace per request


@pytest.mark.asyncio
async def test_asgi_passes_other_scopes_through() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    await asynctrace.web.ASGIMiddleware(app)({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]
