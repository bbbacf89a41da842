"""``correlation()``: a block with its own correlation id, and the instruments' scope hook."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

from asynctrace._hooks import source_of
from asynctrace._metadata import _CORRELATION_ID, check_text
from asynctrace._state import STATE

__all__ = ["correlation", "run_in_executor"]

_T = TypeVar("_T")


@contextlib.contextmanager
def correlation(value: str, *, span_name: str | None = None) -> Iterator[str]:
    """Set the correlation id for a block and for the tasks created inside it.

    The previous value is restored on exit, also when the block raises::

        with asynctrace.correlation("req-7"):
            await asyncio.gather(fetch(), store())  # both tasks carry "req-7"

    Entering a block whose id differs from the current one opens a new scope: with tracing
    on, a span (named ``span_name``, else ``"correlation"``) current for the block and the
    root of the id's trace here, linked to the span that was current at the boundary. The
    block's tasks are its children; its logs carry its ids. An id equal to the current one
    changes nothing.

    Args:
        value: The id; 1 to 128 printable characters.
        span_name: The name of the block's span, such as ``"POST /ingest"``; 1 to 128
            printable characters.

    Yields:
        The id that was set.

    Raises:
        TypeError: ``value`` is not a str (or ``span_name`` neither a str nor None).
        ValueError: ``value`` (or ``span_name``) is empty, too long or not printable.

    Since: 0.1.0
    """
    if value is None:
        raise TypeError("Invalid correlation_id: None; expected a str.")
    check_text("correlation_id", value)
    check_text("span_name", span_name)
    if _CORRELATION_ID.get() == value:
        yield value
        return
    _cover_running_loop()
    token = _CORRELATION_ID.set(value)
    ends = _open(value, span_name)
    error: BaseException | None = None
    try:
        yield value
    except BaseException as exc:
        error = exc
        raise
    finally:
        _close(ends, error)
        _CORRELATION_ID.reset(token)


_End = Callable[[BaseException | None], None]


def _cover_running_loop() -> None:
    """Under a process-wide installation, make sure the running loop has the factory."""
    cover = STATE.cover_loop
    if cover is not None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        cover(loop)


def _open(value: str, span_name: str | None) -> list[tuple[str, _End]]:
    """Call each instrument's scope hook; keep what each returns to end the block."""
    ends: list[tuple[str, _End]] = []
    for hook in STATE.hooks.scope:
        source = source_of(hook)
        try:
            end = hook(value, span_name)
        except Exception as exc:
            STATE.errors.count(source, exc)
        else:
            if end is not None:
                ends.append((source, end))
    return ends


def _close(ends: list[tuple[str, _End]], error: BaseException | None) -> None:
    """End the block for each instrument, innermost first; a failure costs that one call."""
    for source, end in reversed(ends):
        try:
            end(error)
        except Exception as exc:
            STATE.errors.count(source, exc)


def run_in_executor(
    executor: concurrent.futures.Executor | None, func: Callable[..., _T], /, *args: object
) -> asyncio.Future[_T]:
    """Run ``func(*args)`` in ``executor`` with the caller's context, as ``asyncio.to_thread`` does.

    ``loop.run_in_executor`` runs the function without the caller's context, so in the worker
    thread the correlation id, the task's metadata, the current span (spans opened there nest
    under it) and the log fields are gone. This is ``loop.run_in_executor`` with a copy of the
    current context::

        digest = await asynctrace.run_in_executor(pool, hash_file, path)

    Args:
        executor: A ``concurrent.futures.Executor``, or None for the loop's default one.
        func: The callable to run.
        *args: Its positional arguments (use ``functools.partial`` for keywords).

    Returns:
        The future ``loop.run_in_executor`` returns: await it for the result.

    Raises:
        RuntimeError: No event loop is running in this thread.
        TypeError: ``func`` is not callable, or ``executor`` is neither an Executor nor None.

    Since: 0.1.0
    """
    if not callable(func):
        raise TypeError(f"Invalid func: {func!r}; expected a callable.")
    if executor is not None and not isinstance(executor, concurrent.futures.Executor):
        raise TypeError(
            f"Invalid executor: {executor!r}; expected a concurrent.futures.Executor or None."
        )
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    return loop.run_in_executor(executor, functools.partial(context.run, func, *args))
