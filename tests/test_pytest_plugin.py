"""The pytest plugin, run by pytest's own pytester in a fresh pytest process."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

TESTS = """
import asyncio, time
import pytest
import asynctrace
from asynctrace._install import configured_options


async def work():
    await asyncio.sleep(0)


async def boom():
    raise ValueError("lost")


async def test_capture(asynctrace_capture):
    with asynctrace.correlation("req-1"):
        await asyncio.gather(asynctrace.create_task(work(), operation_name="fetch"),
                             asynctrace.create_task(work(), operation_name="fetch"))
    await asyncio.sleep(0)
    fetches = [r for r in asynctrace_capture.records if r.metadata.operation_name == "fetch"]
    assert len(fetches) == 2
    assert {r.outcome for r in fetches} == {"finished"}
    assert [s.name for s in asynctrace_capture.spans].count("fetch") == 2
    assert asynctrace_capture.sample("asynctrace_tasks_created_total",
                                     {"operation": "fetch"}) == 2


def test_nothing_left_installed():
    assert configured_options() is None


@pytest.mark.asynctrace
async def test_leaks_a_task():
    asynctrace.create_task(asyncio.sleep(30), operation_name="forgotten")
    await asyncio.sleep(0)


@pytest.mark.asynctrace
async def test_never_retrieves():
    asynctrace.create_task(boom(), operation_name="dropped")
    await asyncio.sleep(0.01)


@pytest.mark.asynctrace(max_block_ms=50)
async def test_blocks_the_loop():
    await asyncio.sleep(0.05)
    time.sleep(0.4)
    await asyncio.sleep(0.2)


@pytest.mark.asynctrace(max_block_ms=200)
async def test_clean():
    await asyncio.gather(work(), work())


@pytest.mark.asynctrace(leaks=False, never_retrieved=False)
async def test_leak_allowed():
    asynctrace.create_task(asyncio.sleep(30))
    await asyncio.sleep(0)


@pytest.mark.asynctrace(leak=True)
async def test_misspelled_option():
    pass


async def stuck_forever():
    await asyncio.Event().wait()


@pytest.mark.asynctrace(timeout=0.3)
async def test_hangs():
    await asynctrace.create_task(stuck_forever(), operation_name="stuck",
                                 correlation_id="req-hang")
"""


def test_plugin(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(test_plugin_cases=TESTS)
    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider", timeout=120)
    result.stdout.fnmatch_lines(
        [
            "*test_capture PASSED*",
            "*test_nothing_left_installed PASSED*",
            "*test_leaks_a_task ERROR*",
            "*test_never_retrieves ERROR*",
            "*test_blocks_the_loop ERROR*",
            "*test_clean PASSED*",
            "*test_leak_allowed PASSED*",
            "*test_misspelled_option ERROR*",
            "*test_hangs FAILED*",
        ],
        consecutive=False,
    )
    out = result.stdout.str()
    assert "1 task(s) still pending" in out
    assert "'forgotten'" in out
    assert "1 exception(s) never retrieved" in out
    assert "'dropped'" in out
    assert "blocked longer than 50 ms" in out
    assert "unknown option(s) ['leak']" in out
    assert "the test timed out after 0.3 s; its tasks then, with their ids:" in out
    assert "operation 'stuck', correlation_id 'req-hang'" in out
    assert "stuck_forever" in out  # where it waits
