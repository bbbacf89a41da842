"""Bad input at the edge: a clear TypeError/ValueError naming the value, nothing half-done.

Every case checks the message names the value and what is accepted, that nothing stays
installed or started, and (for coroutines) that no "never awaited" warning is left behind:
``filterwarnings = error`` turns such a warning into a failure.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import asynctrace
from tests.conftest import PY314


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"lag_interval": math.nan}, ValueError, "Invalid lag_interval: nan; expected 0.001 to"),
        ({"lag_interval": 1e-12}, ValueError, "Invalid lag_interval: 1e-12"),
        ({"blocked_threshold": math.inf}, ValueError, "Invalid blocked_threshold: inf"),
        ({"shutdown_timeout": 0}, ValueError, "Invalid shutdown_timeout: 0"),
        ({"lag_interval": "1"}, TypeError, "Invalid lag_interval: '1'; expected seconds"),
        ({"prometheus_addr": None}, TypeError, "Invalid prometheus_addr: None; expected a str"),
        ({"otlp_endpoint": 123}, TypeError, "Invalid otlp_endpoint: 123; expected a str"),
        ({"otlp_endpoint": "ftp://x"}, ValueError, "expected an http:// or https:// URL"),
        ({"meter_provider": 5}, TypeError, "Invalid meter_provider: 5; expected an OpenTelemetry"),
        ({"max_operations": "3"}, TypeError, "Invalid max_operations: '3'; expected an int"),
        ({"max_operations": True}, TypeError, "Invalid max_operations: True"),
        ({"service_name": 5}, TypeError, "Invalid service_name: 5; expected a str or None"),
        ({"traces_file": 5}, TypeError, "Invalid traces_file: 5; expected a path"),
        (
            {"otlp_endpont": "http://x"},
            TypeError,
            (
                "install() got unexpected keyword argument(s) 'otlp_endpont' (did you mean "
                "'otlp_endpoint'?); accepted: loop, id_generator"
            ),
        ),
        ({"promethus_port": 1}, TypeError, "'promethus_port' (did you mean 'prometheus_port'?)"),
    ],
)
def test_bad_install_options(options: dict[str, Any], error: type[Exception], message: str) -> None:
    """Each refused with its own message; nothing installed, no server started."""
    with pytest.raises(error) as raised:
        asynctrace.install(registry=CollectorRegistry(), prometheus_port=0, **options)
    assert message in str(raised.value)
    assert asynctrace.uninstall() is False


def test_a_closed_loop_is_refused() -> None:
    """install(loop=closed) names the loop; lag monitoring elsewhere is not affected."""
    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(ValueError, match="is closed"):
        asynctrace.install(loop=loop)
    assert asynctrace.uninstall() is False


def test_uninstall_refuses_what_is_not_a_loop() -> None:
    with pytest.raises(TypeError, match="Invalid loop: 5; expected an asyncio event loop"):
        asynctrace.uninstall(5)  # type: ignore[arg-type]


def test_create_task_refuses_a_context_that_is_not_one() -> None:
    """create_task(context="x"): TypeError naming it, the coroutine closed (no warning)."""

    async def work() -> int:
        return 1

    async def main() -> None:
        asynctrace.install(metrics=False)
        coro = work()
        with pytest.raises(TypeError, match="Invalid context: 'x'; expected a contextvars"):
            asynctrace.create_task(coro, context="x")  # type: ignore[arg-type]
        assert coro.cr_frame is None  # closed: never "never awaited"
        if PY314:  # the keywords reach the factory through plain asyncio
            coro = work()
            with pytest.raises(TypeError, match="Invalid context: 'x'"):
                asyncio.create_task(coro, context="x", operation_name="w")  # type: ignore[arg-type,call-arg]
            assert coro.cr_frame is None

    asyncio.run(main())


def test_uninstall_after_the_factory_was_replaced_raises_as_documented() -> None:
    """uninstall() where someone replaced asynctrace's factory: RuntimeError, not False."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        asynctrace.install(metrics=False)
        loop.set_task_factory(None)  # someone else's change
        with pytest.raises(RuntimeError, match="its task factory was replaced"):
            asynctrace.uninstall()

    asyncio.run(main())


