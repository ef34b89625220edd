"""Push rules per user, evaluated for every new event, and unread notification counts.

After each batch of events commits (``on_persisted``, before sleeping syncs are
woken), every event is evaluated against the compiled rules of each local
member of its room other than the sender. What notifies is kept in memory per
user and room (only for users whose counts are loaded, i.e. who synced since
start) and written to ``event_push_actions`` in batches behind the senders'
backs, so sending stays as fast as persisting.

``unread_counts`` counts a user's notifications in a room after their read
position, per thread: for an event in thread ``t`` that is the furthest of the
unthreaded receipt, the threaded receipt for ``t`` (``main`` for the main
timeline) and the user's own latest event in ``t`` (sending reads), where a
receipt is the furthest of ``m.read`` and ``m.read.private``.
"""

import bisect
import json
import logging
from typing import Any

import attrs
from twisted.internet import defer

from homeserver.core.events import MEMBER, Pdu
from homeserver.errors import MatrixError
from homeserver.services.push_rules import (
    KINDS,
    MAIN,
    CompiledRule,
    CompiledRuleSet,
    EvalContext,
    check_actions,
    compile_default_ruleset,
    compile_ruleset,
    ordered_ruleset,
)
from homeserver.services.receipts import thread_of
from storage.push import DefaultRuleChange, PushActionRow, PushStore, ReadMark, StoredRule

logger = logging.getLogger(__name__)

MAX_COMPILED = 100_000
FLUSH_DELAY_MS = 200
MAX_PENDING_ROWS = 5000
PUSH_RULES_TYPE = "m.push_rules"
NOTIFICATIONS_LIMIT = 50
MAX_NOTIFICATIONS_LIMIT = 1000

Notification = tuple[int, str, bool]  # (stream ordering, thread, highlight)


def _zero() -> dict[str, int]:
    return {"notification_count": 0, "highlight_count": 0}


@attrs.define(slots=True)
class _Counts:
    """A room's counts for one set of read positions, over ``notifications[:done]``."""

    positions: tuple[Any, ...]
    notifications: list[Notification]
    done: int = 0
    main: dict[str, int] = attrs.Factory(_zero)
    total: dict[str, int] = attrs.Factory(_zero)
    per_thread: dict[str, dict[str, int]] = attrs.Factory(dict)

    def count(self, unthreaded: int, threads: dict[str, int], marks: dict[str, int]) -> None:
        """Count the notifications added since the last call."""
        for stream, thread, highlight in self.notifications[self.done:]:
            if stream <= unthreaded or stream <= threads.get(thread, 0) or stream <= marks.get(
                thread, 0
            ):
                continue
            counts = self.main if thread == MAIN else self.per_thread.setdefault(thread, _zero())
            for c in (counts, self.total):
                c["notification_count"] += 1
                if highlight:
                    c["highlight_count"] += 1
        self.done = len(self.notifications)


@attrs.define(slots=True)
class _UserUnread:
    """A user's not-yet-read notifications, by room, oldest first; and read marks."""

    rooms: dict[str, list[Notification]] = attrs.Factory(dict)
    # room -> thread -> stream ordering of the user's own latest event there
    marks: dict[str, dict[str, int]] = attrs.Factory(dict)
    # room -> counts last computed, extended as notifications are appended, so a
    # /sync costs what arrived since the last one, not every unread notification
    counts: dict[str, _Counts] = attrs.Factory(dict)

    def add(self, room_id: str, stream: int, thread: str, highlight: bool) -> None:
        notifications = self.rooms.setdefault(room_id, [])
        entry = (stream, thread, highlight)
        if not notifications or notifications[-1][0] < stream:
            notifications.append(entry)
            return
        i = bisect.bisect_left(notifications, (stream,))
        if i < len(notifications) and notifications[i][0] == stream:
            return
        notifications.insert(i, entry)
        self.counts.pop(room_id, None)  # not an append: count again

    def mark(self, room_id: str, thread: str, stream: int) -> None:
        marks = self.marks.setdefault(room_id, {})
        if marks.get(thread, 0) < stream:
            marks[thread] = stream


class _DisplayNames:
    """user -> display name in one room, read from its member events on demand."""

    __slots__ = ("_room",)

    def __init__(self, room: Any) -> None:
        self._room = room

    def get(self, user_id: str, default: Any = None) -> Any:
        event = self._room.get(MEMBER, user_id)
        name = event.content.get("displayname") if event is not None else None
        return name if isinstance(name, str) else default


