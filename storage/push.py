"""Push rules, and the notifications they produced.

``push_rules`` holds the rules users defined (priority order within a kind),
``push_rule_defaults`` a user's changes to the server-default rules (enabled,
actions). Both are small and loaded whole at start-up. ``event_push_actions``
holds one row per event that notified a local user; ``push_read_marks`` the
latest event each user sent per room and thread (sending reads).
"""

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import attrs

from storage.database import Database, Txn

_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


# Up to this many rows are a ``quick`` write (see storage/database.py).
QUICK_ROWS = 500


@attrs.frozen
class StoredRule:
    rule_id: str
    actions: list[Any]
    enabled: bool
    conditions: list[Any] | None = None  # override / underride rules
    pattern: str | None = None  # content rules


@attrs.frozen
class DefaultRuleChange:
    enabled: bool | None  # None: as the server default
    actions: list[Any] | None


@attrs.frozen
class AllPushRules:
    # user -> kind -> rules, most important first
    rules: dict[str, dict[str, list[StoredRule]]]
    # user -> (kind, rule_id) -> change of a server-default rule
    defaults: dict[str, dict[tuple[str, str], DefaultRuleChange]]


class PushActionRow(NamedTuple):
    user_id: str
    room_id: str
    stream_ordering: int
    event_id: str
    thread_id: str  # "main" or a thread root
    highlight: bool
    actions_json: str  # the actions of the rule that matched, as JSON
    ts: int


@attrs.frozen
class ReadMark:
    user_id: str
    room_id: str
    thread_id: str
    stream_ordering: int


