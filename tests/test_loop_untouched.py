"""asyncio's own loop code keeps its speed under asynctrace: what it changes on the loop is small.

Two costs asynctrace once put on every task without adding any work of its own:

- Reading the loop's instance dict (``vars(loop)``) turns the loop's attribute storage into a
  dictionary for good, and the interpreter's specialised attribute reads in asyncio's loop
  code (``self._debug``, ``self._ready`` ...) stop working for it: about 10% of a queue
  workload's CPU. The check is the interpreter's own: the adaptive instructions of
  ``BaseEventLoop.call_soon`` after the loop has run a few thousand tasks.
- The loop monitor's watchdog woke every 25-50 ms; each wake makes the loop's thread hand
  the GIL over at its next ``select()`` only after the switch interval, waking the waiting
  thread for nothing meanwhile: another 11% of the same workload. It now wakes when a
  heartbeat is due.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading

import pytest
from prometheus_client import CollectorRegistry

import asynctrace
from asynctrace.sinks import loop_monitor

_SCRIPT = textwrap.dedent(
    """
    import asyncio, dis, sys
    from asyncio import base_events

    how = sys.argv[1]

    async def work(n):
        queue = asyncio.Queue(16)

        async def consume():
            while (item := await queue.get()) is not None:
                await asyncio.create_task(asyncio.sleep(0, item))

        consumers = [asyncio.create_task(consume()) for _ in range(2)]
        for i in range(n):
            await queue.put(i)
        for _ in consumers:
            await queue.put(None)
        await asyncio.gather(*consumers)

    async def main():
        loop = asyncio.get_running_loop()
        if how == "vars":
            vars(loop)  # the control: what asynctrace must not do
        elif how != "bare":
            from prometheus_client import CollectorRegistry
            import asynctrace

            asynctrace.install(registry=CollectorRegistry())
            await work(500)
            if how == "uninstalled":
                asynctrace.uninstall()
        await work(3000)

    asyncio.run(main())
    code = base_events.BaseEventLoop.call_soon
    print(" ".join(i.opname for i in dis.get_instructions(code, adaptive=True)))
    """
)


def _call_soon_opnames(how: str) -> list[str]:
    env = {**os.environ, "ASYNCTRACE_TAP": "1"}  # the tap in both implementations
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, how],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(
    sys.implementation.name != "cpython", reason="CPython's specialising interpreter"
)
@pytest.mark.parametrize("how", ["installed", "uninstalled"])
def test_asyncio_loop_attribute_reads_stay_specialised(how: str) -> None:
    """The tap and the close watch are set with setattr; the loop's dict is never read."""
    if "LOAD_ATTR_INSTANCE_VALUE" not in _call_soon_opnames("bare"):
        pytest.skip("this interpreter does not specialise call_soon's attribute reads")
    if "LOAD_ATTR_INSTANCE_VALUE" in _call_soon_opnames("vars"):
        pytest.skip("vars(loop) costs this interpreter nothing (3.13 keeps the inline values)")
    assert "LOAD_ATTR_INSTANCE_VALUE" in _call_soon_opnames(how)


class _CountingEvent(threading.Event):
    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return super().wait(timeout)


def test_watchdog_wakes_at_the_heartbeats_pace() -> None:
    """0.25 s heartbeats, 0.1 s threshold: the watchdog wakes about 4 times a second, not 20."""
    from asynctrace._state import STATE  # noqa: PLC0415

    stop = _CountingEvent()

    async def main() -> None:
        asynctrace.install(registry=CollectorRegistry(), lag_interval=0.25, blocked_threshold=0.1)
        hooks = STATE.hooks
        assert hooks is not None
        [monitor] = [i for i in hooks.instruments if isinstance(i, loop_monitor.LoopMonitor)]
        monitor._stop = stop  # the watchdog's next waits are on this one
        await asyncio.sleep(1.5)

    asyncio.run(main())
    asynctrace.uninstall()
    # 1.5 s at the heartbeat's pace: 6 or 7 wakes (the old 50 ms period: 30).
    assert 3 <= stop.waits <= 12, stop.waits


def test_a_blocked_loop_is_seen_within_the_threshold_of_its_due_beat() -> None:
    """Sleeping until the beat is due still sees a block while it lasts, and only once."""
    registry = CollectorRegistry()
    seen: list[float] = []

    async def main() -> None:
        asynctrace.install(registry=registry, lag_interval=0.2, blocked_threshold=0.1)
        await asyncio.sleep(0.45)  # a few beats; then blocked for longer than 2 periods
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < 0.8:
            seen.append(asynctrace_blocked(registry))
            threading.Event().wait(0.05)
        await asyncio.sleep(0.3)

    asyncio.run(main())
    asynctrace.uninstall()
    assert seen[0] == 0
    assert seen[-1] == 1  # counted while the loop was still blocked, once


def asynctrace_blocked(registry: CollectorRegistry) -> float | None:
    """asynctrace_event_loop_blocked_total for the unknown operation (no task running)."""
    return registry.get_sample_value(
        "asynctrace_event_loop_blocked_total", {"operation": "unknown"}
    )
