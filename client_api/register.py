"""Registration: POST /register, GET /register/available, registration token validity."""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import accounts as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import parse_body, query_arg
from homeserver.services.auth import access_token_from_request

CLIENT = "/_matrix/client/(?:r0|v3)"


def register_registration_resources(router: Any, hs: Any) -> None:
    async def register(request: Request) -> tuple[int, Any]:
        body = parse_body(request, schemas.REGISTER)
        kind = query_arg(request, "kind", "user")
        if kind not in ("user", "guest"):
            raise MatrixError("M_INVALID_PARAM", "kind must be 'user' or 'guest'")
        return 200, await hs.accounts.register(
            body,
            kind=kind,
            ip=hs.auth.client_ip(request),
            user_agent=request.getHeader("User-Agent"),
            app_service=hs.auth.app_service_for_request(request),
            has_token=access_token_from_request(request) is not None,
        )

    async def available(request: Request) -> tuple[int, Any]:
        username = query_arg(request, "username")
        if not username:
            raise MatrixError("M_MISSING_PARAM", "Missing username")
        await hs.accounts.check_username_available(username, hs.auth.client_ip(request))
        return 200, {"available": True}

    async def token_validity(request: Request) -> tuple[int, Any]:
        token = query_arg(request, "token")
        if token is None:
            raise MatrixError("M_MISSING_PARAM", "Missing token")
        valid = await hs.accounts.registration_token_valid(token, hs.auth.client_ip(request))
        return 200, {"valid": valid}

    async def no_threepids(request: Request) -> tuple[int, Any]:
        raise MatrixError("M_THREEPID_DENIED", "Third-party identifiers are not supported")

    router.register("POST", CLIENT + "/register", register)
    router.register("GET", CLIENT + "/register/available", available)
    router.register(
        "GET", "/_matrix/client/v1/register/m.login.registration_token/validity", token_validity
    )
    for medium in ("email", "msisdn"):
        router.register("POST", CLIENT + f"/register/{medium}/requestToken", no_threepids)
        router.register("POST", CLIENT + f"/account/password/{medium}/requestToken", no_threepids)
