"""Opening the configured listeners, plain HTTP or TLS."""

import logging
import re
from typing import Any

from twisted.internet import ssl
from twisted.internet.error import CannotListenError
from twisted.web.server import Site

from client_api import register_client_resources
from federation import register_federation_resources, register_key_resources
from homeserver.config import ConfigError
from homeserver.http.server import JsonResource, RequestTracker

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
    if "federation" in names:
        register_federation_resources(router, hs)
    if "keys" in names or "federation" in names:
        register_key_resources(router, hs)
    return router


def tls_context_factory(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """Server TLS from PEM files; the certificate file may hold the whole chain."""
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


class _Site(Site):
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
        site = _Site(build_root_resource(hs, names, tracker))
        site.displayTracebacks = False
        tls = listener.get("tls", False)
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
