"""Plot CPU cost per task per mode from bench/results/*.json into docs/performance/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "docs" / "performance"
sys.path.insert(0, str(HERE))
from modes import MODES  # noqa: E402 - bench/ is not a package: its own directory first


def _color(mode: str) -> object:
    """The mode's colour, the same in each panel (uvloop's runs leave some modes out)."""
    palette = [*plt.rcParams["axes.prop_cycle"].by_key()["color"], "black", "gold"]
    try:
        index = MODES.index(mode)
    except ValueError:
        index = sum(map(ord, mode))  # a mode not in the list: some fixed colour
    return palette[index % len(palette)]


def main() -> int:
    files = sorted(p for p in (HERE / "results").glob("bench-*.json") if "quick" not in p.name)
    if not files:
        print("no full results in bench/results/; run `make bench` first", file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(files), 1, figsize=(11, 3.6 * len(files)), squeeze=False)
    for ax, path in zip(axes[:, 0], files, strict=True):
        data = json.loads(path.read_text())
        table, env = data["table"], data["env"]
        modes = list(table)
        workloads = [w for w in ("fanout", "tree", "queue", "eager", "http")
                     if any(w in table[m] for m in modes)]  # fmt: skip
        width = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            values = [table[mode].get(w, {}).get("cpu_us", 0) for w in workloads]
            ax.bar(
                [x + i * width for x in range(len(workloads))],
                values,
                width,
                label=mode,
                color=_color(mode),  # one colour per mode in every panel, whatever modes ran
            )
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(workloads))], workloads)
        ax.set_ylabel("CPU µs per task")
        ax.set_title(f"Python {env['python']}, {env['loop']} loop, {env['tasks']} tasks")
        ax.legend(fontsize=7, ncol=3)
        (OUT / path.name).write_text(path.read_text())  # the numbers beside the plot
    fig.tight_layout()
    fig.savefig(OUT / "cost-per-task.png", dpi=110)
    print(f"written: {OUT / 'cost-per-task.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
