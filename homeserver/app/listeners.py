"""Opening the configured listeners, plain HTTP or TLS."""

import logging
import re
import time
from typing import TYPE_CHECKING, Any

from twisted.internet import tcp
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.server import Request, Site
from twisted.web.server import version as SERVER_VERSION

from client_api import register_client_resources
from client_api.admin_media import register_admin_media_resources
from client_api.media import register_client_media_resources, register_media_resources
from federation import register_federation_resources, register_key_resources
from homeserver.config import ConfigError
from homeserver.http.channel import HomeserverChannel
from homeserver.http.server import CORS_HEADERS, JsonResource, RequestTracker, encode_json

if TYPE_CHECKING:
    from twisted.internet import ssl

logger = logging.getLogger(__name__)

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def _health(router: JsonResource) -> None:
    async def health(request: Any) -> None:
        request.setHeader(b"Content-Type", b"text/plain")
        request.write(b"OK")
        request.finish()

    router.register("GET", "/health", health)


def build_root_resource(hs: Any, names: set[str], tracker: RequestTracker) -> JsonResource:
    router = JsonResource(tracker)
    _health(router)
    if "client" in names:
        register_client_resources(router, hs)
        register_admin_media_resources(router, hs)
    if "media" in names:
        # /_matrix/media (uploads, legacy downloads) and /_matrix/client/v1/media
        register_media_resources(router, hs)
    elif "client" in names:
        register_client_media_resources(router, hs)
    if "federation" in names:
        register_federation_resources(router, hs)
    if "keys" in names or "federation" in names:
        register_key_resources(router, hs)
    return router


def tls_context_factory(cert_path: str, key_path: str) -> "ssl.CertificateOptions":
    """Server TLS from PEM files; the certificate file may hold the whole chain.

    The TLS stack (pyOpenSSL, cryptography) is imported here, so a server
    without a TLS listener does not carry it until it makes a TLS connection.
    """
    from twisted.internet import ssl

    if not cert_path or not key_path:
        raise ConfigError(
            "a listener has tls: true but tls_certificate_path or tls_private_key_path is not set"
        )
    try:
        with open(cert_path, "rb") as f:
            pems = _PEM_CERT.findall(f.read())
        with open(key_path, "rb") as f:
            key_pem = f.read()
        if not pems:
            raise ValueError("no PEM certificate")
        private = ssl.PrivateCertificate.loadPEM(pems[0] + b"\n" + key_pem)
        chain = [ssl.Certificate.loadPEM(p).original for p in pems[1:]]
    except (OSError, ValueError, ssl.SSL.Error) as e:
        raise ConfigError(f"cannot load TLS certificate {cert_path} / key {key_path}: {e}") from e
    return ssl.CertificateOptions(
        privateKey=private.privateKey.original, certificate=private.original,
        extraCertChain=chain,
    )


# Upload paths, matched on the raw request target before the body is read.
_UPLOAD_PATH = re.compile(rb"^/_matrix/media/(?:v3|r0|v1)/upload(?:/[^/?]+/[^/?]+)?/?(?:\?.*)?$")
# How much of an upload body is read from the socket at a time.
UPLOAD_READ_SIZE = 256 * 1024
# After refusing an oversized upload, how long the rest of its body is read
# (and dropped) so the client gets to read the 413 before the connection closes.
REJECTED_UPLOAD_GRACE_SECONDS = 15.0


_date_cache: list[Any] = [0, b""]


