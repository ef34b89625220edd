"""The content repository end to end, on SQLite and PostgreSQL, through matrix-nio and raw HTTP.

Uploads, downloads and thumbnails with nio; refusals (404, 401, 413 with and
without Content-Length); the safety headers; the /create + PUT flow; admin
quarantine and deletion; federation downloads as multipart/mixed.
"""

import asyncio
import io
import json
import re
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from urllib.parse import quote

from nio import (
    AsyncClient,
    ContentRepositoryConfigResponse,
    DownloadResponse,
    ResizingMethod,
    RoomSendResponse,
    ThumbnailResponse,
    UploadResponse,
)

from crypto.keys import read_signing_keys
from crypto.xmatrix import sign_request
from tests.media.helpers import (
    ADMIN,
    CLIENT_MEDIA,
    MEDIA,
    decode,
    image_bytes,
    mxc_parts,
    raw,
    register_admin,
    run,
    server_config,
    upload,
)
from tests.support.clients import close, create, register

CSP = (
    "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; "
    "style-src 'unsafe-inline'; media-src 'self'; object-src 'self';"
)
LIMIT = 50 * 1024 * 1024  # the default max_upload_size


def errcode(body: bytes) -> str:
    return json.loads(body)["errcode"]


async def nio_upload(client: AsyncClient, data: bytes, content_type: str, name: str) -> str:
    response, _ = await client.upload(io.BytesIO(data), content_type, name, filesize=len(data))
    assert isinstance(response, UploadResponse), response
    assert re.fullmatch(r"mxc://[^/]+/[A-Za-z0-9_-]+", response.content_uri)
    return response.content_uri


def test_upload_download_and_thumbnails_with_nio(matrix_server):
    async def scenario() -> None:
        alice = await register(matrix_server)
        png = image_bytes(640, 480)
        mxc = await nio_upload(alice, png, "image/png", "gradient.png")
        server_name, media_id = mxc_parts(mxc)
        assert server_name == matrix_server.server_name

        got = await alice.download(mxc)
        assert isinstance(got, DownloadResponse), got
        assert got.body == png
        assert got.content_type == "image/png"
        assert got.filename == "gradient.png"

        # crop: exactly the requested size; scale: inside the chosen box, never
        # smaller than asked.
        crop = await alice.thumbnail(server_name, media_id, 96, 96, ResizingMethod.crop)
        assert isinstance(crop, ThumbnailResponse), crop
        assert crop.content_type == "image/png"
        assert decode(crop.body).size == (96, 96)
        scale = await alice.thumbnail(server_name, media_id, 300, 200, ResizingMethod.scale)
        assert isinstance(scale, ThumbnailResponse), scale
        w, h = decode(scale.body).size
        assert 300 <= w <= 320 and 200 <= h <= 240 and abs(w / h - 640 / 480) < 0.02
        # Larger than every configured size: made on demand, still no upscaling.
        big = await alice.thumbnail(server_name, media_id, 1000, 1000, ResizingMethod.scale)
        assert isinstance(big, ThumbnailResponse), big
        assert decode(big.body).size == (640, 480)
        odd = await alice.thumbnail(server_name, media_id, 100, 50, ResizingMethod.crop)
        assert isinstance(odd, ThumbnailResponse), odd
        w, h = decode(odd.body).size
        assert w >= 100 and h >= 50 and abs(w / h - 2) < 0.05

        # Identical bytes twice: two media ids, both served.
        again = await nio_upload(alice, png, "image/png", "copy.png")
        assert again != mxc
        assert (await alice.download(again)).body == png

        config = await alice.content_repository_config()
        assert isinstance(config, ContentRepositoryConfigResponse), config
        assert config.upload_size == LIMIT
        await close(alice)

    run(scenario())


