"""Account data of local users (global and per room) and room tags.

Every change is written to the database before the request is answered and
gets a stream id; /sync asks for the changes between two positions. Each
user's account data is cached in memory (an LRU of whole users, loaded on
first use), so a /sync with nothing new never reaches the database. Tags are
the ``m.tag`` room account data, read, changed and written back under a
per-user lock so concurrent tag changes do not lose each other.
"""

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from homeserver.errors import MatrixError
from storage.account_data import GLOBAL, AccountDataStore

logger = logging.getLogger(__name__)

# Account data the server manages itself: clients may read it, not set it (405).
SERVER_MANAGED_TYPES = frozenset({"m.fully_read", "m.push_rules"})
TAG_TYPE = "m.tag"
MAX_TAG_BYTES = 255  # spec: a tag name MUST NOT exceed 255 bytes
MAX_TYPE_BYTES = 255
CACHE_USERS = 10_000


class StreamWriter:
    """Stream ids for one durable stream, and the position readers may see.

    Ids are handed out before the write and the writes may commit out of
    order; ``position`` moves past an id only once every smaller id has
    committed (or failed), so a token at ``position`` never skips a write that
    lands later. ``on_visible`` gets the payloads of the writes that became
    visible, in stream order.
    """

    def __init__(self, current: int, on_visible: Callable[[list[Any]], None]) -> None:
        self.position = current
        self._next = current + 1
        self._unfinished: set[int] = set()
        self._finished: dict[int, Any] = {}
        self._on_visible = on_visible

    def allocate(self) -> int:
        stream_id = self._next
        self._next += 1
        self._unfinished.add(stream_id)
        return stream_id

    def finish(self, stream_id: int, payload: Any = None) -> None:
        """The write of ``stream_id`` committed (with ``payload``) or failed (None)."""
        self._unfinished.discard(stream_id)
        self._finished[stream_id] = payload
        upto = min(self._unfinished) - 1 if self._unfinished else self._next - 1
        if upto <= self.position:
            return
        ready = sorted(i for i in self._finished if i <= upto)
        payloads = [self._finished.pop(i) for i in ready]
        self.position = upto
        visible = [p for p in payloads if p is not None]
        if visible:
            self._on_visible(visible)


class UserLocks:
    """One lock per key, created on demand and dropped once nobody holds or waits."""

    def __init__(self) -> None:
        self._locks: dict[str, defer.DeferredLock] = {}

    async def acquire(self, key: str) -> defer.DeferredLock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = defer.DeferredLock()
        await lock.acquire()
        return lock

    def release(self, key: str, lock: defer.DeferredLock) -> None:
        lock.release()
        if not lock.locked and not lock.waiting and self._locks.get(key) is lock:
            del self._locks[key]


Entry = tuple[int, dict[str, Any]]  # (stream id, content)


class _UserAccountData:
    __slots__ = ("global_", "rooms", "max_stream")

    def __init__(self) -> None:
        self.global_: dict[str, Entry] = {}
        self.rooms: dict[str, dict[str, Entry]] = {}
        self.max_stream = 0

    def apply(self, room_id: str, data_type: str, stream_id: int, content: dict[str, Any]) -> None:
        table = self.global_ if room_id == GLOBAL else self.rooms.setdefault(room_id, {})
        current = table.get(data_type)
        if current is None or current[0] < stream_id:
            table[data_type] = (stream_id, content)
        if stream_id > self.max_stream:
            self.max_stream = stream_id


def _changes(table: dict[str, Entry] | None, since: int, upto: int) -> list[dict[str, Any]]:
    if not table:
        return []
    picked = sorted(
        (stream_id, data_type, content)
        for data_type, (stream_id, content) in table.items()
        if since < stream_id <= upto
    )
    return [{"type": data_type, "content": content} for _, data_type, content in picked]


def check_client_settable(data_type: str) -> None:
    """405 for the types the server manages (m.fully_read, m.push_rules), 400 for bad ones."""
    if data_type in SERVER_MANAGED_TYPES:
        raise MatrixError("M_BAD_JSON", f"Cannot set {data_type} through this API.", 405)
    if not data_type or len(data_type.encode("utf-8")) > MAX_TYPE_BYTES:
        raise MatrixError("M_INVALID_PARAM", f"The type must be 1 to {MAX_TYPE_BYTES} bytes")


def check_room_id(room_id: str) -> None:
    if not room_id.startswith("!") or len(room_id) < 2:
        raise MatrixError("M_INVALID_PARAM", f"{room_id} is not a valid room ID.")


