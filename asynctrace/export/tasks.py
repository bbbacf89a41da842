"""The live task view: ``GET /tasks`` on the server that serves ``/metrics``.

For each loop asynctrace instruments, the tasks in flight: name, operation, correlation id,
trace id, age, state, the coroutine and where it waits, and (``graph=1``) who awaits whom;
grouped by operation with counts and the oldest age. Query parameters: ``operation``,
``correlation_id``, ``limit`` (default 100, at most 10,000) and ``graph``.

Tasks are read on their loop's own thread (asyncio's structures are not safe to walk from
another), in slices of :data:`SLICE` tasks per loop turn, so a large view never holds the loop
for long: with 100,000 tasks in flight the loop keeps running between slices.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import parse_qs

from asynctrace._install import instrumented_loops
from asynctrace._introspect import (
    SLICE,
    lean_starts,
    started_of,
    task_metadata,
    task_record,
    walk_tasks,
)
from asynctrace.export.tasks_page import PAGE, wants_html

__all__ = ["MAX_LIMIT", "SLICE", "TaskQuery", "snapshot", "tasks_app"]

MAX_LIMIT: Final = 10_000
DEFAULT_LIMIT: Final = 100
READ_TIMEOUT_S: Final = 5.0
"""How long a request waits for a loop to answer (a blocked loop answers later, or never)."""


class TaskQuery:
    """What a request asks for (validated)."""

    def __init__(
        self,
        operation: str | None = None,
        correlation_id: str | None = None,
        limit: int = DEFAULT_LIMIT,
        *,
        graph: bool = False,
    ) -> None:
        """Filters (exact matches), how many tasks to list per loop, and the await graph."""
        if not 0 <= limit <= MAX_LIMIT:
            raise ValueError(f"Invalid limit: {limit!r}; expected 0 to {MAX_LIMIT}.")
        self.operation = operation
        self.correlation_id = correlation_id
        self.limit = limit
        self.graph = graph

    @classmethod
    def from_query_string(cls, query: str) -> TaskQuery:
        """Parse ``operation=...&correlation_id=...&limit=...&graph=1``."""
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        unknown = set(params) - {"operation", "correlation_id", "limit", "graph"}
        if unknown:
            raise ValueError(
                f"Invalid parameter(s) {sorted(unknown)}; accepted: operation, "
                "correlation_id, limit, graph."
            )
        raw_limit = params.get("limit", str(DEFAULT_LIMIT))
        try:
            limit = int(raw_limit)
        except ValueError:
            raise ValueError(f"Invalid limit: {raw_limit!r}; expected 0 to {MAX_LIMIT}.") from None
        return cls(
            params.get("operation"),
            params.get("correlation_id"),
            limit,
            graph=params.get("graph", "0") not in ("", "0", "false"),
        )


def _where(task: asyncio.Task[Any]) -> str | None:
    """The innermost coroutine the task waits in, as ``qualname:line``."""
    coro: Any = task.get_coro()
    seen = 0
    while seen < 100:  # noqa: PLR2004 - a bound for cyclic or odd awaitables
        inner = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        if inner is None or (not hasattr(inner, "cr_frame") and not hasattr(inner, "gi_frame")):
            break
        coro, seen = inner, seen + 1
    frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
    name = getattr(coro, "__qualname__", None)
    if name is None:
        return None
    return f"{name}:{frame.f_lineno}" if frame is not None else name


def _awaited_by(task: asyncio.Task[Any]) -> list[asyncio.Future[Any]]:
    """The tasks (or futures) waiting for ``task``."""
    capture = getattr(asyncio, "capture_call_graph", None)  # Python 3.14
    if capture is not None:
        graph = capture(task, depth=0)
        return [g.future for g in graph.awaited_by] if graph is not None else []
    out: list[asyncio.Future[Any]] = []
    for callback in getattr(task, "_callbacks", None) or ():
        fn = callback[0] if isinstance(callback, tuple) else callback
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, asyncio.Future):  # Task.__wakeup: awaited directly
            out.append(owner)
            continue
        parent = getattr(owner, "_parent_task", None)  # a TaskGroup's child
        if isinstance(parent, asyncio.Task):
            out.append(parent)
            continue
        for cell in getattr(fn, "__closure__", None) or ():  # gather's and TaskGroup's
            content = cell.cell_contents if cell.cell_contents is not None else None
            if isinstance(content, asyncio.Future) and content is not task:
                out.append(content)
    return out


def _label(future: asyncio.Future[Any]) -> str:
    if isinstance(future, asyncio.Task):
        return future.get_name()
    waiters = _awaited_by_future(future)
    inner = ", ".join(waiters) or "?"
    return f"{type(future).__name__} awaited by {inner}"


def _awaited_by_future(future: asyncio.Future[Any]) -> list[str]:
    names = []
    for callback in getattr(future, "_callbacks", None) or ():
        fn = callback[0] if isinstance(callback, tuple) else callback
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, asyncio.Task):
            names.append(owner.get_name())
    return names


def _describe(
    task: asyncio.Task[Any],
    meta: Any,  # noqa: ANN401 - its TaskMetadata, or None
    record: Any,  # noqa: ANN401 - its TaskRecord, or None
    created: int | None,
    now_ns: int,
    *,
    trace_id: int,
    graph: bool,
) -> dict[str, Any]:
    info: dict[str, Any] = {
        "id": f"{id(task):x}",  # names need not be unique (3.13 names factory tasks "None")
        "name": task.get_name(),
        "operation": meta.operation_name if meta is not None else None,
        "correlation_id": meta.correlation_id if meta is not None else None,
        "priority_hint": meta.priority_hint if meta is not None else None,
        "trace_id": f"{trace_id:032x}" if trace_id else None,
        "age_s": round((now_ns - created) / 1e9, 6) if created is not None else None,
        # waiting on a future, or scheduled to run (read between steps, on the loop's thread)
        "state": "waiting" if getattr(task, "_fut_waiter", None) is not None else "scheduled",
        "coroutine": getattr(task.get_coro(), "__qualname__", None),
        "waiting_in": _where(task),
        "created_at": record.site if record is not None else None,
    }
    if graph:
        waiters = _awaited_by(task)
        info["awaited_by"] = [_label(f) for f in waiters]
        info["awaited_by_ids"] = [f"{id(f):x}" for f in waiters]
    return info


class _Reader:
    """Reads one loop's tasks on its own thread, ``SLICE`` at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, query: TaskQuery) -> None:
        self.loop = loop
        self.query = query
        self.result: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self.groups: dict[str | None, list[Any]] = {}  # operation -> [count, oldest age]
        self.listed: list[dict[str, Any]] = []
        self.matched = 0
        self.total = 0

    def start(self) -> None:
        starts = lean_starts(self.loop)
        now_ns = time.perf_counter_ns()

        def visit(task: asyncio.Task[Any]) -> None:
            self.total += 1
            if not task.done():
                self._take(task, now_ns, starts)

        walk_tasks(self.loop, visit, self._finish, self._failed)

    def _failed(self, exc: BaseException) -> None:
        if not self.result.done():
            self.result.set_exception(exc)

    def _take(self, task: asyncio.Task[Any], now_ns: int, starts: Any) -> None:  # noqa: ANN401
        query = self.query
        meta = task_metadata(task)
        operation = meta.operation_name if meta is not None else None
        cid = meta.correlation_id if meta is not None else None
        if query.operation is not None and operation != query.operation:
            return
        if query.correlation_id is not None and cid != query.correlation_id:
            return
        self.matched += 1
        record = task_record(task)
        created, trace_id = started_of(task, record, starts)
        if len(self.listed) < query.limit:
            self.listed.append(
                _describe(task, meta, record, created, now_ns, trace_id=trace_id, graph=query.graph)
            )
        age = (now_ns - created) / 1e9 if created is not None else None
        group = self.groups.setdefault(operation, [0, None])
        group[0] += 1
        if age is not None and (group[1] is None or age > group[1]):
            group[1] = age

    def _finish(self) -> None:
        groups = [
            {
                "operation": op,
                "count": count,
                "oldest_age_s": round(oldest, 6) if oldest is not None else None,
            }
            for op, (count, oldest) in sorted(
                self.groups.items(), key=lambda item: (-item[1][0], str(item[0]))
            )
        ]
        self.listed.sort(key=lambda t: -(t["age_s"] or 0.0))
        self.result.set_result(
            {
                "loop": repr(self.loop),
                "tasks_in_flight": self.matched,
                "tasks_total": self.total,
                "groups": groups,
                "tasks": self.listed,
                "truncated": self.matched > len(self.listed),
            }
        )


