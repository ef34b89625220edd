"""A routing Twisted resource that speaks Matrix-shaped JSON.

Handlers are ``async def handler(request, **path_params)`` returning
``(status, json_body)``, or ``None`` when they wrote the response themselves
(streaming media). Any ``MatrixError`` becomes ``{errcode, error}``; anything
else is logged and answered 500 ``M_UNKNOWN`` without a traceback.
"""

import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from homeserver.errors import MatrixError, unrecognized
from homeserver.http.channel import send_now

logger = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[tuple[int, Any] | None]]

CORS_HEADERS = {
    b"Access-Control-Allow-Origin": b"*",
    b"Access-Control-Allow-Methods": b"GET, HEAD, POST, PUT, DELETE, OPTIONS",
    b"Access-Control-Allow-Headers": b"X-Requested-With, Content-Type, Authorization",
}

_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode_json(body: Any) -> bytes:
    return _json_encoder.encode(body).encode("utf-8")


def respond_json(request: Request, status: int, body: Any) -> None:
    if request._disconnected or request.finished:
        return
    if request.startedWriting:
        # A handler that streams its body failed part-way: another status line
        # cannot follow. Close the connection after what was written, so the
        # client sees a body shorter than announced: incomplete, not whole.
        transport = getattr(request.channel, "transport", None)
        if transport is not None:
            transport.loseConnection()
        return
    data = encode_json(body)
    request.setResponseCode(status)
    channel = request.channel
    if isinstance(channel, HTTPChannel):
        _write_http1_response(request, channel, data)
        return
    # HTTP/2: the stream frames the headers and body itself.
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(data)).encode())
    request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
    if request.method != b"HEAD":
        request.write(data)
    request.finish()


_JSON_HEADERS = (
    b"Content-Type: application/json\r\n"
    b"Cache-Control: no-cache, no-store, must-revalidate\r\n"
    b"Content-Length: %d\r\n"
)


def _write_http1_response(request: Request, channel: HTTPChannel, data: bytes) -> None:
    """Status line, headers and body in one write to the socket, then finish.

    What ``Request.write`` + ``finish`` would send, without their per-header
    writes: the headers already on the request (Server, Date, CORS, Connection)
    followed by the JSON ones. The request is marked as having written, so
    ``finish`` only does its bookkeeping (logging, next pipelined request).
    """
    transport = channel.transport
    head = [b"%s %d %s\r\n" % (request.clientproto, request.code, request.code_message)]
    for name, values in request.responseHeaders.getAllRawHeaders():
        for value in values:
            head.append(b"%s: %s\r\n" % (name, value))
    head.append(_JSON_HEADERS % len(data))
    head.append(b"\r\n")
    if request.method != b"HEAD":
        head.append(data)
    request.startedWriting = 1
    request.sentLength = len(data)
    send_now(transport, b"".join(head))
    request.finish()  # its bookkeeping only: everything is written


def respond_error(request: Request, error: MatrixError) -> None:
    respond_json(request, error.status, error.to_json())


def parse_json_body(request: Request) -> Any:
    """The request body as JSON, or 400 M_NOT_JSON."""
    try:
        request.content.seek(0)
        raw = request.content.read()
        return json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise MatrixError("M_NOT_JSON", "Content not JSON.") from e


def parse_json_object(request: Request) -> dict[str, Any]:
    body = parse_json_body(request)
    if not isinstance(body, dict):
        raise MatrixError("M_BAD_JSON", "Content must be a JSON object.")
    return body


class _Route:
    __slots__ = ("pattern", "handlers", "key")

    def __init__(self, pattern: re.Pattern[str], key: tuple[str, str, str] | None) -> None:
        self.pattern = pattern
        self.handlers: dict[bytes, Handler] = {}
        self.key = key


_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9_\-]+")


def _route_key(path_regex: str) -> tuple[str, str, str] | None:
    """Path segments 1, 2 and 4 of every path the route matches (``_matrix``,
    ``client``, ``rooms``), when the regex fixes them; None otherwise. Segment 3
    is the version, often an alternative such as ``(?:r0|v3)``."""
    segments = path_regex.removesuffix("$").split("/")
    if len(segments) < 5 or segments[0] != "":
        return None
    if not all(_PLAIN_SEGMENT.fullmatch(segments[i]) for i in (1, 2, 4)):
        return None
    return segments[1], segments[2], segments[4]


