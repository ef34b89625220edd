"""Media features behind configuration, end to end on SQLite: the S3 back-end (against
moto's S3 server on 127.0.0.1), URL previews (refused by default, allowed by config for a
page this test serves on 127.0.0.1), the authenticated-media cut-over across a restart,
and per-user upload quotas."""

import json
from contextlib import ExitStack
from urllib.parse import quote

import boto3
import pytest
import yaml
from aiohttp import web

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
    upload,
)
from tests.support.clients import close, register, start_e2e_server

BUCKET = "media-test"
CREDENTIALS = {"aws_access_key_id": "test-key", "aws_secret_access_key": "test-secret"}


def errcode(body: bytes) -> str:
    return json.loads(body)["errcode"]


class Pages:
    """A little web site on 127.0.0.1 for URL previews, served from the test's own loop."""

    def __init__(self) -> None:
        self.image = image_bytes(64, 48)
        self.app = web.Application()
        self.port = 0
        page = (
            b"<html><head><title>ignored</title>"
            b'<meta property="og:title" content="A page &amp; its title">'
            b'<meta property="og:description" content="What it is about">'
            b'<meta property="og:image" content="/pic.png"></head><body>hi</body></html>'
        )
        self.add("/page", "text/html; charset=utf-8", page)
        self.add("/plain", "text/html", b"<title>Just a title</title><p>text</p>")
        self.add("/pic.png", "image/png", self.image)
        self.add("/big", "text/html", b"<html>" + b"x" * 300_000 + b"</html>")
        self.add("/blocked-page", "text/html", b"<title>no</title>")

        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPFound(request.query["to"])

        self.app.router.add_get("/redirect", redirect)

    def add(self, path: str, content_type: str, body: bytes) -> None:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=body, headers={"Content-Type": content_type})

        self.app.router.add_get(path, handler)

    async def __aenter__(self) -> "Pages":
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


async def preview(server, token: str, url: str) -> tuple[int, dict]:
    status, _, body = await raw(
        server, "GET", f"{CLIENT_MEDIA}/preview_url?url={quote(url, safe='')}", token
    )
    return status, json.loads(body)


# --- S3 ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDENTIALS)
    s3.create_bucket(Bucket=BUCKET)
    with ExitStack() as stack:
        stack.callback(moto.stop)
        server = start_e2e_server(
            stack,
            tmp_path_factory.mktemp("hs-s3"),
            "sqlite3",
            url_preview_enabled=True,  # with the default blacklist
            media_storage_s3={
                "bucket": BUCKET,
                "endpoint_url": endpoint,
                "region_name": "us-east-1",
                "access_key_id": CREDENTIALS["aws_access_key_id"],
                "secret_access_key": CREDENTIALS["aws_secret_access_key"],
                "prefix": "hs/",
                "addressing_style": "path",
            },
        )
        yield server, s3