def test_credentials_in_the_endpoint_are_never_shown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """userinfo and query values are redacted in labels, logs and the summary."""
    from prometheus_client import generate_latest  # noqa: PLC0415

    registry = CollectorRegistry()
    endpoint = "http://user:S3CRET@127.0.0.1:9/?api_key=K3Y"
    with caplog.at_level(logging.ERROR, logger="asynctrace"):
        asynctrace.install(otlp_endpoint=endpoint, registry=registry, loop_monitor=False)

        async def work() -> None:
            await asynctrace.create_task(asyncio.sleep(0), operation_name="w")

        asyncio.run(work())
        asynctrace.flush(10)
        shown = [
            generate_latest(registry).decode(),
            str(asynctrace.summary()),
            repr(asynctrace.summary().otlp_endpoint),
            *(r.getMessage() for r in caplog.records),
        ]
    text = "\n".join(shown)
    assert "S3CRET" not in text
    assert "K3Y" not in text
    assert "user" not in text
    assert "http://127.0.0.1:9/v1/traces?api_key=REDACTED" in text


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX paths")
def test_redact_url_keeps_what_locates_the_collector() -> None:
    from asynctrace.export.options import redact_url  # noqa: PLC0415

    assert redact_url("https://a:b@h.example:4318/v1/traces?x=1&y=") == (
        "https://h.example:4318/v1/traces?x=REDACTED&y=REDACTED"
    )
    assert redact_url("http://[::1]:4318") == "http://[::1]:4318"
    assert redact_url("http://h:99999999/") == "(unparsable URL)"


def test_a_task_name_cannot_forge_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """The blocked-loop warning escapes the task's name: no line of its own for a forger."""
    import time  # noqa: PLC0415

    async def blocker() -> None:
        time.sleep(0.4)  # noqa: ASYNC251 - blocking the loop is the point

    async def main() -> None:
        asynctrace.install(registry=CollectorRegistry(), lag_interval=0.05, blocked_threshold=0.1)
        await asyncio.sleep(0.1)  # the heartbeat runs
        await asynctrace.create_task(blocker(), name="x\nCRITICAL forged: all is lost")

    with caplog.at_level(logging.WARNING, logger="asynctrace"):
        asyncio.run(main())
    (message,) = [r.getMessage() for r in caplog.records if "event loop blocked" in r.getMessage()]
    assert "\nCRITICAL forged" not in message
    assert "in task x\\nCRITICAL forged: all is lost (operation" in message


def test_an_exception_message_is_recorded_once_or_not_at_all() -> None:
    """Once, in the exception event (status: the type only); never, when asked for."""
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: PLC0415
        InMemorySpanExporter,
    )

    async def fail() -> None:
        number = f"{4111}-{1111}"  # built at run time: not in the stack's source lines
        raise ValueError(f"card {number} declined")

    for messages in (True, False):
        asynctrace.testing.reset()
        provider = TracerProvider()
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))

        async def main() -> None:
            asynctrace.install(tracer_provider=provider, metrics=False, exception_messages=messages)  # noqa: B023
            with pytest.raises(ValueError, match="declined"):
                await asynctrace.create_task(fail(), operation_name="pay")

        asyncio.run(main())
        (span,) = [s for s in exporter.get_finished_spans() if s.name == "pay"]
        text = repr(span.to_json())
        assert text.count("4111-1111") == (1 if messages else 0)
        assert span.status.description == "ValueError"
        (event,) = span.events
        assert event.attributes is not None
        assert event.attributes["exception.type"] == "ValueError"
        assert "fail" in str(event.attributes["exception.stacktrace"])
