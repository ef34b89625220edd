"""Media going out over HTTP: the safety headers, and streaming with back-pressure.

Shared by the client-server and federation transports (which may not import
each other). ``MediaProducer`` sends the stored bytes only while the connection
keeps up: when the socket's buffer fills, Twisted pauses the producer and
nothing more is read until the client has taken what was sent. Local files
on plain TCP go out with ``sendfile()`` from the page cache (no copy through
Python); the rest is written through Twisted, read from the page cache on the
reactor thread without blocking (``read_nowait``: preadv2 with RWF_NOWAIT), or
on a worker thread when it needs the disk. A download of any size holds a
chunk or two in memory at most.
"""

import errno
import logging
import os
import re
import unicodedata
from typing import Any
from urllib.parse import quote

from twisted.internet import defer, tcp, threads
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from homeserver.services.media.storage import MediaReader

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
# With sendfile(): most bytes go that way, SENDFILE_SIZE at a time; what goes
# through Twisted (the first bytes, what follows a full socket) in pieces bigger
# than Twisted's buffer, so that it pauses and then resumes us (see MediaProducer).
SENDFILE_SIZE = 1024 * 1024
PIECE_SIZE = 128 * 1024

# The spec's recommended policy (plus media-src, as Synapse sends).
CONTENT_SECURITY_POLICY = (
    b"sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; "
    b"style-src 'unsafe-inline'; media-src 'self'; object-src 'self';"
)

# Spec "Serving inline content": types that may be served inline.
INLINE_CONTENT_TYPES = frozenset(
    {
        "text/css",
        "text/plain",
        "text/csv",
        "application/json",
        "application/ld+json",
        "image/jpeg",
        "image/gif",
        "image/png",
        "image/apng",
        "image/webp",
        "image/avif",
        "video/mp4",
        "video/webm",
        "video/ogg",
        "video/quicktime",
        "audio/mp4",
        "audio/webm",
        "audio/aac",
        "audio/mpeg",
        "audio/ogg",
        "audio/wave",
        "audio/wav",
        "audio/x-wav",
        "audio/x-pn-wav",
        "audio/flac",
        "audio/x-flac",
    }
)

# RFC 5987 attr-char, besides what quote() always keeps (letters, digits, "_.-~").
_ATTR_CHARS = "!#$&+^`|"
_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")


def bare_type(content_type: str | None) -> str:
    """The media type without parameters, lower-cased ("" when unusable)."""
    if not content_type:
        return ""
    base = content_type.split(";", 1)[0].strip().lower()
    return base if _MEDIA_TYPE.match(base) else ""


def response_content_type(media_type: str | None) -> str:
    """What to send as Content-Type: the uploaded type, or application/octet-stream.

    text/* gets a charset when it has none (the spec allows that).
    """
    base = bare_type(media_type)
    if not base:
        return "application/octet-stream"
    assert media_type is not None
    value = media_type.strip()
    if not all(32 <= ord(c) < 127 for c in value):
        value = base
    if base.startswith("text/") and "charset" not in value.lower():
        value = f"{value}; charset=utf-8"
    return value


def sanitise_filename(name: str | None) -> str | None:
    """A file name without directories or control characters, or None when nothing is left."""
    if not name:
        return None
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C")
    name = name.strip().strip(".") if name.strip() in (".", "..") else name.strip()
    return name[:255] or None


def content_disposition(
    content_type: str | None, filename: str | None, inline: bool | None = None
) -> bytes:
    """``inline`` for the spec's safe types, ``attachment`` otherwise, with the file name.

    Plain ASCII names go in ``filename="..."``; anything else in RFC 5987's
    ``filename*=utf-8''...`` (RFC 6266).
    """
    if inline is None:
        inline = bare_type(content_type) in INLINE_CONTENT_TYPES
    kind = "inline" if inline else "attachment"
    name = sanitise_filename(filename)
    if not name:
        return kind.encode()
    if all(32 <= ord(c) < 127 for c in name) and '"' not in name and "\\" not in name:
        return f'{kind}; filename="{name}"'.encode()
    return f"{kind}; filename*=utf-8''{quote(name, safe=_ATTR_CHARS)}".encode()


