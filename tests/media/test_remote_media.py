"""Media of other servers, fetched over federation and cached (docs/media.md).

What a client of server B sees when it downloads ``mxc://<other server>/...``
through B's authenticated media endpoints. The other servers are, in turn:

- fake origins in this process (a small threaded HTTPS server) that answer
  the federation media endpoint the way the test wants (multipart bytes, a
  ``Location``, errors, an old server without the endpoint, a slow answer)
  and count what they are asked;
- another of our servers (server A), over real signed federation;
- a real Synapse.

Every server listens on 127.0.0.1 only; B refuses every address outside
127.0.0.0/8 (tests/support/synapse.py).
"""

import hashlib
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from ssl import PROTOCOL_TLS_SERVER, SSLContext
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from crypto.keys import generate_signing_key
from homeserver.services.federation_client import (
    DestinationBlockedError,
    HttpResponseError,
    RequestFailedError,
    ResponseTooLargeError,
)
from homeserver.services.media.remote import (
    MalformedResponse,
    MultipartReader,
    boundary_of,
    filename_from_disposition,
)
from homeserver.services.media.responses import CONTENT_SECURITY_POLICY
from tests.federation.helpers import LoopbackServer, loopback_client
from tests.media.helpers import decode, image_bytes
from tests.support.http import Response, request
from tests.support.server import free_port
from tests.support.synapse import (
    generate_tls_certificate,
    register,
    start_federating_server,
    synapse_server,
)

__all__ = ["synapse_server"]

# The module's tests share server B (and the Synapse): one xdist worker runs them all.
pytestmark = pytest.mark.xdist_group("remote-media")

CLIENT_MEDIA = "/_matrix/client/v1/media"
B_MAX_UPLOAD = 1024 * 1024
FEDERATION_DOWNLOAD = "/_matrix/federation/v1/media/download/"
LEGACY_DOWNLOAD = "/_matrix/media/v3/download/"


# --- the multipart reader on its own ----------------------------------------------------


def _multipart(boundary: bytes, second_part_headers: bytes, content: bytes) -> bytes:
    return (
        b"\r\n--" + boundary + b"\r\nContent-Type: application/json\r\n\r\n{}"
        b"\r\n--"
        + boundary
        + b"\r\n"
        + second_part_headers
        + b"\r\n\r\n"
        + content
        + b"\r\n--"
        + boundary
        + b"--\r\n"
    )


@pytest.mark.parametrize("chunk", [1, 2, 5, 17, 4096, 1 << 20])
def test_multipart_reader_across_any_chunking(chunk):
    # Content that almost contains the delimiter, to catch off-by-one tails.
    content = os.urandom(3000) + b"\r\n--bound" + os.urandom(100) + b"\r\n-"
    body = _multipart(
        b"boundary",
        b'Content-Type: image/png\r\nContent-Disposition: inline; filename="a.png"',
        content,
    )
    out: list[bytes] = []
    reader = MultipartReader(b"boundary", out.append)
    for i in range(0, len(body), chunk):
        reader.feed(body[i : i + chunk])
    reader.finish()
    assert b"".join(out) == content
    assert reader.metadata == {}
    assert reader.headers["content-type"] == "image/png"
    assert reader.location is None


def test_multipart_reader_location_and_errors():
    body = _multipart(b"x", b"Location: https://cdn.example/a", b"")
    reader = MultipartReader(b"x", lambda data: pytest.fail("no bytes expected"))
    reader.feed(body)
    reader.finish()
    assert reader.location == "https://cdn.example/a"

    truncated = MultipartReader(b"x", lambda data: None)
    truncated.feed(_multipart(b"x", b"Content-Type: text/plain", b"abc")[:-12])
    with pytest.raises(MalformedResponse):
        truncated.finish()
    for bad in (
        b"--x\r\n\r\nnot json\r\n--x\r\n\r\nabc\r\n--x--",
        b"--x\r\n\r\n{}\r\n--x--\r\n",
    ):
        with pytest.raises(MalformedResponse):
            MultipartReader(b"x", lambda data: None).feed(bad)
    with pytest.raises(MalformedResponse):
        boundary_of("application/json")
    assert boundary_of('multipart/mixed; boundary="a b"') == b"a b"


