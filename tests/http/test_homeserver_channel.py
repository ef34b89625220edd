"""HomeserverChannel (homeserver/http/channel.py) over a real loopback socket.

Every case runs against Twisted's own ``HTTPChannel`` too: the fast head parser
must answer exactly as Twisted's line parser does, whatever way the bytes are
cut into packets. Clients are raw sockets (on a worker thread) so the bytes on
the wire are the test's.
"""

import json
import socket
import time
from typing import Any

from twisted.internet import reactor, threads
from twisted.trial import unittest
from twisted.web.http import HTTPChannel

from homeserver.app.listeners import _Site
from homeserver.http.channel import HomeserverChannel
from homeserver.http.server import JsonResource

TIMEOUT = 5.0


def _router() -> JsonResource:
    router = JsonResource()

    async def echo(request: Any, name: str) -> tuple[int, Any]:
        request.content.seek(0)
        body = request.content.read()
        return 200, {
            "name": name,
            "body": body.decode("utf-8", "replace"),
            "authorization": request.getHeader("authorization"),
            "folded": request.getHeader("x-folded"),
            "method": request.method.decode(),
        }

    router.register(["PUT", "POST", "GET"], "/_matrix/client/v3/echo/(?P<name>[^/]+)", echo)
    return router


def _exchange(port: int, chunks: list[bytes], responses: int, pause: float = 0.0) -> bytes:
    """Send ``chunks`` (with ``pause`` between them), read until ``responses``
    complete responses arrived or the server closed; the raw bytes read."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for chunk in chunks:
            sock.sendall(chunk)
            if pause:
                time.sleep(pause)
        data = b""
        deadline = time.monotonic() + TIMEOUT
        while len(_split_responses(data)[0]) < responses and time.monotonic() < deadline:
            try:
                more = sock.recv(65536)
            except TimeoutError:
                break
            if not more:
                break
            data += more
        return data


def _closed_after(port: int, payload: bytes) -> tuple[bytes, bool]:
    """Send ``payload``; everything read until the server closes, and whether it did."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(payload)
        data = b""
        while True:
            try:
                more = sock.recv(65536)
            except TimeoutError:
                return data, False
            if not more:
                return data, True
            data += more


def _split_responses(data: bytes) -> tuple[list[tuple[bytes, dict[bytes, bytes], bytes]], bytes]:
    """Complete responses (status line, headers by lower-case name, body) in ``data``."""
    out = []
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return out, data
        lines = data[:end].split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if lines[0].startswith(b"HTTP/1.1 100"):
            out.append((lines[0], headers, b""))
            data = data[end + 4:]
            continue
        length = int(headers.get(b"content-length", b"0"))
        if len(data) < end + 4 + length:
            return out, data
        out.append((lines[0], headers, data[end + 4: end + 4 + length]))
        data = data[end + 4 + length:]


