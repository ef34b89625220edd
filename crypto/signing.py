"""Signing JSON objects (spec appendix "Signing JSON")."""

from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from crypto.b64 import Base64Error, decode_base64, encode_base64
from crypto.canonical_json import encode_canonical_json
from crypto.keys import ServerSigningKey


class SignatureError(ValueError):
    """A signature is missing or does not verify."""


def _signable_bytes(obj: dict[str, Any]) -> bytes:
    return encode_canonical_json(
        {k: v for k, v in obj.items() if k != "signatures" and k != "unsigned"}
    )


def compute_signature(obj: dict[str, Any], key: ServerSigningKey) -> str:
    return encode_base64(key.signing_key.sign(_signable_bytes(obj)).signature)


def sign_json(obj: dict[str, Any], signer: str, key: ServerSigningKey) -> dict[str, Any]:
    """Return a copy of ``obj`` with ``signer``'s signature added."""
    signature = compute_signature(obj, key)
    signatures = {name: dict(sigs) for name, sigs in obj.get("signatures", {}).items()}
    signatures.setdefault(signer, {})[key.key_id] = signature
    return {**obj, "signatures": signatures}


def verify_signature(
    obj: dict[str, Any], signer: str, key_id: str, verify_key: VerifyKey
) -> None:
    """Raise SignatureError unless ``obj`` carries a valid signature by ``signer``."""
    try:
        signature_b64 = obj["signatures"][signer][key_id]
    except (KeyError, TypeError) as e:
        raise SignatureError(f"no signature from {signer} with {key_id}") from e
    try:
        signature = decode_base64(signature_b64)
        verify_key.verify(_signable_bytes(obj), signature)
    except (Base64Error, BadSignatureError, ValueError, TypeError) as e:
        raise SignatureError(f"bad signature from {signer} with {key_id}") from e
