"""The user directory: searching for users by user id and display name.

Who can be found (Synapse's default, ``search_all_users: false``): users who
share a joined room with the searcher, and users joined to a room whose join
rule is ``public`` or whose history is ``world_readable``. Users in no room
are never found; searchers find themselves only through a public room.

How: an in-memory index, loaded from the database on the first search and
then kept current from the stream of committed events (the persister's
``on_persisted`` hook), so a search never touches the database:

- ``_user_rooms`` / ``_room_users``: joined memberships, both ways round;
- ``_public``: rooms that make their members visible to everyone;
- ``_profiles``: display name and avatar of every indexed user. For local
  users that is their global profile (the profile service reports changes),
  never a per-room nickname; for remote users it is their latest join event.

Events committed while the index loads are queued and replayed on top of the
loaded snapshot (replaying is idempotent and in stream order, so the result
is the state after the last event). A search scans every indexed user once
(case-insensitive substring match on a precomputed lower-cased text), then
checks visibility for the matches only: linear in the number of users joined
to any room, which is fine for tens of thousands of users without a search
engine. Memory is one entry per joined membership plus one per user.

Membership is taken from the events themselves in stream order, which is the
room's current state for events this server creates. When federation can
change a room's state in other ways (state resolution), it calls
``resync_room`` with the room's new current state.
"""

import logging
import unicodedata
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer

from homeserver.core.events import HISTORY_VISIBILITY, JOIN_RULES, MEMBER, Pdu
from storage.events import EventToPersist
from storage.profiles import DirectorySnapshot, ProfileStore

logger = logging.getLogger(__name__)

MAX_LIMIT = 1000

_NOT_LOADED, _LOADING, _LOADED = range(3)