def _put(name: str, body: bytes, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return (
        b"PUT /_matrix/client/v3/echo/%s %s\r\nHost: localhost\r\n"
        b"Authorization: Bearer abc\r\nContent-Type: application/json\r\n%s"
        b"Content-Length: %d\r\n\r\n" % (name.encode(), version, extra, len(body))
    ) + body


class _ChannelTests:
    channel_class: Any = None

    def setUp(self) -> None:
        site = _Site(_router(), reactor=reactor)
        site.protocol = self.channel_class
        self.listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    def tearDown(self) -> Any:
        return self.listening.stopListening()

    def _send(self, *args: Any, **kwargs: Any) -> Any:
        return threads.deferToThread(_exchange, self.port, *args, **kwargs)

    def assertEcho(self, response: Any, name: str, body: bytes) -> None:  # noqa: N802
        status, headers, payload = response
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertEqual(headers[b"access-control-allow-origin"], b"*")
        self.assertEqual(int(headers[b"content-length"]), len(payload))
        echoed = json.loads(payload)
        self.assertEqual(echoed["name"], name)
        self.assertEqual(echoed["body"], body.decode())
        self.assertEqual(echoed["authorization"], "Bearer abc")

    async def test_one_request(self) -> None:
        body = b'{"msgtype":"m.text","body":"hi"}'
        data = await self._send([_put("one", body)], 1)
        responses, rest = _split_responses(data)
        self.assertEqual(rest, b"")
        self.assertEcho(responses[0], "one", body)

    async def test_pipelined_requests_in_one_packet(self) -> None:
        bodies = [b'{"n":%d}' % i for i in range(3)]
        data = await self._send([b"".join(_put(f"p{i}", b) for i, b in enumerate(bodies))], 3)
        responses, _ = _split_responses(data)
        self.assertEqual(len(responses), 3)
        for i, body in enumerate(bodies):
            self.assertEcho(responses[i], f"p{i}", body)

    async def test_request_cut_byte_by_byte(self) -> None:
        payload = _put("bytes", b'{"a":1}')
        data = await self._send([payload[i:i + 1] for i in range(len(payload))], 1)
        self.assertEcho(_split_responses(data)[0][0], "bytes", b'{"a":1}')

    async def test_request_cut_at_awkward_places(self) -> None:
        payload = _put("cut", b'{"abc":"defghij"}')
        head_end = payload.index(b"\r\n\r\n")
        for cut in (head_end, head_end + 1, head_end + 2, head_end + 4, len(payload) - 1):
            data = await self._send([payload[:cut], payload[cut:]], 1, pause=0.02)
            self.assertEcho(_split_responses(data)[0][0], "cut", b'{"abc":"defghij"}')

    async def test_chunked_body(self) -> None:
        payload = (
            b"POST /_matrix/client/v3/echo/chunked HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer abc\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\n{\"a\":\r\n3\r\n12}\r\n0\r\n\r\n"
        )
        data = await self._send([payload], 1)
        self.assertEcho(_split_responses(data)[0][0], "chunked", b'{"a":12}')

    async def test_expect_continue(self) -> None:
        body = b'{"big":true}'
        head = _put("cont", body, extra=b"Expect: 100-continue\r\n")[: -len(body)]
        data = await self._send([head, body], 2, pause=0.05)
        responses, _ = _split_responses(data)
        self.assertEqual(responses[0][0], b"HTTP/1.1 100 Continue")
        self.assertEcho(responses[1], "cont", body)

    async def test_head_request(self) -> None:
        payload = b"HEAD /_matrix/client/v3/echo/h HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer abc\r\n\r\n"

        def two_heads() -> bytes:
            with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock:
                sock.sendall(payload + payload)
                data = b""
                while data.count(b"\r\n\r\n") < 2:
                    more = sock.recv(65536)
                    if not more:
                        break
                    data += more
                return data

        data = await threads.deferToThread(two_heads)
        # Two complete header blocks, no bodies, though Content-Length is announced.
        self.assertEqual(data.count(b"HTTP/1.1 200 OK"), 2)
        head, _, rest = data.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: ", head)
        self.assertTrue(rest.startswith(b"HTTP/1.1 200 OK"))

    async def test_folded_header(self) -> None:
        data = await self._send([_put("fold", b"{}", extra=b"X-Folded: first\r\n  second\r\n")], 1)
        status, _, payload = _split_responses(data)[0][0]
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(json.loads(payload)["folded"], "first second")

    async def test_leading_blank_line_is_tolerated(self) -> None:
        data = await self._send([b"\r\n" + _put("ie", b"{}")], 1)
        self.assertEcho(_split_responses(data)[0][0], "ie", b"{}")

    async def _assert_bad_request(self, payload: bytes) -> None:
        data, closed = await threads.deferToThread(_closed_after, self.port, payload)
        self.assertTrue(data.startswith(b"HTTP/1.1 400 Bad Request"), data[:80])
        self.assertTrue(closed)

    async def test_header_without_colon(self) -> None:
        await self._assert_bad_request(_put("x", b"{}", extra=b"NoColonHere\r\n"))

    async def test_space_before_colon(self) -> None:
        await self._assert_bad_request(_put("x", b"{}", extra=b"X-Bad : value\r\n"))

    async def test_nul_in_value(self) -> None:
        await self._assert_bad_request(_put("x", b"{}", extra=b"X-Bad: a\x00b\r\n"))

    async def test_two_content_lengths(self) -> None:
        await self._assert_bad_request(_put("x", b"{}", extra=b"Content-Length: 2\r\n"))

    async def test_bad_content_length(self) -> None:
        await self._assert_bad_request(
            b"PUT /_matrix/client/v3/echo/x HTTP/1.1\r\nContent-Length: 1x\r\n\r\n{}"
        )

    async def test_too_many_headers(self) -> None:
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(self.channel_class.maxHeaders + 1))
        await self._assert_bad_request(_put("x", b"{}", extra=many))

    async def test_head_too_large(self) -> None:
        big = b"X-Big: " + b"a" * (self.channel_class.totalHeadersSize + 10) + b"\r\n"
        data, closed = await threads.deferToThread(_closed_after, self.port, _put("x", b"{}", big))
        self.assertTrue(closed)
        self.assertNotIn(b"200 OK", data)

    async def test_connection_close(self) -> None:
        data, closed = await threads.deferToThread(
            _closed_after, self.port, _put("c", b"{}", extra=b"Connection: close\r\n")
        )
        self.assertTrue(closed)
        response = _split_responses(data)[0][0]
        self.assertEcho(response, "c", b"{}")
        self.assertEqual(response[1][b"connection"], b"close")

    async def test_http_1_0(self) -> None:
        data, closed = await threads.deferToThread(
            _closed_after, self.port, _put("old", b"{}", version=b"HTTP/1.0")
        )
        self.assertTrue(closed)
        self.assertTrue(data.startswith(b"HTTP/1.0 200 OK"), data[:40])
        self.assertEqual(json.loads(data.partition(b"\r\n\r\n")[2])["name"], "old")

    async def test_many_requests_on_one_connection(self) -> None:
        def many() -> list[Any]:
            results = []
            with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock:
                pending = b""
                for i in range(200):
                    sock.sendall(_put(f"k{i}", b'{"i":%d}' % i))
                    while True:
                        found, pending = _split_responses(pending)
                        if found:
                            results.extend(found)
                            break
                        pending += sock.recv(65536)
            return results

        results = await threads.deferToThread(many)
        self.assertEqual(len(results), 200)
        for i, response in enumerate(results):
            self.assertEcho(response, f"k{i}", b'{"i":%d}' % i)

    async def test_client_gone_before_the_response(self) -> None:
        def send_and_leave() -> None:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.sendall(_put("gone", b"{}"))
            sock.close()  # RST: the response has nowhere to go

        await threads.deferToThread(send_and_leave)
        # The server goes on answering others, and nothing was logged as an error.
        data = await self._send([_put("after", b"{}")], 1)
        self.assertEcho(_split_responses(data)[0][0], "after", b"{}")
        self.assertEqual(self.flushLoggedErrors(), [])


class HomeserverChannelTests(_ChannelTests, unittest.TestCase):
    channel_class = HomeserverChannel

    async def test_local_address_is_asked_once_per_connection(self) -> None:
        calls = []

        class Counting(HomeserverChannel):
            def makeConnection(self, transport: Any) -> None:  # noqa: N802
                original = transport.getHost

                def get_host() -> Any:
                    calls.append(1)
                    return original()

                transport.getHost = get_host
                super().makeConnection(transport)

        self.listening.factory.protocol = Counting
        payload = b"".join(_put(f"h{i}", b"{}") for i in range(5))
        data = await self._send([payload], 5)
        self.assertEqual(len(_split_responses(data)[0]), 5)
        self.assertEqual(len(calls), 1)


class TwistedChannelTests(_ChannelTests, unittest.TestCase):
    """The same cases against Twisted's channel: the behaviour to match."""

    channel_class = HTTPChannel
