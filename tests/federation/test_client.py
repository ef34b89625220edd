"""The outbound federation client: address policy (on a fake reactor: nothing is
ever contacted), then signing, TLS, errors, timeouts and back-off against an
in-process TLS server on 127.0.0.1."""

import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, ssl
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from crypto.keys import generate_signing_key
from crypto.xmatrix import parse_authorization, verify_request
from federation.auth import authenticated
from homeserver.config.loader import DEFAULT_IP_RANGE_BLOCKLIST
from homeserver.errors import MatrixError
from homeserver.http.server import parse_json_body
from homeserver.services.discovery import WellKnownResponse
from homeserver.services.federation_client import (
    Backoff,
    DestinationBlockedError,
    FederationClient,
    HttpResponseError,
    IpRangeFilter,
    NotRetryingDestination,
    RequestFailedError,
    TlsPolicy,
    build_path,
    encode_query,
)
from tests.federation.helpers import FakeDns, FakeHomeServer, FakeKeyring, LoopbackServer

ORIGIN = "origin.test"
KEY = generate_signing_key("cli")


class AddressPolicyTests(SynchronousTestCase):
    """Forbidden addresses are refused before any connection attempt."""

    def make(self, hosts=None, **config):
        self.reactor = MemoryReactorClock()
        self.dns = FakeDns(hosts)
        self.well_known_fetches = []

        async def no_well_known(hostname):
            self.well_known_fetches.append(hostname)
            return WellKnownResponse(404, b"")

        client = FederationClient(
            self.reactor,
            ORIGIN,
            KEY,
            ip_filter=IpRangeFilter.from_config(config),
            resolver=self.dns,
            now_ms=lambda: 0,
        )
        client.discovery._fetch_well_known = no_well_known
        return client

    def attempt(self, client, destination):
        d = defer.ensureDeferred(client.get_json(destination, "/_matrix/federation/v1/version"))
        return d

    def assertRefusedWithoutConnecting(self, client, destination):
        failure = self.failureResultOf(self.attempt(client, destination), DestinationBlockedError)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.reactor.sslClients, [])
        self.assertIsNone(client.backoff.state(destination))  # not a remote failure
        return failure

    def test_default_config_refuses_private_and_loopback_literals(self):
        client = self.make()
        for destination in [
            "10.0.0.1",
            "10.0.0.1:8448",
            "127.0.0.1:8448",
            "192.168.1.1:443",
            "[::1]:8448",
            "[::ffff:10.0.0.1]:8448",
            "[::ffff:127.0.0.1]",
            "[fe80::1]",
            "0.0.0.0:8448",
            "169.254.169.254",
        ]:
            self.assertRefusedWithoutConnecting(client, destination)
        self.assertEqual(self.dns.queries, [])

    def test_default_config_refuses_names_resolving_to_forbidden_addresses(self):
        client = self.make(
            {"evil.example": ["10.0.0.1", "127.0.0.1"], "sneaky.example": ["::ffff:127.0.0.1"]}
        )
        self.assertRefusedWithoutConnecting(client, "evil.example:8448")
        self.assertRefusedWithoutConnecting(client, "sneaky.example:8448")
        # Without a port, discovery runs (the .well-known fetch is refused the
        # same way in reality) and ends at evil.example:8448: refused again.
        self.assertRefusedWithoutConnecting(client, "evil.example")
        self.assertIn("_matrix-fed._tcp.evil.example", self.dns.queries)

    def test_every_address_is_checked_and_only_allowed_ones_are_used(self):
        client = self.make({"mixed.example": ["10.0.0.1", "1.2.3.4", "127.0.0.1"]})
        d = self.attempt(client, "mixed.example:8448")
        self.assertNoResult(d)
        self.assertEqual([(h, p) for h, p, *_ in self.reactor.tcpClients], [("1.2.3.4", 8448)])
        d.cancel()
        self.failureResultOf(d)

    def test_whitelist_makes_an_exception(self):
        client = self.make(ip_range_whitelist=["10.0.0.0/8"])
        d = self.attempt(client, "10.0.0.1:8448")
        self.assertNoResult(d)
        [(host, port, factory, *_)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("10.0.0.1", 8448))
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.failureResultOf(d, RequestFailedError)
        self.assertEqual(client.backoff.state("10.0.0.1:8448").failures, 1)

    def test_configured_blocklist_replaces_the_default(self):
        client = self.make(federation_ip_range_blacklist=["1.2.3.0/24"])
        self.assertRefusedWithoutConnecting(client, "1.2.3.4:8448")
        d = self.attempt(client, "10.0.0.1:8448")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        d.cancel()
        self.failureResultOf(d)

    def test_invalid_destination_is_refused(self):
        client = self.make()
        self.assertRefusedWithoutConnecting(client, "not a server name")

    def test_ip_range_filter(self):
        f = IpRangeFilter(DEFAULT_IP_RANGE_BLOCKLIST, ["192.168.5.0/24"])
        for ip in [
            "10.1.2.3",
            "127.0.0.1",
            "::1",
            "::ffff:10.0.0.1",
            "2002:a00:1::",
            "::10.0.0.1",
            "0.0.0.0",
            "::",
            "fd00::1",
            "not-an-ip",
        ]:
            self.assertTrue(f.is_blocked(ip), ip)
        for ip in ["1.2.3.4", "2606:4700::1111", "192.168.5.9", "::ffff:192.168.5.9"]:
            self.assertFalse(f.is_blocked(ip), ip)


