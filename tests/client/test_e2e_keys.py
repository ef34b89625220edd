"""End-to-end encryption keys, end to end on SQLite and PostgreSQL.

Keys are made and signed here with PyNaCl (python-olm is not installed, so
matrix-nio cannot): upload with counts in the response and in /sync, query
by another member, one-time keys claimed exactly once (also concurrently),
fallback keys, device-list changes in /sync (a sleeping sync wakes) and in
/keys/changes, ``left`` after the last shared room, cross-signing keys (UIA to
replace them), signatures, and a deleted device's keys going with it.
"""

import asyncio
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

from nacl.signing import SigningKey
from nio import AsyncClient, JoinError, LoginResponse
from twisted.internet import defer
from twisted.trial import unittest

from crypto.b64 import encode_base64
from crypto.canonical_json import encode_canonical_json
from homeserver.services.device_lists import DeviceListsService
from tests.support.clients import CLIENT, call, close, register, run, shared_room
from tests.support.homeserver import add_user, close_homeserver, make_homeserver

PASSWORD = "correct horse battery"
ALG = "signed_curve25519"




def sign(obj: dict[str, Any], user_id: str, key_id: str, key: SigningKey) -> dict[str, Any]:
    signable = {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
    signature = encode_base64(key.sign(encode_canonical_json(signable)).signature)
    signatures = {u: dict(s) for u, s in obj.get("signatures", {}).items()}
    signatures.setdefault(user_id, {})[key_id] = signature
    return {**obj, "signatures": signatures}


def public(key: SigningKey) -> str:
    return encode_base64(bytes(key.verify_key))


class Device:
    """A device's keys: an ed25519 identity key signing its keys."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.user_id = client.user_id
        self.device_id = client.device_id
        self.key = SigningKey.generate()
        self.key_id = f"ed25519:{self.device_id}"
        self._next = 0

    def device_keys(self) -> dict[str, Any]:
        keys = {
            "user_id": self.user_id,
            "device_id": self.device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                f"curve25519:{self.device_id}": encode_base64(bytes(32)),
                self.key_id: public(self.key),
            },
        }
        return sign(keys, self.user_id, self.key_id, self.key)

    def one_time_keys(self, count: int, fallback: bool = False) -> dict[str, Any]:
        keys = {}
        for _ in range(count):
            self._next += 1
            key: dict[str, Any] = {"key": encode_base64(self._next.to_bytes(32, "big"))}
            if fallback:
                key["fallback"] = True
            keys[f"{ALG}:K{self._next:05d}"] = sign(key, self.user_id, self.key_id, self.key)
        return keys


class CrossSigning:
    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.master = SigningKey.generate()
        self.self_signing = SigningKey.generate()
        self.user_signing = SigningKey.generate()

    @staticmethod
    def key_id(key: SigningKey) -> str:
        return f"ed25519:{public(key)}"

    def body(self) -> dict[str, Any]:
        def key(usage: str, k: SigningKey) -> dict[str, Any]:
            return {"user_id": self.user_id, "usage": [usage], "keys": {self.key_id(k): public(k)}}

        master = key("master", self.master)
        mk = self.key_id(self.master)
        return {
            "master_key": master,
            "self_signing_key": sign(
                key("self_signing", self.self_signing), self.user_id, mk, self.master
            ),
            "user_signing_key": sign(
                key("user_signing", self.user_signing), self.user_id, mk, self.master
            ),
        }


async def post(server: Any, client: Any, path: str, body: Any) -> Any:
    status, response = await call(server, client, "POST", CLIENT + path, body)
    assert status == 200, (path, status, response)
    return response


async def sync(server: Any, client: Any, since: str | None = None, timeout: int = 0) -> dict:
    path = f"{CLIENT}/sync?timeout={timeout}" + (f"&since={quote(since)}" if since else "")
    status, body = await call(server, client, "GET", path)
    assert status == 200, body
    return body


async def login(server: Any, user_id: str, name: str = "second") -> AsyncClient:
    client = AsyncClient(server.base_url, user_id)
    response = await client.login(PASSWORD, device_name=name)
    assert isinstance(response, LoginResponse), response
    return client




async def upload(server: Any, device: Device, body: dict[str, Any]) -> dict[str, Any]:
    return await post(server, device.client, "/keys/upload", body)


async def query(server: Any, client: Any, *user_ids: str) -> dict[str, Any]:
    return await post(server, client, "/keys/query", {"device_keys": {u: [] for u in user_ids}})


async def claim(server: Any, client: Any, device: Device) -> dict[str, Any]:
    body = {"one_time_keys": {device.user_id: {device.device_id: ALG}}}
    response = await post(server, client, "/keys/claim", body)
    return response["one_time_keys"].get(device.user_id, {}).get(device.device_id, {})


async def password_auth(server: Any, client: Any, method: str, path: str, body: dict) -> Any:
    """Make a UIA-protected request: first without auth (401), then with the password."""
    status, challenge = await call(server, client, method, CLIENT + path, body)
    assert status == 401, challenge
    assert {"stages": ["m.login.password"]} in challenge["flows"]
    auth = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": client.user_id},
        "password": PASSWORD,
        "session": challenge["session"],
    }
    return await call(server, client, method, CLIENT + path, {**body, "auth": auth})


def test_upload_counts_in_response_and_sync(matrix_server):
    async def go():
        alice = await register(matrix_server)
        device = Device(alice)
        first = await upload(
            matrix_server,
            device,
            {"device_keys": device.device_keys(), "one_time_keys": device.one_time_keys(5)},
        )
        assert first == {"one_time_key_counts": {ALG: 5}}
        body = await sync(matrix_server, alice)
        assert body["device_one_time_keys_count"] == {ALG: 5}
        assert body["device_unused_fallback_key_types"] == []

        more = device.one_time_keys(3)
        again = await upload(matrix_server, device, {"one_time_keys": more})
        assert again["one_time_key_counts"] == {ALG: 8}
        # The same keys again are accepted and not counted twice.
        assert (await upload(matrix_server, device, {"one_time_keys": more}))[
            "one_time_key_counts"
        ] == {ALG: 8}
        # A known key id with other contents is refused.
        (key_id, key) = next(iter(more.items()))
        status, error = await call(
            matrix_server,
            alice,
            "POST",
            CLIENT + "/keys/upload",
            {"one_time_keys": {key_id: {**key, "key": "changed"}}},
        )
        assert status == 400, error

        await upload(matrix_server, device, {"fallback_keys": device.one_time_keys(1, True)})
        body = await sync(matrix_server, alice, body["next_batch"])
        assert body["device_one_time_keys_count"] == {ALG: 8}
        assert body["device_unused_fallback_key_types"] == [ALG]

        # Device keys must name the requesting user and device.
        for wrong in ({"user_id": "@mallory:example.org"}, {"device_id": "NOTMINE"}):
            status, error = await call(
                matrix_server,
                alice,
                "POST",
                CLIENT + "/keys/upload",
                {"device_keys": {**device.device_keys(), **wrong}},
            )
            assert status == 400, error
        # Not the shape of device keys: M_BAD_JSON.
        status, error = await call(
            matrix_server,
            alice,
            "POST",
            CLIENT + "/keys/upload",
            {"device_keys": {"user_id": alice.user_id}},
        )
        assert (status, error["errcode"]) == (400, "M_BAD_JSON")
        await close(alice)

    run(go())


def test_query_from_another_member_and_remote_failures(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        await shared_room(alice, bob)
        device = Device(alice)
        keys = device.device_keys()
        await upload(matrix_server, device, {"device_keys": keys})
        await alice.update_device(device.device_id, {"display_name": "Alice's phone"})

        response = await post(
            matrix_server,
            bob,
            "/keys/query",
            {"device_keys": {alice.user_id: [], "@carol:elsewhere.example": []}, "timeout": 1000},
        )
        got = response["device_keys"][alice.user_id][device.device_id]
        assert got["keys"] == keys["keys"]
        assert got["signatures"] == keys["signatures"]
        assert got["algorithms"] == keys["algorithms"]
        assert got["unsigned"] == {"device_display_name": "Alice's phone"}
        assert "elsewhere.example" in response["failures"]
        assert "@carol:elsewhere.example" not in response["device_keys"]

        # A list of device ids narrows the answer.
        only = await post(
            matrix_server, bob, "/keys/query", {"device_keys": {alice.user_id: ["NOSUCH"]}}
        )
        assert only["device_keys"] == {alice.user_id: {}}
        await close(alice, bob)

    run(go())


def test_claim_exactly_once_concurrently_then_fallback(matrix_server):
    async def go():
        alice = await register(matrix_server)
        bob = await register(matrix_server)
        carol = await register(matrix_server)
        device = Device(alice)
        uploaded = device.one_time_keys(10)
        await upload(
            matrix_server, device, {"device_keys": device.device_keys(), "one_time_keys": uploaded}
        )
        # Twelve claims at once from two users: ten distinct keys, then two fallback-less misses.
        claims = await asyncio.gather(
            *(claim(matrix_server, bob if i % 2 else carol, device) for i in range(12))
        )
        got = [k for c in claims for k in c]
        assert len(got) == 10 and set(got) == set(uploaded)
        assert sum(1 for c in claims if not c) == 2
        for c in claims:
            for key_id, key in c.items():
                assert key == uploaded[key_id]
        body = await sync(matrix_server, alice)
        assert body["device_one_time_keys_count"].get(ALG, 0) == 0

        fallback = device.one_time_keys(1, fallback=True)
        await upload(matrix_server, device, {"fallback_keys": fallback})
        assert (await sync(matrix_server, alice))["device_unused_fallback_key_types"] == [ALG]
        # Out of one-time keys: the fallback key, every time, now marked used.
        assert await claim(matrix_server, bob, device) == fallback
        assert await claim(matrix_server, carol, device) == fallback
        assert (await sync(matrix_server, alice))["device_unused_fallback_key_types"] == []

        # One-time keys again come before the fallback key, oldest upload first.
        older, newer = device.one_time_keys(1), device.one_time_keys(1)
        await upload(matrix_server, device, {"one_time_keys": older})
        await upload(matrix_server, device, {"one_time_keys": newer})
        assert await claim(matrix_server, bob, device) == older
        assert await claim(matrix_server, bob, device) == newer
        assert await claim(matrix_server, bob, device) == fallback
        # A new fallback key is unused again.
        await upload(matrix_server, device, {"fallback_keys": device.one_time_keys(1, True)})
        assert (await sync(matrix_server, alice))["device_unused_fallback_key_types"] == [ALG]

        # Remote users fail per server; unknown local devices are left out.
        response = await post(
            matrix_server,
            bob,
            "/keys/claim",
            {
                "one_time_keys": {
                    "@dan:elsewhere.example": {"D": ALG},
                    alice.user_id: {"NOSUCH": ALG},
                }
            },
        )
        assert response["one_time_keys"] == {}
        assert "elsewhere.example" in response["failures"]
        await close(alice, bob, carol)

    run(go())


def test_new_device_in_sync_and_keys_changes_then_left(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await shared_room(alice, bob)
        loner = await register(matrix_server)  # shares no room with alice
        first = await sync(matrix_server, bob)
        loner_first = await sync(matrix_server, loner)
        before = first["next_batch"]
        # Bob's incremental sync sleeps; alice's new device uploads keys and wakes it.
        sleeping = asyncio.ensure_future(sync(matrix_server, bob, before, timeout=20000))
        await asyncio.sleep(0.3)
        phone = await login(matrix_server, alice.user_id, "phone")
        device = Device(phone)
        started = time.monotonic()
        await upload(matrix_server, device, {"device_keys": device.device_keys()})
        woken = await sleeping
        assert time.monotonic() - started < 5
        assert alice.user_id in woken["device_lists"]["changed"]
        assert woken["device_lists"].get("left", []) == []

        # The loner hears nothing about alice.
        loner_next = await sync(matrix_server, loner, loner_first["next_batch"])
        assert alice.user_id not in loner_next.get("device_lists", {}).get("changed", [])

        after = woken["next_batch"]
        changes = await call(
            matrix_server,
            bob,
            "GET",
            f"{CLIENT}/keys/changes?from={quote(before)}&to={quote(after)}",
        )
        assert changes[0] == 200 and alice.user_id in changes[1]["changed"], changes
        nothing = await call(
            matrix_server,
            bob,
            "GET",
            f"{CLIENT}/keys/changes?from={quote(after)}&to={quote(after)}",
        )
        assert nothing == (200, {"changed": [], "left": []})
        # Alice's own other device hears about it too.
        mine = await call(
            matrix_server, alice, "GET", f"{CLIENT}/keys/changes?from={quote(before)}"
        )
        assert alice.user_id in mine[1]["changed"]

        # Alice leaves the only room she shares with bob: bob's sync says "left".
        await alice.room_leave(room_id)
        deadline = time.monotonic() + 10
        left: list[str] = []
        since = after
        while alice.user_id not in left and time.monotonic() < deadline:
            body = await sync(matrix_server, bob, since, timeout=2000)
            since = body["next_batch"]
            left += body.get("device_lists", {}).get("left", [])
        assert alice.user_id in left
        gone = await call(matrix_server, bob, "GET", f"{CLIENT}/keys/changes?from={quote(after)}")
        assert alice.user_id in gone[1]["left"] and alice.user_id not in gone[1]["changed"]

        # Rejoining: alice is "changed" for bob again (they share a room anew).
        await bob.room_invite(room_id, alice.user_id)
        assert not isinstance(await alice.join(room_id), JoinError)
        deadline = time.monotonic() + 10
        changed: list[str] = []
        while alice.user_id not in changed and time.monotonic() < deadline:
            body = await sync(matrix_server, bob, since, timeout=2000)
            since = body["next_batch"]
            changed += body.get("device_lists", {}).get("changed", [])
        assert alice.user_id in changed
        await close(alice, bob, loner, phone)

    run(go())


def test_cross_signing_upload_needs_uia_to_replace(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        await shared_room(alice, bob)
        cross = CrossSigning(alice.user_id)
        body = cross.body()
        # The first upload needs no UIA; the same keys again neither.
        await post(matrix_server, alice, "/keys/device_signing/upload", body)
        await post(matrix_server, alice, "/keys/device_signing/upload", body)

        mine = await query(matrix_server, alice, alice.user_id)
        assert mine["master_keys"][alice.user_id]["keys"] == body["master_key"]["keys"]
        assert mine["self_signing_keys"][alice.user_id] == body["self_signing_key"]
        assert mine["user_signing_keys"][alice.user_id] == body["user_signing_key"]
        theirs = await query(matrix_server, bob, alice.user_id)
        assert alice.user_id in theirs["master_keys"]
        assert alice.user_id in theirs["self_signing_keys"]
        assert alice.user_id not in theirs.get("user_signing_keys", {})

        # New keys replace the old ones only after UIA.
        since = (await sync(matrix_server, bob))["next_batch"]
        replacement = CrossSigning(alice.user_id)
        status, response = await password_auth(
            matrix_server, alice, "POST", "/keys/device_signing/upload", replacement.body()
        )
        assert status == 200, response
        mine = await query(matrix_server, alice, alice.user_id)
        assert (
            mine["master_keys"][alice.user_id]["keys"] == replacement.body()["master_key"]["keys"]
        )
        assert alice.user_id in (await sync(matrix_server, bob, since))["device_lists"]["changed"]

        # A self-signing key not signed by the master key is refused.
        bad = replacement.body()
        bad["self_signing_key"] = sign(
            {k: v for k, v in bad["self_signing_key"].items() if k != "signatures"},
            alice.user_id,
            CrossSigning.key_id(replacement.master),
            SigningKey.generate(),
        )
        del bad["master_key"], bad["user_signing_key"]
        status, error = await call(
            matrix_server, alice, "POST", CLIENT + "/keys/device_signing/upload", bad
        )
        assert (status, error["errcode"]) == (400, "M_INVALID_SIGNATURE"), error
        # Without any master key there is nothing to sign with.
        fresh = await register(matrix_server)
        lonely = CrossSigning(fresh.user_id).body()
        del lonely["master_key"]
        status, error = await call(
            matrix_server, fresh, "POST", CLIENT + "/keys/device_signing/upload", lonely
        )
        assert (status, error["errcode"]) == (400, "M_MISSING_PARAM"), error
        await close(alice, bob, fresh)

    run(go())


def test_signatures_upload(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        await shared_room(alice, bob)
        device = Device(alice)
        await upload(matrix_server, device, {"device_keys": device.device_keys()})
        alice_cross, bob_cross = CrossSigning(alice.user_id), CrossSigning(bob.user_id)
        await post(matrix_server, alice, "/keys/device_signing/upload", alice_cross.body())
        await post(matrix_server, bob, "/keys/device_signing/upload", bob_cross.body())
        ssk_id = CrossSigning.key_id(alice_cross.self_signing)
        alice_master = alice_cross.body()["master_key"]
        master_pub = public(alice_cross.master)

        # Alice signs her device with her self-signing key, and her master key with her device.
        signed_device = sign(device.device_keys(), alice.user_id, ssk_id, alice_cross.self_signing)
        signed_master = sign(alice_master, alice.user_id, device.key_id, device.key)
        response = await post(
            matrix_server,
            alice,
            "/keys/signatures/upload",
            {alice.user_id: {device.device_id: signed_device, master_pub: signed_master}},
        )
        assert response["failures"] == {}
        seen = await query(matrix_server, bob, alice.user_id)
        got = seen["device_keys"][alice.user_id][device.device_id]["signatures"][alice.user_id]
        assert got[ssk_id] == signed_device["signatures"][alice.user_id][ssk_id]
        assert (
            got[device.key_id] == device.device_keys()["signatures"][alice.user_id][device.key_id]
        )
        master_sigs = seen["master_keys"][alice.user_id]["signatures"][alice.user_id]
        assert device.key_id in master_sigs

        # Bob signs alice's master key with his user-signing key: only bob sees it.
        usk_id = CrossSigning.key_id(bob_cross.user_signing)
        bob_signed = sign(alice_master, bob.user_id, usk_id, bob_cross.user_signing)
        response = await post(
            matrix_server,
            bob,
            "/keys/signatures/upload",
            {alice.user_id: {master_pub: bob_signed}},
        )
        assert response["failures"] == {}
        by_bob = (await query(matrix_server, bob, alice.user_id))["master_keys"][alice.user_id]
        assert (
            by_bob["signatures"][bob.user_id][usk_id]
            == bob_signed["signatures"][bob.user_id][usk_id]
        )
        by_alice = (await query(matrix_server, alice, alice.user_id))["master_keys"][alice.user_id]
        assert bob.user_id not in by_alice["signatures"]

        # Bad signatures and unknown keys fail per key; the rest are stored.
        forged = sign(device.device_keys(), alice.user_id, ssk_id, SigningKey.generate())
        response = await post(
            matrix_server,
            alice,
            "/keys/signatures/upload",
            {alice.user_id: {device.device_id: forged, "NOSUCHDEVICE": forged}},
        )
        failures = response["failures"][alice.user_id]
        assert failures[device.device_id]["errcode"] == "M_INVALID_SIGNATURE"
        assert failures["NOSUCHDEVICE"]["errcode"] == "M_NOT_FOUND"
        await close(alice, bob)

    run(go())


def test_deleting_a_device_deletes_its_keys(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        await shared_room(alice, bob)
        phone = await login(matrix_server, alice.user_id, "phone")
        device = Device(phone)
        await upload(
            matrix_server,
            device,
            {
                "device_keys": device.device_keys(),
                "one_time_keys": device.one_time_keys(3),
                "fallback_keys": device.one_time_keys(1, True),
            },
        )
        assert (
            device.device_id
            in (await query(matrix_server, bob, alice.user_id))["device_keys"][alice.user_id]
        )
        since = (await sync(matrix_server, bob))["next_batch"]

        status, response = await password_auth(
            matrix_server, alice, "DELETE", f"/devices/{device.device_id}", {}
        )
        assert status == 200, response
        assert (await query(matrix_server, bob, alice.user_id))["device_keys"][alice.user_id] == {}
        assert await claim(matrix_server, bob, device) == {}
        assert alice.user_id in (await sync(matrix_server, bob, since))["device_lists"]["changed"]
        await close(alice, bob, phone)

    run(go())


def test_kept_across_restart_and_positions_never_go_back(matrix_server):
    """Last in this module: it restarts the module's server."""

    async def before():
        alice, bob = await register(matrix_server), await register(matrix_server)
        await shared_room(alice, bob)
        t0 = (await sync(matrix_server, bob))["next_batch"]
        device = Device(alice)
        keys = device.one_time_keys(2)
        await upload(
            matrix_server, device, {"device_keys": device.device_keys(), "one_time_keys": keys}
        )
        await post(
            matrix_server, alice, "/keys/device_signing/upload", CrossSigning(alice.user_id).body()
        )
        t1 = (await sync(matrix_server, bob))["next_batch"]
        await close(alice, bob)  # their sessions belong to this event loop
        return alice, bob, device, keys, t0, t1

    async def after(alice, bob, device, keys, t0, t1):
        changes = await call(matrix_server, bob, "GET", f"{CLIENT}/keys/changes?from={quote(t0)}")
        assert changes[1]["changed"] == [alice.user_id], changes
        changes = await call(matrix_server, bob, "GET", f"{CLIENT}/keys/changes?from={quote(t1)}")
        assert changes[1] == {"changed": [], "left": []}, changes
        seen = await query(matrix_server, bob, alice.user_id)
        assert device.device_id in seen["device_keys"][alice.user_id]
        assert alice.user_id in seen["master_keys"]
        claimed = [await claim(matrix_server, bob, device) for _ in range(3)]
        assert claimed[2] == {} and {k for c in claimed for k in c} == set(keys)
        # A change after the restart is newer than a token from before it.
        await upload(
            matrix_server, device, {"device_keys": {**device.device_keys(), "algorithms": ["x"]}}
        )
        assert alice.user_id in (await sync(matrix_server, bob, t1))["device_lists"]["changed"]
        await close(alice, bob)

    state = run(before())
    matrix_server.stop()
    matrix_server.start()
    run(after(*state))


# --- in process, on a real database ----------------------------------------------------------
class DeviceListsWindowTest(unittest.TestCase):
    """Entries older than the in-memory window come from the database, with the same answer."""

    def setUp(self):
        self.stack = ExitStack()
        directory = Path(self.stack.enter_context(tempfile.TemporaryDirectory()))
        self.hs = make_homeserver(self.stack, directory, "sqlite3")

    def tearDown(self):
        d = defer.ensureDeferred(close_homeserver(self.hs))
        d.addBoth(lambda r: (self.stack.close(), r)[1])
        return d

    def test_database_answers_below_the_window(self):
        async def go():
            hs = self.hs
            alice = await add_user(hs, "alice")
            for device_id in ("D1", "D2", "D3"):
                await hs.e2e_keys.upload_keys(
                    alice,
                    device_id,
                    {
                        "device_keys": {
                            "user_id": alice,
                            "device_id": device_id,
                            "algorithms": [],
                            "keys": {},
                            "signatures": {},
                        }
                    },
                )
            position = hs.device_lists.position
            self.assertEqual(position, 3)
            # Unchanged keys are no change.
            await hs.e2e_keys.upload_keys(
                alice,
                "D1",
                {
                    "device_keys": {
                        "user_id": alice,
                        "device_id": "D1",
                        "algorithms": [],
                        "keys": {},
                        "signatures": {},
                    }
                },
            )
            self.assertEqual(hs.device_lists.position, 4)
            self.assertEqual(
                await hs.device_lists.changes_for(alice, 3, 4), {"changed": [], "left": []}
            )
            position = hs.device_lists.position
            in_memory = [await hs.device_lists.changes_for(alice, s, position) for s in range(5)]
            self.assertEqual(in_memory[0], {"changed": [alice], "left": []})
            self.assertEqual(in_memory[2], {"changed": [alice], "left": []})
            self.assertEqual(in_memory[3], {"changed": [], "left": []})
            # A restarted service keeps only the newest entries in memory.
            import homeserver.services.device_lists as module

            self.patch(module, "RECENT_ENTRIES", 2)
            restarted = DeviceListsService(hs)
            self.assertEqual(restarted.position, 4)  # never back, though 4 announced nothing
            self.assertEqual(restarted._floor, 2)
            from_db = [await restarted.changes_for(alice, s, position) for s in range(5)]
            self.assertEqual(from_db, in_memory)
            # Deleting a device with keys is a change; deleting one without is not
            # (accounts.delete_devices calls this hook).
            await hs.e2e_keys.on_devices_deleted(alice, ["D2"])
            self.assertEqual(hs.device_lists.position, 5)
            self.assertEqual((await hs.device_lists.changes_for(alice, 4, 5))["changed"], [alice])
            await hs.e2e_keys.on_devices_deleted(alice, ["NOKEYS"])
            self.assertEqual((await hs.device_lists.changes_for(alice, 5, 6))["changed"], [])

        return defer.ensureDeferred(go())
