"""Our federation transport against a real Synapse, both on loopback TLS.

One Synapse and one of our servers for the module (tests/support/synapse.py).
Blocking HTTP talks to either process; an in-process FederationClient and
Keyring speak as our server (its name and signing key) where the test needs to
look at the federation API itself.
"""

import uuid
from urllib.parse import quote

import pytest
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from unpaddedbase64 import decode_base64

from crypto.keys import generate_signing_key, signing_key_from_seed
from crypto.signing import SignatureError
from homeserver.services.federation_client import (
    FederationClient,
    HttpResponseError,
    IpRangeFilter,
    TlsPolicy,
)
from homeserver.services.keyring import Keyring
from tests.support.http import request
from tests.support.synapse import client_call, loopback_only_blocklist, register

CLIENT = "/_matrix/client/v3"

# One worker runs the whole module: one Synapse start (CI uses --dist loadgroup).
pytestmark = pytest.mark.xdist_group("synapse-interop")


class Peers:
    def __init__(self, synapse, ours):
        self.synapse = synapse
        self.ours = ours
        tag = uuid.uuid4().hex[:6]
        self.tag = tag
        self.syn_user, self.syn_token = register(synapse, f"sam{tag}")
        self.our_user, self.our_token = register(ours, f"olivia{tag}")
        assert (
            client_call(
                synapse,
                "PUT",
                f"{CLIENT}/profile/{quote(self.syn_user)}/displayname",
                self.syn_token,
                {"displayname": "Sam on Synapse"},
            )[0]
            == 200
        )
        assert (
            client_call(
                ours,
                "PUT",
                f"{CLIENT}/profile/{quote(self.our_user)}/displayname",
                self.our_token,
                {"displayname": "Olivia on ours"},
            )[0]
            == 200
        )


@pytest.fixture(scope="module")
def peers(synapse_server, federating_server):
    return Peers(synapse_server, federating_server)


@pytest.fixture(autouse=True)
def _peers(request, peers):
    request.instance.peers = peers


def server_key_of(server) -> tuple[str, object]:
    body = request("GET", server.base_url + "/_matrix/key/v2/server").json()
    [(key_id, key)] = body["verify_keys"].items()
    return key_id, decode_verify_key_bytes(key_id, decode_base64(key["key"]))


