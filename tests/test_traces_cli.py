"""`python -m asynctrace traces FILE`: trace trees from a real traces file, with filters."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MAKE_FILE = textwrap.dedent(
    """
    import asyncio, sys, asynctrace

    async def ok():
        await asyncio.sleep(0.01)

    async def slow():
        await asyncio.sleep(0.08)

    async def bad():
        raise ValueError("bad doc 7")

    async def main():
        with asynctrace.correlation("req-1", span_name="POST /ingest"):
            await asyncio.gather(asynctrace.create_task(ok(), operation_name="fetch"),
                                 asynctrace.create_task(slow(), operation_name="normalize"))
        with asynctrace.correlation("req-2", span_name="POST /ingest"):
            try:
                await asynctrace.create_task(bad(), operation_name="normalize")
            except ValueError:
                pass

    asynctrace.install(traces_file=sys.argv[1], metrics=False)
    asyncio.run(main())
    asynctrace.shutdown()
    """
)


@pytest.fixture(scope="module")
def traces_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("traces") / "traces.jsonl"
    subprocess.run([sys.executable, "-c", MAKE_FILE, str(path)], check=True, timeout=60)
    return path


def traces(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asynctrace", "traces", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_prints_each_trace_as_a_tree(traces_file: Path) -> None:
    result = traces(str(traces_file))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "correlation_id=req-1" in out
    assert "correlation_id=req-2  1 error(s)" in out
    block = out[out.index("correlation_id=req-1") :].split("\n\n")[0]
    assert "└─ POST /ingest" in block
    assert "├─ fetch" in block
    assert "└─ normalize" in block
    assert "ERROR ValueError: bad doc 7" in out


def test_filters(traces_file: Path) -> None:
    errors = traces(str(traces_file), "--errors").stdout
    assert "req-2" in errors
    assert "req-1" not in errors
    one = traces(str(traces_file), "--correlation-id", "req-1").stdout
    assert one.count("\ntrace ") + one.startswith("trace ") == 1
    assert "req-1" in one
    # the two slow ones (the 80 ms request, and the main task around both), not the 1 ms one
    slowest = traces(str(traces_file), "--slowest", "2").stdout
    assert slowest.count("trace ") == 2
    assert "req-1" in slowest
    assert "req-2" not in slowest


def test_no_match_and_bad_input(traces_file: Path, tmp_path: Path) -> None:
    none = traces(str(traces_file), "--correlation-id", "nope")
    assert none.returncode == 1
    assert "no trace in" in none.stderr
    missing = traces(str(tmp_path / "missing.jsonl"))
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr
    assert "missing.jsonl" in missing.stderr
    zero = traces(str(traces_file), "--slowest", "0")
    assert zero.returncode == 2
    assert "--slowest 0: expected N >= 1" in zero.stderr
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not json\n[1, 2]\n")
    assert traces(str(garbage)).returncode == 1  # skipped lines, nothing to show
