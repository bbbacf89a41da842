"""The pure-Python twin of the ``_speedups`` C extension: its readable specification.

Both modules define the same names with the same behaviour; ``_native`` picks one (the C one
when it was built and ``ASYNCTRACE_PURE_PYTHON`` is not set). ``tests/test_native.py`` runs the
same tests against both.

:class:`Tap` is the loop's ``call_soon`` while asynctrace instruments it. asyncio's futures
schedule each done callback through ``loop.call_soon(callback, future, context=...)``, looking
``call_soon`` up on the loop object every time (the C ``Future`` of 3.11 to 3.14 and uvloop
alike), so an object set as the loop instance's ``call_soon`` attribute sees every callback a
future schedules. The tap lets asynctrace's own completion markers run the moment the task is
done, inside its last step (an exact end time, no ``Handle``, no loop turn), and passes every
other call, unchanged, to the loop's own ``call_soon``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, final

__all__ = ["IMPLEMENTATION", "Tap"]

IMPLEMENTATION = "python"


@final
class Tap:
    """A loop's ``call_soon`` that runs completion markers on the spot.

    A marker is an object whose type is in ``markers``, scheduled with exactly one argument
    (the future that is done). The tap calls ``marker.mark(future)``: True means the marker
    did all it had to, and nothing is scheduled (the tap returns None: futures ignore what
    ``call_soon`` returns). Anything else (False, or an exception, which is reported to
    ``sys.unraisablehook`` and never reaches the task) schedules the marker as usual, through
    the loop's ``call_soon``, so it is still called once more from a ``Handle``.

    Attributes:
        call_soon: The loop's own ``call_soon`` (a bound method), which gets every other call.
        markers: The marker types.
    """

    __slots__ = ("call_soon", "markers")

    def __init__(self, call_soon: object, markers: object) -> None:
        """Tap ``call_soon`` for callbacks whose type is one of ``markers``."""
        if not callable(call_soon):
            msg = f"Tap: call_soon must be callable, got {call_soon!r}"
            raise TypeError(msg)
        if not isinstance(markers, tuple) or not all(isinstance(t, type) for t in markers):
            msg = f"Tap: markers must be a tuple of types, got {markers!r}"
            raise TypeError(msg)
        self.call_soon: Callable[..., Any] = call_soon
        self.markers: tuple[type, ...] = markers

    def __call__(
        self,
        callback: Callable[..., object],
        *args: Any,  # noqa: ANN401 - call_soon's own arguments, passed on
        context: Any = None,  # noqa: ANN401
    ) -> Any:  # noqa: ANN401 - a Handle, or None for a marker run on the spot
        """``loop.call_soon(callback, *args, context=context)``, or the marker on the spot."""
        if len(args) == 1 and type(callback) in self.markers:
            try:
                if callback.mark(args[0]) is True:  # type: ignore[attr-defined]
                    return None
            except BaseException:
                sys.unraisablehook(_unraisable(sys.exc_info()[1], callback))
        return self.call_soon(callback, *args, context=context)

    def __repr__(self) -> str:
        """Show the tapped ``call_soon``."""
        return f"<asynctrace Tap of {self.call_soon!r}>"


def _unraisable(exc: BaseException | None, callback: object) -> Any:  # noqa: ANN401
    """The argument ``sys.unraisablehook`` takes, as the C API's PyErr_WriteUnraisable makes it."""

    class UnraisableHookArgs:
        exc_type = type(exc)
        exc_value = exc
        exc_traceback = exc.__traceback__ if exc is not None else None
        err_msg = "Exception ignored in asynctrace's completion marker"
        object = callback

    return UnraisableHookArgs()
