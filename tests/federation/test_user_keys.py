"""End-to-end keys over federation, both ways.

- Serving: /user/devices, /user/keys/query and /user/keys/claim on a loopback
  TLS listener, called by our FederationClient signing as a remote server.
- Asking: our clients' /keys/query and /keys/claim for remote users, against
  a fake federation client (failures, the device-list cache and the EDUs that
  drop it), and against a second in-process server over loopback HTTP.
"""

import tempfile
from contextlib import ExitStack
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from crypto.keys import ServerSigningKey, generate_signing_key
from crypto.signing import sign_json, verify_signature
from federation import register_federation_resources
from homeserver.core.events import MEMBER
from homeserver.services.federation_client import (
    HttpResponseError,
    NotRetryingDestination,
    RequestFailedError,
    build_path,
)
from homeserver.services.remote_keys import CLAIM_PATH, QUERY_PATH
from tests.federation.helpers import FakeKeyring, LoopbackServer, loopback_client
from tests.support.homeserver import add_user, close_homeserver, make_homeserver

REMOTE = "127.0.0.1:1"
OTHER = "127.0.0.1:2"
DOWN = "127.0.0.1:3"
BOB = f"@bob:{REMOTE}"
DAVE = f"@dave:{REMOTE}"  # shares no room with alice
CAROL = f"@carol:{OTHER}"
ERIN = f"@erin:{DOWN}"
KEY = generate_signing_key("r")
ALG = "signed_curve25519"
V1 = "/_matrix/federation/v1"


def device_keys(user_id, device_id, key):
    keys = {
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {f"curve25519:{device_id}": "c" * 43, f"ed25519:{device_id}": key.public_key_base64},
    }
    return sign_json(keys, user_id, key)


def one_time_keys(user_id, key, names, fallback=False):
    keys = {}
    for name in names:
        body = {"key": name * 43, **({"fallback": True} if fallback else {})}
        keys[f"{ALG}:{name}"] = sign_json(body, user_id, key)
    return keys


def cross_signing(user_id):
    """(master key, self-signing key signed by the master key)."""
    master, self_signing = (
        ServerSigningKey(k.public_key_base64, k.signing_key)
        for k in (generate_signing_key(), generate_signing_key())
    )

    def key(signing, usage):
        public = signing.public_key_base64
        return {"user_id": user_id, "usage": [usage], "keys": {f"ed25519:{public}": public}}

    return key(master, "master"), sign_json(key(self_signing, "self_signing"), user_id, master)


def as_served(key):
    """A cross-signing key as the server gives it out (always with ``signatures``)."""
    return {"signatures": {}, **key}


