"""Server middleware: one correlation scope per request, its id from the caller or fresh.

Two middlewares, one behaviour:

- :func:`aiohttp_middleware` for aiohttp's ``web.Application(middlewares=[...])``;
- :class:`ASGIMiddleware` for any ASGI app (Starlette, FastAPI, Django's ASGI handler) under
  any ASGI server (uvicorn, hypercorn).

Per HTTP request:

1. The caller's W3C ``traceparent`` (with ``tracestate``), when valid, is made current: the
   request's spans continue the caller's trace.
2. The correlation id is the caller's ``X-Request-ID`` when it is an acceptable id (1 to 128
   printable characters); a bad one is logged (escaped, cut to 200 characters) and replaced.
   Without one, the caller's trace id (32 hex digits), else a fresh id from
   :func:`asynctrace.random_correlation_id`.
3. The request runs in ``asynctrace.correlation(id, span_name=...)``: tasks it creates carry
   the id, its logs carry the id and the trace, and with tracing on the block's span is the
   request's span (named ``"{method} {route}"`` on aiohttp, ``"{method}"`` on ASGI, where the
   route is not known to a middleware).
4. The response carries the id in ``X-Request-ID``.

Neither needs ``install()``; without it the ids still flow through context variables.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Final

from asynctrace._metadata import TaskMetadata, random_correlation_id
from asynctrace._scope import correlation

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["REQUEST_ID_HEADER", "ASGIMiddleware", "aiohttp_middleware", "request_id"]

REQUEST_ID_HEADER: Final = "X-Request-ID"
logger: Final = logging.getLogger("asynctrace")

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]


def request_id(given: str | None, parent: object = None) -> str:
    """The request's correlation id: ``given`` when acceptable, else the trace's, else fresh.

    Args:
        given: The caller's ``X-Request-ID`` header, or None.
        parent: The OpenTelemetry context extracted from the request (``propagate.extract``),
            or None.
    """
    if given is not None:
        try:
            TaskMetadata(correlation_id=given)  # the library's own check of an id
        except (TypeError, ValueError):
            logger.warning(
                "asynctrace: rejected %s header %s", REQUEST_ID_HEADER, repr(given)[:200]
            )
        else:
            return given
    if parent is not None:
        from opentelemetry import trace  # noqa: PLC0415 - only with a parent to read

        span_context = trace.get_current_span(parent).get_span_context()  # type: ignore[arg-type]
        if span_context.is_valid:
            return f"{span_context.trace_id:032x}"
    return random_correlation_id()


def _extract(headers: Mapping[str, str]) -> tuple[object, bool]:
    """The caller's OpenTelemetry context, and whether it holds a valid span (a parent)."""
    try:
        from opentelemetry import propagate, trace  # noqa: PLC0415
    except ImportError:  # pragma: no cover - opentelemetry-api is a dependency
        return None, False
    parent = propagate.extract(headers)
    return parent, trace.get_current_span(parent).get_span_context().is_valid


def _attach(parent: object) -> object:
    from opentelemetry import context  # noqa: PLC0415

    return context.attach(parent)  # type: ignore[arg-type]


def _detach(token: object) -> None:
    from opentelemetry import context  # noqa: PLC0415

    context.detach(token)  # type: ignore[arg-type]


def aiohttp_middleware(*, header: str = REQUEST_ID_HEADER) -> Any:  # noqa: ANN401 - aiohttp's
    """An aiohttp middleware giving each request its correlation scope (see the module doc).

    Usage::

        app = web.Application(middlewares=[asynctrace.web.aiohttp_middleware()])

    Args:
        header: The request and response header that carries the id.
    """
    from aiohttp import web  # noqa: PLC0415 - only for aiohttp apps

    @web.middleware
    async def asynctrace_middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        parent, continues = _extract(request.headers)
        rid = request_id(request.headers.get(header), parent)
        token = _attach(parent) if continues else None
        try:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            with correlation(rid, span_name=f"{request.method} {route}"):
                response = await handler(request)
        finally:
            if token is not None:
                _detach(token)
        response.headers[header] = rid
        return response

    return asynctrace_middleware


class ASGIMiddleware:
    """Pure ASGI middleware giving each HTTP request its correlation scope (see the module doc).

    Usage::

        app = asynctrace.web.ASGIMiddleware(app)          # any ASGI app
        app.add_middleware(asynctrace.web.ASGIMiddleware)  # Starlette, FastAPI

    WebSocket and lifespan scopes pass through unchanged.
    """

    def __init__(self, app: _ASGIApp, *, header: str = REQUEST_ID_HEADER) -> None:
        """Wrap ``app``; ``header`` carries the id in requests and responses."""
        self.app = app
        self._header = header
        self._raw_header = header.lower().encode("latin-1")

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """Handle one ASGI connection."""
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        headers = _decode_headers(scope.get("headers", ()))
        parent, continues = _extract(headers)
        rid = request_id(headers.get(self._header.lower()), parent)
        raw_id = rid.encode("latin-1", "replace")
        raw_header = self._raw_header

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            if message.get("type") == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", ()) if k.lower() != raw_header]
                message["headers"] = [*kept, (raw_header, raw_id)]
            await send(message)

        token = _attach(parent) if continues else None
        try:
            with correlation(rid, span_name=str(scope.get("method", "HTTP"))):
                await self.app(scope, receive, send_with_id)
        finally:
            if token is not None:
                _detach(token)


def _decode_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """ASGI's header pairs as a mapping with lower-case names (the first of repeated ones)."""
    headers: dict[str, str] = {}
    for name, value in raw:
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers
