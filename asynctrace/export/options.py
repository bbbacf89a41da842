"""install()'s telemetry options: given as arguments or taken from the standard environment.

Read once, at install; an argument beats its variable. The OpenTelemetry variables mean what
the specification says:

- ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is the full URL, used as given;
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` is a base URL, to which ``/v1/traces`` is added (over HTTP).
  ``otlp_endpoint=`` is a base URL too.
- ``OTEL_TRACES_EXPORTER``: a comma-separated list of ``otlp``, ``console``, ``none``.
- ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL``: ``http/protobuf``, ``http/json`` or ``grpc``;
  checked only when asynctrace exports spans itself (other SDK parts read it too).
- ``OTEL_SDK_DISABLED=true``: asynctrace records no spans (unless given a tracer_provider).
- ``OTEL_SERVICE_NAME`` names the service; it asks for no export.

Nothing here imports OpenTelemetry or prometheus_client: a provider or registry the user
passes is checked against classes from the modules the user already imported to make it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from asynctrace._metadata import TaskMetadata
from asynctrace.sinks.health import StuckAfter, parse_stuck_after

if TYPE_CHECKING:  # annotations only: nothing is imported at run time
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider
    from prometheus_client import CollectorRegistry

__all__ = [
    "EXPORTERS",
    "PROTOCOLS",
    "ExportOptions",
    "Protocol",
    "TaskFilterOption",
    "redact_url",
]

Protocol = Literal["http/protobuf", "http/json", "grpc"]
PROTOCOLS: Final = ("http/protobuf", "http/json", "grpc")
EXPORTERS: Final = ("otlp", "console", "none")
TaskFilterOption = Callable[[TaskMetadata], bool] | Literal["operation"] | None
_MIN_INTERVAL_S: Final = 0.001
_MAX_INTERVAL_S: Final = 3600.0


def _is_instance(value: object, module: str, cls: str) -> bool:
    """``isinstance(value, module.cls)``; False when the module was never imported."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(value, getattr(loaded, cls))