@attrs.frozen
class UnreadSnapshot:
    """A user's notifications not yet covered by an unthreaded receipt, and their marks."""

    # (room_id, stream_ordering, thread_id, highlight)
    notifications: list[tuple[str, int, str, bool]]
    marks: list[ReadMark]


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class PushStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    # --- rules -------------------------------------------------------------------
    def load_all_rules_txn(self, txn: Txn) -> AllPushRules:
        rules: dict[str, dict[str, list[StoredRule]]] = {}
        rows = txn.execute(
            "SELECT user_id, kind, rule_id, conditions, pattern, actions, enabled FROM push_rules"
            " ORDER BY user_id, kind, priority DESC"
        ).fetchall()
        for user_id, kind, rule_id, conditions, pattern, actions, enabled in rows:
            rules.setdefault(user_id, {}).setdefault(kind, []).append(
                StoredRule(rule_id, _loads(actions), bool(enabled), _loads(conditions), pattern)
            )
        defaults: dict[str, dict[tuple[str, str], DefaultRuleChange]] = {}
        rows = txn.execute(
            "SELECT user_id, kind, rule_id, enabled, actions FROM push_rule_defaults"
        ).fetchall()
        for user_id, kind, rule_id, enabled, actions in rows:
            defaults.setdefault(user_id, {})[(kind, rule_id)] = DefaultRuleChange(
                None if enabled is None else bool(enabled), _loads(actions)
            )
        return AllPushRules(rules, defaults)

    async def set_kind_rules(self, user_id: str, kind: str, rules: Sequence[StoredRule]) -> None:
        """Replace the user's rules of one kind with ``rules`` (most important first)."""
        await self.db.run_interaction(
            "set_push_rules", self._set_kind_rules_txn, user_id, kind, list(rules)
        )

    def _set_kind_rules_txn(
        self, txn: Txn, user_id: str, kind: str, rules: list[StoredRule]
    ) -> None:
        txn.execute("DELETE FROM push_rules WHERE user_id = ? AND kind = ?", (user_id, kind))
        count = len(rules)
        txn.executemany(
            "INSERT INTO push_rules (user_id, kind, rule_id, priority, conditions, pattern,"
            " actions, enabled) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    user_id,
                    kind,
                    r.rule_id,
                    count - i,
                    None if r.conditions is None else _json_encoder.encode(r.conditions),
                    r.pattern,
                    _json_encoder.encode(r.actions),
                    r.enabled,
                )
                for i, r in enumerate(rules)
            ],
        )

    async def set_default_change(
        self, user_id: str, kind: str, rule_id: str, change: DefaultRuleChange
    ) -> None:
        actions = None if change.actions is None else _json_encoder.encode(change.actions)
        await self.db.run_interaction(
            "set_push_rule_default",
            lambda txn: txn.execute(
                "INSERT INTO push_rule_defaults (user_id, kind, rule_id, enabled, actions)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id, kind, rule_id) DO UPDATE SET"
                " enabled = excluded.enabled, actions = excluded.actions",
                (user_id, kind, rule_id, change.enabled, actions),
            ),
        )

    # --- notifications --------------------------------------------------------------
    async def write_notifications(
        self, rows: Sequence[PushActionRow], marks: Sequence[ReadMark]
    ) -> None:
        await self.db.run_interaction(
            "write_push_actions", self._write_txn, rows, marks,
            quick=len(rows) + len(marks) <= QUICK_ROWS,
        )

    def _write_txn(
        self, txn: Txn, rows: Sequence[PushActionRow], marks: Sequence[ReadMark]
    ) -> None:
        txn.executemany(
            "INSERT INTO event_push_actions (user_id, room_id, stream_ordering, event_id,"
            " thread_id, highlight, actions, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",  # the same event twice (keys differ by engine)
            rows,
        )
        txn.executemany(
            "INSERT INTO push_read_marks (user_id, room_id, thread_id, stream_ordering)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (user_id, room_id, thread_id) DO UPDATE SET"
            " stream_ordering = excluded.stream_ordering"
            " WHERE push_read_marks.stream_ordering < excluded.stream_ordering",
            [(m.user_id, m.room_id, m.thread_id, m.stream_ordering) for m in marks],
        )

    async def load_unread(self, user_id: str) -> UnreadSnapshot:
        return await self.db.run_read("load_unread", self._load_unread_txn, user_id)

    def _load_unread_txn(self, txn: Txn, user_id: str) -> UnreadSnapshot:
        # Everything an unthreaded receipt already covers is read whatever the thread.
        rows = txn.execute(
            "SELECT a.room_id, a.stream_ordering, a.thread_id, a.highlight"
            " FROM event_push_actions a WHERE a.user_id = ? AND a.stream_ordering > COALESCE("
            "  (SELECT MAX(r.event_stream) FROM receipts r WHERE r.user_id = a.user_id"
            "   AND r.room_id = a.room_id AND r.thread_id = ''"
            "   AND r.receipt_type IN ('m.read', 'm.read.private')), 0)"
            " ORDER BY a.stream_ordering",
            (user_id,),
        ).fetchall()
        marks = txn.execute(
            "SELECT room_id, thread_id, stream_ordering FROM push_read_marks WHERE user_id = ?",
            (user_id,),
        ).fetchall()
        return UnreadSnapshot(
            [(room, so, thread, bool(hl)) for room, so, thread, hl in rows],
            [ReadMark(user_id, room, thread, so) for room, thread, so in marks],
        )

    async def get_notifications(
        self, user_id: str, before: int | None, limit: int, only_highlight: bool
    ) -> list[PushActionRow]:
        """The user's notifications, newest first, older than ``before``."""
        clauses = ["user_id = ?"]
        args: list[Any] = [user_id]
        if before is not None:
            clauses.append("stream_ordering < ?")
            args.append(before)
        if only_highlight:
            clauses.append("highlight = TRUE")
        args.append(limit)
        rows = await self.db.select(
            "get_notifications",
            "SELECT room_id, stream_ordering, event_id, thread_id, highlight, actions, ts"
            " FROM event_push_actions WHERE "
            + " AND ".join(clauses)
            + " ORDER BY stream_ordering DESC LIMIT ?",
            args,
        )
        return [
            PushActionRow(user_id, room, so, eid, thread, bool(hl), actions, ts)
            for room, so, eid, thread, hl, actions, ts in rows
        ]
