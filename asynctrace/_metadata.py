"""Task metadata, correlation ids and the context variables that carry them."""

from __future__ import annotations

import contextvars
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, final

__all__ = [
    "CONTEXT_VARS",
    "MAX_ID_LENGTH",
    "TaskMetadata",
    "check_text",
    "correlation_id",
    "first_level_slot",
    "random_correlation_id",
    "spread_var",
]

MAX_ID_LENGTH: Final = 128
"""The longest correlation id or operation name accepted, in characters."""

_SPREAD_TRIES: Final = 64
_HASH_BITS: Final = 64  # sys.hash_info.width where the HAMT folds the hash to 32 bits


def first_level_slot(var: contextvars.ContextVar[Any]) -> int:
    """Where ``var`` goes in the first level of a context's mapping (CPython's HAMT).

    The HAMT folds a 64-bit hash to 32 bits (``hash & 0xffffffff ^ hash >> 32``) and takes
    5 bits per level; a variable's hash is fixed when it is made (its address and its name's).
    """
    h = hash(var)
    if sys.hash_info.width == _HASH_BITS:
        h ^= h >> 32
    return h & 31


def spread_var(
    name: str, taken: Iterable[contextvars.ContextVar[Any]]
) -> contextvars.ContextVar[Any]:
    """A new ``ContextVar(name, default=None)`` in a first-level slot none of ``taken`` has.

    Two variables in one slot put a second node under the first level of every context
    holding both: a traced task's context (asynctrace's three variables) then takes 64 bytes
    more, and each lookup goes one level deeper. The slot depends on the address the variable
    gets, so one that lands in a taken slot is made again (the rejected ones kept till the
    end, so that their addresses are not reused), at most ``_SPREAD_TRIES`` times.
    """
    slots = {first_level_slot(v) for v in taken}
    rejected: list[contextvars.ContextVar[Any]] = []
    var: contextvars.ContextVar[Any] = contextvars.ContextVar(name, default=None)
    while first_level_slot(var) in slots and len(rejected) < _SPREAD_TRIES:
        rejected.append(var)
        var = contextvars.ContextVar(name, default=None)
    return var


# The traced task's variable (asynctrace_context.TASK_SPAN), when that module was imported
# first (OpenTelemetry loads it as its runtime context); else it keeps out of these two's
# slots when it is made.
_TAKEN = [
    v for v in (getattr(sys.modules.get("asynctrace_context"), "TASK_SPAN", None),) if v is not None
]
_CORRELATION_ID: Final[contextvars.ContextVar[str | None]] = spread_var(
    "asynctrace_correlation_id", _TAKEN
)
# The current task's TaskMetadata. Tasks of one fan-out share one metadata object, and setting
# a variable to the value it already holds allocates nothing, so most tasks cost no new
# context mapping (and no garbage-collector work).
_METADATA: Final[contextvars.ContextVar[TaskMetadata | None]] = spread_var(
    "asynctrace_metadata", [*_TAKEN, _CORRELATION_ID]
)
CONTEXT_VARS: Final = (_CORRELATION_ID, _METADATA)
"""asynctrace's own variables in a task's context (see :func:`spread_var`)."""
del _TAKEN


@final
@dataclass(frozen=True, slots=True)
class TaskMetadata:
    """What asynctrace knows about one task, fixed when the task is created.

    Attributes:
        operation_name: What the task does (``"normalize"``); names its span and labels its
            metrics. None when the task was created without one.
        correlation_id: The id shared by everything done for one request. Given at creation,
            inherited from the creating context, or freshly generated.
        priority_hint: A free integer the application attaches (no scheduling effect).

    Since: 0.1.0
    """

    operation_name: str | None = None
    correlation_id: str | None = None
    priority_hint: int | None = None

    def __post_init__(self) -> None:
        """Validate the fields, as the factory does (see :func:`validate_metadata`)."""
        validate_metadata(self.operation_name, self.correlation_id, self.priority_hint)


# The factory builds TaskMetadata on the hot path without re-validating (it validated at the
# edge already): the slot descriptors set fields directly, bypassing the frozen __setattr__.
_set_operation_name: Callable[[TaskMetadata, str | None], None] = TaskMetadata.__dict__[
    "operation_name"
].__set__
_set_correlation_id: Callable[[TaskMetadata, str | None], None] = TaskMetadata.__dict__[
    "correlation_id"
].__set__
_set_priority_hint: Callable[[TaskMetadata, int | None], None] = TaskMetadata.__dict__[
    "priority_hint"
].__set__
_new_object = object.__new__


def _make_metadata(
    operation_name: str | None, correlation_id: str | None, priority_hint: int | None
) -> TaskMetadata:
    metadata: TaskMetadata = _new_object(TaskMetadata)
    _set_operation_name(metadata, operation_name)
    _set_correlation_id(metadata, correlation_id)
    _set_priority_hint(metadata, priority_hint)
    return metadata


def check_text(what: str, value: object) -> None:
    """Raise TypeError/ValueError unless ``value`` is None or 1-128 printable characters."""
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"Invalid {what}: {value!r}; expected a str or None.")
    if not 0 < len(value) <= MAX_ID_LENGTH:
        raise ValueError(
            f"Invalid {what}: {value!r}; expected 1 to {MAX_ID_LENGTH} characters, "
            f"got {len(value)}."
        )
    if not value.isprintable():
        raise ValueError(f"Invalid {what}: {value!r}; expected printable characters only.")


_VALID_OPERATIONS: Final[set[str]] = set()
_VALID_OPERATIONS_MAX: Final = 256  # remembered as valid at most; then it starts anew


def validate_metadata(
    operation_name: object, correlation_id: object, priority_hint: object
) -> None:
    """Raise TypeError or ValueError naming the first field that is not acceptable.

    Operation names found valid are not checked again (a str never changes): the tasks of a
    few call sites, in turn, pass the same few.
    """
    if operation_name is not None and not (
        type(operation_name) is str and operation_name in _VALID_OPERATIONS
    ):
        check_text("operation_name", operation_name)
        if type(operation_name) is str:
            if len(_VALID_OPERATIONS) >= _VALID_OPERATIONS_MAX:
                _VALID_OPERATIONS.clear()
            _VALID_OPERATIONS.add(operation_name)
    check_text("correlation_id", correlation_id)
    if priority_hint is not None and (
        not isinstance(priority_hint, int) or isinstance(priority_hint, bool)
    ):
        raise TypeError(f"Invalid priority_hint: {priority_hint!r}; expected an int or None.")


def correlation_id() -> str | None:
    """Return the correlation id of the current context, or None when none is set.

    Inside a task created while asynctrace is installed this is the task's id (given with
    ``correlation_id=``, inherited from where the task was created, or generated); inside a
    :func:`correlation` block, the block's id. It is the one rule every signal follows: logs,
    spans and metadata read here agree with it.

    Since: 0.1.0
    """
    return _CORRELATION_ID.get()


_getrandbits = random.getrandbits


def random_correlation_id() -> str:
    """Return a fresh random correlation id: 32 lowercase hex digits (128 bits).

    The default ``id_generator`` of :func:`asynctrace.install`. It uses :mod:`random`, which
    is fast and unique enough for correlation; ids are not secrets.

    Since: 0.1.0
    """
    return f"{_getrandbits(128):032x}"