class BackoffTests(SynchronousTestCase):
    def test_exponential_and_reset(self):
        now = [0]
        recovered = []
        b = Backoff(lambda: now[0], min_interval_ms=100, multiplier=2, max_interval_ms=500)
        b.on_recovered.append(recovered.append)
        self.assertIsNone(b.retry_at_ms("x"))
        intervals = [b.record_failure("x").retry_interval_ms for _ in range(5)]
        self.assertEqual(intervals, [100, 200, 400, 500, 500])
        self.assertEqual(b.retry_at_ms("x"), 500)
        now[0] = 501
        self.assertIsNone(b.retry_at_ms("x"))
        b.record_success("x")
        self.assertEqual(recovered, ["x"])
        self.assertIsNone(b.state("x"))
        b.record_success("x")
        self.assertEqual(recovered, ["x"])

    def test_query_and_path_encoding(self):
        self.assertEqual(
            encode_query({"user_id": "@a:b.c", "field": "displayname"}),
            "user_id=%40a%3Ab.c&field=displayname",
        )
        self.assertEqual(encode_query({"v": ["1", "2"], "b": True, "n": 5}), "v=1&v=2&b=true&n=5")
        self.assertEqual(build_path("/x/{}/{}", "!r:s", "a/b c"), "/x/%21r%3As/a%2Fb%20c")


