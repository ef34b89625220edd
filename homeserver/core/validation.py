"""Format checks on a PDU before anything else looks at it.

Spec: server-server "Checks performed on receipt of a PDU" step 1 (the event
must match its room version's format, i.e. the pdu_vN schemas), client-server
"Size limits", the appendix identifier grammar, and for room 6+ strict
canonical JSON. An event failing these is dropped, not rejected.
"""

from typing import Any

from crypto.canonical_json import CanonicalJsonError, encode_canonical_json
from homeserver.core.room_versions import RoomVersion

MAX_PDU_SIZE = 65536  # bytes of canonical JSON, signatures included
MAX_ID_SIZE = 255  # bytes: sender, room_id, state_key, type, event_id
MAX_PREV_EVENTS = 20
MAX_AUTH_EVENTS = 10
MAX_DEPTH_V1 = 2**63 - 1  # rooms 1-5
MAX_DEPTH_V6 = 2**53 - 1  # rooms 6+: canonical JSON range (components/depth_v6.yaml)

_CREATE = "m.room.create"


class EventFormatError(ValueError):
    """The PDU does not match the event format of its room version.

    ``rejectable`` is True when other servers (Synapse) accept the event and
    store it as *rejected* instead of dropping it: field sizes measured in
    bytes rather than code points in rooms 1-10. Dropping such an event would
    leave a hole in the DAG, so the caller may prefer to store it rejected.
    """

    def __init__(self, reason: str, *, rejectable: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.rejectable = rejectable


class EventSizeError(EventFormatError):
    """A size limit is broken: the whole event or one of the id-like fields
    (clients get M_TOO_LARGE for these)."""


def max_depth(room_version: RoomVersion) -> int:
    return MAX_DEPTH_V6 if room_version.strict_canonical_json else MAX_DEPTH_V1


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass; JSON true is not a number


def _lenient_byte_limits(room_version: RoomVersion) -> bool:
    # Rooms 1-10 (everything before the v11 redaction rules): Synapse long
    # measured these limits in code points and still stores such events.
    return room_version.redaction_rules.value < 11


def _check_id_size(name: str, value: str, room_version: RoomVersion) -> None:
    if len(value) > MAX_ID_SIZE:
        raise EventSizeError(f"{name} is longer than {MAX_ID_SIZE} characters")
    # Cheap pre-test: a string of n code points is at most 4n UTF-8 bytes.
    if len(value) * 4 > MAX_ID_SIZE and len(value.encode("utf-8", "surrogatepass")) > MAX_ID_SIZE:
        raise EventSizeError(
            f"{name} is longer than {MAX_ID_SIZE} bytes",
            rejectable=_lenient_byte_limits(room_version),
        )


def _check_server_id(name: str, value: Any, sigil: str, room_version: RoomVersion) -> None:
    """``sigil``localpart:domain - the domain is needed to check signatures.

    Historical user ids may have any localpart except ':' and NUL, so only
    the sigil and the presence of a domain are checked.
    """
    if type(value) is not str:
        raise EventFormatError(f"{name} must be a string")
    if not value.startswith(sigil) or ":" not in value or value.endswith(":"):
        raise EventFormatError(f"{name} {value[:80]!r} is not a {sigil}localpart:domain id")
    _check_id_size(name, value, room_version)


def _check_event_id_list(name: str, refs: Any, limit: int, room_version: RoomVersion) -> None:
    if type(refs) is not list:
        raise EventFormatError(f"{name} must be an array")
    if len(refs) > limit:
        raise EventFormatError(f"{name} has {len(refs)} entries, more than {limit}")
    pairs = room_version.event_id_in_pdu
    for ref in refs:
        if pairs:
            # Rooms 1-2: [event_id, {"sha256": reference hash}].
            if type(ref) is not list or len(ref) != 2:
                raise EventFormatError(f"{name} entries must be [event_id, hashes] pairs")
            ref, hashes = ref
            if type(hashes) is not dict or type(hashes.get("sha256")) is not str:
                raise EventFormatError(f"{name} entries need a sha256 reference hash")
        if type(ref) is not str:
            raise EventFormatError(f"{name} entries must be event id strings")
        _check_id_size(f"{name} entry", ref, room_version)


def _check_signatures(signatures: Any) -> None:
    if type(signatures) is not dict:
        raise EventFormatError("signatures must be an object")
    for by_server in signatures.values():
        if type(by_server) is not dict:
            raise EventFormatError("signatures must map server names to objects")
        for signature in by_server.values():
            if type(signature) is not str:
                raise EventFormatError("signatures must be strings")


def check_pdu_structure(data: Any, room_version: RoomVersion) -> None:
    """Every check except the whole-event size and canonical JSON ones.

    Split out so a receiver that canonicalises the event anyway (for the
    content hash) can add the size check without encoding twice; see
    ``check_pdu_size``.
    """
    if type(data) is not dict:
        raise EventFormatError("a PDU must be a JSON object")
    event_type = data.get("type")
    if type(event_type) is not str:
        raise EventFormatError("type must be a string")
    _check_id_size("type", event_type, room_version)
    _check_server_id("sender", data.get("sender"), "@", room_version)
    if "state_key" in data:
        state_key = data["state_key"]
        if type(state_key) is not str:
            raise EventFormatError("state_key must be a string")
        _check_id_size("state_key", state_key, room_version)

    room_id = data.get("room_id")
    if room_version.room_id_is_create_event_hash:
        # Room 12: "!" + the create event's hash; the create event itself has
        # none (whether it wrongly has one is auth rule 1.2, not a format issue).
        if room_id is None and event_type != _CREATE:
            raise EventFormatError("room_id is required")
        if room_id is not None and (type(room_id) is not str or not room_id.startswith("!")):
            raise EventFormatError("room_id must be a string starting with '!'")
        if room_id is not None:
            _check_id_size("room_id", room_id, room_version)
    else:
        _check_server_id("room_id", room_id, "!", room_version)

    if room_version.event_id_in_pdu:
        _check_server_id("event_id", data.get("event_id"), "$", room_version)
    elif "event_id" in data:
        # Not part of the room 3+ format, and it would change the reference
        # hash (redaction keeps it). Synapse drops such PDUs; so do we.
        raise EventFormatError("room 3+ PDUs must not carry an event_id")

    if type(data.get("content")) is not dict:
        raise EventFormatError("content must be an object")
    depth = data.get("depth")
    if not _is_int(depth):
        raise EventFormatError("depth must be an integer")
    if not 0 <= depth <= max_depth(room_version):
        raise EventFormatError(f"depth {depth} out of range")
    if not _is_int(data.get("origin_server_ts")):
        raise EventFormatError("origin_server_ts must be an integer")
    hashes = data.get("hashes")
    if type(hashes) is not dict or type(hashes.get("sha256")) is not str:
        raise EventFormatError("hashes must be an object with a sha256 string")
    _check_signatures(data.get("signatures"))
    if "unsigned" in data and type(data["unsigned"]) is not dict:
        raise EventFormatError("unsigned must be an object")
    _check_event_id_list("prev_events", data.get("prev_events"), MAX_PREV_EVENTS, room_version)
    _check_event_id_list("auth_events", data.get("auth_events"), MAX_AUTH_EVENTS, room_version)
    # Rooms 1-10 carry `redacts` at the top level (room 11 moved it to content).
    if (
        event_type == "m.room.redaction"
        and room_version.redaction_rules.value < 11
        and "redacts" in data
        and type(data["redacts"]) is not str
    ):
        raise EventFormatError("redacts must be an event id string")


def check_pdu_size(size: int) -> None:
    if size > MAX_PDU_SIZE:
        raise EventSizeError(f"event is {size} bytes, more than {MAX_PDU_SIZE}")


def canonical_size(data: dict[str, Any]) -> int:
    """Size in bytes of the PDU as canonical JSON; raises EventFormatError if
    it cannot be encoded (floats or out-of-range integers: strict canonical
    JSON, which room 6+ requires and which our encoder always applies)."""
    try:
        return len(encode_canonical_json(data))
    except (CanonicalJsonError, UnicodeEncodeError) as e:
        raise EventFormatError(f"not canonical JSON: {e}") from e


def size_with_members(base_size: int, extra: dict[str, Any]) -> int:
    """Canonical size of a non-empty object of ``base_size`` bytes once the
    members in ``extra`` are added: "{" + members joined by "," + "}", so
    each new member adds its bytes plus one comma wherever it sorts. Lets the
    content-hash bytes double as the size check."""
    if not extra:
        return base_size
    # len(encode(extra)) = 2 braces + members + (len(extra) - 1) commas.
    return base_size + len(encode_canonical_json(extra)) - 1


def check_pdu_format(data: Any, room_version: RoomVersion) -> None:
    """Raise EventFormatError unless ``data`` is a well-formed PDU for the version."""
    check_pdu_structure(data, room_version)
    check_pdu_size(canonical_size(data))
