"""PUT /sendToDevice/{eventType}/{txnId}: idempotent per (sender, device, txn id).

Messages for local users are stored until their devices sync; messages for
users on other servers are accepted and dropped until federation exists
(see homeserver/services/to_device.py).
"""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import ephemeral as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import parse_body

CLIENT = "/_matrix/client/(?:v3|r0)"
MAX_EVENT_TYPE_BYTES = 255


def register_to_device_resources(router: Any, hs: Any) -> None:
    async def send_to_device(request: Request, event_type: str, txn_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request, allow_guest=True)
        if not event_type or len(event_type.encode("utf-8")) > MAX_EVENT_TYPE_BYTES:
            raise MatrixError("M_INVALID_PARAM", "Invalid event type")
        body = parse_body(request, schemas.SEND_TO_DEVICE)
        # The transaction id is scoped to the device, or to the token without one.
        scope = who.device_id if who.device_id is not None else f"token:{who.access_token_hash}"
        await hs.to_device.send(who.user_id, scope, txn_id, event_type, body["messages"])
        return 200, {}

    router.register(
        "PUT", CLIENT + "/sendToDevice/(?P<event_type>[^/]+)/(?P<txn_id>[^/]+)", send_to_device
    )
