"""Profile endpoints: GET /profile/{userId} and GET/PUT/DELETE /profile/{userId}/{keyName}.

``keyName`` is ``displayname``, ``avatar_url``, ``m.tz`` or a namespaced
custom key (spec v1.16+). Reading needs no access token (the spec lists no
security for the GETs, and Synapse serves them openly by default); changing
needs one, for the user's own profile only.
"""

import re
from typing import Any

from twisted.web.server import Request

from client_api.schemas import profiles as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import parse_body
from homeserver.services.profiles import AVATAR_URL, DISPLAYNAME, TIMEZONE, check_key_name

CLIENT = "/_matrix/client/(?:v3|r0)"
PROFILE = CLIENT + "/profile/(?P<user_id>[^/]+)"

_USER_ID = re.compile(r"^@[^:]+:.+$")

BODY_SCHEMAS: dict[str, dict[str, Any]] = {
    DISPLAYNAME: schemas.SET_DISPLAYNAME,
    AVATAR_URL: schemas.SET_AVATAR_URL,
    TIMEZONE: schemas.SET_TIMEZONE,
}


def _check_user_id(user_id: str) -> None:
    if not _USER_ID.match(user_id):
        raise MatrixError("M_INVALID_PARAM", f"{user_id!r} is not a user id")


def register_profile_resources(router: Any, hs: Any) -> None:
    async def get_profile(request: Request, user_id: str) -> tuple[int, Any]:
        _check_user_id(user_id)
        return 200, await hs.profiles.get_profile(user_id)

    async def get_field(request: Request, user_id: str, key_name: str) -> tuple[int, Any]:
        _check_user_id(user_id)
        return 200, await hs.profiles.get_profile_field(user_id, key_name)

    async def put_field(request: Request, user_id: str, key_name: str) -> tuple[int, Any]:
        # Guests may change their display name and nothing else (guest access module).
        who = await hs.auth.get_requester(request, allow_guest=key_name == DISPLAYNAME)
        _check_user_id(user_id)
        check_key_name(key_name)
        body = parse_body(request, BODY_SCHEMAS.get(key_name, schemas.SET_PROFILE_FIELD))
        if key_name not in body:
            raise MatrixError("M_MISSING_PARAM", f"The body must have a {key_name!r} property")
        await hs.profiles.set_profile_field(who.user_id, user_id, key_name, body[key_name])
        return 200, {}

    async def delete_field(request: Request, user_id: str, key_name: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request, allow_guest=key_name == DISPLAYNAME)
        _check_user_id(user_id)
        await hs.profiles.delete_profile_field(who.user_id, user_id, key_name)
        return 200, {}

    router.register("GET", PROFILE, get_profile)
    field = PROFILE + "/(?P<key_name>[^/]+)"
    router.register("GET", field, get_field)
    router.register("PUT", field, put_field)
    router.register("DELETE", field, delete_field)
