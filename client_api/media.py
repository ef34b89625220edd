"""The content repository: uploads, downloads, thumbnails, config, URL previews.

- Authenticated (spec v1.11+): ``/_matrix/client/v1/media/{download,thumbnail,config,preview_url}``.
- Uploads: ``POST /_matrix/media/v3/upload``, ``POST /_matrix/media/v1/create``,
  ``PUT /_matrix/media/v3/upload/{serverName}/{mediaId}``. Their bodies never
  reach memory: the listener's request class streams them to disk
  (``homeserver/app/listeners.py``, ``homeserver/services/media/uploads.py``).
- Legacy, unauthenticated: ``/_matrix/media/{v3,r0}/{download,thumbnail}`` serve
  only media from before ``enable_authenticated_media`` (404 ``M_NOT_FOUND``
  otherwise); ``allow_remote=false`` (servers asking) serves only media
  already here; ``/_matrix/media/v3/{config,preview_url}`` need a token like
  their v1 twins.

Downloads are streamed from storage with back-pressure and carry the spec's
safety headers (``homeserver/services/media/responses.py``).
"""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import media as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import query_arg, query_bool, query_int
from homeserver.services.media.responses import (
    RangeNotSatisfiable,
    content_disposition,
    parse_range,
    response_content_type,
    set_media_headers,
    stream_body,
)

CLIENT_MEDIA = "/_matrix/client/v1/media"
LEGACY_MEDIA = "/_matrix/media/(?:v3|r0|v1)"
_TARGET = "/(?P<server_name>[^/]+)/(?P<media_id>[^/]+)"
# nio asks for .../download/{server}/{id}/ with an empty file name.
_FILE_NAME = "(?:/(?P<file_name>[^/]*))?"


def _timeout(request: Request) -> int | None:
    return query_int(request, "timeout_ms")


async def send_download(hs: Any, request: Request, record: Any, file_name: str | None) -> None:
    """Stream stored media as a download, a single byte range if one is asked for."""
    size = int(record.media_length or 0)
    offset, length, partial = 0, size, False
    try:
        wanted = parse_range(request.getHeader("Range"), size) if size else None
    except RangeNotSatisfiable:
        request.setResponseCode(416)
        request.setHeader(b"Content-Range", f"bytes */{size}".encode())
        request.setHeader(b"Content-Length", b"0")
        request.finish()
        return
    if wanted is not None:
        (offset, length), partial = wanted, True
    reader = None
    if request.method != b"HEAD":
        reader = await hs.media.open_content(record, offset, length if partial else None)
    set_media_headers(
        request,
        response_content_type(record.media_type),
        content_disposition(record.media_type, file_name or record.upload_name),
    )
    request.setHeader(b"Accept-Ranges", b"bytes")
    if partial:
        request.setResponseCode(206)
        request.setHeader(b"Content-Range", f"bytes {offset}-{offset + length - 1}/{size}".encode())
    request.setHeader(b"Content-Length", str(length).encode())
    await stream_body(hs.reactor, request, reader, length)


async def send_thumbnail(hs: Any, request: Request, thumb: Any) -> None:
    reader = None if request.method == b"HEAD" else await hs.media.open_thumbnail(thumb)
    ext = thumb.content_type.rsplit("/", 1)[-1]
    set_media_headers(
        request,
        thumb.content_type,
        content_disposition(thumb.content_type, f"thumbnail.{ext}", inline=True),
    )
    request.setHeader(b"Content-Length", str(thumb.length).encode())
    await stream_body(hs.reactor, request, reader, thumb.length)


def _thumbnail_params(request: Request) -> tuple[int, int, str, bool]:
    width = query_int(request, "width")
    height = query_int(request, "height")
    if width is None or height is None:
        raise MatrixError("M_MISSING_PARAM", "width and height are required")
    method = query_arg(request, "method", "scale") or "scale"
    if method not in schemas.THUMBNAIL_METHODS:
        raise MatrixError("M_INVALID_PARAM", "method must be crop or scale")
    return width, height, method, query_bool(request, "animated", False)


