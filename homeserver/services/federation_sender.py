"""Sending our events and EDUs to other servers, in transactions.

After each committed batch of events, every event one of our users sent
goes to the servers of the room's joined members (and, for an invite, knock,
leave or ban, to the server of the user it is about), minus ourselves.

Per destination there is one position, durable in ``federation_destinations``:
the stream ordering up to which it has our events. Events are not copied into
a queue table: a destination's queue in memory holds the events that arrived
since ``mem_since``; anything between its position and ``mem_since`` (after a
restart, after the memory queue overflowed during a long outage) is read back
from the events table ("catching up"). So nothing is lost and order is kept.

One transaction is in flight per destination, with at most 50 PDUs and 100
EDUs. A transaction that fails (no connection, 5xx, 429) is retried with the
same id and content once the destination's back-off
(``hs.federation_client.backoff``) allows, or at once when the back-off says
the destination has recovered. Other 4xx answers drop the transaction (logged):
retrying cannot help. Errors for single PDUs in the answer are only logged.

EDUs: ``send_edu`` (ephemeral, in memory; a ``key`` makes a newer EDU replace
an older unsent one) and ``send_to_device`` (durable in
``federation_outbox_to_device`` until a transaction carrying it is
acknowledged). ``on_typing``, ``on_receipt``, ``on_presence`` and
``send_to_device_messages`` are what the typing, receipts, presence and
to-device services call. Presence updates for one destination are batched
into one m.presence EDU per transaction.
"""

import logging
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from twisted.internet import defer

from homeserver.core.events import MEMBER
from homeserver.services.federation_client import (
    DestinationBlockedError,
    FederationError,
    HttpResponseError,
    NotRetryingDestination,
    build_path,
)
from storage.events import EventToPersist
from storage.federation_sender import FederationSenderStore, domain_of

logger = logging.getLogger(__name__)

MAX_PDUS_PER_TXN = 50
MAX_EDUS_PER_TXN = 100
# Events kept in memory per destination; beyond this it catches up from the database.
MAX_QUEUED_PDUS = 1000
# Ephemeral EDUs kept per destination; beyond this the oldest are dropped.
MAX_QUEUED_EDUS = 1000
# When a failure left no back-off to follow (a 429, say): wait this long.
FALLBACK_RETRY_MS = 30_000
# Membership changes that concern the target user's server even when it has no
# joined member in the room.
_TARGET_MEMBERSHIPS = ("invite", "knock", "leave", "ban")
PRESENCE = "m.presence"
TYPING = "m.typing"
RECEIPT = "m.receipt"
TO_DEVICE = "m.direct_to_device"


@attrs.define
class _Transaction:
    txn_id: str
    pdus: list[dict[str, Any]]
    edus: list[dict[str, Any]]
    position: int | None  # the destination's position once it is acknowledged
    to_device_ids: list[int]
    keyed: list[tuple[Any, Any]]  # (key, entry) of the ephemeral EDUs it carries


@attrs.define(eq=False)
class _Destination:
    name: str
    position: int  # acknowledged up to this stream ordering (durable)
    mem_since: int  # every event for it after this one is in ``pdus``
    known: bool = True  # has a federation_destinations row (or one is being written)
    pdus: list[tuple[int, dict[str, Any]]] = attrs.Factory(list)
    edus: OrderedDict[Any, tuple[str, dict[str, Any]]] = attrs.Factory(OrderedDict)
    presence: dict[str, dict[str, Any]] = attrs.Factory(dict)
    to_device: list[tuple[int, dict[str, Any]]] = attrs.Factory(list)
    in_flight: bool = False
    pending: _Transaction | None = None  # built, not yet acknowledged: resent as is
    timer: Any = None
    retry_at: int = 0

    def has_work(self) -> bool:
        return bool(
            self.pending
            or self.position < self.mem_since
            or any(stream > self.position for stream, _ in self.pdus)
            or self.edus
            or self.presence
            or self.to_device
        )


