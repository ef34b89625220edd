"""Request bodies of /sync-related endpoints: filters."""

_EVENT_FILTER = {
    "type": "object",
    "properties": {
        "limit": {"type": "integer", "minimum": 0},
        "types": {"type": "array", "items": {"type": "string"}},
        "not_types": {"type": "array", "items": {"type": "string"}},
        "senders": {"type": "array", "items": {"type": "string"}},
        "not_senders": {"type": "array", "items": {"type": "string"}},
    },
}
_ROOM_EVENT_FILTER = {
    "type": "object",
    "properties": {
        **_EVENT_FILTER["properties"],
        "rooms": {"type": "array", "items": {"type": "string"}},
        "not_rooms": {"type": "array", "items": {"type": "string"}},
        "contains_url": {"type": "boolean"},
        "lazy_load_members": {"type": "boolean"},
        "include_redundant_members": {"type": "boolean"},
        "unread_thread_notifications": {"type": "boolean"},
    },
}

FILTER = {
    "type": "object",
    "properties": {
        "event_fields": {"type": "array", "items": {"type": "string"}},
        "event_format": {"enum": ["client", "federation"]},
        "presence": _EVENT_FILTER,
        "account_data": _EVENT_FILTER,
        "room": {
            "type": "object",
            "properties": {
                "rooms": {"type": "array", "items": {"type": "string"}},
                "not_rooms": {"type": "array", "items": {"type": "string"}},
                "include_leave": {"type": "boolean"},
                "timeline": _ROOM_EVENT_FILTER,
                "state": _ROOM_EVENT_FILTER,
                "ephemeral": _ROOM_EVENT_FILTER,
                "account_data": _ROOM_EVENT_FILTER,
            },
        },
    },
}
