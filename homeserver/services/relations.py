"""Relations: edits (m.replace), reactions (m.annotation), threads (m.thread), references.

Bundled aggregations (spec "Aggregations of child events") go into
``unsigned["m.relations"]``: the latest edit, a thread summary, references.
Which events have children at all is known in memory (loaded once, then kept
up to date as events are persisted), so serializing a fresh timeline costs no
database query when nothing relates to it.
"""

from typing import Any

from homeserver.core.events import Pdu
from homeserver.errors import MatrixError
from homeserver.services.tokens import pagination_token, parse_pagination_token
from homeserver.services.visibility import filter_visible
from storage.events import EventToPersist
from storage.relations import RelationsStore

MAX_LIMIT = 100


class RelationsService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self.store = RelationsStore(hs.database)
        self._parents: set[str] | None = None
        self._pending_parents: set[str] = set()
        # parent -> {(sender, key)} of live reactions, for refusing duplicates
        self._annotations: dict[str, set[tuple[str, str]]] = {}

    async def _parent_ids(self) -> set[str]:
        if self._parents is None:
            parents = await self.store.parents_with_relations()
            if self._parents is None:
                self._parents = parents | self._pending_parents
        return self._parents

    def on_persisted(self, items: list[EventToPersist]) -> None:
        for item in items:
            if item.relates_to_id is not None:
                (self._parents if self._parents is not None else self._pending_parents).add(
                    item.relates_to_id)
            target = item.redacted_target
            if target is not None and target.type == "m.reaction":
                relates = target.content.get("m.relates_to") or {}
                reactions = self._annotations.get(relates.get("event_id"))
                if reactions is not None:
                    reactions.discard((target.sender, relates.get("key")))

    # --- reactions ------------------------------------------------------------------
    async def claim_annotation(self, parent_id: str, sender: str, key: str) -> None:
        """Refuse a second identical reaction (400 M_DUPLICATE_ANNOTATION); otherwise
        reserve it until ``release_annotation`` (if the send fails)."""
        reactions = self._annotations.get(parent_id)
        if reactions is None:
            loaded = await self.store.annotations(parent_id)
            reactions = self._annotations.setdefault(parent_id, loaded)
        if (sender, key) in reactions:
            raise MatrixError("M_DUPLICATE_ANNOTATION", "You already reacted with this key")
        reactions.add((sender, key))

    def release_annotation(self, parent_id: str, sender: str, key: str) -> None:
        reactions = self._annotations.get(parent_id)
        if reactions is not None:
            reactions.discard((sender, key))

    # --- bundled aggregations ----------------------------------------------------------
    async def bundled_aggregations(
        self, user_id: str, pdus: list[Pdu]
    ) -> dict[str, dict[str, Any]]:
        parents = await self._parent_ids()
        wanted = [p for p in pdus if p.event_id in parents and not p.redacted_because]
        if not wanted:
            return {}
        by_id = {p.event_id: p for p in wanted}
        children = await self.store.children(list(by_id))
        edits: dict[str, tuple[int, str, str]] = {}
        threads: dict[str, dict[str, Any]] = {}
        references: dict[str, list[str]] = {}
        for parent, rel_type, event_id, sender, event_type, stream, ts in children:
            original = by_id[parent]
            if rel_type == "m.replace":
                # Only the original sender's edits of the same type count; the latest wins.
                if sender == original.sender and event_type == original.type:
                    if parent not in edits or (ts, event_id) > edits[parent][:2]:
                        edits[parent] = (ts, event_id, sender)
            elif rel_type == "m.thread":
                summary = threads.setdefault(parent, {"count": 0, "latest": (0, ""),
                                                      "participated": original.sender == user_id})
                summary["count"] += 1
                summary["latest"] = max(summary["latest"], (stream, event_id))
                summary["participated"] |= sender == user_id
            elif rel_type == "m.reference":
                references.setdefault(parent, []).append(event_id)
        needed = [e[1] for e in edits.values()] + [t["latest"][1] for t in threads.values()]
        events = await self.hs.events.get_events(needed)
        serialize = self.hs.client_events.serialize
        result: dict[str, dict[str, Any]] = {}
        for parent, (_, edit_id, _) in edits.items():
            if edit_id in events:
                result.setdefault(parent, {})["m.replace"] = serialize(events[edit_id])
        for parent, summary in threads.items():
            latest = events.get(summary["latest"][1])
            if latest is None:
                continue
            result.setdefault(parent, {})["m.thread"] = {
                "latest_event": serialize(latest),
                "count": summary["count"],
                "current_user_participated": summary["participated"],
            }
        for parent, ids in references.items():
            result.setdefault(parent, {})["m.reference"] = {"chunk": [{"event_id": i}
                                                                      for i in ids]}
        return result

    # --- /relations and /threads ----------------------------------------------------------
    async def relations(
        self, user_id: str, device_id: str | None, room_id: str, parent_id: str,
        rel_type: str | None, event_type: str | None, from_token: str | None,
        to_token: str | None, limit: int, direction: str,
    ) -> dict[str, Any]:
        await self.hs.pagination.get_visible_event(user_id, room_id, parent_id)
        limit = max(1, min(limit, MAX_LIMIT))
        backwards = direction == "b"
        start = None if from_token is None else parse_pagination_token(from_token)
        stop = None if to_token is None else parse_pagination_token(to_token)
        if backwards:
            rows = await self.store.page(room_id, parent_id, rel_type, event_type, stop, start,
                                         limit + 1, True)
        else:
            rows = await self.store.page(room_id, parent_id, rel_type, event_type, start, stop,
                                         limit + 1, False)
        more = len(rows) > limit
        rows = rows[:limit]
        events = await self.hs.events.get_events(r[1] for r in rows)
        pdus = await filter_visible(self.hs, user_id, room_id,
                                    [(events[r[1]], r[2]) for r in rows if r[1] in events])
        result: dict[str, Any] = {"chunk": await self.hs.client_events.serialize_events(
            pdus, user_id, device_id)}
        if more and rows:
            last = rows[-1][0]
            result["next_batch"] = pagination_token(last - 1 if backwards else last)
        if from_token is not None:
            result["prev_batch"] = from_token
        return result

    async def threads(
        self, user_id: str, device_id: str | None, room_id: str, include: str,
        from_token: str | None, limit: int,
    ) -> dict[str, Any]:
        room = await self.hs.room_states.get(room_id)
        if room is None or room.membership(user_id) is None:
            raise MatrixError("M_FORBIDDEN", "You are not a member of this room")
        limit = max(1, min(limit, MAX_LIMIT))
        before = None if from_token is None else parse_pagination_token(from_token)
        participant = user_id if include == "participated" else None
        roots = await self.store.thread_roots(room_id, participant, before, limit + 1)
        more = len(roots) > limit
        roots = roots[:limit]
        events = await self.hs.events.get_events(r[0] for r in roots)
        pdus = [events[r[0]] for r in roots if r[0] in events]
        result: dict[str, Any] = {"chunk": await self.hs.client_events.serialize_events(
            pdus, user_id, device_id)}
        if more and roots:
            result["next_batch"] = pagination_token(roots[-1][1])
        return result
