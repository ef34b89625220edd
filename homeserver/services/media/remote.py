"""Media of other servers: fetched over federation, spooled to disk as it arrives.

Spec v1.19, server-server "Content Repository": a signed
``GET /_matrix/federation/v1/media/download/{mediaId}`` answered with
``multipart/mixed``, a JSON part (metadata) and then either the bytes (with
their ``Content-Type`` and ``Content-Disposition``) or a ``Location`` header
to fetch them from with a plain GET. Servers that do not know the endpoint
(404/405 ``M_UNRECOGNIZED``, or an old server's 400 ``M_UNRECOGNIZED`` or
non-JSON 404) are asked the deprecated
``GET /_matrix/media/v3/download/{serverName}/{mediaId}?allow_remote=false``.

The bytes never sit in memory: they go chunk by chunk into an ``UploadSink``
(a spool file under ``media_store_path/tmp`` and a running SHA-256), which
refuses more than ``max_upload_size``; the transfer stops at once and the
spool file is removed. The media service then stores the file like an upload.
"""

import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote

import attrs

from homeserver.errors import MatrixError
from homeserver.services.federation_client import (
    FederationError,
    HttpResponseError,
    RequestFailedError,
    ResponseTooLargeError,
    build_path,
)
from homeserver.services.media.uploads import ClaimedUpload, UploadSink

logger = logging.getLogger(__name__)

FEDERATION_DOWNLOAD = "/_matrix/federation/v1/media/download/{}"
LEGACY_DOWNLOAD = "/_matrix/media/v3/download/{}/{}"
# Room for the multipart framing and the JSON part around the media itself.
MULTIPART_OVERHEAD = 128 * 1024
MAX_JSON_PART = 64 * 1024
MAX_PART_HEADERS = 16 * 1024
# The media's bytes may take longer than an answer's headers.
BODY_TIMEOUT_SECONDS = 300.0

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf';\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


class MalformedResponse(Exception):
    """The origin's answer is not the multipart/mixed the spec describes."""


class RemoteTooLarge(Exception):
    """The media is larger than we accept."""


@attrs.frozen
class FetchedMedia:
    upload: ClaimedUpload  # the spool file (the caller owns it), its SHA-256 and length
    content_type: str | None
    disposition: str | None


# --- header parsing -----------------------------------------------------------------


def header_params(value: str) -> dict[str, str]:
    """The ``; name=value`` parameters of a header (names lower-cased, quotes removed)."""
    params = {}
    for name, raw in _PARAM.findall(value):
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params.setdefault(name.lower(), raw)
    return params


def filename_from_disposition(value: str | None) -> str | None:
    """The file name of a ``Content-Disposition`` (RFC 6266): ``filename*`` first."""
    if not value:
        return None
    params = header_params(value)
    extended = params.get("filename*")
    if extended:
        charset, _, rest = extended.partition("'")
        _, _, encoded = rest.partition("'")
        try:
            return unquote(encoded, encoding=charset or "utf-8", errors="strict") or None
        except (LookupError, UnicodeDecodeError):
            pass
    return params.get("filename") or None


