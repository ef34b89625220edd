"""Request bodies of the receipt and read marker endpoints."""

# POST /rooms/{roomId}/receipt/{receiptType}/{eventId}. A thread_id that is not a
# non-empty string is M_INVALID_PARAM (the spec's 400), checked by the handler.
RECEIPT = {
    "type": "object",
    "properties": {"thread_id": {"type": "string", "minLength": 1}},
}

_EVENT_ID = {"type": "string", "minLength": 1, "maxLength": 255}

# POST /rooms/{roomId}/read_markers: every property optional since v1.4.
READ_MARKERS = {
    "type": "object",
    "properties": {
        "m.fully_read": _EVENT_ID,
        "m.read": _EVENT_ID,
        "m.read.private": _EVENT_ID,
    },
}
