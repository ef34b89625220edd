"""Inbound transactions: ``PUT /_matrix/federation/v1/send/{txnId}``.

The body is ``{origin, origin_server_ts, pdus: [...], edus: [...]}``; the
answer lists each PDU's result (``{}`` or ``{"error": reason}``). A
malformed PDU or EDU is dropped with a logged reason and never fails the
transaction (``homeserver/services/federation_inbound.py``).
"""

from typing import Any

from twisted.web.server import Request

from federation.auth import authenticated
from homeserver.errors import MatrixError
from homeserver.http.server import parse_json_object

FEDERATION = "/_matrix/federation/v1"
SEGMENT = r"[^/]+"
MAX_PDUS = 50
MAX_EDUS = 100


def register_transaction_resources(router: Any, hs: Any) -> None:
    async def send_transaction(request: Request, origin: str, txn_id: str) -> tuple[int, Any]:
        body = parse_json_object(request)
        pdus = body.get("pdus", [])
        edus = body.get("edus", [])
        if not isinstance(pdus, list) or not isinstance(edus, list):
            raise MatrixError("M_BAD_JSON", "pdus and edus must be lists")
        if len(pdus) > MAX_PDUS or len(edus) > MAX_EDUS:
            raise MatrixError(
                "M_BAD_JSON", f"A transaction carries at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs"
            )
        results = await hs.federation_inbound.on_transaction(origin, txn_id, pdus, edus)
        return 200, {"pdus": results}

    router.register(
        "PUT", FEDERATION + f"/send/(?P<txn_id>{SEGMENT})", authenticated(hs, send_transaction)
    )
