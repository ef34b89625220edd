"""Server discovery: where to connect for a server name, with which Host and TLS name.

Spec: server-server API "Resolving server names". In order:

1. IP literal: that address, the given port or 8448; Host is the server name.
2. Hostname with a port: its A/AAAA records, that port; Host is the server name.
3. ``https://<hostname>/.well-known/matrix/server`` names a delegated server,
   resolved the same way (IP literal, explicit port, SRV ``_matrix-fed._tcp``
   then the deprecated ``_matrix._tcp``, else port 8448); Host and the TLS
   name are then the delegated hostname (with its port if it had one).
4-6. Without a usable ``.well-known``: SRV ``_matrix-fed._tcp.<hostname>``,
   then ``_matrix._tcp.<hostname>``, else ``<hostname>:8448``; Host is the
   hostname.

The certificate must always match the host part of the Host header; SNI is
sent unless that is an IP address. ``.well-known`` answers are cached as their
``Cache-Control``/``Expires`` say (24 h by default, between 5 min and 48 h);
failures are cached for an hour, during which a previous good answer is kept.

Turning the targets into IP addresses (and refusing forbidden ones) is the
connector's job (``federation_client``): every address is checked there.
"""

import ipaddress
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs

from crypto.xmatrix import is_valid_server_name
from homeserver.services.inflight import InFlight

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8448
WELL_KNOWN_DEFAULT_TTL_MS = 24 * 3600 * 1000
WELL_KNOWN_MIN_TTL_MS = 5 * 60 * 1000
WELL_KNOWN_MAX_TTL_MS = 48 * 3600 * 1000
WELL_KNOWN_FAILURE_TTL_MS = 3600 * 1000
WELL_KNOWN_MAX_BYTES = 50 * 1024
WELL_KNOWN_CACHE_SIZE = 10_000


class InvalidServerName(ValueError):
    """Not a server name per the appendix grammar."""


