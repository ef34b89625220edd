"""Small rooms for auth-rule tests, built by hand (no builder.py, no signing).

Events get a real content hash and a placeholder signature from every server
that must sign (the auth rules never verify those); event ids are the real
reference hashes from room 3, ``$n:server`` in rooms 1-2.
"""

import itertools
from typing import Any

from crypto.b64 import encode_base64
from crypto.hashes import add_content_hash
from homeserver.core.auth_events import auth_state_keys
from homeserver.core.events import CREATE, MEMBER, POWER_LEVELS, Pdu
from homeserver.core.room_versions import get_room_version

ALICE = "@alice:a.example"  # the creator
BOB = "@bob:a.example"
CAROL = "@carol:b.example"
DAVE = "@dave:b.example"
EVE = "@eve:c.example"
USERS = (ALICE, BOB, CAROL, DAVE, EVE)

FAKE_SIGNATURE = encode_base64(bytes(64))
_counter = itertools.count(1)


def domain(matrix_id: str) -> str:
    return matrix_id.partition(":")[2]


class Room:
    """A room's state map plus a factory for events that cite it.

    ``put`` stores a state event without any auth check, so a test can set up
    any state it likes; ``make`` builds a candidate event against that state.
    """

    def __init__(
        self,
        version: str,
        creator: str = ALICE,
        *,
        create_content: dict[str, Any] | None = None,
        room_id: str | None = None,
    ) -> None:
        self.room_version = get_room_version(version)
        self.state: dict[tuple[str, str], Pdu] = {}
        content: dict[str, Any] = {"room_version": version}
        if not self.room_version.implicit_room_creator:
            content["creator"] = creator
        content.update(create_content or {})
        self.room_id = room_id or f"!room{next(_counter)}:{domain(creator)}"
        self.create = self.put(CREATE, creator, content, state_key="", prev_events=[])
        self.room_id = self.create.room_id

    # --- building events ----------------------------------------------------------
    def make(
        self,
        event_type: str,
        sender: str,
        content: dict[str, Any],
        state_key: str | None = None,
        *,
        prev_events: list[str] | None = None,
        auth_event_ids: list[str] | None = None,
        extra: dict[str, Any] | None = None,
        signers: tuple[str, ...] | None = None,
    ) -> Pdu:
        rv = self.room_version
        data: dict[str, Any] = {
            "type": event_type,
            "sender": sender,
            "content": content,
            "depth": len(self.state) + 1,
            "origin_server_ts": 1_700_000_000_000 + next(_counter),
        }
        if not (event_type == CREATE and rv.room_id_is_create_event_hash):
            data["room_id"] = self.room_id
        if state_key is not None:
            data["state_key"] = state_key
        if rv.event_id_in_pdu:
            data["event_id"] = f"${next(_counter)}:{domain(sender)}"
        if event_type != CREATE:
            if prev_events is None:
                prev_events = [self.last_event_id]
            if auth_event_ids is None:
                keys = auth_state_keys(rv, event_type, sender, state_key, content)
                auth_event_ids = [self.state[k].event_id for k in keys if k in self.state]
        data["prev_events"] = self._refs(prev_events or [])
        data["auth_events"] = self._refs(auth_event_ids or [])
        data.update(extra or {})
        data = add_content_hash(data)
        if signers is None:
            signers = (domain(sender),)
            authoriser = content.get("join_authorised_via_users_server")
            if type(authoriser) is str and ":" in authoriser:
                signers += (domain(authoriser),)
            if rv.event_id_in_pdu:
                signers += (domain(data["event_id"]),)
        data["signatures"] = {s: {"ed25519:k": FAKE_SIGNATURE} for s in signers}
        return Pdu.from_dict(data, rv)

    def _refs(self, event_ids: list[str]) -> list[Any]:
        if self.room_version.event_id_in_pdu:
            return [[e, {"sha256": encode_base64(bytes(32))}] for e in event_ids]
        return list(event_ids)

    def put(
        self,
        event_type: str,
        sender: str,
        content: dict[str, Any],
        state_key: str = "",
        **kwargs: Any,
    ) -> Pdu:
        """Build a state event and make it current, without checking it."""
        event = self.make(event_type, sender, content, state_key, **kwargs)
        self.state[(event_type, state_key)] = event
        self.last_event_id = event.event_id
        return event

    # --- shorthands -----------------------------------------------------------------
    def member(
        self,
        user_id: str,
        membership: str,
        sender: str | None = None,
        content: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Pdu:
        content = {"membership": membership, **(content or {})}
        return self.put(MEMBER, sender or user_id, content, user_id, **kwargs)

    def power_levels(self, content: dict[str, Any], sender: str | None = None) -> Pdu:
        """Set the power levels; in room 12 the creator is dropped from users
        (it may not be listed there), so tests can share one content."""
        users = content.get("users")
        if self.room_version.creators_have_infinite_power and isinstance(users, dict):
            content = {**content, "users": {u: v for u, v in users.items() if u != ALICE}}
        return self.put(POWER_LEVELS, sender or self.create.sender, content)

    def join_rule(self, rule: str, **content: Any) -> Pdu:
        return self.put("m.room.join_rules", self.create.sender, {"join_rule": rule, **content})

    def make_member(self, sender: str, target: str, membership: str, **kwargs: Any) -> Pdu:
        content = {"membership": membership, **kwargs.pop("content", {})}
        return self.make(MEMBER, sender, content, target, **kwargs)


def standard_room(version: str, *, join_rule: str = "invite", **kwargs: Any) -> Room:
    """Alice creates and joins; power levels give alice 100 and bob 50; join rule set."""
    room = Room(version, **kwargs)
    room.member(ALICE, "join", prev_events=[room.create.event_id])
    users = {BOB: 50}
    if not room.room_version.creators_have_infinite_power:
        users[ALICE] = 100
    room.power_levels({"users": users, "users_default": 0})
    room.join_rule(join_rule)
    room.member(BOB, "join")
    return room