@dataclass(frozen=True, slots=True)
class ExportOptions:
    """install()'s telemetry options, after the environment is read (once, at install)."""

    tracer_provider: TracerProvider | None = None
    registry: CollectorRegistry | None = None
    meter_provider: MeterProvider | None = None
    service_name: str | None = None
    otlp_endpoint: str | None = None
    otlp_protocol: Protocol | None = None
    traces_file: str | None = None
    prometheus_port: int | None = None
    prometheus_addr: str = "127.0.0.1"
    task_filter: TaskFilterOption = None
    metrics: bool = True
    max_operations: int = 100
    loop_monitor: bool = True
    lag_interval: float = 0.25
    blocked_threshold: float = 0.1
    shutdown_timeout: float = 5.0
    exception_messages: bool = True
    stuck_after: StuckAfter = ()
    creation_sites: bool = False
    # From the environment only:
    traces_exporters: tuple[str, ...] = ()
    otlp_url: str | None = None
    sdk_disabled: bool = False
    timeout_from_env: bool = False

    @classmethod
    def resolve(cls, env: Mapping[str, str], **given: Any) -> ExportOptions:  # noqa: ANN401
        """Fill unset options from ``env`` and validate all of them."""
        if given.get("service_name") is None:
            given["service_name"] = env.get("OTEL_SERVICE_NAME") or None
        protocol = given.get("otlp_protocol")
        if protocol is None:
            proto = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL"
            )
            given["otlp_protocol"] = proto.strip() if proto else None
        elif protocol not in PROTOCOLS:  # an argument is checked at once; a variable on use
            raise ValueError(
                f"Invalid otlp_protocol: {protocol!r}; expected one of {', '.join(PROTOCOLS)}."
            )
        exporters = _traces_exporters(env, otlp_asked=given.get("otlp_endpoint") is not None)
        given["traces_exporters"] = exporters
        if "otlp" in exporters:
            given["otlp_url"] = _otlp_url(env, given.get("otlp_endpoint"), given["otlp_protocol"])
        given["sdk_disabled"] = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        given["timeout_from_env"] = bool(
            env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or env.get("OTEL_EXPORTER_OTLP_TIMEOUT")
        )
        if given.get("prometheus_port") is None and env.get("ASYNCTRACE_PROMETHEUS_PORT"):
            raw = env["ASYNCTRACE_PROMETHEUS_PORT"]
            try:
                given["prometheus_port"] = int(raw)
            except ValueError:
                raise ValueError(
                    f"Invalid ASYNCTRACE_PROMETHEUS_PORT: {raw!r}; expected a port number."
                ) from None
        given["stuck_after"] = parse_stuck_after(given.get("stuck_after"))
        options = cls(**given)
        options.validate()
        return options

    def validate_export(self) -> None:
        """Raise ValueError naming a protocol or exporter asynctrace cannot export with.

        Checked only when asynctrace exports spans itself: these variables also configure
        other parts of an app's OpenTelemetry SDK.
        """
        if self.otlp_protocol not in (None, *PROTOCOLS):
            raise ValueError(
                f"Invalid otlp_protocol (or OTEL_EXPORTER_OTLP_PROTOCOL): "
                f"{self.otlp_protocol!r}; expected one of {', '.join(PROTOCOLS)}."
            )
        for name in self.traces_exporters:
            if name not in EXPORTERS:
                raise ValueError(
                    f"Invalid OTEL_TRACES_EXPORTER entry: {name!r}; asynctrace exports with "
                    f"{', '.join(EXPORTERS)}."
                )

    def validate(self) -> None:
        """Raise TypeError/ValueError naming the first bad option."""
        self._check_texts()
        self._check_numbers()
        self._check_objects()

    def _check_texts(self) -> None:
        if self.otlp_protocol is not None and not isinstance(self.otlp_protocol, str):
            raise TypeError(
                f"Invalid otlp_protocol: {self.otlp_protocol!r}; expected one of "
                f"{', '.join(PROTOCOLS)}."
            )
        for name in ("service_name", "otlp_endpoint", "prometheus_addr"):
            value = getattr(self, name)
            if not (value is None and name != "prometheus_addr") and not isinstance(value, str):
                expected = "a str" if name == "prometheus_addr" else "a str or None"
                raise TypeError(f"Invalid {name}: {value!r}; expected {expected}.")
        if self.otlp_endpoint is not None and not self.otlp_endpoint.startswith(
            ("http://", "https://")
        ):
            raise ValueError(
                f"Invalid otlp_endpoint: {redact_url(self.otlp_endpoint)!r}; expected an "
                "http:// or https:// URL."
            )
        if self.traces_file is not None and not isinstance(self.traces_file, str | os.PathLike):
            raise TypeError(
                f"Invalid traces_file: {self.traces_file!r}; expected a path (str or PathLike)."
            )

    def _check_numbers(self) -> None:
        port = self.prometheus_port
        if port is not None and (
            not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535  # noqa: PLR2004
        ):
            raise ValueError(f"Invalid prometheus_port: {port!r}; expected 0 to 65535.")
        ops = self.max_operations
        if not isinstance(ops, int) or isinstance(ops, bool):
            raise TypeError(f"Invalid max_operations: {ops!r}; expected an int >= 1.")
        if ops < 1:
            raise ValueError(f"Invalid max_operations: {ops!r}; expected an int >= 1.")
        for name in ("lag_interval", "blocked_threshold", "shutdown_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise TypeError(f"Invalid {name}: {value!r}; expected seconds (a number).")
            if not _MIN_INTERVAL_S <= value <= _MAX_INTERVAL_S:  # also refuses nan
                raise ValueError(
                    f"Invalid {name}: {value!r}; expected {_MIN_INTERVAL_S} to "
                    f"{_MAX_INTERVAL_S:.0f} seconds."
                )

    def _check_objects(self) -> None:
        for name in ("metrics", "loop_monitor", "exception_messages", "creation_sites"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"Invalid {name}: {value!r}; expected True or False.")
        if self.registry is not None and not _is_instance(
            self.registry, "prometheus_client.registry", "CollectorRegistry"
        ):
            raise TypeError(
                f"Invalid registry: {self.registry!r}; expected a prometheus_client "
                "CollectorRegistry."
            )
        if self.tracer_provider is not None and not _is_instance(
            self.tracer_provider, "opentelemetry.trace", "TracerProvider"
        ):
            raise TypeError(
                f"Invalid tracer_provider: {self.tracer_provider!r}; expected an OpenTelemetry "
                "TracerProvider."
            )
        if self.meter_provider is not None and not _is_instance(
            self.meter_provider, "opentelemetry.metrics", "MeterProvider"
        ):
            raise TypeError(
                f"Invalid meter_provider: {self.meter_provider!r}; expected an OpenTelemetry "
                "MeterProvider."
            )
        tf = self.task_filter
        if tf is not None and tf != "operation" and not callable(tf):
            raise TypeError(
                f"Invalid task_filter: {tf!r}; expected 'operation', a callable taking "
                "TaskMetadata, or None."
            )

    @property
    def export_requested(self) -> bool:
        """Whether the user asked asynctrace to export spans (a service name alone does not)."""
        if self.sdk_disabled:
            return False
        return bool(self.traces_exporters or self.traces_file)

    @property
    def tracing_note(self) -> str | None:
        """Why spans are off by the environment's choice, or None."""
        if self.sdk_disabled:
            return "disabled by OTEL_SDK_DISABLED"
        return None


def redact_url(url: str) -> str:
    """``url`` as asynctrace shows it (labels, logs, summary): no credentials, no query values.

    ``http://user:S3CRET@host:4318/v1/traces?api_key=K3Y`` shows as
    ``http://host:4318/v1/traces?api_key=REDACTED``.
    """
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit  # noqa: PLC0415

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port is not None else host
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        query = urlencode([(k, "REDACTED") for k, _ in pairs])
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:  # not a URL at all (a bad port, say): show nothing of it
        return "(unparsable URL)"


def _traces_exporters(env: Mapping[str, str], *, otlp_asked: bool) -> tuple[str, ...]:
    """OTEL_TRACES_EXPORTER as a tuple (``none`` alone: empty); ``otlp`` when asked for."""
    raw = env.get("OTEL_TRACES_EXPORTER")
    if raw:
        names = tuple(n.strip().lower() for n in raw.split(",") if n.strip())
        names = tuple(n for n in names if n != "none")
    else:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        names = ("otlp",) if endpoint else ()
    if otlp_asked and "otlp" not in names:  # otlp_endpoint= beats the environment
        names = ("otlp", *names)
    return names


def _otlp_url(env: Mapping[str, str], argument: object, protocol: str | None) -> str:
    """The URL spans go to, by the specification's rules (see the module docstring)."""
    grpc = protocol == "grpc"
    if isinstance(argument, str):
        base = argument
    else:
        signal = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if signal:
            return signal  # the full URL, as given
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or (
            "http://localhost:4317" if grpc else "http://localhost:4318"
        )
    if grpc:
        return base
    from urllib.parse import urlsplit, urlunsplit  # noqa: PLC0415

    parts = urlsplit(base)
    path = parts.path.rstrip("/")
    if not path.endswith("/v1/traces"):
        path += "/v1/traces"
    return urlunsplit(parts._replace(path=path))