def split_server_name(server_name: str) -> tuple[str, int | None]:
    """``host[:port]`` -> (host without IPv6 brackets, port or None)."""
    if not isinstance(server_name, str) or not is_valid_server_name(server_name):
        raise InvalidServerName(f"invalid server name {server_name!r}")
    if server_name.startswith("["):
        host, _, rest = server_name[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError as e:
            raise InvalidServerName(f"invalid IPv6 literal in {server_name!r}") from e
        port_text = rest[1:] if rest.startswith(":") else None
    else:
        host, sep, port_text = server_name.partition(":")
        port_text = port_text if sep else None
    port = None
    if port_text is not None:
        port = int(port_text)
        if not 0 < port < 65536:
            raise InvalidServerName(f"invalid port in {server_name!r}")
    return host, port


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_for_header(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@attrs.frozen
class ServerAddress:
    """Where and how to reach a server name."""

    server_name: str
    # The Host header to send.
    host_header: str
    # What the certificate must be valid for; SNI is sent unless an IP address.
    tls_name: str
    # (host or IP address, port) to try in order; hostnames are resolved with
    # A/AAAA by the connector, which also refuses forbidden addresses.
    targets: tuple[tuple[str, int], ...]

    @property
    def send_sni(self) -> bool:
        return not is_ip_literal(self.tls_name)


@attrs.frozen
class SrvTarget:
    priority: int
    weight: int
    port: int
    target: str


def order_srv(records: list[SrvTarget], rng: random.Random | None = None) -> list[tuple[str, int]]:
    """RFC 2782 order: lowest priority first, weighted-random within a priority."""
    rng = rng or random.Random()
    if len(records) == 1 and records[0].target in ("", "."):
        return []  # "service decidedly not available"
    ordered: list[tuple[str, int]] = []
    for priority in sorted({r.priority for r in records}):
        group = [r for r in records if r.priority == priority]
        while group:
            total = sum(r.weight for r in group)
            if total == 0:
                chosen = group[0]
            else:
                pick = rng.randint(0, total)
                running = 0
                chosen = group[-1]
                for r in group:
                    running += r.weight
                    if running >= pick and r.weight > 0:
                        chosen = r
                        break
            group.remove(chosen)
            if chosen.target not in ("", "."):
                ordered.append((chosen.target.rstrip("."), chosen.port))
    return ordered


class DnsResolver(Protocol):
    async def srv(self, name: str) -> list[tuple[str, int]]:
        """Ordered (target, port) of the SRV records of ``name``; [] if there are none."""

    async def addresses(self, host: str) -> list[str]:
        """IP addresses (A, AAAA, following CNAMEs) of ``host``; raises if it has none."""


@attrs.frozen
class WellKnownResponse:
    status: int
    body: bytes
    cache_control: str | None = None
    expires: str | None = None


# hostname -> the HTTP response (redirects followed); raises on transport errors.
WellKnownFetcher = Callable[[str], Awaitable[WellKnownResponse]]


class WellKnownError(Exception):
    """No usable ``.well-known/matrix/server`` answer."""


@attrs.frozen
class _CachedWellKnown:
    expires_ms: int
    delegated: str | None  # None: no (valid) well-known
    fetched_ms: int
    ok: bool


_MAX_AGE = re.compile(r"(?:^|,)\s*(?:s-)?max-age\s*=\s*\"?(\d+)\"?", re.I)


def cache_ttl_ms(cache_control: str | None, expires: str | None, now_ms: int) -> int:
    """How long to keep a ``.well-known`` answer, clamped to [5 min, 48 h]."""
    ttl = WELL_KNOWN_DEFAULT_TTL_MS
    directives = (cache_control or "").lower()
    m = _MAX_AGE.search(directives)
    if "no-store" in directives or "no-cache" in directives:
        ttl = 0
    elif m:
        ttl = int(m.group(1)) * 1000
    elif expires:
        from email.utils import parsedate_to_datetime  # rarely needed: not at start-up

        try:
            ttl = int(parsedate_to_datetime(expires).timestamp() * 1000) - now_ms
        except (TypeError, ValueError, OverflowError):
            ttl = 0  # RFC 9111: an invalid Expires means already expired
    return max(WELL_KNOWN_MIN_TTL_MS, min(ttl, WELL_KNOWN_MAX_TTL_MS))


def parse_well_known(body: bytes) -> str:
    """The ``m.server`` of a well-known body, or raise WellKnownError."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise WellKnownError("not JSON") from e
    if not isinstance(data, dict) or not isinstance(data.get("m.server"), str):
        raise WellKnownError("no m.server string")
    delegated = data["m.server"]
    try:
        split_server_name(delegated)
    except InvalidServerName as e:
        raise WellKnownError(f"m.server {delegated[:100]!r} is not a server name") from e
    return delegated


class ServerDiscovery:
    def __init__(
        self,
        resolver: DnsResolver,
        fetch_well_known: WellKnownFetcher,
        now_ms: Callable[[], int] | None = None,
    ) -> None:
        self._resolver = resolver
        self._fetch_well_known = fetch_well_known
        self._now_ms = now_ms or (lambda: int(time.time() * 1000))
        self._well_known: dict[str, _CachedWellKnown] = {}
        self._well_known_inflight: InFlight[str | None] = InFlight()

    async def resolve(self, server_name: str) -> ServerAddress:
        """Where to reach ``server_name`` (InvalidServerName if it is not one)."""
        host, port = split_server_name(server_name)
        if is_ip_literal(host):  # step 1
            return ServerAddress(server_name, server_name, host, ((host, port or DEFAULT_PORT),))
        if port is not None:  # step 2
            return ServerAddress(server_name, server_name, host, ((host, port),))
        delegated = await self.well_known(host)  # step 3
        if delegated is not None:
            d_host, d_port = split_server_name(delegated)
            if is_ip_literal(d_host):  # 3.1
                return ServerAddress(
                    server_name, delegated, d_host, ((d_host, d_port or DEFAULT_PORT),)
                )
            if d_port is not None:  # 3.2
                return ServerAddress(server_name, delegated, d_host, ((d_host, d_port),))
            return await self._srv_or_default(server_name, d_host)  # 3.3 - 3.5
        return await self._srv_or_default(server_name, host)  # steps 4 - 6

    async def _srv_or_default(self, server_name: str, host: str) -> ServerAddress:
        targets: list[tuple[str, int]] = []
        for service in ("_matrix-fed._tcp.", "_matrix._tcp."):
            try:
                targets = await self._resolver.srv(service + host)
            except Exception as e:  # a DNS failure is treated as "no record"
                logger.info("SRV look-up of %s%s failed: %s", service, host, e)
                targets = []
            if targets:
                break
        if not targets:
            targets = [(host, DEFAULT_PORT)]
        return ServerAddress(server_name, host, host, tuple(targets))

    # --- .well-known ----------------------------------------------------------------
    async def well_known(self, hostname: str) -> str | None:
        """The delegated server name of ``hostname``, or None; cached."""
        now = self._now_ms()
        cached = self._well_known.get(hostname)
        if cached is not None and cached.expires_ms > now:
            return cached.delegated
        return await self._well_known_inflight.run(
            hostname, lambda: self._refresh_well_known(hostname, cached)
        )

    async def _refresh_well_known(
        self, hostname: str, previous: _CachedWellKnown | None
    ) -> str | None:
        try:
            response = await self._fetch_well_known(hostname)
        except Exception as e:
            return self._well_known_failed(hostname, previous, f"request failed: {e}", True)
        if response.status != 200:
            return self._well_known_failed(
                hostname, previous, f"HTTP {response.status}", response.status >= 500
            )
        try:
            delegated = parse_well_known(response.body)
        except WellKnownError as e:
            return self._well_known_failed(hostname, previous, str(e), False)
        now = self._now_ms()
        ttl = cache_ttl_ms(response.cache_control, response.expires, now)
        self._remember(hostname, _CachedWellKnown(now + ttl, delegated, now, True))
        logger.debug("%s delegates federation to %s (for %d s)", hostname, delegated, ttl // 1000)
        return delegated

    def _well_known_failed(
        self, hostname: str, previous: _CachedWellKnown | None, reason: str, transient: bool
    ) -> str | None:
        now = self._now_ms()
        logger.debug("no .well-known/matrix/server for %s: %s", hostname, reason)
        # A server that delegated before and is briefly unreachable keeps its
        # delegation (within the 48 h cache ceiling) rather than being
        # contacted on a different, probably wrong, address.
        if (
            transient
            and previous is not None
            and previous.ok
            and now - previous.fetched_ms < WELL_KNOWN_MAX_TTL_MS
        ):
            self._remember(
                hostname,
                _CachedWellKnown(
                    now + WELL_KNOWN_FAILURE_TTL_MS, previous.delegated, previous.fetched_ms, True
                ),
            )
            return previous.delegated
        self._remember(
            hostname, _CachedWellKnown(now + WELL_KNOWN_FAILURE_TTL_MS, None, now, False)
        )
        return None

    def _remember(self, hostname: str, entry: _CachedWellKnown) -> None:
        self._well_known.pop(hostname, None)
        self._well_known[hostname] = entry
        while len(self._well_known) > WELL_KNOWN_CACHE_SIZE:
            self._well_known.pop(next(iter(self._well_known)))


# --- the system's DNS ----------------------------------------------------------


class SystemResolver:
    """SRV through ``twisted.names`` (resolv.conf, with its TTL cache) and host
    addresses through the reactor's resolver (getaddrinfo: /etc/hosts, CNAMEs)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._dns: Any = None

    async def srv(self, name: str) -> list[tuple[str, int]]:
        from twisted.names import client, dns, error

        if self._dns is None:
            self._dns = client.createResolver(reactor=self._reactor)
        try:
            answers, _, _ = await self._dns.lookupService(name)
        except (error.DNSNameError, error.DNSNotImplementedError, error.DNSQueryRefusedError):
            return []
        records = [
            SrvTarget(a.payload.priority, a.payload.weight, a.payload.port, str(a.payload.target))
            for a in answers
            if a.type == dns.SRV
        ]
        return order_srv(records)

    async def addresses(self, host: str) -> list[str]:
        from twisted.internet import defer
        from twisted.internet.address import IPv4Address, IPv6Address
        from twisted.internet.error import DNSLookupError
        from twisted.internet.interfaces import IResolutionReceiver
        from zope.interface import implementer

        found: list[str] = []
        done: defer.Deferred[None] = defer.Deferred()

        @implementer(IResolutionReceiver)
        class _Receiver:
            def resolutionBegan(self, resolution: Any) -> None:
                pass

            def addressResolved(self, address: Any) -> None:
                if address.host not in found:
                    found.append(address.host)

            def resolutionComplete(self) -> None:
                done.callback(None)

        self._reactor.nameResolver.resolveHostName(
            _Receiver(), host, 0, [IPv4Address, IPv6Address], "TCP"
        )
        await done
        if not found:
            raise DNSLookupError(host)
        return found