class FederationSender:
    def __init__(self, hs: Any, client: Any = None, clock: Any = None) -> None:
        self.hs = hs
        self.server_name: str = hs.server_name
        self.client = client if client is not None else hs.federation_client
        self.clock = clock if clock is not None else hs.clock
        self.store = FederationSenderStore(hs.database)
        self._destinations: dict[str, _Destination] = {}
        self._txn_counter = 0
        self._edu_counter = 0
        self._detached = False
        # Committed batches waiting for their destinations to be worked out, in order.
        self._incoming: list[EventToPersist] = []
        self._processing = False
        # Presence changes whose destinations are being worked out: user -> newest.
        self._presence_pending: dict[str, dict[str, Any]] = {}
        startup_position = hs.stream_ids.persisted_upto
        rows, outbox = self.store.load_blocking()
        for row in rows.values():
            d = _Destination(row.destination, row.last_successful_stream_ordering, startup_position)
            if row.retry_interval_ms:
                d.retry_at = row.retry_last_ts + row.retry_interval_ms
            self._destinations[row.destination] = d
        self._next_to_device_id = self.store.max_to_device_id_blocking() + 1
        for entry in outbox:
            d = self._destinations.get(entry.destination)
            if d is None:
                d = self._destinations[entry.destination] = _Destination(
                    entry.destination, startup_position, startup_position, known=False
                )
            d.to_device.append((entry.id, entry.content))
        hs.persister.on_persisted.append(self._on_persisted)
        self.client.backoff.on_recovered.append(self._on_recovered)

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start catching up every destination that may have something waiting (non-blocking)."""
        if self._detached:
            return
        for d in list(self._destinations.values()):
            if d.has_work():
                self._wake(d)

    def detach(self) -> None:
        """Stop: no more hooks, no timers (tests replace the sender with their own)."""
        self._detached = True
        if self._on_persisted in self.hs.persister.on_persisted:
            self.hs.persister.on_persisted.remove(self._on_persisted)
        if self._on_recovered in self.client.backoff.on_recovered:
            self.client.backoff.on_recovered.remove(self._on_recovered)
        for d in self._destinations.values():
            self._cancel_timer(d)

    shutdown = detach  # nothing to flush: positions and to-device EDUs are durable

    # --- which servers -------------------------------------------------------------------------
    def is_mine(self, user_id: str) -> bool:
        return domain_of(user_id) == self.server_name

    def _remote_servers(self, room: Any) -> set[str]:
        return set(room.joined_servers - {self.server_name, ""})

    def remote_servers_in_room(self, room_id: str) -> set[str]:
        """Servers other than ours with a member joined to the room (from memory)."""
        room = self.hs.room_states.get_cached(room_id)
        return self._remote_servers(room) if room is not None else set()

    # --- PDUs -----------------------------------------------------------------------------------
    def _on_persisted(self, items: list[EventToPersist]) -> None:
        if self._detached:
            return
        for item in items:
            if not self.is_mine(item.pdu.sender):
                continue
            room = None
            if not self._incoming and not self._processing:  # nothing before it waits
                room = self.hs.room_states.get_cached(item.pdu.room_id)
            if room is None:
                self._incoming.append(item)
            else:
                self._queue_item(item, room)
        if self._incoming and not self._processing:
            self._processing = True
            d = defer.ensureDeferred(self._process_incoming())
            d.addErrback(lambda f: logger.error("queueing PDUs failed: %s", f.getTraceback()))

    async def _process_incoming(self) -> None:
        """Queue, in order, the PDUs whose room's state had to be loaded first."""
        try:
            while self._incoming:
                item = self._incoming.pop(0)
                room = self.hs.room_states.get_cached(item.pdu.room_id)
                if room is None:
                    room = await self.hs.room_states.get(item.pdu.room_id)
                self._queue_item(item, room)
        finally:
            self._processing = False

    def _queue_item(self, item: EventToPersist, room: Any) -> None:
        pdu = item.pdu
        servers = self._remote_servers(room) if room is not None else set()
        if pdu.type == MEMBER and pdu.membership in _TARGET_MEMBERSHIPS:
            target = domain_of(pdu.state_key or "")
            if target and target != self.server_name:
                servers.add(target)
        if not servers:
            return
        data = pdu.to_federation_json()
        for server in sorted(servers):
            self._queue_pdu(server, item.stream_ordering, data)

    def forward(self, stream: int, pdu: Any, origin: str) -> None:
        """Send another server's event on to the other servers in the room: a join,
        leave or knock that came to us through send_join/send_leave/send_knock
        (its server talked only to us). Not caught up after a restart."""
        if self._detached:
            return
        data = pdu.to_federation_json()
        for server in sorted(self.remote_servers_in_room(pdu.room_id) - {origin}):
            self._queue_pdu(server, stream, data)

    def _destination(self, name: str, first_stream: int | None = None) -> _Destination:
        d = self._destinations.get(name)
        if d is None:
            if first_stream is not None:
                position = first_stream - 1
            else:
                position = self.hs.stream_ids.persisted_upto
            d = self._destinations[name] = _Destination(name, position, position, known=False)
        if not d.known and first_stream is not None:
            # Record it at once, so a restart catches up with what is queued now.
            d.known = True
            self._background(self.store.add_destination(name, first_stream - 1), "recording")
        return d

    def _queue_pdu(self, name: str, stream: int, data: dict[str, Any]) -> None:
        d = self._destination(name, stream)
        if stream <= d.mem_since:
            return  # the database has it: catching up sends it
        d.pdus.append((stream, data))
        if len(d.pdus) > MAX_QUEUED_PDUS:
            # Far behind: forget them here; catching up reads them back in order.
            d.mem_since = d.pdus[-1][0]
            d.pdus.clear()
        self._wake(d)

    # --- EDUs -----------------------------------------------------------------------------------
    def send_edu(
        self, destination: str, edu_type: str, content: dict[str, Any], key: Any = None
    ) -> None:
        """Queue an ephemeral EDU; with ``key``, it replaces an unsent one of the same key.

        m.presence EDUs ({"push": [...]}) are merged per user into one EDU.
        """
        if destination == self.server_name or self._detached:
            return
        d = self._destination(destination)
        if edu_type == PRESENCE:
            for entry in content.get("push", ()):
                if isinstance(entry, dict) and isinstance(entry.get("user_id"), str):
                    d.presence[entry["user_id"]] = entry
        else:
            if key is None:
                self._edu_counter += 1
                full_key: Any = ("", self._edu_counter)
            else:
                full_key = (edu_type, key)
            d.edus.pop(full_key, None)  # a replaced EDU goes to the back
            d.edus[full_key] = (edu_type, content)
            while len(d.edus) > MAX_QUEUED_EDUS:
                dropped, _ = d.edus.popitem(last=False)
                logger.warning("dropping an unsent EDU %r for %s", dropped, destination)
        self._wake(d)

    async def send_to_device(
        self,
        destination: str,
        sender: str,
        event_type: str,
        message_id: str,
        messages: Mapping[str, Mapping[str, Any]],
    ) -> None:
        """Queue an m.direct_to_device EDU durably: returns once it is stored."""
        content = {
            "sender": sender,
            "type": event_type,
            "message_id": message_id,
            "messages": {u: dict(m) for u, m in messages.items()},
        }
        outbox_id = self._next_to_device_id
        self._next_to_device_id += 1
        await self.store.add_to_device(outbox_id, destination, content, self.clock.time_msec())
        if self._detached:
            return
        d = self._destination(destination)
        d.to_device.append((outbox_id, content))
        self._wake(d)

    # --- what the other services call ----------------------------------------------------------
    def on_typing(self, room_id: str, user_id: str, typing: bool) -> None:
        """A local user started or stopped typing: tell the room's other servers."""
        if not self.is_mine(user_id):
            return
        content = {"room_id": room_id, "user_id": user_id, "typing": typing}
        for server in self.remote_servers_in_room(room_id):
            self.send_edu(server, TYPING, content, key=(room_id, user_id))

    def on_receipt(
        self,
        room_id: str,
        receipt_type: str,
        user_id: str,
        event_id: str,
        ts: int,
        thread_id: str | None = None,
    ) -> None:
        """A local user's public read receipt committed: tell the room's other servers."""
        if receipt_type != "m.read" or not self.is_mine(user_id):
            return
        data: dict[str, Any] = {"ts": ts}
        if thread_id:
            data["thread_id"] = thread_id
        content = {room_id: {receipt_type: {user_id: {"event_ids": [event_id], "data": data}}}}
        for server in self.remote_servers_in_room(room_id):
            self.send_edu(server, RECEIPT, content, key=(room_id, receipt_type, user_id, thread_id))

    def on_presence(self, user_id: str, content: Mapping[str, Any]) -> None:
        """A local user's presence changed (``content`` as /sync shows it): tell the
        servers sharing a room with them. Changes of one user go out in order."""
        if not self.is_mine(user_id) or self._detached:
            return
        running = user_id in self._presence_pending
        self._presence_pending[user_id] = {"user_id": user_id, **content}
        if not running:
            self._background(self._send_presence(user_id), "sending presence")

    async def _send_presence(self, user_id: str) -> None:
        try:
            while True:
                entry = self._presence_pending[user_id]
                memberships = await self.hs.user_rooms.get(user_id)
                servers: set[str] = set()
                for room_id, (membership, *_rest) in memberships.items():
                    if membership == "join":
                        room = await self.hs.room_states.get(room_id)
                        if room is not None:
                            servers |= self._remote_servers(room)
                if self._presence_pending[user_id] is not entry:
                    continue  # changed again meanwhile: send the newest
                for server in servers:
                    self.send_edu(server, PRESENCE, {"push": [entry]})
                return
        finally:
            del self._presence_pending[user_id]

    async def send_to_device_messages(
        self, sender: str, event_type: str, messages: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """/sendToDevice's messages for remote users, one durable EDU per server."""
        by_server: dict[str, dict[str, Any]] = {}
        for user_id, by_device in messages.items():
            server = domain_of(user_id)
            if server and server != self.server_name:
                by_server.setdefault(server, {})[user_id] = by_device
        for server, server_messages in sorted(by_server.items()):
            await self.send_to_device(
                server, sender, event_type, secrets.token_urlsafe(12), server_messages
            )

    # --- transmitting ----------------------------------------------------------------------------
    def _wake(self, d: _Destination) -> None:
        if self._detached or d.in_flight or d.timer is not None:
            return  # sending already, or waiting for the back-off
        d.in_flight = True
        self._background(self._transmit(d), f"sending to {d.name}")

    def _on_recovered(self, destination: str) -> None:
        d = self._destinations.get(destination)
        if d is None:
            return
        d.retry_at = 0
        self._cancel_timer(d)
        if d.has_work():
            self._wake(d)

    def _cancel_timer(self, d: _Destination) -> None:
        if d.timer is not None:
            if d.timer.active():
                d.timer.cancel()
            d.timer = None

    def _retry_later(self, d: _Destination, at_ms: int) -> None:
        self._cancel_timer(d)
        d.retry_at = at_ms
        delay_s = max(0, at_ms - self.clock.time_msec()) / 1000
        d.timer = self.clock.call_later(delay_s, self._on_timer, d)

    def _on_timer(self, d: _Destination) -> None:
        d.timer = None
        self._wake(d)

    async def _transmit(self, d: _Destination) -> None:
        try:
            while not self._detached:
                now = self.clock.time_msec()
                if d.retry_at > now:
                    self._retry_later(d, d.retry_at)
                    return
                txn = d.pending or await self._next_transaction(d)
                if txn is None:
                    return
                d.pending = txn
                if not await self._send(d, txn):
                    return
        except Exception:
            # A database error, say: keep everything and try again later.
            logger.exception("sending to %s failed", d.name)
            if not self._detached:
                self._retry_later(d, self.clock.time_msec() + FALLBACK_RETRY_MS)
        finally:
            d.in_flight = False

    async def _send(self, d: _Destination, txn: _Transaction) -> bool:
        """Send the transaction; True when it is done with (delivered or dropped)."""
        body = {
            "origin": self.server_name,
            "origin_server_ts": self.clock.time_msec(),
            "pdus": txn.pdus,
            "edus": txn.edus,
        }
        path = build_path("/_matrix/federation/v1/send/{}", txn.txn_id)
        try:
            response = await self.client.put_json(d.name, path, body)
        except NotRetryingDestination as e:
            self._retry_later(d, e.retry_at_ms)
            return False
        except DestinationBlockedError as e:
            logger.warning("dropping transaction %s for %s: %s", txn.txn_id, d.name, e)
            await self._done(d, txn)
            return True
        except HttpResponseError as e:
            if e.status is not None and (e.status >= 500 or e.status == 429):
                await self._failed(d, txn, e)
                return False
            logger.error("%s refused transaction %s, dropping it: %s", d.name, txn.txn_id, e)
            await self._done(d, txn)
            return True
        except FederationError as e:
            await self._failed(d, txn, e)
            return False
        results = response.get("pdus") if isinstance(response, dict) else None
        if isinstance(results, dict):
            for event_id, result in results.items():
                if isinstance(result, dict) and result.get("error"):
                    logger.warning(
                        "%s rejected %s: %s", d.name, event_id, str(result["error"])[:200]
                    )
        await self._done(d, txn)
        return True

    async def _failed(self, d: _Destination, txn: _Transaction, error: Exception) -> None:
        state = self.client.backoff.state(d.name)
        now = self.clock.time_msec()
        if state is not None and state.retry_at_ms > now:
            at, last, interval = state.retry_at_ms, state.last_failure_ms, state.retry_interval_ms
        else:
            at, last, interval = now + FALLBACK_RETRY_MS, now, FALLBACK_RETRY_MS
        logger.info(
            "transaction %s to %s failed (%s); retrying in %d s",
            txn.txn_id,
            d.name,
            error,
            (at - now) // 1000,
        )
        self._retry_later(d, at)
        if d.known:
            try:
                await self.store.set_retry(d.name, last, interval)
            except Exception:
                logger.exception("recording back-off of %s failed", d.name)

    async def _done(self, d: _Destination, txn: _Transaction) -> None:
        position = txn.position if txn.position is not None else d.position
        await self.store.transaction_sent(d.name, position, txn.to_device_ids)
        d.known = True
        d.pending = None
        d.retry_at = 0
        d.position = max(d.position, position)
        if txn.to_device_ids:
            sent = set(txn.to_device_ids)
            d.to_device = [(i, c) for i, c in d.to_device if i not in sent]
        if d.pdus and d.pdus[0][0] <= d.position:
            d.pdus = [(s, p) for s, p in d.pdus if s > d.position]

    async def _next_transaction(self, d: _Destination) -> _Transaction | None:
        # PDUs: from the database while catching up, then from memory.
        pdus: list[dict[str, Any]] = []
        position: int | None = None
        while d.position < d.mem_since and not pdus:
            events, scanned = await self.store.catch_up_events(
                d.name, self.server_name, d.position, d.mem_since, MAX_PDUS_PER_TXN
            )
            pdus = [e.pdu_json for e in events]
            if not pdus:
                d.position = max(d.position, scanned)  # nothing for it in there
            else:
                position = scanned
        if not pdus and d.position >= d.mem_since:
            if d.pdus and d.pdus[0][0] <= d.position:
                d.pdus = [(s, p) for s, p in d.pdus if s > d.position]
            batch = d.pdus[:MAX_PDUS_PER_TXN]
            if batch:
                pdus = [p for _, p in batch]
                position = batch[-1][0]
        # EDUs: durable to-device first, then the ephemeral ones, then presence.
        edus: list[dict[str, Any]] = []
        to_device_ids: list[int] = []
        for outbox_id, content in d.to_device[:MAX_EDUS_PER_TXN]:
            edus.append({"edu_type": TO_DEVICE, "content": content})
            to_device_ids.append(outbox_id)
        keyed: list[tuple[Any, Any]] = []
        room = MAX_EDUS_PER_TXN - len(edus) - (1 if d.presence else 0)
        while d.edus and len(keyed) < room:
            key, (edu_type, content) = d.edus.popitem(last=False)
            keyed.append((key, (edu_type, content)))
            edus.append({"edu_type": edu_type, "content": content})
        if d.presence and len(edus) < MAX_EDUS_PER_TXN:
            edus.append({"edu_type": PRESENCE, "content": {"push": list(d.presence.values())}})
            d.presence = {}
        if not pdus and not edus:
            return None
        self._txn_counter += 1
        txn_id = f"{self.clock.time_msec()}-{self._txn_counter}"
        return _Transaction(txn_id, pdus, edus, position, to_device_ids, keyed)

    def _background(self, coro: Any, what: str) -> None:
        d = defer.ensureDeferred(coro)
        d.addErrback(lambda f: logger.error("%s failed: %s", what, f.getTraceback()))

    # --- introspection (tests, admin) --------------------------------------------------------------
    def destination_position(self, destination: str) -> int | None:
        d = self._destinations.get(destination)
        return d.position if d is not None else None

    def pending_destinations(self) -> Iterable[str]:
        return [name for name, d in self._destinations.items() if d.has_work()]