def _http_date() -> bytes:
    """The Date header's value, formatted again only when the second changes."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0], _date_cache[1] = now, datetimeToString(now)
    return _date_cache[1]


class _DiscardBody:
    """A request body nobody will read."""

    def write(self, data: bytes) -> None:
        pass

    def tell(self) -> int:
        return 0

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


class MediaRequest(Request):
    """A request whose upload body streams to disk and is refused early when too large.

    Twisted buffers a body (in memory when small, in a temporary file otherwise)
    before the resource sees the request. For the upload paths of a listener
    serving media, the body instead goes chunk by chunk into the media
    service's ``UploadSink`` (a file under media_store_path/tmp, hashed as it
    arrives), read UPLOAD_READ_SIZE at a time. A body announced bigger than the
    sink's INLINE_MAX on a plain TCP connection skips Twisted altogether: once
    Twisted has handed over the bytes it read with the headers, the connection
    stops reading and a worker thread splices exactly the rest of the body from
    the socket into the spool file (``_receive_directly``); then the connection
    reads again and the request goes on as if Twisted had read the body. A
    Content-Length over max_upload_size is answered 413 M_TOO_LARGE before any
    of the body is read; a body without one (chunked) as soon as it passes the
    limit. Every other request is Twisted's as usual.
    """

    _rejected = False
    _read_size_raised = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Matrix bodies are JSON or media, never HTML forms: skip Twisted's form
        # parsing, which costs tens of microseconds on every POST.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)

    def process(self) -> None:
        """Twisted's ``Request.process`` for a site whose root resource is a
        leaf (``JsonResource``): no traversal of the path, no split and
        unquoting of its segments, and the Date header formatted once a second."""
        site = self.site = self.channel.site
        root = site.resource
        if not getattr(root, "isLeaf", False) or self.path == b"*":
            super().process()
            return
        self.setHeader(b"Server", SERVER_VERSION)
        self.setHeader(b"Date", _http_date())
        self.prepath = []
        self.postpath = []
        self.sitepath = []
        try:
            self.render(root)
        except BaseException:
            self.processingFailed(Failure())

    def _media_for_upload(self) -> Any:
        media = getattr(getattr(self.channel, "site", None), "media", None)
        if media is None:
            return None
        # The request line is only on the channel until the body is complete.
        command = getattr(self.channel, "_command", None)
        path = getattr(self.channel, "_path", None)
        if command in (b"POST", b"PUT") and path and _UPLOAD_PATH.match(path):
            return media
        return None

    def gotLength(self, length: int | None) -> None:  # noqa: N802 - Twisted's name
        media = self._media_for_upload()
        if media is None:
            super().gotLength(length)
            return
        self._parsePOSTFormSubmission = False  # never parse an upload as a form
        if length is not None and length > media.max_upload_size:
            self.content = _DiscardBody()
            # No "100 Continue" after the 413.
            self.requestHeaders.removeHeader(b"Expect")
            self._refuse_too_large()
            return
        transport = self.channel.transport
        direct = (
            length is not None
            and media.receives_directly(length)
            and isinstance(transport, tcp.Connection)
            and not getattr(transport, "TLS", True)
            # Twisted resumes reading when its send buffer drains: none must be pending.
            and not getattr(transport, "producerPaused", True)
        )
        sink = media.new_upload_sink(length, direct)
        # Big bodies are written and hashed on worker threads: when they fall
        # behind, the sink stops reading from the connection until they catch up.
        sink.producer = IPushProducer(transport, None)
        self.content = sink
        if direct:
            # The rest of the body comes straight from the socket (_receive_directly),
            # once Twisted has handed over what it read with the headers.
            self._direct_length = length
            transport.pauseProducing()
            self.channel.site.reactor.callLater(0, self._receive_directly)
        elif isinstance(transport, tcp.Connection):
            # Fewer, bigger reads for the body (Twisted's default is 64 KiB).
            transport.bufferSize = UPLOAD_READ_SIZE
            self._read_size_raised = True

    def _restore_read_size(self) -> None:
        if self._read_size_raised:
            self._read_size_raised = False
            transport = getattr(self.channel, "transport", None)
            if transport is not None and "bufferSize" in vars(transport):
                del transport.bufferSize  # back to Twisted's (it also sizes the send buffer)

    def _receive_directly(self) -> None:
        """Splice the rest of the body into the sink on a worker thread (see
        ``UploadSink.receive``): it never passes through the reactor thread."""
        channel, sink = self.channel, self.content
        if channel is None or self._rejected or channel.transport is None:
            return  # the connection is gone
        transport = channel.transport
        remaining = self._direct_length - getattr(sink, "length", self._direct_length)
        d = None
        if remaining > 0:
            try:
                d = channel.site.media.receive_upload_body(
                    sink, transport.fileno(), remaining, channel.timeOut
                )
            except OSError as e:  # e.g. no descriptor left to duplicate the socket with
                logger.warning("upload body goes the usual way: %s", e)
        if d is None:  # all of it came with the headers, or no receiver is free
            if remaining > 0:
                sink.use_lanes()
                transport.bufferSize = UPLOAD_READ_SIZE
                self._read_size_raised = True
            transport.resumeProducing()
            return
        saved_timeout = channel.setTimeout(None)  # receive() applies it instead
        d.addCallbacks(
            self._received_directly,
            self._receive_failed,
            callbackArgs=(saved_timeout,),
            errbackArgs=(saved_timeout,),
        )

    def _received_directly(self, _: Any, saved_timeout: Any) -> None:
        channel = self.channel
        if channel is None or channel.transport is None:
            return
        channel.setTimeout(saved_timeout)
        channel.transport.resumeProducing()
        # What Twisted does once a body is complete (no bytes after it were read).
        channel.allContentReceived()

    def _receive_failed(self, failure: Failure, saved_timeout: Any) -> None:
        logger.info("upload body from %s not received: %s",
                    self.getClientAddress().host, failure.getErrorMessage())
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.abortConnection()

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
        if self._rejected:
            return
        self.content.write(data)
        if getattr(self.content, "too_large", False):
            self._refuse_too_large()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
        self._restore_read_size()
        if self._rejected:
            # The 413 went out already and the rest of the body was dropped.
            if self.channel is not None:
                self.channel.loseConnection()
            return
        super().requestReceived(command, path, version)

    def _refuse_too_large(self) -> None:
        self._rejected = True
        old, self.content = self.content, _DiscardBody()
        old.close()
        body = encode_json({"errcode": "M_TOO_LARGE",
                            "error": "Upload is larger than max_upload_size"})
        lines = [b"HTTP/1.1 413 Request Entity Too Large", b"Content-Type: application/json",
                 b"Content-Length: %d" % len(body), b"Connection: close",
                 b"Cache-Control: no-cache, no-store, must-revalidate"]
        lines += [name + b": " + value for name, value in CORS_HEADERS.items()]
        self.channel.persistent = False
        self.channel.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        logger.info("refused an upload larger than max_upload_size from %s",
                    self.getClientAddress().host)
        reactor = getattr(self.channel.site, "reactor", None)
        if reactor is not None:
            reactor.callLater(REJECTED_UPLOAD_GRACE_SECONDS, self._drop_connection)

    def _drop_connection(self) -> None:
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.abortConnection()


class _Site(Site):
    requestFactory = MediaRequest

    def log(self, request: Any) -> None:  # access logs go through our own logger
        logger.debug(
            "%s %s %s", request.getClientAddress().host, request.method.decode(), request.code
        )


def start_listeners(hs: Any, reactor: Any, tracker: RequestTracker) -> list[Any]:
    """Listen on every configured address; returns the listening ports."""
    ports = []
    for listener in hs.config["listeners"]:
        if listener.get("type", "http") != "http":
            logger.warning("listener type %s is not served yet", listener.get("type"))
            continue
        names = {n for r in listener.get("resources", []) for n in r.get("names", [])}
        site = _Site(build_root_resource(hs, names, tracker), reactor=reactor)
        site.displayTracebacks = False
        tls = listener.get("tls", False)
        if not tls:
            site.protocol = HomeserverChannel  # TLS keeps Twisted's (it may negotiate HTTP/2)
        if "media" in names:
            site.media = hs.media  # upload bodies stream to disk (MediaRequest)
        context = None
        if tls:
            context = tls_context_factory(
                hs.config["tls_certificate_path"], hs.config["tls_private_key_path"]
            )
        addresses = listener.get("bind_addresses") or ["::", "0.0.0.0"]
        for address in addresses:
            try:
                if tls:
                    port = reactor.listenSSL(listener["port"], site, context, interface=address)
                else:
                    port = reactor.listenTCP(listener["port"], site, interface=address)
            except CannotListenError:
                # "::" usually takes IPv4 too, so "0.0.0.0" after it is already bound.
                if address == "0.0.0.0" and "::" in addresses:
                    continue
                raise
            host = f"[{address}]" if ":" in address else address
            logger.info(
                "listening on %s://%s:%d (%s)",
                "https" if tls else "http", host, port.getHost().port, ", ".join(sorted(names)),
            )
            ports.append(port)
    return ports
