"""Which implementation of the accelerated parts runs: the C extension or its Python twin.

The C extension (``asynctrace._speedups``) is built when the package is installed on a machine
with a C compiler; it is optional. Without it, or with ``ASYNCTRACE_PURE_PYTHON=1`` in the
environment when asynctrace is first imported, the pure-Python twin (``_speedups_py``) runs.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Final, cast

__all__ = [
    "IMPLEMENTATION",
    "PURE_PYTHON_ENV",
    "Counts",
    "LaneQueue",
    "LeanDone",
    "LeanFactory",
    "SpanHooks",
    "SpanIds",
    "Tap",
    "ThreadSlot",
    "encode_task_span",
    "encode_task_spans",
    "exporting",
    "load",
    "untracked_copy",
]

PURE_PYTHON_ENV: Final = "ASYNCTRACE_PURE_PYTHON"

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType


def load(*, pure_python: bool | None = None) -> ModuleType:
    """The module to use: ``_speedups`` unless forced to, or it is missing; else the twin."""
    if pure_python is None:
        pure_python = os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0")
    if not pure_python:
        try:
            return importlib.import_module("asynctrace._speedups")
        except ImportError:
            pass
    return importlib.import_module("asynctrace._speedups_py")


_module = load()
IMPLEMENTATION: Final[str] = _module.IMPLEMENTATION
"""``"c"`` or ``"python"``: what this process runs."""
Tap: Final = _module.Tap
LeanFactory: Final = _module.LeanFactory
LeanDone: Final = _module.LeanDone
encode_task_span: Final = getattr(  # an extension built before the encoder: Python's
    _module, "encode_task_span", importlib.import_module("asynctrace._speedups_py").encode_task_span
)
# Both from one module: the twin's batch asks the twin's single encoder.
encode_task_spans: Final = getattr(_module, "encode_task_spans", None) or (
    importlib.import_module("asynctrace._speedups_py").encode_task_spans
)
Counts: Final = _module.Counts
ThreadSlot: Final = (
    getattr(  # an extension built before the slot: Python's
        _module, "ThreadSlot", None
    )
    or importlib.import_module("asynctrace._speedups_py").ThreadSlot
)
CreateTask: Final = (
    getattr(  # an extension built before it: Python's
        _module, "CreateTask", None
    )
    or importlib.import_module("asynctrace._speedups_py").CreateTask
)
LaneQueue: Final = (
    getattr(  # an extension built before the queue: Python's
        _module, "LaneQueue", None
    )
    or importlib.import_module("asynctrace._speedups_py").LaneQueue
)
# The span handle's base and the hooks that write it go together: an extension built before
# SpanIds held the handle's fields (untracked_copy came with them) gives way to Python's.
_spans = (
    _module
    if hasattr(_module, "untracked_copy")
    else importlib.import_module("asynctrace._speedups_py")
)
SpanIds: Final = _spans.SpanIds
SpanHooks: Final = _spans.SpanHooks
untracked_copy: Final = _spans.untracked_copy


def _no_hand_over(change: object) -> int | None:  # noqa: ARG001 - exporting's signature
    return None


exporting: Final = cast(
    "Callable[[object], int | None]",
    getattr(_module, "exporting", None) or _no_hand_over,  # an extension built before it: none
)
"""An export thread starts (1) or ends (-1) its work: see ``_speedups_py.exporting``."""