class PushService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self.store = PushStore(hs.database)
        self._suffix = ":" + hs.server_name
        loaded = hs.database.run_blocking(self.store.load_all_rules_txn)
        # user -> kind -> rules the user defined (API shape), most important first
        self._user_rules: dict[str, dict[str, list[dict[str, Any]]]] = {
            user: {kind: [_rule_dict(kind, r) for r in rules] for kind, rules in kinds.items()}
            for user, kinds in loaded.rules.items()
        }
        # user -> (kind, rule_id) -> (enabled, actions) changed on a server-default rule
        self._default_changes: dict[str, dict[tuple[str, str], tuple[bool | None, Any]]] = {
            user: {key: (c.enabled, c.actions) for key, c in changes.items()}
            for user, changes in loaded.defaults.items()
        }
        self._compiled: dict[str, CompiledRuleSet] = {}
        self._locks: dict[str, defer.DeferredLock] = {}
        # Unread notifications of users loaded so far, and loads in progress.
        self._users: dict[str, _UserUnread] = {}
        self._loading: dict[str, list[defer.Deferred[_UserUnread]]] = {}
        self._load_buffer: dict[str, _UserUnread] = {}
        # Rows not yet committed: queued, and the batch being written.
        self._pending_rows: list[PushActionRow] = []
        self._pending_marks: list[ReadMark] = []
        self._inflight_rows: list[PushActionRow] = []
        self._inflight_marks: list[ReadMark] = []
        self._flushing = False
        self._flush_timer: Any = None
        self._timers = False
        self._last_flush_ms = 0
        self._shutting_down = False
        self._flush_waiters: list[defer.Deferred[None]] = []
        hs.reactor.addSystemEventTrigger("before", "shutdown", self._before_shutdown)
        # room -> (the RoomState it was computed from, joined local users, joined count)
        self._members: dict[str, tuple[Any, list[str], int]] = {}

    def is_local(self, user_id: str) -> bool:
        return user_id.endswith(self._suffix)

    # --- rule sets -----------------------------------------------------------------------
    def ruleset(self, user_id: str) -> dict[str, list[dict[str, Any]]]:
        """The user's rule set in the API's shape (``GET /pushrules/global/``)."""
        return ordered_ruleset(
            user_id, self._user_rules.get(user_id, {}), self._default_changes.get(user_id, {})
        )

    def push_rules_content(self, user_id: str) -> dict[str, Any]:
        """The content of the user's ``m.push_rules`` account data event."""
        return {"global": self.ruleset(user_id)}

    def compiled(self, user_id: str) -> CompiledRuleSet:
        if user_id not in self._user_rules and user_id not in self._default_changes:
            return compile_default_ruleset(user_id)  # shared by everyone who changed nothing
        rules = self._compiled.get(user_id)
        if rules is None:
            if len(self._compiled) >= MAX_COMPILED:
                self._compiled.clear()
            rules = self._compiled[user_id] = compile_ruleset(self.ruleset(user_id))
        return rules

    def _lock(self, user_id: str) -> defer.DeferredLock:
        lock = self._locks.get(user_id)
        if lock is None:
            lock = self._locks[user_id] = defer.DeferredLock()
        return lock

    async def _changed(self, user_id: str) -> None:
        """The user's rules changed (the user's lock is held): recompile, and put the
        new rule set in their m.push_rules account data, which /sync delivers."""
        self._compiled.pop(user_id, None)
        account_data = getattr(self.hs, "account_data", None)
        if account_data is not None:
            await account_data.set_global(
                user_id, PUSH_RULES_TYPE, self.push_rules_content(user_id)
            )

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise MatrixError("M_INVALID_PARAM", f"Unknown push rule kind {kind!r}")

    def get_rule(self, user_id: str, kind: str, rule_id: str) -> dict[str, Any]:
        self._check_kind(kind)
        for rule in self.ruleset(user_id)[kind]:
            if rule["rule_id"] == rule_id:
                return rule
        raise MatrixError("M_NOT_FOUND", "The push rule was not found.")

    async def set_rule(
        self,
        user_id: str,
        kind: str,
        rule_id: str,
        body: dict[str, Any],
        before: str | None = None,
        after: str | None = None,
    ) -> None:
        """PUT /pushrules/global/{kind}/{ruleId}: add or replace a user-defined rule."""
        self._check_kind(kind)
        if not rule_id or rule_id.startswith("."):
            raise MatrixError("M_INVALID_PARAM", "Rule ids starting with '.' are reserved")
        if "/" in rule_id or "\\" in rule_id:
            raise MatrixError("M_INVALID_PARAM", "Rule ids may not contain '/' or '\\'")
        actions = check_actions(body.get("actions"))
        rule: dict[str, Any] = {"rule_id": rule_id, "actions": actions, "enabled": True}
        if kind in ("override", "underride"):
            conditions = body.get("conditions", [])
            if not isinstance(conditions, list) or not all(
                isinstance(c, dict) and isinstance(c.get("kind"), str) for c in conditions
            ):
                raise MatrixError("M_INVALID_PARAM", "conditions must be a list of conditions")
            rule["conditions"] = conditions
        elif kind == "content":
            pattern = body.get("pattern")
            if not isinstance(pattern, str):
                raise MatrixError("M_MISSING_PARAM", "Content rules need a pattern")
            rule["pattern"] = pattern
        async with self._lock(user_id):
            rules = list(self._user_rules.get(user_id, {}).get(kind, []))
            index = next((i for i, r in enumerate(rules) if r["rule_id"] == rule_id), None)
            if index is not None:
                rule["enabled"] = rules[index]["enabled"]  # updating keeps enabled
            anchor = before if before is not None else after
            if anchor is not None:
                if index is not None:
                    del rules[index]
                position = next((i for i, r in enumerate(rules) if r["rule_id"] == anchor), None)
                if position is None or anchor.startswith("."):
                    raise MatrixError("M_UNKNOWN", f"before/after rule not found: {anchor}")
                rules.insert(position if before is not None else position + 1, rule)
            elif index is not None:
                rules[index] = rule
            else:
                rules.insert(0, rule)
            await self._save_kind(user_id, kind, rules)

    async def delete_rule(self, user_id: str, kind: str, rule_id: str) -> None:
        self._check_kind(kind)
        if rule_id.startswith("."):
            self.get_rule(user_id, kind, rule_id)  # 404 when there is no such default rule
            raise MatrixError("M_INVALID_PARAM", "Server-default rules cannot be deleted")
        async with self._lock(user_id):
            rules = list(self._user_rules.get(user_id, {}).get(kind, []))
            kept = [r for r in rules if r["rule_id"] != rule_id]
            if len(kept) == len(rules):
                raise MatrixError("M_NOT_FOUND", "The push rule was not found.")
            await self._save_kind(user_id, kind, kept)

    async def _save_kind(self, user_id: str, kind: str, rules: list[dict[str, Any]]) -> None:
        await self.store.set_kind_rules(user_id, kind, [_stored_rule(kind, r) for r in rules])
        self._user_rules.setdefault(user_id, {})[kind] = rules
        await self._changed(user_id)

    def get_enabled(self, user_id: str, kind: str, rule_id: str) -> bool:
        return bool(self.get_rule(user_id, kind, rule_id)["enabled"])

    def get_actions(self, user_id: str, kind: str, rule_id: str) -> list[Any]:
        return list(self.get_rule(user_id, kind, rule_id)["actions"])

    async def set_enabled(self, user_id: str, kind: str, rule_id: str, enabled: bool) -> None:
        await self._modify(user_id, kind, rule_id, enabled=enabled)

    async def set_actions(self, user_id: str, kind: str, rule_id: str, actions: Any) -> None:
        await self._modify(user_id, kind, rule_id, actions=check_actions(actions))

    async def _modify(
        self,
        user_id: str,
        kind: str,
        rule_id: str,
        *,
        enabled: bool | None = None,
        actions: list[Any] | None = None,
    ) -> None:
        self._check_kind(kind)
        async with self._lock(user_id):
            self.get_rule(user_id, kind, rule_id)  # 404 unless it exists
            if rule_id.startswith("."):
                changes = self._default_changes.setdefault(user_id, {})
                old_enabled, old_actions = changes.get((kind, rule_id), (None, None))
                change = (
                    old_enabled if enabled is None else enabled,
                    old_actions if actions is None else actions,
                )
                await self.store.set_default_change(
                    user_id, kind, rule_id, DefaultRuleChange(*change)
                )
                changes[(kind, rule_id)] = change
                await self._changed(user_id)
                return
            rules = [dict(r) for r in self._user_rules.get(user_id, {}).get(kind, [])]
            for rule in rules:
                if rule["rule_id"] == rule_id:
                    if enabled is not None:
                        rule["enabled"] = enabled
                    if actions is not None:
                        rule["actions"] = actions
            await self._save_kind(user_id, kind, rules)

    # --- evaluating new events ---------------------------------------------------------------
    def on_persisted(self, items: list[Any]) -> None:
        """Evaluate a committed batch; runs to completion at once when all it needs is
        in memory (the usual case), so counts are right before syncs wake."""
        d = defer.ensureDeferred(self._process(items))
        if not d.called:
            # Something had to be loaded: wake the users once their counts are in.
            d.addCallback(lambda users: self.hs.notifier.wake(user_ids=users))
        d.addErrback(lambda f: logger.error("push evaluation failed: %s", f.getTraceback()))

    async def _process(self, items: list[Any]) -> set[str]:
        notified: set[str] = set()
        for item in items:
            try:
                notified |= await self._evaluate(item.pdu, item.stream_ordering)
            except Exception:
                logger.exception("push evaluation of %s failed", item.pdu.event_id)
        self._schedule_flush()
        return notified

    def _local_members(self, room: Any) -> tuple[list[str], int]:
        cached = self._members.get(room.room_id)
        if cached is not None and cached[0] is room:
            return cached[1], cached[2]
        joined = [u for u, m in room.members.items() if m == "join"]
        local = [u for u in joined if u.endswith(self._suffix)]
        self._members[room.room_id] = (room, local, len(joined))
        return local, len(joined)

    async def _evaluate(self, pdu: Pdu, stream: int) -> set[str]:
        hs = self.hs
        room_id = pdu.room_id
        room = hs.room_states.get_cached(room_id)
        if room is None:
            room = await hs.room_states.get(room_id)
            if room is None:
                return set()
        if pdu.type == MEMBER:
            self._members.pop(room_id, None)
        thread = await thread_of(hs, pdu)
        sender = pdu.sender
        if self.is_local(sender):
            self._add_mark(ReadMark(sender, room_id, thread, stream))
        local, joined_count = self._local_members(room)
        targets = [u for u in local if u != sender]
        if pdu.type == MEMBER and pdu.content.get("membership") == "invite":
            invitee = pdu.state_key
            if invitee and invitee != sender and self.is_local(invitee) and invitee not in targets:
                targets.append(invitee)
        if not targets:
            return set()
        try:
            power = room.power_levels
            sender_power = power.user_level(sender)
            levels = power.content.get("notifications")
        except (KeyError, ValueError):
            sender_power, levels = 0, None
        ctx = EvalContext(
            event=pdu.data,
            member_count=joined_count,
            sender_power=sender_power,
            notification_levels=levels if isinstance(levels, dict) else {},
            display_names=_DisplayNames(room),  # type: ignore[arg-type]
        )
        now = hs.clock.time_msec()
        notified = set()
        # Everyone who changed no rule shares one rule set: evaluated together.
        shared = compile_default_ruleset(sender)
        rules: dict[str, CompiledRule] = {}
        sharing = []
        user_rules, default_changes = self._user_rules, self._default_changes
        for user_id in targets:
            if user_id not in user_rules and user_id not in default_changes:
                sharing.append(user_id)  # what compiled() would answer: ``shared``
                continue
            rule = self.compiled(user_id).evaluate(ctx, user_id)
            if rule is not None:
                rules[user_id] = rule
        if sharing:
            rules.update(shared.evaluate_many(ctx, sharing))
        # Queue each notified member's row and extend their in-memory unread
        # notifications (and those of a user whose unread state is loading).
        event_id = pdu.event_id
        pending, users, loading = self._pending_rows, self._users, self._load_buffer
        for user_id in targets:
            rule = rules.get(user_id)
            if rule is None or not rule.notify:
                continue
            notified.add(user_id)
            highlight = rule.highlight
            pending.append(PushActionRow(
                user_id, room_id, stream, event_id, thread, highlight, rule.actions_json, now
            ))
            state = users.get(user_id)
            if state is not None:
                state.add(room_id, stream, thread, highlight)
            if loading:
                state = loading.get(user_id)
                if state is not None:
                    state.add(room_id, stream, thread, highlight)
        return notified

    def _add_mark(self, mark: ReadMark) -> None:
        self._pending_marks.append(mark)
        for state in (self._users.get(mark.user_id), self._load_buffer.get(mark.user_id)):
            if state is not None:
                state.mark(mark.room_id, mark.thread_id, mark.stream_ordering)

    # --- writing notifications ------------------------------------------------------------
    # A quiet server writes a batch's rows at once. Under a stream of events, rows are
    # written at most every FLUSH_DELAY_MS (or at once with many queued), so back-to-back
    # sends are not slowed by one extra write transaction each on the single writer. The
    # rows left after a burst go with the next activity (an event, a /sync reading counts),
    # on a timer once ``start`` ran (the app calls it; in-process tests do not), and at
    # shutdown at the latest.
    def start(self) -> None:
        self._timers = True
        self._schedule_flush()

    def stop(self) -> None:
        self._timers = False
        timer, self._flush_timer = self._flush_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _schedule_flush(self) -> None:
        if self._flushing or not (self._pending_rows or self._pending_marks):
            return
        waited = self.hs.clock.time_msec() - self._last_flush_ms
        if (
            self._shutting_down
            or len(self._pending_rows) >= MAX_PENDING_ROWS
            or waited >= FLUSH_DELAY_MS
        ):
            self._start_flush()
        elif self._timers and self._flush_timer is None:
            self._flush_timer = self.hs.clock.call_later(
                (FLUSH_DELAY_MS - waited) / 1000, self._start_flush
            )

    def _start_flush(self) -> None:
        timer, self._flush_timer = self._flush_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if not self._flushing and (self._pending_rows or self._pending_marks):
            self._flushing = True
            self._last_flush_ms = self.hs.clock.time_msec()
            defer.ensureDeferred(self._flush())

    def _before_shutdown(self) -> None:
        """From now on write at once, so what requests in flight compute is not lost
        (the database closes only after their transactions)."""
        self._shutting_down = True
        self.stop()
        self._start_flush()

    async def _flush(self) -> None:
        try:
            self._inflight_rows, self._pending_rows = self._pending_rows, []
            # Only the latest mark per user, room and thread needs writing.
            latest: dict[tuple[str, str, str], ReadMark] = {}
            for mark in self._pending_marks:
                key = (mark.user_id, mark.room_id, mark.thread_id)
                if key not in latest or latest[key].stream_ordering < mark.stream_ordering:
                    latest[key] = mark
            self._inflight_marks, self._pending_marks = list(latest.values()), []
            try:
                await self.store.write_notifications(self._inflight_rows, self._inflight_marks)
            except Exception:
                logger.exception("writing %d notifications failed", len(self._inflight_rows))
        finally:
            self._inflight_rows, self._inflight_marks = [], []
            self._flushing = False
            waiters, self._flush_waiters = self._flush_waiters, []
            for d in waiters:
                d.callback(None)
            self._schedule_flush()

    async def flushed(self) -> None:
        """Return once every notification computed so far is in the database."""
        while self._flushing or self._pending_rows or self._pending_marks:
            self._start_flush()
            if not self._flushing:
                continue  # written at once (a quick write on the reactor thread)
            d: defer.Deferred[None] = defer.Deferred()
            self._flush_waiters.append(d)
            await d

    # --- reading counts ---------------------------------------------------------------------
    async def _user(self, user_id: str) -> _UserUnread:
        state = self._users.get(user_id)
        if state is not None:
            return state
        waiters = self._loading.get(user_id)
        if waiters is not None:
            d: defer.Deferred[_UserUnread] = defer.Deferred()
            waiters.append(d)
            return await d
        self._loading[user_id] = []
        # What is computed while loading goes here too, so nothing committed during
        # the load (after its snapshot) is missed.
        buffer = self._load_buffer[user_id] = _UserUnread()
        try:
            snapshot = await self.store.load_unread(user_id)
        except BaseException as e:
            self._load_buffer.pop(user_id, None)
            for d in self._loading.pop(user_id):
                d.errback(e)
            raise
        state = _UserUnread()
        for room_id, stream, thread, highlight in snapshot.notifications:
            state.add(room_id, stream, thread, highlight)
        for mark in snapshot.marks:
            state.mark(mark.room_id, mark.thread_id, mark.stream_ordering)
        for row in self._inflight_rows + self._pending_rows:
            if row.user_id == user_id:
                state.add(row.room_id, row.stream_ordering, row.thread_id, row.highlight)
        for mark in self._inflight_marks + self._pending_marks:
            if mark.user_id == user_id:
                state.mark(mark.room_id, mark.thread_id, mark.stream_ordering)
        for room_id, notifications in buffer.rooms.items():
            for stream, thread, highlight in notifications:
                state.add(room_id, stream, thread, highlight)
        for room_id, marks in buffer.marks.items():
            for thread, stream in marks.items():
                state.mark(room_id, thread, stream)
        del self._load_buffer[user_id]
        self._users[user_id] = state
        for d in self._loading.pop(user_id):
            d.callback(state)
        return state

    async def _read_positions(
        self, user_id: str, room_id: str, state: _UserUnread
    ) -> tuple[int, dict[str, int], dict[str, int]]:
        receipts = getattr(self.hs, "receipts", None)
        unthreaded, threads = (
            (0, {}) if receipts is None else await receipts.read_positions(user_id, room_id)
        )
        return unthreaded, threads, state.marks.get(room_id, {})

    async def unread_counts(
        self, user_id: str, room_id: str, thread_counts: bool = False
    ) -> dict[str, Any]:
        """Unread notification and highlight counts of the user in the room.

        ``unread_notifications`` counts the whole room, or with ``thread_counts``
        only the main timeline; ``unread_thread_notifications`` has the threads
        with something unread, by thread root.
        """
        self._schedule_flush()  # rows left after a burst go with the next activity
        state = await self._user(user_id)
        notifications = state.rooms.get(room_id)
        if not notifications:
            return {"unread_notifications": _zero(), "unread_thread_notifications": {}}
        unthreaded, threads, marks = await self._read_positions(user_id, room_id, state)
        notifications = state.rooms.get(room_id) or []
        positions = (unthreaded, tuple(threads.items()), tuple(marks.items()))
        counts = state.counts.get(room_id)
        if counts is None or counts.positions != positions or counts.notifications is not notifications:
            # Read positions moved (or first use): keep only what is still unread.
            unread = [
                entry for entry in notifications
                if not (entry[0] <= unthreaded or entry[0] <= threads.get(entry[1], 0)
                        or entry[0] <= marks.get(entry[1], 0))
            ]
            if not unread:
                state.rooms.pop(room_id, None)
                state.counts.pop(room_id, None)
                return {"unread_notifications": _zero(), "unread_thread_notifications": {}}
            state.rooms[room_id] = unread
            counts = state.counts[room_id] = _Counts(positions, unread)
        counts.count(unthreaded, threads, marks)
        return {
            "unread_notifications": dict(counts.main if thread_counts else counts.total),
            "unread_thread_notifications": {t: dict(c) for t, c in counts.per_thread.items()},
        }

    # --- GET /notifications -------------------------------------------------------------------
    async def notifications(
        self, user_id: str, from_token: str | None, limit: int | None, only: str | None
    ) -> dict[str, Any]:
        hs = self.hs
        before = None
        if from_token:
            try:
                before = int(from_token)
            except ValueError:
                raise MatrixError("M_INVALID_PARAM", "Bad from token") from None
        limit = (
            NOTIFICATIONS_LIMIT if limit is None else max(1, min(limit, MAX_NOTIFICATIONS_LIMIT))
        )
        await self.flushed()
        rows = await self.store.get_notifications(user_id, before, limit, only == "highlight")
        events = await hs.events.get_events(r.event_id for r in rows)
        state = await self._user(user_id)
        positions: dict[str, tuple[int, dict[str, int], dict[str, int]]] = {}
        result = []
        for row in rows:
            pdu = events.get(row.event_id)
            if pdu is None:
                continue
            if row.room_id not in positions:
                positions[row.room_id] = await self._read_positions(user_id, row.room_id, state)
            unthreaded, threads, marks = positions[row.room_id]
            read = row.stream_ordering <= max(
                unthreaded, threads.get(row.thread_id, 0), marks.get(row.thread_id, 0)
            )
            (event,) = await hs.client_events.serialize_events([pdu], user_id, None, False)
            result.append(
                {
                    "actions": json.loads(row.actions_json),
                    "event": event,
                    "read": read,
                    "room_id": row.room_id,
                    "ts": row.ts,
                }
            )
        body: dict[str, Any] = {"notifications": result}
        if len(rows) == limit:
            body["next_token"] = str(rows[-1].stream_ordering)
        return body


def _rule_dict(kind: str, rule: StoredRule) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "rule_id": rule.rule_id,
        "actions": rule.actions,
        "enabled": rule.enabled,
    }
    if kind in ("override", "underride"):
        entry["conditions"] = rule.conditions or []
    elif kind == "content":
        entry["pattern"] = rule.pattern or ""
    return entry


def _stored_rule(kind: str, rule: dict[str, Any]) -> StoredRule:
    return StoredRule(
        rule["rule_id"],
        list(rule["actions"]),
        bool(rule["enabled"]),
        rule.get("conditions") if kind in ("override", "underride") else None,
        rule.get("pattern") if kind == "content" else None,
    )
