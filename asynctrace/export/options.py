"""install()'s telemetry options: given as arguments or taken from the standard environment.

Read once, at install. Nothing here imports OpenTelemetry or prometheus_client: a provider or
registry the user passes is checked against classes from the modules the user already
imported to make it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from asynctrace._metadata import TaskMetadata

if TYPE_CHECKING:  # annotations only: nothing is imported at run time
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider
    from prometheus_client import CollectorRegistry

__all__ = ["DEFAULT_TRACES_FILE", "ExportOptions", "Protocol", "TaskFilterOption"]

Protocol = Literal["http/protobuf", "grpc"]
TaskFilterOption = Callable[[TaskMetadata], bool] | Literal["operation"] | None
DEFAULT_TRACES_FILE: Final = "asynctrace-traces.jsonl"


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

    @classmethod
    def resolve(cls, env: Mapping[str, str], **given: Any) -> ExportOptions:  # noqa: ANN401
        """Fill unset options from ``env`` and validate all of them."""
        if given.get("service_name") is None:
            given["service_name"] = env.get("OTEL_SERVICE_NAME") or None
        if given.get("otlp_endpoint") is None:
            given["otlp_endpoint"] = (
                env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or None
            )
        if given.get("otlp_protocol") is None:
            proto = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL"
            )
            given["otlp_protocol"] = proto or None
        if given.get("prometheus_port") is None and env.get("ASYNCTRACE_PROMETHEUS_PORT"):
            raw = env["ASYNCTRACE_PROMETHEUS_PORT"]
            try:
                given["prometheus_port"] = int(raw)
            except ValueError:
                raise ValueError(
                    f"Invalid ASYNCTRACE_PROMETHEUS_PORT: {raw!r}; expected a port number."
                ) from None
        options = cls(**given)
        options.validate()
        return options

    def validate(self) -> None:
        """Raise TypeError/ValueError naming the first bad option."""
        if self.otlp_protocol not in (None, "http/protobuf", "grpc"):
            raise ValueError(
                f"Invalid otlp_protocol: {self.otlp_protocol!r}; expected 'http/protobuf' or "
                "'grpc'."
            )
        port = self.prometheus_port
        if port is not None and (
            not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535  # noqa: PLR2004
        ):
            raise ValueError(f"Invalid prometheus_port: {port!r}; expected 0 to 65535.")
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
        if not isinstance(self.max_operations, int) or self.max_operations < 1:
            raise ValueError(
                f"Invalid max_operations: {self.max_operations!r}; expected an int >= 1."
            )
        for name in ("lag_interval", "blocked_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"Invalid {name}: {value!r}; expected seconds > 0.")

    @property
    def export_requested(self) -> bool:
        """Whether the user asked asynctrace to set up trace export."""
        return bool(self.service_name or self.otlp_endpoint or self.traces_file)
