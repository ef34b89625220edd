"""User profiles: display names, avatars and other profile fields of local users.

Reads are served from an LRU of whole profiles (every join and invite asks
for the member's profile). A change is written to the database first, then
the cache, the user directory and every room the user is joined to see it:
a fresh ``m.room.member`` join event carrying the new ``displayname`` /
``avatar_url`` goes into each room (spec: "Events on Change of Profile
Information"). One user's changes are applied one at a time, so their rooms
end up with their latest profile whatever the interleaving of requests.

Profiles of users on other servers need federation (``/query/profile``),
which is not there yet; asking for one is a 404 that says so.
"""

import json
import logging
import re
from collections import OrderedDict
from typing import Any

import attrs
from twisted.internet import defer

from homeserver.core.events import MEMBER
from homeserver.errors import MatrixError
from homeserver.services.federation_client import FederationError
from homeserver.services.user_directory import UserDirectory
from storage.profiles import ProfileStore

logger = logging.getLogger(__name__)

CACHE_SIZE = 50_000
DISPLAYNAME = "displayname"
AVATAR_URL = "avatar_url"
TIMEZONE = "m.tz"
MAX_DISPLAYNAME_LENGTH = 256  # characters
MAX_AVATAR_URL_LENGTH = 1000  # characters
MAX_KEY_BYTES = 255  # spec: M_KEY_TOO_LARGE above this
MAX_PROFILE_BYTES = 64 * 1024  # spec: the whole profile MUST be under 64 KiB
# How many rooms a profile change is sent into at once.
PROPAGATION_CONCURRENCY = 16

# The spec's keyName grammar: the two classic fields, m.tz, or a namespaced key.
KEY_NAME = re.compile(r"^(avatar_url|displayname|m\.tz|[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+)$")
# mxc://<server name>/<media id>
MXC_URI = re.compile(r"^mxc://[A-Za-z0-9.\-:\[\]]+/[A-Za-z0-9_\-]+$")
# Content of an old join event that describes that join, not the user.
_NOT_CARRIED_OVER = ("reason", "join_authorised_via_users_server")


@attrs.frozen
class Profile:
    displayname: str | None = None
    avatar_url: str | None = None
    fields: dict[str, Any] = attrs.field(factory=dict)

    def standard(self) -> dict[str, str]:
        """displayname / avatar_url, only those that are set."""
        result = {}
        if self.displayname is not None:
            result[DISPLAYNAME] = self.displayname
        if self.avatar_url is not None:
            result[AVATAR_URL] = self.avatar_url
        return result

    def to_json(self) -> dict[str, Any]:
        """The whole profile as GET /profile/{userId} returns it."""
        return {**self.fields, **self.standard()}

    def get(self, key: str) -> Any:
        if key == DISPLAYNAME:
            return self.displayname
        if key == AVATAR_URL:
            return self.avatar_url
        return self.fields.get(key)

    def with_field(self, key: str, value: Any, delete: bool = False) -> "Profile":
        if key == DISPLAYNAME:
            return attrs.evolve(self, displayname=value)
        if key == AVATAR_URL:
            return attrs.evolve(self, avatar_url=value)
        fields = dict(self.fields)
        if delete:
            fields.pop(key, None)
        else:
            fields[key] = value
        return attrs.evolve(self, fields=fields)


def check_key_name(key: str) -> None:
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        # The spec's M_KEY_TOO_LARGE is not in the error table yet.
        raise MatrixError("M_TOO_LARGE", f"Profile keys are at most {MAX_KEY_BYTES} bytes", 400)
    if not KEY_NAME.match(key):
        raise MatrixError("M_INVALID_PARAM", f"Invalid profile key {key!r}")


def check_value(key: str, value: Any) -> Any:
    """The value to store for ``key`` (None clears displayname / avatar_url), or 400."""
    if key == DISPLAYNAME:
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise MatrixError("M_BAD_JSON", "displayname must be a string")
        if len(value) > MAX_DISPLAYNAME_LENGTH:
            raise MatrixError(
                "M_INVALID_PARAM", f"displayname is longer than {MAX_DISPLAYNAME_LENGTH} characters"
            )
        return value
    if key == AVATAR_URL:
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise MatrixError("M_BAD_JSON", "avatar_url must be a string")
        if len(value) > MAX_AVATAR_URL_LENGTH:
            raise MatrixError(
                "M_INVALID_PARAM", f"avatar_url is longer than {MAX_AVATAR_URL_LENGTH} characters"
            )
        if not MXC_URI.match(value):
            raise MatrixError("M_INVALID_PARAM", "avatar_url must be an mxc:// URI")
        return value
    if key == TIMEZONE and not isinstance(value, str):
        raise MatrixError("M_BAD_JSON", "m.tz must be a string")
    return value


