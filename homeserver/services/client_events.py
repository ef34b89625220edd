"""Turning PDUs into the events clients see (the client-server "ClientEvent" format)."""

from typing import Any

from homeserver.core.events import Pdu

# Keys of a PDU that a client event carries over.
_CLIENT_KEYS = ("content", "event_id", "origin_server_ts", "room_id", "sender", "state_key",
                "type", "redacts")


class ClientEventSerializer:
    def __init__(self, clock: Any) -> None:
        self._clock = clock

    def serialize(self, pdu: Pdu, include_room_id: bool = True) -> dict[str, Any]:
        data = pdu.data
        event: dict[str, Any] = {k: data[k] for k in _CLIENT_KEYS if k in data}
        event["event_id"] = pdu.event_id
        event["room_id"] = pdu.room_id
        if not include_room_id:
            del event["room_id"]
        unsigned = dict(data.get("unsigned") or {})
        unsigned["age"] = max(0, self._clock.time_msec() - pdu.origin_server_ts)
        event["unsigned"] = unsigned
        return event
