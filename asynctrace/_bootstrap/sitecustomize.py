"""Run by every Python that ``asynctrace run`` starts (this folder is put on PYTHONPATH).

It installs asynctrace process-wide, before the application's code runs, with the options
``asynctrace run`` passed in ``ASYNCTRACE_RUN_OPTIONS`` (JSON) and the standard ``OTEL_*``
variables; then any other ``sitecustomize`` further along the path runs as it would have.
A Python where asynctrace cannot be imported runs the application without it, with a
warning: the application itself is never stopped by this.
"""

from __future__ import annotations

import importlib
import json
import os
import sys


def _chain() -> None:
    """Let the ``sitecustomize`` this one shadows run too (as opentelemetry-instrument does)."""
    here = os.path.dirname(os.path.abspath(__file__))
    ours = sys.modules.pop("sitecustomize", None)
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    try:
        importlib.import_module("sitecustomize")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
        if ours is not None:  # the import system reads it back when this module is done
            sys.modules["sitecustomize"] = ours


def _install() -> None:
    try:
        options = json.loads(os.environ.get("ASYNCTRACE_RUN_OPTIONS") or "{}")
        import asynctrace

        asynctrace.install(**options)
    except Exception as exc:
        sys.stderr.write(f"asynctrace run: not instrumented: {type(exc).__name__}: {exc}\n")


_chain()
_install()
