"""How media bytes move, end to end against a real server (SQLite): every way in
and out must give back exactly the bytes that went in.

Uploads: bodies announced over INLINE_MAX go straight from the socket to the
spool file (splice) on a worker thread, and the connection is handed back to
Twisted after them (keep-alive, pipelining, ``Expect: 100-continue``, a client
that goes away); bodies without a length go through the worker lanes; over TLS
everything goes through Twisted. Downloads: sendfile() from the page cache,
a slow reader (full socket: pieces through Twisted), ranges, content that is
not in the page cache (worker-thread reads), TLS.
"""

import asyncio
import hashlib
import json
import os
import socket
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from homeserver.services.media.storage import content_key
from homeserver.services.media.uploads import INLINE_MAX
from tests.media.helpers import CLIENT_MEDIA, MEDIA, mxc_parts, run, server_config
from tests.support.clients import register, start_e2e_server
from tests.support.server import RunningServer
from tests.support.synapse import start_federating_server

MIB = 1024 * 1024
BIG = 5 * MIB + 12345  # over INLINE_MAX, not a multiple of any chunk size
assert BIG > INLINE_MAX


@pytest.fixture(scope="module")
def server(tmp_path_factory: Any) -> Any:
    with ExitStack() as stack:
        yield start_e2e_server(
            stack, tmp_path_factory.mktemp("hs-transfer"), "sqlite3", max_upload_size="100M"
        )


@pytest.fixture(scope="module")
def token(server: RunningServer) -> str:
    async def go() -> str:
        client = await register(server)
        await client.close()
        return client.access_token

    return run(go())


def _media_dir(server: RunningServer) -> Path:
    path = Path(server_config(server)["media_store_path"])
    return path if path.is_absolute() else Path(server.config_paths[0]).parent / path


def _spool_files(server: RunningServer) -> list[str]:
    return os.listdir(_media_dir(server) / "tmp")


def _download_url(mxc: str) -> str:
    server_name, media_id = mxc_parts(mxc)
    return f"{CLIENT_MEDIA}/download/{quote(server_name)}/{media_id}"


# --- raw HTTP/1.1 over one socket -----------------------------------------------------------


