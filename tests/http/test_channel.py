"""HomeserverChannel and send_now (homeserver/http/channel.py) over real loopback TCP.

A ``_Site`` over a ``JsonResource`` is served on 127.0.0.1 as ``start_listeners``
serves a plain-TCP listener (``site.protocol = HomeserverChannel``). Clients are
blocking sockets on a worker thread, so every byte on the wire, and where the
stream is cut into packets, is the test's: a client can wait until the server
has read what it sent before sending more (``Client.send_pieces``), so each
piece is a separate ``dataReceived``.

Every case runs twice, against ``HomeserverChannel`` and against Twisted's stock
``HTTPChannel``: the fast head parser must answer as Twisted's line parser does.
``ChannelEquivalenceTests`` sends the same bytes to both and compares what
comes back byte for byte.
"""

import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import reactor, tcp, threads
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web.http import HTTPChannel

from homeserver.app.listeners import _Site
from homeserver.http.channel import HomeserverChannel, send_now
from homeserver.http.server import JsonResource, parse_json_body

TIMEOUT = 5.0  # seconds a client waits for any one thing before failing
MAX_HEADERS = 20  # set on the channel classes under test, so "too many" is quick to send
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\n\r\n"

ECHO = b"/_matrix/client/v3/echo/"
HELLO = b"/_matrix/client/v3/hello"
# A big response (bigger than the socket buffers) whose every byte is checked.
BIG_TEXT = "".join(chr(ord("a") + (i * 7) % 26) for i in range(3_000_000))


# --- server side ------------------------------------------------------------------
class _Registry:
    """What the server side saw, read by the tests (and, for the byte counts, by
    client threads waiting for the server to have read what they sent)."""

    def __init__(self) -> None:
        self.channels: set[Any] = set()
        self.connections = 0
        self.closed_ports: set[int] = set()  # client ports of connections gone
        self.fast_heads = 0  # HomeserverChannel._head_received calls
        self.reads_by_port: dict[int, int] = {}  # client port -> dataReceived calls
        self.bytes_by_port: dict[int, int] = {}  # client port -> bytes read
        self.release = threading.Event()  # lets the blocking handler answer
        self.handled: list[str] = []


def _channel_class(base: type, registry: _Registry) -> type:
    class Tracked(base):  # type: ignore[misc, valid-type]
        maxHeaders = MAX_HEADERS
        _refeeding = 0

        def connectionMade(self) -> None:  # noqa: N802
            registry.channels.add(self)
            registry.connections += 1
            self._client_port = self.transport.getPeer().port
            super().connectionMade()

        def connectionLost(self, reason: Any) -> None:  # noqa: N802
            registry.channels.discard(self)
            registry.closed_ports.add(self._client_port)
            super().connectionLost(reason)

        def setLineMode(self, extra: bytes = b"") -> Any:  # noqa: N802
            # Twisted feeds bytes it held back during a request to dataReceived
            # again: those are no new read from the socket.
            self._refeeding += 1
            try:
                return super().setLineMode(extra)
            finally:
                self._refeeding -= 1

        def dataReceived(self, data: bytes) -> Any:  # noqa: N802
            # Counted on the way in: a handler may block until the client acts.
            if not self._refeeding:
                port = self._client_port
                registry.reads_by_port[port] = registry.reads_by_port.get(port, 0) + 1
                registry.bytes_by_port[port] = registry.bytes_by_port.get(port, 0) + len(data)
            return super().dataReceived(data)

        if hasattr(base, "_head_received"):

            def _head_received(self, head: bytes) -> None:
                registry.fast_heads += 1
                super()._head_received(head)

    Tracked.__name__ = f"Tracked{base.__name__}"
    return Tracked


def _header(request: Any, name: bytes) -> str | None:
    value = request.getHeader(name)  # bytes in, bytes out: no UTF-8 decoding
    return None if value is None else value.decode("latin-1")


def _router(registry: _Registry) -> JsonResource:
    router = JsonResource()

    async def echo(request: Any, name: str) -> tuple[int, Any]:
        registry.handled.append(name)
        request.content.seek(0)
        raw = request.content.read()
        return 200, {
            "name": name,
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "clientproto": request.clientproto.decode(),
            "body": parse_json_body(request) if raw else None,
            "body_length": len(raw),
            "authorization": _header(request, b"Authorization"),
            "x_test": _header(request, b"x-test"),
            "headers": sorted(
                [name.decode(), [v.decode("latin-1") for v in values]]
                for name, values in request.requestHeaders.getAllRawHeaders()
            ),
            # The (cached) local address is the socket's.
            "host_ok": request.getHost() == request.channel.transport.getHost(),
        }

    async def hello(request: Any) -> tuple[int, Any]:
        n = request.args.get(b"n", [b""])[0].decode()
        registry.handled.append(f"hello{n}")
        return 200, {"hello": "world", "n": n}

    async def slow(request: Any, n: str) -> tuple[int, Any]:
        await deferLater(reactor, 0.01)
        registry.handled.append(f"slow{n}")
        return 200, {"slow": n}

    async def big(request: Any) -> tuple[int, Any]:
        return 200, {"big": BIG_TEXT}

    async def blocking(request: Any) -> tuple[int, Any]:
        # Answers on the reactor thread only once the client has gone (it sets
        # ``release`` after closing), before the reactor has seen it go.
        registry.release.wait(TIMEOUT)
        time.sleep(0.05)  # for the client's FIN/RST to arrive
        registry.handled.append("blocking")
        return 200, {"blocking": True}

    async def not_json(request: Any) -> tuple[int, Any]:
        return 200, {"not json": object()}

    async def stream_then_fail(request: Any) -> None:
        request.setHeader(b"Content-Length", b"100")
        request.write(b"x" * 10)
        raise RuntimeError("the stream broke")

    router.register(["PUT", "POST"], "/_matrix/client/v3/echo/(?P<name>[^/]+)", echo)
    router.register("GET", "/_matrix/client/v3/not_json", not_json)
    router.register("GET", "/_matrix/client/v3/broken_stream", stream_then_fail)
    router.register("GET", "/_matrix/client/v3/hello", hello)
    router.register("GET", r"/_matrix/client/v3/slow/(?P<n>\d+)", slow)
    router.register("GET", "/_matrix/client/v3/big", big)
    router.register("GET", "/_matrix/client/v3/blocking", blocking)
    return router


