"""The keyring against a fake federation client: checking key documents,
validity, caching, notaries, persistence, and verifying PDUs per room version."""

import tempfile
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from crypto.keys import generate_signing_key
from crypto.signing import SignatureError, sign_json
from homeserver.core.builder import build_event
from homeserver.core.room_versions import KNOWN_ROOM_VERSIONS
from homeserver.services.federation_client import RequestFailedError
from homeserver.services.keyring import MAX_KEY_VALIDITY_MS, Keyring
from homeserver.services.server_keys import ServerKeys
from storage import Database, DatabaseConfig
from storage.server_keys import ServerKeyStore, StoredServerKey
from tests.federation.helpers import FakeClock

US = "us.test"
REMOTE = "remote.test"
NOTARY = "notary.test"
HOUR = 3600 * 1000
OUR_KEY = generate_signing_key("ours")


def key_doc(server, keys, valid_until, old=None, signers=None, name=None):
    doc = {
        "server_name": name or server,
        "valid_until_ts": valid_until,
        "verify_keys": {k.key_id: {"key": k.public_key_base64} for k in keys},
        "old_verify_keys": {
            k.key_id: {"key": k.public_key_base64, "expired_ts": ts} for k, ts in (old or [])
        },
    }
    for k in keys if signers is None else signers:
        doc = sign_json(doc, server, k)
    return doc


class FakeClient:
    def __init__(self):
        self.answers = {}
        self.calls = []

    def answer(self, method, destination, path):
        self.calls.append((method, destination, path))
        value = self.answers.get((method, destination, path))
        if value is None:
            raise RequestFailedError(destination, "unreachable")
        if isinstance(value, Exception):
            raise value
        return value

    async def get_json(self, destination, path, query=None, **kwargs):
        return self.answer("GET", destination, path)

    async def post_json(self, destination, path, content, query=None, **kwargs):
        self.posted = content
        value = self.answer("POST", destination, path)
        return value(content) if callable(value) else value

    def serve_keys(self, server, doc):
        self.answers[("GET", server, "/_matrix/key/v2/server")] = doc

    def fetches(self, server):
        return [c for c in self.calls if c[1] == server]


