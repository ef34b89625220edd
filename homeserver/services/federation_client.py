"""Outbound federation requests: discovery, address policy, TLS, X-Matrix signing.

``FederationClient.request`` is what every service that talks to another
server uses. For one request it

1. refuses a destination that is in back-off (``NotRetryingDestination``),
   unless ``ignore_backoff``;
2. finds where the server lives (``discovery.ServerDiscovery``: IP literal,
   explicit port, ``.well-known``, SRV, port 8448) and the Host header;
3. resolves every target to IP addresses and drops each address that is in
   ``federation_ip_range_blacklist`` (else ``ip_range_blacklist``; private
   ranges by default) unless ``ip_range_whitelist`` lists it - IP literals
   included, before any connection is made. Nothing left: ``DestinationBlockedError``;
4. connects over TLS to the checked address itself (no second DNS look-up),
   sending SNI and verifying the certificate for the expected name unless
   ``federation_verify_certificates: false``;
5. signs the request with X-Matrix over method, the exact path and query as
   sent, origin, destination and the JSON body;
6. returns the parsed JSON body of a 2xx answer, or raises a ``FederationError``
   subclass carrying the status and the remote's ``errcode``.

Connection failures, timeouts and 5xx answers put the destination in
exponential back-off (in memory, ``Backoff``); any other answer clears it.

``get_stream`` is the same request for answers that are not JSON (media):
the body goes to a consumer chunk by chunk instead of into memory.
``get_url_stream`` is a plain, unsigned GET of an https URL (where a media
answer may point) through the same address policy and TLS.
"""

import functools
import io
import ipaddress
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urljoin, urlsplit

import attrs
from twisted.internet import defer, protocol
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory
from zope.interface import implementer

import homeserver
from crypto.canonical_json import encode_canonical_json
from crypto.keys import ServerSigningKey
from crypto.xmatrix import sign_request
from homeserver.config.loader import DEFAULT_IP_RANGE_BLOCKLIST, parse_duration_ms
from homeserver.errors import ERRCODES, MatrixError
from homeserver.services.discovery import (
    DnsResolver,
    InvalidServerName,
    ServerAddress,
    ServerDiscovery,
    SystemResolver,
    WellKnownResponse,
    is_ip_literal,
    split_server_name,
)

if TYPE_CHECKING:
    from OpenSSL import SSL
    from twisted.internet import ssl
    from twisted.web.client import URI

# The HTTP client (twisted.web.client, its endpoints, treq) and the TLS stack
# (twisted.internet.ssl, pyOpenSSL, cryptography) are imported on first use: a
# server that has not talked to another one yet does not carry them.

logger = logging.getLogger(__name__)

USER_AGENT = f"homeserver/{homeserver.__version__}".encode()
DEFAULT_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 15.0
MAX_RESPONSE_BYTES = 100 * 1024 * 1024
WELL_KNOWN_TIMEOUT_S = 10.0
WELL_KNOWN_MAX_REDIRECTS = 5
_FEDERATION_SCHEME = b"matrix-federation"

# RFC 3986 characters allowed in a request target (and '%' for escapes).
_URI_SAFE = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?%"
)


# --- errors -------------------------------------------------------------------