def test_unknown_media_and_missing_tokens(matrix_server):
    async def scenario() -> None:
        alice = await register(matrix_server)
        token = alice.access_token
        me = quote(matrix_server.server_name)
        for path in (
            f"{CLIENT_MEDIA}/download/{me}/nosuchmedia",
            f"{CLIENT_MEDIA}/thumbnail/{me}/nosuchmedia?width=32&height=32",
            f"{CLIENT_MEDIA}/download/{me}/bad..id",
        ):
            status, _, body = await raw(matrix_server, "GET", path, token)
            assert (status, errcode(body)) == (404, "M_NOT_FOUND"), (path, body)
        # Other servers' media is fetched over federation (test_remote_media.py): from
        # an address the server may not contact (192.0.2.0/24), a 502, not a traceback.
        status, _, body = await raw(
            matrix_server, "GET", f"{CLIENT_MEDIA}/download/192.0.2.1/abc", token
        )
        assert (status, errcode(body)) == (502, "M_UNKNOWN"), body

        mxc = await upload(matrix_server, alice, b"hello", "text/plain")
        server_name, media_id = mxc_parts(mxc)
        for path in (
            f"{CLIENT_MEDIA}/download/{quote(server_name)}/{media_id}",
            f"{CLIENT_MEDIA}/thumbnail/{quote(server_name)}/{media_id}?width=8&height=8",
            f"{CLIENT_MEDIA}/config",
            f"{CLIENT_MEDIA}/preview_url?url=https%3A%2F%2Fexample.org",
        ):
            status, _, body = await raw(matrix_server, "GET", path)
            assert (status, errcode(body)) == (401, "M_MISSING_TOKEN"), (path, body)
        status, _, body = await raw(matrix_server, "POST", f"{MEDIA}/upload", data=b"x")
        assert (status, errcode(body)) == (401, "M_MISSING_TOKEN")
        status, _, body = await raw(matrix_server, "POST", "/_matrix/media/v1/create")
        assert (status, errcode(body)) == (401, "M_MISSING_TOKEN")
        # Not an image: no thumbnail.
        status, _, body = await raw(
            matrix_server,
            "GET",
            f"{CLIENT_MEDIA}/thumbnail/{quote(server_name)}/{media_id}?width=8&height=8",
            token,
        )
        assert (status, errcode(body)) == (400, "M_UNKNOWN")
        # URL previews are off by default.
        status, _, body = await raw(
            matrix_server, "GET", f"{CLIENT_MEDIA}/preview_url?url=https%3A%2F%2Fexample.org", token
        )
        assert status == 404
        await close(alice)

    run(scenario())


