"""The key endpoints: our own keys and the notary (spec "Retrieving server keys").

- ``GET /_matrix/key/v2/server``: our keys, self-signed.
- ``GET /_matrix/key/v2/query/{serverName}`` and ``POST /_matrix/key/v2/query``:
  other servers' key documents (fetched directly through the keyring when
  what we have is not valid long enough; cached ones when the server is
  unreachable), each with our signature added. Our own keys are answered
  from memory.

None of these is authenticated: servers ask for keys before they can check
anything.
"""

from typing import Any

from twisted.web.server import Request

from crypto.signing import sign_json
from crypto.xmatrix import is_valid_server_name
from homeserver.errors import MatrixError
from homeserver.http.server import parse_json_object

# A notary request makes us contact every server it names: keep it bounded.
MAX_SERVERS_PER_QUERY = 100
MAX_KEYS_PER_SERVER = 100


def _minimum(value: Any, default: int) -> int:
    return value if type(value) is int and value >= 0 else default


def register_key_resources(router: Any, hs: Any) -> None:
    async def server_keys(request: Request, key_id: str | None = None) -> tuple[int, Any]:
        # The key_id path segment is deprecated; the whole document is returned.
        return 200, hs.server_keys.key_response()

    def notarise(doc: dict[str, Any]) -> dict[str, Any]:
        if doc.get("server_name") == hs.server_name:
            return doc  # already signed by every key of ours
        for key in hs.server_keys.signing_keys:
            doc = sign_json(doc, hs.server_name, key)
        return doc

    async def documents(server_name: str, criteria: dict[str, int], minimum: int) -> list[Any]:
        if not is_valid_server_name(server_name):
            return []
        docs = await hs.keyring.key_documents_for_notary(server_name, criteria, minimum)
        return [notarise(d) for d in docs]

    async def query_one(request: Request, server_name: str) -> tuple[int, Any]:
        now = hs.clock.time_msec()
        raw = request.args.get(b"minimum_valid_until_ts", [b""])[0]
        try:
            minimum = int(raw) if raw else now
        except ValueError as e:
            raise MatrixError("M_INVALID_PARAM", "minimum_valid_until_ts must be an integer") from e
        return 200, {"server_keys": await documents(server_name, {}, minimum)}

    async def query_many(request: Request) -> tuple[int, Any]:
        body = parse_json_object(request)
        wanted = body.get("server_keys")
        if not isinstance(wanted, dict):
            raise MatrixError("M_BAD_JSON", "server_keys must be an object")
        if len(wanted) > MAX_SERVERS_PER_QUERY:
            raise MatrixError("M_LIMIT_EXCEEDED", "Too many servers in one query", 400)
        now = hs.clock.time_msec()
        result: list[Any] = []
        for server_name, keys in wanted.items():
            if not isinstance(keys, dict) or len(keys) > MAX_KEYS_PER_SERVER:
                raise MatrixError("M_BAD_JSON", f"bad key criteria for {server_name[:255]}")
            criteria = {
                key_id: _minimum(
                    c.get("minimum_valid_until_ts") if isinstance(c, dict) else None, now
                )
                for key_id, c in keys.items()
                if isinstance(key_id, str)
            }
            result.extend(await documents(server_name, criteria, now))
        return 200, {"server_keys": result}

    router.register("GET", r"/_matrix/key/v2/server(?:/(?P<key_id>[^/]*))?", server_keys)
    router.register("GET", r"/_matrix/key/v2/query/(?P<server_name>[^/]+)", query_one)
    router.register("POST", r"/_matrix/key/v2/query", query_many)
