"""Presence of users: online, unavailable (idle) or offline, in memory.

A user is *seen* when they sync, set their presence or are active; they are
*active* when they set themselves online, sync with ``set_presence=online`` or
send an event from a client (other services may call ``bump_active`` too).

- A sync without ``set_presence`` brings an offline user online; it does not
  wake an idle one (or the idle timeout would never hold while the client
  long-polls). ``set_presence=unavailable`` brings an offline user to
  unavailable; ``set_presence=offline`` leaves presence alone.
- Online and not active for ``IDLE_TIMEOUT_MS``: unavailable.
- Not seen for ``OFFLINE_TIMEOUT_MS``: offline. A /sync tells us when it
  starts, not when it ends, so the timeout is longer than the longest
  long-poll (5 minutes) plus a margin.

Every change takes the next position of the presence stream and wakes the
user's rooms; /sync sends room-mates the users whose presence changed since
its token. Presence is not persisted: after a restart everyone starts
offline and comes back online with their next sync (status messages are
forgotten). ``presence.enabled: false`` turns all of it off;
``"untracked"`` keeps explicitly set presence but ignores syncs and activity.

Users of other servers have the presence their server last sent in an
m.presence EDU (``on_remote_presence``), in memory too.
"""

import logging
from collections import OrderedDict
from typing import Any

import attrs
from twisted.internet import defer

from homeserver.errors import MatrixError
from homeserver.services.memberships import joined_rooms
from homeserver.services.ratelimit import ratelimiter_from_config
from homeserver.services.typing import DeadlineQueue

logger = logging.getLogger(__name__)

ONLINE, UNAVAILABLE, OFFLINE = "online", "unavailable", "offline"
STATES = (ONLINE, UNAVAILABLE, OFFLINE)
IDLE_TIMEOUT_MS = 5 * 60_000
OFFLINE_TIMEOUT_MS = 5 * 60_000 + 30_000
# A user of another server whose server has said nothing of them for this long is offline.
FEDERATION_TIMEOUT_MS = 30 * 60_000
# Above this many changed users, find room-mates by listing the rooms' members.
_MEMBER_SCAN_THRESHOLD = 64
_UNSET: Any = object()


@attrs.define
class UserPresence:
    state: str = OFFLINE
    status_msg: str | None = None
    last_active_ts: int = 0
    last_seen_ts: int = 0
    currently_active: bool = False
    stream: int = 0
    remote: bool = False  # a user of another server: their server tells us their presence

    def content(self, now_ms: int) -> dict[str, Any]:
        content: dict[str, Any] = {"presence": self.state}
        if self.last_active_ts:
            content["last_active_ago"] = max(0, now_ms - self.last_active_ts)
        content["currently_active"] = self.currently_active and self.state == ONLINE
        if self.status_msg is not None:
            content["status_msg"] = self.status_msg
        return content