def test_filename_from_disposition():
    assert filename_from_disposition('inline; filename="cat.png"') == "cat.png"
    assert filename_from_disposition("attachment; filename=plain.txt") == "plain.txt"
    assert (
        filename_from_disposition("attachment; filename*=utf-8''na%C3%AFve.txt; filename=x")
        == "naïve.txt"
    )
    assert filename_from_disposition('inline; filename="q\\"uote"') == 'q"uote'
    assert filename_from_disposition("inline") is None
    assert filename_from_disposition(None) is None


# --- a fake origin server -----------------------------------------------------------------


class FakeOrigin:
    """A Matrix server's media endpoints as the test scripts them, over TLS on 127.0.0.1.

    ``media[media_id]`` is a function (handler, path) -> None writing the answer;
    ``requests`` lists (path, query, headers) of everything asked.
    """

    def __init__(self, directory: Path) -> None:
        cert, key = generate_tls_certificate(directory)
        context = SSLContext(PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        origin = self
        self.media: dict[str, Any] = {}
        self.requests: list[tuple[str, dict[str, list[str]], dict[str, str]]] = []
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                parts = urlsplit(self.path)
                path = unquote(parts.path)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with origin.lock:
                    origin.requests.append((path, parse_qs(parts.query), headers))
                answer = origin.media.get(path.rsplit("/", 1)[-1])
                if answer is None:
                    send_json(self, 404, {"errcode": "M_NOT_FOUND", "error": "no such media"})
                else:
                    answer(self, path)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.name = f"127.0.0.1:{self.port}"
        self.url = f"https://{self.name}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def asked(self, prefix: str) -> list[tuple[str, dict[str, list[str]], dict[str, str]]]:
        with self.lock:
            return [r for r in self.requests if r[0].startswith(prefix)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send_json(handler: Any, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def send_bytes(handler: Any, data: bytes, headers: dict[str, str], chunked: bool = False) -> None:
    handler.send_response(200)
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.send_header(
        *(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(data))))
    )
    handler.end_headers()
    try:
        if not chunked:
            handler.wfile.write(data)
            return
        for i in range(0, len(data), 64 * 1024):
            piece = data[i : i + 64 * 1024]
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        handler.wfile.write(b"0\r\n\r\n")
    except OSError:
        handler.close_connection = True  # the client hung up: it refused the size


def multipart_answer(
    content: bytes,
    content_type: str = "application/octet-stream",
    disposition: str | None = None,
    *,
    delay: float = 0,
    chunked: bool = False,
) -> Any:
    def answer(handler: Any, path: str) -> None:
        if not path.startswith(FEDERATION_DOWNLOAD):
            send_json(handler, 404, {"errcode": "M_NOT_FOUND", "error": "wrong endpoint"})
            return
        time.sleep(delay)
        headers = f"Content-Type: {content_type}"
        if disposition:
            headers += f"\r\nContent-Disposition: {disposition}"
        body = _multipart(b"fakeboundary", headers.encode(), content)
        send_bytes(
            handler, body, {"Content-Type": "multipart/mixed; boundary=fakeboundary"}, chunked
        )

    return answer


def location_answer(url: str) -> Any:
    def answer(handler: Any, path: str) -> None:
        body = _multipart(b"b0undary", f"Location: {url}".encode(), b"")
        send_bytes(handler, body, {"Content-Type": "multipart/mixed; boundary=b0undary"})

    return answer


def plain_answer(content: bytes, content_type: str, disposition: str) -> Any:
    """The media itself (a redirect target); 404 M_UNRECOGNIZED on the federation path."""

    def answer(handler: Any, path: str) -> None:
        if path.startswith(FEDERATION_DOWNLOAD):
            send_json(handler, 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"})
            return
        send_bytes(
            handler, content, {"Content-Type": content_type, "Content-Disposition": disposition}
        )

    return answer


def error_answer(status: int, body: Any) -> Any:
    return lambda handler, path: send_json(handler, status, body)


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def origins(tmp_path_factory):
    made = {
        name: FakeOrigin(tmp_path_factory.mktemp(f"origin-{name}"))
        for name in ("good", "flaky", "banned")
    }
    yield made
    for origin in made.values():
        origin.stop()


@pytest.fixture(scope="module")
def server_b(tmp_path_factory, origins):
    directory = tmp_path_factory.mktemp("server-b")
    server = start_federating_server(
        directory,
        max_upload_size=B_MAX_UPLOAD,
        media_store_path=str(directory / "media"),
        prevent_media_downloads_from=[origins["banned"].name],
    )
    server.media_store = directory / "media"
    server.user_id, server.token = register(server, "bella")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server_a(tmp_path_factory):
    server = start_federating_server(tmp_path_factory.mktemp("server-a"))
    server.user_id, server.token = register(server, "adam")
    try:
        yield server
    finally:
        server.stop()


def download(server: Any, origin: str, media_id: str, suffix: str = "") -> Response:
    path = f"{CLIENT_MEDIA}/download/{quote(origin)}/{media_id}{suffix}"
    return request(
        "GET",
        server.base_url + path,
        headers={"Authorization": f"Bearer {server.token}"},
        timeout=60,
    )


def thumbnail(server: Any, origin: str, media_id: str, width: int, height: int) -> Response:
    path = f"{CLIENT_MEDIA}/thumbnail/{quote(origin)}/{media_id}?width={width}&height={height}&method=crop"
    return request(
        "GET",
        server.base_url + path,
        headers={"Authorization": f"Bearer {server.token}"},
        timeout=60,
    )


def upload(server: Any, data: bytes, content_type: str, filename: str) -> str:
    r = request(
        "POST",
        f"{server.base_url}/_matrix/media/v3/upload?filename={quote(filename)}",
        body=data,
        headers={"Authorization": f"Bearer {server.token}", "Content-Type": content_type},
        timeout=60,
    )
    assert r.status == 200, r.body
    return r.json()["content_uri"].rsplit("/", 1)[1]


def error(r: Response) -> tuple[int, str]:
    return r.status, r.json()["errcode"]


def stored_files(server: Any) -> set[str]:
    root = server.media_store
    return {str(Path(d, f).relative_to(root)) for d, _, fs in os.walk(root) for f in fs}


def assert_safe_headers(r: Response) -> None:
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY.decode()
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cross-origin-resource-policy"] == "cross-origin"


# --- fake origins -----------------------------------------------------------------------


def test_remote_media_is_fetched_once_then_served_from_the_cache(server_b, origins):
    good = origins["good"]
    content = os.urandom(300_000)
    good.media["cachedPicture"] = multipart_answer(
        content, "image/png", 'inline; filename="holiday.png"'
    )
    before = stored_files(server_b)

    r = download(server_b, good.name, "cachedPicture")
    assert r.status == 200, r.body
    assert r.body == content
    assert r.headers["content-type"] == "image/png"
    assert r.headers["content-disposition"] == 'inline; filename="holiday.png"'
    assert_safe_headers(r)
    [(path, query, headers)] = good.asked(FEDERATION_DOWNLOAD + "cachedPicture")
    assert headers["authorization"].startswith("X-Matrix ")
    assert f'origin="{server_b.server_name}"' in headers["authorization"]
    assert query["timeout_ms"] == ["20000"]

    # Stored content-addressed, like uploads; the spool is empty again.
    sha256 = hashlib.sha256(content).hexdigest()
    new = stored_files(server_b) - before
    assert f"content/{sha256[:2]}/{sha256[2:4]}/{sha256}" in new
    assert not [f for f in stored_files(server_b) if f.startswith("tmp/")]

    # The origin is not asked again, whoever asks and whatever name is given.
    good.media.pop("cachedPicture")
    again = download(server_b, good.name, "cachedPicture", "/other.png")
    assert (again.status, again.body) == (200, content)
    assert again.headers["content-disposition"] == 'inline; filename="other.png"'
    ranged = request(
        "GET",
        f"{server_b.base_url}{CLIENT_MEDIA}/download/{quote(good.name)}/cachedPicture",
        headers={"Authorization": f"Bearer {server_b.token}", "Range": "bytes=10-19"},
    )
    assert (ranged.status, ranged.body) == (206, content[10:20])
    assert len(good.asked(FEDERATION_DOWNLOAD + "cachedPicture")) == 1


def test_concurrent_requests_share_one_fetch(server_b, origins):
    good = origins["good"]
    content = os.urandom(200_000)
    good.media["slowOne"] = multipart_answer(content, "video/mp4", delay=1.0)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: download(server_b, good.name, "slowOne"), range(6)))
    assert [(r.status, r.body == content) for r in results] == [(200, True)] * 6
    assert len(good.asked(FEDERATION_DOWNLOAD + "slowOne")) == 1


