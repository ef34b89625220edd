"""The account itself: whoami, password change, deactivation."""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import accounts as schemas
from homeserver.http.validation import parse_body

CLIENT = "/_matrix/client/(?:r0|v3)"


def register_account_resources(router: Any, hs: Any) -> None:
    async def whoami(request: Request) -> tuple[int, Any]:
        requester = await hs.auth.get_requester(request, allow_guest=True)
        body: dict[str, Any] = {"user_id": requester.user_id, "is_guest": requester.is_guest}
        if requester.device_id is not None:
            body["device_id"] = requester.device_id
        return 200, body

    async def change_password(request: Request) -> tuple[int, Any]:
        requester = await hs.auth.get_requester(request)
        body = parse_body(request, schemas.CHANGE_PASSWORD)
        result = await hs.uia.authenticate(
            operation="POST /account/password",
            auth=body.get("auth"),
            flows=await hs.accounts.password_flows(requester.user_id),
            user_id=requester.user_id,
        )
        await hs.accounts.change_password(
            requester, body["new_password"], body.get("logout_devices", True)
        )
        await hs.uia.finish(result.session_id)
        return 200, {}

    async def deactivate(request: Request) -> tuple[int, Any]:
        requester = await hs.auth.get_requester(request)
        body = parse_body(request, schemas.DEACTIVATE)
        if requester.app_service_id is None:
            result = await hs.uia.authenticate(
                operation="POST /account/deactivate",
                auth=body.get("auth"),
                flows=await hs.accounts.password_flows(requester.user_id),
                user_id=requester.user_id,
            )
            await hs.uia.finish(result.session_id)
        await hs.accounts.deactivate(requester.user_id, bool(body.get("erase", False)))
        return 200, {"id_server_unbind_result": "success"}

    router.register("GET", CLIENT + "/account/whoami", whoami)
    router.register("POST", CLIENT + "/account/password", change_password)
    router.register("POST", CLIENT + "/account/deactivate", deactivate)
