"""The content repository's parameters and response shapes.

Its requests carry bytes, not JSON (POST /create has an empty body), so
what is checked here are query parameters; the response schemas are what
tests hold our answers to, next to the spec's own.
"""

THUMBNAIL_METHODS = frozenset({"crop", "scale"})

# Synapse's admin API: GET /_synapse/admin/v1/users/{userId}/media?order_by=
ADMIN_MEDIA_ORDER_BY = frozenset(
    {
        "media_id",
        "upload_name",
        "created_ts",
        "last_access_ts",
        "media_length",
        "media_type",
        "quarantined_by",
        "safe_from_quarantine",
    }
)

_MXC = {"type": "string", "pattern": "^mxc://[^/]+/[A-Za-z0-9_-]+$"}

UPLOAD_RESPONSE = {
    "type": "object",
    "required": ["content_uri"],
    "properties": {"content_uri": _MXC},
}

CREATE_RESPONSE = {
    "type": "object",
    "required": ["content_uri", "unused_expires_at"],
    "properties": {"content_uri": _MXC, "unused_expires_at": {"type": "integer"}},
}

CONFIG_RESPONSE = {
    "type": "object",
    "properties": {"m.upload.size": {"type": "integer", "minimum": 0}},
}
