"""Read receipts (m.read, m.read.private), threaded or not, and the fully read marker.

Each room's receipts live in memory (loaded on first use) so /sync builds its
``m.receipt`` event without the database. Writes are queued and written in
batches, one transaction each; a batch takes the next positions of the
receipts stream in order, so a /sync token never skips a receipt committed
after it. After commit the room's cache moves on, the stream position
advances, and sleeping syncs of the room's members (only the owner for
``m.read.private``) wake.

Receipts only move forward: a receipt for an event older than the one the
user's receipt of the same type and thread points at already is ignored.

Other servers' users' public receipts arrive in m.receipt EDUs
(``on_remote_receipt``) and are kept like local ones; only receipts of an
event we have are kept, since its position in the room orders them.
"""

import logging
from typing import Any

import attrs
from twisted.internet import defer

from homeserver.core.events import Pdu
from homeserver.errors import MatrixError
from storage.receipts import UNTHREADED, ReceiptsStore, StoredReceipt

logger = logging.getLogger(__name__)

READ = "m.read"
READ_PRIVATE = "m.read.private"
FULLY_READ = "m.fully_read"
RECEIPT_TYPES = (READ, READ_PRIVATE, FULLY_READ)
MAIN = "main"
THREAD = "m.thread"
MAX_THREAD_HOPS = 3
LOG_SIZE = 1000
MAX_BATCH = 500


async def thread_of(hs: Any, pdu: Pdu) -> str:
    """The thread an event is in: ``main`` or the thread root's event id.

    Follows relations up to three hops (a reaction to an event in a thread is in
    that thread); thread roots and anything not in a thread are ``main``.
    """
    relates = pdu.content.get("m.relates_to")
    for _ in range(MAX_THREAD_HOPS):
        if not isinstance(relates, dict):
            return MAIN
        parent_id = relates.get("event_id")
        rel_type = relates.get("rel_type")
        if not isinstance(parent_id, str) or not isinstance(rel_type, str):
            return MAIN
        if rel_type == THREAD:
            return parent_id
        parent = hs.event_cache.get(parent_id)
        if parent is None:
            parent = await hs.events.get_event(parent_id)
            if parent is None:
                return MAIN
        relates = parent.content.get("m.relates_to")
    return MAIN


@attrs.define(slots=True)
class Receipt:
    receipt_type: str
    user_id: str
    thread_id: str  # UNTHREADED (""), "main" or a thread root
    event_id: str
    event_stream: int
    ts: int
    stream_id: int

    def stored(self, room_id: str) -> StoredReceipt:
        return StoredReceipt(
            room_id,
            self.receipt_type,
            self.user_id,
            self.thread_id,
            self.event_id,
            self.event_stream,
            self.ts,
            self.stream_id,
        )