class SynapseInteropTests(TestCase):
    timeout = 60

    def setUp(self):
        ours = self.peers.ours
        self.our_key = ours.signing_key()
        self.client = self.make_client(self.our_key)

    def make_client(self, key):
        return FederationClient(
            reactor,
            self.peers.ours.server_name,
            key,
            ip_filter=IpRangeFilter(loopback_only_blocklist()),
            tls=TlsPolicy(verify=False),
        )

    def tearDown(self):
        return defer.ensureDeferred(self.client.close())

    def run_async(self, coro):
        return defer.ensureDeferred(coro)

    # --- Synapse talks to us ------------------------------------------------------------
    def test_synapse_fetches_and_verifies_our_keys(self):
        synapse, ours = self.peers.synapse, self.peers.ours
        # Synapse's notary fetches our /_matrix/key/v2/server (a signed request),
        # checks its self-signature and answers with its own signature added.
        status, body = client_call(
            synapse,
            "POST",
            "/_matrix/key/v2/query",
            body={
                "server_keys": {
                    ours.server_name: {self.our_key.key_id: {"minimum_valid_until_ts": 0}}
                }
            },
        )
        self.assertEqual(status, 200, body)
        [doc] = body["server_keys"]
        self.assertEqual(doc["server_name"], ours.server_name)
        self.assertEqual(
            doc["verify_keys"], {self.our_key.key_id: {"key": self.our_key.public_key_base64}}
        )
        syn_key_id, syn_key = server_key_of(synapse)
        verify_signed_json(doc, synapse.server_name, syn_key)
        our_key_id, our_key = server_key_of(ours)
        verify_signed_json(doc, ours.server_name, our_key)

    def test_synapse_reads_our_profiles(self):
        p = self.peers
        status, body = client_call(
            p.synapse, "GET", f"{CLIENT}/profile/{quote(p.our_user)}", p.syn_token
        )
        self.assertEqual((status, body.get("displayname")), (200, "Olivia on ours"), body)
        status, body = client_call(
            p.synapse, "GET", f"{CLIENT}/profile/{quote(p.our_user)}/displayname", p.syn_token
        )
        self.assertEqual((status, body), (200, {"displayname": "Olivia on ours"}))
        nobody = f"@nobody{p.tag}:{p.ours.server_name}"
        status, body = client_call(
            p.synapse, "GET", f"{CLIENT}/profile/{quote(nobody)}", p.syn_token
        )
        self.assertEqual(status, 404, body)

    def test_synapse_resolves_our_alias_and_lists_our_public_rooms(self):
        p = self.peers
        alias_name = f"fedroom{p.tag}"
        status, body = client_call(
            p.ours,
            "POST",
            f"{CLIENT}/createRoom",
            p.our_token,
            {
                "visibility": "public",
                "preset": "public_chat",
                "name": f"Federated {p.tag}",
                "topic": "federation directory test",
                "room_alias_name": alias_name,
            },
        )
        self.assertEqual(status, 200, body)
        room_id = body["room_id"]
        alias = f"#{alias_name}:{p.ours.server_name}"
        status, body = client_call(
            p.synapse, "GET", f"{CLIENT}/directory/room/{quote(alias)}", p.syn_token
        )
        self.assertEqual(status, 200, body)
        self.assertEqual(body["room_id"], room_id)
        self.assertIn(p.ours.server_name, body["servers"])

        server = quote(p.ours.server_name)
        status, body = client_call(
            p.synapse, "GET", f"{CLIENT}/publicRooms?server={server}", p.syn_token
        )
        self.assertEqual(status, 200, body)
        entries = {r["room_id"]: r for r in body["chunk"]}
        self.assertIn(room_id, entries, body)
        self.assertEqual(entries[room_id]["name"], f"Federated {p.tag}")
        self.assertEqual(entries[room_id]["canonical_alias"], alias)
        status, body = client_call(
            p.synapse,
            "POST",
            f"{CLIENT}/publicRooms?server={server}",
            p.syn_token,
            {"filter": {"generic_search_term": p.tag}, "limit": 10},
        )
        self.assertEqual(status, 200, body)
        self.assertEqual([r["room_id"] for r in body["chunk"]], [room_id])

    # --- we talk to Synapse -----------------------------------------------------------------
    def test_our_signed_requests_are_accepted_by_synapse(self):
        p = self.peers

        async def go():
            body = await self.client.get_json(
                p.synapse.server_name,
                "/_matrix/federation/v1/query/profile",
                {"user_id": p.syn_user},
            )
            self.assertEqual(body.get("displayname"), "Sam on Synapse")
            body = await self.client.get_json(
                p.synapse.server_name,
                "/_matrix/federation/v1/query/profile",
                {"user_id": p.syn_user, "field": "displayname"},
            )
            self.assertEqual(body, {"displayname": "Sam on Synapse"})
            # The same key id with the wrong key: Synapse refuses it.
            forger = self.make_client(
                signing_key_from_seed(
                    self.our_key.version, bytes(generate_signing_key().signing_key)
                )
            )
            try:
                with self.assertRaises(HttpResponseError) as cm:
                    await forger.get_json(
                        p.synapse.server_name,
                        "/_matrix/federation/v1/query/profile",
                        {"user_id": p.syn_user},
                    )
                self.assertEqual(
                    (cm.exception.status, cm.exception.errcode), (401, "M_UNAUTHORIZED")
                )
            finally:
                await forger.close()
            with self.assertRaises(HttpResponseError) as cm:
                await self.client.get_json(
                    p.synapse.server_name,
                    "/_matrix/federation/v1/query/profile",
                    {"user_id": f"@nobody{p.tag}:{p.synapse.server_name}"},
                )
            self.assertEqual((cm.exception.status, cm.exception.errcode), (404, "M_NOT_FOUND"))

        return self.run_async(go())

    def test_our_keyring_fetches_synapse_keys(self):
        p = self.peers
        syn_signing = p.synapse.signing_key()

        async def go():
            keyring = Keyring(
                p.ours.server_name, lambda: int(reactor.seconds() * 1000), None, self.client, None
            )
            now = int(reactor.seconds() * 1000)
            key = await keyring.get_verify_key(p.synapse.server_name, syn_signing.key_id, now)
            self.assertEqual(bytes(key), bytes(syn_signing.verify_key))
            # Something Synapse signed: its notary answer about us.
            status, body = client_call(
                p.synapse,
                "POST",
                "/_matrix/key/v2/query",
                body={
                    "server_keys": {
                        p.ours.server_name: {self.our_key.key_id: {"minimum_valid_until_ts": 0}}
                    }
                },
            )
            doc = body["server_keys"][0]
            await keyring.verify_json_signed_by(doc, p.synapse.server_name, now)
            with self.assertRaises(SignatureError):
                await keyring.verify_json_signed_by(
                    {**doc, "valid_until_ts": 1}, p.synapse.server_name
                )

        return self.run_async(go())

    def test_our_notary_serves_synapse_keys_signed_by_us(self):
        p = self.peers
        syn_key_id, syn_key = server_key_of(p.synapse)
        our_key_id, our_key = server_key_of(p.ours)
        r = request(
            "POST",
            p.ours.base_url + "/_matrix/key/v2/query",
            body={"server_keys": {p.synapse.server_name: {}}},
        )
        self.assertEqual(r.status, 200, r.body)
        [doc] = r.json()["server_keys"]
        self.assertEqual(doc["server_name"], p.synapse.server_name)
        self.assertIn(syn_key_id, doc["verify_keys"])
        verify_signed_json(doc, p.synapse.server_name, syn_key)
        verify_signed_json(doc, p.ours.server_name, our_key)
        r = request(
            "GET",
            p.ours.base_url
            + f"/_matrix/key/v2/query/{p.synapse.server_name}?minimum_valid_until_ts=0",
        )
        [doc] = r.json()["server_keys"]
        verify_signed_json(doc, p.ours.server_name, our_key)
        self.assertEqual(
            doc["verify_keys"][syn_key_id]["key"],
            r.json()["server_keys"][0]["verify_keys"][syn_key_id]["key"],
        )
        r = request(
            "POST",
            p.ours.base_url + "/_matrix/key/v2/query",
            body={
                "server_keys": {
                    p.synapse.server_name: {syn_key_id: {"minimum_valid_until_ts": 0}},
                    "127.0.0.1:1": {},
                }
            },
        )
        self.assertEqual(
            [d["server_name"] for d in r.json()["server_keys"]], [p.synapse.server_name]
        )

    def test_synapse_public_rooms_through_our_client(self):
        p = self.peers
        status, body = client_call(
            p.synapse,
            "POST",
            f"{CLIENT}/createRoom",
            p.syn_token,
            {"visibility": "public", "preset": "public_chat", "name": f"On Synapse {p.tag}"},
        )
        self.assertEqual(status, 200, body)
        room_id = body["room_id"]

        async def go():
            body = await self.client.get_json(
                p.synapse.server_name,
                "/_matrix/federation/v1/publicRooms",
                {"limit": 50, "include_all_networks": False},
            )
            self.assertIn(room_id, [r["room_id"] for r in body["chunk"]], body)
            body = await self.client.post_json(
                p.synapse.server_name,
                "/_matrix/federation/v1/publicRooms",
                {"filter": {"generic_search_term": f"On Synapse {p.tag}"}, "limit": 10},
            )
            self.assertEqual([r["room_id"] for r in body["chunk"]], [room_id])

        return self.run_async(go())


