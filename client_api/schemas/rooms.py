"""Request bodies of room endpoints: createRoom, membership, state and send."""

USER_ID = {"type": "string", "pattern": "^@[^:]+:.+$", "maxLength": 255}
REASON = {"type": "string", "maxLength": 4096}

CREATE_ROOM = {
    "type": "object",
    "properties": {
        "visibility": {"enum": ["public", "private"]},
        "room_alias_name": {"type": "string", "minLength": 1, "maxLength": 200,
                            "pattern": "^[^:#\\s]+$"},
        "name": {"type": "string", "maxLength": 1024},
        "topic": {"type": "string", "maxLength": 4096},
        "invite": {"type": "array", "items": USER_ID, "maxItems": 100},
        "invite_3pid": {"type": "array", "items": {
            "type": "object",
            "required": ["id_server", "medium", "address"],
            "properties": {"id_server": {"type": "string"}, "id_access_token": {"type": "string"},
                           "medium": {"type": "string"}, "address": {"type": "string"}},
        }},
        "room_version": {"type": "string"},
        "creation_content": {"type": "object"},
        "initial_state": {"type": "array", "items": {
            "type": "object",
            "required": ["type", "content"],
            "properties": {"type": {"type": "string", "minLength": 1},
                           "state_key": {"type": "string"},
                           "content": {"type": "object"}},
        }},
        "preset": {"enum": ["private_chat", "public_chat", "trusted_private_chat"]},
        "is_direct": {"type": "boolean"},
        "power_level_content_override": {"type": "object"},
    },
}

JOIN = {
    "type": "object",
    "properties": {"reason": REASON, "third_party_signed": {"type": "object"}},
}
LEAVE = {"type": "object", "properties": {"reason": REASON}}
KNOCK = LEAVE
FORGET = {"type": "object"}
INVITE = {
    "type": "object",
    "required": ["user_id"],
    "properties": {"user_id": USER_ID, "reason": REASON, "is_direct": {"type": "boolean"}},
}
KICK = {"type": "object", "required": ["user_id"], "properties": {"user_id": USER_ID, "reason": REASON}}
BAN = KICK
UNBAN = KICK

# Event content: any JSON object (the event core checks sizes and canonical JSON).
EVENT_CONTENT = {"type": "object"}
