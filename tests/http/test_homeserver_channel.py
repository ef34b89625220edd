"""HomeserverChannel's cached local address, over a real loopback socket (the
parser and send_now are tested in test_channel.py)."""

import json
import socket
import time
from typing import Any

from twisted.internet import reactor, threads
from twisted.trial import unittest

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

    async def stream_then_fail(request: Any) -> None:
        request.setHeader(b"Content-Length", b"100")
        request.write(b"x" * 10)
        raise RuntimeError("the stream broke")

    router.register("GET", "/_matrix/client/v3/broken", stream_then_fail)
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


class _ServedTestCase(unittest.TestCase):
    """A HomeserverChannel site over ``_router()`` on a loopback port."""

    def setUp(self) -> None:
        site = _Site(_router(), reactor=reactor)
        site.protocol = HomeserverChannel
        self.listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    def tearDown(self) -> Any:
        return self.listening.stopListening()


class LocalAddressTests(_ServedTestCase):
    """The connection's local and peer addresses are asked for once per
    connection (Twisted's Request asks on every request: getsockname() and a
    new address object each time)."""

    def _send(self, *args: Any, **kwargs: Any) -> Any:
        return threads.deferToThread(_exchange, self.port, *args, **kwargs)

    async def test_addresses_are_asked_once_per_connection(self) -> None:
        calls: list[str] = []

        class Counting(HomeserverChannel):
            def makeConnection(self, transport: Any) -> None:  # noqa: N802
                for name in ("getHost", "getPeer"):
                    original = getattr(transport, name)

                    def counted(name: str = name, original: Any = original) -> Any:
                        calls.append(name)
                        return original()

                    setattr(transport, name, counted)
                super().makeConnection(transport)

        self.listening.factory.protocol = Counting
        payload = b"".join(_put(f"h{i}", b"{}") for i in range(5))
        data = await self._send([payload], 5)
        responses = _split_responses(data)[0]
        self.assertEqual([json.loads(r[2])["name"] for r in responses],
                         [f"h{i}" for i in range(5)])
        self.assertEqual(sorted(calls), ["getHost", "getPeer"])


class StreamFailureTests(_ServedTestCase):
    """A handler that fails after its response started: the connection is cut
    (the client sees a short body), no error document is spliced into it."""

    async def test_failure_after_the_headers_cuts_the_connection(self) -> None:
        def fetch() -> bytes:
            with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock:
                sock.sendall(b"GET /_matrix/client/v3/broken HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while more := sock.recv(65536):
                    data += more
                return data

        data = await threads.deferToThread(fetch)
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK"))
        self.assertIn(b"Content-Length: 100", head)
        self.assertEqual(body, b"x" * 10)  # nothing after: no second status line, no JSON

