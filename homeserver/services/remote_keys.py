"""End-to-end keys of users on other servers, for our clients' /keys/query and /keys/claim.

Every server with users in a request is asked at once, over federation
(``POST /_matrix/federation/v1/user/keys/query`` and ``/user/keys/claim``).
A server that fails (unreachable, backing off, an error, a body that is not
an object) is named in the response's ``failures`` with ``{status, message}``
as Synapse reports it; the other servers' answers still count. A server
speaks only for the users it was asked about, all its own: anything else in
its answer is ignored.

Device lists are cached (in memory, LRU) for users who share a room with the
requester, because their server tells us of every change with an
``m.device_list_update`` or ``m.signing_key_update`` EDU
(``homeserver/services/federation_edus.py``). An update drops the entry, and a
query in flight at that moment does not store its answer, which may predate
the change. The EDUs' incremental contents (the ``prev_id`` chain) are not
applied: the next query asks the server again, which is always current. The
device lists of users sharing no room with the requester are asked for every
time, since nothing would tell us that they changed.
"""

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.internet import defer

from homeserver.services.caches import GenerationLru
from homeserver.services.federation_client import (
    FederationError,
    HttpResponseError,
    NotRetryingDestination,
)

logger = logging.getLogger(__name__)

QUERY_PATH = "/_matrix/federation/v1/user/keys/query"
CLAIM_PATH = "/_matrix/federation/v1/user/keys/claim"
TIMEOUT_S = 10.0  # per server, Synapse's default for a client's /keys/query and /keys/claim
CACHED_USERS = 10_000


@attrs.frozen
class RemoteUserKeys:
    """What a server said of one of its users: every device, and the public
    cross-signing keys (a user-signing key is never shown to other users)."""

    devices: dict[str, dict[str, Any]]  # device id -> device keys, as the server gave them
    master_key: dict[str, Any] | None = None
    self_signing_key: dict[str, Any] | None = None


def domain_of(user_id: str) -> str:
    return user_id.partition(":")[2]


def cross_signing_key(user_id: str, key: Any, usage: str) -> dict[str, Any] | None:
    """``key`` if it looks like ``user_id``'s cross-signing key for ``usage``."""
    if (
        isinstance(key, dict)
        and key.get("user_id") == user_id
        and isinstance(key.get("usage"), list)
        and usage in key["usage"]
        and isinstance(key.get("keys"), dict)
    ):
        return key
    return None


def _failure(error: FederationError) -> dict[str, Any]:
    """A server's failure as ``failures`` shows it."""
    if isinstance(error, NotRetryingDestination):
        return {"status": 503, "message": "Not ready for retry"}
    if isinstance(error, HttpResponseError) and error.status is not None:
        return {"status": error.status, "message": error.message}
    return {"status": 503, "message": error.message}


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _user_keys(user_id: str, body: dict[str, Any]) -> RemoteUserKeys:
    """``user_id``'s part of a /user/keys/query answer (device keys must name their device)."""
    devices = {
        device_id: keys
        for device_id, keys in _object(_object(body.get("device_keys")).get(user_id)).items()
        if isinstance(keys, dict)
        and keys.get("user_id") == user_id
        and keys.get("device_id") == device_id
    }
    return RemoteUserKeys(
        devices,
        cross_signing_key(user_id, _object(body.get("master_keys")).get(user_id), "master"),
        cross_signing_key(
            user_id, _object(body.get("self_signing_keys")).get(user_id), "self_signing"
        ),
    )


