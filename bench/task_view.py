"""What reading the live task view costs with many tasks in flight (issue: task health).

    python bench/task_view.py [--tasks 100000] [--limit 100] [--repeat 5]

N tasks wait on an event; /tasks is read from another thread while a 5 ms probe timer runs on
the loop. Prints the request's wall time and the probe's worst delay during the request,
median over the repeats, against the same probe with no request (the loop's own noise).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import urllib.request

from prometheus_client import CollectorRegistry

import asynctrace


async def measure(n: int, limit: int, repeat: int) -> None:
    asynctrace.install(registry=CollectorRegistry(), prometheus_port=0, loop_monitor=False)
    url = asynctrace.summary().metrics_url.replace("/metrics", f"/tasks?limit={limit}")
    ev = asyncio.Event()

    async def waiter() -> None:
        await ev.wait()

    tasks = [asyncio.create_task(waiter()) for _ in range(n)]
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()

    async def probe_during(action: object) -> tuple[float, float]:
        lags: list[float] = []
        stop = False

        def tick(expected: float) -> None:
            lags.append(loop.time() - expected)
            if not stop:
                loop.call_at(loop.time() + 0.005, tick, loop.time() + 0.005)

        loop.call_at(loop.time() + 0.005, tick, loop.time() + 0.005)
        start = time.perf_counter()
        await action()  # type: ignore[operator]
        took = time.perf_counter() - start
        stop = True
        await asyncio.sleep(0.01)
        return took * 1e3, max(lags, default=0.0) * 1e3

    def read() -> bytes:
        with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - our http URL
            return r.read()

    requests, idle = [], []
    for _ in range(repeat):
        requests.append(await probe_during(lambda: asyncio.to_thread(read)))
        idle.append(await probe_during(lambda: asyncio.sleep(requests[-1][0] / 1e3)))
    print(f"{n} tasks in flight, limit={limit}, median of {repeat}:")
    print(f"  request: {statistics.median(r[0] for r in requests):.1f} ms; worst probe delay "
          f"during it {statistics.median(r[1] for r in requests):.1f} ms")  # fmt: skip
    idle_lag = statistics.median(r[1] for r in idle)
    print(f"  no request (same time): worst probe delay {idle_lag:.1f} ms")
    ev.set()
    await asyncio.gather(*tasks)
    asynctrace.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(measure(args.tasks, args.limit, args.repeat))


if __name__ == "__main__":
    main()
