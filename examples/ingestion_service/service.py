"""The instrumented ingestion service: an aiohttp API that normalizes and stores documents.

POST /ingest with {"documents": [{"source": "crm", "id": "...", "body": "..."}, ...]}

- asynctrace's aiohttp middleware (``asynctrace.web``) gives each request its correlation
  scope: the id comes from ``X-Request-ID`` (when it is a valid id; a bad one is logged and
  replaced), else from the W3C ``traceparent`` header (the trace continues the caller's),
  else a fresh one. Each request is one trace (the caller's, or its own, linked to the
  connection's task). The id is returned in the ``X-Request-ID`` response header and the body.
- Limits: a body over 512 KiB gets 413; more than 2,000 documents, 32 sources, JSON nested
  deeper than 8 levels, or documents that are not objects get 400 with a JSON error.
- Normalization fans out one task per source (``operation_name`` per stage, a priority hint
  per source), keeps ``asyncio.gather`` result order, then stores the results in SQLite
  (aiosqlite).
- Sources can be slow or fail, by configuration (``--source crm:latency=0.05,fail=0.5``).

Instrumentation is the one ``asynctrace.install(...)`` call in ``main()`` and the metadata
keywords on ``asynctrace.create_task``; everything else is ordinary asyncio.

    python examples/ingestion_service/service.py --port 8080 --metrics-port 9464
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

import aiosqlite
import structlog
from aiohttp import web

import asynctrace
import asynctrace.web

log = structlog.get_logger("ingestion")
DB_KEY = web.AppKey("db", aiosqlite.Connection)
CONFIG_KEY = web.AppKey("config", "ServiceConfig")


@dataclass(frozen=True)
class SourceConfig:
    """How a source behaves: its latency (seconds) and failure probability."""

    latency: float = 0.005
    fail: float = 0.0
    priority: int = 1


@dataclass(frozen=True)
class ServiceConfig:
    """The service's sources and storage."""

    sources: dict[str, SourceConfig] = field(default_factory=dict)
    database: str = ":memory:"

    def source(self, name: str) -> SourceConfig:
        """The configuration of ``name`` (defaults for unknown sources)."""
        return self.sources.get(name, SourceConfig())


class SourceError(RuntimeError):
    """A source failed to deliver (simulated, by configuration)."""


def parse_source(text: str) -> tuple[str, SourceConfig]:
    """Parse ``name:latency=0.05,fail=0.5,priority=2`` into a source configuration."""
    name, _, rest = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"Invalid --source {text!r}; expected NAME[:k=v,...].")
    values: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, raw = item.partition("=")
        if key not in ("latency", "fail", "priority"):
            raise argparse.ArgumentTypeError(
                f"Invalid --source key {key!r} in {text!r}; accepted: latency, fail, priority."
            )
        values[key] = int(raw) if key == "priority" else float(raw)
    return name, SourceConfig(**values)


# -- the pipeline: fetch -> normalize per source, in parallel; then store ------------------


async def fetch(source: str, docs: list[dict[str, Any]], cfg: SourceConfig) -> list[dict[str, Any]]:
    """Simulate pulling the documents' details from the source."""
    await asyncio.sleep(cfg.latency * random.uniform(0.5, 1.5))
    if random.random() < cfg.fail:
        log.warning("source failed", source=source, documents=len(docs))
        raise SourceError(f"source {source!r} did not answer")
    return docs


def clean(doc: dict[str, Any], source: str) -> dict[str, Any]:
    """Normalize one document: trimmed lowercase body, word count, source."""
    body = " ".join(str(doc.get("body", "")).split()).lower()
    return {
        "id": str(doc.get("id", "")),
        "source": source,
        "body": body,
        "words": len(body.split()),
    }


async def normalize_source(
    source: str, docs: list[dict[str, Any]], cfg: SourceConfig
) -> list[dict[str, Any]]:
    """Fetch a source's documents, then normalize them (each stage its own task)."""
    fetched = await asynctrace.create_task(
        fetch(source, docs, cfg), operation_name="fetch", priority_hint=cfg.priority
    )
    normalized = [clean(d, source) for d in fetched]
    log.info("normalized", source=source, documents=len(normalized))
    return normalized


async def store(db: aiosqlite.Connection, docs: list[dict[str, Any]]) -> int:
    """Store normalized documents in SQLite."""
    await db.executemany(
        "INSERT INTO documents (id, source, body, words, correlation_id) VALUES (?, ?, ?, ?, ?)",
        [(d["id"], d["source"], d["body"], d["words"], asynctrace.correlation_id()) for d in docs],
    )
    await db.commit()
    return len(docs)


async def ingest(
    db: aiosqlite.Connection, config: ServiceConfig, documents: list[dict[str, Any]]
) -> dict[str, Any]:
    """Fan out one task per source, keep gather's order, store what succeeded."""
    by_source: dict[str, list[dict[str, Any]]] = {}
    for doc in documents:
        by_source.setdefault(str(doc.get("source", "unknown")), []).append(doc)
    sources = list(by_source)
    # One task per source, each with its metadata; gather keeps the order of the sources.
    tasks = [
        asynctrace.create_task(
            normalize_source(s, by_source[s], config.source(s)),
            operation_name="normalize",
            priority_hint=config.source(s).priority,
            name=f"normalize-{s}",
        )
        for s in sources
    ]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    ok = [doc for r in results if isinstance(r, list) for doc in r]
    failed = [s for s, r in zip(sources, results, strict=True) if isinstance(r, BaseException)]
    stored = await asynctrace.create_task(store(db, ok), operation_name="store") if ok else 0
    return {"stored": stored, "failed_sources": failed, "sources": sources}


