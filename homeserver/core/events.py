"""The event model: an immutable PDU plus its event id and room version.

``Pdu.data`` is the event exactly as it travels between servers (for rooms 3+
without ``event_id``); every other attribute is read from it, so there is one
source of truth and nothing to keep in sync. Callers must never mutate ``data``.
"""

from typing import Any

import attrs

from crypto.b64 import encode_base64
from crypto.hashes import reference_hash_of_redacted
from homeserver.core.redaction import redact_pdu
from homeserver.core.room_versions import EventIdFormat, RoomVersion

CREATE = "m.room.create"
MEMBER = "m.room.member"
POWER_LEVELS = "m.room.power_levels"
JOIN_RULES = "m.room.join_rules"
THIRD_PARTY_INVITE = "m.room.third_party_invite"
HISTORY_VISIBILITY = "m.room.history_visibility"
REDACTION = "m.room.redaction"
ALIASES = "m.room.aliases"

StateKey = tuple[str, str]  # (event type, state_key)


def reference_hash(data: dict[str, Any], room_version: RoomVersion) -> bytes:
    return reference_hash_of_redacted(redact_pdu(data, room_version))


def compute_event_id(data: dict[str, Any], room_version: RoomVersion) -> str:
    """The event id of a room-3+ PDU: "$" + base64 of its reference hash."""
    fmt = room_version.event_id_format
    if fmt is EventIdFormat.V1:
        return data["event_id"]
    return "$" + encode_base64(reference_hash(data, room_version), urlsafe=fmt is EventIdFormat.V3)


def room_id_from_create_event_id(create_event_id: str) -> str:
    """Room 12: the room id is the create event's id with "!" for "$"."""
    return "!" + create_event_id[1:]


def _event_ids(refs: Any) -> tuple[str, ...]:
    # Rooms 1-2 list [event_id, {hashes}] pairs; later versions list ids.
    if not isinstance(refs, list):
        return ()
    return tuple(r[0] if isinstance(r, list) and r else r for r in refs)


@attrs.frozen(slots=True, eq=False)
class Pdu:
    room_version: RoomVersion
    event_id: str
    data: dict[str, Any]
    # Set when this server has applied a redaction to the event: the
    # redaction's event id. ``data`` is then already the redacted form.
    redacted_because: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], room_version: RoomVersion) -> "Pdu":
        """Wrap a PDU dict, computing its event id for rooms 3+.

        Does not validate: run ``validation.check_pdu_format`` first on
        anything from outside.
        """
        return cls(room_version, compute_event_id(data, room_version), data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pdu) and other.event_id == self.event_id

    def __hash__(self) -> int:
        return hash(self.event_id)

    # --- fields -------------------------------------------------------------
    @property
    def type(self) -> str:
        return self.data["type"]

    @property
    def sender(self) -> str:
        return self.data["sender"]

    @property
    def room_id(self) -> str:
        """The room id; for a room-12 create event it derives from the event id."""
        room_id = self.data.get("room_id")
        if room_id is None and self.type == CREATE and self.room_version.room_id_is_create_event_hash:
            return room_id_from_create_event_id(self.event_id)
        return room_id

    @property
    def state_key(self) -> str | None:
        return self.data.get("state_key")

    @property
    def is_state(self) -> bool:
        return "state_key" in self.data

    @property
    def state_tuple(self) -> StateKey:
        return (self.data["type"], self.data["state_key"])

    @property
    def content(self) -> dict[str, Any]:
        return self.data.get("content", {})

    @property
    def depth(self) -> int:
        return self.data.get("depth", 0)

    @property
    def origin_server_ts(self) -> int:
        return self.data.get("origin_server_ts", 0)

    @property
    def prev_event_ids(self) -> tuple[str, ...]:
        return _event_ids(self.data.get("prev_events"))

    @property
    def auth_event_ids(self) -> tuple[str, ...]:
        return _event_ids(self.data.get("auth_events"))

    @property
    def membership(self) -> str | None:
        return self.content.get("membership") if self.type == MEMBER else None

    @property
    def redacts(self) -> str | None:
        """The redacted event id: in content from room 11, top level before."""
        if self.type != REDACTION:
            return None
        if self.room_version.redaction_rules.value >= 11:
            return self.content.get("redacts") or self.data.get("redacts")
        return self.data.get("redacts")

    @property
    def signatures(self) -> dict[str, dict[str, str]]:
        return self.data.get("signatures", {})

    def redacted(self) -> "Pdu":
        return Pdu(self.room_version, self.event_id, redact_pdu(self.data, self.room_version))

    def with_redacted_because(self, redaction_event_id: str) -> "Pdu":
        """The redacted form of this event, marked as redacted by that redaction."""
        return Pdu(
            self.room_version,
            self.event_id,
            redact_pdu(self.data, self.room_version),
            redaction_event_id,
        )

    def to_federation_json(self) -> dict[str, Any]:
        """The PDU as sent to other servers (rooms 1-2 carry event_id inside)."""
        return self.data