def test_unsafe_remote_content_is_served_as_an_attachment(server_b, origins):
    good = origins["good"]
    page = b"<html><script>alert(1)</script></html>"
    good.media["somePage"] = multipart_answer(page, "text/html", 'inline; filename="x.html"')
    r = download(server_b, good.name, "somePage")
    assert (r.status, r.body) == (200, page)
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["content-disposition"] == 'attachment; filename="x.html"'
    assert_safe_headers(r)


def test_location_answers_are_followed_without_our_signature(server_b, origins):
    good = origins["good"]
    content = os.urandom(50_000)
    good.media["cdnCopy"] = plain_answer(content, "audio/ogg", "inline; filename=song.ogg")
    good.media["redirected"] = location_answer(f"{good.url}/cdn/cdnCopy")
    r = download(server_b, good.name, "redirected")
    assert (r.status, r.body) == (200, content)
    assert r.headers["content-type"] == "audio/ogg"
    assert r.headers["content-disposition"] == 'inline; filename="song.ogg"'
    [(_, _, headers)] = good.asked("/cdn/cdnCopy")
    assert "authorization" not in headers

    # A target outside the allowed address ranges is never contacted.
    good.media["redirectedAway"] = location_answer("https://10.11.12.13/media/x")
    assert error(download(server_b, good.name, "redirectedAway")) == (502, "M_UNKNOWN")
    good.media["redirectedPlain"] = location_answer(f"http://{good.name}/cdn/cdnCopy")
    assert error(download(server_b, good.name, "redirectedPlain")) == (502, "M_UNKNOWN")
    assert len(good.asked("/cdn/cdnCopy")) == 1


