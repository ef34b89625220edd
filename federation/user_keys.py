"""End-to-end keys of our users, for other servers (all X-Matrix authenticated).

- ``GET /_matrix/federation/v1/user/devices/{userId}``: a local user's devices,
  their keys and the public cross-signing keys (400 for other servers' users);
- ``POST /_matrix/federation/v1/user/keys/query``: device keys and public
  cross-signing keys, with the signatures by their owners;
- ``POST /_matrix/federation/v1/user/keys/claim``: one one-time key per device
  (the fallback key once none is left), each handed out once.

Users of other servers in a query or claim are left out of the answer. The
answers are ``homeserver/services/e2e_keys.py``'s, as for our clients.
"""

from typing import Any

from twisted.web.server import Request

from federation.auth import authenticated
from homeserver.errors import MatrixError
from homeserver.http.validation import parse_body

FEDERATION = "/_matrix/federation/v1"
_STRINGS = {"type": "array", "items": {"type": "string"}}
QUERY = {
    "type": "object",
    "required": ["device_keys"],
    "properties": {"device_keys": {"type": "object", "additionalProperties": _STRINGS}},
}
CLAIM = {
    "type": "object",
    "required": ["one_time_keys"],
    "properties": {
        "one_time_keys": {
            "type": "object",
            "additionalProperties": {"type": "object", "additionalProperties": {"type": "string"}},
        }
    },
}


def register_user_key_resources(router: Any, hs: Any) -> None:
    async def user_devices(request: Request, origin: str, user_id: str) -> tuple[int, Any]:
        if not hs.e2e_keys.is_mine(user_id):
            raise MatrixError("M_INVALID_PARAM", "User is not local to this server")
        return 200, await hs.e2e_keys.user_devices(user_id)

    async def query_keys(request: Request, origin: str) -> tuple[int, Any]:
        body = parse_body(request, QUERY)
        return 200, await hs.e2e_keys.query_local_devices(body["device_keys"])

    async def claim_keys(request: Request, origin: str) -> tuple[int, Any]:
        body = parse_body(request, CLAIM)
        return 200, {"one_time_keys": await hs.e2e_keys.claim_local_keys(body["one_time_keys"])}

    r = router.register
    r("GET", FEDERATION + "/user/devices/(?P<user_id>[^/]+)", authenticated(hs, user_devices))
    r("POST", FEDERATION + "/user/keys/query", authenticated(hs, query_keys))
    r("POST", FEDERATION + "/user/keys/claim", authenticated(hs, claim_keys))
