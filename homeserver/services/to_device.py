"""Send-to-device messages: stored until the device acknowledges them by syncing.

PUT /sendToDevice writes the messages for every recipient device in one
transaction (with its transaction id, for idempotent retries) before it is
answered, so nothing acknowledged is lost on a restart. /sync returns a
device's messages in (since, upto] and deletes those at or below ``since``:
the client syncing with a token says it has the messages that token covered.

Which devices have messages waiting is kept in memory (loaded at start-up,
updated on every send and delivery), so a /sync for a device with nothing
waiting never reaches the database.

Messages for users on other servers go to the federation sender, which
stores them (one m.direct_to_device EDU per server) until that server has
acknowledged them. Messages from other servers' users (``receive``) are
stored like local ones, the EDU's message id standing for the transaction id.
"""

import logging
from collections.abc import Mapping
from typing import Any

from homeserver.services.account_data import StreamWriter
from storage.to_device import ToDeviceStore

logger = logging.getLogger(__name__)

# Messages per /sync response, as the spec recommends (when the caller asks for a limit).
MAX_PER_SYNC = 100
TXN_RETENTION_MS = 24 * 3600 * 1000
TXN_CLEANUP_INTERVAL_MS = 3600 * 1000


class ToDeviceBatch(list[dict[str, Any]]):
    """One sync's messages; ``position`` is how far in the stream they reach.

    It is the sync's ``upto`` unless a limit cut the batch short: then it is
    the stream id of the last message returned, and the sync's token must not
    go past it.
    """

    position: int


class ToDeviceService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self.server_name: str = hs.server_name
        self.store = ToDeviceStore(hs.database)
        self._stream = StreamWriter(self.store.position_blocking(), self._on_visible)
        # (user, device) -> [highest stream id stored for it, all <= this are deleted]
        self._waiting: dict[tuple[str, str], list[int]] = {
            key: [highest, 0] for key, highest in self.store.pending_devices_blocking().items()
        }
        self._last_cleanup = 0
        accounts = getattr(hs, "accounts", None)
        if accounts is not None:
            accounts.device_deletion_hooks.append(self._on_devices_deleted)

    @property
    def position(self) -> int:
        return self._stream.position

    def is_mine(self, user_id: str) -> bool:
        return user_id.startswith("@") and user_id.partition(":")[2] == self.server_name

    # --- sending ---------------------------------------------------------------------------
    async def send(
        self,
        sender: str,
        sender_device: str,
        txn_id: str,
        event_type: str,
        messages: Mapping[str, Mapping[str, dict[str, Any]]],
    ) -> None:
        """Store ``messages`` ({user: {device or "*": content}}) once per transaction id.

        ``sender_device`` scopes the transaction id (the device id, or another
        stable name of the access token for requests without a device).
        """
        local = {u: m for u, m in messages.items() if self.is_mine(u)}
        remote = sorted(u for u in messages if u not in local)
        delivered = await self._store(sender, sender_device, txn_id, event_type, local)
        # Federation: messages for remote users, stored durably until their server has them
        # (only the first request with this transaction id: ``delivered`` is None on a retry).
        federation = getattr(self.hs, "federation_sender", None)
        if remote and delivered is not None and federation is not None:
            await federation.send_to_device_messages(
                sender, event_type, {u: messages[u] for u in remote}
            )

    async def receive(
        self,
        origin: str,
        sender: str,
        message_id: str,
        event_type: str,
        messages: Mapping[str, Mapping[str, dict[str, Any]]],
    ) -> bool:
        """An m.direct_to_device EDU from ``origin`` (the caller checked that ``sender``
        is one of its users): store the messages for local users' devices.

        The message id is a transaction id: a transaction retried after a
        lost answer carries the EDU again, and it is stored only once (the
        ids are kept for a day, in the database). Messages for users of other
        servers are dropped, never relayed. False for a repeat.
        """
        local = {u: m for u, m in messages.items() if self.is_mine(u)}
        return await self._store(sender, origin, message_id, event_type, local) is not None

    async def _store(
        self,
        sender: str,
        sender_device: str,
        txn_id: str,
        event_type: str,
        local: Mapping[str, Mapping[str, dict[str, Any]]],
    ) -> list[tuple[str, str]] | None:
        """Store messages for local users once per transaction id; the devices that got
        one, or None when the transaction id was used before."""
        now = self.hs.clock.time_msec()
        stream_id = self._stream.allocate()
        try:
            delivered = await self.store.add_messages(
                sender, sender_device, txn_id, now, stream_id, event_type, local
            )
        except BaseException:
            self._stream.finish(stream_id)
            raise
        for key in delivered or ():
            entry = self._waiting.get(key)
            if entry is None:
                self._waiting[key] = [stream_id, 0]
            elif stream_id > entry[0]:
                entry[0] = stream_id
        users = {user_id for user_id, _ in delivered} if delivered else None
        self._stream.finish(stream_id, users)
        if now - self._last_cleanup >= TXN_CLEANUP_INTERVAL_MS:
            self._last_cleanup = now
            try:
                await self.store.delete_txns_before(now - TXN_RETENTION_MS)
            except Exception:
                logger.exception("deleting old to-device transaction ids failed")
        return delivered

    def _on_visible(self, batches: list[set[str]]) -> None:
        users: set[str] = set()
        for batch in batches:
            users.update(batch)
        self.hs.notifier.wake(user_ids=users)

    # --- delivering ------------------------------------------------------------------------
    async def messages_for(
        self,
        user_id: str,
        device_id: str,
        since_pos: int,
        upto: int,
        limit: int | None = None,
    ) -> ToDeviceBatch:
        """The device's messages in (since_pos, upto], oldest first, at most ``limit``.

        Messages at or below ``since_pos`` were delivered by the sync that
        returned that token, so they are deleted now.
        """
        batch = ToDeviceBatch()
        batch.position = upto
        key = (user_id, device_id)
        entry = self._waiting.get(key)
        if entry is None:
            return batch
        highest, deleted_upto = entry
        delete_upto = since_pos if min(since_pos, highest) > deleted_upto else None
        fetch = highest > since_pos and upto > since_pos
        if delete_upto is None and not fetch:
            return batch
        rows = await self.store.fetch(
            user_id, device_id, delete_upto, since_pos, upto if fetch else since_pos, limit
        )
        if delete_upto is not None:
            entry = self._waiting.get(key)
            if entry is not None:
                entry[1] = max(entry[1], delete_upto)
                if entry[1] >= entry[0]:
                    del self._waiting[key]  # nothing left for this device
        batch.extend(
            {"type": row.message_type, "sender": row.sender, "content": row.content} for row in rows
        )
        if limit is not None and rows and len(rows) >= limit:
            batch.position = rows[-1].stream_id
        return batch

    def waiting_devices(self) -> int:
        return len(self._waiting)

    async def _on_devices_deleted(self, user_id: str, device_ids: list[str]) -> None:
        for device_id in device_ids:
            self._waiting.pop((user_id, device_id), None)
        await self.store.delete_devices(user_id, device_ids)