def test_servers_without_the_federation_endpoint_get_the_legacy_request(server_b, origins):
    good = origins["good"]
    content = b"from an old server"
    good.media["oldServer"] = plain_answer(content, "text/plain", "inline; filename=old.txt")
    r = download(server_b, good.name, "oldServer")
    assert (r.status, r.body) == (200, content)
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    [(path, query, _)] = good.asked(LEGACY_DOWNLOAD)
    assert path == f"{LEGACY_DOWNLOAD}{good.name}/oldServer"
    assert query["allow_remote"] == ["false"]
    # A real 404 of the federation endpoint is final: no legacy request.
    assert error(download(server_b, good.name, "neverUploaded")) == (404, "M_NOT_FOUND")
    assert len(good.asked(LEGACY_DOWNLOAD)) == 1


@pytest.mark.parametrize("chunked", [False, True])
def test_too_large_remote_media_is_refused_and_nothing_is_kept(server_b, origins, chunked):
    good = origins["good"]
    media_id = f"hugeFile{int(chunked)}"
    good.media[media_id] = multipart_answer(os.urandom(B_MAX_UPLOAD + 300_000), chunked=chunked)
    before = stored_files(server_b)
    r = download(server_b, good.name, media_id)
    assert error(r) == (502, "M_TOO_LARGE")
    assert stored_files(server_b) == before
    # Not cached as anything: asking again asks the origin again.
    assert error(download(server_b, good.name, media_id)) == (502, "M_TOO_LARGE")
    assert len(good.asked(FEDERATION_DOWNLOAD + media_id)) == 2


def test_failures_are_matrix_errors(server_b, origins):
    flaky = origins["flaky"]
    flaky.media["broken"] = error_answer(500, {"errcode": "M_UNKNOWN", "error": "boom"})
    r = download(server_b, flaky.name, "broken")
    assert error(r) == (502, "M_UNKNOWN")
    assert "Traceback" not in r.body.decode()
    time.sleep(1.2)  # B's back-off for the flaky origin (at most 1 s in tests)

    flaky.media["notMultipart"] = error_answer(200, {"not": "multipart"})
    assert error(download(server_b, flaky.name, "notMultipart")) == (502, "M_UNKNOWN")
    flaky.media["pending"] = error_answer(
        504, {"errcode": "M_NOT_YET_UPLOADED", "error": "Content has not yet been uploaded"}
    )
    assert error(download(server_b, flaky.name, "pending")) == (504, "M_NOT_YET_UPLOADED")
    time.sleep(1.2)

    # Nobody listening; an address outside the allowed ranges.
    closed = f"127.0.0.1:{free_port()}"
    assert error(download(server_b, closed, "anything")) == (502, "M_UNKNOWN")
    assert error(download(server_b, "10.20.30.40", "anything")) == (502, "M_UNKNOWN")
    assert not [f for f in stored_files(server_b) if f.startswith("tmp/")]