def register_client_media_resources(router: Any, hs: Any) -> None:
    """The authenticated /_matrix/client/v1/media endpoints (client listeners)."""

    async def download(
        request: Request, server_name: str, media_id: str, file_name: str | None = None
    ) -> None:
        await hs.auth.get_requester(request, allow_guest=True)
        record = await hs.media.get_media(server_name, media_id, timeout_ms=_timeout(request))
        await send_download(hs, request, record, file_name or None)

    async def thumbnail(request: Request, server_name: str, media_id: str) -> None:
        await hs.auth.get_requester(request, allow_guest=True)
        width, height, method, animated = _thumbnail_params(request)
        thumb = await hs.media.get_thumbnail(
            server_name, media_id, width, height, method, animated, timeout_ms=_timeout(request)
        )
        await send_thumbnail(hs, request, thumb)

    async def config(request: Request) -> tuple[int, Any]:
        await hs.auth.get_requester(request, allow_guest=True)
        return 200, hs.media.config_json()

    async def preview_url(request: Request) -> tuple[int, Any]:
        await hs.auth.get_requester(request, allow_guest=True)
        url = query_arg(request, "url")
        if not url:
            raise MatrixError("M_MISSING_PARAM", "url is required")
        query_int(request, "ts")  # accepted; the newest preview is served
        return 200, await hs.media.preview_url(url)

    router.register("GET", CLIENT_MEDIA + "/download" + _TARGET + _FILE_NAME, download)
    router.register("GET", CLIENT_MEDIA + "/thumbnail" + _TARGET, thumbnail)
    router.register("GET", CLIENT_MEDIA + "/config", config)
    router.register("GET", CLIENT_MEDIA + "/preview_url", preview_url)


def register_media_resources(router: Any, hs: Any) -> None:
    """The /_matrix/media endpoints (media listeners): uploads and the legacy ones."""

    async def upload(request: Request) -> tuple[int, Any]:
        requester = await hs.auth.get_requester(request)
        content_uri = await hs.media.upload(
            requester.user_id,
            request.content,
            request.getHeader("Content-Type"),
            query_arg(request, "filename"),
        )
        return 200, {"content_uri": content_uri}

    async def create(request: Request) -> tuple[int, Any]:
        requester = await hs.auth.get_requester(request)
        return 200, await hs.media.create(requester.user_id)

    async def upload_to(request: Request, server_name: str, media_id: str) -> tuple[int, Any]:
        requester = await hs.auth.get_requester(request)
        await hs.media.upload_to(
            requester.user_id,
            server_name,
            media_id,
            request.content,
            request.getHeader("Content-Type"),
            query_arg(request, "filename"),
        )
        return 200, {}

    async def legacy_download(
        request: Request, server_name: str, media_id: str, file_name: str | None = None
    ) -> None:
        record = await hs.media.get_media(
            server_name,
            media_id,
            legacy=True,
            allow_remote=query_bool(request, "allow_remote", True),
            timeout_ms=_timeout(request),
        )
        await send_download(hs, request, record, file_name or None)

    async def legacy_thumbnail(request: Request, server_name: str, media_id: str) -> None:
        width, height, method, animated = _thumbnail_params(request)
        thumb = await hs.media.get_thumbnail(
            server_name,
            media_id,
            width,
            height,
            method,
            animated,
            legacy=True,
            allow_remote=query_bool(request, "allow_remote", True),
            timeout_ms=_timeout(request),
        )
        await send_thumbnail(hs, request, thumb)

    async def legacy_config(request: Request) -> tuple[int, Any]:
        await hs.auth.get_requester(request, allow_guest=True)
        return 200, hs.media.config_json()

    async def legacy_preview_url(request: Request) -> tuple[int, Any]:
        await hs.auth.get_requester(request, allow_guest=True)
        url = query_arg(request, "url")
        if not url:
            raise MatrixError("M_MISSING_PARAM", "url is required")
        return 200, await hs.media.preview_url(url)

    router.register("POST", LEGACY_MEDIA + "/upload", upload)
    router.register("POST", "/_matrix/media/v1/create", create)
    router.register("PUT", "/_matrix/media/(?:v3|r0)/upload" + _TARGET, upload_to)
    router.register("GET", LEGACY_MEDIA + "/download" + _TARGET + _FILE_NAME, legacy_download)
    router.register("GET", LEGACY_MEDIA + "/thumbnail" + _TARGET, legacy_thumbnail)
    router.register("GET", LEGACY_MEDIA + "/config", legacy_config)
    router.register("GET", LEGACY_MEDIA + "/preview_url", legacy_preview_url)
    register_client_media_resources(router, hs)
