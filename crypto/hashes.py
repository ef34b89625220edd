"""Content hashes of PDUs (spec "Calculating the content hash for an event")."""

import hashlib
from typing import Any

from crypto.b64 import decode_base64, encode_base64
from crypto.canonical_json import encode_canonical_json

_NOT_HASHED = frozenset({"unsigned", "signatures", "hashes"})


def content_hash(pdu: dict[str, Any]) -> bytes:
    """SHA-256 over the canonical JSON of the PDU without unsigned/signatures/hashes."""
    return hashlib.sha256(
        encode_canonical_json({k: v for k, v in pdu.items() if k not in _NOT_HASHED})
    ).digest()


def add_content_hash(pdu: dict[str, Any]) -> dict[str, Any]:
    return {**pdu, "hashes": {"sha256": encode_base64(content_hash(pdu))}}


def content_hash_matches(pdu: dict[str, Any]) -> bool:
    try:
        claimed = decode_base64(pdu["hashes"]["sha256"])
    except (KeyError, TypeError, ValueError):
        return False
    return claimed == content_hash(pdu)


def reference_hash_of_redacted(redacted_pdu: dict[str, Any]) -> bytes:
    """SHA-256 over an already-redacted PDU without signatures/unsigned/age_ts."""
    return hashlib.sha256(
        encode_canonical_json(
            {k: v for k, v in redacted_pdu.items() if k not in ("signatures", "unsigned", "age_ts")}
        )
    ).digest()