def test_prevent_media_downloads_from(server_b, origins):
    banned = origins["banned"]
    banned.media["anything"] = multipart_answer(b"never fetched")
    assert error(download(server_b, banned.name, "anything")) == (404, "M_NOT_FOUND")
    assert error(thumbnail(server_b, banned.name, "anything", 32, 32)) == (404, "M_NOT_FOUND")
    assert banned.requests == []


def test_legacy_endpoints_do_not_fetch_remote_media(server_b, origins):
    good = origins["good"]
    good.media["legacyAsk"] = multipart_answer(b"only with a token")
    r = request(
        "GET", f"{server_b.base_url}/_matrix/media/v3/download/{quote(good.name)}/legacyAsk"
    )
    assert error(r) == (404, "M_NOT_FOUND")
    assert good.asked(FEDERATION_DOWNLOAD + "legacyAsk") == []


# --- our own servers over real federation ----------------------------------------------------


def test_media_of_another_of_our_servers(server_a, server_b):
    png = image_bytes(400, 300)
    media_id = upload(server_a, png, "image/png", "gradient.png")

    r = download(server_b, server_a.server_name, media_id)
    assert r.status == 200, r.body
    assert r.body == png
    assert r.headers["content-type"] == "image/png"
    assert r.headers["content-disposition"] == 'inline; filename="gradient.png"'
    assert_safe_headers(r)

    # Thumbnails are made by B from its copy of the original.
    t = thumbnail(server_b, server_a.server_name, media_id, 96, 96)
    assert t.status == 200, t.body
    assert t.headers["content-type"] == "image/png"
    assert decode(t.body).size == (96, 96)
    assert_safe_headers(t)

    unknown = download(server_b, server_a.server_name, "NoSuchMediaHere")
    assert error(unknown) == (404, "M_NOT_FOUND")

    big = upload(server_a, os.urandom(B_MAX_UPLOAD + 200_000), "application/zip", "big.zip")
    before = stored_files(server_b)
    assert error(download(server_b, server_a.server_name, big)) == (502, "M_TOO_LARGE")
    assert stored_files(server_b) == before


def test_cached_media_outlives_its_origin(tmp_path, server_b):
    origin = start_federating_server(tmp_path / "short-lived")
    try:
        origin.user_id, origin.token = register(origin, "olga")
        jpeg = image_bytes(320, 200, "JPEG")
        media_id = upload(origin, jpeg, "image/jpeg", "photo.jpg")
        assert download(server_b, origin.server_name, media_id).body == jpeg
    finally:
        origin.stop()
    r = download(server_b, origin.server_name, media_id)
    assert (r.status, r.body) == (200, jpeg)
    t = thumbnail(server_b, origin.server_name, media_id, 32, 32)
    assert (t.status, t.headers["content-type"]) == (200, "image/jpeg")
    # Uncached media of the stopped server: it cannot be reached.
    assert error(download(server_b, origin.server_name, "NeverSeen")) == (502, "M_UNKNOWN")


# --- Synapse ------------------------------------------------------------------------------


def test_media_uploaded_to_synapse(synapse_server, server_b):
    _, token = register(synapse_server, "sybil")
    content = image_bytes(200, 150)
    r = request(
        "POST",
        f"{synapse_server.base_url}/_matrix/media/v3/upload?filename=from-synapse.png",
        body=content,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"},
        timeout=30,
    )
    assert r.status == 200, r.body
    media_id = r.json()["content_uri"].rsplit("/", 1)[1]

    got = download(server_b, synapse_server.server_name, media_id)
    assert got.status == 200, got.body
    assert got.body == content
    assert got.headers["content-type"] == "image/png"
    assert got.headers["content-disposition"] == 'inline; filename="from-synapse.png"'
    assert_safe_headers(got)
    t = thumbnail(server_b, synapse_server.server_name, media_id, 32, 32)
    assert t.status == 200, t.body
    assert error(download(server_b, synapse_server.server_name, "NoSuchSynapseMedia")) == (
        404,
        "M_NOT_FOUND",
    )


