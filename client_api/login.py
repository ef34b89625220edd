"""Sessions: GET/POST /login, POST /login/get_token, POST /logout, POST /logout/all."""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import accounts as schemas
from homeserver.http.validation import parse_body
from homeserver.services.auth import access_token_from_request

CLIENT = "/_matrix/client/(?:r0|v3)"


def register_login_resources(router: Any, hs: Any) -> None:
    async def login_flows(request: Request) -> tuple[int, Any]:
        return 200, {"flows": hs.accounts.login_flows()}

    async def login(request: Request) -> tuple[int, Any]:
        body = parse_body(request, schemas.LOGIN)
        return 200, await hs.accounts.login(
            body,
            ip=hs.auth.client_ip(request),
            user_agent=request.getHeader("User-Agent"),
            app_service=hs.auth.app_service_for_request(request),
            has_token=access_token_from_request(request) is not None,
        )

    async def get_login_token(request: Request) -> tuple[int, Any]:
        requester = await hs.auth.get_requester(request)
        body = parse_body(request, schemas.GET_LOGIN_TOKEN)
        result = await hs.uia.authenticate(
            operation="POST /login/get_token",
            auth=body.get("auth"),
            flows=await hs.accounts.password_flows(requester.user_id),
            user_id=requester.user_id,
        )
        await hs.uia.finish(result.session_id)
        return 200, await hs.accounts.create_login_token(requester.user_id)

    async def logout(request: Request) -> tuple[int, Any]:
        requester = await hs.auth.get_requester(request, allow_guest=True, allow_locked=True)
        await hs.accounts.logout(requester)
        return 200, {}

    async def logout_all(request: Request) -> tuple[int, Any]:
        requester = await hs.auth.get_requester(request, allow_guest=True, allow_locked=True)
        await hs.accounts.logout_all(requester)
        return 200, {}

    router.register("GET", CLIENT + "/login", login_flows)
    router.register("POST", CLIENT + "/login", login)
    router.register("POST", "/_matrix/client/v1/login/get_token", get_login_token)
    router.register("POST", CLIENT + "/logout", logout)
    router.register("POST", CLIENT + "/logout/all", logout_all)
