"""Server-to-server signatures: the X-Matrix ``Authorization`` header and
checking that a JSON object (a request, a key response, an event) is signed
by a given server.

Spec: server-server API "Request Authentication" and appendix "Checking for a
signature". The request ``uri`` must be the request target exactly as sent on
the wire (path plus ``?query``, still percent-encoded), or signatures will not
match across implementations.
"""

import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from crypto.b64 import Base64Error, decode_base64, encode_base64
from crypto.canonical_json import CanonicalJsonError, encode_canonical_json
from crypto.keys import ALGORITHM, ServerSigningKey
from crypto.signing import SignatureError

# (server_name, key_id) -> the key, or None if unknown (or not valid when needed).
KeyLookup = Callable[[str, str], VerifyKey | None]

SCHEME = "X-Matrix"
_ALGORITHM_PREFIX = ALGORITHM + ":"


class XMatrixHeaderError(ValueError):
    """The Authorization header is not a well-formed X-Matrix header."""


@attrs.frozen
class XMatrixAuthorization:
    origin: str
    key_id: str
    signature: str
    destination: str | None = None  # optional on receipt for old senders


# --- building -----------------------------------------------------------------


def request_json(
    method: str, uri: str, origin: str, destination: str, content: Any = None
) -> dict[str, Any]:
    """The object whose signature goes in the header; ``content`` None = no body."""
    obj: dict[str, Any] = {
        "method": method,
        "uri": uri,
        "origin": origin,
        "destination": destination,
    }
    if content is not None:
        obj["content"] = content
    return obj


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_authorization(auth: XMatrixAuthorization) -> str:
    """Header value in the most compatible form: one space, lower-case names,
    quoted values, no whitespace around commas."""
    params = [("origin", auth.origin)]
    if auth.destination is not None:
        params.append(("destination", auth.destination))
    params += [("key", auth.key_id), ("sig", auth.signature)]
    return SCHEME + " " + ",".join(f"{name}={_quote(value)}" for name, value in params)


def sign_request(
    signing_key: ServerSigningKey,
    origin: str,
    destination: str,
    method: str,
    uri: str,
    content: Any = None,
) -> str:
    """Return the ``Authorization`` header value for an outgoing request."""
    signable = encode_canonical_json(request_json(method, uri, origin, destination, content))
    signature = encode_base64(signing_key.signing_key.sign(signable).signature)
    return format_authorization(
        XMatrixAuthorization(origin, signing_key.key_id, signature, destination)
    )


# --- parsing ------------------------------------------------------------------

# RFC 9110 token characters.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_WS = re.compile(r"[ \t]*")
# Unquoted values: a token, but leniently also ':' (the spec asks recipients
# to allow it), '/' and '=' (base64) - anything up to whitespace or a comma.
_BARE_VALUE = re.compile(r'[^\s,"\\]+')
_QUOTED_VALUE = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
# Appendix "Server Name": hostname [":" port]; hostname is a dns-name (which
# also covers IPv4 literals) or a bracketed IPv6 literal.
_SERVER_NAME = re.compile(r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,255})(?::[0-9]{1,5})?")


def is_valid_server_name(name: str) -> bool:
    return _SERVER_NAME.fullmatch(name) is not None


def parse_authorization_params(header: str) -> dict[str, str]:
    """Parse ``X-Matrix name=value, ...`` into {lower-cased name: value}.

    Names are case-insensitive, values may be quoted (with backslash escapes)
    or bare, whitespace is allowed around commas, empty list elements are
    skipped. Duplicate names are an error (RFC 9110 section 11.2).
    """
    header = header.strip(" \t")
    scheme = _TOKEN.match(header)
    if scheme is None or scheme.group().lower() != SCHEME.lower():
        raise XMatrixHeaderError("not an X-Matrix authorization header")
    pos = scheme.end()
    if pos < len(header) and header[pos] not in " \t":
        raise XMatrixHeaderError("expected whitespace after the scheme")
    params: dict[str, str] = {}
    end = len(header)
    while True:
        pos = _WS.match(header, pos).end()
        if pos == end:
            return params
        if header[pos] == ",":
            pos += 1
            continue
        name = _TOKEN.match(header, pos)
        if name is None:
            raise XMatrixHeaderError(f"expected a parameter name at offset {pos}")
        pos = _WS.match(header, name.end()).end()
        if pos == end or header[pos] != "=":
            raise XMatrixHeaderError(f"expected '=' after {name.group()!r}")
        pos = _WS.match(header, pos + 1).end()
        quoted = _QUOTED_VALUE.match(header, pos)
        if quoted is not None:
            value = _ESCAPE.sub(r"\1", quoted.group(1))
            pos = quoted.end()
        else:
            bare = _BARE_VALUE.match(header, pos)
            if bare is None:
                raise XMatrixHeaderError(f"bad value for {name.group()!r}")
            value = bare.group()
            pos = bare.end()
        key = name.group().lower()
        if key in params:
            raise XMatrixHeaderError(f"duplicate parameter {key!r}")
        params[key] = value
        pos = _WS.match(header, pos).end()
        if pos != end and header[pos] != ",":
            raise XMatrixHeaderError(f"expected ',' at offset {pos}")


