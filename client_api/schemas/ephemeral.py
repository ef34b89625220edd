"""Request bodies of typing, presence, account data, tags and send-to-device."""

# PUT /rooms/{roomId}/typing/{userId}
TYPING = {
    "type": "object",
    "required": ["typing"],
    "properties": {
        "typing": {"type": "boolean"},
        "timeout": {"type": "integer", "minimum": 0},
    },
}

# PUT /presence/{userId}/status (status_msg null clears it; absent keeps it)
SET_PRESENCE = {
    "type": "object",
    "required": ["presence"],
    "properties": {
        "presence": {"enum": ["online", "offline", "unavailable"]},
        "status_msg": {"type": ["string", "null"], "maxLength": 4096},
    },
}

# PUT /user/{userId}/account_data/{type}: any JSON object.
SET_ACCOUNT_DATA = {"type": "object"}

# PUT /user/{userId}/rooms/{roomId}/account_data/{type}: any JSON object.
SET_ROOM_ACCOUNT_DATA = {"type": "object"}

# PUT /user/{userId}/rooms/{roomId}/tags/{tag}: the tag's data, ordering in "order".
SET_TAG = {
    "type": "object",
    "properties": {"order": {"type": "number"}},
}

# PUT /sendToDevice/{eventType}/{txnId}: {user id: {device id or "*": content}}.
SEND_TO_DEVICE = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {
            "type": "object",
            "propertyNames": {"pattern": "^@[^:]+:.+$", "maxLength": 255},
            "additionalProperties": {
                "type": "object",
                "propertyNames": {"minLength": 1, "maxLength": 255},
                "additionalProperties": {"type": "object"},
            },
        },
    },
}
