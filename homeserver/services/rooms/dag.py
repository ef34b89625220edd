"""Each room's auth DAG in memory, for state resolution.

State resolution (``homeserver/core/state_res``) needs every state event the
state sets involve, indexed in a ``ChainIndex``, and which of them were
rejected. A room's DAG is loaded from the database the first time its forks
need resolving (rooms that never fork never load one) and then follows
every state event built or received in the room.
"""

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet import defer

from homeserver.core.events import Pdu
from homeserver.core.room_versions import RoomVersion
from homeserver.core.state_res import (
    ChainIndex,
    StateKey,
    StateMap,
    UnindexedEventError,
    effective_auth_event_ids,
    index_event,
    resolve_state,
)
from storage.events import EventsStore

logger = logging.getLogger(__name__)


class RoomDag:
    """A room's state events by id, which were rejected, and their chain index."""

    def __init__(self) -> None:
        self.index = ChainIndex()
        self.events: dict[str, Pdu] = {}
        self.rejected: set[str] = set()

    # EventSource, for resolve_state
    def get_event(self, event_id: str) -> Pdu:
        return self.events[event_id]

    def is_rejected(self, event_id: str) -> bool:
        return event_id in self.rejected

    def add(self, pdus: Iterable[Pdu], rejected: Iterable[str] = ()) -> None:
        """Index state events, auth events first (any order given)."""
        self.rejected.update(rejected)
        pending = {p.event_id: p for p in pdus if p.is_state and p.event_id not in self.index}
        for pdu in pending.values():
            self.events[pdu.event_id] = pdu
        # Repeatedly index what has its auth events indexed (a topological order).
        while pending:
            ready = [
                p for p in pending.values()
                if all(a in self.index for a in effective_auth_event_ids(p))
            ]
            if not ready:
                logger.warning("%d state events lack auth events; not indexed", len(pending))
                return
            for pdu in sorted(ready, key=lambda p: p.depth):
                index_event(self.index, pdu)
                del pending[pdu.event_id]

    def resolve(self, room_version: RoomVersion, state_sets: Sequence[StateMap]) -> dict[StateKey, str]:
        return resolve_state(room_version, state_sets, self, self.index)


def unconflicted(state_sets: Sequence[StateMap]) -> dict[StateKey, str] | None:
    """The state if every set agrees on every key they have (no resolution needed)."""
    merged: dict[StateKey, str] = {}
    for state in state_sets:
        for key, event_id in state.items():
            if merged.setdefault(key, event_id) != event_id:
                return None
    if any(len(s) != len(merged) for s in state_sets):
        return None
    return merged


class RoomDags:
    def __init__(self, store: EventsStore) -> None:
        self._store = store
        self._dags: dict[str, RoomDag] = {}
        # Rooms being loaded: their waiters, and state events built meanwhile.
        self._waiters: dict[str, list[defer.Deferred[RoomDag]]] = {}
        self._built_while_loading: dict[str, list[tuple[Pdu, bool]]] = {}

    async def get(self, room_id: str) -> RoomDag:
        dag = self._dags.get(room_id)
        if dag is not None:
            return dag
        waiters = self._waiters.get(room_id)
        if waiters is not None:
            d: defer.Deferred[RoomDag] = defer.Deferred()
            waiters.append(d)
            return await d
        self._waiters[room_id] = []
        self._built_while_loading[room_id] = []
        try:
            events, rejected = await self._store.get_room_state_events(room_id)
            dag = RoomDag()
            dag.add(events, rejected)
            for pdu, was_rejected in self._built_while_loading[room_id]:
                dag.add([pdu], [pdu.event_id] if was_rejected else ())
        except BaseException as e:
            self._built_while_loading.pop(room_id, None)
            for d in self._waiters.pop(room_id):
                d.errback(e)
            raise
        self._built_while_loading.pop(room_id, None)
        self._dags[room_id] = dag
        for d in self._waiters.pop(room_id):
            d.callback(dag)
        return dag

    def get_loaded(self, room_id: str) -> RoomDag | None:
        return self._dags.get(room_id)

    def on_built(self, pdu: Pdu, rejected: bool = False) -> None:
        """A state event joins the room's DAG (if loaded) before it is persisted."""
        if not pdu.is_state:
            return
        loading = self._built_while_loading.get(pdu.room_id)
        if loading is not None:
            loading.append((pdu, rejected))
        dag = self._dags.get(pdu.room_id)
        if dag is not None:
            try:
                dag.add([pdu], [pdu.event_id] if rejected else ())
            except UnindexedEventError:
                logger.warning("could not index %s", pdu.event_id)

    def on_persisted(self, items: list[Any]) -> None:
        for item in items:
            if item.pdu.is_state:
                self.on_built(item.pdu, item.rejected_reason is not None)
