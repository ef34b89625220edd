"""Turning PDUs into the events clients see (the client-server "ClientEvent" format)."""

from typing import Any

from homeserver.core.events import Pdu
from homeserver.services.filtering import apply_event_fields

# Keys of a PDU that a client event carries over.
_CLIENT_KEYS = ("content", "event_id", "origin_server_ts", "room_id", "sender", "state_key",
                "type", "redacts")


class ClientEventSerializer:
    def __init__(self, hs: Any) -> None:
        self.hs = hs

    def serialize(
        self,
        pdu: Pdu,
        include_room_id: bool = True,
        unsigned_extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        data = pdu.data
        event: dict[str, Any] = {k: data[k] for k in _CLIENT_KEYS if k in data}
        event["event_id"] = pdu.event_id
        if include_room_id:
            event["room_id"] = pdu.room_id
        else:
            event.pop("room_id", None)
        redacts = pdu.redacts
        if redacts is not None:
            event["redacts"] = redacts  # top level for clients in every room version
        unsigned = dict(data.get("unsigned") or {})
        unsigned["age"] = max(0, self.hs.clock.time_msec() - pdu.origin_server_ts)
        if unsigned_extra:
            unsigned.update(unsigned_extra)
        event["unsigned"] = unsigned
        return event

    async def serialize_events(
        self,
        pdus: list[Pdu],
        user_id: str | None = None,
        device_id: str | None = None,
        include_room_id: bool = True,
        event_fields: list[str] | None = None,
        bundle_aggregations: bool = True,
    ) -> list[dict[str, Any]]:
        """Serialize for one client: redactions, its own transaction ids, aggregations."""
        hs = self.hs
        redaction_ids = [p.redacted_because for p in pdus if p.redacted_because]
        redactions = await hs.events.get_events(redaction_ids) if redaction_ids else {}
        relations: dict[str, dict[str, Any]] = {}
        if bundle_aggregations and user_id is not None:
            relations = await hs.relations.bundled_aggregations(user_id, pdus)
        result = []
        for pdu in pdus:
            extra: dict[str, Any] = {}
            if pdu.redacted_because:
                redaction = redactions.get(pdu.redacted_because)
                if redaction is not None:
                    extra["redacted_because"] = self.serialize(redaction, include_room_id)
            if user_id is not None and pdu.sender == user_id:
                sent_with = hs.event_cache.txn_id_of(pdu.event_id)
                if sent_with is not None and sent_with[0] == device_id:
                    extra["transaction_id"] = sent_with[1]
            if pdu.event_id in relations:
                extra["m.relations"] = relations[pdu.event_id]
            event = self.serialize(pdu, include_room_id, extra)
            result.append(apply_event_fields(event, event_fields))
        return result