class KeyringTests(SynchronousTestCase):
    def setUp(self):
        self.clock = FakeClock()
        self.client = FakeClient()
        self.key = generate_signing_key("r1")
        self.key2 = generate_signing_key("r2")
        self.old = generate_signing_key("r0")
        self.notary_key = generate_signing_key("n1")
        self.keyring = self.make()

    def make(self, notaries=(), store=None):
        own = ServerKeys(US, [OUR_KEY], {}, 24 * HOUR, self.clock)
        return Keyring(US, self.clock.time_msec, own, self.client, store, notaries)

    def get(self, server, key_id, minimum=0, keyring=None):
        return self.successResultOf(
            defer.ensureDeferred((keyring or self.keyring).get_verify_key(server, key_id, minimum))
        )

    def later(self, ms):
        self.clock.now += ms

    def test_direct_fetch_checks_and_caches(self):
        now = self.clock.now
        self.client.serve_keys(REMOTE, key_doc(REMOTE, [self.key, self.key2], now + HOUR))
        self.assertEqual(bytes(self.get(REMOTE, self.key.key_id, now)), bytes(self.key.verify_key))
        self.assertEqual(bytes(self.get(REMOTE, self.key2.key_id)), bytes(self.key2.verify_key))
        self.assertEqual(len(self.client.fetches(REMOTE)), 1)
        self.assertIsNone(self.get(REMOTE, "ed25519:nope"))  # not refetched within a minute
        self.assertEqual(len(self.client.fetches(REMOTE)), 1)
        self.later(61 * 1000)
        self.assertIsNone(self.get(REMOTE, "ed25519:nope"))  # fetched again: still unknown
        self.assertEqual(len(self.client.fetches(REMOTE)), 2)
        self.assertIsNone(self.get(REMOTE, "ed25519:nope"))  # ... but not within a minute
        self.assertEqual(len(self.client.fetches(REMOTE)), 2)
        self.assertIsNone(self.get(REMOTE, "curve25519:x"))  # only ed25519 keys count

    def test_bad_documents_are_refused(self):
        now = self.clock.now
        bad = {
            "a.test": key_doc("a.test", [self.key], now + HOUR, name="other.test"),
            "b.test": key_doc("b.test", [self.key, self.key2], now + HOUR, signers=[self.key]),
            "c.test": key_doc("c.test", [self.key], now + HOUR, signers=[self.key2]),
            "d.test": {**key_doc("d.test", [self.key], now + HOUR), "valid_until_ts": now + 2},
            "e.test": key_doc("e.test", [], now + HOUR),
            "f.test": [1, 2],
            "g.test": {**key_doc("g.test", [self.key], now + HOUR), "valid_until_ts": "soon"},
        }
        for server, doc in bad.items():
            self.client.serve_keys(server, doc)
            self.assertIsNone(self.get(server, self.key.key_id), server)

    def test_validity_is_enforced_and_capped_at_seven_days(self):
        now = self.clock.now
        self.client.serve_keys(REMOTE, key_doc(REMOTE, [self.key], now + 30 * 24 * HOUR))
        self.assertIsNotNone(self.get(REMOTE, self.key.key_id, now + MAX_KEY_VALIDITY_MS))
        self.assertIsNone(self.get(REMOTE, self.key.key_id, now + MAX_KEY_VALIDITY_MS + 1))
        self.assertIsNotNone(self.get(REMOTE, self.key.key_id, 0))

    def test_expired_key_is_refetched(self):
        now = self.clock.now
        self.client.serve_keys(REMOTE, key_doc(REMOTE, [self.key], now + HOUR))
        self.assertIsNotNone(self.get(REMOTE, self.key.key_id, now))
        self.later(2 * HOUR)
        self.client.serve_keys(REMOTE, key_doc(REMOTE, [self.key], self.clock.now + HOUR))
        self.assertIsNotNone(self.get(REMOTE, self.key.key_id, self.clock.now))
        self.assertEqual(len(self.client.fetches(REMOTE)), 2)
        # The server goes away: a key valid long enough is still found, a
        # later time is not.
        self.later(2 * HOUR)
        del self.client.answers[("GET", REMOTE, "/_matrix/key/v2/server")]
        self.assertIsNone(self.get(REMOTE, self.key.key_id, self.clock.now))
        self.assertIsNotNone(self.get(REMOTE, self.key.key_id, self.clock.now - 2 * HOUR))

    def test_old_keys_valid_until_expired_ts(self):
        now = self.clock.now
        expired = now - 10 * HOUR
        self.client.serve_keys(
            REMOTE, key_doc(REMOTE, [self.key], now + HOUR, old=[(self.old, expired)])
        )
        self.assertIsNotNone(self.get(REMOTE, self.old.key_id, expired - 1))
        self.assertIsNotNone(self.get(REMOTE, self.old.key_id, 0))
        self.later(61 * 1000)
        self.assertIsNone(self.get(REMOTE, self.old.key_id, expired + 1))

    def test_notary_with_configured_keys(self):
        now = self.clock.now
        notaries = [
            {
                "server_name": NOTARY,
                "verify_keys": {self.notary_key.key_id: self.notary_key.public_key_base64},
            }
        ]
        keyring = self.make(notaries)
        good = sign_json(key_doc(REMOTE, [self.key], now + HOUR), NOTARY, self.notary_key)
        self.client.answers[("POST", NOTARY, "/_matrix/key/v2/query")] = {"server_keys": [good]}
        self.assertIsNotNone(self.get(REMOTE, self.key.key_id, now, keyring))
        self.assertEqual(
            self.client.posted,
            {"server_keys": {REMOTE: {self.key.key_id: {"minimum_valid_until_ts": now}}}},
        )
        # Direct first (it failed), then the notary; its own keys were not fetched.
        self.assertEqual([c[1] for c in self.client.calls], [REMOTE, NOTARY])

    def test_notary_answers_are_checked(self):
        now = self.clock.now
        impostor = generate_signing_key("n1")
        notaries = [
            {
                "server_name": NOTARY,
                "verify_keys": {self.notary_key.key_id: self.notary_key.public_key_base64},
            }
        ]
        cases = {
            "wrong notary key": sign_json(
                key_doc("a.test", [self.key], now + HOUR), NOTARY, impostor
            ),
            "not notarised": key_doc("b.test", [self.key], now + HOUR),
            "not self-signed": sign_json(
                key_doc("c.test", [self.key], now + HOUR, signers=[]), NOTARY, self.notary_key
            ),
        }
        for why, doc in cases.items():
            keyring = self.make(notaries)
            self.client.answers[("POST", NOTARY, "/_matrix/key/v2/query")] = {"server_keys": [doc]}
            self.assertIsNone(self.get(doc["server_name"], self.key.key_id, now, keyring), why)

    def test_notary_without_configured_keys_uses_its_fetched_keys(self):
        now = self.clock.now
        keyring = self.make([{"server_name": NOTARY}])
        self.client.serve_keys(NOTARY, key_doc(NOTARY, [self.notary_key], now + HOUR))
        doc = sign_json(key_doc(REMOTE, [self.key], now + HOUR), NOTARY, self.notary_key)
        self.client.answers[("POST", NOTARY, "/_matrix/key/v2/query")] = {"server_keys": [doc]}
        self.assertIsNotNone(self.get(REMOTE, self.key.key_id, 0, keyring))
        self.assertIn(("GET", NOTARY, "/_matrix/key/v2/server"), self.client.calls)

    def test_our_own_keys(self):
        self.assertEqual(
            bytes(self.get(US, OUR_KEY.key_id, self.clock.now + 10**12)), bytes(OUR_KEY.verify_key)
        )
        self.assertIsNone(self.get(US, "ed25519:other"))
        self.assertEqual(self.client.calls, [])

    def test_verify_json_signed_by(self):
        now = self.clock.now
        self.client.serve_keys(REMOTE, key_doc(REMOTE, [self.key], now + HOUR))
        obj = sign_json({"hello": "world"}, REMOTE, self.key)
        self.successResultOf(
            defer.ensureDeferred(self.keyring.verify_json_signed_by(obj, REMOTE, now))
        )
        for bad in [
            {**obj, "hello": "there"},
            {"hello": "world"},
            sign_json({"hello": "world"}, REMOTE, generate_signing_key("zz")),
        ]:
            self.failureResultOf(
                defer.ensureDeferred(self.keyring.verify_json_signed_by(bad, REMOTE)),
                SignatureError,
            )

    def pdu(self, version, ts):
        rv = KNOWN_ROOM_VERSIONS[version]
        return build_event(
            rv,
            server_name=REMOTE,
            signing_key=self.key,
            event_type="m.room.message",
            sender=f"@u:{REMOTE}",
            content={"body": "hi"},
            room_id=f"!r:{REMOTE}",
            prev_events=[],
            auth_events=[],
            depth=1,
            origin_server_ts=ts,
        )

    def test_verify_pdu_enforces_key_validity_from_room_5(self):
        now = self.clock.now
        valid_until = now + HOUR
        self.client.serve_keys(REMOTE, key_doc(REMOTE, [self.key], valid_until))
        for version in ("4", "5", "10"):
            self.successResultOf(
                defer.ensureDeferred(self.keyring.verify_pdu(self.pdu(version, valid_until - 1)))
            )
        late = valid_until + 1
        self.successResultOf(defer.ensureDeferred(self.keyring.verify_pdu(self.pdu("4", late))))
        for version in ("5", "10"):
            self.failureResultOf(
                defer.ensureDeferred(self.keyring.verify_pdu(self.pdu(version, late))),
                SignatureError,
            )
        # Tampering is caught; the receipt check returns the redacted copy on a bad hash.
        pdu = self.pdu("10", now)
        data = {**pdu.data, "content": {"body": "changed"}}
        received, hash_ok = self.successResultOf(
            defer.ensureDeferred(self.keyring.verify_received_pdu(data, KNOWN_ROOM_VERSIONS["10"]))
        )
        self.assertFalse(hash_ok)
        self.assertEqual(received.data["content"], {})
        bad_sig = {**pdu.data, "signatures": sign_json({"x": 1}, REMOTE, self.key)["signatures"]}
        self.failureResultOf(
            defer.ensureDeferred(
                self.keyring.verify_received_pdu(bad_sig, KNOWN_ROOM_VERSIONS["10"])
            ),
            SignatureError,
        )

    def test_notary_documents(self):
        now = self.clock.now
        self.client.serve_keys(REMOTE, key_doc(REMOTE, [self.key], now + HOUR))
        docs = self.successResultOf(
            defer.ensureDeferred(self.keyring.key_documents_for_notary(REMOTE, {}, now))
        )
        self.assertEqual([d["server_name"] for d in docs], [REMOTE])
        self.assertEqual(list(docs[0]["signatures"]), [REMOTE])
        # Cached and fresh: no new fetch; asking beyond its validity refetches
        # (throttled), and the server being down still gets the cached document.
        self.later(61 * 1000)
        del self.client.answers[("GET", REMOTE, "/_matrix/key/v2/server")]
        docs = self.successResultOf(
            defer.ensureDeferred(
                self.keyring.key_documents_for_notary(
                    REMOTE, {self.key.key_id: now + 2 * HOUR}, now
                )
            )
        )
        self.assertEqual(len(docs), 1)
        self.assertEqual(len(self.client.fetches(REMOTE)), 2)
        own = self.successResultOf(
            defer.ensureDeferred(self.keyring.key_documents_for_notary(US, {}, now))
        )
        self.assertEqual(
            own[0]["verify_keys"], {OUR_KEY.key_id: {"key": OUR_KEY.public_key_base64}}
        )