def _decode(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _first_header(headers: Any, name: bytes) -> str | None:
    values = headers.getRawHeaders(name)
    return _decode(values[0]).strip() if values else None


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/mixed`` Content-Type, or MalformedResponse."""
    if not content_type or content_type.split(";", 1)[0].strip().lower() != "multipart/mixed":
        raise MalformedResponse(f"expected multipart/mixed, got {content_type!r}")
    boundary = header_params(content_type).get("boundary", "")
    if not 1 <= len(boundary) <= 70 or not boundary.isascii():
        raise MalformedResponse("multipart/mixed without a usable boundary")
    return boundary.encode("ascii")


# --- the multipart/mixed reader -------------------------------------------------------


class MultipartReader:
    """Reads the spec's two-part ``multipart/mixed`` answer as it arrives.

    The JSON part is kept (up to ``MAX_JSON_PART``); the second part's headers
    are kept and its bytes passed to ``write`` (unless it is a ``Location``).
    Every delimiter is ``CRLF--boundary``: the reader starts with a CRLF of
    its own so the first delimiter needs no special case, and holds back the
    last ``len(delimiter) - 1`` bytes of a part in case a delimiter straddles
    two chunks.
    """

    def __init__(self, boundary: bytes, write: Callable[[bytes], None]) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._write = write
        self._buffer = b"\r\n"
        self._state = "preamble"
        self._part = -1
        self._json = b""
        self.metadata: Any = None
        self.headers: dict[str, str] = {}
        self.done = False

    @property
    def location(self) -> str | None:
        return self.headers.get("location")

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self._buffer += data
        progress = True
        while progress and not self.done:
            progress = getattr(self, "_" + self._state)()

    def finish(self) -> None:
        """Raises MalformedResponse unless both parts arrived complete."""
        if not self.done:
            raise MalformedResponse("the multipart answer ended early")

    # --- states: each consumes what it can and says whether to go on ---------------------
    def _preamble(self) -> bool:
        at = self._buffer.find(self._delimiter)
        if at < 0:
            self._buffer = self._buffer[-len(self._delimiter) :]
            return False
        self._buffer = self._buffer[at + len(self._delimiter) :]
        self._state = "delimited"
        return True

    def _delimited(self) -> bool:
        """After a delimiter: ``--`` closes the body, anything else starts a part."""
        if len(self._buffer) < 2:
            return False
        if self._buffer.startswith(b"--"):
            raise MalformedResponse("the multipart answer has fewer than two parts")
        self._part += 1
        self._state = "part_headers"
        return True

    def _part_headers(self) -> bool:
        # The delimiter line's own CRLF comes first (after optional padding).
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_PART_HEADERS:
                raise MalformedResponse("multipart part headers too long")
            return False
        first_line, _, block = self._buffer[:end].partition(b"\r\n")
        if first_line.strip(b" \t"):
            raise MalformedResponse("garbage after a multipart delimiter")
        headers = _parse_part_headers(block)
        if self._part == 1:
            self.headers = headers
        self._buffer = self._buffer[end + 4 :]
        self._state = "part_body"
        return True

    def _part_body(self) -> bool:
        at = self._buffer.find(self._delimiter)
        keep = len(self._delimiter) - 1
        if at < 0:
            if len(self._buffer) > keep:
                self._emit(self._buffer[:-keep])
                self._buffer = self._buffer[-keep:]
            return False
        self._emit(self._buffer[:at])
        self._buffer = self._buffer[at + len(self._delimiter) :]
        if self._part == 0:
            self._end_json()
            self._state = "delimited"
            return True
        self.done = True  # what follows (closing "--", epilogue) does not matter
        return False

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        if self._part == 0:
            if len(self._json) + len(data) > MAX_JSON_PART:
                raise MalformedResponse("the JSON part is too large")
            self._json += data
        elif self.location is None:
            self._write(data)

    def _end_json(self) -> None:
        try:
            self.metadata = json.loads(self._json or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise MalformedResponse("the first part is not JSON") from None
        if not isinstance(self.metadata, dict):
            raise MalformedResponse("the first part is not a JSON object")


def _parse_part_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            headers.setdefault(_decode(name).strip().lower(), _decode(value).strip())
    return headers


# --- consumers of the federation client's streamed answers ------------------------------


class _SpoolWriter:
    """Media bytes into the spool file; past the limit, RemoteTooLarge stops the transfer."""

    def __init__(self, sink: UploadSink) -> None:
        self.sink = sink

    def __call__(self, data: bytes) -> None:
        self.sink.write(data)
        if self.sink.too_large:
            raise RemoteTooLarge()


class _MultipartConsumer:
    def __init__(self, write: _SpoolWriter) -> None:
        self._write = write
        self.reader: MultipartReader | None = None

    def start(self, status: int, headers: Any) -> None:
        boundary = boundary_of(_first_header(headers, b"content-type"))
        self.reader = MultipartReader(boundary, self._write)

    def write(self, data: bytes) -> None:
        assert self.reader is not None
        self.reader.feed(data)


class _PlainConsumer:
    """A body that is the media itself (a redirect's target, the legacy endpoint)."""

    def __init__(self, write: _SpoolWriter) -> None:
        self.write = write

    def start(self, status: int, headers: Any) -> None:
        pass


# --- fetching -------------------------------------------------------------------------


def is_unknown_endpoint(e: HttpResponseError) -> bool:
    """Whether the answer says the endpoint does not exist there (so: an older server)."""
    if e.status in (404, 405):
        return e.body is None or e.errcode == "M_UNRECOGNIZED"
    return e.status == 400 and e.errcode == "M_UNRECOGNIZED"


def to_matrix_error(server_name: str, e: FederationError) -> MatrixError:
    """What a client asking for the media sees (Synapse's choices)."""
    if isinstance(e, ResponseTooLargeError):
        return remote_too_large()
    if isinstance(e, HttpResponseError) and e.status == 404:
        return MatrixError("M_NOT_FOUND", f"Media not found on {server_name}")
    if isinstance(e, HttpResponseError) and e.errcode == "M_NOT_YET_UPLOADED":
        return MatrixError("M_NOT_YET_UPLOADED", "Content has not yet been uploaded", 504)
    return MatrixError("M_UNKNOWN", f"Failed to fetch remote media from {server_name}", 502)


def remote_too_large() -> MatrixError:
    # The spec's answer for remote media too large to proxy: 502 M_TOO_LARGE.
    return MatrixError("M_TOO_LARGE", "Remote media is larger than this server accepts", 502)


class RemoteMediaFetcher:
    """Fetches one media item from its origin into a spool file (see the module doc)."""

    def __init__(self, client: Any, tmp_dir: str, max_size: int) -> None:
        self._client = client
        self._tmp_dir = tmp_dir
        self.max_size = max_size

    async def fetch(self, server_name: str, media_id: str, wait_ms: int) -> FetchedMedia:
        """The media's bytes in a spool file, or a MatrixError for the client.

        ``wait_ms``: how long the origin may wait for media not uploaded yet.
        """
        sink = UploadSink(self._tmp_dir, self.max_size)
        try:
            return await self._fetch(server_name, media_id, wait_ms, _SpoolWriter(sink))
        except RemoteTooLarge:
            logger.info("media %s/%s: over %d bytes, refused", server_name, media_id, self.max_size)
            raise remote_too_large() from None
        except MalformedResponse as e:
            logger.warning("media %s/%s: bad answer: %s", server_name, media_id, e)
            raise MatrixError(
                "M_UNKNOWN", f"Failed to fetch remote media from {server_name}", 502
            ) from None
        except FederationError as e:
            logger.warning("media %s/%s: %s", server_name, media_id, e)
            raise to_matrix_error(server_name, e) from None
        finally:
            sink.close()  # nothing to do once claimed; removes the spool file otherwise

    async def _fetch(
        self, server_name: str, media_id: str, wait_ms: int, write: _SpoolWriter
    ) -> FetchedMedia:
        query = {"timeout_ms": wait_ms}
        timeout = self._client.timeout + wait_ms / 1000
        try:
            return await self._federation_download(server_name, media_id, query, timeout, write)
        except HttpResponseError as e:
            if not is_unknown_endpoint(e):
                raise
        logger.info("%s has no federation media endpoint: using the legacy one", server_name)
        return await self._legacy_download(server_name, media_id, query, timeout, write)

    async def _federation_download(
        self,
        server_name: str,
        media_id: str,
        query: Mapping[str, Any],
        timeout: float,
        write: _SpoolWriter,
    ) -> FetchedMedia:
        consumer = _MultipartConsumer(write)
        await self._client.get_stream(
            server_name,
            build_path(FEDERATION_DOWNLOAD, media_id),
            consumer,
            query=query,
            timeout=timeout,
            body_timeout=BODY_TIMEOUT_SECONDS,
            max_response_size=self.max_size + MULTIPART_OVERHEAD,
        )
        assert consumer.reader is not None
        consumer.reader.finish()
        part = consumer.reader.headers
        if consumer.reader.location is None:
            return _claim(write, part.get("content-type"), part.get("content-disposition"))
        return await self._follow(server_name, consumer.reader.location, write)

    async def _follow(self, server_name: str, url: str, write: _SpoolWriter) -> FetchedMedia:
        """The second part was a ``Location``: a plain GET, never cached as a URL."""
        logger.debug("media from %s is at %s", server_name, url)
        try:
            response = await self._client.get_url_stream(
                url,
                _PlainConsumer(write),
                body_timeout=BODY_TIMEOUT_SECONDS,
                max_response_size=self.max_size,
            )
        except HttpResponseError as e:
            # The origin said the media is there: a failing target is not a 404.
            raise RequestFailedError(e.destination, e.message, status=e.status) from e
        return _claim(
            write,
            _first_header(response.headers, b"content-type"),
            _first_header(response.headers, b"content-disposition"),
        )

    async def _legacy_download(
        self,
        server_name: str,
        media_id: str,
        query: Mapping[str, Any],
        timeout: float,
        write: _SpoolWriter,
    ) -> FetchedMedia:
        # allow_remote=false: the origin must not go and fetch it from elsewhere.
        response = await self._client.get_stream(
            server_name,
            build_path(LEGACY_DOWNLOAD, server_name, media_id),
            _PlainConsumer(write),
            query={**query, "allow_remote": "false"},
            timeout=timeout,
            body_timeout=BODY_TIMEOUT_SECONDS,
            max_response_size=self.max_size,
        )
        return _claim(
            write,
            _first_header(response.headers, b"content-type"),
            _first_header(response.headers, b"content-disposition"),
        )


def _claim(write: _SpoolWriter, content_type: str | None, disposition: str | None) -> FetchedMedia:
    upload = write.sink.claim()
    return FetchedMedia(upload, content_type, disposition)
