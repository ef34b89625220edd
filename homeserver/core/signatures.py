"""Which servers must sign a PDU, and checking its signatures and content hash.

Spec: server-server "Validating hashes and signatures on received events" and
the room versions' signing requirements. Keys come from the caller through
``key_lookup(server_name, key_id) -> VerifyKey | None`` so this stays pure;
for rooms 5+ the lookup must only return keys valid at ``key_validity_ts``.
"""

import hashlib
from typing import Any

from crypto.b64 import decode_base64, encode_base64
from crypto.canonical_json import CanonicalJsonError, encode_canonical_json
from crypto.signing import SignatureError
from crypto.xmatrix import KeyLookup, check_server_signatures
from homeserver.core.events import MEMBER, Pdu
from homeserver.core.redaction import redact_pdu
from homeserver.core.room_versions import EventIdFormat, RoomVersion
from homeserver.core.validation import (
    EventFormatError,
    check_pdu_size,
    check_pdu_structure,
    size_with_members,
)

__all__ = [
    "KeyLookup",
    "SignatureError",
    "content_hash_matches",
    "key_validity_ts",
    "must_redact",
    "required_signers",
    "server_name_of",
    "signable_bytes",
    "verify_pdu_signatures",
    "verify_received_pdu",
]

AUTHORISING_USER = "join_authorised_via_users_server"
_NOT_HASHED = ("hashes", "signatures", "unsigned")


def server_name_of(identifier: str) -> str:
    """The domain of ``@user:domain``, ``$event:domain`` ... (after the first ':',
    since historical localparts never contain one)."""
    _, sep, domain = identifier.partition(":")
    if not sep or not domain:
        raise ValueError(f"{identifier[:80]!r} has no server name")
    return domain


def _is_third_party_invite(data: dict[str, Any]) -> bool:
    content = data.get("content")
    return (
        data.get("type") == MEMBER
        and isinstance(content, dict)
        and content.get("membership") == "invite"
        and "third_party_invite" in content
    )


def required_signers(data: dict[str, Any], room_version: RoomVersion) -> set[str]:
    """Server names whose signatures the PDU must carry.

    - the sender's server, except for an invite made from a third-party
      invite: that may be sent by another server (the auth rules tie it to
      the m.room.third_party_invite sender instead);
    - rooms 1-2: also the server in the event id;
    - rooms 8+: for a join with ``join_authorised_via_users_server``, that
      user's server (the restricted-join auth rules depend on it).

    Raises SignatureError if a needed server name cannot be determined.
    """
    try:
        servers = set()
        if not _is_third_party_invite(data):
            servers.add(server_name_of(data["sender"]))
        if room_version.event_id_format is EventIdFormat.V1:
            servers.add(server_name_of(data["event_id"]))
        content = data.get("content")
        if (
            room_version.restricted_join_rule
            and data.get("type") == MEMBER
            and isinstance(content, dict)
            and content.get("membership") == "join"
            and AUTHORISING_USER in content
        ):
            servers.add(server_name_of(content[AUTHORISING_USER]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SignatureError(f"cannot tell which servers must sign: {e}") from e
    return servers


def key_validity_ts(pdu: Pdu) -> int:
    """The time a signing key must be valid at (rooms 5+), else 0 (any key)."""
    return pdu.origin_server_ts if pdu.room_version.enforce_key_validity else 0


def signable_bytes(data: dict[str, Any], room_version: RoomVersion) -> bytes:
    """What event signatures cover: canonical JSON of the redacted event
    without signatures/unsigned - also exactly the reference hash input."""
    redacted = redact_pdu(data, room_version)
    redacted.pop("signatures", None)
    redacted.pop("unsigned", None)
    return encode_canonical_json(redacted)


def verify_pdu_signatures(
    pdu: Pdu, key_lookup: KeyLookup, *, signable: bytes | None = None
) -> None:
    """Raise SignatureError unless every required server signed the PDU.

    Works on the full event or a redacted copy alike. ``signable`` may be
    passed if the caller already has the redacted canonical bytes.
    """
    servers = required_signers(pdu.data, pdu.room_version)
    if not servers:
        return
    if signable is None:
        try:
            signable = signable_bytes(pdu.data, pdu.room_version)
        except (CanonicalJsonError, UnicodeEncodeError) as e:
            raise SignatureError(f"event cannot be canonicalised: {e}") from e
    signatures = pdu.data.get("signatures")
    for server in sorted(servers):
        check_server_signatures(signatures, signable, server, key_lookup)


def content_hash_matches(pdu: Pdu) -> bool:
    """Whether the PDU's ``hashes.sha256`` is the hash of its full content."""
    data = pdu.data
    try:
        claimed = decode_base64(data["hashes"]["sha256"])
        actual = hashlib.sha256(
            encode_canonical_json({k: v for k, v in data.items() if k not in _NOT_HASHED})
        ).digest()
    except (KeyError, TypeError, ValueError):
        return False
    return claimed == actual


def must_redact(pdu: Pdu) -> bool:
    """Receipt step 3: a PDU failing the hash check is processed redacted."""
    return not content_hash_matches(pdu)


def verify_received_pdu(
    data: Any, room_version: RoomVersion, key_lookup: KeyLookup
) -> tuple[Pdu, bool]:
    """Steps 1-3 of "Checks performed on receipt of a PDU", canonicalising twice.

    Returns ``(pdu, hash_ok)``; when the content hash fails, ``pdu`` is the
    redacted copy the spec says to use instead. Raises EventFormatError
    (step 1) or SignatureError (step 2): either way the event is dropped.
    """
    check_pdu_structure(data, room_version)
    unhashed = {k: v for k, v in data.items() if k not in _NOT_HASHED}
    try:
        hash_input = encode_canonical_json(unhashed)
        signable = signable_bytes(data, room_version)
    except (CanonicalJsonError, UnicodeEncodeError) as e:
        raise EventFormatError(f"not canonical JSON: {e}") from e
    check_pdu_size(
        size_with_members(len(hash_input), {k: data[k] for k in _NOT_HASHED if k in data})
    )

    if room_version.event_id_format is EventIdFormat.V1:
        event_id = data["event_id"]
    else:
        reference = hashlib.sha256(signable).digest()
        event_id = "$" + encode_base64(
            reference, urlsafe=room_version.event_id_format is EventIdFormat.V3
        )
    pdu = Pdu(room_version, event_id, data)
    verify_pdu_signatures(pdu, key_lookup, signable=signable)

    try:
        hash_ok = decode_base64(data["hashes"]["sha256"]) == hashlib.sha256(hash_input).digest()
    except ValueError:
        hash_ok = False
    return (pdu if hash_ok else pdu.redacted()), hash_ok
