"""Without a TLS listener the server process loads no TLS stack until it needs one.

``homeserver/app/reactor.py`` installs the reactor with pyOpenSSL, cryptography
and h2 kept out; the first outbound TLS connection (or a late ``listenSSL``)
brings them in. These tests run the real server (and one script) as separate
processes, since the test process itself has loaded TLS long ago.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

from bench.servers import generate_tls_certificate, loopback_only_blocklist
from tests.support.http import request
from tests.support.server import REPO, start_server
from tests.support.synapse import start_federating_server

# cryptography's native module: mapped into a process once pyOpenSSL is imported.
_CRYPTOGRAPHY_RUST = "cryptography/hazmat/bindings/_rust"


def _mapped(pid: int, fragment: str) -> bool:
    return fragment in Path(f"/proc/{pid}/maps").read_text()


def test_plain_http_server_loads_tls_on_first_outbound_request(tmp_path):
    remote = start_federating_server(tmp_path / "remote")  # a TLS listener: TLS at start-up
    blocklist = loopback_only_blocklist()
    ours = start_server(
        tmp_path / "ours",
        federation_verify_certificates=False,
        ip_range_blacklist=blocklist,
        federation_ip_range_blacklist=blocklist,
        trusted_key_servers=[],
    )
    try:
        assert remote.process is not None and _mapped(remote.process.pid, _CRYPTOGRAPHY_RUST)
        assert ours.process is not None
        assert request("GET", f"{ours.base_url}/_matrix/client/versions").status == 200
        assert not _mapped(ours.process.pid, _CRYPTOGRAPHY_RUST)

        # Fetching the remote's keys is our first TLS connection.
        r = request("GET", f"{ours.base_url}/_matrix/key/v2/query/{remote.server_name}",
                    timeout=30)
        assert r.status == 200, r.body
        docs = r.json()["server_keys"]
        assert [d["server_name"] for d in docs] == [remote.server_name]
        assert _mapped(ours.process.pid, _CRYPTOGRAPHY_RUST)
    finally:
        ours.stop()
        remote.stop()


_LATE_LISTEN_SSL = textwrap.dedent(
    """
    import ssl, sys, urllib.request
    from homeserver.app.reactor import install_reactor

    install_reactor(tls_listener=False)
    from twisted.internet import reactor, threads
    from twisted.internet.interfaces import IReactorSSL
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from twisted.web.static import Data

    loaded = [m for m in ("OpenSSL", "cryptography", "service_identity", "h2",
                          "twisted.internet.ssl", "twisted.protocols.tls") if m in sys.modules]
    assert not loaded, loaded
    assert IReactorSSL.providedBy(reactor)

    from homeserver.app.listeners import tls_context_factory

    root = Resource()
    root.putChild(b"hello", Data(b"over TLS", "text/plain"))
    port = reactor.listenSSL(0, Site(root), tls_context_factory(sys.argv[1], sys.argv[2]),
                             interface="127.0.0.1")
    assert "OpenSSL" in sys.modules

    def fetch():
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        url = f"https://127.0.0.1:{port.getHost().port}/hello"
        with urllib.request.urlopen(url, context=context, timeout=10) as r:
            return r.read()

    result = []

    def done(body):
        result.append(body)
        reactor.stop()

    def failed(failure):
        result.append(failure)
        reactor.stop()

    reactor.callWhenRunning(
        lambda: threads.deferToThread(fetch).addCallbacks(done, failed))
    reactor.callLater(20, reactor.stop)
    reactor.run()
    assert result == [b"over TLS"], result
    print("ok")
    """
)


def test_listen_ssl_after_a_reactor_installed_without_tls(tmp_path):
    cert, key = generate_tls_certificate(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", _LATE_LISTEN_SSL, str(cert), str(key)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "ok"
