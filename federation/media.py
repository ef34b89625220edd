"""Authenticated media over federation (spec v1.11): other servers fetch our media.

``GET /_matrix/federation/v1/media/download/{mediaId}`` and
``/thumbnail/{mediaId}`` answer ``multipart/mixed``: a JSON part (metadata,
``{}`` for now) and then the bytes, streamed from storage like client
downloads. Only this server's own media is served (never cached remote media),
and only to signed requests (``federation.auth.authenticated``).
"""

import secrets
from typing import Any

from twisted.web.server import Request

from federation.auth import authenticated
from homeserver.errors import MatrixError
from homeserver.http.validation import query_arg, query_bool, query_int
from homeserver.services.media.responses import (
    content_disposition,
    response_content_type,
    stream_body,
)

FEDERATION_MEDIA = "/_matrix/federation/v1/media"


def _part_headers(content_type: str, disposition: bytes) -> bytes:
    return (
        b"Content-Type: " + content_type.encode("ascii") + b"\r\n"
        b"Content-Disposition: " + disposition + b"\r\n\r\n"
    )


async def _send_multipart(
    hs: Any,
    request: Request,
    reader_opener: Any,
    length: int,
    content_type: str,
    disposition: bytes,
) -> None:
    boundary = secrets.token_hex(16).encode()
    prefix = (
        b"--" + boundary + b"\r\nContent-Type: application/json\r\n\r\n{}\r\n"
        b"--" + boundary + b"\r\n" + _part_headers(content_type, disposition)
    )
    suffix = b"\r\n--" + boundary + b"--\r\n"
    reader = None if request.method == b"HEAD" else await reader_opener()
    request.setHeader(b"Content-Type", b"multipart/mixed; boundary=" + boundary)
    request.setHeader(b"Content-Length", str(len(prefix) + length + len(suffix)).encode())
    await stream_body(hs.reactor, request, reader, length, prefix, suffix)


def register_federation_media_resources(router: Any, hs: Any) -> None:
    async def download(request: Request, origin: str, media_id: str) -> None:
        record = await hs.media.get_media(
            hs.server_name, media_id, timeout_ms=query_int(request, "timeout_ms")
        )
        await _send_multipart(
            hs,
            request,
            lambda: hs.media.open_content(record),
            int(record.media_length or 0),
            response_content_type(record.media_type),
            content_disposition(record.media_type, record.upload_name),
        )

    async def thumbnail(request: Request, origin: str, media_id: str) -> None:
        width = query_int(request, "width")
        height = query_int(request, "height")
        if width is None or height is None:
            raise MatrixError("M_MISSING_PARAM", "width and height are required")
        method = query_arg(request, "method", "scale") or "scale"
        thumb = await hs.media.get_thumbnail(
            hs.server_name,
            media_id,
            width,
            height,
            method,
            query_bool(request, "animated", False),
            timeout_ms=query_int(request, "timeout_ms"),
        )
        ext = thumb.content_type.rsplit("/", 1)[-1]
        await _send_multipart(
            hs,
            request,
            lambda: hs.media.open_thumbnail(thumb),
            thumb.length,
            thumb.content_type,
            content_disposition(thumb.content_type, f"thumbnail.{ext}", inline=True),
        )

    # Signed requests only (federation/auth.py); ``origin`` is the verified caller.
    router.register(
        "GET", FEDERATION_MEDIA + "/download/(?P<media_id>[^/]+)", authenticated(hs, download)
    )
    router.register(
        "GET", FEDERATION_MEDIA + "/thumbnail/(?P<media_id>[^/]+)", authenticated(hs, thumbnail)
    )
