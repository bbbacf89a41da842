"""A load generator for the ingestion service: batches of documents from several sources.

Half the requests carry ``X-Request-ID``, a quarter a W3C ``traceparent`` (the service
continues that trace), the rest neither (the service makes an id).

    python examples/ingestion_service/load.py --url http://127.0.0.1:8080 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

SOURCES = ("crm", "web", "mobile", "partner")


@dataclass
class LoadStats:
    """What the load generator saw."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failed_sources: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    request_ids: list[str] = field(default_factory=list)


def make_batch(n: int) -> dict[str, object]:
    """A batch of ``n`` documents from random sources."""
    return {
        "documents": [
            {
                "source": random.choice(SOURCES),
                "id": f"doc-{random.getrandbits(32):08x}",
                "body": "  Some   Text " * random.randint(1, 20),
            }
            for _ in range(n)
        ]
    }


def headers_for(i: int) -> dict[str, str]:
    """X-Request-ID, traceparent or nothing, in turn."""
    if i % 4 in (0, 1):
        return {"X-Request-ID": f"load-{i}-{random.getrandbits(24):06x}"}
    if i % 4 == 2:  # noqa: PLR2004
        trace_id, span_id = random.getrandbits(128), random.getrandbits(64)
        return {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-01"}
    return {}


async def run_load(url: str, duration: float, rate: float, concurrency: int = 8,
                   stop: asyncio.Event | None = None) -> LoadStats:  # fmt: skip
    """Send batches to ``url``/ingest at about ``rate`` requests/s for ``duration`` s."""
    stats = LoadStats()
    deadline = time.monotonic() + duration
    stop = stop or asyncio.Event()
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(i: int) -> None:
            async with sem:
                try:
                    async with session.post(
                        f"{url}/ingest", json=make_batch(random.randint(2, 12)),
                        headers=headers_for(i),
                    ) as resp:  # fmt: skip
                        body = await resp.json()
                        stats.statuses[resp.status] += 1
                        stats.failed_sources.update(body.get("failed_sources", []))
                        stats.request_ids.append(resp.headers.get("X-Request-ID", ""))
                except (aiohttp.ClientError, TimeoutError):
                    stats.errors += 1
                stats.requests += 1

        pending: set[asyncio.Task[None]] = set()
        i = 0
        while time.monotonic() < deadline and not stop.is_set():
            task = asyncio.create_task(one(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
            await asyncio.sleep(1 / rate)
        if pending:
            await asyncio.gather(*pending)
    return stats


def main() -> int:
    """Run the load and print what it saw."""
    parser = argparse.ArgumentParser(description="Load for the ingestion service.")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=50.0)
    args = parser.parse_args()
    stats = asyncio.run(run_load(args.url, args.duration, args.rate))
    print(f"{stats.requests} requests, statuses {dict(stats.statuses)}, errors {stats.errors}, "
          f"failed sources {dict(stats.failed_sources)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