class RoomReceipts:
    """One room's latest receipts, by user then (receipt type, thread)."""

    __slots__ = ("by_user", "max_stream", "log", "log_floor", "complete")

    def __init__(self, position: int) -> None:
        self.by_user: dict[str, dict[tuple[str, str], Receipt]] = {}
        self.max_stream = 0
        # Receipts applied since this object was made, in stream order; every change
        # with a stream id above ``log_floor`` is in it.
        self.log: list[Receipt] = []
        self.log_floor = position
        self.complete = False  # loaded from the database

    def get(self, user_id: str, receipt_type: str, thread_id: str) -> Receipt | None:
        mine = self.by_user.get(user_id)
        return mine.get((receipt_type, thread_id)) if mine else None

    def apply(self, receipt: Receipt) -> None:
        """A receipt just committed."""
        self.by_user.setdefault(receipt.user_id, {})[(receipt.receipt_type, receipt.thread_id)] = (
            receipt
        )
        self.max_stream = max(self.max_stream, receipt.stream_id)
        self.log.append(receipt)
        if len(self.log) > LOG_SIZE:
            cut = len(self.log) // 2
            self.log_floor = self.log[cut - 1].stream_id
            del self.log[:cut]

    def merge_loaded(self, receipt: Receipt) -> None:
        key = (receipt.receipt_type, receipt.thread_id)
        mine = self.by_user.setdefault(receipt.user_id, {})
        current = mine.get(key)
        if current is None or current.stream_id < receipt.stream_id:
            mine[key] = receipt
        self.max_stream = max(self.max_stream, receipt.stream_id)

    def changed(self, since: int | None, upto: int) -> list[Receipt]:
        """The latest receipts with a stream id in (since, upto] (all up to ``upto``
        when ``since`` is None)."""
        if since is not None and self.max_stream <= since:
            return []
        if since is not None and since >= self.log_floor:
            found = []
            for receipt in reversed(self.log):
                if receipt.stream_id <= since:
                    break
                if (
                    receipt.stream_id <= upto
                    and self.get(receipt.user_id, receipt.receipt_type, receipt.thread_id)
                    is receipt
                ):
                    found.append(receipt)
            return found
        return [
            r
            for mine in self.by_user.values()
            for r in mine.values()
            if r.stream_id <= upto and (since is None or r.stream_id > since)
        ]

    def read_positions(self, user_id: str) -> tuple[int, dict[str, int]]:
        """(unthreaded read-up-to, thread -> read-up-to): the furthest of m.read and
        m.read.private, as event stream orderings."""
        unthreaded = 0
        threads: dict[str, int] = {}
        for (receipt_type, thread_id), receipt in (self.by_user.get(user_id) or {}).items():
            if receipt_type not in (READ, READ_PRIVATE):
                continue
            if thread_id == UNTHREADED:
                unthreaded = max(unthreaded, receipt.event_stream)
            else:
                threads[thread_id] = max(threads.get(thread_id, 0), receipt.event_stream)
        return unthreaded, threads


@attrs.define(slots=True)
class _Queued:
    room_id: str
    receipt: Receipt
    done: "defer.Deferred[None]"