class RemoteKeys:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self._cache: GenerationLru[str, RemoteUserKeys] = GenerationLru(CACHED_USERS)

    # --- /keys/query ------------------------------------------------------------------------
    async def query(
        self, requester_id: str, query: Mapping[str, Iterable[str]], result: dict[str, Any]
    ) -> dict[str, Any]:
        """Add the users of ``query`` ({user: [device id, ...]}, empty for every
        device) to the /keys/query ``result``; return the failures, by server."""
        if not query:
            return {}
        cacheable = await self._room_mates(requester_id, query)
        found: dict[str, RemoteUserKeys] = {}
        for user_id in cacheable:
            cached = self._cache.get(user_id)
            if cached is not None:
                found[user_id] = cached
        failures: dict[str, Any] = {}

        async def ask(server: str, user_ids: list[str]) -> None:
            generations = {u: self._cache.generation(u) for u in user_ids}
            body = await self._post(
                server, QUERY_PATH, {"device_keys": {u: [] for u in user_ids}}, failures
            )
            if body is None:
                return
            for user_id in user_ids:
                keys = found[user_id] = _user_keys(user_id, body)
                if user_id in cacheable:
                    self._cache.put(user_id, generations[user_id], keys)

        await self._each_server([u for u in query if u not in found], ask)
        for user_id, keys in found.items():
            wanted = set(query[user_id])
            result["device_keys"][user_id] = {
                d: k for d, k in keys.devices.items() if not wanted or d in wanted
            }
            for field, key in (
                ("master_keys", keys.master_key),
                ("self_signing_keys", keys.self_signing_key),
            ):
                if key is not None:
                    result[field][user_id] = key
        return failures

    # --- /keys/claim ------------------------------------------------------------------------
    async def claim(
        self, query: Mapping[str, Mapping[str, str]], claimed: dict[str, Any]
    ) -> dict[str, Any]:
        """Claim the keys of ``query`` ({user: {device: algorithm}}) from their servers,
        into ``claimed`` ({user: {device: {key id: key}}}); return the failures, by server."""
        failures: dict[str, Any] = {}

        async def ask(server: str, user_ids: list[str]) -> None:
            asked = {u: dict(query[u]) for u in user_ids}
            body = await self._post(server, CLAIM_PATH, {"one_time_keys": asked}, failures)
            if body is None:
                return
            keys = _object(body.get("one_time_keys"))
            for user_id in user_ids:
                got = {
                    device_id: key
                    for device_id, key in _object(keys.get(user_id)).items()
                    if device_id in asked[user_id] and isinstance(key, dict)
                }
                if got:
                    claimed[user_id] = got

        await self._each_server(list(query), ask)
        return failures

    # --- what the EDUs change -----------------------------------------------------------------
    def on_device_list_update(self, user_id: str) -> None:
        """An m.device_list_update: the next query asks the user's server again."""
        self._cache.invalidate(user_id)

    def on_signing_key_update(self, user_id: str, master_key: Any, self_signing_key: Any) -> None:
        """An m.signing_key_update: a cached entry takes the new keys."""
        cached = self._cache.get(user_id)
        self._cache.invalidate(user_id)
        if cached is None:
            return
        updated = attrs.evolve(
            cached,
            master_key=cross_signing_key(user_id, master_key, "master") or cached.master_key,
            self_signing_key=cross_signing_key(user_id, self_signing_key, "self_signing")
            or cached.self_signing_key,
        )
        self._cache.put(user_id, self._cache.generation(user_id), updated)

    # --- helpers ------------------------------------------------------------------------------
    async def _room_mates(self, user_id: str, others: Iterable[str]) -> set[str]:
        """Those of ``others`` joined to a room ``user_id`` is joined to."""
        rooms = []
        for room_id, (membership, _, _) in list((await self.hs.user_rooms.get(user_id)).items()):
            room = await self.hs.room_states.get(room_id) if membership == "join" else None
            if room is not None:
                rooms.append(room.members)
        return {u for u in others if any(members.get(u) == "join" for members in rooms)}

    async def _post(
        self, server: str, path: str, content: dict[str, Any], failures: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The server's answer, or None with the failure recorded."""
        try:
            body = await self.hs.federation_client.post_json(
                server, path, content, timeout=TIMEOUT_S
            )
        except FederationError as e:
            logger.info("POST %s on %s failed: %s", path, server, e)
            failures[server] = _failure(e)
            return None
        if not isinstance(body, dict):
            logger.info("POST %s on %s: the answer is not an object", path, server)
            failures[server] = {"status": 502, "message": "The answer is not a JSON object"}
            return None
        return body

    @staticmethod
    async def _each_server(
        user_ids: Iterable[str], ask: Callable[[str, list[str]], Awaitable[None]]
    ) -> None:
        """``ask(server, its users)`` for every server at once."""
        by_server: dict[str, list[str]] = {}
        for user_id in user_ids:
            by_server.setdefault(domain_of(user_id), []).append(user_id)
        if by_server:
            await defer.gatherResults(
                [defer.ensureDeferred(ask(s, u)) for s, u in sorted(by_server.items())],
                consumeErrors=True,
            )