def parse_authorization(header: str) -> XMatrixAuthorization:
    """Parse and check the parameters the spec requires (unknown ones ignored)."""
    params = parse_authorization_params(header)
    # The spec's parameter list says "signature" though every implementation
    # sends "sig"; accept the former only as a fallback.
    signature = params.get("sig", params.get("signature"))
    missing = [
        n
        for n, v in (
            ("origin", params.get("origin")),
            ("key", params.get("key")),
            ("sig", signature),
        )
        if not v
    ]
    if missing:
        raise XMatrixHeaderError("missing " + ", ".join(missing))
    # The origin becomes a key lookup (and maybe an HTTP request): refuse junk.
    for name in ("origin", "destination"):
        if name in params and not is_valid_server_name(params[name]):
            raise XMatrixHeaderError(f"{name} is not a valid server name")
    return XMatrixAuthorization(
        origin=params["origin"],
        key_id=params["key"],
        signature=signature,
        destination=params.get("destination"),
    )


# --- verifying ----------------------------------------------------------------


def verify_signature_bytes(signable: bytes, signature_b64: str, verify_key: VerifyKey) -> bool:
    """Check one unpadded-base64 ed25519 signature over ``signable``."""
    try:
        verify_key.verify(signable, decode_base64(signature_b64))
    except (Base64Error, BadSignatureError, ValueError, TypeError):
        return False
    return True


def verify_request(
    auth: XMatrixAuthorization,
    verify_key: VerifyKey,
    *,
    method: str,
    uri: str,
    our_server_name: str,
    content: Any = None,
) -> None:
    """Raise SignatureError unless ``auth`` signs this request to us.

    ``verify_key`` is the origin's key ``auth.key_id``; the caller looks it
    up. A header without ``destination`` is accepted (older senders) and the
    signature is then checked against our own name, as the sender meant it.
    """
    if auth.destination is not None and auth.destination != our_server_name:
        raise SignatureError(f"request is for {auth.destination}, not {our_server_name}")
    try:
        signable = encode_canonical_json(
            request_json(method, uri, auth.origin, our_server_name, content)
        )
    except (CanonicalJsonError, UnicodeEncodeError) as e:
        raise SignatureError(f"request body cannot be canonicalised: {e}") from e
    if not verify_signature_bytes(signable, auth.signature, verify_key):
        raise SignatureError(f"bad request signature from {auth.origin} with {auth.key_id}")


def check_server_signatures(
    signatures: Any, signable: bytes, server_name: str, key_lookup: KeyLookup
) -> None:
    """Appendix "Checking for a signature" for one server, bytes precomputed.

    ``signatures`` is the object's ``signatures`` member and ``signable`` the
    canonical JSON of the object without ``signatures``/``unsigned``. Only
    ed25519 keys count; keys ``key_lookup`` does not know are skipped; at
    least one known key must be present and every known key must verify.
    """
    ours = signatures.get(server_name) if isinstance(signatures, Mapping) else None
    if not isinstance(ours, Mapping):
        raise SignatureError(f"not signed by {server_name}")
    checked = False
    for key_id, signature in ours.items():
        if not isinstance(key_id, str) or not key_id.startswith(_ALGORITHM_PREFIX):
            continue
        verify_key = key_lookup(server_name, key_id)
        if verify_key is None:
            continue
        if not isinstance(signature, str) or not verify_signature_bytes(
            signable, signature, verify_key
        ):
            raise SignatureError(f"bad signature from {server_name} with {key_id}")
        checked = True
    if not checked:
        raise SignatureError(f"no known key of {server_name} signed this")


def check_signed_json(obj: Mapping[str, Any], server_name: str, key_lookup: KeyLookup) -> None:
    """Raise SignatureError unless ``obj`` is validly signed by ``server_name``."""
    try:
        signable = encode_canonical_json(
            {k: v for k, v in obj.items() if k != "signatures" and k != "unsigned"}
        )
    except (CanonicalJsonError, UnicodeEncodeError) as e:
        raise SignatureError(f"object cannot be canonicalised: {e}") from e
    check_server_signatures(obj.get("signatures"), signable, server_name, key_lookup)
