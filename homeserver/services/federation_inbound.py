"""Inbound transactions (``PUT /send/{txnId}``): PDUs into their rooms, EDUs to
their services.

A transaction is processed once: a retry with the same (origin, txn id) gets
the first answer. PDUs of one room are handled in order, rooms in parallel;
the answer lists each PDU's result. EDUs go to ``hs.federation_edus``.
"""

import logging
from collections import OrderedDict
from typing import Any

from twisted.internet import defer

from homeserver.core.events import compute_event_id

logger = logging.getLogger(__name__)

REMEMBERED_TRANSACTIONS = 10_000


class FederationInbound:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self._answers: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._in_flight: dict[tuple[str, str], list[defer.Deferred[dict[str, Any]]]] = {}

    async def on_transaction(
        self, origin: str, txn_id: str, pdus: list[Any], edus: list[Any]
    ) -> dict[str, Any]:
        key = (origin, txn_id)
        if key in self._answers:
            return self._answers[key]
        waiters = self._in_flight.get(key)
        if waiters is not None:  # the same transaction retried while in progress
            waiter: defer.Deferred[dict[str, Any]] = defer.Deferred()
            waiters.append(waiter)
            return await waiter
        self._in_flight[key] = []
        try:
            answer = await self._process(origin, pdus, edus)
        except BaseException as e:
            for waiter in self._in_flight.pop(key):
                waiter.errback(e)
            raise
        for waiter in self._in_flight.pop(key):
            waiter.callback(answer)
        self._answers[key] = answer
        while len(self._answers) > REMEMBERED_TRANSACTIONS:
            self._answers.popitem(last=False)
        return answer

    async def _process(self, origin: str, pdus: list[Any], edus: list[Any]) -> dict[str, Any]:
        by_room: dict[str, list[Any]] = {}
        results: dict[str, Any] = {}
        for data in pdus:
            room_id = data.get("room_id") if isinstance(data, dict) else None
            by_room.setdefault(room_id if isinstance(room_id, str) else "", []).append(data)
        await defer.gatherResults(
            [defer.ensureDeferred(self._room_pdus(origin, room_pdus, results))
             for room_pdus in by_room.values()],
            consumeErrors=True,
        )
        # Answered only once every accepted event is stored: a failed write fails
        # the transaction (500), so its server sends it again.
        await self.hs.federation_events.settle()
        for edu in edus:
            await self._edu(origin, edu)
        return results

    async def _room_pdus(self, origin: str, datas: list[Any], results: dict[str, Any]) -> None:
        handler = self.hs.federation_events
        for data in datas:
            try:
                error = await handler.receive_pdu(origin, data)
            except Exception as e:  # never fail the transaction for one PDU
                logger.exception("handling a PDU from %s failed", origin)
                error = f"internal error: {type(e).__name__}"
            # After handling: the room (whose version gives the id) is loaded by then.
            event_id = self._event_id_of(data)
            if event_id is not None:
                results[event_id] = {"error": error} if error else {}

    def _event_id_of(self, data: Any) -> str | None:
        """The id the PDU has (rooms 3+: its reference hash), for the answer."""
        if not isinstance(data, dict):
            return None
        if isinstance(data.get("event_id"), str):
            return data["event_id"]
        room = self.hs.room_states.get_cached(data.get("room_id") or "")
        if room is None:
            return None
        try:
            return compute_event_id(data, room.room_version)
        except Exception:
            return None

    async def _edu(self, origin: str, edu: Any) -> None:
        if not isinstance(edu, dict) or not isinstance(edu.get("edu_type"), str):
            logger.info("dropping a malformed EDU from %s", origin)
            return
        try:
            await self.hs.federation_edus.on_edu(origin, edu["edu_type"], edu.get("content"))
        except Exception:
            logger.exception("handling an %s EDU from %s failed", edu["edu_type"], origin)
