"""``install()`` / ``uninstall()``: putting the factory on one loop, or on every loop.

A process-wide installation (``install()`` with no loop running) wraps the event loop policy,
so that each loop the policy makes afterwards (``asyncio.run``, ``asyncio.Runner``,
``asyncio.new_event_loop``, uvloop's policy when ``uvloop.install()`` came first) gets the
factory. Runners given an explicit ``loop_factory`` bypass policies: wrap that factory with
:func:`loop_factory`, or call ``install()`` inside the running loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, final

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from asynctrace._factory import (
    TaskFactory,
    adopt_current_task,
    forget_running,
    installation_of,
    make_factory,
)
from asynctrace._instrument import Instrument, overrides
from asynctrace._metadata import TaskMetadata, _check_text, random_correlation_id
from asynctrace._state import STATE, instrument_source
from asynctrace._telemetry import Telemetry, TelemetryOptions
from asynctrace._version import __version__

__all__ = ["Installation", "install", "loop_factory", "uninstall"]

_events: Any = asyncio.events
# Python 3.14 deprecates the public policy API; the stdlib itself still uses these.
_get_policy: Callable[[], Any] = getattr(
    _events, "_get_event_loop_policy", asyncio.get_event_loop_policy
)
_set_policy: Callable[[Any], None] = getattr(
    _events, "_set_event_loop_policy", asyncio.set_event_loop_policy
)
_PolicyBase: Any = (
    getattr(_events, "_AbstractEventLoopPolicy", None) or _events.AbstractEventLoopPolicy
)


@dataclass(frozen=True, slots=True)
class Options:
    """The options of the active installation (compared to refuse conflicting re-installs)."""

    id_generator: Callable[[], str] | None = random_correlation_id
    instruments: tuple[Instrument, ...] = ()
    telemetry: TelemetryOptions = field(default_factory=TelemetryOptions)


@final
class Installation:
    """The result of :func:`asynctrace.install`: where the factory is, and how to remove it.

    Attributes:
        loop: The instrumented loop, or None for the process-wide installation.

    Since: 0.1.0
    """

    __slots__ = ("__weakref__", "_children", "_factory", "_parent", "_policy", "_previous", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None, parent: Installation | None) -> None:
        """Use :func:`asynctrace.install`; this is not meant to be called directly."""
        self.loop = loop
        self._parent = parent
        self._previous: Any = None
        self._factory: TaskFactory | None = None
        self._policy: _InstrumentingPolicy | None = None
        self._children: list[Installation] = []

    @property
    def active(self) -> bool:
        """Whether this installation is still in place."""
        if self.loop is None:
            return STATE.process is self
        return self._factory is not None and self.loop.get_task_factory() is self._factory

    def _attach(self) -> None:
        assert self.loop is not None  # noqa: S101 - internal invariant
        self._previous = self.loop.get_task_factory()
        self._factory = make_factory(self, self._previous)
        self.loop.set_task_factory(self._factory)
        for instrument in STATE.instruments:
            if overrides(instrument, "loop_attached"):
                try:
                    instrument.loop_attached(self.loop)
                except Exception as exc:
                    STATE.hook_failed(instrument.loop_attached, exc)

    def uninstall(self) -> None:
        """Restore exactly what was there before: the previous task factory or loop policy.

        Uninstalling the process-wide installation also restores the factory of the loops it
        instrumented. Calling it twice is harmless.

        Raises:
            RuntimeError: Something replaced asynctrace's factory (or policy) since; asynctrace
                leaves it in place rather than remove someone else's.
        """
        with STATE.lock:
            if self.loop is None:
                _uninstall_process(self)
                return
            if self._factory is None:
                return
            current = self.loop.get_task_factory()
            if current is not self._factory:
                raise RuntimeError(
                    f"Cannot uninstall from {self.loop!r}: its task factory was replaced after "
                    f"asynctrace.install() (now {current!r}); restore it first."
                )
            self.loop.set_task_factory(self._previous)
            forget_running(self._factory)
            self._factory = None
            if self in STATE.loop_installations:
                STATE.loop_installations.remove(self)
            if self._parent is not None and self in self._parent._children:
                self._parent._children.remove(self)
            _forget_if_idle()

    def __repr__(self) -> str:
        """Show where the installation is and whether it is active."""
        where = "process" if self.loop is None else repr(self.loop)
        return f"<asynctrace.Installation {where} active={self.active}>"


class _InstrumentingPolicy(_PolicyBase):  # type: ignore[misc]
    """Delegates to the policy that was set before, instrumenting each loop it makes."""

    def __init__(self, inner: Any, installation: Installation) -> None:  # noqa: ANN401
        self._inner = inner
        self._installation = installation

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop: asyncio.AbstractEventLoop = self._inner.new_event_loop()
        _instrument_loop(loop, self._installation)
        return loop

    def get_event_loop(self) -> asyncio.AbstractEventLoop:
        loop: asyncio.AbstractEventLoop = self._inner.get_event_loop()
        _instrument_loop(loop, self._installation)
        return loop

    def set_event_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._inner.set_event_loop(loop)

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - delegation
        return getattr(self._inner, name)


def _instrument_loop(loop: asyncio.AbstractEventLoop, parent: Installation) -> Installation:
    with STATE.lock:
        existing = installation_of(loop.get_task_factory())
        if existing is not None:
            return existing
        child = Installation(loop, parent)
        child._attach()
        parent._children.append(child)
        return child


def _uninstall_process(installation: Installation) -> None:
    if STATE.process is not installation:
        return
    policy = installation._policy
    current = _get_policy()
    if current is not policy:
        raise RuntimeError(
            f"Cannot uninstall the process-wide installation: the event loop policy was "
            f"replaced after asynctrace.install() (now {current!r}); restore it first."
        )
    for child in list(installation._children):
        if child.active:
            child.uninstall()
    installation._children.clear()
    _set_policy(policy._inner if policy is not None else None)
    STATE.process = None
    _forget_if_idle()


def _forget_if_idle() -> None:
    """Once nothing is installed, tear down: see :func:`_teardown`."""
    if STATE.process is None and not any(i.active for i in STATE.loop_installations):
        _teardown()


def _teardown() -> None:
    """Close the user's instruments, stop telemetry (it closes its own), drop the options."""
    options, STATE.options = STATE.options, None
    telemetry, STATE.telemetry = STATE.telemetry, None
    STATE.loop_installations.clear()
    STATE.id_generator = None
    STATE.set_instruments(())
    for instrument in options.instruments if options is not None else ():
        try:
            instrument.close()
        except Exception as exc:
            STATE.count_error(instrument_source(instrument), exc)
    if telemetry is not None:
        telemetry.shutdown()


def _configure(options: Options) -> None:
    if STATE.options is None:
        telemetry = Telemetry(options.telemetry, __version__)
        STATE.options = options
        STATE.telemetry = telemetry
        STATE.id_generator = options.id_generator
        STATE.set_instruments((*telemetry.instruments(), *options.instruments))
        return
    if options != STATE.options:
        raise ValueError(
            f"asynctrace is already installed with other options ({STATE.options!r}); "
            f"call asynctrace.uninstall() first to install with {options!r}."
        )


def _make_options(
    id_generator: Callable[[], str] | None,
    instruments: Iterable[Instrument],
    telemetry: TelemetryOptions,
) -> Options:
    if id_generator is not None and not callable(id_generator):
        raise TypeError(
            f"Invalid id_generator: {id_generator!r}; expected a callable returning a str, "
            "or None to turn generation off."
        )
    if id_generator is not None:
        sample = id_generator()
        try:
            _check_text("correlation_id", sample)
        except (TypeError, ValueError) as exc:
            raise type(exc)(
                f"id_generator {id_generator!r} returned an invalid id: {exc}"
            ) from None
    instruments = tuple(instruments)
    for instrument in instruments:
        if not isinstance(instrument, Instrument):
            raise TypeError(
                f"Invalid instrument: {instrument!r}; expected an asynctrace.Instrument."
            )
    return Options(id_generator=id_generator, instruments=instruments, telemetry=telemetry)