# --- the federation client's streaming requests, in process --------------------------------


class _Collect:
    def __init__(self, fail_at: int | None = None) -> None:
        self.chunks: list[bytes] = []
        self.started: list[int] = []
        self._fail_at = fail_at

    def start(self, status: int, headers: Any) -> None:
        self.started.append(status)

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
        if self._fail_at is not None and sum(map(len, self.chunks)) >= self._fail_at:
            raise ValueError("enough")


class StreamingClientTests(TestCase):
    """``get_stream`` / ``get_url_stream`` against a loopback TLS server (our JsonResource)."""

    timeout = 30

    def setUp(self):
        self.server = LoopbackServer(Path(tempfile.mkdtemp()))
        self.payload = os.urandom(700_000)
        self.seen: list[Any] = []
        self.server.router.register("GET", r"/bytes/(?P<size>\d+)", self._bytes)
        self.server.router.register("GET", r"/hop/(?P<n>\d+)", self._hop)
        self.server.router.register("GET", r"/missing", self._missing)
        self.client = loopback_client("origin.test", generate_signing_key("s"))
        self.name = self.server.name

    async def _bytes(self, request, size):
        self.seen.append(request.getHeader("Authorization"))
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.write(self.payload[: int(size)])
        request.finish()

    async def _hop(self, request, n):
        self.seen.append(request.getHeader("Authorization"))
        request.setResponseCode(302)
        target = "/bytes/1000" if n == "0" else f"/hop/{int(n) - 1}"
        request.setHeader(b"Location", target.encode())
        request.finish()

    async def _missing(self, request):
        return 404, {"errcode": "M_NOT_FOUND", "error": "nope"}

    async def _teardown(self):
        await self.client.close()
        await self.server.stop()

    def tearDown(self):
        return defer.ensureDeferred(self._teardown())

    def test_body_streams_to_the_consumer(self):
        async def go():
            collect = _Collect()
            response = await self.client.get_stream(self.name, "/bytes/700000", collect)
            self.assertEqual((response.status, response.length), (200, 700_000))
            self.assertEqual(b"".join(collect.chunks), self.payload)
            self.assertEqual(collect.started, [200])
            self.assertTrue(self.seen[0].startswith("X-Matrix "))

        return defer.ensureDeferred(go())

    def test_limits_and_consumer_errors_stop_the_transfer_without_back_off(self):
        async def go():
            with self.assertRaises(ResponseTooLargeError):
                await self.client.get_stream(
                    self.name, "/bytes/700000", _Collect(), max_response_size=1000
                )
            with self.assertRaises(ValueError):
                await self.client.get_stream(self.name, "/bytes/700000", _Collect(fail_at=1))
            with self.assertRaises(HttpResponseError) as cm:
                await self.client.get_stream(self.name, "/missing", _Collect())
            self.assertEqual((cm.exception.status, cm.exception.errcode), (404, "M_NOT_FOUND"))
            self.assertIsNone(self.client.backoff.state(self.name))
            # The client still works (no half-read connection left in the pool).
            collect = _Collect()
            await self.client.get_stream(self.name, "/bytes/10", collect)
            self.assertEqual(b"".join(collect.chunks), self.payload[:10])

        return defer.ensureDeferred(go())

    def test_plain_urls_follow_redirects_unsigned_under_the_address_policy(self):
        async def go():
            collect = _Collect()
            response = await self.client.get_url_stream(f"https://{self.name}/hop/2", collect)
            self.assertEqual(
                (response.status, b"".join(collect.chunks)), (200, self.payload[:1000])
            )
            self.assertEqual(self.seen, [None] * 4)
            with self.assertRaises(DestinationBlockedError):
                await self.client.get_url_stream("https://10.1.1.1/x", _Collect())
            with self.assertRaises(RequestFailedError):
                await self.client.get_url_stream(f"http://{self.name}/bytes/10", _Collect())
            with self.assertRaises(RequestFailedError):
                await self.client.get_url_stream(f"https://{self.name}/hop/9", _Collect())
            with self.assertRaises(HttpResponseError):
                await self.client.get_url_stream(f"https://{self.name}/missing", _Collect())

        return defer.ensureDeferred(go())
