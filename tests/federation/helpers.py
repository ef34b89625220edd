"""In-process pieces for federation unit tests: a loopback TLS server built on our
JsonResource, a fake homeserver for the inbound auth wrapper, fake DNS."""

from pathlib import Path
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.error import DNSLookupError
from twisted.protocols.policies import WrappingFactory
from twisted.web.server import Site

from homeserver.app.listeners import tls_context_factory
from homeserver.http.server import JsonResource
from tests.support.synapse import generate_tls_certificate


class FakeDns:
    def __init__(self, hosts: dict[str, list[str]] | None = None) -> None:
        self.hosts = hosts or {}
        self.queries: list[str] = []

    async def srv(self, name: str) -> list[tuple[str, int]]:
        self.queries.append(name)
        return []

    async def addresses(self, host: str) -> list[str]:
        self.queries.append(host)
        if host in self.hosts:
            return list(self.hosts[host])
        raise DNSLookupError(host)


def loopback_client(name: str, key: Any, **kwargs: Any) -> Any:
    """A FederationClient speaking as ``name`` that may reach 127.0.0.0/8 only
    (no certificate checks, no DNS): for in-process servers on loopback."""
    from homeserver.services.federation_client import (
        DEFAULT_IP_RANGE_BLOCKLIST,
        FederationClient,
        IpRangeFilter,
        TlsPolicy,
    )

    kwargs.setdefault("tls", TlsPolicy(verify=False))
    return FederationClient(
        reactor, name, key,
        ip_filter=IpRangeFilter(DEFAULT_IP_RANGE_BLOCKLIST, ["127.0.0.0/8"]),
        resolver=FakeDns(), **kwargs,
    )


class FakeClock:
    def __init__(self, now_ms: int = 1_700_000_000_000) -> None:
        self.now = now_ms

    def time_msec(self) -> int:
        return self.now


class FakeKeyring:
    """server_name -> {key_id: VerifyKey}: what the inbound auth wrapper can find."""

    def __init__(self, keys: dict[str, dict[str, Any]] | None = None) -> None:
        self.keys = keys or {}
        self.lookups: list[tuple[str, str, int]] = []

    async def get_verify_key(self, server_name: str, key_id: str, minimum: int = 0) -> Any:
        self.lookups.append((server_name, key_id, minimum))
        return self.keys.get(server_name, {}).get(key_id)


class FakeHomeServer:
    def __init__(self, server_name: str, keyring: Any = None, **config: Any) -> None:
        self.server_name = server_name
        self.keyring = keyring or FakeKeyring()
        self.clock = FakeClock()
        self.config = config


class LoopbackServer:
    """A JsonResource served on 127.0.0.1 (TLS with a self-signed certificate, or plain)."""

    def __init__(self, directory: Path, tls: bool = True) -> None:
        self.router = JsonResource()
        site = Site(self.router, timeout=None)
        site.displayTracebacks = False
        self.factory = WrappingFactory(site)
        if tls:
            self.cert_path, key_path = generate_tls_certificate(directory)
            context = tls_context_factory(str(self.cert_path), str(key_path))
            self.port = reactor.listenSSL(0, self.factory, context, interface="127.0.0.1")
        else:
            self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port_number = self.port.getHost().port
        self.name = f"127.0.0.1:{self.port_number}"

    async def stop(self) -> None:
        """Stop listening and drop every connection (trial wants a clean reactor)."""
        await self.port.stopListening()
        for protocol in list(self.factory.protocols):
            protocol.transport.abortConnection()
        for _ in range(100):
            if not self.factory.protocols:
                return
            await task.deferLater(reactor, 0.01)