def set_media_headers(request: Any, content_type: str, disposition: bytes) -> None:
    """Content-Type, Content-Disposition and the safety headers of every media response."""
    request.setHeader(b"Content-Type", content_type.encode("ascii"))
    request.setHeader(b"Content-Disposition", disposition)
    request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY)
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Cross-Origin-Resource-Policy", b"cross-origin")
    request.setHeader(b"X-Robots-Tag", b"noindex, nofollow, noarchive, noimageindex")
    request.setHeader(b"Cache-Control", b"private, max-age=86400")


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: bytes | str | None, size: int) -> tuple[int, int] | None:
    """A single ``bytes=`` range as (offset, length); None to send everything.

    Several ranges or a malformed header are ignored (the whole body is sent,
    as RFC 9110 allows); a range that starts past the end raises.
    """
    if not header:
        return None
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # the last N bytes
        suffix = int(m.group(2))
        if suffix == 0:
            raise RangeNotSatisfiable()
        start = max(0, size - suffix)
        return start, size - start
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable()
    end = min(end, size - 1)
    return start, end - start + 1


def _sendfile_socket(request: Any, reader: Any) -> int | None:
    """The socket to ``sendfile()`` into, when the reader is a local file and the
    connection plain TCP (TLS encrypts in user space: those bytes go through Twisted)."""
    if not hasattr(os, "sendfile") or not hasattr(reader, "cached"):
        return None
    transport = getattr(getattr(request, "channel", None), "transport", None)
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", True):
        return None
    try:
        return int(transport.fileno())
    except Exception:
        return None


def _transport_idle(request: Any) -> bool:
    """Twisted holds nothing unsent for this connection (its buffer attributes, where known)."""
    transport = getattr(request.channel, "transport", None)
    if transport is None:
        return False
    unsent = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
    return unsent <= 0 and not getattr(transport, "_tempDataLen", 0)