class OurClientApiOverFederation(TestCase):
    """Our users' client requests that need Synapse: profiles, aliases, room lists."""

    def test_remote_profile_alias_and_room_directory(self):
        p = self.peers
        status, profile = client_call(p.ours, "GET", f"{CLIENT}/profile/{quote(p.syn_user)}",
                                      p.our_token)
        assert (status, profile.get("displayname")) == (200, "Sam on Synapse"), profile
        status, name = client_call(
            p.ours, "GET", f"{CLIENT}/profile/{quote(p.syn_user)}/displayname", p.our_token)
        assert (status, name) == (200, {"displayname": "Sam on Synapse"})
        missing = f"@nobody{p.tag}:{p.synapse.server_name}"
        status, body = client_call(p.ours, "GET", f"{CLIENT}/profile/{quote(missing)}",
                                   p.our_token)
        assert status == 404 and body["errcode"] == "M_NOT_FOUND"

        alias_name = f"fedalias{p.tag}"
        status, created = client_call(p.synapse, "POST", f"{CLIENT}/createRoom", p.syn_token, {
            "room_alias_name": alias_name, "visibility": "public", "preset": "public_chat",
            "name": f"Synapse room {p.tag}"})
        assert status == 200, created
        alias = f"#{alias_name}:{p.synapse.server_name}"
        status, resolved = client_call(p.ours, "GET",
                                       f"{CLIENT}/directory/room/{quote(alias)}", p.our_token)
        assert status == 200, resolved
        assert resolved["room_id"] == created["room_id"]
        assert p.synapse.server_name in resolved["servers"]

        status, listing = client_call(
            p.ours, "POST",
            f"{CLIENT}/publicRooms?server={quote(p.synapse.server_name)}", p.our_token,
            {"filter": {"generic_search_term": f"Synapse room {p.tag}"}})
        assert status == 200, listing
        assert [r["room_id"] for r in listing["chunk"]] == [created["room_id"]]
