"""A small fan-out: metadata and correlation ids flowing through tasks.

Run with `make demo`. Shows, for two "requests", each task's operation, correlation id and
priority, read from inside the task, and that a child task inherits its parent's id.
"""

from __future__ import annotations

import asyncio
import random

import asynctrace


async def normalize(source: str, doc: str) -> str:
    meta = asynctrace.task_metadata()
    await asyncio.sleep(random.uniform(0.001, 0.01))
    child = await asyncio.create_task(checksum(doc))
    if meta is None:
        raise RuntimeError("asynctrace is not installed")
    print(
        f"  {meta.operation_name:<10} source={source:<6} "
        f"correlation_id={asynctrace.correlation_id()} priority={meta.priority_hint} "
        f"child_saw={child}"
    )
    return doc.upper()


async def checksum(doc: str) -> str | None:  # noqa: ARG001 - the demo only shows the id
    await asyncio.sleep(0)
    return asynctrace.correlation_id()


async def handle_request(request_id: str, docs: dict[str, str]) -> list[str]:
    with asynctrace.correlation(request_id):
        tasks = [
            asynctrace.create_task(
                normalize(source, doc),
                operation_name="normalize",
                priority_hint=i,
                name=f"normalize-{source}",
            )
            for i, (source, doc) in enumerate(docs.items())
        ]
        return await asyncio.gather(*tasks)  # results keep argument order


async def main() -> None:
    docs = {"crm": "alpha", "web": "beta", "mobile": "gamma"}
    for request_id in ("req-1", "req-2"):
        print(f"request {request_id}:")
        print(f"  results: {await handle_request(request_id, docs)}")
    orphan = asyncio.create_task(checksum("x"))
    print(f"outside any request, tasks carry the id generated for main(): {await orphan}")


if __name__ == "__main__":
    asynctrace.install()
    asyncio.run(main())