def test_oversized_uploads_are_refused_with_and_without_content_length(matrix_server):
    async def scenario() -> None:
        alice = await register(matrix_server)
        token = alice.access_token
        # Content-Length over the limit: refused from the headers alone.
        status, _, body = await raw(
            matrix_server, "POST", f"{MEDIA}/upload", token, b"\0" * (LIMIT + 1)
        )
        assert (status, errcode(body)) == (413, "M_TOO_LARGE")

        async def chunks():
            for _ in range(LIMIT // (1024 * 1024) + 2):
                yield b"\1" * (1024 * 1024)

        # Chunked: refused once the bytes received pass the limit.
        status, headers, body = await raw(matrix_server, "POST", f"{MEDIA}/upload", token, chunks())
        assert (status, errcode(body)) == (413, "M_TOO_LARGE")
        assert headers["access-control-allow-origin"] == "*"
        # Exactly at the limit is fine; the server is still serving.
        mxc = await upload(matrix_server, alice, b"\2" * LIMIT)
        status, headers, _ = await raw(
            matrix_server,
            "HEAD",
            f"{CLIENT_MEDIA}/download/{quote(mxc_parts(mxc)[0])}/{mxc_parts(mxc)[1]}",
            token,
        )
        assert status == 200 and headers["content-length"] == str(LIMIT)
        await close(alice)

    run(scenario())


def test_download_headers_dispositions_and_ranges(matrix_server):
    async def scenario() -> None:
        alice = await register(matrix_server)
        token = alice.access_token

        async def fetch(mxc: str, suffix: str = "", headers=None, method="GET"):
            server_name, media_id = mxc_parts(mxc)
            return await raw(
                matrix_server,
                method,
                f"{CLIENT_MEDIA}/download/{quote(server_name)}/{media_id}{suffix}",
                token,
                headers=headers,
            )

        png = image_bytes(50, 40)
        cases = [
            (png, "image/png", "pic.png", "inline", 'filename="pic.png"'),
            (
                b"<script>alert(1)</script>",
                "text/html",
                "page.html",
                "attachment",
                'filename="page.html"',
            ),
            (b"\0\1\2", "application/octet-stream", None, "attachment", None),
            (
                b"hi",
                "text/plain",
                "résumé ✓.txt",
                "inline",
                "filename*=utf-8''r%C3%A9sum%C3%A9%20%E2%9C%93.txt",
            ),
            (b"x", "text/plain", "../../etc/passwd", "inline", 'filename="passwd"'),
        ]
        for data, content_type, name, kind, filename in cases:
            mxc = await upload(matrix_server, alice, data, content_type, name)
            status, headers, body = await fetch(mxc)
            assert status == 200 and body == data
            assert headers["content-security-policy"] == CSP
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["cross-origin-resource-policy"] == "cross-origin"
            assert headers["content-type"].startswith(content_type)
            disposition = headers["content-disposition"]
            assert disposition == (f"{kind}; {filename}" if filename else kind), disposition

        mxc = await upload(matrix_server, alice, b"0123456789", "text/plain", "digits.txt")
        status, headers, body = await fetch(mxc, "/other name.bin")
        assert (
            status == 200 and headers["content-disposition"] == 'inline; filename="other name.bin"'
        )
        status, headers, body = await fetch(mxc, headers={"Range": "bytes=2-5"})
        assert (status, body) == (206, b"2345")
        assert headers["content-range"] == "bytes 2-5/10"
        status, _, body = await fetch(mxc, headers={"Range": "bytes=-3"})
        assert (status, body) == (206, b"789")
        status, headers, _ = await fetch(mxc, headers={"Range": "bytes=20-"})
        assert status == 416 and headers["content-range"] == "bytes */10"
        status, headers, body = await fetch(mxc, method="HEAD")
        assert (status, body, headers["content-length"]) == (200, b"", "10")

        image = await upload(matrix_server, alice, png, "image/png", "pic.png")
        server_name, media_id = mxc_parts(image)
        status, headers, body = await raw(
            matrix_server,
            "GET",
            f"{CLIENT_MEDIA}/thumbnail/{quote(server_name)}/{media_id}?width=32&height=32"
            "&method=crop",
            token,
        )
        assert status == 200 and decode(body).size == (32, 32)
        assert headers["content-disposition"] == 'inline; filename="thumbnail.png"'
        assert headers["content-security-policy"] == CSP
        assert headers["x-content-type-options"] == "nosniff"
        await close(alice)

    run(scenario())


def test_create_then_upload(matrix_server):
    async def scenario() -> None:
        alice = await register(matrix_server)
        bob = await register(matrix_server)
        status, _, body = await raw(
            matrix_server, "POST", "/_matrix/media/v1/create", alice.access_token
        )
        assert status == 200, body
        created = json.loads(body)
        server_name, media_id = mxc_parts(created["content_uri"])
        assert created["unused_expires_at"] > 0
        target = f"{quote(server_name)}/{media_id}"
        download = f"{CLIENT_MEDIA}/download/{target}"

        status, _, body = await raw(
            matrix_server, "GET", download + "?timeout_ms=0", alice.access_token
        )
        assert (status, errcode(body)) == (504, "M_NOT_YET_UPLOADED")
        status, _, body = await raw(
            matrix_server,
            "PUT",
            f"{MEDIA}/upload/{target}",
            bob.access_token,
            b"bob's",
            {"Content-Type": "text/plain"},
        )
        assert (status, errcode(body)) == (403, "M_FORBIDDEN")

        # A download waiting for the upload gets it as soon as it lands.
        waiting = asyncio.ensure_future(
            raw(matrix_server, "GET", download + "?timeout_ms=15000", bob.access_token)
        )
        await asyncio.sleep(0.3)
        assert not waiting.done()
        status, _, body = await raw(
            matrix_server,
            "PUT",
            f"{MEDIA}/upload/{target}?filename=late.txt",
            alice.access_token,
            b"at last",
            {"Content-Type": "text/plain"},
        )
        assert (status, json.loads(body)) == (200, {})
        status, headers, body = await waiting
        assert (status, body) == (200, b"at last")
        assert headers["content-disposition"] == 'inline; filename="late.txt"'

        status, _, body = await raw(
            matrix_server, "PUT", f"{MEDIA}/upload/{target}", alice.access_token, b"again"
        )
        assert (status, errcode(body)) == (409, "M_CANNOT_OVERWRITE_MEDIA")
        for other in (f"{quote(server_name)}/NoSuchId", f"example.org/{media_id}"):
            status, _, body = await raw(
                matrix_server, "PUT", f"{MEDIA}/upload/{other}", alice.access_token, b"x"
            )
            assert (status, errcode(body)) == (404, "M_NOT_FOUND"), other

        # At most max_pending_media_uploads (5) ids waiting for content per user.
        for _ in range(5):
            status, _, body = await raw(
                matrix_server, "POST", "/_matrix/media/v1/create", bob.access_token
            )
            assert status == 200, body
        status, _, body = await raw(
            matrix_server, "POST", "/_matrix/media/v1/create", bob.access_token
        )
        assert (status, errcode(body)) == (429, "M_LIMIT_EXCEEDED")
        await close(alice, bob)

    run(scenario())


def test_admin_quarantine_list_and_delete(matrix_server):
    async def scenario() -> None:
        admin = await register_admin(matrix_server)
        alice = await register(matrix_server)
        a, b, c = [
            await upload(matrix_server, alice, image_bytes(20, 20 + i), "image/png", f"{i}.png")
            for i in range(3)
        ]
        room_id = await create(alice)
        sent = await alice.room_send(
            room_id, "m.room.message", {"msgtype": "m.image", "body": "b.png", "url": b}
        )
        assert isinstance(sent, RoomSendResponse), sent

        def path(mxc: str) -> str:
            server_name, media_id = mxc_parts(mxc)
            return f"{quote(server_name)}/{media_id}"

        async def status_of(mxc: str) -> int:
            return (
                await raw(
                    matrix_server, "GET", f"{CLIENT_MEDIA}/download/{path(mxc)}", alice.access_token
                )
            )[0]

        status, _, body = await raw(
            matrix_server, "POST", f"{ADMIN}/media/quarantine/{path(a)}", alice.access_token
        )
        assert (status, errcode(body)) == (403, "M_FORBIDDEN")
        status, _, body = await raw(
            matrix_server, "POST", f"{ADMIN}/media/quarantine/{path(a)}", admin.access_token
        )
        assert (status, json.loads(body)) == (200, {})
        assert await status_of(a) == 404
        status, _, body = await raw(
            matrix_server,
            "GET",
            f"{CLIENT_MEDIA}/thumbnail/{path(a)}?width=32&height=32",
            alice.access_token,
        )
        assert (status, errcode(body)) == (404, "M_NOT_FOUND")

        status, _, body = await raw(
            matrix_server,
            "POST",
            f"{ADMIN}/room/{quote(room_id)}/media/quarantine",
            admin.access_token,
        )
        assert (status, json.loads(body)) == (200, {"num_quarantined": 1})
        assert (await status_of(b), await status_of(c)) == (404, 200)

        status, _, body = await raw(
            matrix_server,
            "GET",
            f"{ADMIN}/users/{quote(alice.user_id)}/media?order_by=upload_name",
            admin.access_token,
        )
        listing = json.loads(body)
        assert status == 200 and listing["total"] == 3
        assert [m["upload_name"] for m in listing["media"]] == ["0.png", "1.png", "2.png"]
        assert [m["quarantined_by"] for m in listing["media"]] == [admin.user_id] * 2 + [None]
        status, _, body = await raw(
            matrix_server,
            "GET",
            f"{ADMIN}/users/{quote(alice.user_id)}/media?limit=1&dir=b",
            admin.access_token,
        )
        page = json.loads(body)
        assert page["total"] == 3 and len(page["media"]) == 1 and page["next_token"] == 1

        status, _, body = await raw(
            matrix_server, "DELETE", f"{ADMIN}/media/{path(c)}", admin.access_token
        )
        assert (status, json.loads(body)) == (200, {"deleted_media": [mxc_parts(c)[1]], "total": 1})
        assert await status_of(c) == 404
        status, _, body = await raw(
            matrix_server, "DELETE", f"{ADMIN}/media/{path(c)}", admin.access_token
        )
        assert (status, errcode(body)) == (404, "M_NOT_FOUND")

        status, _, _ = await raw(
            matrix_server, "POST", f"{ADMIN}/media/unquarantine/{path(a)}", admin.access_token
        )
        assert status == 200 and await status_of(a) == 200
        await close(admin, alice)

    run(scenario())


def _signed_get(server, path: str) -> dict[str, str]:
    config = server_config(server)
    key_path = Path(server.config_paths[0]).parent / config["signing_key_path"]
    key = read_signing_keys(key_path)[0]
    # The server vouches for its own key: sign as if we were it.
    return {"Authorization": sign_request(key, server.server_name, server.server_name, "GET", path)}


def _multipart(headers: dict[str, str], body: bytes) -> list:
    assert headers["content-type"].startswith("multipart/mixed; boundary=")
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + headers["content-type"].encode() + b"\r\n\r\n" + body
    )
    return list(message.iter_parts())


