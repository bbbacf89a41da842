"""The benchmark's report: medians over rounds, ratios to bare asyncio, the table, the guard."""

from __future__ import annotations

import statistics
from typing import Any

# The published targets (docs/performance.md), and the coarse CI guard (far above them:
# noise never fails CI, a gross regression does).
TARGETS = {"asynctrace-metrics": 1.25, "asynctrace-tracing": 2.0}
GUARD = {"asynctrace-metrics": 5.0, "asynctrace-tracing": 10.0}


def summarize(rounds: dict[str, list[dict[str, Any]]], workloads: list[str]) -> dict[str, Any]:
    """Per mode and workload: the median over rounds, and the CPU ratio to bare asyncio."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for mode, results in rounds.items():
        for wl in workloads:
            vals = [res[wl] for res in results if wl in res]
            if vals:
                table.setdefault(mode, {})[wl] = {
                    "wall_us": statistics.median(v["wall_us"] for v in vals),
                    "cpu_us": statistics.median(v["cpu_us"] for v in vals),
                }
    bare = table.get("bare", {})
    for row in table.values():
        for wl, cell in row.items():
            if wl in bare:
                cell["ratio_cpu"] = cell["cpu_us"] / bare[wl]["cpu_us"]
                cell["added_cpu_us"] = cell["cpu_us"] - bare[wl]["cpu_us"]
    return table


def render(table: dict[str, Any], workloads: list[str], env: dict[str, Any]) -> str:
    title = (
        f"Python {env['python']} ({'GIL' if env['gil'] else 'free-threaded'}), loop "
        f"{env['loop']}, {env['tasks']} tasks, {env['rounds']} interleaved rounds; "
        "CPU µs per task (ratio to bare)"
    )
    lines = [
        title,
        f"{'mode':<22}" + "".join(f"{wl:>18}" for wl in workloads),
    ]
    for mode, row in table.items():
        cells = []
        for wl in workloads:
            cell = row.get(wl)
            if cell is None:
                cells.append(f"{'n/a':>18}")
            else:
                ratio = cell.get("ratio_cpu")
                text = f"{cell['cpu_us']:.2f}" + (f" ({ratio:.2f}x)" if ratio else "")
                cells.append(f"{text:>18}")
        lines.append(f"{mode:<22}" + "".join(cells))
    return "\n".join(lines)


def guard(table: dict[str, Any]) -> int:
    failed = []
    for mode, limit in GUARD.items():
        for wl, cell in table.get(mode, {}).items():
            ratio = cell.get("ratio_cpu")
            if ratio is not None and ratio > limit:
                failed.append(f"{mode}/{wl}: {ratio:.2f}x > guard {limit}x")
    if failed:
        print("GUARD FAILED (gross regression):\n  " + "\n  ".join(failed))
        return 1
    print(f"guard ok (limits {GUARD}; targets {TARGETS})")
    return 0
