"""``python -m asynctrace ps|tree|top URL``: the live task view (``/tasks``) in a terminal.

URL is the app's metrics address (``http://127.0.0.1:9464/metrics``, or the server's base
URL): the view is read from ``/tasks`` beside it. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, TextIO

__all__ = ["add_arguments", "main", "tasks_url"]


def tasks_url(url: str, **params: object) -> str:
    """The ``/tasks`` URL beside the metrics address ``url``, with query ``params``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"Invalid URL: {url!r}; expected the app's http:// metrics address.")
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/tasks", query, ""))


def fetch(url: str, timeout: float = 10.0) -> dict[str, Any]:
    """The view as JSON."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) only
        return json.loads(response.read())  # type: ignore[no-any-return]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.1f}s"


def render_ps(view: dict[str, Any], out: TextIO) -> None:
    """Per loop: the groups by operation, then one line per task (oldest first)."""
    for i, loop in enumerate(view.get("loops", [])):
        if "error" in loop:
            out.write(f"loop {i}: {loop['error']}\n")
            continue
        out.write(f"loop {i}: {loop['tasks_in_flight']} task(s) in flight\n")
        for group in loop["groups"]:
            operation = group["operation"] or "-"
            out.write(
                f"  {operation:<24} {group['count']:>7}   oldest {_age(group['oldest_age_s'])}\n"
            )
        out.write(f"  {'NAME':<14} {'OPERATION':<18} {'CORRELATION_ID':<34} {'AGE':>8} "
                  f"{'STATE':<9} WAITING IN\n")  # fmt: skip
        out.writelines(
            f"  {task['name']:<14} {(task['operation'] or '-'):<18} "
            f"{(task['correlation_id'] or '-'):<34} {_age(task['age_s']):>8} "
            f"{task['state']:<9} {task['waiting_in'] or '-'}\n"
            for task in loop["tasks"]
        )
        if loop.get("truncated"):
            out.write(f"  ... {loop['tasks_in_flight'] - len(loop['tasks'])} more (--limit)\n")


def render_tree(view: dict[str, Any], out: TextIO) -> None:
    """Per loop: who awaits whom, each task under the tasks waiting for it."""
    for i, loop in enumerate(view.get("loops", [])):
        if "error" in loop:
            out.write(f"loop {i}: {loop['error']}\n")
            continue
        out.write(f"loop {i}: {loop['tasks_in_flight']} task(s) in flight\n")
        tasks = {t["id"]: t for t in loop["tasks"]}
        children: dict[str, list[str]] = {}
        roots = []
        for key, task in tasks.items():
            waiters = [w for w in task.get("awaited_by_ids", []) if w in tasks]
            if waiters:
                children.setdefault(waiters[0], []).append(key)
            else:
                roots.append(key)

        for root in roots:
            _show(root, 0, tasks, children, out)


def _show(
    key: str,
    depth: int,
    tasks: dict[str, dict[str, Any]],
    children: dict[str, list[str]],
    out: TextIO,
) -> None:
    task = tasks[key]
    pairs = zip(task.get("awaited_by", []), task.get("awaited_by_ids", []), strict=False)
    extra = [label for label, waiter in pairs if waiter not in tasks]
    note = f"  (awaited by {', '.join(extra)})" if extra else ""
    out.write(
        f"  {'  ' * depth}{task['name']} [{task['operation'] or '-'} "
        f"{task['correlation_id'] or '-'}] {_age(task['age_s'])} "
        f"in {task['waiting_in'] or '-'}{note}\n"
    )
    for child in children.get(key, []):
        _show(child, depth + 1, tasks, children, out)


def add_arguments(parser: argparse.ArgumentParser, *, refresh: bool = False) -> None:
    """Arguments of ``ps``, ``tree`` and ``top``."""
    parser.add_argument("url", help="the app's metrics address, e.g. http://127.0.0.1:9464/metrics")
    parser.add_argument("--operation", help="only tasks of this operation")
    parser.add_argument("--correlation-id", help="only tasks with this correlation id")
    parser.add_argument("--limit", type=int, default=50, help="tasks listed per loop (50)")
    if refresh:
        parser.add_argument("--interval", type=float, default=2.0, help="seconds (2)")
        parser.add_argument("--iterations", type=int, default=0, help="0: until Ctrl-C")


def main(command: str, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run ``ps``, ``tree`` or ``top``; 0, or 2 when the view cannot be read."""
    try:
        url = tasks_url(
            args.url,
            operation=args.operation,
            correlation_id=args.correlation_id,
            limit=args.limit,
            graph=1 if command == "tree" else None,
        )
    except ValueError as exc:
        sys.stderr.write(f"asynctrace {command}: {exc}\n")
        return 2
    render = render_tree if command == "tree" else render_ps
    iterations = getattr(args, "iterations", 1) if command == "top" else 1
    done = 0
    try:
        while True:
            try:
                view = fetch(url)
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                sys.stderr.write(f"asynctrace {command}: cannot read {url}: {reason}\n")
                return 2
            if command == "top":
                out.write("\x1b[H\x1b[2J")  # home, clear
                out.write(f"asynctrace top {args.url}  {time.strftime('%H:%M:%S')}\n")
            render(view, out)
            out.flush()
            done += 1
            if command != "top" or (iterations and done >= iterations):
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