class FederationError(Exception):
    """A federation request did not succeed.

    ``status`` is the remote's HTTP status (None when there was no answer),
    ``errcode``/``body`` what it said, if it said anything in JSON.
    """

    def __init__(
        self,
        destination: str,
        message: str,
        *,
        status: int | None = None,
        errcode: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(f"{destination}: {message}")
        self.destination = destination
        self.message = message
        self.status = status
        self.errcode = errcode
        self.body = body

    def to_matrix_error(self) -> MatrixError:
        """What to answer a client whose request needed this remote call."""
        # The remote's 4xx answers pass through, except 401: a client would
        # take that for its own access token failing.
        if (
            self.status is not None
            and self.errcode in ERRCODES
            and 400 <= self.status < 500
            and self.status != 401
        ):
            error = self.body.get("error") if isinstance(self.body, dict) else None
            return MatrixError(
                self.errcode, error if isinstance(error, str) else self.message, self.status
            )
        return MatrixError("M_UNKNOWN", f"Failed to reach {self.destination}: {self.message}", 502)


class HttpResponseError(FederationError):
    """The remote answered with a non-2xx status."""


class RequestFailedError(FederationError):
    """No usable answer: DNS, connection, TLS, timeout, or a body that is not JSON."""


class ResponseTooLargeError(RequestFailedError):
    """The answer's body is larger than the caller allows (``get_stream``)."""


class DestinationBlockedError(FederationError):
    """Refused before connecting: every address is forbidden by the IP range
    configuration, or the destination is not a valid server name."""


class NotRetryingDestination(FederationError):
    """The destination is in back-off after failures; ``retry_at_ms`` says until when."""

    def __init__(self, destination: str, retry_at_ms: int) -> None:
        super().__init__(destination, f"not retrying before {retry_at_ms}")
        self.retry_at_ms = retry_at_ms


# --- per-destination back-off ---------------------------------------------------


@attrs.define
class DestinationState:
    failures: int = 0
    retry_interval_ms: int = 0
    last_failure_ms: int = 0

    @property
    def retry_at_ms(self) -> int:
        return self.last_failure_ms + self.retry_interval_ms


class Backoff:
    """Exponential back-off per destination, in memory.

    The first failure waits ``min_interval_ms``, each further one multiplies
    the wait (up to ``max_interval_ms``); a success forgets the destination.
    ``on_recovered`` callbacks run when a destination that was failing works
    again (the transaction sender uses this to flush its queue).
    """

    def __init__(
        self,
        now_ms: Callable[[], int],
        min_interval_ms: int = 10 * 60 * 1000,
        multiplier: float = 2.0,
        max_interval_ms: int = 7 * 24 * 3600 * 1000,
    ) -> None:
        self._now_ms = now_ms
        self.min_interval_ms = min_interval_ms
        self.multiplier = multiplier
        self.max_interval_ms = max_interval_ms
        self._states: dict[str, DestinationState] = {}
        self.on_recovered: list[Callable[[str], Any]] = []

    def state(self, destination: str) -> DestinationState | None:
        return self._states.get(destination)

    def retry_at_ms(self, destination: str) -> int | None:
        """When the destination may be tried again, or None if it may be now."""
        state = self._states.get(destination)
        if state is None:
            return None
        at = state.retry_at_ms
        return at if at > self._now_ms() else None

    def record_failure(self, destination: str) -> DestinationState:
        state = self._states.setdefault(destination, DestinationState())
        state.failures += 1
        if state.retry_interval_ms == 0:
            state.retry_interval_ms = self.min_interval_ms
        else:
            state.retry_interval_ms = min(
                int(state.retry_interval_ms * self.multiplier), self.max_interval_ms
            )
        state.last_failure_ms = self._now_ms()
        return state

    def record_success(self, destination: str) -> None:
        if self._states.pop(destination, None) is not None:
            for callback in list(self.on_recovered):
                try:
                    callback(destination)
                except Exception:
                    logger.exception("back-off recovery callback failed for %s", destination)

    def reset(self, destination: str) -> None:
        """Forget failures without running the recovery callbacks."""
        self._states.pop(destination, None)


# --- address policy -------------------------------------------------------------


class IpRangeFilter:
    """Which addresses we refuse to connect to.

    IPv6 forms of IPv4 addresses (mapped ``::ffff:a.b.c.d``, compatible
    ``::a.b.c.d``, 6to4 ``2002::/16``) are checked as the IPv4 address too;
    ``0.0.0.0`` and ``::`` are always refused.
    """

    def __init__(self, blocklist: Iterable[str], allowlist: Iterable[str] = ()) -> None:
        self._block = [ipaddress.ip_network(r, strict=False) for r in blocklist]
        self._block += [ipaddress.ip_network("0.0.0.0/32"), ipaddress.ip_network("::/128")]
        self._allow = [ipaddress.ip_network(r, strict=False) for r in allowlist]

    @staticmethod
    def _forms(ip: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
        forms: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None:
                forms.append(addr.ipv4_mapped)
            if addr.sixtofour is not None:
                forms.append(addr.sixtofour)
            if int(addr) >> 32 == 0 and int(addr) > 1:
                forms.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        return forms

    def is_blocked(self, ip: str) -> bool:
        try:
            forms = self._forms(ip)
        except ValueError:
            return True  # not an address at all: never connect
        if any(f.version == n.version and f in n for f in forms for n in self._allow):
            return False
        return any(f.version == n.version and f in n for f in forms for n in self._block)

    @classmethod
    def from_config(cls, config: Any) -> "IpRangeFilter":
        values = config if isinstance(config, Mapping) else config.values
        blocklist = None
        for key in ("federation_ip_range_blacklist", "ip_range_blocklist", "ip_range_blacklist"):
            if values.get(key) is not None:
                blocklist = values[key]
                break
        if blocklist is None:
            blocklist = DEFAULT_IP_RANGE_BLOCKLIST
        return cls(blocklist, values.get("ip_range_whitelist") or ())


# --- TLS --------------------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedTls:
    """TLS that accepts any certificate (``federation_verify_certificates: false``)
    but still sends SNI for host names."""

    def __init__(self, options: "ssl.CertificateOptions", server_name: str) -> None:
        self._options = options
        self._sni = None if is_ip_literal(server_name) else server_name.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> "SSL.Connection":
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection


class TlsPolicy:
    """Client TLS per expected server name; certificates verified against the
    system's CAs (or ``trust_root``) unless ``verify`` is false."""

    def __init__(self, verify: bool = True, trust_root: Any = None) -> None:
        self.verify = verify
        self._trust_root = trust_root
        self._creators: OrderedDict[str, Any] = OrderedDict()
        self._insecure: ssl.CertificateOptions | None = None  # built on first use

    def creator_for(self, name: str) -> Any:
        creator = self._creators.get(name)
        if creator is None:
            from twisted.internet import ssl

            if self.verify:
                trust = self._trust_root if self._trust_root is not None else ssl.platformTrust()
                creator = ssl.optionsForClientTLS(name, trustRoot=trust)
            else:
                if self._insecure is None:
                    self._insecure = ssl.CertificateOptions(
                        verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2
                    )
                creator = _UnverifiedTls(self._insecure, name)
            self._creators[name] = creator
            if len(self._creators) > 1000:
                self._creators.popitem(last=False)
        return creator


# --- connecting -------------------------------------------------------------------


class Connector:
    """Connects to the first allowed address of a list of targets, over TLS."""

    def __init__(
        self,
        reactor: Any,
        resolver: DnsResolver,
        ip_filter: IpRangeFilter,
        tls: TlsPolicy,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self.ip_filter = ip_filter
        self._tls = tls
        self._connect_timeout = connect_timeout

    async def allowed_addresses(
        self, destination: str, targets: Sequence[tuple[str, int]]
    ) -> list[tuple[str, int]]:
        """Every (IP, port) of the targets that policy allows, in order.

        Raises DestinationBlockedError if addresses were found but all are
        forbidden, RequestFailedError if none could be found.
        """
        allowed: list[tuple[str, int]] = []
        blocked: list[str] = []
        errors: list[str] = []
        for host, port in targets:
            if is_ip_literal(host):
                ips = [host]
            else:
                try:
                    ips = await self._resolver.addresses(host)
                except Exception as e:
                    errors.append(f"{host}: {e}")
                    continue
            for ip in ips:
                if self.ip_filter.is_blocked(ip):
                    blocked.append(ip)
                elif (ip, port) not in allowed:
                    allowed.append((ip, port))
        if allowed:
            if blocked:
                logger.info("%s: not connecting to forbidden addresses %s", destination, blocked)
            return allowed
        if blocked:
            raise DestinationBlockedError(
                destination, f"every address is forbidden by the IP range blocklist: {blocked}"
            )
        raise RequestFailedError(
            destination, "cannot resolve: " + "; ".join(errors or ["no address"])
        )

    async def connect(
        self, destination: str, targets: Sequence[tuple[str, int]], tls_name: str, factory: Any
    ) -> Any:
        from twisted.internet.endpoints import (
            TCP4ClientEndpoint,
            TCP6ClientEndpoint,
            wrapClientTLS,
        )

        last: Exception | None = None
        for ip, port in await self.allowed_addresses(destination, targets):
            tcp_cls = TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint
            endpoint = wrapClientTLS(
                self._tls.creator_for(tls_name),
                tcp_cls(self._reactor, ip, port, timeout=self._connect_timeout),
            )
            try:
                return await endpoint.connect(factory)
            except (ConnectError, DNSLookupError, OSError) as e:
                logger.debug("%s: connecting to %s port %d failed: %s", destination, ip, port, e)
                last = e
        raise RequestFailedError(destination, f"cannot connect: {last}")


@implementer(IStreamClientEndpoint)
class _Endpoint:
    def __init__(self, connect: Callable[[Any], Any]) -> None:
        self._connect = connect

    def connect(self, protocolFactory: Any) -> "defer.Deferred[Any]":
        return defer.ensureDeferred(self._connect(protocolFactory))


@implementer(IAgentEndpointFactory)
class _FederationEndpointFactory:
    """``matrix-federation://<hex server name>/...``: the address discovery found."""

    def __init__(self, connector: Connector, address_of: Callable[[str], ServerAddress]) -> None:
        self._connector = connector
        self._address_of = address_of

    def endpointForURI(self, uri: "URI") -> _Endpoint:
        destination = bytes.fromhex(uri.host.decode("ascii")).decode("utf-8")

        async def connect(factory: Any) -> Any:
            address = self._address_of(destination)
            return await self._connector.connect(
                destination, address.targets, address.tls_name, factory
            )

        return _Endpoint(connect)


@implementer(IAgentEndpointFactory)
class _HttpsEndpointFactory:
    """Plain ``https://host[:port]/`` URLs (``.well-known``), same address policy."""

    def __init__(self, connector: Connector) -> None:
        self._connector = connector

    def endpointForURI(self, uri: "URI") -> _Endpoint:
        if uri.scheme != b"https":
            raise RequestFailedError(uri.host.decode("ascii", "replace"), "only https is allowed")
        host = uri.host.decode("ascii")
        port = uri.port

        async def connect(factory: Any) -> Any:
            return await self._connector.connect(host, [(host, port)], host, factory)

        return _Endpoint(connect)


# --- helpers for callers ----------------------------------------------------------


def build_path(template: str, *params: str) -> str:
    """``build_path("/_matrix/federation/v1/send/{}", txn_id)``: each parameter
    percent-encoded as one path segment (``/`` included)."""
    return template.format(*(quote(p, safe="") for p in params))


QueryValue = str | int | bool | Sequence[str]


def encode_query(query: Mapping[str, QueryValue]) -> str:
    """``a=1&b=x%40y``; list values repeat the name; booleans are true/false."""
    parts = []
    for name, value in query.items():
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if isinstance(v, bool):
                v = "true" if v else "false"
            parts.append(f"{quote(str(name), safe='')}={quote(str(v), safe='')}")
    return "&".join(parts)


def _json_error(body: Any) -> tuple[str | None, str | None]:
    if isinstance(body, dict):
        errcode = body.get("errcode")
        error = body.get("error")
        return (
            errcode if isinstance(errcode, str) else None,
            error if isinstance(error, str) else None,
        )
    return None, None


async def _with_timeout(reactor: Any, seconds: float, coro: Any) -> Any:
    """Await ``coro``, cancelling it after ``seconds``: then defer.TimeoutError
    (whatever exception the cancellation surfaced as)."""
    d = defer.ensureDeferred(coro)
    expired = []

    def expire() -> None:
        expired.append(True)
        d.cancel()

    call = reactor.callLater(seconds, expire)
    try:
        return await d
    except Exception as e:
        if expired:
            raise defer.TimeoutError(f"timed out after {seconds}s") from e
        raise
    finally:
        if call.active():
            call.cancel()


class _TooLarge(Exception):
    pass


def _body_producer(data: bytes) -> Any:
    from twisted.web.client import FileBodyProducer

    return FileBodyProducer(io.BytesIO(data))


async def _read_body(response: Any, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise _TooLarge()
        chunks.append(data)

    import treq

    await treq.collect(response, collect)
    return b"".join(chunks)


class BodyConsumer(Protocol):
    """Where ``get_stream`` and ``get_url_stream`` hand a 2xx answer's body.

    ``start`` gets the answer's status and headers before any of the body and
    may raise to refuse it; ``write`` gets each chunk and may raise to stop the
    transfer. Either exception is what the request raises.
    """

    def start(self, status: int, headers: Headers) -> None: ...

    def write(self, data: bytes) -> None: ...


@attrs.frozen
class StreamedResponse:
    status: int
    headers: Headers
    length: int  # body bytes handed to the consumer


class _ConsumerFailed(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


class _Discard(protocol.Protocol):
    """A body nobody wants: drop the connection rather than read it."""

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's interface
        self.transport.stopProducing()


class _StreamBody(protocol.Protocol):
    """Passes a response body to a consumer as it arrives, up to ``limit`` bytes.

    ``finished`` fires with the length once the body is complete; cancelling it
    (a timeout) or any failure stops the transfer, closing the connection.
    """

    def __init__(self, consumer: BodyConsumer, limit: int) -> None:
        self._consumer = consumer
        self._limit = limit
        self.length = 0
        self.finished: defer.Deferred[int] = defer.Deferred(self._cancel)

    def _cancel(self, _: Any) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def _fail(self, error: Exception) -> None:
        self.transport.stopProducing()
        self.finished.errback(error)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.finished.called:
            return
        self.length += len(data)
        if self.length > self._limit:
            self._fail(_TooLarge())
            return
        try:
            self._consumer.write(data)
        except Exception as e:
            self._fail(_ConsumerFailed(e))

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        from twisted.web.client import ResponseDone

        if self.finished.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(self.length)
        else:
            self.finished.errback(reason)


def _is_redirect(response: Any) -> bool:
    return response.code in (301, 302, 303, 307, 308) and response.headers.hasHeader(b"location")


def _http_error(
    destination: str, method: str, path: str, status: int, body: Any
) -> "HttpResponseError":
    errcode, error = _json_error(body)
    return HttpResponseError(
        destination,
        f"{method} {path}: HTTP {status}" + (f" {errcode}: {error}" if errcode else ""),
        status=status,
        errcode=errcode,
        body=None if body is _NOT_JSON else body,
    )


def _https_host(url: str) -> str:
    """The host of an https URL (for errors); anything else is refused."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        host = None
    if host is None or parts.scheme != "https":
        raise RequestFailedError(url[:200], "only https URLs are fetched")
    return host


# --- the client -------------------------------------------------------------------


class FederationClient:
    def __init__(
        self,
        reactor: Any,
        server_name: str,
        signing_key: ServerSigningKey,
        *,
        ip_filter: IpRangeFilter | None = None,
        tls: TlsPolicy | None = None,
        resolver: DnsResolver | None = None,
        discovery: ServerDiscovery | None = None,
        backoff: Backoff | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        now_ms: Callable[[], int] | None = None,
    ) -> None:
        self._reactor = reactor
        self.server_name = server_name
        self.signing_key = signing_key
        self.timeout = timeout
        self._now_ms = now_ms or (lambda: int(reactor.seconds() * 1000))
        self.resolver = resolver or SystemResolver(reactor)
        self.connector = Connector(
            reactor,
            self.resolver,
            ip_filter or IpRangeFilter(DEFAULT_IP_RANGE_BLOCKLIST),
            tls or TlsPolicy(),
        )
        self._addresses: dict[str, ServerAddress] = {}
        self.discovery = discovery or ServerDiscovery(
            self.resolver, self.fetch_well_known, self._now_ms
        )
        self.backoff = backoff or Backoff(self._now_ms)

    @classmethod
    def from_config(
        cls,
        config: Any,
        reactor: Any,
        server_name: str,
        signing_key: ServerSigningKey,
        now_ms: Callable[[], int] | None = None,
    ) -> "FederationClient":
        """The client as the configuration says (addresses, TLS, back-off, timeout)."""
        federation = config.get("federation") or {}
        clock = now_ms or (lambda: int(reactor.seconds() * 1000))
        backoff = Backoff(
            clock,
            min_interval_ms=parse_duration_ms(
                federation.get("destination_min_retry_interval", "10m")
            ),
            multiplier=float(federation.get("destination_retry_multiplier", 2)),
            max_interval_ms=parse_duration_ms(
                federation.get("destination_max_retry_interval", "7d")
            ),
        )
        return cls(
            reactor,
            server_name,
            signing_key,
            ip_filter=IpRangeFilter.from_config(config),
            tls=TlsPolicy(verify=bool(config.get("federation_verify_certificates", True))),
            backoff=backoff,
            timeout=parse_duration_ms(federation.get("client_timeout", "60s")) / 1000,
            now_ms=clock,
        )

    # The connection pool and agents are made on first use (see the imports).
    @functools.cached_property
    def _pool(self) -> Any:
        from twisted.web.client import HTTPConnectionPool

        pool = HTTPConnectionPool(self._reactor, persistent=True)
        pool.maxPersistentPerHost = 5
        pool.cachedConnectionTimeout = 90
        return pool

    @functools.cached_property
    def _agent(self) -> Any:
        from twisted.web.client import Agent

        return Agent.usingEndpointFactory(
            self._reactor, _FederationEndpointFactory(self.connector, self._address_for), self._pool
        )

    @functools.cached_property
    def _well_known_agent(self) -> Any:
        from twisted.web.client import Agent

        return Agent.usingEndpointFactory(
            self._reactor, _HttpsEndpointFactory(self.connector), self._pool
        )

    async def close(self) -> None:
        """Close pooled connections (shutdown, tests)."""
        if "_pool" in self.__dict__:  # else no request was ever made
            await self._pool.closeCachedConnections()

    def _address_for(self, destination: str) -> ServerAddress:
        return self._addresses[destination]

    # --- requests ----------------------------------------------------------------
    async def get_json(
        self,
        destination: str,
        path: str,
        query: Mapping[str, QueryValue] | None = None,
        **kwargs: Any,
    ) -> Any:
        return await self.request("GET", destination, path, query=query, **kwargs)

    async def put_json(
        self,
        destination: str,
        path: str,
        content: Any,
        query: Mapping[str, QueryValue] | None = None,
        **kwargs: Any,
    ) -> Any:
        return await self.request("PUT", destination, path, query=query, content=content, **kwargs)

    async def post_json(
        self,
        destination: str,
        path: str,
        content: Any,
        query: Mapping[str, QueryValue] | None = None,
        **kwargs: Any,
    ) -> Any:
        return await self.request("POST", destination, path, query=query, content=content, **kwargs)

    async def request(
        self,
        method: str,
        destination: str,
        path: str,
        *,
        query: Mapping[str, QueryValue] | None = None,
        content: Any = None,
        timeout: float | None = None,
        ignore_backoff: bool = False,
        max_response_size: int = MAX_RESPONSE_BYTES,
    ) -> Any:
        """Send a signed request; return the JSON body of a 2xx answer.

        ``path`` is the percent-encoded path (``build_path`` helps), ``query``
        is encoded with ``encode_query``; the X-Matrix signature covers exactly
        ``path?query`` as sent. ``content`` (any JSON value; None = no body) is
        sent as canonical JSON. Raises ``NotRetryingDestination``,
        ``DestinationBlockedError``, ``RequestFailedError`` or ``HttpResponseError``.
        """
        method = method.upper()
        uri = self._request_target(destination, path, query, ignore_backoff)
        status, body = await self._answer_within(
            destination,
            method,
            path,
            timeout,
            self._send(method, destination, uri, content, max_response_size),
        )
        self._record_answer(destination, status)
        if 200 <= status < 300:
            if body is _NOT_JSON:
                raise RequestFailedError(
                    destination, f"{method} {path}: response is not JSON", status=status
                )
            return body
        raise _http_error(destination, method, path, status, body)

    async def get_stream(
        self,
        destination: str,
        path: str,
        consumer: BodyConsumer,
        *,
        query: Mapping[str, QueryValue] | None = None,
        timeout: float | None = None,
        body_timeout: float | None = None,
        ignore_backoff: bool = False,
        max_response_size: int = MAX_RESPONSE_BYTES,
    ) -> StreamedResponse:
        """A signed GET whose 2xx body goes to ``consumer`` as it arrives (media).

        Up to the answer's headers this is ``request`` (address policy,
        signing, back-off, the same errors); they must come within
        ``timeout``. A non-2xx answer raises ``HttpResponseError``. The body
        of a 2xx answer must be complete within ``body_timeout`` (default:
        ``timeout``); past ``max_response_size`` bytes it raises
        ``ResponseTooLargeError``. Nothing that goes wrong while the body
        arrives counts against the destination's back-off: it did answer.
        """
        uri = self._request_target(destination, path, query, ignore_backoff)
        response = await self._answer_within(
            destination, "GET", path, timeout, self._open("GET", destination, uri, None)
        )
        self._record_answer(destination, response.code)
        logger.debug("<-- %s GET %s: %d (streamed)", destination, uri, response.code)
        if not 200 <= response.code < 300:
            body = await self._error_body(response)
            raise _http_error(destination, "GET", path, response.code, body)
        return await self._stream_body(
            destination, response, consumer, max_response_size, body_timeout or timeout
        )

    async def get_url_stream(
        self,
        url: str,
        consumer: BodyConsumer,
        *,
        timeout: float | None = None,
        body_timeout: float | None = None,
        max_response_size: int = MAX_RESPONSE_BYTES,
    ) -> StreamedResponse:
        """A plain GET of an ``https`` URL (where a server's media answer points).

        Not signed and outside back-off, but through the same address policy
        and TLS as federation: every address of the URL's host, and of each
        redirect's (at most 5, https only), is checked before connecting.
        The 2xx body goes to ``consumer`` as in ``get_stream``; a non-2xx
        answer raises ``HttpResponseError``.
        """
        seen: set[str] = set()
        for _ in range(WELL_KNOWN_MAX_REDIRECTS + 1):
            host = _https_host(url)
            if url in seen:
                raise RequestFailedError(host, f"redirect loop at {url}")
            seen.add(url)
            response = await self._plain_get(host, url, timeout)
            if _is_redirect(response):
                response.deliverBody(_Discard())
                url = urljoin(url, response.headers.getRawHeaders(b"location")[0].decode("latin-1"))
                continue
            if not 200 <= response.code < 300:
                body = await self._error_body(response)
                raise _http_error(host, "GET", url, response.code, body)
            return await self._stream_body(
                host, response, consumer, max_response_size, body_timeout or timeout
            )
        raise RequestFailedError(url, "too many redirects")

    # --- the pieces of a request ---------------------------------------------------
    def _request_target(
        self,
        destination: str,
        path: str,
        query: Mapping[str, QueryValue] | None,
        ignore_backoff: bool,
    ) -> str:
        """``path?query`` as sent and signed, once the destination may be contacted."""
        uri = path + ("?" + encode_query(query) if query else "")
        if not uri.startswith("/") or not set(uri) <= _URI_SAFE:
            raise ValueError(f"request target must be a percent-encoded path: {uri[:200]!r}")
        try:
            split_server_name(destination)
        except InvalidServerName as e:
            raise DestinationBlockedError(str(destination)[:255], str(e)) from e
        if not ignore_backoff:
            retry_at = self.backoff.retry_at_ms(destination)
            if retry_at is not None:
                raise NotRetryingDestination(destination, retry_at)
        return uri

    async def _answer_within(
        self, destination: str, method: str, path: str, timeout: float | None, send: Any
    ) -> Any:
        """Await ``send`` within the timeout; no answer starts or extends the back-off."""
        try:
            return await _with_timeout(
                self._reactor, timeout if timeout is not None else self.timeout, send
            )
        except defer.TimeoutError as e:
            self.backoff.record_failure(destination)
            raise RequestFailedError(destination, f"{method} {path} timed out") from e
        except DestinationBlockedError:
            raise
        except RequestFailedError:
            self.backoff.record_failure(destination)
            raise
        except Exception as e:
            self.backoff.record_failure(destination)
            raise RequestFailedError(destination, f"{method} {path} failed: {e!r}") from e

    def _record_answer(self, destination: str, status: int) -> None:
        if status >= 500:
            self.backoff.record_failure(destination)
        elif status != 429:
            self.backoff.record_success(destination)

    async def _send(
        self, method: str, destination: str, uri: str, content: Any, limit: int
    ) -> tuple[int, Any]:
        response = await self._open(method, destination, uri, content)
        try:
            raw = await _read_body(response, limit)
        except _TooLarge as e:
            raise RequestFailedError(
                destination, f"response larger than {limit} bytes", status=response.code
            ) from e
        logger.debug("<-- %s %s %s: %d", destination, method, uri, response.code)
        try:
            return response.code, json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return response.code, _NOT_JSON

    async def _open(self, method: str, destination: str, uri: str, content: Any) -> Any:
        """Send the signed request; the answer, its body not read yet."""
        address = await self.discovery.resolve(destination)
        # Literal addresses are checked here already, so a forbidden one never
        # even reaches the connection pool; the connector checks every address
        # (resolved ones included) again before connecting.
        if all(is_ip_literal(h) for h, _ in address.targets):
            await self.connector.allowed_addresses(destination, address.targets)
        self._addresses[destination] = address
        if len(self._addresses) > 10_000:
            self._addresses.pop(next(iter(self._addresses)))

        headers = Headers(
            {
                b"Host": [address.host_header.encode("ascii")],
                b"User-Agent": [USER_AGENT],
                b"Authorization": [
                    sign_request(
                        self.signing_key, self.server_name, destination, method, uri, content
                    ).encode("utf-8")
                ],
            }
        )
        producer = None
        if content is not None:
            data = encode_canonical_json(content)
            headers.setRawHeaders(b"Content-Type", [b"application/json"])
            producer = _body_producer(data)
        elif method in ("PUT", "POST"):
            producer = _body_producer(b"")
        url = (
            _FEDERATION_SCHEME
            + b"://"
            + destination.encode("utf-8").hex().encode("ascii")
            + uri.encode("ascii")
        )
        logger.debug("--> %s %s %s", destination, method, uri)
        return await self._agent.request(method.encode("ascii"), url, headers, producer)

    async def _plain_get(self, host: str, url: str, timeout: float | None) -> Any:
        """An unsigned GET through the address policy; the answer, its body not read yet."""
        try:
            target = url.encode("ascii")
        except UnicodeEncodeError:
            raise RequestFailedError(host, "the URL is not ASCII") from None
        headers = Headers({b"User-Agent": [USER_AGENT]})
        try:
            return await _with_timeout(
                self._reactor,
                timeout if timeout is not None else self.timeout,
                self._well_known_agent.request(b"GET", target, headers),
            )
        except FederationError:
            raise
        except defer.TimeoutError as e:
            raise RequestFailedError(host, f"GET {url} timed out") from e
        except Exception as e:
            raise RequestFailedError(host, f"GET {url} failed: {e!r}") from e

    async def _error_body(self, response: Any) -> Any:
        """The JSON of an error answer, if it is short JSON (``_NOT_JSON`` otherwise)."""
        try:
            raw = await _with_timeout(self._reactor, 10.0, _read_body(response, 64 * 1024))
            return json.loads(raw)
        except Exception:
            return _NOT_JSON

    async def _stream_body(
        self,
        name: str,
        response: Any,
        consumer: BodyConsumer,
        limit: int,
        timeout: float | None,
    ) -> StreamedResponse:
        """Hand the body of a 2xx answer to ``consumer`` (see ``get_stream``)."""
        if response.length is not UNKNOWN_LENGTH and response.length > limit:
            response.deliverBody(_Discard())
            raise ResponseTooLargeError(
                name, f"response larger than {limit} bytes", status=response.code
            )
        try:
            consumer.start(response.code, response.headers)
        except BaseException:
            response.deliverBody(_Discard())
            raise
        body = _StreamBody(consumer, limit)
        response.deliverBody(body)
        try:
            length = await _with_timeout(
                self._reactor, timeout if timeout is not None else self.timeout, body.finished
            )
        except _ConsumerFailed as e:
            raise e.error from None
        except _TooLarge:
            raise ResponseTooLargeError(
                name, f"response larger than {limit} bytes", status=response.code
            ) from None
        except defer.TimeoutError as e:
            raise RequestFailedError(
                name, "timed out reading the response", status=response.code
            ) from e
        except Exception as e:
            raise RequestFailedError(
                name, f"reading the response failed: {e!r}", status=response.code
            ) from e
        return StreamedResponse(response.code, response.headers, length)

    # --- .well-known ----------------------------------------------------------------
    async def fetch_well_known(self, hostname: str) -> WellKnownResponse:
        """GET https://<hostname>/.well-known/matrix/server, redirects followed
        (https only, no loops), through the same address policy and TLS."""
        return await _with_timeout(
            self._reactor, WELL_KNOWN_TIMEOUT_S, self._fetch_well_known(hostname)
        )

    async def _fetch_well_known(self, hostname: str) -> WellKnownResponse:
        from treq.client import HTTPClient

        client = HTTPClient(self._well_known_agent)
        url = f"https://{hostname}/.well-known/matrix/server"
        seen = {url}
        for _ in range(WELL_KNOWN_MAX_REDIRECTS + 1):
            response = await client.get(
                url, allow_redirects=False, unbuffered=True, headers={b"User-Agent": [USER_AGENT]}
            )
            location = response.headers.getRawHeaders(b"location")
            if response.code in (301, 302, 303, 307, 308) and location:
                await _read_body(response, 64 * 1024)
                url = urljoin(url, location[0].decode("latin-1"))
                if urlsplit(url).scheme != "https" or url in seen:
                    raise RequestFailedError(hostname, f"bad .well-known redirect to {url}")
                seen.add(url)
                continue
            try:
                body = await _read_body(response, 50 * 1024)
            except _TooLarge as e:
                raise RequestFailedError(hostname, ".well-known response too large") from e
            header = response.headers.getRawHeaders
            return WellKnownResponse(
                response.code,
                body,
                b", ".join(header(b"cache-control") or []).decode("latin-1") or None,
                (header(b"expires") or [b""])[0].decode("latin-1") or None,
            )
        raise RequestFailedError(hostname, ".well-known: too many redirects")


_NOT_JSON: Any = object()