def snapshot(query: TaskQuery, timeout_s: float = READ_TIMEOUT_S) -> dict[str, Any]:
    """The view of every instrumented loop (read on each loop's thread)."""
    loops = []
    readers = []
    for loop in instrumented_loops():
        if not loop.is_running():
            loops.append({"loop": repr(loop), "error": "not running"})
            continue
        reader = _Reader(loop, query)
        try:
            loop.call_soon_threadsafe(reader.start)
        except RuntimeError:  # closed meanwhile
            continue
        readers.append(reader)
    deadline = time.monotonic() + timeout_s
    for reader in readers:
        try:
            loops.append(reader.result.result(max(0.0, deadline - time.monotonic())))
        except concurrent.futures.TimeoutError:
            loops.append(
                {"loop": repr(reader.loop), "error": f"no answer within {timeout_s} s (blocked?)"}
            )
        except Exception as exc:
            loops.append({"loop": repr(reader.loop), "error": f"{type(exc).__name__}: {exc}"})
    return {
        "generated_at": time.time(),
        "python": sys.version.split()[0],
        "thread": threading.current_thread().name,
        "loops": loops,
    }


_WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], list[bytes]]


def _respond(
    start_response: Callable[..., Any], status: str, content_type: str, body: bytes
) -> list[bytes]:
    # Vary: /tasks answers a browser with the page and anyone else with JSON.
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Vary", "Accept"),
    ]
    start_response(status, headers)
    return [body]


def tasks_app(metrics_app: _WSGIApp) -> _WSGIApp:
    """Serve ``/tasks`` (JSON, or the page to a browser) and ``/tasks.html``; the rest: metrics."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO")
        if path not in ("/tasks", "/tasks.html"):
            return metrics_app(environ, start_response)
        if path == "/tasks.html" or wants_html(environ.get("HTTP_ACCEPT", "")):
            return _respond(start_response, "200 OK", "text/html; charset=utf-8", PAGE.encode())
        try:
            query = TaskQuery.from_query_string(environ.get("QUERY_STRING", ""))
        except ValueError as exc:
            body = json.dumps({"error": str(exc)}).encode()
            return _respond(start_response, "400 Bad Request", "application/json", body)
        body = json.dumps(snapshot(query)).encode()
        return _respond(start_response, "200 OK", "application/json", body)

    return app