class PresenceService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self.clock = hs.clock
        self.enabled: bool = hs.config.presence_enabled
        setting = (hs.config.get("presence") or {}).get("enabled", True)
        self.tracks_syncs = self.enabled and setting != "untracked"
        self.position = 0
        self._users: dict[str, UserPresence] = {}
        # user -> position of their last change, oldest change first
        self._changes: OrderedDict[str, int] = OrderedDict()
        self._deadlines = DeadlineQueue(self.clock, self._on_due)
        rc = (hs.config.get("rc_presence") or {}).get("per_user") or {}
        self._limiter = ratelimiter_from_config(self.clock, rc)
        # An event a local user's client sent is activity.
        persister = getattr(hs, "persister", None)
        if persister is not None:
            persister.on_persisted.append(self._on_events_persisted)

    # --- what users do ---------------------------------------------------------------------
    async def on_sync(self, user_id: str, set_presence: str | None) -> None:
        """A /sync started (``set_presence`` as the client gave it, None if absent)."""
        if not self.tracks_syncs or set_presence == OFFLINE:
            return
        now = self.clock.time_msec()
        presence = self._get_or_create(user_id)
        presence.last_seen_ts = now
        if set_presence == ONLINE:
            self._activity(user_id, presence, now)
        elif presence.state == OFFLINE:
            if set_presence == UNAVAILABLE:
                self._set_state(user_id, presence, UNAVAILABLE)
            else:
                presence.last_active_ts = now
                presence.currently_active = True
                self._set_state(user_id, presence, ONLINE, force=True)
        self._schedule(user_id, presence)

    def bump_active(self, user_id: str) -> None:
        """The user did something (sent an event...): online, and the idle clock restarts."""
        if not self.tracks_syncs:
            return
        now = self.clock.time_msec()
        presence = self._get_or_create(user_id)
        presence.last_seen_ts = now
        self._activity(user_id, presence, now)
        self._schedule(user_id, presence)

    def _on_events_persisted(self, items: list[Any]) -> None:
        """Events sent from a client are activity, for users who have synced or set presence.

        (Others come online with their first sync; this also keeps in-process
        tests that only send events free of presence timers.)
        """
        for sender in {i.pdu.sender for i in items if getattr(i, "device_id", None) is not None}:
            if sender in self._users:
                self.bump_active(sender)

    def on_remote_presence(
        self,
        user_id: str,
        state: str,
        last_active_ago: int | None,
        status_msg: str | None,
        currently_active: bool,
    ) -> None:
        """An m.presence update for a user of another server (the caller checked
        that it came from their server): room-mates see it in /sync. It is not
        sent out again; without news for ``FEDERATION_TIMEOUT_MS`` the user goes
        offline."""
        if not self.enabled or state not in STATES:
            return
        now = self.clock.time_msec()
        presence = self._get_or_create(user_id)
        presence.remote = True
        presence.last_seen_ts = now
        if last_active_ago is not None:
            presence.last_active_ts = now - max(0, last_active_ago)
        presence.status_msg = status_msg
        presence.currently_active = currently_active
        self._set_state(user_id, presence, state, force=True)
        self._schedule(user_id, presence)

    async def set_status(self, user_id: str, state: str, status_msg: str | None = _UNSET) -> None:
        """PUT /presence/{userId}/status for the user themself.

        An absent ``status_msg`` keeps the current one; null clears it.
        """
        if state not in STATES:
            raise MatrixError("M_INVALID_PARAM", "presence must be online, unavailable or offline")
        if not self.enabled:
            return
        self._limiter.check(user_id)
        now = self.clock.time_msec()
        presence = self._get_or_create(user_id)
        presence.last_seen_ts = now
        changed = status_msg is not _UNSET and status_msg != presence.status_msg
        if changed:
            presence.status_msg = status_msg
        if state == ONLINE:
            presence.last_active_ts = now
            changed = changed or presence.state != ONLINE or not presence.currently_active
            presence.currently_active = True
        else:
            changed = changed or presence.state != state
            presence.currently_active = False
        if changed:
            self._set_state(user_id, presence, state, force=True)
        self._schedule(user_id, presence)

    async def get_status(self, requester: str, user_id: str) -> dict[str, Any]:
        """GET /presence/{userId}/status: for the user and those who share a room (403)."""
        if requester != user_id and not await self._share_a_room(requester, [user_id]):
            raise MatrixError("M_FORBIDDEN", "You are not allowed to see their presence")
        presence = self._users.get(user_id) if self.enabled else None
        if presence is None:
            return {"presence": OFFLINE}
        return presence.content(self.clock.time_msec())

    # --- what /sync asks -------------------------------------------------------------------
    async def updates_for(
        self, user_id: str, since_pos: int | None, upto: int
    ) -> list[dict[str, Any]]:
        """m.presence events of the user and their room-mates changed in (since_pos, upto].

        ``since_pos`` None (initial sync), or a position beyond ours (a token
        from before a restart), gives everyone whose presence we know.
        """
        if not self.enabled:
            return []
        if since_pos is not None and since_pos > self.position:
            since_pos = None
        if since_pos is None:
            candidates = [u for u, p in self._users.items() if p.stream <= upto]
            candidates.sort(key=lambda u: self._users[u].stream)
        else:
            if since_pos >= min(self.position, upto):
                return []
            candidates = []
            for other, stream in reversed(self._changes.items()):
                if stream <= since_pos:
                    break
                if stream <= upto:
                    candidates.append(other)
            candidates.reverse()
        if not candidates:
            return []
        visible = set(await self._share_a_room(user_id, candidates))
        visible.update(u for u in candidates if u == user_id)
        now = self.clock.time_msec()
        return [
            {"type": "m.presence", "sender": u, "content": self._users[u].content(now)}
            for u in candidates
            if u in visible
        ]

    def shutdown(self) -> None:
        self._deadlines.stop()

    # --- internals -------------------------------------------------------------------------
    def _get_or_create(self, user_id: str) -> UserPresence:
        presence = self._users.get(user_id)
        if presence is None:
            presence = self._users[user_id] = UserPresence()
        return presence

    def _activity(self, user_id: str, presence: UserPresence, now: int) -> None:
        presence.last_active_ts = now
        if presence.state != ONLINE or not presence.currently_active:
            presence.currently_active = True
            self._set_state(user_id, presence, ONLINE, force=True)

    def _set_state(
        self, user_id: str, presence: UserPresence, state: str, force: bool = False
    ) -> None:
        if presence.state == state and not force:
            return
        presence.state = state
        if state != ONLINE:
            presence.currently_active = False
        self.position += 1
        presence.stream = self.position
        self._changes[user_id] = self.position
        self._changes.move_to_end(user_id)
        # Federation: servers sharing a room with the user hear of the change.
        sender = getattr(self.hs, "federation_sender", None)
        if sender is not None and not presence.remote:
            sender.on_presence(user_id, presence.content(self.clock.time_msec()))
        d = defer.ensureDeferred(self._wake(user_id))
        d.addErrback(
            lambda f: logger.error(
                "waking for presence of %s failed: %s", user_id, f.getErrorMessage()
            )
        )

    async def _wake(self, user_id: str) -> None:
        presence = self._users.get(user_id)
        joined = await joined_rooms(self.hs, user_id, presence is not None and presence.remote)
        self.hs.notifier.wake(room_ids=joined, user_ids=[user_id])

    def _schedule(self, user_id: str, presence: UserPresence) -> None:
        if presence.state == OFFLINE:
            self._deadlines.cancel(user_id)
            return
        if presence.remote:
            self._deadlines.schedule(user_id, presence.last_seen_ts + FEDERATION_TIMEOUT_MS)
            return
        due = presence.last_seen_ts + OFFLINE_TIMEOUT_MS
        if presence.state == ONLINE:
            due = min(due, presence.last_active_ts + IDLE_TIMEOUT_MS)
        self._deadlines.schedule(user_id, due)

    def _on_due(self, user_id: str) -> None:
        presence = self._users.get(user_id)
        if presence is None or presence.state == OFFLINE:
            return
        now = self.clock.time_msec()
        if presence.remote:
            if now - presence.last_seen_ts >= FEDERATION_TIMEOUT_MS:
                self._set_state(user_id, presence, OFFLINE)
        elif now - presence.last_seen_ts >= OFFLINE_TIMEOUT_MS:
            self._set_state(user_id, presence, OFFLINE)
        elif presence.state == ONLINE and now - presence.last_active_ts >= IDLE_TIMEOUT_MS:
            self._set_state(user_id, presence, UNAVAILABLE)
        self._schedule(user_id, presence)

    async def _share_a_room(self, user_id: str, others: list[str]) -> list[str]:
        """Those of ``others`` joined to a room ``user_id`` is joined to."""
        memberships = await self.hs.user_rooms.get(user_id)
        rooms = []
        for room_id, (membership, _, _) in memberships.items():
            if membership == "join":
                room = await self.hs.room_states.get(room_id)
                if room is not None:
                    rooms.append(room.members)
        if len(others) > _MEMBER_SCAN_THRESHOLD:
            mates = {u for members in rooms for u, m in members.items() if m == "join"}
            return [u for u in others if u in mates]
        return [u for u in others if any(members.get(u) == "join" for members in rooms)]