def _path_key(path: str) -> tuple[str, str, str] | None:
    segments = path.split("/", 5)
    if len(segments) < 5:
        return None
    return segments[1], segments[2], segments[4]


class RequestTracker:
    """Counts requests in flight so shutdown can wait for them to finish."""

    def __init__(self) -> None:
        self.in_flight = 0
        self._waiters: list[defer.Deferred[None]] = []

    def started(self) -> None:
        self.in_flight += 1

    def finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def wait_idle(self) -> "defer.Deferred[None]":
        if self.in_flight == 0:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(d)
        return d


class JsonResource(Resource):
    """The root resource of a listener: every path is routed here."""

    isLeaf = True

    def __init__(self, tracker: RequestTracker | None = None) -> None:
        super().__init__()
        self._routes: list[_Route] = []
        self._by_text: dict[str, _Route] = {}
        # Routes to try for a path's _path_key, in registration order: those
        # with that key and those without one. Built on first use.
        self._index: dict[tuple[str, str, str], list[_Route]] | None = None
        self._unkeyed: list[_Route] = []
        self.tracker = tracker or RequestTracker()

    def register(self, methods: str | list[str], path: str, handler: Handler) -> None:
        """Register ``handler`` for ``path``: a regex with named groups for parameters.

        Groups match the raw (percent-encoded) path and are unquoted before
        the handler sees them, so an encoded "/" stays inside its parameter.
        """
        route = self._by_text.get(path)
        if route is None:
            route = _Route(re.compile(path + "$"), _route_key(path))
            self._by_text[path] = route
            self._routes.append(route)
            self._index = None
        for method in [methods] if isinstance(methods, str) else methods:
            route.handlers[method.encode()] = handler
            if method == "GET":
                route.handlers.setdefault(b"HEAD", handler)

    def _build_index(self) -> dict[tuple[str, str, str], list[_Route]]:
        index: dict[tuple[str, str, str], list[_Route]] = {}
        for route in self._routes:
            if route.key is not None:
                index.setdefault(route.key, [])
        for route in self._routes:
            for key, routes in index.items():
                if route.key is None or route.key == key:
                    routes.append(route)
        self._unkeyed = [route for route in self._routes if route.key is None]
        self._index = index
        return index

    def _match(self, path: str) -> tuple[_Route, dict[str, str]] | None:
        index = self._index if self._index is not None else self._build_index()
        key = _path_key(path)
        routes = index.get(key, self._unkeyed) if key is not None else self._unkeyed
        for route in routes:
            m = route.pattern.match(path)
            if m:
                return route, {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
        return None

    def render(self, request: Request) -> int:
        for name, value in CORS_HEADERS.items():
            request.setHeader(name, value)
        path = request.path.decode("utf-8", "replace")
        found = self._match(path)
        if request.method == b"OPTIONS":
            # CORS pre-flight: any path answers 200 with the headers above.
            respond_json(request, 200, {})
            return NOT_DONE_YET
        if found is None:
            respond_error(request, unrecognized(404))
            return NOT_DONE_YET
        route, params = found
        handler = route.handlers.get(request.method)
        if handler is None:
            respond_error(request, unrecognized(405))
            return NOT_DONE_YET
        self.tracker.started()
        d = defer.ensureDeferred(handler(request, **params))
        # _on_failure also catches what _on_result raises (a body that is not
        # JSON, say): paired in one addCallbacks, that failure went to _done,
        # which dropped it, and the request was never answered.
        d.addCallback(self._on_result, request)
        d.addErrback(self._on_failure, request)
        d.addBoth(self._done)
        return NOT_DONE_YET

    def _done(self, _: Any) -> None:
        self.tracker.finished()

    @staticmethod
    def _on_result(result: tuple[int, Any] | None, request: Request) -> None:
        if result is not None:
            status, body = result
            respond_json(request, status, body)

    @staticmethod
    def _on_failure(failure: Failure, request: Request) -> None:
        error = failure.value
        if isinstance(error, MatrixError):
            respond_error(request, error)
            return
        logger.error(
            "%s %s failed",
            request.method.decode(),
            request.uri.decode("utf-8", "replace"),
            exc_info=(failure.type, failure.value, failure.getTracebackObject()),
        )
        respond_error(request, MatrixError("M_UNKNOWN", "Internal server error", 500))