def install(
    loop: asyncio.AbstractEventLoop | None = None,
    *,
    id_generator: Callable[[], str] | None = random_correlation_id,
    instruments: Iterable[Instrument] = (),
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    registry: CollectorRegistry | None = None,
    service_name: str | None = None,
    otlp_endpoint: str | None = None,
    otlp_protocol: Literal["http/protobuf", "grpc"] | None = None,
    traces_file: str | None = None,
    prometheus_port: int | None = None,
    prometheus_addr: str = "127.0.0.1",
    task_filter: Callable[[TaskMetadata], bool] | Literal["operation"] | None = None,
    metrics: bool = True,
    max_operations: int = 100,
    loop_monitor: bool = True,
    lag_interval: float = 0.25,
    blocked_threshold: float = 0.1,
) -> Installation:
    """Install the asynctrace task factory; every task created afterwards carries metadata.

    - With ``loop=``, or inside a running loop: instruments that loop now.
    - Otherwise: instruments every loop the process creates from now on through the event
      loop policy (``asyncio.run``, ``asyncio.Runner``, ``asyncio.new_event_loop``).

    A task factory set before (``asyncio.eager_task_factory``, a Task subclass factory, a
    framework's) is chained: it still builds the tasks.

    Idempotent: installing again where asynctrace is installed returns the same
    :class:`Installation` and wraps nothing twice.

    Args:
        loop: The loop to instrument; by default the running loop, else every future loop.
        id_generator: Makes the correlation id of a task created where none is set; None turns
            generation off (such tasks then have no correlation id).
        instruments: :class:`Instrument` objects to call on task creation and completion.
        tracer_provider: Record spans with this provider (default: the global one when the app
            set an SDK provider; else one asynctrace makes when export is asked for).
        meter_provider: Also record task metrics with this OpenTelemetry MeterProvider.
        registry: The prometheus_client registry for task metrics (default: ``REGISTRY``).
        service_name: ``service.name`` of the provider asynctrace makes (``OTEL_SERVICE_NAME``).
        otlp_endpoint: Export spans by OTLP there (``OTEL_EXPORTER_OTLP_ENDPOINT``).
        otlp_protocol: ``"http/protobuf"`` (default) or ``"grpc"`` (the ``grpc`` extra).
        traces_file: With no endpoint, write spans here as OTLP/JSON (default
            ``asynctrace-traces.jsonl`` when export is asked for).
        prometheus_port: Serve ``/metrics`` on this port (``ASYNCTRACE_PROMETHEUS_PORT``; 0
            picks a free one).
        prometheus_addr: The address to bind ``/metrics`` to.
        task_filter: Which tasks get spans: a predicate on :class:`TaskMetadata`, or
            ``"operation"`` for tasks with an operation_name (metrics count every task).
        metrics: Count tasks into Prometheus metrics.
        max_operations: Distinct ``operation`` label values before the rest become ``_other``.
        loop_monitor: Measure event-loop lag and blocked-loop episodes by heartbeat.
        lag_interval: Seconds between heartbeats.
        blocked_threshold: Seconds a heartbeat may be late before the loop counts as blocked.

    Returns:
        The :class:`Installation`; its ``uninstall()`` restores what was there before.

    Raises:
        TypeError: An option of the wrong type.
        ValueError: asynctrace is installed already with different options.

    Since: 0.1.0
    """
    telemetry_options = TelemetryOptions.resolve(
        os.environ,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        registry=registry,
        service_name=service_name,
        otlp_endpoint=otlp_endpoint,
        otlp_protocol=otlp_protocol,
        traces_file=traces_file,
        prometheus_port=prometheus_port,
        prometheus_addr=prometheus_addr,
        task_filter=task_filter,
        metrics=metrics,
        max_operations=max_operations,
        loop_monitor=loop_monitor,
        lag_interval=lag_interval,
        blocked_threshold=blocked_threshold,
    )
    options = _make_options(id_generator, instruments, telemetry_options)
    running = _running_loop()
    if loop is None:
        loop = running
    elif not isinstance(loop, asyncio.AbstractEventLoop):
        raise TypeError(f"Invalid loop: {loop!r}; expected an asyncio event loop or None.")
    with STATE.lock:
        _configure(options)
        if loop is None:
            if STATE.process is not None:
                return STATE.process
            installation = Installation(None, None)
            installation._policy = _InstrumentingPolicy(_get_policy(), installation)
            _set_policy(installation._policy)
            STATE.process = installation
            return installation
        existing = installation_of(loop.get_task_factory())
        if existing is not None:
            return existing
        installation = Installation(loop, STATE.process)
        installation._attach()
        if STATE.process is not None:
            STATE.process._children.append(installation)
        STATE.loop_installations.append(installation)
    if loop is running:  # called inside the loop: the calling task is adopted
        adopt_current_task()
    return installation


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def uninstall(loop: asyncio.AbstractEventLoop | None = None) -> bool:
    """Remove asynctrace from ``loop`` (default: the running loop), or the process-wide one.

    Called outside any loop and without ``loop=``, removes the process-wide installation (and
    the factory from the loops it instrumented).

    Returns:
        True when something was uninstalled, False when nothing was installed there.

    Raises:
        RuntimeError: asynctrace's factory or policy was replaced since it was installed.

    Since: 0.1.0
    """
    if loop is None:
        loop = _running_loop()
    with STATE.lock:
        if loop is None:
            if STATE.process is None:
                return False
            STATE.process.uninstall()
            return True
        installation = installation_of(loop.get_task_factory())
        if installation is None:
            return False
        installation.uninstall()
        return True


def loop_factory(
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> Callable[[], asyncio.AbstractEventLoop]:
    """Wrap a loop factory so the loops it makes are instrumented.

    For runners that take a ``loop_factory`` and so bypass the loop policy::

        asyncio.run(main(), loop_factory=asynctrace.loop_factory(uvloop.new_event_loop))

    Requires a process-wide :func:`install` first (its options apply).

    Args:
        factory: Makes the loop; by default ``asyncio.new_event_loop``.

    Returns:
        A callable making an instrumented loop.

    Since: 0.1.0
    """
    make = factory if factory is not None else asyncio.new_event_loop
    if not callable(make):
        raise TypeError(f"Invalid factory: {factory!r}; expected a callable returning a loop.")

    def instrumented_loop() -> asyncio.AbstractEventLoop:
        loop = make()
        parent = STATE.process
        if parent is None:
            loop.close()
            raise RuntimeError(
                "asynctrace.loop_factory() needs a process-wide asynctrace.install() first."
            )
        _instrument_loop(loop, parent)
        return loop

    return instrumented_loop


def reset() -> None:
    """Uninstall everything and forget all state (for tests)."""
    with STATE.lock:
        if STATE.process is not None:
            try:
                STATE.process.uninstall()
            except RuntimeError:
                STATE.process = None
        for installation in list(STATE.loop_installations):
            try:
                installation.uninstall()
            except RuntimeError:
                forget_running(installation._factory)
                installation._factory = None
        _teardown()  # a no-op when the last uninstall above already tore down
        STATE.clear()