class PersistenceTests(TestCase):
    timeout = 30

    def setUp(self):
        path = Path(tempfile.mkdtemp()) / "keys.db"
        self.db = Database(reactor, DatabaseConfig("sqlite3", {"database": str(path)}))
        self.db.open()

    def tearDown(self):
        return defer.ensureDeferred(self.db.close())

    def test_keys_survive_a_restart_and_are_never_shortened(self):
        async def go():
            clock = FakeClock()
            client = FakeClient()
            key, old = generate_signing_key("k1"), generate_signing_key("k0")
            own = ServerKeys(US, [OUR_KEY], {}, 24 * HOUR, clock)
            store = ServerKeyStore(self.db)
            first = Keyring(US, clock.time_msec, own, client, store)
            client.serve_keys(
                REMOTE, key_doc(REMOTE, [key], clock.now + 5 * HOUR, old=[(old, 1000)])
            )
            self.assertIsNotNone(await first.get_verify_key(REMOTE, key.key_id, clock.now))
            client.answers.clear()
            second = Keyring(US, clock.time_msec, own, client, store)
            self.assertEqual(
                bytes(await second.get_verify_key(REMOTE, key.key_id, clock.now)),
                bytes(key.verify_key),
            )
            self.assertIsNotNone(await second.get_verify_key(REMOTE, old.key_id, 999))
            self.assertEqual(len(client.calls), 1)  # second keyring: nothing fetched
            self.assertIsNone(await second.get_verify_key(REMOTE, old.key_id, 1001))
            rows = {r.key_id: r for r in await store.get_server_keys(REMOTE)}
            self.assertEqual(rows[old.key_id].expired_ts, 1000)
            self.assertEqual(rows[key.key_id].fetched_from, REMOTE)
            # The store never shortens a key's validity.
            shorter = StoredServerKey(
                REMOTE, key.key_id, rows[key.key_id].verify_key, 5, None, NOTARY, "{}"
            )
            await store.store_server_keys([shorter])
            rows = {r.key_id: r for r in await store.get_server_keys(REMOTE)}
            self.assertEqual(rows[key.key_id].fetched_from, REMOTE)

        return defer.ensureDeferred(go())
