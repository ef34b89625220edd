"""Server administration.

- ``/_synapse/admin/v1/register``: Synapse's shared-secret registration (nonce
  + HMAC-SHA1), used by ``scripts/register_new_matrix_user``.
- ``/_synapse/admin/v1/registration_tokens``: Synapse's registration token API.
- ``/_matrix/client/v3/admin/whois/{userId}`` and the v1 lock / suspend endpoints.
"""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import accounts as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import parse_body, query_arg

CLIENT = "/_matrix/client/(?:r0|v3)"
SYNAPSE_ADMIN = "/_synapse/admin/v1"


def register_admin_resources(router: Any, hs: Any) -> None:
    async def require_admin(request: Request) -> Any:
        requester = await hs.auth.get_requester(request)
        if not await hs.auth.is_server_admin(requester.user_id):
            raise MatrixError("M_FORBIDDEN", "You are not a server admin")
        return requester

    # --- shared-secret registration -----------------------------------------------
    async def get_nonce(request: Request) -> tuple[int, Any]:
        return 200, {"nonce": hs.accounts.new_registration_nonce()}

    async def shared_secret_register(request: Request) -> tuple[int, Any]:
        body = parse_body(request, schemas.ADMIN_REGISTER)
        return 200, await hs.accounts.register_with_shared_secret(body)

    # --- registration tokens ------------------------------------------------------
    async def list_tokens(request: Request) -> tuple[int, Any]:
        await require_admin(request)
        valid = query_arg(request, "valid")
        if valid not in (None, "true", "false"):
            raise MatrixError("M_INVALID_PARAM", "valid must be true or false")
        tokens = await hs.accounts.list_registration_tokens(
            None if valid is None else valid == "true"
        )
        return 200, {"registration_tokens": [t.to_json() for t in tokens]}

    async def new_token(request: Request) -> tuple[int, Any]:
        await require_admin(request)
        body = parse_body(request, schemas.NEW_REGISTRATION_TOKEN)
        return 200, (await hs.accounts.create_registration_token(body)).to_json()

    async def get_token(request: Request, token: str) -> tuple[int, Any]:
        await require_admin(request)
        return 200, (await hs.accounts.get_registration_token(token)).to_json()

    async def update_token(request: Request, token: str) -> tuple[int, Any]:
        await require_admin(request)
        body = parse_body(request, schemas.UPDATE_REGISTRATION_TOKEN)
        return 200, (await hs.accounts.update_registration_token(token, body)).to_json()

    async def delete_token(request: Request, token: str) -> tuple[int, Any]:
        await require_admin(request)
        await hs.accounts.delete_registration_token(token)
        return 200, {}

    # --- client-server administration ----------------------------------------------
    async def whois(request: Request, user_id: str) -> tuple[int, Any]:
        requester = await hs.auth.get_requester(request)
        if requester.user_id != user_id and not await hs.auth.is_server_admin(requester.user_id):
            raise MatrixError("M_FORBIDDEN", "You may only look up yourself")
        if not hs.accounts.is_mine(user_id) or not await hs.accounts.user_exists(user_id):
            raise MatrixError("M_NOT_FOUND", "No such local user")
        return 200, await hs.accounts.whois(user_id)

    def moderation(field: str, schema: dict[str, Any], setter: str) -> tuple[Any, Any]:
        async def get_state(request: Request, user_id: str) -> tuple[int, Any]:
            await require_admin(request)
            user = await hs.accounts.moderation_target(user_id)
            return 200, {field: getattr(user, field)}

        async def set_state(request: Request, user_id: str) -> tuple[int, Any]:
            requester = await require_admin(request)
            body = parse_body(request, schema)
            if user_id == requester.user_id:
                raise MatrixError("M_FORBIDDEN", f"You cannot change your own {field} status")
            await hs.accounts.moderation_target(user_id)
            await getattr(hs.accounts, setter)(user_id, body[field])
            return 200, {field: body[field]}

        return get_state, set_state

    router.register("GET", SYNAPSE_ADMIN + "/register", get_nonce)
    router.register("POST", SYNAPSE_ADMIN + "/register", shared_secret_register)
    router.register("GET", SYNAPSE_ADMIN + "/registration_tokens", list_tokens)
    router.register("POST", SYNAPSE_ADMIN + "/registration_tokens/new", new_token)
    token_path = SYNAPSE_ADMIN + "/registration_tokens/(?P<token>[^/]+)"
    router.register("GET", token_path, get_token)
    router.register("PUT", token_path, update_token)
    router.register("DELETE", token_path, delete_token)
    router.register("GET", CLIENT + "/admin/whois/(?P<user_id>[^/]+)", whois)
    for field, schema, setter, path in (
        ("locked", schemas.ADMIN_LOCK, "set_locked", "lock"),
        ("suspended", schemas.ADMIN_SUSPEND, "set_suspended", "suspend"),
    ):
        get_state, set_state = moderation(field, schema, setter)
        route = f"/_matrix/client/v1/admin/{path}/(?P<user_id>[^/]+)"
        router.register("GET", route, get_state)
        router.register("PUT", route, set_state)
