"""Every Python code block in README.md and docs/ runs, as a whole script, on this Python.

Conventions for the blocks:

- a block fenced as ``python`` is a complete script: it runs in a fresh interpreter (in an
  empty folder, without the ``OTEL_*`` environment) and must exit 0;
- a block whose first line is ``# Python 3.N+`` is skipped on older Pythons;
- an API signature is fenced as ``python signature``: it is shown, not run, and must name an
  ``asynctrace.`` call.

Shell blocks (``make demo``, ``make test``, the benchmark) are commands CI runs itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```\s*$", re.DOTALL | re.MULTILINE)
MIN_VERSION = re.compile(r"#\s*Python\s+3\.(\d+)\+")


def python_blocks() -> list[tuple[str, str, str]]:
    blocks = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            info = match["info"].split()
            if info[:1] != ["python"]:
                continue
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((f"{path.name}:{line}", " ".join(info[1:]), match["body"]))
    return blocks


BLOCKS = python_blocks()


def test_the_docs_have_runnable_blocks() -> None:
    """The extraction finds the blocks (so a broken pattern cannot make this file pass)."""
    assert sum(1 for _, tag, _ in BLOCKS if tag == "") >= 8
    assert all(tag in ("", "signature") for _, tag, _ in BLOCKS), BLOCKS


@pytest.mark.parametrize(("where", "tag", "body"), BLOCKS, ids=[where for where, _, _ in BLOCKS])
def test_block_runs(where: str, tag: str, body: str, tmp_path: Path) -> None:
    """The block runs to completion (or is a signature naming an asynctrace call)."""
    if tag == "signature":
        assert body.lstrip().startswith("asynctrace."), where
        return
    first = body.lstrip().splitlines()[0]
    needed = MIN_VERSION.match(first)
    if needed and sys.version_info < (3, int(needed[1])):
        pytest.skip(f"{where} needs Python 3.{needed[1]}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-c", body],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{where} failed:\n{result.stderr[-3000:]}"
