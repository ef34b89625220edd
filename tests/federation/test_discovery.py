"""Server discovery (spec "Resolving server names") against fake DNS and HTTP."""

import json
import random

from twisted.internet import defer
from twisted.internet.error import DNSLookupError
from twisted.trial.unittest import SynchronousTestCase

from homeserver.services.discovery import (
    WELL_KNOWN_FAILURE_TTL_MS,
    InvalidServerName,
    ServerDiscovery,
    SrvTarget,
    WellKnownResponse,
    cache_ttl_ms,
    order_srv,
    split_server_name,
)

HOUR = 3600 * 1000


class FakeDns:
    def __init__(self, srv=None, hosts=None):
        self.srv_records = srv or {}
        self.hosts = hosts or {}
        self.srv_queries = []
        self.host_queries = []

    async def srv(self, name):
        self.srv_queries.append(name)
        return list(self.srv_records.get(name, []))

    async def addresses(self, host):
        self.host_queries.append(host)
        if host in self.hosts:
            return list(self.hosts[host])
        raise DNSLookupError(host)


class FakeWellKnown:
    def __init__(self, answers=None):
        self.answers = answers or {}
        self.fetches = []

    async def __call__(self, hostname):
        self.fetches.append(hostname)
        answer = self.answers.get(hostname, WellKnownResponse(404, b"{}"))
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, defer.Deferred):
            return await answer
        return answer


def ok(m_server, cache_control=None, expires=None):
    body = json.dumps({"m.server": m_server}).encode()
    return WellKnownResponse(200, body, cache_control, expires)