class ProfileService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self.store = ProfileStore(hs.database)
        self._cache: OrderedDict[str, Profile] = OrderedDict()
        self._locks: dict[str, defer.DeferredLock] = {}
        self.directory = UserDirectory(self.store, hs.server_name, self)
        hs.persister.on_persisted.append(self.directory.on_persisted)

    def is_mine(self, user_id: str) -> bool:
        return user_id.endswith(":" + self.hs.server_name)

    # --- reading -----------------------------------------------------------------
    def invalidate(self, user_id: str) -> None:
        """Forget the cached profile (for code that writes ``users`` behind our back)."""
        self._cache.pop(user_id, None)

    def _cached(self, user_id: str) -> Profile | None:
        profile = self._cache.get(user_id)
        if profile is not None:
            self._cache.move_to_end(user_id)
        return profile

    def _remember(self, user_id: str, profile: Profile) -> None:
        self._cache[user_id] = profile
        self._cache.move_to_end(user_id)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    async def _load(self, user_id: str) -> Profile | None:
        """A local user's profile, or None if there is no such user."""
        profile = self._cached(user_id)
        if profile is not None:
            return profile
        stored = await self.store.get_profile(user_id)
        if stored is None:
            return None  # not cached: the user may register later
        newer = self._cache.get(user_id)
        if newer is not None:
            return newer  # a change committed while we were reading: it wins
        profile = Profile(stored.displayname, stored.avatar_url, stored.fields)
        self._remember(user_id, profile)
        return profile

    async def get_local_profile(self, user_id: str) -> dict[str, str]:
        """displayname / avatar_url of a local user, only the keys that are set.

        This is what goes into the user's m.room.member events.
        """
        profile = await self._load(user_id)
        return profile.standard() if profile is not None else {}

    def cached_standard_profile(self, user_id: str) -> tuple[str | None, str | None] | None:
        """(displayname, avatar_url) if the profile is in memory, else None."""
        profile = self._cache.get(user_id)
        return (profile.displayname, profile.avatar_url) if profile is not None else None

    async def get_standard_profile(self, user_id: str) -> tuple[str | None, str | None] | None:
        profile = await self._load(user_id)
        return (profile.displayname, profile.avatar_url) if profile is not None else None

    async def _require(self, user_id: str) -> Profile:
        if not self.is_mine(user_id):
            raise MatrixError(
                "M_NOT_FOUND",
                f"Profile of {user_id} not found: looking up users on other servers "
                "is not supported yet",
            )
        profile = await self._load(user_id)
        if profile is None:
            raise MatrixError("M_NOT_FOUND", "Profile not found")
        return profile

    async def get_profile(self, user_id: str) -> dict[str, Any]:
        """GET /profile/{userId}: every field that is set; 404 for unknown users.
        Users of other servers are looked up over federation."""
        if not self.is_mine(user_id):
            return await self._remote_profile(user_id, None)
        return (await self._require(user_id)).to_json()

    async def _remote_profile(self, user_id: str, field: str | None) -> dict[str, Any]:
        server = user_id.partition(":")[2]
        query = {"user_id": user_id} if field is None else {"user_id": user_id, "field": field}
        try:
            body = await self.hs.federation_client.get_json(
                server, "/_matrix/federation/v1/query/profile", query)
        except FederationError as e:
            raise e.to_matrix_error() from e
        if not isinstance(body, dict):
            raise MatrixError("M_UNKNOWN", f"{server} answered with a malformed profile", 502)
        return body

    async def get_profile_field(self, user_id: str, key: str) -> dict[str, Any]:
        """GET /profile/{userId}/{keyName}: ``{key: value}``; 404 when unset."""
        check_key_name(key)
        if not self.is_mine(user_id):
            remote = await self._remote_profile(user_id, key)
            if remote.get(key) is None:
                raise MatrixError("M_NOT_FOUND", f"{user_id} has no {key} set")
            return {key: remote[key]}
        profile = await self._require(user_id)
        value = profile.get(key)
        if value is None and key not in profile.fields:
            raise MatrixError("M_NOT_FOUND", f"{user_id} has no {key} set")
        return {key: value}

    # --- writing -----------------------------------------------------------------
    async def set_profile_field(self, requester: str, user_id: str, key: str, value: Any) -> None:
        """PUT /profile/{userId}/{keyName}; a null or empty displayname/avatar_url clears it."""
        check_key_name(key)
        await self._check_may_change(requester, user_id)
        value = check_value(key, value)
        await self._change(user_id, key, value, delete=False)

    async def delete_profile_field(self, requester: str, user_id: str, key: str) -> None:
        """DELETE /profile/{userId}/{keyName}: succeeds whether or not it was set."""
        check_key_name(key)
        await self._check_may_change(requester, user_id)
        await self._change(user_id, key, None, delete=True)

    async def set_displayname(self, requester: str, user_id: str, displayname: str | None) -> None:
        await self.set_profile_field(requester, user_id, DISPLAYNAME, displayname)

    async def set_avatar_url(self, requester: str, user_id: str, avatar_url: str | None) -> None:
        await self.set_profile_field(requester, user_id, AVATAR_URL, avatar_url)

    async def _check_may_change(self, requester: str, user_id: str) -> None:
        if requester != user_id:
            raise MatrixError("M_FORBIDDEN", "You may only change your own profile")
        if await self.hs.accounts.is_suspended(user_id):
            raise MatrixError("M_USER_SUSPENDED", "You cannot change your profile while suspended")

    def _lock_for(self, user_id: str) -> defer.DeferredLock:
        lock = self._locks.get(user_id)
        if lock is None:
            lock = self._locks[user_id] = defer.DeferredLock()
        return lock

    def _release(self, user_id: str, lock: defer.DeferredLock) -> None:
        lock.release()
        if not lock.locked and not lock.waiting:
            self._locks.pop(user_id, None)

    async def _change(self, user_id: str, key: str, value: Any, delete: bool) -> None:
        lock = self._lock_for(user_id)
        await lock.acquire()
        try:
            profile = await self._require(user_id)
            new = profile.with_field(key, value, delete)
            size = len(json.dumps(new.to_json(), ensure_ascii=False).encode("utf-8"))
            if size >= MAX_PROFILE_BYTES:
                # The spec's M_PROFILE_TOO_LARGE is not in the error table yet.
                raise MatrixError("M_TOO_LARGE", "The profile would be larger than 64 KiB", 400)
            if key in (DISPLAYNAME, AVATAR_URL):
                found = await self.store.set_standard_field(user_id, key, value)
            elif delete:
                await self.store.delete_custom_field(user_id, key)
                found = True
            else:
                found = await self.store.set_custom_field(user_id, key, value)
            if not found:
                self.invalidate(user_id)
                raise MatrixError("M_NOT_FOUND", "Profile not found")
            self._remember(user_id, new)
            if key in (DISPLAYNAME, AVATAR_URL):
                self.directory.on_local_profile_changed(user_id, new.displayname, new.avatar_url)
                await self._propagate(user_id, new)
        finally:
            self._release(user_id, lock)

    async def on_user_deactivated(self, user_id: str, erase: bool) -> None:
        """A deactivation hook (``hs.accounts.deactivation_hooks``): the user leaves
        the directory; an erased user's profile is cleared, in the rooms too."""
        self.directory.remove_user(user_id)
        if not erase:
            return
        lock = self._lock_for(user_id)
        await lock.acquire()
        try:
            await self.store.erase_profile(user_id)
            self._remember(user_id, Profile())
            await self._propagate(user_id, Profile())
        finally:
            self._release(user_id, lock)

    # --- propagation ----------------------------------------------------------------
    async def _propagate(self, user_id: str, profile: Profile) -> None:
        """Send a join event with the new profile into every room the user is in.

        A room that refuses it (or fails) is logged and skipped; the others
        still get theirs.
        """
        room_ids = await self.hs.events_store.get_rooms_for_user(user_id, "join")
        semaphore = defer.DeferredSemaphore(PROPAGATION_CONCURRENCY)
        await defer.gatherResults(
            [
                semaphore.run(
                    lambda r=room_id: defer.ensureDeferred(
                        self._update_member_event(user_id, r, profile)
                    )
                )
                for room_id in room_ids
            ],
            consumeErrors=True,
        )

    async def _update_member_event(self, user_id: str, room_id: str, profile: Profile) -> None:
        try:
            room = await self.hs.room_states.get(room_id)
            current = room.get(MEMBER, user_id) if room is not None else None
            if current is None or current.membership != "join":
                return
            content = {k: v for k, v in current.content.items() if k not in _NOT_CARRIED_OVER}
            for key, value in (
                (DISPLAYNAME, profile.displayname),
                (AVATAR_URL, profile.avatar_url),
            ):
                if value is None:
                    content.pop(key, None)
                else:
                    content[key] = value
            if content == current.content:
                return
            await self.hs.room_sender.send(user_id, room_id, MEMBER, content, state_key=user_id)
        except Exception:
            logger.exception("updating %s's profile in %s failed", user_id, room_id)

    # --- the user directory -------------------------------------------------------------
    async def search_user_directory(
        self, searcher: str, term: str, limit: int = 10
    ) -> dict[str, Any]:
        """POST /user_directory/search (see ``UserDirectory``)."""
        return await self.directory.search(searcher, term, limit)
