"""Shared pieces of the media tests: images, raw requests, admins, config."""

import asyncio
import hashlib
import hmac
import io
import uuid
from typing import Any

import aiohttp
import yaml
from nio import AsyncClient
from PIL import Image

from tests.support.http import request
from tests.support.server import RunningServer

MEDIA = "/_matrix/media/v3"
CLIENT_MEDIA = "/_matrix/client/v1/media"
ADMIN = "/_synapse/admin/v1"


def run(coro: Any, timeout: float = 60) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def image_bytes(width: int, height: int, fmt: str = "PNG") -> bytes:
    """A two-way gradient (so scaled versions differ from crops), encoded as ``fmt``."""
    vertical = Image.linear_gradient("L").resize((width, height))
    horizontal = Image.linear_gradient("L").rotate(90).resize((width, height))
    img = Image.merge("RGB", (horizontal, vertical, Image.new("L", (width, height), 90)))
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def server_config(server: RunningServer) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in server.config_paths:
        merged.update(yaml.safe_load(path.read_text()))
    return merged


def mxc_parts(mxc: str) -> tuple[str, str]:
    server_name, media_id = mxc[len("mxc://") :].split("/")
    return server_name, media_id


async def raw(
    server: RunningServer,
    method: str,
    path: str,
    token: str | None = None,
    data: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body bytes of one request."""
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as session:
        async with session.request(
            method, server.base_url + path, data=data, headers=all_headers
        ) as response:
            body = await response.read()
            return response.status, {k.lower(): v for k, v in response.headers.items()}, body


async def upload(
    server: RunningServer,
    client: AsyncClient,
    data: bytes,
    content_type: str = "application/octet-stream",
    filename: str | None = None,
) -> str:
    from urllib.parse import quote

    path = f"{MEDIA}/upload" + (f"?filename={quote(filename)}" if filename else "")
    status, _, body = await raw(
        server, "POST", path, client.access_token, data, {"Content-Type": content_type}
    )
    assert status == 200, body
    import json

    return json.loads(body)["content_uri"]


async def register_admin(server: RunningServer) -> AsyncClient:
    """A server admin, through Synapse's shared-secret registration API."""
    localpart = f"admin-{uuid.uuid4().hex[:8]}"
    password = "admin password 123"
    secret = server_config(server)["registration_shared_secret"]
    url = server.base_url + ADMIN + "/register"
    nonce = (await asyncio.to_thread(request, "GET", url)).json()["nonce"]
    mac = hmac.new(
        secret.encode(),
        b"\x00".join([nonce.encode(), localpart.encode(), password.encode(), b"admin"]),
        hashlib.sha1,
    ).hexdigest()
    r = await asyncio.to_thread(
        request,
        "POST",
        url,
        {"nonce": nonce, "username": localpart, "password": password, "admin": True, "mac": mac},
    )
    assert r.status == 200, r.body
    client = AsyncClient(server.base_url, r.json()["user_id"])
    client.access_token = r.json()["access_token"]
    client.user_id = r.json()["user_id"]
    return client