class DiscoveryTests(SynchronousTestCase):
    def setUp(self):
        self.now = 1_700_000_000_000
        self.dns = FakeDns()
        self.well_known = FakeWellKnown()
        self.discovery = ServerDiscovery(self.dns, self.well_known, lambda: self.now)

    def resolve(self, name):
        return self.successResultOf(defer.ensureDeferred(self.discovery.resolve(name)))

    def check(self, name, host_header, tls_name, targets):
        address = self.resolve(name)
        self.assertEqual(address.server_name, name)
        self.assertEqual(address.host_header, host_header)
        self.assertEqual(address.tls_name, tls_name)
        self.assertEqual(list(address.targets), targets)
        return address

    # --- step 1: IP literals ---------------------------------------------------------
    def test_ipv4_literal_without_port_uses_8448_and_no_lookups(self):
        address = self.check("1.2.3.4", "1.2.3.4", "1.2.3.4", [("1.2.3.4", 8448)])
        self.assertFalse(address.send_sni)
        self.assertEqual((self.well_known.fetches, self.dns.srv_queries), ([], []))

    def test_ipv4_literal_with_port(self):
        self.check("1.2.3.4:1234", "1.2.3.4:1234", "1.2.3.4", [("1.2.3.4", 1234)])
        self.assertEqual((self.well_known.fetches, self.dns.srv_queries), ([], []))

    def test_ipv6_literals(self):
        self.check(
            "[2001:db8::1]:8449", "[2001:db8::1]:8449", "2001:db8::1", [("2001:db8::1", 8449)]
        )
        address = self.check("[::1]", "[::1]", "::1", [("::1", 8448)])
        self.assertFalse(address.send_sni)
        self.assertEqual(self.well_known.fetches, [])

    # --- step 2: explicit port -----------------------------------------------------------
    def test_hostname_with_port_skips_well_known_and_srv(self):
        address = self.check(
            "example.org:1234", "example.org:1234", "example.org", [("example.org", 1234)]
        )
        self.assertTrue(address.send_sni)
        self.assertEqual((self.well_known.fetches, self.dns.srv_queries), ([], []))

    # --- step 3: .well-known delegation -----------------------------------------------------
    def test_delegation_to_ip_literal(self):
        self.well_known.answers["example.org"] = ok("1.2.3.4:5678")
        self.check("example.org", "1.2.3.4:5678", "1.2.3.4", [("1.2.3.4", 5678)])
        self.well_known.answers["example.com"] = ok("[2001:db8::2]")
        self.check("example.com", "[2001:db8::2]", "2001:db8::2", [("2001:db8::2", 8448)])
        self.assertEqual(self.dns.srv_queries, [])

    def test_delegation_with_port(self):
        self.well_known.answers["example.org"] = ok("delegated.example:9000")
        self.check(
            "example.org",
            "delegated.example:9000",
            "delegated.example",
            [("delegated.example", 9000)],
        )
        self.assertEqual(self.dns.srv_queries, [])

    def test_delegation_without_port_uses_matrix_fed_srv(self):
        self.well_known.answers["example.org"] = ok("delegated.example")
        self.dns.srv_records["_matrix-fed._tcp.delegated.example"] = [("srv.example", 7000)]
        self.dns.srv_records["_matrix._tcp.delegated.example"] = [("old.example", 7001)]
        self.check("example.org", "delegated.example", "delegated.example", [("srv.example", 7000)])
        self.assertEqual(self.dns.srv_queries, ["_matrix-fed._tcp.delegated.example"])

    def test_delegation_falls_back_to_deprecated_srv(self):
        self.well_known.answers["example.org"] = ok("delegated.example")
        self.dns.srv_records["_matrix._tcp.delegated.example"] = [("old.example", 7001)]
        self.check("example.org", "delegated.example", "delegated.example", [("old.example", 7001)])
        self.assertEqual(
            self.dns.srv_queries,
            ["_matrix-fed._tcp.delegated.example", "_matrix._tcp.delegated.example"],
        )

    def test_delegation_without_srv_uses_8448(self):
        self.well_known.answers["example.org"] = ok("delegated.example")
        self.check(
            "example.org", "delegated.example", "delegated.example", [("delegated.example", 8448)]
        )

    # --- steps 4-6: no usable .well-known -------------------------------------------------
    def test_no_well_known_uses_srv_of_the_hostname_and_keeps_its_host(self):
        self.dns.srv_records["_matrix-fed._tcp.example.org"] = [("a.example", 1), ("b.example", 2)]
        self.check(
            "example.org", "example.org", "example.org", [("a.example", 1), ("b.example", 2)]
        )
        self.assertEqual(self.well_known.fetches, ["example.org"])

    def test_no_well_known_deprecated_srv(self):
        self.dns.srv_records["_matrix._tcp.example.org"] = [("old.example", 8000)]
        self.check("example.org", "example.org", "example.org", [("old.example", 8000)])

    def test_no_well_known_no_srv_uses_8448(self):
        self.check("example.org", "example.org", "example.org", [("example.org", 8448)])

    def test_failing_srv_lookup_counts_as_no_record(self):
        async def broken(name):
            raise OSError("DNS down")

        self.dns.srv = broken
        self.check("example.org", "example.org", "example.org", [("example.org", 8448)])

    def test_invalid_well_known_answers_fall_through(self):
        bad = [
            WellKnownResponse(200, b"not json"),
            WellKnownResponse(200, b"[]"),
            WellKnownResponse(200, b'{"m.server": 1234}'),
            WellKnownResponse(200, b'{"other": "x"}'),
            WellKnownResponse(200, b'{"m.server": "bad name!"}'),
            WellKnownResponse(200, b'{"m.server": "host:99999"}'),
            WellKnownResponse(404, b'{"m.server": "delegated.example"}'),
            WellKnownResponse(500, b""),
            OSError("connection refused"),
        ]
        for i, answer in enumerate(bad):
            name = f"host{i}.example"
            self.well_known.answers[name] = answer
            self.check(name, name, name, [(name, 8448)])

    # --- caching ---------------------------------------------------------------------------
    def test_well_known_cached_for_max_age(self):
        self.well_known.answers["example.org"] = ok("d.example:1", "public, max-age=3600")
        self.resolve("example.org")
        self.now += 3599 * 1000
        self.resolve("example.org")
        self.assertEqual(len(self.well_known.fetches), 1)
        self.now += 2000
        self.well_known.answers["example.org"] = ok("e.example:2")
        self.check("example.org", "e.example:2", "e.example", [("e.example", 2)])
        self.assertEqual(len(self.well_known.fetches), 2)

    def test_well_known_default_24h_and_bounds(self):
        self.well_known.answers["a.example"] = ok("d.example:1")
        self.resolve("a.example")
        self.now += 23 * HOUR
        self.resolve("a.example")
        self.assertEqual(self.well_known.fetches, ["a.example"])
        self.now += 2 * HOUR
        self.resolve("a.example")
        self.assertEqual(self.well_known.fetches, ["a.example"] * 2)
        # At most 48 h, at least 5 minutes.
        self.assertEqual(cache_ttl_ms("max-age=864000", None, 0), 48 * HOUR)
        self.assertEqual(cache_ttl_ms("max-age=0", None, 0), 5 * 60 * 1000)
        self.assertEqual(cache_ttl_ms("no-store", None, 0), 5 * 60 * 1000)
        self.assertEqual(cache_ttl_ms(None, "Thu, 01 Jan 1970 03:00:00 GMT", 0), 3 * HOUR)
        self.assertEqual(cache_ttl_ms(None, "garbage", 0), 5 * 60 * 1000)

    def test_failures_cached_for_an_hour(self):
        self.resolve("example.org")  # 404
        self.now += WELL_KNOWN_FAILURE_TTL_MS - 1000
        self.resolve("example.org")
        self.assertEqual(len(self.well_known.fetches), 1)
        self.now += 2000
        self.well_known.answers["example.org"] = ok("d.example:1")
        self.check("example.org", "d.example:1", "d.example", [("d.example", 1)])

    def test_transient_failure_keeps_a_previous_delegation(self):
        self.well_known.answers["example.org"] = ok("d.example:1", "max-age=600")
        self.resolve("example.org")
        self.now += 700 * 1000
        self.well_known.answers["example.org"] = OSError("timeout")
        self.check("example.org", "d.example:1", "d.example", [("d.example", 1)])
        # ... but a definite answer (404) ends the delegation.
        self.now += WELL_KNOWN_FAILURE_TTL_MS + 1000
        self.well_known.answers["example.org"] = WellKnownResponse(404, b"")
        self.check("example.org", "example.org", "example.org", [("example.org", 8448)])

    def test_concurrent_lookups_share_one_fetch(self):
        pending = defer.Deferred()
        self.well_known.answers["example.org"] = pending
        first = defer.ensureDeferred(self.discovery.resolve("example.org"))
        second = defer.ensureDeferred(self.discovery.resolve("example.org"))
        self.assertNoResult(first)
        pending.callback(ok("d.example:1"))
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))
        self.assertEqual(self.well_known.fetches, ["example.org"])

    # --- helpers -------------------------------------------------------------------------
    def test_split_server_name(self):
        self.assertEqual(split_server_name("example.org"), ("example.org", None))
        self.assertEqual(split_server_name("example.org:80"), ("example.org", 80))
        self.assertEqual(split_server_name("[::1]:8448"), ("::1", 8448))
        self.assertEqual(split_server_name("1.2.3.4"), ("1.2.3.4", None))
        for bad in [
            "",
            "exa mple.org",
            "host:99999",
            "host:0",
            "[nonsense]:1",
            "a/b",
            "host:",
            None,
            42,
        ]:
            with self.assertRaises(InvalidServerName, msg=repr(bad)):
                split_server_name(bad)

    def test_srv_ordering(self):
        records = [
            SrvTarget(20, 0, 3, "c.example."),
            SrvTarget(10, 0, 1, "a.example."),
            SrvTarget(10, 0, 2, "b.example."),
        ]
        ordered = order_srv(records, random.Random(1))
        self.assertEqual(ordered[-1], ("c.example", 3))
        self.assertEqual(sorted(ordered[:2]), [("a.example", 1), ("b.example", 2)])
        self.assertEqual(order_srv([SrvTarget(0, 0, 0, ".")]), [])
        # Weighted: a weight-0 record comes after weighted ones of its priority.
        weighted = [SrvTarget(1, 0, 1, "zero."), SrvTarget(1, 100, 2, "heavy.")]
        for seed in range(20):
            self.assertEqual(order_srv(weighted, random.Random(seed))[0], ("heavy", 2))
