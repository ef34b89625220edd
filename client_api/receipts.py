"""Receipts and read markers: POST /rooms/{roomId}/receipt/{receiptType}/{eventId}
and POST /rooms/{roomId}/read_markers."""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import receipts as schemas
from homeserver.errors import MatrixError
from homeserver.http.server import parse_json_object
from homeserver.http.validation import parse_body, validate

ROOM = "/_matrix/client/(?:v3|r0)/rooms/(?P<room_id>[^/]+)"


def register_receipt_resources(router: Any, hs: Any) -> None:
    async def post_receipt(
        request: Request, room_id: str, receipt_type: str, event_id: str
    ) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        body = parse_json_object(request)
        # A null thread_id (matrix-nio sends one) is an unthreaded receipt, like none.
        thread_id = body.pop("thread_id", None)
        if thread_id is not None:
            if not isinstance(thread_id, str) or not thread_id:
                raise MatrixError("M_INVALID_PARAM", "thread_id field must be a non-empty string")
            body["thread_id"] = thread_id
        validate(body, schemas.RECEIPT)
        await hs.receipts.send_receipt(who.user_id, room_id, receipt_type, event_id, thread_id)
        return 200, {}

    async def read_markers(request: Request, room_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        body = parse_body(request, schemas.READ_MARKERS)
        await hs.receipts.set_read_markers(
            who.user_id,
            room_id,
            body.get("m.fully_read"),
            body.get("m.read"),
            body.get("m.read.private"),
        )
        return 200, {}

    router.register(
        "POST", ROOM + "/receipt/(?P<receipt_type>[^/]+)/(?P<event_id>[^/]+)", post_receipt
    )
    router.register("POST", ROOM + "/read_markers", read_markers)
