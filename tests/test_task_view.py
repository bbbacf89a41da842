"""The live task view: GET /tasks beside /metrics, and `python -m asynctrace ps|tree|top`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import asynctrace
from asynctrace.export import tasks as task_view


async def _get(url: str) -> tuple[int, dict[str, Any]]:
    def read() -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            with e:
                return e.code, json.loads(e.read())

    return await asyncio.to_thread(read)


async def leaf(ev: asyncio.Event) -> None:
    await ev.wait()


async def parent(ev: asyncio.Event) -> None:
    async with asyncio.TaskGroup() as tg:
        tg.create_task(leaf(ev), name="child-1")
        tg.create_task(leaf(ev), name="child-2")


@pytest.mark.asyncio
async def test_tasks_json_shape_filters_and_graph() -> None:
    asynctrace.install(registry=CollectorRegistry(), prometheus_port=0, loop_monitor=False)
    base = asynctrace.summary().metrics_url.replace("/metrics", "/tasks")
    ev = asyncio.Event()
    with asynctrace.correlation("req-5"):
        handler = asynctrace.create_task(parent(ev), operation_name="handle", name="handler")
    with asynctrace.correlation("req-6"):
        fetches = [asynctrace.create_task(leaf(ev), operation_name="fetch") for _ in range(3)]
    await asyncio.sleep(0.01)
    try:
        status, view = await _get(base + "?graph=1")
        assert status == 200
        (loop,) = view["loops"]
        assert loop["tasks_in_flight"] == 7  # and this test's own task
        groups = {g["operation"]: g for g in loop["groups"]}
        assert groups["fetch"]["count"] == 3
        assert groups["handle"]["count"] == 1
        assert groups[None]["count"] == 3  # the task group's children, this test's task
        assert groups["fetch"]["oldest_age_s"] > 0
        by_name = {t["name"]: t for t in loop["tasks"]}
        handler_view = by_name["handler"]
        assert handler_view["operation"] == "handle"
        assert handler_view["correlation_id"] == "req-5"
        assert handler_view["state"] == "waiting"
        assert handler_view["coroutine"] == "parent"
        assert handler_view["waiting_in"].startswith(("TaskGroup.__aexit__", "TaskGroup._aexit"))
        assert by_name["child-1"]["correlation_id"] == "req-5"
        assert by_name["child-1"]["awaited_by"] == ["handler"]  # who awaits whom
        assert by_name["child-1"]["awaited_by_ids"] == [handler_view["id"]]
        assert by_name["child-1"]["waiting_in"].startswith("Event.wait")

        _, only = await _get(base + "?operation=fetch")
        assert {t["operation"] for t in only["loops"][0]["tasks"]} == {"fetch"}
        _, by_id = await _get(base + "?correlation_id=req-5&limit=1")
        (loop,) = by_id["loops"]
        assert loop["tasks_in_flight"] == 3
        assert len(loop["tasks"]) == 1
        assert loop["truncated"] is True

        status, error = await _get(base + "?limit=x")
        assert status == 400
        assert "Invalid limit: 'x'; expected 0 to 10000" in error["error"]
        status, error = await _get(base + "?opertion=fetch")
        assert status == 400
        assert "Invalid parameter(s) ['opertion']" in error["error"]
    finally:
        ev.set()
        await handler
        await asyncio.gather(*fetches)
        asynctrace.uninstall()


@pytest.mark.asyncio
async def test_a_large_view_is_read_in_slices() -> None:
    """20,000 tasks in flight: read SLICE at a time, the loop turning between slices."""
    asynctrace.install(registry=CollectorRegistry(), prometheus_port=0, loop_monitor=False)
    base = asynctrace.summary().metrics_url.replace("/metrics", "/tasks")
    ev = asyncio.Event()
    tasks = [asynctrace.create_task(leaf(ev), operation_name="bulk") for _ in range(20_000)]
    turns = 0
    stop = False
    loop = asyncio.get_running_loop()

    def tick() -> None:
        nonlocal turns
        turns += 1
        if not stop:
            loop.call_soon(tick)

    try:
        await asyncio.sleep(0)
        loop.call_soon(tick)
        before = turns
        status, view = await _get(base + "?limit=10")
        during = turns - before
        stop = True
        assert status == 200
        (loop_view,) = view["loops"]
        assert loop_view["tasks_in_flight"] == 20_001  # and this test's own task
        assert len(loop_view["tasks"]) == 10
        assert loop_view["groups"][0] == {
            "operation": "bulk",
            "count": 20_000,
            "oldest_age_s": loop_view["groups"][0]["oldest_age_s"],
        }
        assert during >= 20_000 // task_view.SLICE - 1  # other callbacks ran between slices
    finally:
        stop = True
        ev.set()
        await asyncio.gather(*tasks)
        asynctrace.uninstall()


APP = textwrap.dedent(
    """
    import asyncio, sys, asynctrace
    from prometheus_client import CollectorRegistry

    async def fetch_one(ev):
        await ev.wait()

    async def handle(ev):
        async with asyncio.TaskGroup() as tg:
            for _ in range(2):
                tg.create_task(fetch_one(ev))

    async def main():
        asynctrace.install(registry=CollectorRegistry(), prometheus_port=0)
        ev = asyncio.Event()
        with asynctrace.correlation("req-live"):
            task = asynctrace.create_task(handle(ev), operation_name="handle", name="handler")
        print(asynctrace.summary().metrics_url, flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        ev.set()
        await task

    asyncio.run(main())
    """
)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asynctrace", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_cli_against_a_live_app() -> None:
    app = subprocess.Popen(
        [sys.executable, "-c", APP], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert app.stdout is not None
        assert app.stdin is not None
        url = app.stdout.readline().strip()
        assert url.endswith("/metrics")
        ps = _cli("ps", url)
        assert ps.returncode == 0, ps.stderr
        assert "loop 0: 4 task(s) in flight" in ps.stdout  # and the main task
        assert "handler" in ps.stdout
        assert "req-live" in ps.stdout
        assert "TaskGroup." in ps.stdout  # __aexit__, or _aexit on 3.14
        tree = _cli("tree", url)
        assert tree.returncode == 0, tree.stderr
        lines = tree.stdout.splitlines()
        handler_line = next(i for i, line in enumerate(lines) if "handler [handle" in line)
        below = [line for line in lines[handler_line + 1 :] if line.startswith("    ")]
        assert len(below) == 2  # both children, indented under the handler
        assert all("[- req-live]" in line and "Event.wait" in line for line in below)
        top = _cli("top", url, "--iterations", "2", "--interval", "0.1", "--operation", "handle")
        assert top.returncode == 0, top.stderr
        assert top.stdout.count("asynctrace top") == 2
        assert "Event.wait" not in top.stdout  # only the handler: filtered by operation
        app.stdin.write("\n")
        app.stdin.flush()
        assert app.wait(30) == 0
    finally:
        if app.poll() is None:
            app.kill()
            app.wait(10)
        for stream in (app.stdin, app.stdout):
            if stream is not None:
                stream.close()


def test_cli_bad_input() -> None:
    bad = _cli("ps", "ftp://x")
    assert bad.returncode == 2
    assert "Invalid URL: 'ftp://x'" in bad.stderr
    closed = _cli("ps", "http://127.0.0.1:9/metrics")
    assert closed.returncode == 2
    assert "cannot read http://127.0.0.1:9/tasks" in closed.stderr
