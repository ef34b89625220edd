"""Device management: list, get, rename, delete (one or many, behind UIA)."""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import accounts as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import parse_body

CLIENT = "/_matrix/client/(?:r0|v3)"
DEVICE = CLIENT + "/devices/(?P<device_id>[^/]+)"


def register_device_resources(router: Any, hs: Any) -> None:
    async def authenticate(requester: Any, operation: str, auth: Any) -> None:
        if requester.app_service_id is not None:
            return  # application services delete devices without UIA (spec v1.17)
        result = await hs.uia.authenticate(
            operation=operation,
            auth=auth,
            flows=await hs.accounts.password_flows(requester.user_id),
            user_id=requester.user_id,
        )
        await hs.uia.finish(result.session_id)

    async def list_devices(request: Request) -> tuple[int, Any]:
        requester = await hs.auth.get_requester(request)
        return 200, {"devices": await hs.accounts.get_devices(requester.user_id)}

    async def get_device(request: Request, device_id: str) -> tuple[int, Any]:
        requester = await hs.auth.get_requester(request)
        device = await hs.accounts.get_device(requester.user_id, device_id)
        if device is None:
            raise MatrixError("M_NOT_FOUND", "Unknown device")
        return 200, device

    async def update_device(request: Request, device_id: str) -> tuple[int, Any]:
        requester = await hs.auth.get_requester(request)
        body = parse_body(request, schemas.UPDATE_DEVICE)
        status = await hs.accounts.update_device(
            requester, device_id, body.get("display_name"), "display_name" in body
        )
        return status, {}

    async def delete_device(request: Request, device_id: str) -> tuple[int, Any]:
        requester = await hs.auth.get_requester(request)
        body = parse_body(request, schemas.DELETE_DEVICE)
        await authenticate(requester, f"DELETE /devices/{device_id}", body.get("auth"))
        await hs.accounts.delete_devices(requester.user_id, [device_id])
        return 200, {}

    async def delete_devices(request: Request) -> tuple[int, Any]:
        requester = await hs.auth.get_requester(request)
        body = parse_body(request, schemas.DELETE_DEVICES)
        await authenticate(requester, "POST /delete_devices", body.get("auth"))
        await hs.accounts.delete_devices(requester.user_id, list(dict.fromkeys(body["devices"])))
        return 200, {}

    router.register("GET", CLIENT + "/devices", list_devices)
    router.register("GET", DEVICE, get_device)
    router.register("PUT", DEVICE, update_device)
    router.register("DELETE", DEVICE, delete_device)
    router.register("POST", CLIENT + "/delete_devices", delete_devices)