def fold(text: str) -> str:
    """The form search text and terms are compared in: NFKC, case-folded."""
    return unicodedata.normalize("NFKC", text).casefold()


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class UserDirectory:
    def __init__(self, store: ProfileStore, server_name: str, profiles: Any) -> None:
        """``profiles`` is the profile service: ``cached_standard_profile(user_id)``
        and ``get_standard_profile(user_id)`` give a local user's (displayname,
        avatar_url), from memory only and from anywhere respectively."""
        self._store = store
        self._profile_service = profiles
        self._local_suffix = ":" + server_name
        self._user_rooms: dict[str, set[str]] = {}
        self._room_users: dict[str, set[str]] = {}
        self._join_rules: dict[str, str] = {}
        self._history: dict[str, str] = {}
        self._public: set[str] = set()
        # user -> (displayname, avatar_url, folded search text)
        self._profiles: dict[str, tuple[str | None, str | None, str]] = {}
        # Deactivated local users: never listed, whatever rooms they are still in.
        self._hidden: set[str] = set()
        self._state = _NOT_LOADED
        # While loading: committed events (Pdu) and profile changes (tuples) to replay.
        self._queued: list[Pdu | tuple[str, str | None, str | None]] = []
        self._waiters: list[defer.Deferred[None]] = []

    def is_local(self, user_id: str) -> bool:
        return user_id.endswith(self._local_suffix)

    # --- loading ----------------------------------------------------------------
    async def ensure_loaded(self) -> None:
        if self._state == _LOADED:
            return
        if self._state == _LOADING:
            d: defer.Deferred[None] = defer.Deferred()
            self._waiters.append(d)
            await d
            return
        self._state = _LOADING
        try:
            snapshot = await self._store.load_directory()
        except BaseException as e:
            self._state = _NOT_LOADED
            self._queued = []
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.errback(e)
            raise
        self._apply_snapshot(snapshot)
        self._state = _LOADED
        queued, self._queued = self._queued, []
        for change in queued:
            if isinstance(change, tuple):
                self.on_local_profile_changed(*change)
            else:
                self._apply_event(change)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)
        logger.info(
            "user directory loaded: %d users in %d rooms",
            len(self._user_rooms),
            len(self._room_users),
        )

    def _apply_snapshot(self, snapshot: DirectorySnapshot) -> None:
        for room_id, user_id in snapshot.joined:
            if user_id in self._hidden:
                continue
            self._user_rooms.setdefault(user_id, set()).add(room_id)
            self._room_users.setdefault(room_id, set()).add(user_id)
        for room_id, event_type, content in snapshot.room_settings:
            self._apply_room_setting(room_id, event_type, content)
        for profiles in (snapshot.local_profiles, snapshot.remote_profiles):
            for user_id, (displayname, avatar_url) in profiles.items():
                if user_id in self._user_rooms:
                    self._set_profile(user_id, displayname, avatar_url)
        for user_id in self._user_rooms:
            if user_id not in self._profiles:
                self._set_profile(user_id, None, None)

    # --- keeping it current -------------------------------------------------------
    def on_persisted(self, items: list[EventToPersist]) -> None:
        """The persister's hook: a batch of events has committed, in stream order."""
        if self._state == _NOT_LOADED:
            return  # the load will read them from the database
        for item in items:
            pdu = item.pdu
            if pdu.type not in (MEMBER, JOIN_RULES, HISTORY_VISIBILITY) or pdu.state_key is None:
                continue
            if self._state == _LOADING:
                self._queued.append(pdu)
            else:
                self._apply_event(pdu)

    def _apply_event(self, pdu: Pdu) -> None:
        if pdu.type == MEMBER:
            user_id = pdu.state_key
            assert user_id is not None
            content = pdu.content
            if content.get("membership") == "join":
                self._add_member(pdu.room_id, user_id, content)
            else:
                self._remove_member(pdu.room_id, user_id)
        elif pdu.state_key == "":
            self._apply_room_setting(pdu.room_id, pdu.type, pdu.content)

    def resync_room(self, room_id: str, state: Iterable[Pdu]) -> None:
        """Replace what the index knows of a room by its current state."""
        if self._state != _LOADED:
            return
        for user_id in list(self._room_users.get(room_id, ())):
            self._remove_member(room_id, user_id)
        self._join_rules.pop(room_id, None)
        self._history.pop(room_id, None)
        self._public.discard(room_id)
        for pdu in state:
            if pdu.type in (MEMBER, JOIN_RULES, HISTORY_VISIBILITY) and pdu.state_key is not None:
                self._apply_event(pdu)

    def _apply_room_setting(self, room_id: str, event_type: str, content: dict[str, Any]) -> None:
        if event_type == JOIN_RULES:
            self._join_rules[room_id] = _str_or_none(content.get("join_rule")) or "invite"
        elif event_type == HISTORY_VISIBILITY:
            self._history[room_id] = _str_or_none(content.get("history_visibility")) or "shared"
        else:
            return
        if (
            self._join_rules.get(room_id) == "public"
            or self._history.get(room_id) == "world_readable"
        ):
            self._public.add(room_id)
        else:
            self._public.discard(room_id)

    def _add_member(self, room_id: str, user_id: str, content: dict[str, Any]) -> None:
        if user_id in self._hidden:
            return
        self._user_rooms.setdefault(user_id, set()).add(room_id)
        self._room_users.setdefault(room_id, set()).add(user_id)
        displayname = _str_or_none(content.get("displayname"))
        avatar_url = _str_or_none(content.get("avatar_url"))
        if not self.is_local(user_id):
            self._set_profile(user_id, displayname, avatar_url)
        elif user_id not in self._profiles:
            # A local user's directory entry is their global profile, not this
            # room's nickname. Their join was built from that profile, so it is
            # almost always in the profile service's cache already.
            cached = self._profile_service.cached_standard_profile(user_id)
            if cached is not None:
                self._set_profile(user_id, *cached)
            else:
                self._set_profile(user_id, displayname, avatar_url)
                defer.ensureDeferred(self._refresh_local(user_id))

    async def _refresh_local(self, user_id: str) -> None:
        try:
            profile = await self._profile_service.get_standard_profile(user_id)
        except Exception:
            logger.exception("loading the profile of %s for the user directory failed", user_id)
            return
        if profile is not None:
            self.on_local_profile_changed(user_id, *profile)

    def _remove_member(self, room_id: str, user_id: str) -> None:
        rooms = self._user_rooms.get(user_id)
        if rooms is not None:
            rooms.discard(room_id)
            if not rooms:
                del self._user_rooms[user_id]
                self._profiles.pop(user_id, None)
        users = self._room_users.get(room_id)
        if users is not None:
            users.discard(user_id)
            if not users:
                del self._room_users[room_id]

    def remove_user(self, user_id: str) -> None:
        """Take a deactivated user out of the directory for good."""
        self._hidden.add(user_id)
        for room_id in list(self._user_rooms.get(user_id, ())):
            self._remove_member(room_id, user_id)

    def _set_profile(self, user_id: str, displayname: str | None, avatar_url: str | None) -> None:
        text = fold(user_id if displayname is None else f"{user_id} {displayname}")
        self._profiles[user_id] = (displayname, avatar_url, text)

    def on_local_profile_changed(
        self, user_id: str, displayname: str | None, avatar_url: str | None
    ) -> None:
        """The profile service changed a local user's global profile."""
        if self._state == _LOADING:
            self._queued.append((user_id, displayname, avatar_url))
        elif user_id in self._user_rooms:
            self._set_profile(user_id, displayname, avatar_url)

    # --- searching ------------------------------------------------------------------
    async def search(self, searcher: str, term: str, limit: int = 10) -> dict[str, Any]:
        """The ``/user_directory/search`` response for ``searcher``."""
        await self.ensure_loaded()
        limit = max(0, min(limit, MAX_LIMIT))
        words = fold(term).split()
        if not words:
            return {"results": [], "limited": False}
        own_rooms = self._user_rooms.get(searcher, set())
        public = self._public
        matches: list[tuple[tuple[int, int, str], str]] = []
        for user_id, (displayname, _avatar, text) in self._profiles.items():
            if not all(word in text for word in words):
                continue
            rooms = self._user_rooms.get(user_id, ())
            shared = own_rooms if user_id != searcher else ()
            if not any(room in public or room in shared for room in rooms):
                continue
            matches.append(
                ((self._rank(user_id, displayname, words), displayname is None, user_id), user_id)
            )
        matches.sort()
        results = []
        for _, user_id in matches[:limit]:
            displayname, avatar_url, _ = self._profiles[user_id]
            entry: dict[str, Any] = {"user_id": user_id}
            if displayname is not None:
                entry["display_name"] = displayname
            if avatar_url is not None:
                entry["avatar_url"] = avatar_url
            results.append(entry)
        return {"results": results, "limited": len(matches) > limit}

    @staticmethod
    def _rank(user_id: str, displayname: str | None, words: list[str]) -> int:
        """0: the term is the whole name or localpart; 1: every word starts a name
        part; 2: the words only occur inside names."""
        localpart = fold(user_id[1:].split(":", 1)[0])
        name = fold(displayname) if displayname is not None else None
        joined = " ".join(words)
        if joined == localpart or joined == name:
            return 0
        parts = set(localpart.replace(".", " ").replace("_", " ").replace("-", " ").split())
        parts.add(localpart)
        if name is not None:
            parts.update(name.split())
        if all(any(part.startswith(word) for part in parts) for word in words):
            return 1
        return 2