def _connect(server: RunningServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def _read_response(sock: socket.socket, buffered: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One response (status, lower-case headers, body); ``buffered`` keeps what follows."""
    while b"\r\n\r\n" not in buffered:
        data = sock.recv(65536)
        assert data, "connection closed before the headers"
        buffered += data
    head, _, rest = bytes(buffered).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    buffered[:] = rest
    if status == 100:
        return status, headers, b""
    length = int(headers.get("content-length", "0"))
    while len(buffered) < length:
        data = sock.recv(1024 * 1024)
        assert data, "connection closed in the body"
        buffered += data
    body = bytes(buffered[:length])
    del buffered[:length]
    return status, headers, body


def _upload_request(token: str, length: int, extra: str = "") -> bytes:
    return (
        f"POST {MEDIA}/upload?filename=t.bin HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def _get_request(token: str, path: str, extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n{extra}\r\n"
    ).encode()


def test_direct_upload_then_pipelined_requests_on_the_same_connection(server, token):
    data = os.urandom(BIG)
    with _connect(server) as sock:
        # The body and the next request in one go: only the body is taken from the socket.
        sock.sendall(
            _upload_request(token, len(data)) + data
            + _get_request(token, "/_matrix/client/versions")
        )
        buffered = bytearray()
        status, _, body = _read_response(sock, buffered)
        assert status == 200, body
        mxc = json.loads(body)["content_uri"]
        status, _, body = _read_response(sock, buffered)
        assert status == 200 and "versions" in json.loads(body)
        # Still the same connection: download what went up.
        sock.sendall(_get_request(token, _download_url(mxc)))
        status, headers, body = _read_response(sock, buffered)
        assert status == 200 and headers["content-length"] == str(len(data))
        assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()


def test_small_upload_then_big_download_on_the_same_connection(server, token):
    """The bigger reads of an upload body end with it (they would slow the download)."""
    big = os.urandom(BIG)
    big_mxc = _post(server, token, big)
    small = os.urandom(MIB)
    with _connect(server) as sock:
        buffered = bytearray()
        sock.sendall(_upload_request(token, len(small)) + small)
        status, _, body = _read_response(sock, buffered)
        assert status == 200, body
        for mxc, data in ((big_mxc, big), (json.loads(body)["content_uri"], small)):
            sock.sendall(_get_request(token, _download_url(mxc)))
            status, _, body = _read_response(sock, buffered)
            assert status == 200 and body == data


def test_direct_upload_with_expect_100_continue(server, token):
    data = os.urandom(BIG)
    with _connect(server) as sock:
        sock.sendall(_upload_request(token, len(data), "Expect: 100-continue\r\n"))
        buffered = bytearray()
        status, _, _ = _read_response(sock, buffered)
        assert status == 100
        sock.sendall(data)
        status, _, body = _read_response(sock, buffered)
        assert status == 200, body
        mxc = json.loads(body)["content_uri"]
    status, body = _get(server, token, _download_url(mxc))
    assert status == 200 and body == data


def test_client_going_away_mid_upload_leaves_nothing_behind(server, token):
    with _connect(server) as sock:
        sock.sendall(_upload_request(token, 8 * MIB) + os.urandom(3 * MIB))
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while _spool_files(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _spool_files(server) == []
    # And the server goes on serving uploads.
    data = os.urandom(BIG)
    mxc = _post(server, token, data)
    assert _get(server, token, _download_url(mxc)) == (200, data)


# --- aiohttp ----------------------------------------------------------------------------------


def _post(server: RunningServer, token: str, data: Any, **kwargs: Any) -> str:
    async def go() -> str:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
        async with aiohttp.ClientSession() as session:
            async with session.post(
                server.base_url + f"{MEDIA}/upload", data=data, headers=headers, **kwargs
            ) as response:
                body = await response.read()
                assert response.status == 200, body
                return json.loads(body)["content_uri"]

    return run(go())


def _get(
    server: RunningServer, token: str, path: str, headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        all_headers = {"Authorization": f"Bearer {token}", **(headers or {})}
        async with aiohttp.ClientSession() as session:
            async with session.get(
                server.base_url + path, headers=all_headers, **kwargs
            ) as response:
                return response.status, await response.read()

    return run(go())


def test_upload_without_a_length_goes_through_the_worker_lanes(server, token):
    data = os.urandom(11 * MIB + 7)

    async def chunks():  # no Content-Length: chunked transfer encoding
        for i in range(0, len(data), 300_000):
            yield data[i : i + 300_000]

    mxc = _post(server, token, chunks())
    assert _get(server, token, _download_url(mxc)) == (200, data)


def test_small_uploads_round_trip(server, token):
    for size in (0, 1, 65536, MIB, INLINE_MAX):
        data = os.urandom(size)
        mxc = _post(server, token, data)
        assert _get(server, token, _download_url(mxc)) == (200, data), size


def test_ranges_are_byte_exact(server, token):
    data = os.urandom(3 * MIB + 5)
    url = _download_url(_post(server, token, data))
    size = len(data)
    for header, expected in [
        ("bytes=0-0", data[:1]),
        ("bytes=100-1048675", data[100:1048676]),
        ("bytes=131071-131073", data[131071:131074]),
        ("bytes=-5", data[-5:]),
        ("bytes=2000000-", data[2000000:]),
        (f"bytes=0-{size + 10}", data),
    ]:
        status, body = _get(server, token, url, {"Range": header})
        assert status == 206, header
        assert body == expected, header


def test_slow_reader_gets_every_byte(server, token):
    """The socket fills again and again: sendfile() stops, Twisted takes over, and so on."""
    data = os.urandom(8 * MIB + 3)
    url = _download_url(_post(server, token, data))
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(_get_request(token, url))
        received = bytearray()
        while b"\r\n\r\n" not in received:
            received += sock.recv(4096)
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        got = bytearray(body)
        while len(got) < len(data):
            chunk = sock.recv(256 * 1024)
            assert chunk
            got += chunk
            if len(got) < MIB:
                time.sleep(0.01)  # slowly at first
        assert bytes(got) == data


def test_content_not_in_the_page_cache(server, token):
    data = os.urandom(6 * MIB + 1)
    url = _download_url(_post(server, token, data))
    path = _media_dir(server) / content_key(hashlib.sha256(data).hexdigest())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert _get(server, token, url) == (200, data)
    status, body = _get(server, token, url, {"Range": "bytes=4000000-"})
    assert (status, body) == (206, data[4000000:])


def test_head_of_a_download_has_no_body(server, token):
    data = os.urandom(BIG)
    url = _download_url(_post(server, token, data))

    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.head(
                server.base_url + url, headers={"Authorization": f"Bearer {token}"}
            ) as response:
                assert response.status == 200
                assert response.headers["Content-Length"] == str(len(data))
                assert await response.read() == b""

    run(go())


def test_over_tls_everything_goes_through_twisted(tmp_path):
    ours = start_federating_server(tmp_path / "tls", max_upload_size="50M")
    try:
        async def go() -> None:
            data = os.urandom(BIG)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session:
                body = {"username": "tls", "password": "tls password 123",
                        "auth": {"type": "m.login.dummy"}}
                async with session.post(
                    ours.base_url + "/_matrix/client/v3/register", json=body
                ) as response:
                    assert response.status == 200, await response.text()
                    headers = {"Authorization": f"Bearer {(await response.json())['access_token']}"}
                async with session.post(
                    ours.base_url + f"{MEDIA}/upload", data=data,
                    headers={**headers, "Content-Type": "application/octet-stream"},
                ) as response:
                    body = await response.read()
                    assert response.status == 200, body
                url = ours.base_url + _download_url(json.loads(body)["content_uri"])
                async with session.get(url, headers=headers) as response:
                    assert response.status == 200
                    assert await response.read() == data
                async with session.get(url, headers={**headers, "Range": "bytes=7-"}) as response:
                    assert response.status == 206
                    assert await response.read() == data[7:]

        run(go(), timeout=120)
    finally:
        ours.stop()


def test_concurrent_direct_uploads(server, token):
    """More at once than there are receiver threads: the others use the worker lanes."""
    blobs = [os.urandom(3 * MIB + i) for i in range(7)]

    async def go() -> list[str]:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
        async with aiohttp.ClientSession() as session:

            async def one(data: bytes) -> str:
                async with session.post(
                    server.base_url + f"{MEDIA}/upload", data=data, headers=headers
                ) as response:
                    body = await response.read()
                    assert response.status == 200, body
                    return json.loads(body)["content_uri"]

            return await asyncio.gather(*(one(b) for b in blobs))

    for mxc, data in zip(run(go()), blobs, strict=True):
        assert _get(server, token, _download_url(mxc)) == (200, data)