def objects(s3, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def test_s3_round_trip(s3_server):
    server, s3 = s3_server

    async def scenario() -> None:
        alice = await register(server)
        admin = await register_admin(server)
        png = image_bytes(300, 200)
        mxc = await upload(server, alice, png, "image/png", "s3.png")
        server_name, media_id = mxc_parts(mxc)
        target = f"{quote(server_name)}/{media_id}"
        [content] = objects(s3, "hs/content/")
        assert s3.get_object(Bucket=BUCKET, Key=content)["Body"].read() == png

        status, headers, body = await raw(
            server, "GET", f"{CLIENT_MEDIA}/download/{target}", alice.access_token
        )
        assert (status, body) == (200, png)
        assert headers["content-disposition"] == 'inline; filename="s3.png"'
        status, _, body = await raw(
            server,
            "GET",
            f"{CLIENT_MEDIA}/download/{target}",
            alice.access_token,
            headers={"Range": "bytes=10-19"},
        )
        assert (status, body) == (206, png[10:20])
        status, _, body = await raw(
            server,
            "GET",
            f"{CLIENT_MEDIA}/thumbnail/{target}?width=96&height=96&method=crop",
            alice.access_token,
        )
        assert status == 200 and decode(body).size == (96, 96)
        assert objects(s3, "hs/thumbnails/")
        # Nothing but the upload spool on local disk.
        media_store = server.config_paths[0].parent / "data" / "media_store"
        assert not (media_store / "content").exists()

        status, _, _ = await raw(server, "DELETE", f"{ADMIN}/media/{target}", admin.access_token)
        assert status == 200
        assert objects(s3, "hs/content/") == [] and objects(s3, "hs/thumbnails/") == []
        status, _, _ = await raw(
            server, "GET", f"{CLIENT_MEDIA}/download/{target}", alice.access_token
        )
        assert status == 404
        await close(alice, admin)

    run(scenario())


def test_previews_of_loopback_are_refused_by_default(s3_server):
    server, _ = s3_server

    async def scenario() -> None:
        alice = await register(server)
        async with Pages() as pages:
            for url in (pages.url("/page"), pages.url("/page", "localhost")):
                status, body = await preview(server, alice.access_token, url)
                assert (status, body["errcode"]) == (403, "M_FORBIDDEN"), (url, body)
        status, body = await preview(server, alice.access_token, "ftp://example.org/x")
        assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")
        await close(alice)

    run(scenario())


# --- cut-over, quotas, previews allowed -----------------------------------------------------------
@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """A server that uploaded media with enable_authenticated_media off, then restarted with it on."""
    directory = tmp_path_factory.mktemp("hs-cutover")
    with ExitStack() as stack:
        server = start_e2e_server(stack, directory, "sqlite3", enable_authenticated_media=False)

        async def before() -> tuple[str, str]:
            alice = await register(server, password="alice password")
            mxc = await upload(server, alice, image_bytes(100, 80), "image/png", "old.png")
            await close(alice)
            return alice.user_id, mxc

        alice_id, old_mxc = run(before())
        server.stop()
        overrides = directory / "overrides.yaml"
        config = yaml.safe_load(overrides.read_text())
        config.update(
            {
                "enable_authenticated_media": True,
                "media_upload_limits": [{"time_period": "1h", "max_size": "300K"}],
                "url_preview_enabled": True,
                "url_preview_ip_range_whitelist": ["127.0.0.1/32"],
                "url_preview_url_blacklist": [{"path": "/blocked*"}],
                "max_spider_size": "200K",
            }
        )
        overrides.write_text(yaml.safe_dump(config))
        server.start()
        yield server, old_mxc


def test_legacy_endpoints_serve_only_media_from_before_the_cut_over(restarted):
    server, old_mxc = restarted

    async def scenario() -> None:
        alice = await register(server)
        new_mxc = await upload(server, alice, image_bytes(100, 80), "image/png", "new.png")
        old = "{}/{}".format(*mxc_parts(old_mxc)).replace(":", "%3A")
        new = "{}/{}".format(*mxc_parts(new_mxc)).replace(":", "%3A")
        for prefix in (MEDIA, "/_matrix/media/r0"):
            status, headers, _ = await raw(server, "GET", f"{prefix}/download/{old}")
            assert status == 200 and headers["content-disposition"] == 'inline; filename="old.png"'
            status, _, body = await raw(
                server, "GET", f"{prefix}/thumbnail/{old}?width=32&height=32"
            )
            assert status == 200 and decode(body).size[0] <= 100
            for path in (
                f"{prefix}/download/{new}",
                f"{prefix}/thumbnail/{new}?width=32&height=32",
            ):
                status, _, body = await raw(server, "GET", path)
                assert (status, errcode(body)) == (404, "M_NOT_FOUND"), path
        for target in (old, new):
            status, _, _ = await raw(
                server, "GET", f"{CLIENT_MEDIA}/download/{target}", alice.access_token
            )
            assert status == 200
        await close(alice)

    run(scenario())


def test_upload_quota(restarted):
    server, _ = restarted

    async def scenario() -> None:
        user = await register(server)
        await upload(server, user, b"a" * 200_000)
        status, _, body = await raw(
            server, "POST", f"{MEDIA}/upload", user.access_token, b"b" * 200_000
        )
        assert (status, errcode(body)) == (403, "M_FORBIDDEN")
        await upload(server, user, b"c" * 100_000)  # 300K in all: just fits
        other = await register(server)  # quotas are per user
        await upload(server, other, b"d" * 200_000)
        await close(user, other)

    run(scenario())


def test_previews_when_allowed(restarted):
    server, _ = restarted

    async def scenario() -> None:
        alice = await register(server)
        token = alice.access_token
        async with Pages() as pages:
            status, og = await preview(server, token, pages.url("/page"))
            assert status == 200, og
            assert og["og:title"] == "A page & its title"
            assert og["og:description"] == "What it is about"
            assert og["og:image:type"] == "image/png"
            assert (og["og:image:width"], og["og:image:height"]) == (64, 48)
            assert og["matrix:image:size"] == len(pages.image)
            server_name, media_id = mxc_parts(og["og:image"])
            status, _, body = await raw(
                server, "GET", f"{CLIENT_MEDIA}/download/{quote(server_name)}/{media_id}", token
            )
            assert (status, body) == (200, pages.image)

            status, og = await preview(server, token, pages.url("/plain"))
            assert (status, og) == (200, {"og:title": "Just a title"})
            status, og = await preview(server, token, pages.url("/pic.png"))
            assert status == 200 and og["og:image"].startswith("mxc://")
            status, og = await preview(
                server, token, pages.url("/redirect?to=" + quote(pages.url("/plain"), safe=""))
            )
            assert (status, og) == (200, {"og:title": "Just a title"})

            for url, expected in [
                (pages.url("/big"), (502, "M_TOO_LARGE")),  # over max_spider_size
                (pages.url("/blocked-page"), (403, "M_FORBIDDEN")),  # url_preview_url_blacklist
                (pages.url("/page", "127.0.0.2"), (403, "M_FORBIDDEN")),  # not whitelisted
                (
                    pages.url("/redirect?to=" + quote(pages.url("/plain", "10.0.0.1"), safe="")),
                    (403, "M_FORBIDDEN"),
                ),  # a redirect to a blocked address
            ]:
                status, body = await preview(server, token, url)
                assert (status, body.get("errcode")) == expected, (url, body)
        await close(alice)

    run(scenario())