class LoopbackTests(TestCase):
    """Against a real TLS server on 127.0.0.1 (allowed by ip_range_whitelist)."""

    timeout = 30

    def setUp(self):
        self.dir = Path(tempfile.mkdtemp())
        self.server = LoopbackServer(self.dir)
        self.seen = []
        self.now = [1_000_000]
        self.client = self.make_client()

        async def echo(request, **params):
            request.content.seek(0)
            self.seen.append(
                {
                    "method": request.method.decode(),
                    "uri": request.uri.decode(),
                    "host": request.getHeader("host"),
                    "auth": request.getHeader("authorization"),
                    "content_type": request.getHeader("content-type"),
                    "body": request.content.read(),
                }
            )
            return 200, {"ok": True, "params": params}

        async def error(request, status):
            status = int(status)
            raise MatrixError("M_NOT_FOUND" if status == 404 else "M_UNKNOWN", "nope", status)

        async def not_json(request):
            request.setHeader(b"Content-Type", b"text/plain")
            request.write(b"hello")
            request.finish()

        self.hang = defer.Deferred()

        async def hang(request):
            await self.hang
            return 200, {}

        router = self.server.router
        router.register(["GET", "PUT", "POST"], r"/echo/(?P<thing>[^/]+)", echo)
        router.register("GET", r"/error/(?P<status>\d+)", error)
        router.register("GET", "/not-json", not_json)
        router.register("GET", "/hang", hang)

    def make_client(self, tls=None, **kw):
        return FederationClient(
            reactor,
            ORIGIN,
            KEY,
            ip_filter=IpRangeFilter(DEFAULT_IP_RANGE_BLOCKLIST, ["127.0.0.0/8"]),
            tls=tls or TlsPolicy(verify=False),
            resolver=FakeDns(),
            backoff=Backoff(lambda: self.now[0], min_interval_ms=1000),
            now_ms=lambda: self.now[0],
            **kw,
        )

    async def _teardown(self):
        if not self.hang.called:
            self.hang.callback(None)
        await self.client.close()
        await self.server.stop()

    def tearDown(self):
        return defer.ensureDeferred(self._teardown())

    def run_async(self, coro):
        return defer.ensureDeferred(coro)

    def test_get_is_signed_over_the_exact_target(self):
        async def go():
            body = await self.client.get_json(
                self.server.name,
                build_path("/echo/{}", "a b:c"),
                {"user_id": "@x:y", "x": "[1]"},
            )
            self.assertEqual(body, {"ok": True, "params": {"thing": "a b:c"}})
            [seen] = self.seen
            self.assertEqual(seen["uri"], "/echo/a%20b%3Ac?user_id=%40x%3Ay&x=%5B1%5D")
            self.assertEqual(seen["host"], self.server.name)
            self.assertIsNone(seen["content_type"])
            auth = parse_authorization(seen["auth"])
            self.assertEqual(
                (auth.origin, auth.destination, auth.key_id), (ORIGIN, self.server.name, KEY.key_id)
            )
            self.assertTrue(seen["auth"].startswith('X-Matrix origin="origin.test",destination='))
            verify_request(
                auth,
                KEY.verify_key,
                method="GET",
                uri=seen["uri"],
                our_server_name=self.server.name,
            )

        return self.run_async(go())

    def test_put_and_post_sign_the_json_body(self):
        async def go():
            content = {"b": [1, "é"], "a": {"nested": True}}
            await self.client.put_json(self.server.name, "/echo/p", content)
            await self.client.post_json(self.server.name, "/echo/q", {})
            put, post = self.seen
            self.assertEqual(put["body"], '{"a":{"nested":true},"b":[1,"é"]}'.encode())
            self.assertEqual(put["content_type"], "application/json")
            for seen, sent in ((put, content), (post, {})):
                verify_request(
                    parse_authorization(seen["auth"]),
                    KEY.verify_key,
                    method=seen["method"],
                    uri=seen["uri"],
                    our_server_name=self.server.name,
                    content=sent,
                )

        return self.run_async(go())

    def test_our_signatures_pass_our_inbound_check(self):
        async def go():
            hs = FakeHomeServer(
                self.server.name, FakeKeyring({ORIGIN: {KEY.key_id: KEY.verify_key}})
            )

            async def whoami(request, origin):
                return 200, {"origin": origin, "body": parse_json_body(request)}

            self.server.router.register(["GET", "PUT"], "/whoami", authenticated(hs, whoami))
            got = await self.client.put_json(self.server.name, "/whoami", {"x": 1}, {"q": "@a:b"})
            self.assertEqual(got, {"origin": ORIGIN, "body": {"x": 1}})
            got = await self.client.get_json(self.server.name, "/whoami")
            self.assertEqual(got["origin"], ORIGIN)

        return self.run_async(go())

    def test_error_answers_carry_status_and_errcode(self):
        async def go():
            with self.assertRaises(HttpResponseError) as cm:
                await self.client.get_json(self.server.name, "/error/404")
            e = cm.exception
            self.assertEqual(
                (e.status, e.errcode, e.destination), (404, "M_NOT_FOUND", self.server.name)
            )
            self.assertEqual(e.body, {"errcode": "M_NOT_FOUND", "error": "nope"})
            self.assertEqual(e.to_matrix_error().errcode, "M_NOT_FOUND")
            self.assertIsNone(self.client.backoff.state(self.server.name))
            with self.assertRaises(RequestFailedError) as cm:
                await self.client.get_json(self.server.name, "/not-json")
            self.assertEqual(cm.exception.status, 200)

        return self.run_async(go())

    def test_5xx_starts_backoff_and_success_ends_it(self):
        async def go():
            with self.assertRaises(HttpResponseError) as cm:
                await self.client.get_json(self.server.name, "/error/502")
            self.assertEqual(cm.exception.status, 502)
            self.assertEqual(cm.exception.to_matrix_error().status, 502)
            with self.assertRaises(NotRetryingDestination) as cm:
                await self.client.get_json(self.server.name, "/echo/x")
            self.assertEqual(cm.exception.retry_at_ms, self.now[0] + 1000)
            self.assertEqual(self.seen, [])
            # ignore_backoff goes through, and success clears the state.
            await self.client.get_json(self.server.name, "/echo/x", ignore_backoff=True)
            self.assertIsNone(self.client.backoff.state(self.server.name))
            await self.client.get_json(self.server.name, "/echo/y")

        return self.run_async(go())

    def test_timeout_and_refused_connection(self):
        async def go():
            with self.assertRaises(RequestFailedError) as cm:
                await self.client.get_json(self.server.name, "/hang", timeout=0.3)
            self.assertIn("timed out", str(cm.exception))
            self.assertEqual(self.client.backoff.state(self.server.name).failures, 1)
            closed = LoopbackServer(self.dir / "closed", tls=False)
            await closed.stop()
            with self.assertRaises(RequestFailedError):
                await self.client.get_json(closed.name, "/echo/x")
            self.assertEqual(self.client.backoff.state(closed.name).failures, 1)

        return self.run_async(go())

    def test_certificates_are_verified_unless_disabled(self):
        async def go():
            strict = self.make_client(tls=TlsPolicy(verify=True))
            try:
                with self.assertRaises(RequestFailedError):
                    await strict.get_json(self.server.name, "/echo/x")
            finally:
                await strict.close()
            cert = ssl.Certificate.loadPEM(self.server.cert_path.read_bytes())
            trusting = self.make_client(tls=TlsPolicy(verify=True, trust_root=cert))
            try:
                self.assertTrue((await trusting.get_json(self.server.name, "/echo/x"))["ok"])
            finally:
                await trusting.close()

        return self.run_async(go())
