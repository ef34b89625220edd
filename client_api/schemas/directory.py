"""Request bodies of the room alias and published room directory endpoints."""

ROOM_ID = {"type": "string", "pattern": "^!", "maxLength": 255}

# PUT /directory/room/{roomAlias}
SET_ROOM_ALIAS = {
    "type": "object",
    "properties": {"room_id": ROOM_ID},
    "required": ["room_id"],
}

# PUT /directory/list/room/{roomId}  (visibility defaults to "public")
SET_ROOM_VISIBILITY = {
    "type": "object",
    "properties": {"visibility": {"enum": ["private", "public"]}},
}

# POST /publicRooms
QUERY_PUBLIC_ROOMS = {
    "type": "object",
    "properties": {
        "limit": {"type": "integer"},
        "since": {"type": "string", "maxLength": 1000},
        "filter": {
            "type": "object",
            "properties": {
                "generic_search_term": {"type": "string", "maxLength": 1000},
                "room_types": {
                    "type": "array",
                    "items": {"type": ["string", "null"]},
                    "maxItems": 100,
                },
            },
        },
        "include_all_networks": {"type": "boolean"},
        "third_party_instance_id": {"type": "string"},
    },
}
