"""Run inside an isolated subinterpreter by tests/test_subinterpreters.py: export spans there.

Importable by name (``InterpreterPoolExecutor`` pickles functions by reference).
"""

from __future__ import annotations

import asyncio
import json
import threading

from prometheus_client import CollectorRegistry

import asynctrace


def export_spans(url: str, name: str, tasks: int, shutdown: bool = True) -> str:
    """Install with OTLP export to ``url`` as service ``name``; run ``tasks`` tasks; a report."""
    registry = CollectorRegistry()
    asynctrace.install(otlp_endpoint=url, registry=registry, service_name=name)

    async def work() -> None:
        await asyncio.sleep(0)

    async def main() -> None:
        with asynctrace.correlation(f"cid-{name}"):
            await asyncio.gather(
                *(asynctrace.create_task(work(), operation_name=name) for _ in range(tasks))
            )

    asyncio.run(main())
    flushed = asynctrace.flush(10)
    created = registry.get_sample_value("asynctrace_tasks_created_total", {"operation": name})
    from asynctrace import _native  # noqa: PLC0415

    report = {
        "implementation": _native.IMPLEMENTATION,
        "flushed": flushed,
        "created": created,
        "errors": asynctrace.telemetry_errors(),
        "threads": sorted(t.name for t in threading.enumerate()),
    }
    if shutdown:
        asynctrace.shutdown()
        report["threads_after"] = sorted(t.name for t in threading.enumerate())
    return json.dumps(report)


def export_json_and_file(url: str, path: str, tasks: int) -> str:
    """OTLP/JSON over HTTP and the OTLP/JSON file: batch processors without daemon threads."""
    asynctrace.install(
        otlp_endpoint=url, otlp_protocol="http/json", traces_file=path, metrics=False
    )

    async def main() -> None:
        await asyncio.gather(
            *(asynctrace.create_task(asyncio.sleep(0), operation_name="j") for _ in range(tasks))
        )

    asyncio.run(main())
    return json.dumps({"threads": sorted(t.name for t in threading.enumerate())})


def try_grpc() -> str:
    """install(otlp_protocol="grpc"): the error, and whether anything was left behind."""
    from asynctrace._install import configured_options  # noqa: PLC0415

    try:
        asynctrace.install(otlp_endpoint="http://127.0.0.1:9", otlp_protocol="grpc", metrics=False)
        error = None
    except ValueError as exc:
        error = str(exc)
    return json.dumps(
        {
            "error": error,
            "installed": configured_options() is not None,
            "threads": sorted(t.name for t in threading.enumerate()),
        }
    )
