"""End-to-end encryption keys: /keys/upload, query, claim, changes, cross-signing.

The work is in homeserver/services/e2e_keys.py (keys) and
homeserver/services/device_lists.py (/keys/changes).
"""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import keys as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import parse_body, query_arg
from homeserver.services.tokens import StreamToken

CLIENT = "/_matrix/client/(?:v3|r0)"
# Cross-signing was an unstable API first; older clients still use that prefix.
CLIENT_OR_UNSTABLE = "/_matrix/client/(?:v3|r0|unstable)"


def register_keys_resources(router: Any, hs: Any) -> None:
    async def upload_keys(request: Request) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request, allow_guest=True)
        body = parse_body(request, schemas.UPLOAD_KEYS)
        return 200, await hs.e2e_keys.upload_keys(who.user_id, who.device_id, body)

    async def query_keys(request: Request) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request, allow_guest=True)
        body = parse_body(request, schemas.QUERY_KEYS)
        return 200, await hs.e2e_keys.query_keys(who.user_id, body["device_keys"])

    async def claim_keys(request: Request) -> tuple[int, Any]:
        await hs.auth.get_requester(request, allow_guest=True)
        body = parse_body(request, schemas.CLAIM_KEYS)
        return 200, await hs.e2e_keys.claim_keys(body["one_time_keys"])

    async def key_changes(request: Request) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request, allow_guest=True)
        since = query_arg(request, "from")
        if not since:
            raise MatrixError("M_MISSING_PARAM", "Missing parameter: from")
        upto = query_arg(request, "to")
        start = StreamToken.parse(since)
        end = StreamToken.parse(upto) if upto else hs.sync.current_token()
        return 200, await hs.device_lists.changes_for(
            who.user_id,
            start.device_lists,
            end.device_lists,
            since_events=start.events,
            upto_events=end.events,
        )

    async def upload_cross_signing_keys(request: Request) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        body = parse_body(request, schemas.UPLOAD_CROSS_SIGNING_KEYS)
        await hs.e2e_keys.upload_cross_signing_keys(
            who.user_id, body, app_service=who.app_service_id is not None
        )
        return 200, {}

    async def upload_signatures(request: Request) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        body = parse_body(request, schemas.UPLOAD_SIGNATURES)
        return 200, await hs.e2e_keys.upload_signatures(who.user_id, body)

    router.register("POST", CLIENT + "/keys/upload", upload_keys)
    router.register("POST", CLIENT + "/keys/query", query_keys)
    router.register("POST", CLIENT + "/keys/claim", claim_keys)
    router.register("GET", CLIENT + "/keys/changes", key_changes)
    router.register(
        "POST", CLIENT_OR_UNSTABLE + "/keys/device_signing/upload", upload_cross_signing_keys
    )
    router.register("POST", CLIENT_OR_UNSTABLE + "/keys/signatures/upload", upload_signatures)