def test_federation_download_and_thumbnail_are_multipart(matrix_server):
    async def scenario() -> None:
        alice = await register(matrix_server)
        png = image_bytes(120, 90)
        mxc = await upload(matrix_server, alice, png, "image/png", "fed.png")
        media_id = mxc_parts(mxc)[1]

        path = f"/_matrix/federation/v1/media/download/{media_id}"
        status, _, body = await raw(matrix_server, "GET", path)
        assert (status, errcode(body)) == (401, "M_UNAUTHORIZED")
        status, headers, body = await raw(
            matrix_server, "GET", path, headers=_signed_get(matrix_server, path)
        )
        assert status == 200, body
        meta, content = _multipart(headers, body)
        assert meta.get_content_type() == "application/json"
        assert json.loads(meta.get_payload(decode=True)) == {}
        assert content.get_content_type() == "image/png"
        assert content["Content-Disposition"] == 'inline; filename="fed.png"'
        assert content.get_payload(decode=True) == png

        path = f"/_matrix/federation/v1/media/thumbnail/{media_id}?width=32&height=32&method=crop"
        status, headers, body = await raw(
            matrix_server, "GET", path, headers=_signed_get(matrix_server, path)
        )
        assert status == 200, body
        meta, content = _multipart(headers, body)
        assert decode(content.get_payload(decode=True)).size == (32, 32)

        path = "/_matrix/federation/v1/media/download/NoSuchMedia"
        status, _, body = await raw(
            matrix_server, "GET", path, headers=_signed_get(matrix_server, path)
        )
        assert (status, errcode(body)) == (404, "M_NOT_FOUND")
        await close(alice)

    run(scenario())