class FakeFederationClient:
    """Answers per server: a dict (the body), an exception to raise, or a function."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    async def post_json(self, destination, path, content, timeout=None):
        self.calls.append((destination, path, content))
        answer = self.answers[(destination, path)]
        if isinstance(answer, Exception):
            raise answer
        return answer(content) if callable(answer) else answer

    def servers_asked(self):
        asked = [(d, p) for d, p, _ in self.calls]
        self.calls.clear()
        return asked


class UserKeysTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.stack = ExitStack()
        self.clients = []
        self.servers = []
        self.homeservers = []
        self.hs, self.server = self.make_server()
        self.hs.keyring = FakeKeyring({REMOTE: {KEY.key_id: KEY.verify_key}})

    def make_server(self):
        directory = Path(self.stack.enter_context(tempfile.TemporaryDirectory()))
        server = LoopbackServer(directory)
        hs = make_homeserver(self.stack, directory, "sqlite3", server_name=server.name)
        register_federation_resources(server.router, hs)
        self.servers.append(server)
        self.homeservers.append(hs)
        return hs, server

    def client(self, name, key):
        client = loopback_client(name, key)
        self.clients.append(client)
        return client

    async def _teardown(self):
        for client in self.clients:
            await client.close()
        for server in self.servers:
            await server.stop()
        for hs in self.homeservers:
            await close_homeserver(hs)

    def tearDown(self):
        d = defer.ensureDeferred(self._teardown())
        d.addBoth(lambda r: (self.stack.close(), r)[1])
        return d

    # --- fixtures ------------------------------------------------------------
    async def user_with_keys(self, hs, localpart, device_id="DEV1", display_name="Phone"):
        """A local user with one device: its keys, two one-time keys, a fallback key and
        cross-signing keys. Returns (user id, the device's signing key, uploads)."""
        user_id = await add_user(hs, localpart)
        await hs.accounts.store.create_device(user_id, device_id, display_name, 0)
        key = generate_signing_key(device_id)
        uploads = {
            "device_keys": device_keys(user_id, device_id, key),
            "one_time_keys": one_time_keys(user_id, key, ["AAAA", "BBBB"]),
            "fallback_keys": one_time_keys(user_id, key, ["FFFF"], fallback=True),
        }
        await hs.e2e_keys.upload_keys(user_id, device_id, uploads)
        master, self_signing = cross_signing(user_id)
        await hs.e2e_keys.upload_cross_signing_keys(
            user_id, {"master_key": master, "self_signing_key": self_signing}
        )
        uploads.update(master_key=master, self_signing_key=self_signing)
        return user_id, key, uploads

    async def room_with(self, hs, creator, *remote_users):
        room_id = await hs.room_creator.create_room(creator, {"preset": "private_chat"})
        for user_id in remote_users:
            await hs.room_sender.send(creator, room_id, MEMBER, {"membership": "invite"}, user_id)
            await hs.room_sender.send(user_id, room_id, MEMBER, {"membership": "join"}, user_id)
        return room_id

    async def http_error(self, coro):
        try:
            await coro
        except HttpResponseError as e:
            return e.status, e.errcode
        self.fail("no error")

    # --- serving ------------------------------------------------------------------
    def test_user_devices(self):
        async def go():
            alice, key, uploads = await self.user_with_keys(self.hs, "alice")
            remote = self.client(REMOTE, KEY)
            name = self.server.name
            body = await remote.get_json(name, build_path(V1 + "/user/devices/{}", alice))
            self.assertEqual(body["user_id"], alice)
            self.assertIsInstance(body["stream_id"], int)
            [device] = body["devices"]
            self.assertEqual(device["device_id"], "DEV1")
            self.assertEqual(device["device_display_name"], "Phone")
            self.assertEqual(device["keys"], uploads["device_keys"])
            verify_signature(device["keys"], alice, "ed25519:DEV1", key.verify_key)
            self.assertEqual(body["master_key"], as_served(uploads["master_key"]))
            self.assertEqual(body["self_signing_key"], as_served(uploads["self_signing_key"]))
            # Only our users.
            self.assertEqual(
                await self.http_error(
                    remote.get_json(name, build_path(V1 + "/user/devices/{}", BOB))
                ),
                (400, "M_INVALID_PARAM"),
            )
            # A user without devices: an empty list.
            nobody = await add_user(self.hs, "nobody")
            body = await remote.get_json(name, build_path(V1 + "/user/devices/{}", nobody))
            self.assertEqual(body["devices"], [])

        return defer.ensureDeferred(go())

    def test_keys_query(self):
        async def go():
            alice, key, uploads = await self.user_with_keys(self.hs, "alice")
            remote = self.client(REMOTE, KEY)
            name = self.server.name
            body = await remote.post_json(
                name, V1 + "/user/keys/query", {"device_keys": {alice: [], BOB: []}}
            )
            got = body["device_keys"][alice]["DEV1"]
            verify_signature(got, alice, "ed25519:DEV1", key.verify_key)
            self.assertEqual(got["unsigned"], {"device_display_name": "Phone"})
            self.assertEqual(set(body["device_keys"]), {alice})
            self.assertEqual(body["master_keys"], {alice: as_served(uploads["master_key"])})
            self.assertEqual(
                body["self_signing_keys"], {alice: as_served(uploads["self_signing_key"])}
            )
            self.assertNotIn("user_signing_keys", body)
            # A list of devices narrows the answer.
            body = await remote.post_json(
                name, V1 + "/user/keys/query", {"device_keys": {alice: ["NOSUCH"]}}
            )
            self.assertEqual(body["device_keys"], {alice: {}})
            self.assertEqual(
                await self.http_error(
                    remote.post_json(name, V1 + "/user/keys/query", {"device_keys": {alice: "x"}})
                ),
                (400, "M_BAD_JSON"),
            )

        return defer.ensureDeferred(go())

    def test_keys_claim(self):
        async def go():
            alice, _, uploads = await self.user_with_keys(self.hs, "alice")
            remote = self.client(REMOTE, KEY)
            path = V1 + "/user/keys/claim"
            query = {"one_time_keys": {alice: {"DEV1": ALG, "NOSUCH": ALG}, BOB: {"B": ALG}}}
            claimed = []
            for _ in range(4):
                body = await remote.post_json(self.server.name, path, query)
                self.assertEqual(set(body["one_time_keys"]), {alice})
                self.assertEqual(set(body["one_time_keys"][alice]), {"DEV1"})
                claimed.append(body["one_time_keys"][alice]["DEV1"])
            # Each one-time key once, then the fallback key.
            first_two = {k: v for c in claimed[:2] for k, v in c.items()}
            self.assertEqual(first_two, uploads["one_time_keys"])
            self.assertEqual(claimed[2], uploads["fallback_keys"])
            self.assertEqual(claimed[3], uploads["fallback_keys"])
            self.assertEqual(
                await self.http_error(
                    remote.post_json(self.server.name, path, {"one_time_keys": []})
                ),
                (400, "M_BAD_JSON"),
            )

        return defer.ensureDeferred(go())

    # --- asking other servers -------------------------------------------------------------
    def test_client_query_for_remote_users(self):
        async def go():
            hs = self.hs
            alice = await add_user(hs, "alice")
            await self.room_with(hs, alice, BOB, CAROL)
            bob_key = generate_signing_key("BDEV")
            bob_device = device_keys(BOB, "BDEV", bob_key)
            bob_master, bob_self_signing = cross_signing(BOB)
            remote_answer = {
                "device_keys": {
                    BOB: {
                        "BDEV": bob_device,
                        "FORGED": device_keys(BOB, "OTHERID", bob_key),  # names another device
                    },
                    DAVE: {},
                    CAROL: {"CDEV": device_keys(CAROL, "CDEV", bob_key)},  # not REMOTE's user
                },
                "master_keys": {BOB: bob_master, CAROL: bob_master},
                "self_signing_keys": {BOB: bob_self_signing},
            }
            fake = hs.federation_client = FakeFederationClient({
                (REMOTE, QUERY_PATH): remote_answer,
                (OTHER, QUERY_PATH): HttpResponseError(OTHER, "HTTP 500", status=500),
                (DOWN, QUERY_PATH): NotRetryingDestination(DOWN, 0),
            })
            query = {BOB: [], CAROL: [], ERIN: [], alice: []}
            result = await hs.e2e_keys.query_keys(alice, query)
            self.assertEqual(result["device_keys"][BOB], {"BDEV": bob_device})
            self.assertEqual(result["device_keys"][alice], {})
            self.assertNotIn(CAROL, result["device_keys"])
            self.assertEqual(result["master_keys"], {BOB: bob_master})
            self.assertEqual(result["self_signing_keys"], {BOB: bob_self_signing})
            self.assertEqual(
                result["failures"],
                {
                    OTHER: {"status": 500, "message": "HTTP 500"},
                    DOWN: {"status": 503, "message": "Not ready for retry"},
                },
            )
            self.assertIn((REMOTE, QUERY_PATH, {"device_keys": {BOB: []}}), fake.calls)
            self.assertEqual(
                sorted(fake.servers_asked()),
                [(REMOTE, QUERY_PATH), (OTHER, QUERY_PATH), (DOWN, QUERY_PATH)],
            )

            # bob shares a room with alice: his device list is cached...
            result = await hs.e2e_keys.query_keys(alice, {BOB: ["BDEV", "NOSUCH"]})
            self.assertEqual(result["device_keys"], {BOB: {"BDEV": bob_device}})
            self.assertEqual(fake.servers_asked(), [])
            # ...until his server says it changed.
            await hs.federation_edus.on_edu(
                REMOTE, "m.device_list_update", {"user_id": BOB, "device_id": "BDEV2",
                                                 "stream_id": 2}
            )
            await hs.e2e_keys.query_keys(alice, {BOB: []})
            self.assertEqual(fake.servers_asked(), [(REMOTE, QUERY_PATH)])
            # New cross-signing keys replace the cached ones.
            new_master, new_self_signing = cross_signing(BOB)
            await hs.federation_edus.on_edu(
                REMOTE,
                "m.signing_key_update",
                {"user_id": BOB, "master_key": new_master, "self_signing_key": new_self_signing},
            )
            result = await hs.e2e_keys.query_keys(alice, {BOB: []})
            self.assertEqual(fake.servers_asked(), [])
            self.assertEqual(result["master_keys"], {BOB: new_master})
            self.assertEqual(result["self_signing_keys"], {BOB: new_self_signing})
            # dave shares no room: nothing would tell us of his changes, so never cached.
            for _ in range(2):
                await hs.e2e_keys.query_keys(alice, {DAVE: []})
                self.assertEqual(fake.servers_asked(), [(REMOTE, QUERY_PATH)])

        return defer.ensureDeferred(go())

    def test_client_claim_for_remote_users(self):
        async def go():
            hs = self.hs
            alice, _, _ = await self.user_with_keys(hs, "alice")
            bob_keys = one_time_keys(BOB, generate_signing_key("BDEV"), ["BBBB"])
            fake = hs.federation_client = FakeFederationClient({
                (REMOTE, CLAIM_PATH): {"one_time_keys": {
                    BOB: {"BDEV": bob_keys, "UNASKED": bob_keys},
                    CAROL: {"CDEV": bob_keys},
                }},
                (OTHER, CLAIM_PATH): RequestFailedError(OTHER, "connection refused"),
            })
            result = await hs.e2e_keys.claim_keys(
                {BOB: {"BDEV": ALG}, CAROL: {"CDEV": ALG}, alice: {"DEV1": ALG}}
            )
            self.assertEqual(result["one_time_keys"][BOB], {"BDEV": bob_keys})
            self.assertEqual(set(result["one_time_keys"]), {alice, BOB})
            self.assertEqual(
                result["failures"], {OTHER: {"status": 503, "message": "connection refused"}}
            )
            self.assertIn((REMOTE, CLAIM_PATH, {"one_time_keys": {BOB: {"BDEV": ALG}}}),
                          fake.calls)

        return defer.ensureDeferred(go())

    def test_two_servers(self):
        """alice on one server asks for bob's keys on another, over loopback HTTP."""

        async def go():
            hs_b, server_b = self.make_server()
            bob, bob_key, bob_uploads = await self.user_with_keys(hs_b, "bob", "BDEV")
            hs_a = self.hs
            signing_key = hs_a.server_keys.signing_key
            hs_b.keyring = FakeKeyring({hs_a.server_name: {signing_key.key_id:
                                                           signing_key.verify_key}})
            hs_a.federation_client = self.client(hs_a.server_name, signing_key)
            alice = await add_user(hs_a, "alice")

            result = await hs_a.e2e_keys.query_keys(alice, {bob: []})
            self.assertEqual(result["failures"], {})
            got = result["device_keys"][bob]["BDEV"]
            verify_signature(got, bob, "ed25519:BDEV", bob_key.verify_key)
            self.assertEqual(result["master_keys"][bob], as_served(bob_uploads["master_key"]))

            result = await hs_a.e2e_keys.claim_keys({bob: {"BDEV": ALG}})
            self.assertEqual(result["failures"], {})
            [(key_id, key)] = result["one_time_keys"][bob]["BDEV"].items()
            self.assertEqual(bob_uploads["one_time_keys"][key_id], key)

        return defer.ensureDeferred(go())