class ReceiptsService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self.store = ReceiptsStore(hs.database)
        self.position: int = hs.database.run_blocking(self.store.max_stream_id_txn)
        self._next_id = self.position + 1
        self._rooms: dict[str, RoomReceipts] = {}
        self._loading: dict[str, list[defer.Deferred[RoomReceipts]]] = {}
        self._queue: list[_Queued] = []
        self._draining = False

    # --- the room cache ---------------------------------------------------------------
    def _room_object(self, room_id: str) -> RoomReceipts:
        room = self._rooms.get(room_id)
        if room is None:
            room = self._rooms[room_id] = RoomReceipts(self.position)
        return room

    async def room(self, room_id: str) -> RoomReceipts:
        """The room's receipts, loaded from the database on first use."""
        room = self._rooms.get(room_id)
        if room is not None and room.complete:
            return room
        waiters = self._loading.get(room_id)
        if waiters is not None:
            d: defer.Deferred[RoomReceipts] = defer.Deferred()
            waiters.append(d)
            return await d
        self._loading[room_id] = waiters = []
        try:
            rows = await self.store.get_room_receipts(room_id)
        except BaseException as e:
            for d in self._loading.pop(room_id):
                d.errback(e)
            raise
        # Anything committed while loading was applied to the object already.
        room = self._room_object(room_id)
        for row in rows:
            room.merge_loaded(
                Receipt(
                    row.receipt_type,
                    row.user_id,
                    row.thread_id,
                    row.event_id,
                    row.event_stream,
                    row.ts,
                    row.stream_id,
                )
            )
        room.complete = True
        for d in self._loading.pop(room_id):
            d.callback(room)
        return room

    async def read_positions(self, user_id: str, room_id: str) -> tuple[int, dict[str, int]]:
        return (await self.room(room_id)).read_positions(user_id)

    # --- /sync -------------------------------------------------------------------------
    async def receipt_event(
        self, user_id: str, room_id: str, since_pos: int | None, upto: int
    ) -> dict[str, Any] | None:
        """The room's m.receipt event for ``user_id``: receipts changed in (since, upto]."""
        room = self._rooms.get(room_id)
        if (
            room is not None
            and since_pos is not None
            and room.max_stream <= since_pos
            and since_pos >= room.log_floor
        ):
            return None  # nothing new, without waiting for a load
        room = await self.room(room_id)
        receipts = room.changed(since_pos, upto)
        if not receipts:
            return None
        content: dict[str, dict[str, dict[str, Any]]] = {}
        chosen: dict[tuple[str, str, str], int] = {}
        for receipt in receipts:
            if receipt.receipt_type == READ_PRIVATE and receipt.user_id != user_id:
                continue
            if receipt.receipt_type not in (READ, READ_PRIVATE):
                continue
            # One entry per event, type and user: the newest receipt wins.
            key = (receipt.event_id, receipt.receipt_type, receipt.user_id)
            if chosen.get(key, -1) > receipt.stream_id:
                continue
            chosen[key] = receipt.stream_id
            entry: dict[str, Any] = {"ts": receipt.ts}
            if receipt.thread_id != UNTHREADED:
                entry["thread_id"] = receipt.thread_id
            content.setdefault(receipt.event_id, {}).setdefault(receipt.receipt_type, {})[
                receipt.user_id
            ] = entry
        if not content:
            return None
        return {"type": "m.receipt", "content": content}

    # --- writing ------------------------------------------------------------------------
    async def _event_in_room(self, room_id: str, event_id: str) -> tuple[Pdu, int]:
        hs = self.hs
        pdu = await hs.events.get_event(event_id)
        if pdu is None or pdu.room_id != room_id:
            raise MatrixError("M_NOT_FOUND", "Event not found in this room")
        room = hs.room_states.get_cached(room_id)
        if room is not None:
            for stream, recent_id, _ in reversed(room.recent):
                if recent_id == event_id:
                    return pdu, stream
        positions = await hs.events_store.get_event_positions([event_id])
        if event_id not in positions:
            raise MatrixError("M_NOT_FOUND", "Event not found in this room")
        return pdu, positions[event_id][0]

    async def _check_member(self, user_id: str, room_id: str) -> None:
        room = await self.hs.room_states.get(room_id)
        if room is None or room.membership(user_id) != "join":
            raise MatrixError("M_FORBIDDEN", "You are not joined to this room")

    async def send_receipt(
        self,
        user_id: str,
        room_id: str,
        receipt_type: str,
        event_id: str,
        thread_id: str | None = None,
    ) -> None:
        """POST /rooms/{roomId}/receipt/{receiptType}/{eventId}."""
        if receipt_type not in RECEIPT_TYPES:
            raise MatrixError("M_INVALID_PARAM", f"Unknown receipt type {receipt_type!r}")
        if thread_id is not None and (not isinstance(thread_id, str) or not thread_id):
            raise MatrixError("M_INVALID_PARAM", "thread_id field must be a non-empty string")
        if receipt_type == FULLY_READ and thread_id is not None:
            raise MatrixError("M_INVALID_PARAM", "thread_id is not allowed for m.fully_read")
        await self._check_member(user_id, room_id)
        pdu, event_stream = await self._event_in_room(room_id, event_id)
        if receipt_type == FULLY_READ:
            await self._set_fully_read(user_id, room_id, event_id)
            return
        if thread_id is not None:
            in_thread = await thread_of(self.hs, pdu)
            if thread_id == MAIN and in_thread != MAIN:
                raise MatrixError("M_INVALID_PARAM", "The event is in a thread, not in main")
            if thread_id != MAIN and in_thread != thread_id and event_id != thread_id:
                raise MatrixError("M_INVALID_PARAM", "The event is not in that thread")
        await self._write(
            room_id,
            Receipt(
                receipt_type,
                user_id,
                UNTHREADED if thread_id is None else thread_id,
                event_id,
                event_stream,
                self.hs.clock.time_msec(),
                0,
            ),
        )

    async def on_remote_receipt(
        self, user_id: str, room_id: str, event_id: str, ts: int, thread_id: str | None
    ) -> None:
        """A public read receipt from an m.receipt EDU (the caller checked that
        ``user_id`` belongs to the sending server); the user must be joined and the
        event known here (MatrixError otherwise). Local users see it in /sync; it is
        not sent out again (the federation sender only sends our users' receipts).
        """
        await self._check_member(user_id, room_id)
        _, event_stream = await self._event_in_room(room_id, event_id)
        thread = UNTHREADED if thread_id is None else thread_id
        await self._write(room_id, Receipt(READ, user_id, thread, event_id, event_stream, ts, 0))

    async def set_read_markers(
        self,
        user_id: str,
        room_id: str,
        fully_read: str | None,
        read: str | None,
        read_private: str | None,
    ) -> None:
        """POST /rooms/{roomId}/read_markers."""
        await self._check_member(user_id, room_id)
        for receipt_type, event_id in ((READ, read), (READ_PRIVATE, read_private)):
            if event_id is not None:
                await self.send_receipt(user_id, room_id, receipt_type, event_id)
        if fully_read is not None:
            await self._event_in_room(room_id, fully_read)
            await self._set_fully_read(user_id, room_id, fully_read)

    async def _set_fully_read(self, user_id: str, room_id: str, event_id: str) -> None:
        account_data = self.hs.account_data
        current = await account_data.get_room(user_id, room_id, FULLY_READ)
        if current is not None and current.get("event_id") == event_id:
            return  # unchanged: nothing new for /sync
        await account_data.set_room(user_id, room_id, FULLY_READ, {"event_id": event_id})

    async def _write(self, room_id: str, receipt: Receipt) -> None:
        room = await self.room(room_id)
        current = room.get(receipt.user_id, receipt.receipt_type, receipt.thread_id)
        if current is not None and current.event_stream >= receipt.event_stream:
            return  # receipts only move forward
        d: defer.Deferred[None] = defer.Deferred()
        self._queue.append(_Queued(room_id, receipt, d))
        if not self._draining:
            self._draining = True
            defer.ensureDeferred(self._drain())
        await d

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                await self._write_batch(batch)
        finally:
            self._draining = False

    async def _write_batch(self, batch: list[_Queued]) -> None:
        accepted: list[_Queued] = []
        latest: dict[tuple[str, str, str, str], Receipt] = {}
        for queued in batch:
            r = queued.receipt
            key = (queued.room_id, r.user_id, r.receipt_type, r.thread_id)
            current = latest.get(key) or self._room_object(queued.room_id).get(
                r.user_id, r.receipt_type, r.thread_id
            )
            if current is not None and current.event_stream >= r.event_stream:
                queued.done.callback(None)  # overtaken by a newer receipt
                continue
            r.stream_id = self._next_id
            self._next_id += 1
            latest[key] = r
            accepted.append(queued)
        if not accepted:
            return
        try:
            await self.store.write_receipts([q.receipt.stored(q.room_id) for q in accepted])
        except Exception as e:
            logger.exception("writing %d receipts failed", len(accepted))
            for queued in accepted:
                queued.done.errback(e)
            return
        rooms: set[str] = set()
        users: set[str] = set()
        federation = getattr(self.hs, "federation_sender", None)
        for queued in accepted:
            self._room_object(queued.room_id).apply(queued.receipt)
            if queued.receipt.receipt_type == READ:
                rooms.add(queued.room_id)
                # Federation: public read receipts of local users go to the room's other servers.
                if federation is not None:
                    r = queued.receipt
                    federation.on_receipt(queued.room_id, READ, r.user_id, r.event_id, r.ts,
                                          None if r.thread_id == UNTHREADED else r.thread_id)
            users.add(queued.receipt.user_id)
        self.position = accepted[-1].receipt.stream_id
        # Unread counts read the receipts from memory: the wake-up sees the new ones.
        self.hs.notifier.wake(room_ids=rooms, user_ids=users)
        for queued in accepted:
            queued.done.callback(None)
