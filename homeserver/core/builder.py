"""Building, hashing and signing a new local event.

Spec: server-server "Adding hashes and signatures to outgoing events" and the
room versions' event formats. The event is canonicalised exactly twice: once
for the content hash, once redacted - those redacted bytes are both what we
sign and the reference hash input that gives rooms 3+ their event id.
"""

import hashlib
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from crypto.b64 import encode_base64
from crypto.canonical_json import CanonicalJsonError, encode_canonical_json
from crypto.keys import ServerSigningKey
from homeserver.core.events import CREATE, REDACTION, Pdu, reference_hash
from homeserver.core.redaction import redact_pdu
from homeserver.core.room_versions import EventIdFormat, RoomVersion
from homeserver.core.signatures import signable_bytes
from homeserver.core.validation import (
    MAX_DEPTH_V6,
    EventFormatError,
    EventSizeError,
    check_pdu_size,
    size_with_members,
)

# Rooms 1-2: event id -> unpadded base64 sha256 *reference* hash of that event.
ReferenceHashLookup = Callable[[str], str]

_ALPHANUMERIC = string.ascii_letters + string.digits


def make_v1_event_id(server_name: str) -> str:
    """A fresh ``$opaque:server`` event id for rooms 1-2."""
    return "$" + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(18)) + ":" + server_name


def reference_hash_b64(pdu: Pdu) -> str:
    """What rooms 1-2 put beside an event id in prev_events/auth_events."""
    return encode_base64(reference_hash(pdu.data, pdu.room_version))


def _references(
    ids: Sequence[str], room_version: RoomVersion, hashes: ReferenceHashLookup | None
) -> list[Any]:
    if not room_version.event_id_in_pdu:
        return list(ids)
    if hashes is None:
        raise ValueError("rooms 1-2 need reference hashes for prev_events/auth_events")
    return [[event_id, {"sha256": hashes(event_id)}] for event_id in ids]


def build_event(
    room_version: RoomVersion,
    *,
    server_name: str,
    signing_key: ServerSigningKey,
    event_type: str,
    sender: str,
    content: Mapping[str, Any],
    room_id: str | None,
    prev_events: Sequence[str],
    auth_events: Sequence[str],
    depth: int,
    origin_server_ts: int,
    state_key: str | None = None,
    redacts: str | None = None,
    unsigned: Mapping[str, Any] | None = None,
    reference_hashes: ReferenceHashLookup | None = None,
    event_id: str | None = None,
) -> Pdu:
    """Return the hashed and signed PDU for a new event of ours.

    - ``room_id`` must be None for a room-12 create event (its id is derived
      from the event id) and given otherwise.
    - ``redacts``: top level in rooms 1-10; in ``content`` from room 11,
      where the format has no top-level ``redacts`` (Synapse does the same).
    - ``reference_hashes``: rooms 1-2 only, to build ``[id, {sha256}]`` pairs.
    - ``event_id``: rooms 1-2 only; generated when omitted.
    - ``depth`` is capped at 2**53-1, as the spec asks ("if the room's depth
      is already at the limit, the depth must be set to the limit"): the
      room 6+ limit, and the most canonical JSON can carry in any room.
    No ``origin`` key: no current PDU format has one.

    Raises ValueError for inconsistent arguments, EventSizeError if the
    result would break the size limits (other servers would drop it) and
    EventFormatError if the content is not canonical JSON (floats, say).
    """
    v12_create = room_version.room_id_is_create_event_hash and event_type == CREATE
    if v12_create:
        if room_id is not None:
            raise ValueError("a room-12 create event has no room_id")
    elif room_id is None:
        raise ValueError("room_id is required")
    if room_version.room_id_is_create_event_hash and room_id is not None:
        if "$" + room_id[1:] in auth_events:
            raise ValueError("room 12 events must not cite the create event")

    data: dict[str, Any] = {
        "type": event_type,
        "sender": sender,
        "content": dict(content),
        "prev_events": _references(prev_events, room_version, reference_hashes),
        "auth_events": _references(auth_events, room_version, reference_hashes),
        "depth": min(depth, MAX_DEPTH_V6),
        "origin_server_ts": origin_server_ts,
    }
    if room_id is not None:
        data["room_id"] = room_id
    if state_key is not None:
        data["state_key"] = state_key
    if redacts is not None:
        if event_type != REDACTION:
            raise ValueError("only m.room.redaction events redact")
        if room_version.redaction_rules.value >= 11:
            if data["content"].setdefault("redacts", redacts) != redacts:
                raise ValueError("content.redacts differs from redacts")
        else:
            data["redacts"] = redacts
    if room_version.event_id_in_pdu:
        data["event_id"] = event_id or make_v1_event_id(server_name)
    elif event_id is not None:
        raise ValueError("only rooms 1-2 carry an event_id")

    for name in ("type", "sender", "state_key", "room_id", "event_id"):
        value = data.get(name)
        if value is not None and len(value.encode("utf-8")) > 255:
            raise EventSizeError(f"{name} is longer than 255 bytes")

    try:
        hash_input = encode_canonical_json(data)
    except (CanonicalJsonError, UnicodeEncodeError) as e:
        raise EventFormatError(f"not canonical JSON: {e}") from e
    data["hashes"] = {"sha256": encode_base64(hashlib.sha256(hash_input).digest())}

    # redact_pdu keeps "hashes" and drops anything unsigned; the result has no
    # signatures yet, so it is the signing input and the reference hash input.
    signable = encode_canonical_json(redact_pdu(data, room_version), checked=True)
    signature = encode_base64(signing_key.signing_key.sign(signable).signature)
    data["signatures"] = {server_name: {signing_key.key_id: signature}}
    extra = {"hashes": data["hashes"], "signatures": data["signatures"]}
    if unsigned:
        data["unsigned"] = extra["unsigned"] = dict(unsigned)
    check_pdu_size(size_with_members(len(hash_input), extra))

    if room_version.event_id_format is EventIdFormat.V1:
        new_event_id = data["event_id"]
    else:
        new_event_id = "$" + encode_base64(
            hashlib.sha256(signable).digest(),
            urlsafe=room_version.event_id_format is EventIdFormat.V3,
        )
    return Pdu(room_version, new_event_id, data)


def countersign(pdu: Pdu, server_name: str, signing_key: ServerSigningKey) -> Pdu:
    """The PDU with our server's signature added (an invite we accept, a
    restricted join we authorise). The event id does not change: signatures
    are not part of the reference hash."""
    signature = encode_base64(
        signing_key.signing_key.sign(signable_bytes(pdu.data, pdu.room_version)).signature
    )
    signatures = {name: dict(sigs) for name, sigs in pdu.signatures.items()}
    signatures.setdefault(server_name, {})[signing_key.key_id] = signature
    return Pdu(pdu.room_version, pdu.event_id, {**pdu.data, "signatures": signatures})
