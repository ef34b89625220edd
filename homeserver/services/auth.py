"""Who is making this request: access tokens, application services, client addresses.

Every authenticated request passes through ``Auth.get_requester``, so a token
seen once is answered from memory afterwards (an LRU keyed by the token's
SHA-256). Anything that revokes tokens (logout, device deletion, password
change, deactivation) invalidates the cache once its transaction has committed.
"""

import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet import defer

from homeserver.errors import MatrixError
from storage.accounts import AccountStore

logger = logging.getLogger(__name__)

TOKEN_CACHE_SIZE = 50_000
# How often devices' last-seen times and addresses are written to the database.
LAST_SEEN_FLUSH_SECONDS = 30.0


def hash_token(token: str) -> str:
    """The SHA-256 hex of a token: how access and login tokens are stored and cached."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@attrs.frozen
class Requester:
    user_id: str
    device_id: str | None
    is_guest: bool
    access_token_hash: str | None
    app_service_id: str | None = None


@attrs.frozen
class _CachedToken:
    user_id: str
    device_id: str | None
    is_guest: bool
    locked: bool


@attrs.frozen
class Namespace:
    exclusive: bool
    regex: re.Pattern[str]


@attrs.frozen
class ApplicationService:
    """One application service registration file (``app_service_config_files``)."""

    id: str
    url: str | None
    as_token: str
    hs_token: str
    sender: str  # full user id of sender_localpart
    users: tuple[Namespace, ...]
    aliases: tuple[Namespace, ...]
    rooms: tuple[Namespace, ...]
    rate_limited: bool
    receive_ephemeral: bool
    protocols: tuple[str, ...]

    def is_interested_in_user(self, user_id: str) -> bool:
        return user_id == self.sender or any(ns.regex.fullmatch(user_id) for ns in self.users)

    def is_exclusive_user(self, user_id: str) -> bool:
        return user_id == self.sender or any(
            ns.exclusive and ns.regex.fullmatch(user_id) for ns in self.users
        )

    def is_exclusive_alias(self, alias: str) -> bool:
        return any(ns.exclusive and ns.regex.fullmatch(alias) for ns in self.aliases)

    def is_exclusive_room(self, room_id: str) -> bool:
        return any(ns.exclusive and ns.regex.fullmatch(room_id) for ns in self.rooms)


class AppServiceConfigError(ValueError):
    pass


def _namespaces(path: str, value: Any, kind: str) -> tuple[Namespace, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise AppServiceConfigError(f"{path}: namespaces.{kind} must be a list")
    result = []
    for entry in value:
        if not isinstance(entry, dict) or not isinstance(entry.get("regex"), str):
            raise AppServiceConfigError(f"{path}: each namespaces.{kind} entry needs a regex")
        try:
            regex = re.compile(entry["regex"])
        except re.error as e:
            raise AppServiceConfigError(f"{path}: bad regex {entry['regex']!r}: {e}") from e
        result.append(Namespace(bool(entry.get("exclusive", False)), regex))
    return tuple(result)


def parse_app_service(path: str, data: Any, server_name: str) -> ApplicationService:
    if not isinstance(data, dict):
        raise AppServiceConfigError(f"{path}: not a YAML mapping")
    for key in ("id", "as_token", "hs_token", "sender_localpart"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise AppServiceConfigError(f"{path}: {key} must be a non-empty string")
    namespaces = data.get("namespaces") or {}
    if not isinstance(namespaces, dict):
        raise AppServiceConfigError(f"{path}: namespaces must be a mapping")
    url = data.get("url")
    if url is not None and not isinstance(url, str):
        raise AppServiceConfigError(f"{path}: url must be a string or null")
    return ApplicationService(
        id=data["id"],
        url=url,
        as_token=data["as_token"],
        hs_token=data["hs_token"],
        sender=f"@{data['sender_localpart']}:{server_name}",
        users=_namespaces(path, namespaces.get("users"), "users"),
        aliases=_namespaces(path, namespaces.get("aliases"), "aliases"),
        rooms=_namespaces(path, namespaces.get("rooms"), "rooms"),
        rate_limited=bool(data.get("rate_limited", True)),
        receive_ephemeral=bool(data.get("receive_ephemeral", False)),
        protocols=tuple(str(p) for p in data.get("protocols") or ()),
    )


def load_app_services(paths: Iterable[str], server_name: str) -> list[ApplicationService]:
    services: list[ApplicationService] = []
    seen_ids: set[str] = set()
    seen_tokens: set[str] = set()
    for path in paths:
        import yaml  # only at start-up, if at all (see lazy_modules.release_startup_modules)

        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise AppServiceConfigError(f"{path}: cannot read application service file: {e}") from e
        service = parse_app_service(path, data, server_name)
        if service.id in seen_ids or service.as_token in seen_tokens:
            raise AppServiceConfigError(f"{path}: duplicate application service id or as_token")
        seen_ids.add(service.id)
        seen_tokens.add(service.as_token)
        services.append(service)
    return services


def access_token_from_request(request: Any) -> str | None:
    """The token of ``Authorization: Bearer``, else the deprecated ``access_token`` parameter."""
    header = request.getHeader("Authorization")
    if header:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    values = request.args.get(b"access_token")
    if values and values[0]:
        return values[0].decode("utf-8", "replace")
    return None


class Auth:
    def __init__(self, hs: Any) -> None:
        self._hs = hs
        self._clock = hs.clock
        self.store = AccountStore(hs.database)
        self.server_name: str = hs.server_name
        # token hash -> owner, most recently used last
        self._cache: OrderedDict[str, _CachedToken] = OrderedDict()
        self._cache_by_user: dict[str, set[str]] = {}
        # Bumped on every invalidation: a lookup that raced one is not cached.
        self._generation = 0
        self.app_services = load_app_services(
            hs.config.get("app_service_config_files") or [], hs.server_name
        )
        self._app_services_by_token = {hash_token(s.as_token): s for s in self.app_services}
        self._known_app_service_users: set[str] = set()
        self._x_forwarded_ports = {
            listener["port"]
            for listener in hs.config.get("listeners") or []
            if listener.get("x_forwarded")
        }
        # (user_id, device_id) -> (ts, ip, user agent) not yet written
        self._last_seen: dict[tuple[str, str], tuple[int, str, str | None]] = {}
        self._last_flush_ms = self._clock.time_msec()
        self._flushing = False
        # No timer: a request arriving after LAST_SEEN_FLUSH_SECONDS starts a
        # flush, and shutdown flushes the rest.
        add_trigger = getattr(hs.reactor, "addSystemEventTrigger", None)
        if add_trigger is not None:
            add_trigger("before", "shutdown", self._flush_on_shutdown)

    # --- requests -------------------------------------------------------------------
    def client_ip(self, request: Any) -> str:
        """The client's address: X-Forwarded-For's first hop behind an x_forwarded listener."""
        if self._x_forwarded_ports and request.getHost().port in self._x_forwarded_ports:
            forwarded = request.getHeader("X-Forwarded-For")
            if forwarded:
                first = forwarded.split(",")[0].strip()
                if first:
                    return first
        return request.getClientAddress().host

    async def get_requester(
        self, request: Any, allow_guest: bool = False, allow_locked: bool = False
    ) -> Requester:
        """Authenticate the request's access token (or an application service's as_token).

        401 M_MISSING_TOKEN without a token, 401 M_UNKNOWN_TOKEN for an unknown
        or revoked one, 403 M_GUEST_ACCESS_FORBIDDEN for a guest where guests
        are not allowed, 401 M_USER_LOCKED for a locked account.
        """
        token = access_token_from_request(request)
        if token is None:
            raise MatrixError("M_MISSING_TOKEN", "Missing access token")
        token_hash = hash_token(token)
        service = self._app_services_by_token.get(token_hash)
        if service is not None:
            return await self._app_service_requester(request, service)
        cached = self._cache.get(token_hash)
        if cached is not None:
            self._cache.move_to_end(token_hash)
        else:
            generation = self._generation
            record = await self.store.get_access_token(token_hash)
            if record is None or record.deactivated:
                raise MatrixError("M_UNKNOWN_TOKEN", "Unrecognised access token", soft_logout=False)
            cached = _CachedToken(record.user_id, record.device_id, record.is_guest, record.locked)
            if generation == self._generation:
                self._cache_put(token_hash, cached)
        if cached.locked and not allow_locked:
            raise MatrixError("M_USER_LOCKED", "This account has been locked", soft_logout=True)
        if cached.is_guest and not allow_guest:
            raise MatrixError("M_GUEST_ACCESS_FORBIDDEN", "Guest access not allowed")
        if cached.device_id is not None:
            self._note_seen(request, cached.user_id, cached.device_id)
        return Requester(cached.user_id, cached.device_id, cached.is_guest, token_hash)

    async def get_optional_requester(
        self, request: Any, allow_guest: bool = False
    ) -> Requester | None:
        """Like ``get_requester`` but None when the request carries no token."""
        if access_token_from_request(request) is None:
            return None
        return await self.get_requester(request, allow_guest=allow_guest)

    async def _app_service_requester(self, request: Any, service: ApplicationService) -> Requester:
        values = request.args.get(b"user_id")
        user_id = values[0].decode("utf-8", "replace") if values else service.sender
        if user_id != service.sender:
            if not service.is_interested_in_user(user_id):
                raise MatrixError(
                    "M_FORBIDDEN", "Application service cannot masquerade as this user"
                )
            if user_id not in self._known_app_service_users:
                if not await self.store.user_exists(user_id):
                    raise MatrixError(
                        "M_FORBIDDEN", "Application service has not registered this user"
                    )
                self._known_app_service_users.add(user_id)
        elif user_id not in self._known_app_service_users:
            await self.store.ensure_user(user_id, self._clock.time_msec(), service.id)
            self._known_app_service_users.add(user_id)
        device_id = None
        values = request.args.get(b"device_id")
        if values:
            device_id = values[0].decode("utf-8", "replace")
            if await self.store.get_device(user_id, device_id) is None:
                raise MatrixError("M_FORBIDDEN", "Unknown device for this user")
        return Requester(user_id, device_id, False, None, service.id)

    def app_service_for_request(self, request: Any) -> ApplicationService | None:
        """The application service whose as_token the request carries, if any."""
        token = access_token_from_request(request)
        return None if token is None else self._app_services_by_token.get(hash_token(token))

    def app_service_by_id(self, service_id: str) -> ApplicationService | None:
        for service in self.app_services:
            if service.id == service_id:
                return service
        return None

    def exclusive_app_service_for_user(self, user_id: str) -> ApplicationService | None:
        for service in self.app_services:
            if service.is_exclusive_user(user_id):
                return service
        return None

    async def is_server_admin(self, user_id: str) -> bool:
        user = await self.store.get_user(user_id)
        return user is not None and user.is_admin and not user.deactivated

    # --- the token cache ------------------------------------------------------------
    def _cache_put(self, token_hash: str, entry: _CachedToken) -> None:
        self._cache[token_hash] = entry
        self._cache_by_user.setdefault(entry.user_id, set()).add(token_hash)
        while len(self._cache) > TOKEN_CACHE_SIZE:
            old_hash, old = self._cache.popitem(last=False)
            self._forget_index(old_hash, old.user_id)

    def _forget_index(self, token_hash: str, user_id: str) -> None:
        hashes = self._cache_by_user.get(user_id)
        if hashes is not None:
            hashes.discard(token_hash)
            if not hashes:
                del self._cache_by_user[user_id]

    def invalidate_token(self, token_hash: str) -> None:
        self._generation += 1
        entry = self._cache.pop(token_hash, None)
        if entry is not None:
            self._forget_index(token_hash, entry.user_id)

    def invalidate_user(self, user_id: str, keep_token_hash: str | None = None) -> None:
        """Forget the user's cached tokens (all but ``keep_token_hash``)."""
        self._generation += 1
        self._known_app_service_users.discard(user_id)
        for token_hash in list(self._cache_by_user.get(user_id, ())):
            if token_hash != keep_token_hash:
                self._cache.pop(token_hash, None)
                self._forget_index(token_hash, user_id)

    def invalidate_devices(self, user_id: str, device_ids: Iterable[str]) -> None:
        self._generation += 1
        devices = set(device_ids)
        for token_hash in list(self._cache_by_user.get(user_id, ())):
            entry = self._cache.get(token_hash)
            if entry is not None and entry.device_id in devices:
                del self._cache[token_hash]
                self._forget_index(token_hash, user_id)
        for device_id in devices:
            self._last_seen.pop((user_id, device_id), None)

    # --- last seen --------------------------------------------------------------------
    def _note_seen(self, request: Any, user_id: str, device_id: str) -> None:
        ua = request.getHeader("User-Agent")
        now = self._clock.time_msec()
        self._last_seen[(user_id, device_id)] = (
            now,
            self.client_ip(request),
            ua[:512] if ua else None,
        )
        if not self._flushing and now - self._last_flush_ms >= LAST_SEEN_FLUSH_SECONDS * 1000:
            defer.ensureDeferred(self._background_flush())

    def pending_last_seen(self, user_id: str, device_id: str) -> tuple[int, str, str | None] | None:
        """Last-seen data not yet written to the database."""
        return self._last_seen.get((user_id, device_id))

    async def flush_last_seen(self) -> None:
        """Write devices' last-seen times and addresses collected since the last flush."""
        self._last_flush_ms = self._clock.time_msec()
        if not self._last_seen:
            return
        batch, self._last_seen = self._last_seen, {}
        await self.store.update_last_seen(
            (user_id, device_id, ts, ip, ua) for (user_id, device_id), (ts, ip, ua) in batch.items()
        )

    async def _background_flush(self) -> None:
        self._flushing = True
        try:
            await self.flush_last_seen()
        except RuntimeError:  # the database is closing
            pass
        except Exception:
            logger.exception("failed to record devices' last-seen times")
        finally:
            self._flushing = False

    def _flush_on_shutdown(self) -> Any:
        d = defer.ensureDeferred(self.flush_last_seen())
        d.addErrback(lambda f: logger.warning("last-seen flush at shutdown failed: %s", f.value))
        return d