class _Server:
    """A _Site on 127.0.0.1 whose channel is ``base`` (tracked, see _channel_class)."""

    def __init__(self, base: type) -> None:
        self.registry = _Registry()
        self.router = _router(self.registry)
        self.site = _Site(self.router, reactor=reactor, timeout=None)
        self.site.displayTracebacks = False
        self.site.protocol = _channel_class(base, self.registry)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.port_number = self.port.getHost().port

    async def stop(self) -> None:
        self.registry.release.set()
        await self.port.stopListening()
        for channel in list(self.registry.channels):
            if channel.transport is not None:
                channel.transport.abortConnection()
        for _ in range(200):
            if not self.registry.channels:
                return
            await deferLater(reactor, 0.01)
        raise AssertionError("server connections did not close")

    async def wait_idle(self) -> None:
        """Until every connection is gone and no handler is running."""
        for _ in range(int(TIMEOUT * 100)):
            if not self.registry.channels and self.router.tracker.in_flight == 0:
                return
            await deferLater(reactor, 0.01)
        raise AssertionError("connections or requests still open")


# --- client side ------------------------------------------------------------------
class Response:
    def __init__(self, status: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def values(self, name: str) -> list[bytes]:
        wanted = name.lower().encode()
        return [v for n, v in self.headers if n.lower() == wanted]

    def header(self, name: str) -> bytes | None:
        values = self.values(name)
        assert len(values) <= 1, (name, values)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Response({self.status!r}, {self.headers!r}, {self.body[:200]!r})"


class Client:
    """A blocking HTTP/1.1 client over a raw socket; run it on a worker thread."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.sock = socket.create_connection(("127.0.0.1", server.port_number), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = self.sock.getsockname()[1]
        self.sent = 0
        self.buffer = b""
        self.eof = False

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sock.close()

    # sending
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def wait_read(self) -> None:
        """Until the server has read everything sent so far (or closed the connection)."""
        deadline = time.monotonic() + TIMEOUT
        registry = self.server.registry
        while registry.bytes_by_port.get(self.port, 0) < self.sent:
            if self.port in registry.closed_ports:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"server read {self.server.registry.bytes_by_port.get(self.port, 0)}"
                    f" of {self.sent} bytes"
                )
            time.sleep(0.0002)

    def send_pieces(self, pieces: Sequence[bytes], closing: bool = False) -> None:
        """Each piece as its own packet, read by the server before the next is sent.
        ``closing``: the server may close the connection meanwhile (after a 400)."""
        for piece in pieces:
            try:
                self.send(piece)
            except (BrokenPipeError, ConnectionResetError):
                if not closing:
                    raise
                return
            self.wait_read()

    @property
    def server_reads(self) -> int:
        return self.server.registry.reads_by_port.get(self.port, 0)

    # receiving
    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(262144)
        except ConnectionResetError:
            data = b""  # what the server sent before its reset is in the buffer
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not self._fill():
                raise AssertionError(f"connection closed after {self.buffer!r}")
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def read_response(self, head: bool = False) -> Response:
        """One response; ``head``: the answer to a HEAD (headers only)."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise AssertionError(f"connection closed after {self.buffer!r}")
        raw, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status, *lines = raw.split(b"\r\n")
        headers = []
        for line in lines:
            name, sep, value = line.partition(b": ")
            assert sep, f"bad response header line {line!r}"
            headers.append((name, value))
        response = Response(status, headers, b"")
        code = int(status.split(b" ")[1])
        if head or 100 <= code < 200 or code in (204, 304):
            return response
        length = response.header("Content-Length")
        if length is None:
            response.body = self.read_to_close()
        else:
            response.body = self._take(int(length))
        return response

    def read_to_close(self) -> bytes:
        """Everything until the server closes the connection."""
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        return data

    def assert_closed(self) -> None:
        rest = self.read_to_close()
        assert rest == b"", f"expected the connection closed, got {rest!r}"


def put(
    name: str, body: Any, headers: Sequence[bytes] = (), version: bytes = b"HTTP/1.1"
) -> bytes:
    data = json.dumps(body).encode()
    head = [b"PUT " + ECHO + name.encode() + b" " + version, b"Host: localhost",
            b"Content-Type: application/json", b"Content-Length: %d" % len(data), *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + data


def get(path: bytes = HELLO, headers: Sequence[bytes] = (), method: bytes = b"GET",
        version: bytes = b"HTTP/1.1") -> bytes:
    head = [method + b" " + path + b" " + version, b"Host: localhost", *headers]
    return b"\r\n".join(head) + b"\r\n\r\n"


# --- the tests --------------------------------------------------------------------
def _capture_logs(test: unittest.TestCase) -> list[logging.LogRecord]:
    """Warnings and errors logged through ``logging`` while the test runs (an
    exception in a handler or in respond_json is logged, not raised)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    test.addCleanup(logging.getLogger().removeHandler, handler)
    return records


def _assert_nothing_logged(test: unittest.TestCase, records: list[logging.LogRecord]) -> None:
    test.assertEqual([r.getMessage() for r in records], [], "the server logged problems")


class _ChannelTests:
    """Run for each channel class (subclasses set ``channel_class``)."""

    channel_class: type
    timeout = 20  # trial's per-test limit: a hang fails rather than blocks

    def setUp(self) -> None:
        self.server = _Server(self.channel_class)
        self.log_records = _capture_logs(self)

    async def tearDown(self) -> None:
        await self.server.stop()
        _assert_nothing_logged(self, self.log_records)

    def client(self) -> Client:
        return Client(self.server)

    async def talk(self, scenario: Callable[[Client], Any]) -> Any:
        """Run ``scenario(client)`` on a worker thread over a new connection."""

        def run() -> Any:
            with self.client() as c:
                return scenario(c)

        return await threads.deferToThread(run)

    def assert_json(self, response: Response, status: bytes = b"HTTP/1.1 200 OK") -> Any:
        self.assertEqual(response.status, status)
        self.assertEqual(response.values("Content-Type"), [b"application/json"])
        self.assertEqual(response.values("Content-Length"), [str(len(response.body)).encode()])
        self.assertEqual(response.values("Access-Control-Allow-Origin"), [b"*"])
        self.assertEqual(len(response.values("Access-Control-Allow-Methods")), 1)
        self.assertEqual(len(response.values("Access-Control-Allow-Headers")), 1)
        self.assertEqual(response.values("Cache-Control"),
                         [b"no-cache, no-store, must-revalidate"])
        self.assertEqual(len(response.values("Date")), 1)
        self.assertEqual(len(response.values("Server")), 1)
        self.assertEqual(response.values("Transfer-Encoding"), [])
        return response.json()

    def assert_echo(self, response: Response, name: str, body: Any, **expected: Any) -> dict:
        echoed = self.assert_json(response)
        self.assertEqual(echoed["name"], name)
        self.assertEqual(echoed["body"], body)
        for key, value in expected.items():
            self.assertEqual(echoed[key], value, key)
        return echoed

    def assert_hello(self, response: Response, n: str = "") -> None:
        self.assertEqual(self.assert_json(response), {"hello": "world", "n": n})

    def assert_fast_path_used(self, at_least: int = 1) -> None:
        if self.channel_class is HomeserverChannel:
            self.assertGreaterEqual(self.server.registry.fast_heads, at_least)

    # --- well-formed requests --------------------------------------------------
    async def test_put_with_json_body(self) -> None:
        body = {"msgtype": "m.text", "body": "héllo ☃", "n": [1, 2.5, None, True]}
        request = put("room1", body, [b"Authorization: Bearer s3cret_t0ken",
                                      b"X-Test:   padded value \t", b"x-lower: yes"])

        def scenario(c: Client) -> Response:
            c.send_pieces([request])
            self.assertEqual(c.server_reads, 1)
            return c.read_response()

        response = await self.talk(scenario)
        data = json.dumps(body).encode()
        echoed = self.assert_echo(
            response, "room1", body, method="PUT", authorization="Bearer s3cret_t0ken",
            x_test="padded value", body_length=len(data), clientproto="HTTP/1.1",
            uri="/_matrix/client/v3/echo/room1", host_ok=True,
        )
        self.assertEqual(echoed["headers"], [
            ["Authorization", ["Bearer s3cret_t0ken"]],
            ["Content-Length", [str(len(data))]],
            ["Content-Type", ["application/json"]],
            ["Host", ["localhost"]],
            ["X-Lower", ["yes"]],
            ["X-Test", ["padded value"]],
        ])
        self.assertEqual(response.header("Access-Control-Allow-Methods"),
                         b"GET, HEAD, POST, PUT, DELETE, OPTIONS")
        self.assertIsNone(response.header("Connection"))
        self.assert_fast_path_used()

    async def test_repeated_headers_and_header_name_case(self) -> None:
        request = get(b"/_matrix/client/v3/echo/x", [b"X-Test: one", b"x-TEST: two",
                                                      b"AUTHORIZATION: Bearer a"], b"POST")

        response = await self.talk(lambda c: (c.send(request), c.read_response())[1])
        echoed = self.assert_echo(response, "x", None, authorization="Bearer a", x_test="two")
        self.assertIn(["X-Test", ["one", "two"]], echoed["headers"])

    async def test_two_and_three_requests_in_one_packet(self) -> None:
        two = put("first", {"i": 1}) + get(HELLO + b"?n=2")
        three = get(b"/_matrix/client/v3/slow/3") + put("fourth", {"i": 4}) + get(HELLO + b"?n=5")
        three_fast = put("sixth", {"i": 6}) + get(HELLO + b"?n=7") + put("eighth", {"i": 8})

        def scenario(c: Client) -> list[Response]:
            responses = []
            for packet, count in ((two, 2), (three, 3), (three_fast, 3)):
                reads = c.server_reads
                c.send_pieces([packet])
                self.assertEqual(c.server_reads, reads + 1)  # one packet, one read
                responses += [c.read_response() for _ in range(count)]
            return responses

        r = await self.talk(scenario)
        self.assert_echo(r[0], "first", {"i": 1})
        self.assert_hello(r[1], "2")
        self.assertEqual(self.assert_json(r[2]), {"slow": "3"})
        self.assert_echo(r[3], "fourth", {"i": 4})
        self.assert_hello(r[4], "5")
        self.assert_echo(r[5], "sixth", {"i": 6})
        self.assert_hello(r[6], "7")
        self.assert_echo(r[7], "eighth", {"i": 8})
        self.assertEqual(self.server.registry.handled,
                         ["first", "hello2", "slow3", "fourth", "hello5", "sixth", "hello7",
                          "eighth"])
        self.assertEqual(self.server.registry.connections, 1)
        self.assert_fast_path_used(8)

    async def test_head_sent_byte_by_byte(self) -> None:
        request = put("bytes", {"a": "b"}, [b"Authorization: Bearer x"])

        def scenario(c: Client) -> Response:
            c.send_pieces([request[i:i + 1] for i in range(len(request))])
            self.assertEqual(c.server_reads, len(request))
            return c.read_response()

        response = await self.talk(scenario)
        self.assert_echo(response, "bytes", {"a": "b"}, authorization="Bearer x")

    async def test_request_cut_in_two_at_every_offset(self) -> None:
        """Over one connection: the request in two packets, cut after each byte."""
        request = put("cut", {"k": "v"}, [b"X-Test: t"])

        def scenario(c: Client) -> list[Response]:
            responses = []
            for i in range(1, len(request)):
                c.send_pieces([request[:i], request[i:]])
                responses.append(c.read_response())
            return responses

        responses = await self.talk(scenario)
        self.assertEqual(len(responses), len(request) - 1)
        for response in responses:
            self.assert_echo(response, "cut", {"k": "v"}, x_test="t")
        self.assertEqual(self.server.registry.connections, 1)

    async def test_head_and_body_cut_at_awkward_places(self) -> None:
        first = put("one", {"k": "v1"}, [b"X-Test: a"])
        second = put("two", {"k": "v2"}, [b"X-Test: b"])
        head_end = first.index(b"\r\n\r\n")
        cuts = [
            [first[:head_end + 1], first[head_end + 1:]],  # inside the blank line
            [first[:head_end + 2], first[head_end + 2:]],
            [first[:head_end + 3], first[head_end + 3:]],
            [first[:head_end + 4], first[head_end + 4:]],  # head, then body
            [first[:head_end + 5], first[head_end + 5:]],  # head and one byte of body
            [first[:first.index(b"\r\n") + 1], first[first.index(b"\r\n") + 1:]],  # \r | \n
            [first[:5], first[5:30], first[30:head_end], first[head_end:]],
            # the end of one request and the start of the next in one packet
            [first[:-3], first[-3:] + second[:10], second[10:]],
            [first + second[:head_end - 1], second[head_end - 1:]],
            [first + second[:head_end + 4], second[head_end + 4:]],
        ]

        def scenario(c: Client) -> list[Response]:
            responses = []
            for pieces in cuts:
                c.send_pieces(pieces)
                count = b"".join(pieces).count(b"PUT ")
                responses += [c.read_response() for _ in range(count)]
            return responses

        responses = await self.talk(scenario)
        names = [self.assert_json(r)["name"] for r in responses]
        self.assertEqual(names, ["one"] * 7 + ["one", "two"] * 3)
        for response in responses:
            echoed = response.json()
            self.assertEqual(echoed["body"], {"k": "v1" if echoed["name"] == "one" else "v2"})
            self.assertEqual(echoed["x_test"], "a" if echoed["name"] == "one" else "b")

    async def test_body_in_later_packets(self) -> None:
        request = put("later", {"text": "x" * 300})
        head_end = request.index(b"\r\n\r\n") + 4
        head, body = request[:head_end], request[head_end:]

        def scenario(c: Client) -> list[Response]:
            c.send_pieces([head])
            time.sleep(0.02)  # the server has the head and waits for the body
            self.assertFalse(c.buffer)
            c.send_pieces([body[:100], body[100:200], body[200:]])
            one = c.read_response()
            c.send_pieces([head, body])
            return [one, c.read_response()]

        for response in await self.talk(scenario):
            self.assert_echo(response, "later", {"text": "x" * 300}, body_length=len(body))
        self.assert_fast_path_used(2)

    async def test_chunked_body(self) -> None:
        data = json.dumps({"chunked": True, "pad": "y" * 40}).encode()
        head = (b"PUT " + ECHO + b"chunky HTTP/1.1\r\nHost: localhost\r\n"
                b"Transfer-Encoding: chunked\r\nAuthorization: Bearer c\r\n\r\n")
        chunked = (b"%x\r\n" % 10 + data[:10] + b"\r\n"
                   + b"%x;ext=1\r\n" % (len(data) - 10) + data[10:] + b"\r\n0\r\n\r\n")

        def scenario(c: Client) -> list[Response]:
            c.send_pieces([head + chunked])
            one = c.read_response()
            c.send_pieces([head, chunked[:3], chunked[3:20], chunked[20:-2], chunked[-2:]])
            two = c.read_response()
            c.send_pieces([head + chunked + get(HELLO + b"?n=after")])
            return [one, two, c.read_response(), c.read_response()]

        responses = await self.talk(scenario)
        for response in responses[:3]:
            echoed = self.assert_echo(response, "chunky", json.loads(data),
                                      authorization="Bearer c", body_length=len(data))
            self.assertIn(["Transfer-Encoding", ["chunked"]], echoed["headers"])
        self.assert_hello(responses[3], "after")

    async def test_expect_100_continue(self) -> None:
        request = put("cont", {"c": 1}, [b"Expect: 100-continue"])
        head_end = request.index(b"\r\n\r\n") + 4

        def scenario(c: Client) -> tuple[Response, bytes, Response]:
            c.send_pieces([request[:head_end]])
            interim = c.read_response()
            early = c.buffer
            c.send_pieces([request[head_end:]])
            return interim, early, c.read_response()

        interim, early, final = await self.talk(scenario)
        self.assertEqual(interim.status, b"HTTP/1.1 100 Continue")
        self.assertEqual(interim.headers, [])
        self.assertEqual(early, b"")
        self.assert_echo(final, "cont", {"c": 1})

    async def test_head_on_a_get_route(self) -> None:
        def scenario(c: Client) -> tuple[Response, Response, Response]:
            c.send(get(method=b"HEAD") + get(HELLO + b"?n=g"))
            head = c.read_response(head=True)
            after = c.read_response()  # right after the HEAD's headers: no body came
            c.send(get(method=b"GET"))
            return head, after, c.read_response()

        head, after, full = await self.talk(scenario)
        self.assert_hello(after, "g")
        self.assert_hello(full, "")
        self.assertEqual(head.status, b"HTTP/1.1 200 OK")
        self.assertEqual(head.body, b"")
        self.assertEqual(head.header("Content-Length"), str(len(full.body)).encode())
        self.assertEqual(head.header("Content-Type"), b"application/json")
        self.assertEqual(head.header("Access-Control-Allow-Origin"), b"*")

    async def test_obsolete_line_folding(self) -> None:
        request = get(b"/_matrix/client/v3/echo/fold",
                      [b"X-Test: first", b"  second", b"\tthird", b"Authorization: Bearer", b" f"],
                      b"POST")
        response = await self.talk(lambda c: (c.send(request), c.read_response())[1])
        # As Twisted joins them: one space, each continuation's leading blanks dropped.
        self.assert_echo(response, "fold", None, x_test="first second third",
                         authorization="Bearer f")

    async def test_blank_line_before_a_request_is_tolerated(self) -> None:
        def scenario(c: Client) -> list[Response]:
            c.send(b"\r\n" + get(HELLO + b"?n=1"))
            one = c.read_response()
            # IE's CRLF after a POST body, the next request in the same packet.
            c.send(put("ie", {"i": 1}) + b"\r\n" + get(HELLO + b"?n=2"))
            two, three = c.read_response(), c.read_response()
            c.send_pieces([b"\r\n", get(HELLO + b"?n=3")])
            return [one, two, three, c.read_response()]

        one, two, three, four = await self.talk(scenario)
        self.assert_hello(one, "1")
        self.assert_echo(two, "ie", {"i": 1})
        self.assert_hello(three, "2")
        self.assert_hello(four, "3")

    async def test_two_blank_lines_before_a_request_are_refused(self) -> None:
        def scenario(c: Client) -> bytes:
            c.send(b"\r\n\r\n" + get())
            return c.read_to_close()

        self.assertEqual(await self.talk(scenario), BAD_REQUEST)

    # --- malformed requests: 400 and the connection closed ----------------------
    async def assert_bad_request(self, request: bytes, pieces: int = 1) -> None:
        def scenario(c: Client) -> bytes:
            size = -(-len(request) // pieces)
            c.send_pieces([request[i:i + size] for i in range(0, len(request), size)],
                          closing=True)
            return c.read_to_close()

        self.assertEqual(await self.talk(scenario), BAD_REQUEST, request[:200])
        self.assertEqual(self.server.registry.handled, [])

    async def test_header_line_without_colon(self) -> None:
        await self.assert_bad_request(get(headers=[b"X-Test value"]))
        await self.assert_bad_request(get(headers=[b"X-Test value"]), pieces=3)
        # A valid header name and nothing else, first or last.
        await self.assert_bad_request(get(headers=[b"X-Novalue"]))
        await self.assert_bad_request(get(headers=[b"X-Novalue", b"X-Test: v"]))

    async def test_only_one_answer_to_a_bad_head_with_more_requests_behind(self) -> None:
        """After the 400, nothing more is read: the bad lines of what follows
        are not answered again, the good requests not handled."""
        await self.assert_bad_request(
            get(headers=[b"X-Test value"]) + get(headers=[b"Y value"]) + get(HELLO + b"?n=no")
        )
        await self.assert_bad_request(
            get(headers=[b"X-Test: a\x00"]) + b"X: y\r\nZ value\r\n\r\n" + get()
        )
        # A blank line next would end the refused request's head: not handled.
        await self.assert_bad_request(get(headers=[b"X-Test value"]) + b"\r\n" + get())
        await self.assert_bad_request(get(headers=[b"X-Test: \x00"]) + b"\r\n\r\n")

    async def test_space_before_the_colon(self) -> None:
        await self.assert_bad_request(get(headers=[b"X-Test : value"]))
        await self.assert_bad_request(put("a", {}, [b"Content-Length : 2"]))
        await self.assert_bad_request(get(headers=[b"X-Test : value"]), pieces=4)

    async def test_bad_characters_in_a_header(self) -> None:
        await self.assert_bad_request(get(headers=[b"X-Test: a\x00b"]))
        await self.assert_bad_request(get(headers=[b"X-Test: a\x00b"]), pieces=2)
        await self.assert_bad_request(get(headers=[b"X-Test: a\rb"]))
        await self.assert_bad_request(get(headers=[b"X-Test: a\nb"]))
        await self.assert_bad_request(get(headers=[b"X-T\x00est: ab"]))
        await self.assert_bad_request(get(headers=[b": no name"]))

    async def test_two_content_lengths(self) -> None:
        await self.assert_bad_request(put("a", {}, [b"Content-Length: 2"]))
        await self.assert_bad_request(put("a", {}, [b"content-length: 2"]), pieces=3)
        await self.assert_bad_request(put("a", {}, [b"Transfer-Encoding: chunked"]))

    async def test_bad_content_length_or_transfer_encoding(self) -> None:
        for value in (b"abc", b"-1", b"1e3", b"0x10", b"2 2"):
            request = get(b"/_matrix/client/v3/echo/a", [b"Content-Length: " + value], b"PUT")
            await self.assert_bad_request(request)
        await self.assert_bad_request(
            get(b"/_matrix/client/v3/echo/a", [b"Transfer-Encoding: gzip"], b"PUT")
        )

    async def test_bad_request_line(self) -> None:
        await self.assert_bad_request(b"GET /x\r\nHost: a\r\n\r\n")
        await self.assert_bad_request(b"GET\r\n\r\n")

    async def test_malformed_chunked_body(self) -> None:
        await self.assert_bad_request(
            get(b"/_matrix/client/v3/echo/a", [b"Transfer-Encoding: chunked"], b"PUT")
            + b"zz\r\n{}\r\n0\r\n\r\n"
        )

    async def test_header_count_limit(self) -> None:
        # Host plus MAX_HEADERS - 1 more: just allowed.
        headers = [b"X-H%d: v" % i for i in range(MAX_HEADERS - 1)]
        request = get(b"/_matrix/client/v3/echo/n", headers, b"POST")
        response = await self.talk(lambda c: (c.send(request), c.read_response())[1])
        self.assertEqual(len(self.assert_echo(response, "n", None)["headers"]), MAX_HEADERS)
        self.server.registry.handled.clear()
        # One more: refused, in one packet or line by line.
        headers.append(b"X-One-Too-Many: v")
        request = get(b"/_matrix/client/v3/echo/n", headers, b"POST")
        await self.assert_bad_request(request)
        await self.assert_bad_request(request, pieces=len(headers) + 2)

    async def test_head_size_limit(self) -> None:
        limit = self.channel_class.totalHeadersSize
        self.assertEqual(limit, 16384)

        def request_of_size(size: int) -> bytes:
            # Twisted counts the request line and header lines, without CRLFs.
            line = b"POST /_matrix/client/v3/echo/s HTTP/1.1"
            lines = [line]
            remaining = size - len(line)
            while remaining > 0:
                value_size = min(remaining, 1000) - len(b"X-Pad: ")
                lines.append(b"X-Pad: " + b"p" * value_size)
                remaining -= len(lines[-1])
            assert sum(map(len, lines)) == size
            return b"\r\n".join(lines) + b"\r\n\r\n"

        response = await self.talk(
            lambda c: (c.send(request_of_size(limit)), c.read_response())[1]
        )
        self.assert_echo(response, "s", None)
        self.server.registry.handled.clear()
        await self.assert_bad_request(request_of_size(limit + 1))
        await self.assert_bad_request(request_of_size(limit + 1), pieces=5)
        # A request line alone, of the limit and over it.
        path = b"/_matrix/client/v3/hello?n=" + b"q" * 100
        line = b"GET " + path + b" HTTP/1.1"
        line = b"GET " + path + b"q" * (limit - len(line)) + b" HTTP/1.1"
        self.assertEqual(len(line), limit)
        response = await self.talk(lambda c: (c.send(line + b"\r\n\r\n"), c.read_response())[1])
        self.assertEqual(response.status, b"HTTP/1.1 200 OK")
        self.server.registry.handled.clear()
        # One byte more is also over LineReceiver.MAX_LENGTH: Twisted closes the
        # connection without an answer.
        too_long = line.replace(b"GET /", b"GET //") + b"\r\n\r\n"
        rest = await self.talk(lambda c: (c.send(too_long), c.read_to_close())[1])
        self.assertEqual(rest, b"")
        self.assertEqual(self.server.registry.handled, [])

    async def test_a_result_that_is_not_json_is_answered_500(self) -> None:
        """respond_json failing (here encoding the body) is the handler's failure:
        logged and answered 500, and the connection serves the next request."""
        def scenario(c: Client) -> list[Response]:
            c.send(get(b"/_matrix/client/v3/not_json") + get(HELLO + b"?n=next"))
            return [c.read_response(), c.read_response()]

        error, after = await self.talk(scenario)
        self.assertEqual(
            self.assert_json(error, b"HTTP/1.1 500 Internal Server Error"),
            {"errcode": "M_UNKNOWN", "error": "Internal server error"},
        )
        self.assert_hello(after, "next")
        self.assertEqual([r.getMessage() for r in self.log_records],
                         ["GET /_matrix/client/v3/not_json failed"])
        self.log_records.clear()

    async def test_a_failure_after_the_body_started_cuts_the_connection(self) -> None:
        """Nothing is written after the body began (no second status line, no
        JSON error): the connection closes, so the body is shorter than announced."""
        def scenario(c: Client) -> bytes:
            c.send(get(b"/_matrix/client/v3/broken_stream"))
            return c.read_to_close()

        data = await self.talk(scenario)
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK"), head)
        self.assertIn(b"Content-Length: 100", head.split(b"\r\n"))
        self.assertEqual(body, b"x" * 10)
        self.assertEqual([r.getMessage() for r in self.log_records],
                         ["GET /_matrix/client/v3/broken_stream failed"])
        self.log_records.clear()

    # --- connection handling ---------------------------------------------------
    async def test_connection_close(self) -> None:
        def scenario(c: Client) -> tuple[Response, bytes]:
            # The request after the "close" one is never answered.
            c.send(put("bye", {"b": 1}, [b"Connection: close"]) + get(HELLO + b"?n=x"))
            return c.read_response(), c.read_to_close()

        response, rest = await self.talk(scenario)
        self.assert_echo(response, "bye", {"b": 1})
        self.assertEqual(response.values("Connection"), [b"close"])
        self.assertEqual(rest, b"")
        self.assertEqual(self.server.registry.handled, ["bye"])

    async def test_http_1_0(self) -> None:
        for extra in ([], [b"Connection: keep-alive"]):
            def scenario(c: Client, extra: list[bytes] = extra) -> tuple[Response, bytes]:
                c.send(get(HELLO + b"?n=10", extra, version=b"HTTP/1.0"))
                return c.read_response(), c.read_to_close()

            response, rest = await self.talk(scenario)
            self.assert_json(response, b"HTTP/1.0 200 OK")
            self.assertEqual(response.json(), {"hello": "world", "n": "10"})
            self.assertEqual(rest, b"")
        await self.server.wait_idle()

    async def test_keep_alive_200_requests(self) -> None:
        def scenario(c: Client) -> list[Response]:
            responses = []
            for i in range(200):
                c.send(put(f"k{i}", {"i": i}) if i % 2 else get(HELLO + b"?n=%d" % i))
                responses.append(c.read_response())
            return responses

        responses = await self.talk(scenario)
        self.assertEqual(len(responses), 200)
        for i, response in enumerate(responses):
            if i % 2:
                self.assert_echo(response, f"k{i}", {"i": i})
            else:
                self.assert_hello(response, str(i))
        self.assertEqual(self.server.registry.connections, 1)
        self.assert_fast_path_used(200)

    async def test_big_response_then_a_pipelined_one(self) -> None:
        """The big response is more than the socket takes at once: send_now queues
        the rest, and the next response goes out after it, not into it."""
        def scenario(c: Client) -> list[Response]:
            c.send(get(b"/_matrix/client/v3/big") + get(HELLO + b"?n=after-big"))
            time.sleep(0.1)  # let the server fill the socket buffers first
            return [c.read_response(), c.read_response()]

        big, after = await self.talk(scenario)
        self.assertEqual(self.assert_json(big), {"big": BIG_TEXT})
        self.assert_hello(after, "after-big")

    async def test_client_gone_before_an_async_response(self) -> None:
        def scenario(c: Client) -> None:
            c.send(get(b"/_matrix/client/v3/slow/1"))
            c.wait_read()

        await self.talk(scenario)
        await self.server.wait_idle()
        await deferLater(reactor, 0.05)
        self.assertEqual(self.server.registry.handled, ["slow1"])

    async def test_response_written_after_the_client_reset_the_connection(self) -> None:
        """The handler answers (on the reactor thread) after the client sent a RST
        and before the reactor has noticed: the write fails and nothing raises."""
        def scenario(c: Client) -> None:
            c.send(get(b"/_matrix/client/v3/blocking"))
            c.wait_read()
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.sock.close()
            self.server.registry.release.set()

        await self.talk(scenario)
        await self.server.wait_idle()
        self.assertEqual(self.server.registry.handled, ["blocking"])

    async def test_response_written_after_the_client_closed(self) -> None:
        def scenario(c: Client) -> None:
            c.send(get(b"/_matrix/client/v3/blocking") + get(HELLO + b"?n=never"))
            c.wait_read()
            c.sock.close()
            self.server.registry.release.set()

        await self.talk(scenario)
        await self.server.wait_idle()
        self.assertEqual(self.server.registry.handled[0], "blocking")


class HomeserverChannelTests(_ChannelTests, unittest.TestCase):
    channel_class = HomeserverChannel

    async def test_split_heads_use_the_line_parser_whole_heads_the_fast_path(self) -> None:
        request = get(HELLO + b"?n=s")
        line_end = request.index(b"\r\n")

        def scenario(c: Client) -> list[Response]:
            # The request line complete, the head not: Twisted's lines from there.
            c.send_pieces([request[:line_end + 5], request[line_end + 5:]])
            one = c.read_response()
            # Cut inside the request line: the whole head is there at the next read.
            c.send_pieces([request[:10], request[10:]])
            two = c.read_response()
            c.send_pieces([request])
            return [one, two, c.read_response()]

        for response in await self.talk(scenario):
            self.assert_hello(response, "s")
        self.assertEqual(self.server.registry.fast_heads, 2)

    async def test_addresses_are_asked_once_per_connection(self) -> None:
        """Twisted's Request asks its channel for both addresses on every
        request: the transport is asked once per connection."""
        calls: list[str] = []
        tracked = self.server.site.protocol

        class Counting(tracked):  # type: ignore[misc, valid-type]
            def connectionMade(self) -> None:  # noqa: N802
                super().connectionMade()
                for name in ("getHost", "getPeer"):
                    original = getattr(self.transport, name)

                    def counted(name: str = name, original: Any = original) -> Any:
                        calls.append(name)
                        return original()

                    setattr(self.transport, name, counted)

        self.server.site.protocol = Counting

        def scenario(c: Client) -> list[Response]:
            c.send(b"".join(get(HELLO + b"?n=%d" % i) for i in range(5)))
            return [c.read_response() for _ in range(5)]

        for i, response in enumerate(await self.talk(scenario)):
            self.assert_hello(response, str(i))
        self.assertEqual(sorted(calls), ["getHost", "getPeer"])


class TwistedChannelTests(_ChannelTests, unittest.TestCase):
    """The same cases against Twisted's own parser: what HomeserverChannel must match."""

    channel_class = HTTPChannel


class ChannelEquivalenceTests(unittest.TestCase):
    """The same bytes to a HomeserverChannel and an HTTPChannel server: the same
    bytes back (but for the Date header), in one packet or cut up."""

    timeout = 30

    INPUTS = [
        put("a", {"x": 1}, [b"Authorization: Bearer t"]),
        put("a", {"x": 1}, [b"X-Test:\tTabbed\t "]),
        put("a", {"x": 1}, [b"X-Test:"]),
        put("a", {"x": 1}, [b"X-Test: first", b" second"]),
        put("a", {"x": 1}, [b"X-Test: first", b"\t second", b"X-Test: again"]),
        put("a", {"x": 1}, [b" X-Test: folded-first"]),
        put("a", {"x": 1}, [b"Transfer-Encoding: identity"]),
        put("a", {"x": 1}, [b"Content-Length: 7"]),
        put("a", {"x": 1}, [b"Content-Length:  7 "]),
        put("a", {"x": 1}, [b"Expect: 100-continue"]),
        put("a", {"x": 1}, [b"Expect: 100-continue"], version=b"HTTP/1.0"),
        put("a", {"x": 1}, [b"Connection: close"]),
        put("a", {"x": 1}, [b"Connection: keep-alive close"]),
        put("a", {"x": 1}, [b"X-Test: a\x00"]),
        put("a", {"x": 1}, [b"X-Test value"]),
        put("a", {"x": 1}, [b"X Test: value"]),
        put("a", {"x": 1}, [b"X-Test(: value"]),
        put("a", {"x": 1}, [b"X-Test: caf\xc3\xa9 \xff"]),
        put("a", {"x": 1}, [b"Content-Length: 07"]),
        put("a", {"x": 1}, [b"content-length: 7"]),
        put("a", {"x": 1}) + b"\r\n" + put("b", {"y": 2}),
        put("a", {"x": 1}) + b"\r\n\r\n" + put("b", {"y": 2}),
        get(HELLO + b"?n=1") + get(method=b"HEAD") + get(HELLO + b"?n=2"),
        get(b"/_matrix/client/v3/nowhere") + get(HELLO),
        get(HELLO, method=b"DELETE") + get(HELLO),
        get(HELLO, method=b"OPTIONS") + get(HELLO),
        get(HELLO, version=b"HTTP/1.0") + get(HELLO),
        get(HELLO, version=b"HTTP/2.0"),
        get(HELLO, version=b"FOO/1.1"),
        b"GET " + HELLO + b"\r\n\r\n",
        b"GET  " + HELLO + b"  HTTP/1.1\r\n\r\n",
        b"\r\n" + get(HELLO),
        b"\r\n\r\n" + get(HELLO),
        b"\n" + get(HELLO),
        get(HELLO).replace(b"\r\n", b"\n", 1),
        get(HELLO, [b"X-H%d: v" % i for i in range(MAX_HEADERS - 1)]),
        get(HELLO, [b"X-H%d: v" % i for i in range(MAX_HEADERS)]),
        get(b"/_matrix/client/v3/echo/c", [b"Transfer-Encoding: Chunked"], b"PUT")
        + b"2\r\n{}\r\n0\r\n\r\n" + get(HELLO),
        get(b"/_matrix/client/v3/echo/c", [b"Transfer-Encoding: chunked",
                                           b"Transfer-Encoding: chunked"], b"PUT")
        + b"2\r\n{}\r\n0\r\n\r\n",
        get(headers=[b"X-Novalue"]),
        get(headers=[b"X-Novalue", b"X-Test: v"]),
        get(headers=[b"X-Test value"]) + get(headers=[b"Y value"]) + get(HELLO),
        get(headers=[b"X-Test: a\x00"]) + b"X: y\r\nZ value\r\n\r\n" + get(),
        get(HELLO + b"?n=1") + get(headers=[b"Content-Length: x"]) + get(headers=[b"Bad"]),
        get(headers=[b"X-Test value"]) + b"\r\n" + get(),
    ]

    def setUp(self) -> None:
        self.servers = [_Server(HomeserverChannel), _Server(HTTPChannel)]
        self.log_records = _capture_logs(self)

    async def tearDown(self) -> None:
        for server in self.servers:
            await server.stop()
        _assert_nothing_logged(self, self.log_records)

    @staticmethod
    def _transcript(server: _Server, pieces: Sequence[bytes]) -> bytes:
        # Answered if the connection is still open; the server closes it after.
        sentinel = get(HELLO + b"?n=end", [b"Connection: close"])
        with Client(server) as c:
            c.send_pieces([*pieces, sentinel], closing=True)
            data = c.read_to_close()
        # Date changes with the clock.
        return b"\r\n".join(
            line for line in data.split(b"\r\n") if not line.startswith(b"Date: ")
        )

    async def compare(self, cut: Callable[[bytes], list[bytes]]) -> None:
        for request in self.INPUTS:
            ours, twisted = [
                await threads.deferToThread(self._transcript, server, cut(request))
                for server in self.servers
            ]
            self.assertEqual(ours, twisted, request)
            self.assertTrue(ours.startswith(b"HTTP/1."), (request, ours))

    async def test_in_one_packet(self) -> None:
        await self.compare(lambda request: [request])
        self.assertGreater(self.servers[0].registry.fast_heads, len(self.INPUTS))

    async def test_cut_in_three(self) -> None:
        await self.compare(
            lambda r: [r[: len(r) // 3], r[len(r) // 3: 2 * len(r) // 3], r[2 * len(r) // 3:]]
        )

    async def test_cut_after_each_line(self) -> None:
        await self.compare(lambda r: _cut_after(r, b"\n"))

    async def test_cut_inside_each_line_end(self) -> None:
        await self.compare(lambda r: _cut_after(r, b"\r"))


def _cut_after(data: bytes, byte: bytes) -> list[bytes]:
    """``data`` in pieces, each ending with ``byte`` (but the last)."""
    pieces, start = [], 0
    while (i := data.find(byte, start)) != -1:
        pieces.append(data[start:i + 1])
        start = i + 1
    if start < len(data):
        pieces.append(data[start:])
    return pieces


class _Holder(Protocol):
    """The server side of a plain connection, for send_now to write to."""

    def connectionMade(self) -> None:  # noqa: N802
        self.lost: Deferred[None] = Deferred()
        self.factory.made.callback(self)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.lost.callback(None)


class SendNowTests(unittest.TestCase):
    """send_now on a real tcp.Server transport, in the states it meets."""

    timeout = 20

    async def setUp(self) -> None:
        factory = Factory.forProtocol(_Holder)
        factory.made = Deferred()
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.client = socket.create_connection(
            ("127.0.0.1", self.port.getHost().port), timeout=TIMEOUT
        )
        self.protocol = await factory.made
        self.transport = self.protocol.transport
        self.assertIs(type(self.transport), tcp.Server)

    async def tearDown(self) -> None:
        self.client.close()
        if not self.protocol.lost.called:
            self.transport.abortConnection()
        await self.protocol.lost
        await self.port.stopListening()

    def queued(self) -> int:
        return len(self.transport.dataBuffer) - self.transport.offset + self.transport._tempDataLen

    async def read(self, size: int) -> bytes:
        def run() -> bytes:
            data = b""
            while len(data) < size:
                chunk = self.client.recv(262144)
                if not chunk:
                    break
                data += chunk
            return data

        return await threads.deferToThread(run)

    async def test_straight_to_the_socket_when_nothing_is_queued(self) -> None:
        send_now(self.transport, b"hello")
        self.assertEqual(self.queued(), 0)
        # In the kernel already: no reactor turn needed.
        self.client.settimeout(1)
        self.assertEqual(self.client.recv(100), b"hello")

    async def test_after_what_is_queued(self) -> None:
        self.transport.write(b"A" * 1000)  # waits for the reactor's next turn
        self.assertGreater(self.queued(), 0)
        send_now(self.transport, b"B" * 10)
        self.assertEqual(await self.read(1010), b"A" * 1000 + b"B" * 10)

    async def test_what_the_socket_does_not_take_is_queued_and_sent_in_order(self) -> None:
        self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        big = bytes(range(256)) * 8192  # 2 MiB
        send_now(self.transport, big)
        self.assertGreater(self.queued(), 0)  # the socket took only part of it
        send_now(self.transport, b"END")
        data = await self.read(len(big) + 3)
        self.assertEqual(len(data), len(big) + 3)
        self.assertTrue(data == big + b"END", "bytes lost or out of order")

    async def test_a_connection_reset_by_the_peer(self) -> None:
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.client.close()
        time.sleep(0.05)  # the RST is in; the reactor has not seen it
        send_now(self.transport, b"too late")  # does not raise
        send_now(self.transport, b"and again")
        await self.protocol.lost  # the reactor finds the error on its own

    async def test_other_transports_get_an_ordinary_write(self) -> None:
        transport = StringTransport()
        send_now(transport, b"data")
        self.assertEqual(transport.value(), b"data")
        # A connection being closed: queued behind what it still has to send.
        self.transport.write(b"first ")
        self.transport.loseConnection()
        send_now(self.transport, b"last")
        self.assertEqual(await self.read(100), b"first last")
        await self.protocol.lost
