"""ed25519 signing keys and Synapse's key-file format.

A key file holds one key per line: ``ed25519 <version> <unpadded base64 seed>``,
so an operator can bring a Synapse ``*.signing.key`` unchanged.
"""

import secrets
from pathlib import Path

import attrs
from nacl.signing import SigningKey, VerifyKey

from crypto.b64 import decode_base64, encode_base64

ALGORITHM = "ed25519"


@attrs.frozen
class ServerSigningKey:
    version: str  # e.g. "a_AbCd"; the key id is "ed25519:<version>"
    signing_key: SigningKey

    @property
    def key_id(self) -> str:
        return f"{ALGORITHM}:{self.version}"

    @property
    def verify_key(self) -> VerifyKey:
        return self.signing_key.verify_key

    @property
    def public_key_base64(self) -> str:
        return encode_base64(bytes(self.verify_key))

    def to_line(self) -> str:
        return f"{ALGORITHM} {self.version} {encode_base64(bytes(self.signing_key))}"


def generate_signing_key(version: str | None = None) -> ServerSigningKey:
    if version is None:
        version = "a_" + encode_base64(secrets.token_bytes(3), urlsafe=True)
    return ServerSigningKey(version, SigningKey.generate())


def signing_key_from_seed(version: str, seed: bytes) -> ServerSigningKey:
    return ServerSigningKey(version, SigningKey(seed))


def parse_signing_keys(text: str) -> list[ServerSigningKey]:
    keys = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] != ALGORITHM:
            raise ValueError(f"line {lineno}: expected 'ed25519 <version> <seed>'")
        seed = decode_base64(parts[2])
        if len(seed) != 32:
            raise ValueError(f"line {lineno}: an ed25519 seed is 32 bytes")
        keys.append(signing_key_from_seed(parts[1], seed))
    return keys


def read_signing_keys(path: str | Path) -> list[ServerSigningKey]:
    keys = parse_signing_keys(Path(path).read_text())
    if not keys:
        raise ValueError(f"{path}: no signing key")
    return keys


def write_signing_keys(path: str | Path, keys: list[ServerSigningKey]) -> None:
    """Write keys in Synapse's format, readable only by the owner."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=False)
    path.write_text("".join(k.to_line() + "\n" for k in keys))


def decode_verify_key(key_base64: str) -> VerifyKey:
    return VerifyKey(decode_base64(key_base64))