class AccountDataService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self.store = AccountDataStore(hs.database)
        self._stream = StreamWriter(self.store.max_stream_id_blocking(), self._on_visible)
        self._cache: OrderedDict[str, _UserAccountData] = OrderedDict()
        # user -> waiters of a load in flight, and the writes that committed meanwhile
        self._loading: dict[str, list[defer.Deferred[_UserAccountData]]] = {}
        self._written_while_loading: dict[str, list[tuple[str, str, int, dict[str, Any]]]] = {}
        self._locks = UserLocks()

    @property
    def position(self) -> int:
        return self._stream.position

    # --- the per-user cache ----------------------------------------------------------------
    async def _user(self, user_id: str) -> _UserAccountData:
        data = self._cache.get(user_id)
        if data is not None:
            self._cache.move_to_end(user_id)
            return data
        waiters = self._loading.get(user_id)
        if waiters is not None:
            d: defer.Deferred[_UserAccountData] = defer.Deferred()
            waiters.append(d)
            return await d
        self._loading[user_id] = waiters = []
        self._written_while_loading[user_id] = []
        try:
            rows = await self.store.get_user_account_data(user_id)
        except BaseException as e:
            self._written_while_loading.pop(user_id, None)
            for d in self._loading.pop(user_id):
                d.errback(e)
            raise
        data = _UserAccountData()
        for row in rows:
            data.apply(row.room_id, row.data_type, row.stream_id, row.content)
        for write in self._written_while_loading.pop(user_id):
            data.apply(*write)
        self._cache[user_id] = data
        if len(self._cache) > CACHE_USERS:
            self._cache.popitem(last=False)
        for d in self._loading.pop(user_id):
            d.callback(data)
        return data

    def _applied(
        self, user_id: str, room_id: str, data_type: str, stream_id: int, content: dict[str, Any]
    ) -> None:
        """A write committed: the cache (or the load in flight) takes it."""
        data = self._cache.get(user_id)
        if data is not None:
            data.apply(room_id, data_type, stream_id, content)
        pending = self._written_while_loading.get(user_id)
        if pending is not None:
            pending.append((room_id, data_type, stream_id, content))

    def _on_visible(self, user_ids: list[str]) -> None:
        self.hs.notifier.wake(user_ids=set(user_ids))

    # --- reading ---------------------------------------------------------------------------
    async def get_global(self, user_id: str, data_type: str) -> dict[str, Any] | None:
        entry = (await self._user(user_id)).global_.get(data_type)
        return None if entry is None else entry[1]

    async def get_room(self, user_id: str, room_id: str, data_type: str) -> dict[str, Any] | None:
        entry = (await self._user(user_id)).rooms.get(room_id, {}).get(data_type)
        return None if entry is None else entry[1]

    async def global_changes(self, user_id: str, since_pos: int, upto: int) -> list[dict[str, Any]]:
        """Global account data changed in (since_pos, upto] as events; 0 means all of it."""
        data = await self._user(user_id)
        if since_pos >= data.max_stream:
            return []
        return _changes(data.global_, since_pos, upto)

    async def room_changes(
        self, user_id: str, room_id: str, since_pos: int, upto: int
    ) -> list[dict[str, Any]]:
        """The room's account data for the user changed in (since_pos, upto]."""
        data = await self._user(user_id)
        if since_pos >= data.max_stream:
            return []
        return _changes(data.rooms.get(room_id), since_pos, upto)

    # --- writing ---------------------------------------------------------------------------
    async def set_global(self, user_id: str, data_type: str, content: dict[str, Any]) -> int:
        """Set global account data (no checks: for the server's own types too)."""
        lock = await self._locks.acquire(user_id)
        try:
            return await self._write(user_id, GLOBAL, data_type, content)
        finally:
            self._locks.release(user_id, lock)

    async def set_room(
        self, user_id: str, room_id: str, data_type: str, content: dict[str, Any]
    ) -> int:
        """Set the user's account data for a room (no checks: m.fully_read goes here too)."""
        lock = await self._locks.acquire(user_id)
        try:
            return await self._write(user_id, room_id, data_type, content)
        finally:
            self._locks.release(user_id, lock)

    async def _write(
        self, user_id: str, room_id: str, data_type: str, content: dict[str, Any]
    ) -> int:
        """Persist one change, then cache it and make it visible (the user's lock is held)."""
        stream_id = self._stream.allocate()
        try:
            await self.store.set_account_data(user_id, room_id, data_type, stream_id, content)
        except BaseException:
            self._stream.finish(stream_id)
            raise
        self._applied(user_id, room_id, data_type, stream_id, content)
        self._stream.finish(stream_id, user_id)
        return stream_id

    # --- tags ------------------------------------------------------------------------------
    async def get_tags(self, user_id: str, room_id: str) -> dict[str, Any]:
        content = await self.get_room(user_id, room_id, TAG_TYPE) or {}
        tags = content.get("tags")
        return tags if isinstance(tags, dict) else {}

    async def set_tag(self, user_id: str, room_id: str, tag: str, body: dict[str, Any]) -> None:
        if not tag or len(tag.encode("utf-8")) > MAX_TAG_BYTES:
            raise MatrixError("M_INVALID_PARAM", f"A tag is 1 to {MAX_TAG_BYTES} bytes")
        await self._change_tags(user_id, room_id, lambda tags: tags.__setitem__(tag, body))

    async def remove_tag(self, user_id: str, room_id: str, tag: str) -> None:
        await self._change_tags(user_id, room_id, lambda tags: tags.pop(tag, None))

    async def _change_tags(
        self, user_id: str, room_id: str, change: Callable[[dict[str, Any]], Any]
    ) -> None:
        lock = await self._locks.acquire(user_id)
        try:
            content = await self.get_room(user_id, room_id, TAG_TYPE)
            tags = dict(await self.get_tags(user_id, room_id))
            before = dict(tags)
            change(tags)
            if tags == before:
                return  # nothing changed: no write, nothing new in /sync
            await self._write(user_id, room_id, TAG_TYPE, {**(content or {}), "tags": tags})
        finally:
            self._locks.release(user_id, lock)
