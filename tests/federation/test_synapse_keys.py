"""End-to-end keys with a real Synapse, through the client-server API only: each
side's /keys/query and /keys/claim for the other's user, and Synapse's device-list
and cross-signing updates reaching our user's /sync and our key cache.

Uses the servers and users of test_synapse_rooms.py (one room, version 12).
"""

import json
from typing import Any
from urllib.parse import urlencode

import pytest

from crypto.keys import ServerSigningKey, generate_signing_key
from crypto.signing import sign_json
from tests.federation.test_synapse_rooms import CLIENT, Pair, User, eventually, joined_room
from tests.support.synapse import client_call

pytestmark = pytest.mark.xdist_group("synapse-interop")

ALG = "signed_curve25519"


def upload_keys(user: User) -> dict[str, Any]:
    """Signed device keys and two one-time keys for the user's device; the uploads."""
    key = generate_signing_key(user.device_id)
    device_keys = sign_json(
        {
            "user_id": user.user_id,
            "device_id": user.device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                f"curve25519:{user.device_id}": "c" * 43,
                f"ed25519:{user.device_id}": key.public_key_base64,
            },
        },
        user.user_id,
        key,
    )
    one_time = {
        f"{ALG}:{name}": sign_json({"key": name * 43}, user.user_id, key) for name in ("AA", "BB")
    }
    user.ok("POST", "/keys/upload", {"device_keys": device_keys, "one_time_keys": one_time})
    return {"device_keys": device_keys, "one_time_keys": one_time}


def cross_signing_keys(user_id: str) -> dict[str, Any]:
    master, self_signing = (
        ServerSigningKey(k.public_key_base64, k.signing_key)
        for k in (generate_signing_key(), generate_signing_key())
    )

    def key(signing: ServerSigningKey, usage: str) -> dict[str, Any]:
        public = signing.public_key_base64
        return {"user_id": user_id, "usage": [usage], "keys": {f"ed25519:{public}": public}}

    return {
        "master_key": key(master, "master"),
        "self_signing_key": sign_json(key(self_signing, "self_signing"), user_id, master),
    }


class SecondDevice(User):
    """The same user logged in again: a new device (that does not sync)."""

    def __init__(self, user: User) -> None:
        body = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user.user_id},
            "password": "correct horse battery",
        }
        status, answer = client_call(user.server, "POST", CLIENT + "/login", None, body)
        assert status == 200, answer
        self.server, self.label = user.server, user.label
        self.user_id, self.token = answer["user_id"], answer["access_token"]
        self.device_id = answer["device_id"]


def query(user: User, other: User) -> dict[str, Any]:
    return user.ok("POST", "/keys/query", {"device_keys": {other.user_id: []}})


def device_lists_changed(user: User, since: str) -> list[str]:
    query_string = urlencode({"since": since, "timeout": "1000"})
    body = user.ok("GET", f"/sync?{query_string}")
    return (body.get("device_lists") or {}).get("changed") or []


@pytest.fixture
def keys_pair(synapse_server: Any, federating_server: Any) -> Pair:
    return Pair("syn_hosts", synapse_server, federating_server)


def test_keys_both_ways(keys_pair: Pair) -> None:
    pair = keys_pair
    joined_room(pair, "12")
    syn, ours = pair.syn, pair.ours
    uploaded = {syn.user_id: upload_keys(syn), ours.user_id: upload_keys(ours)}

    for asker, owner in ((ours, syn), (syn, ours)):
        answer = query(asker, owner)
        assert answer.get("failures") == {}, answer
        device = answer["device_keys"][owner.user_id][owner.device_id]
        expected = uploaded[owner.user_id]["device_keys"]
        assert device["keys"] == expected["keys"], answer
        assert device["signatures"] == expected["signatures"], answer

        body = {"one_time_keys": {owner.user_id: {owner.device_id: ALG}}}
        claimed = asker.ok("POST", "/keys/claim", body)
        assert claimed.get("failures") == {}, claimed
        [(key_id, key)] = claimed["one_time_keys"][owner.user_id][owner.device_id].items()
        assert uploaded[owner.user_id]["one_time_keys"][key_id] == key, claimed

    # Synapse's user logs in on a second device with keys: our user hears of it
    # (m.device_list_update), and our cached copy of the device list is dropped.
    since = ours.ok("GET", "/sync?timeout=0")["next_batch"]
    second = SecondDevice(syn)
    upload_keys(second)
    eventually(
        lambda: device_lists_changed(ours, since),
        lambda changed: syn.user_id in changed,
        f"{syn.user_id} in device_lists.changed",
    )
    eventually(
        lambda: query(ours, syn)["device_keys"].get(syn.user_id) or {},
        lambda devices: set(devices) == {syn.device_id, second.device_id},
        f"both devices of {syn.user_id}",
    )

    # New cross-signing keys (m.signing_key_update) show in our user's next query.
    keys = cross_signing_keys(syn.user_id)
    syn.ok("POST", "/keys/device_signing/upload", keys)
    answer = eventually(
        lambda: query(ours, syn),
        lambda a: syn.user_id in (a.get("master_keys") or {}),
        f"the master key of {syn.user_id}",
    )
    master = answer["master_keys"][syn.user_id]
    assert master["keys"] == keys["master_key"]["keys"], json.dumps(answer)