@implementer(IPushProducer)
class MediaProducer:
    """Copies ``length`` bytes from a reader to a request, with back-pressure.

    Two ways to send, mixed in one response:

    - through Twisted: ``request.write`` of a chunk read from the page cache on
      the reactor thread (``read_nowait``), or on a worker thread when it needs
      the disk. Twisted buffers it and pauses this producer until the socket
      has taken it all (``resumeProducing``).
    - ``sendfile()`` straight from the page cache to the socket (local files,
      plain TCP): no copy in user space and no thread. Only while Twisted's own
      buffer is empty (right after it resumed us, and nothing written since),
      so the bytes stay in order; only as many bytes as the page cache holds
      (``cached``), so the reactor never waits for the disk. When the socket is
      full, the next piece goes through Twisted, which tells us (by resuming)
      when the socket has room again.
    """

    def __init__(
        self, reactor: Any, request: Any, reader: MediaReader, length: int, suffix: bytes = b""
    ) -> None:
        self._reactor = reactor
        self._request = request
        self._reader = reader
        self._remaining = length
        self._suffix = suffix
        self._paused = False
        self._reading = False
        self._done = False
        self._reader_closed = False
        self._socket: int | None = None
        self._piece = PIECE_SIZE
        self._drained = False  # Twisted's buffer is empty: sendfile() may write
        self.finished: defer.Deferred[None] = defer.Deferred()

    def start(self) -> "defer.Deferred[None]":
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._socket = _sendfile_socket(self._request, self._reader)
        if self._socket is not None:
            # Pieces through Twisted must overflow its buffer, or it never resumes us.
            size = getattr(self._request.channel.transport, "bufferSize", 0)
            self._piece = max(PIECE_SIZE, size + 1)
        self._pump()
        return self.finished

    # --- IPushProducer ------------------------------------------------------------------
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        # The transport resumes its producer only once it has sent all it held.
        self._paused = False
        self._drained = True
        self._pump()

    def stopProducing(self) -> None:
        """The connection went away: stop reading, release the reader."""
        if self._done:
            return
        self._end()

    # --- the copy loop ------------------------------------------------------------------
    def _pump(self) -> None:
        """Send until the transport pauses us, the body is done or a read would block."""
        read_nowait = getattr(self._reader, "read_nowait", None)
        while not (self._paused or self._reading or self._done):
            if self._remaining <= 0:
                self._complete()
                return
            if self._drained and self._socket is not None and self._sendfile():
                continue
            data = None
            if read_nowait is not None:
                # With sendfile() to follow, only a piece (enough to be resumed).
                size = self._piece if self._socket is not None else CHUNK_SIZE
                try:
                    data = read_nowait(min(size, self._remaining))
                except Exception as e:
                    logger.error("reading stored media failed: %s", e)
                    self._abort()
                    return
            if data is None:
                self._reading = True
                d = threads.deferToThreadPool(
                    self._reactor,
                    self._reactor.getThreadPool(),
                    self._reader.read,
                    min(CHUNK_SIZE, self._remaining),
                )
                d.addCallbacks(self._got, self._read_failed)
                return
            if not self._deliver(data):
                return

    def _sendfile(self) -> bool:
        """sendfile() what the page cache holds; False when the rest must go through Twisted
        (the socket is full, the bytes are not cached) or the response is over."""
        reader: Any = self._reader
        position = reader.position
        if position is None:
            return False  # bytes read ahead by open() go first, through Twisted
        if not _transport_idle(self._request):
            self._drained = False  # (cannot happen: Twisted resumes us only once it is)
            return False
        try:
            size = reader.cached(min(SENDFILE_SIZE, self._remaining))
        except OSError as e:
            logger.error("reading stored media failed: %s", e)
            self._abort()
            return False
        if size <= 0:
            return False
        assert self._socket is not None
        try:
            sent = os.sendfile(self._socket, reader.fileno(), position, size)
        except BlockingIOError:
            self._drained = False  # the socket is full: the next piece goes through Twisted
            return False
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSOCK):
                self._socket = None  # not for this file system or socket: write instead
                return False
            self._abort()  # the connection broke
            return False
        if sent <= 0:
            logger.error("stored media ended %d bytes early", self._remaining)
            self._abort()
            return False
        reader.skip(sent)
        self._remaining -= sent
        self._request.sentLength += sent
        if sent < size:
            self._drained = False  # the socket is full: the next piece goes through Twisted
            return False
        return True

    def _deliver(self, data: bytes) -> bool:
        if not data:
            logger.error("stored media ended %d bytes early", self._remaining)
            self._abort()
            return False
        self._remaining -= len(data)
        self._drained = False
        self._request.write(data)  # may pause us (the socket's buffer is full)
        return True

    def _got(self, data: bytes) -> None:
        self._reading = False
        if self._done:
            self._close_reader()
            return
        if self._deliver(data):
            self._pump()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        logger.error("reading stored media failed: %s", failure.getErrorMessage())
        self._abort()

    def _complete(self) -> None:
        self._unregister()
        if self._suffix:
            self._request.write(self._suffix)
        if not self._request._disconnected and not self._request.finished:
            self._request.finish()
        self._end()

    def _abort(self) -> None:
        """Headers (and a Content-Length) are out: all we can do is drop the connection."""
        self._unregister()
        transport = getattr(self._request.channel, "transport", None)
        if transport is not None:
            transport.abortConnection()
        self._end()

    def _unregister(self) -> None:
        if self._request.channel is not None and self._request.producer is self:
            self._request.unregisterProducer()

    def _end(self) -> None:
        self._done = True
        if not self._reading:
            self._close_reader()
        if not self.finished.called:
            self.finished.callback(None)

    def _close_reader(self) -> None:
        if not self._reader_closed:
            self._reader_closed = True
            try:
                self._reader.close()
            except Exception:
                logger.exception("closing a media reader failed")


async def stream_body(
    reactor: Any,
    request: Any,
    reader: MediaReader | None,
    length: int,
    prefix: bytes = b"",
    suffix: bytes = b"",
) -> None:
    """Send prefix, ``length`` bytes of ``reader``, suffix; finish the request.

    Headers (with Content-Length) must already be set. HEAD requests get the
    headers only.
    """
    if request.method == b"HEAD" or reader is None:
        if reader is not None:
            reader.close()
        request.finish()
        return
    if prefix:
        request.write(prefix)
    await MediaProducer(reactor, request, reader, length, suffix).start()
