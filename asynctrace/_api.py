"""The public entry points that span every layer: ``install()``, ``shutdown()``, ``summary()``.

``install()`` validates its arguments and the environment (``export.options``), lets
``export.setup`` build the sinks only when a new configuration is needed, and hands them to
the core (``_install``), which puts the factory on the loop or the policy.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from asynctrace._create_task import unknown_keywords_message
from asynctrace._hooks import Instrument
from asynctrace._install import (
    Installation,
    adopt_current_task,
    install_factory,
    reset,
    running_loop,
)
from asynctrace._metadata import TaskMetadata, check_text, random_correlation_id
from asynctrace._state import STATE
from asynctrace._version import __version__
from asynctrace.export.options import ExportOptions
from asynctrace.export.setup import Telemetry
from asynctrace.export.summary import Summary

if TYPE_CHECKING:  # annotations only: nothing is imported at run time
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider
    from prometheus_client import CollectorRegistry

__all__ = ["Options", "flush", "install", "shutdown", "summary", "telemetry_errors"]


@dataclass(frozen=True, slots=True)
class Options:
    """Everything one ``install()`` call configured (compared to refuse conflicting ones)."""

    id_generator: Callable[[], str] | None = random_correlation_id
    instruments: tuple[Instrument, ...] = ()
    export: ExportOptions = field(default_factory=ExportOptions)


def _make_options(
    id_generator: Callable[[], str] | None,
    instruments: Iterable[Instrument],
    export: ExportOptions,
) -> Options:
    if id_generator is not None and not callable(id_generator):
        raise TypeError(
            f"Invalid id_generator: {id_generator!r}; expected a callable returning a str, "
            "or None to turn generation off."
        )
    if id_generator is not None:
        sample = id_generator()
        try:
            check_text("correlation_id", sample)
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
    return Options(id_generator=id_generator, instruments=instruments, export=export)


_F = TypeVar("_F", bound=Callable[..., Any])


def _suggest_keywords(func: _F) -> _F:
    """Raise a misspelled keyword as ``create_task`` does: with the nearest accepted name."""
    accepted = tuple(inspect.signature(func).parameters)

    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        unknown = [name for name in kwargs if name not in accepted]
        if unknown:
            where = f"{func.__name__}()"
            raise TypeError(unknown_keywords_message(where, unknown, accepted))
        return func(*args, **kwargs)

    return cast("_F", checked)


@_suggest_keywords
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
    shutdown_timeout: float = 5.0,
    exception_messages: bool = True,
    stuck_after: float | Mapping[str, float] | None = None,
    creation_sites: bool = False,
) -> Installation:
    """Install the asynctrace task factory; every task created afterwards carries metadata.

    - With ``loop=``, or inside a running loop: instruments that loop now.
    - Otherwise: instruments every loop the process creates from now on through the event
      loop policy (``asyncio.run``, ``asyncio.Runner``, ``asyncio.new_event_loop``).

    A task factory set before (``asyncio.eager_task_factory``, a Task subclass factory, a
    framework's) is chained: it still builds the tasks.

    Idempotent: installing again where asynctrace is installed returns the same
    :class:`Installation` and wraps nothing twice. A bare ``install()`` (no option given)
    where asynctrace is installed already joins the options in force, whatever they are;
    one that gives options must give the same ones (else ValueError), until every
    installation has ended: ``uninstall()``, or their loops closed. A loop's installation
    ends when the loop closes, so each ``asyncio.run()`` may install with options of its own.

    Args:
        loop: The loop to instrument; by default the running loop, else every future loop.
        id_generator: Makes the correlation id of a task created where none is set; None turns
            generation off (such tasks then have no correlation id).
        instruments: :class:`Instrument` objects to call on task creation and completion.
        tracer_provider: Record spans with this OpenTelemetry ``TracerProvider`` (default: the
            global one when the app set an SDK provider; else one asynctrace makes when export
            is asked for).
        meter_provider: Also record task metrics with this OpenTelemetry ``MeterProvider``.
        registry: The prometheus_client ``CollectorRegistry`` for task metrics (default:
            ``prometheus_client.REGISTRY``).
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
        shutdown_timeout: Seconds that ending the export may take in all (``shutdown()``,
            the last ``uninstall()``, process exit); spans still queued then are dropped and
            counted. Inside a running loop the export ends in a background thread, so the
            loop never waits for it.
        exception_messages: Record a failed task's exception message in its span's exception
            event (once; the span's status holds only the type). False records none, for
            apps whose messages may carry personal data.
        stuck_after: Seconds after which a pending task counts as stuck: one number for every
            task, or a mapping of operation names to seconds (key ``"*"``: every other
            operation; operations left out are not watched). Stuck tasks are counted in the
            ``asynctrace_tasks_stuck`` gauge, logged once each with their ids and where they
            wait, and their span gets an ``asynctrace.stuck`` event. None (default): off.
        creation_sites: Note where each task was created (``file:line in function``): shown
            by ``/tasks``, and in the stuck and pending-at-close logs. Costs a frame walk and
            a record on every task: off by default.

    Returns:
        The :class:`Installation`; its ``uninstall()`` restores what was there before.

    Raises:
        TypeError: An option of the wrong type.
        ValueError: asynctrace is installed already with different options (the message
            names them), or an option's value is out of range.

    Since: 0.1.0
    """
    given = dict(locals())  # first: the arguments as given
    export = ExportOptions.resolve(
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
        shutdown_timeout=shutdown_timeout,
        exception_messages=exception_messages,
        stuck_after=stuck_after,
        creation_sites=creation_sites,
    )
    options = _make_options(id_generator, instruments, export)
    # A bare install() (every option at its default) asks for no configuration of its own:
    # it joins the one in force, where asynctrace is installed already.
    bare = not options.instruments and all(
        given[name] == default for name, default in _defaults().items()
    )
    running = running_loop()
    if loop is None:
        loop = running
    elif not isinstance(loop, asyncio.AbstractEventLoop):
        raise TypeError(f"Invalid loop: {loop!r}; expected an asyncio event loop or None.")
    elif loop.is_closed():
        raise ValueError(f"Invalid loop: {loop!r} is closed; install on an open loop.")

    def make_instruments() -> tuple[Instrument, ...]:
        telemetry = Telemetry(export, __version__)
        return (*telemetry.instruments(), *options.instruments, telemetry)

    installation = install_factory(
        loop,
        options=options,
        make_instruments=make_instruments,
        id_generator=id_generator,
        join=bare,
    )
    if running is not None and loop is running:  # inside the loop: adopt the calling task
        adopt_current_task()
    return installation


@functools.cache
def _defaults() -> dict[str, object]:
    """install()'s options and their defaults (but ``loop`` and ``instruments``)."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(install).parameters.items()
        if name not in ("loop", "instruments")
    }


def _telemetry() -> Telemetry | None:
    for instrument in STATE.hooks.instruments:
        if isinstance(instrument, Telemetry):
            return instrument
    return None


def summary() -> Summary:
    """Per-operation task statistics since install: count, p50/p95/p99, errors, cancelled.

    Raises:
        RuntimeError: asynctrace is not installed with metrics.

    Since: 0.1.0
    """
    telemetry = _telemetry()
    if telemetry is None or telemetry.metrics is None:
        raise RuntimeError("asynctrace.summary() needs asynctrace.install() with metrics on.")
    return telemetry.summary()


def flush(timeout: float = 10.0) -> bool:
    """Export the spans queued now, waiting at most ``timeout`` seconds.

    Only spans of the provider asynctrace made are queued here (an app's own provider has its
    own ``force_flush``). A span whose export fails counts as dropped, not as pending.

    Args:
        timeout: Seconds to wait, > 0.

    Returns:
        True when nothing is left waiting (also when asynctrace exports nothing), False when
        the timeout passed first.

    Raises:
        ValueError: ``timeout`` is not a number of seconds > 0.

    Since: 0.1.0
    """
    if (
        not isinstance(timeout, int | float)
        or isinstance(timeout, bool)
        or not 0 < timeout < float("inf")
    ):
        raise ValueError(f"Invalid timeout: {timeout!r}; expected seconds > 0.")
    telemetry = _telemetry()
    if telemetry is None:
        return True
    return telemetry.flush(max(1, round(timeout * 1000)))


def telemetry_errors() -> dict[str, int]:
    """Return how many telemetry failures each source had (an instrument, an exporter, ...).

    Failures never reach the application; each source's first one is logged on the
    ``asynctrace`` logger, later ones at most once a minute.

    Since: 0.1.0
    """
    return STATE.errors.snapshot()


def shutdown() -> None:
    """Flush and stop what :func:`install` started, and uninstall everywhere.

    Exports the spans still queued (when asynctrace made the TracerProvider), stops the
    ``/metrics`` server and the loop watchdog, unregisters the metrics and restores the previous
    task factories and policy. Its closing also runs at interpreter exit; calling it twice is
    harmless.

    Since: 0.1.0
    """
    reset()