# -- HTTP -----------------------------------------------------------------------------------

MAX_BODY_BYTES = 512 * 1024  # a larger body gets 413
MAX_DOCUMENTS = 2_000  # per request, else 400
MAX_SOURCES = 32  # distinct sources per request (one task each), else 400
MAX_DEPTH = 8  # JSON nesting, else 400


class BodyError(ValueError):
    """The body is not what POST /ingest accepts; the message says what is wrong."""


def _depth(node: object, limit: int) -> int:
    """How deep ``node`` nests, counting at most to ``limit`` + 1."""
    if isinstance(node, dict | list) and limit >= 0:
        items = node.values() if isinstance(node, dict) else node
        return 1 + max((_depth(v, limit - 1) for v in items), default=0)
    return 0


def parse_documents(payload: object) -> list[dict[str, Any]]:
    """The documents of a body, checked: objects with short text fields, within the limits."""
    if not isinstance(payload, dict) or "documents" not in payload:
        raise BodyError('expected an object with a "documents" list')
    if _depth(payload, MAX_DEPTH) > MAX_DEPTH:
        raise BodyError(f"nested deeper than {MAX_DEPTH} levels")
    documents = payload["documents"]
    if not isinstance(documents, list):
        raise BodyError('"documents" must be a list')
    if len(documents) > MAX_DOCUMENTS:
        raise BodyError(f"{len(documents)} documents; at most {MAX_DOCUMENTS} per request")
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict):
            raise BodyError(f"documents[{i}] must be an object, got {type(doc).__name__}")
        source = doc.get("source", "unknown")
        if not isinstance(source, str) or not 0 < len(source) <= 64:  # noqa: PLR2004
            raise BodyError(f"documents[{i}].source must be a string of 1 to 64 characters")
    sources = {doc.get("source", "unknown") for doc in documents}
    if len(sources) > MAX_SOURCES:
        raise BodyError(f"{len(sources)} sources; at most {MAX_SOURCES} per request")
    return documents


async def handle_ingest(request: web.Request) -> web.Response:
    """POST /ingest: check the body, run the pipeline; a bad body gets 400 (or 413)."""
    request_id = asynctrace.correlation_id()
    try:
        payload = await request.json()
        documents = parse_documents(payload)
    except web.HTTPRequestEntityTooLarge:
        return web.json_response(
            {"error": f"body over {MAX_BODY_BYTES} bytes", "request_id": request_id},
            status=413,
        )
    except (ValueError, RecursionError) as exc:  # bad JSON, a BodyError, or absurd nesting
        reason = str(exc) if isinstance(exc, BodyError) else "invalid JSON"
        return web.json_response(
            {"error": f"invalid body: {reason}", "request_id": request_id}, status=400
        )
    result = await ingest(request.app[DB_KEY], request.app[CONFIG_KEY], documents)
    log.info("ingested", **result)
    return web.json_response({**result, "request_id": request_id})


async def handle_health(request: web.Request) -> web.Response:  # noqa: ARG001
    """GET /health."""
    return web.json_response({"ok": True})


async def make_app(config: ServiceConfig) -> web.Application:
    """The aiohttp application with its SQLite connection."""
    app = web.Application(
        middlewares=[asynctrace.web.aiohttp_middleware()], client_max_size=MAX_BODY_BYTES
    )
    app[CONFIG_KEY] = config
    db = await aiosqlite.connect(config.database)
    await db.execute(
        "CREATE TABLE IF NOT EXISTS documents "
        "(id TEXT, source TEXT, body TEXT, words INTEGER, correlation_id TEXT)"
    )
    app[DB_KEY] = db

    async def close_db(app: web.Application) -> None:
        await app[DB_KEY].close()

    app.on_cleanup.append(close_db)
    app.router.add_post("/ingest", handle_ingest)
    app.router.add_get("/health", handle_health)
    return app


def configure_logging() -> None:
    """structlog with the task's ids on every event, as JSON lines on stderr."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            asynctrace.add_task_context,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


async def serve(config: ServiceConfig, host: str, port: int, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:  # fmt: skip
    """Run the service until ``stop`` is set (or SIGINT/SIGTERM)."""
    app = await make_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
    log.info("listening", host=host, port=port)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, install asynctrace, serve."""
    parser = argparse.ArgumentParser(description="The instrumented ingestion service.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--metrics-port", type=int, default=9464)
    parser.add_argument("--metrics-addr", default="127.0.0.1",
                        help="bind /metrics here (0.0.0.0 in a container)")  # fmt: skip
    parser.add_argument("--service-name", default="ingestion-service")
    parser.add_argument("--traces-file", default=None)
    parser.add_argument("--database", default=":memory:")
    parser.add_argument("--source", type=parse_source, action="append", default=[],
                        help="NAME:latency=S,fail=P,priority=N (repeatable)")  # fmt: skip
    parser.add_argument("--no-summary", action="store_true", help="don't print the summary")
    args = parser.parse_args(argv)
    configure_logging()
    config = ServiceConfig(sources=dict(args.source), database=args.database)
    asynctrace.install(
        service_name=args.service_name,
        traces_file=args.traces_file,
        prometheus_port=args.metrics_port,
        prometheus_addr=args.metrics_addr,
        lag_interval=0.1,
    )
    try:
        asyncio.run(serve(config, args.host, args.port))
        if not args.no_summary:
            print(asynctrace.summary(), flush=True)
    finally:
        asynctrace.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
