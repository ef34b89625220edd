"""Push rules (GET /pushrules/, GET/PUT/DELETE /pushrules/global/{kind}/{ruleId},
.../enabled, .../actions) and GET /notifications."""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import push as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import parse_body, query_arg, query_int

CLIENT = "/_matrix/client/(?:v3|r0)"
RULE = CLIENT + "/pushrules/global/(?P<kind>[^/]+)/(?P<rule_id>[^/]+)"


def register_push_rule_resources(router: Any, hs: Any) -> None:
    async def get_all(request: Request) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        return 200, {"global": hs.push.ruleset(who.user_id)}

    async def get_global(request: Request) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        return 200, hs.push.ruleset(who.user_id)

    async def get_rule(request: Request, kind: str, rule_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        return 200, hs.push.get_rule(who.user_id, kind, rule_id)

    async def put_rule(request: Request, kind: str, rule_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        body = parse_body(request, schemas.SET_PUSH_RULE)
        await hs.push.set_rule(
            who.user_id,
            kind,
            rule_id,
            body,
            before=query_arg(request, "before"),
            after=query_arg(request, "after"),
        )
        return 200, {}

    async def delete_rule(request: Request, kind: str, rule_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        await hs.push.delete_rule(who.user_id, kind, rule_id)
        return 200, {}

    async def get_enabled(request: Request, kind: str, rule_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        return 200, {"enabled": hs.push.get_enabled(who.user_id, kind, rule_id)}

    async def put_enabled(request: Request, kind: str, rule_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        body = parse_body(request, schemas.SET_PUSH_RULE_ENABLED)
        await hs.push.set_enabled(who.user_id, kind, rule_id, body["enabled"])
        return 200, {}

    async def get_actions(request: Request, kind: str, rule_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        return 200, {"actions": hs.push.get_actions(who.user_id, kind, rule_id)}

    async def put_actions(request: Request, kind: str, rule_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        body = parse_body(request, schemas.SET_PUSH_RULE_ACTIONS)
        await hs.push.set_actions(who.user_id, kind, rule_id, body["actions"])
        return 200, {}

    async def notifications(request: Request) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        only = query_arg(request, "only")
        limit = query_int(request, "limit")
        if limit is not None and limit < 0:
            raise MatrixError("M_INVALID_PARAM", "limit must not be negative")
        return 200, await hs.push.notifications(
            who.user_id, query_arg(request, "from"), limit, only
        )

    r = router.register
    r("GET", CLIENT + "/pushrules/?", get_all)
    r("GET", CLIENT + "/pushrules/global/?", get_global)
    r("GET", RULE, get_rule)
    r("PUT", RULE, put_rule)
    r("DELETE", RULE, delete_rule)
    r("GET", RULE + "/enabled", get_enabled)
    r("PUT", RULE + "/enabled", put_enabled)
    r("GET", RULE + "/actions", get_actions)
    r("PUT", RULE + "/actions", put_actions)
    r("GET", CLIENT + "/notifications", notifications)
