"""Request bodies of the end-to-end encryption key endpoints (/keys/*)."""

USER_ID = {"pattern": "^@[^:]+:.+$", "maxLength": 255}

_SIGNATURES = {
    "type": "object",
    "propertyNames": USER_ID,
    "additionalProperties": {"type": "object", "additionalProperties": {"type": "string"}},
}

# definitions/device_keys.yaml
_DEVICE_KEYS = {
    "type": "object",
    "required": ["user_id", "device_id", "algorithms", "keys", "signatures"],
    "properties": {
        "user_id": {"type": "string"},
        "device_id": {"type": "string"},
        "algorithms": {"type": "array", "items": {"type": "string"}},
        "keys": {"type": "object", "additionalProperties": {"type": "string"}},
        "signatures": _SIGNATURES,
    },
}

# definitions/one_time_keys.yaml: "<algorithm>:<key id>" -> key string or signed key object
_ONE_TIME_KEYS = {
    "type": "object",
    "propertyNames": {"pattern": "^[^:]+:.+$", "maxLength": 255},
    "additionalProperties": {
        "oneOf": [
            {"type": "string"},
            {
                "type": "object",
                "required": ["key", "signatures"],
                "properties": {"key": {"type": "string"}, "signatures": _SIGNATURES},
            },
        ]
    },
}

# definitions/cross_signing_key.yaml
_CROSS_SIGNING_KEY = {
    "type": "object",
    "required": ["user_id", "usage", "keys"],
    "properties": {
        "user_id": {"type": "string"},
        "usage": {
            "type": "array",
            "items": {"enum": ["master", "self_signing", "user_signing"]},
        },
        "keys": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "minProperties": 1,
            "maxProperties": 1,
        },
        "signatures": _SIGNATURES,
    },
}

# POST /keys/upload
UPLOAD_KEYS = {
    "type": "object",
    "properties": {
        "device_keys": _DEVICE_KEYS,
        "one_time_keys": _ONE_TIME_KEYS,
        "fallback_keys": _ONE_TIME_KEYS,
        "org.matrix.msc2732.fallback_keys": _ONE_TIME_KEYS,
    },
}

# POST /keys/query: user -> device ids (empty: all of them)
QUERY_KEYS = {
    "type": "object",
    "required": ["device_keys"],
    "properties": {
        "timeout": {"type": "integer"},
        "device_keys": {
            "type": "object",
            "propertyNames": USER_ID,
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
        },
    },
}

# POST /keys/claim: user -> device id -> algorithm
CLAIM_KEYS = {
    "type": "object",
    "required": ["one_time_keys"],
    "properties": {
        "timeout": {"type": "integer"},
        "one_time_keys": {
            "type": "object",
            "propertyNames": USER_ID,
            "additionalProperties": {
                "type": "object",
                "additionalProperties": {"type": "string", "minLength": 1},
            },
        },
    },
}

# POST /keys/device_signing/upload
UPLOAD_CROSS_SIGNING_KEYS = {
    "type": "object",
    "properties": {
        "master_key": _CROSS_SIGNING_KEY,
        "self_signing_key": _CROSS_SIGNING_KEY,
        "user_signing_key": _CROSS_SIGNING_KEY,
        "auth": {"type": "object"},
    },
}

# POST /keys/signatures/upload: user -> key id (device id or public key) -> signed object
UPLOAD_SIGNATURES = {
    "type": "object",
    "propertyNames": USER_ID,
    "additionalProperties": {
        "type": "object",
        "additionalProperties": {"type": "object"},
    },
}
