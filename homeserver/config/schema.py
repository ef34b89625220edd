"""The configuration schema: one JSON schema, Synapse's key names and shapes.

Defaults live here and nowhere else; the loader fills them in. An unknown
top-level key is a warning (operators bring Synapse configs with keys we do
not use); a wrong type or a missing required key stops start-up.
"""

from typing import Any

_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_STR_LIST = {"type": "array", "items": _STR}
_NULLABLE_STR = {"type": ["string", "null"]}
# Synapse accepts durations as "1h", "7d" or an int of milliseconds, and
# sizes as "50M" or an int of bytes.
_DURATION = {"type": ["string", "integer"], "pattern": r"^\d+(ms|s|m|h|d|w|y)?$"}
_SIZE = {"type": ["string", "integer"], "pattern": r"^\d+[KMGT]?$"}

_RATELIMIT = {
    "type": "object",
    "properties": {
        "per_second": {"type": "number", "minimum": 0},
        "burst_count": {"type": "number", "minimum": 0},
    },
    "additionalProperties": False,
}


def _ratelimit(per_second: float, burst_count: float) -> dict[str, Any]:
    return {**_RATELIMIT, "default": {"per_second": per_second, "burst_count": burst_count}}


def _nested_ratelimits(defaults: dict[str, tuple[float, float]]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {name: _RATELIMIT for name in defaults},
        "additionalProperties": False,
        "default": {
            name: {"per_second": ps, "burst_count": bc} for name, (ps, bc) in defaults.items()
        },
    }


RESOURCE_NAMES = ["client", "federation", "media", "keys", "metrics", "health", "openid"]

_LISTENER = {
    "type": "object",
    "required": ["port"],
    "properties": {
        "port": {"type": "integer", "minimum": 0, "maximum": 65535},
        "bind_addresses": {**_STR_LIST, "minItems": 1},
        "tls": _BOOL,
        "type": {"enum": ["http", "metrics"]},
        "x_forwarded": _BOOL,
        "resources": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["names"],
                "properties": {
                    "names": {"type": "array", "items": {"enum": RESOURCE_NAMES}},
                    "compress": _BOOL,
                },
            },
        },
    },
}

_DATABASE = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"enum": ["sqlite3", "psycopg", "psycopg2"]},
        "args": {
            "type": "object",
            "properties": {
                "database": _STR,
                "dbname": _STR,
                "user": _STR,
                "password": _STR,
                "host": _STR,
                "port": {"type": ["integer", "string"]},
                "cp_min": {"type": "integer", "minimum": 1},
                "cp_max": {"type": "integer", "minimum": 1},
                "synchronous": {"enum": ["normal", "full", "NORMAL", "FULL"]},
            },
        },
        "txn_limit": {"type": "integer"},
        "allow_unsafe_locale": _BOOL,
    },
}

_THUMBNAIL_SIZE = {
    "type": "object",
    "required": ["width", "height"],
    "properties": {
        "width": {"type": "integer", "minimum": 1, "maximum": 4096},
        "height": {"type": "integer", "minimum": 1, "maximum": 4096},
        "method": {"enum": ["crop", "scale"]},
    },
    "additionalProperties": False,
}

# Media content and thumbnails in an S3-compatible bucket instead of
# media_store_path (which still holds uploads while they arrive).
_MEDIA_S3 = {
    "type": ["object", "null"],
    "required": ["bucket"],
    "properties": {
        "bucket": {"type": "string", "minLength": 1},
        "endpoint_url": _NULLABLE_STR,
        "region_name": _NULLABLE_STR,
        "access_key_id": _NULLABLE_STR,
        "secret_access_key": _NULLABLE_STR,
        "prefix": _STR,
        "addressing_style": {"enum": ["auto", "path", "virtual"]},
        "verify_tls": _BOOL,
    },
    "additionalProperties": False,
}

CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["server_name"],
    "properties": {
        "server_name": {"type": "string", "minLength": 1},
        "public_baseurl": _NULLABLE_STR,
        "serve_server_wellknown": {**_BOOL, "default": False},
        "listeners": {
            "type": "array",
            "items": _LISTENER,
            "default": [
                {
                    "port": 8008,
                    "bind_addresses": ["127.0.0.1"],
                    "tls": False,
                    "type": "http",
                    "x_forwarded": False,
                    "resources": [{"names": ["client", "federation", "media", "keys"]}],
                }
            ],
        },
        "tls_certificate_path": _NULLABLE_STR,
        "tls_private_key_path": _NULLABLE_STR,
        "database": {**_DATABASE, "default": {"name": "sqlite3", "args": {"database": "homeserver.db"}}},
        "signing_key_path": _STR,
        "old_signing_keys": {"type": ["object", "null"], "default": {}},
        "key_refresh_interval": {**_DURATION, "default": "1d"},
        "media_store_path": {**_STR, "default": "media_store"},
        "max_upload_size": {**_SIZE, "default": "50M"},
        # Media repository (docs/media.md)
        "max_image_pixels": {**_SIZE, "default": "32M"},
        "thumbnail_sizes": {
            "type": "array",
            "items": _THUMBNAIL_SIZE,
            "default": [
                {"width": 32, "height": 32, "method": "crop"},
                {"width": 96, "height": 96, "method": "crop"},
                {"width": 320, "height": 240, "method": "scale"},
                {"width": 640, "height": 480, "method": "scale"},
                {"width": 800, "height": 600, "method": "scale"},
            ],
        },
        "dynamic_thumbnails": {**_BOOL, "default": False},
        "enable_authenticated_media": {**_BOOL, "default": True},
        "max_pending_media_uploads": {"type": "integer", "minimum": 1, "default": 5},
        "unused_expiration_time": {**_DURATION, "default": "24h"},
        "media_upload_limits": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["time_period", "max_size"],
                "properties": {"time_period": _DURATION, "max_size": _SIZE},
                "additionalProperties": False,
            },
            "default": [],
        },
        "media_retention": {
            "type": "object",
            "properties": {
                "local_media_lifetime": {"anyOf": [_DURATION, {"type": "null"}]},
                "remote_media_lifetime": {"anyOf": [_DURATION, {"type": "null"}]},
            },
            "additionalProperties": False,
            "default": {},
        },
        "media_storage_s3": {**_MEDIA_S3, "default": None},
        "prevent_media_downloads_from": {**_STR_LIST, "default": []},
        "url_preview_enabled": {**_BOOL, "default": False},
        "url_preview_ip_range_blacklist": _STR_LIST,
        "url_preview_ip_range_whitelist": {**_STR_LIST, "default": []},
        "url_preview_url_blacklist": {
            "type": "array",
            "items": {"type": "object", "additionalProperties": _STR},
            "default": [],
        },
        "max_spider_size": {**_SIZE, "default": "10M"},
        "enable_registration": {**_BOOL, "default": False},
        "enable_registration_without_verification": {**_BOOL, "default": False},
        "registration_requires_token": {**_BOOL, "default": False},
        "registration_shared_secret": {**_NULLABLE_STR, "default": None},
        "allow_guest_access": {**_BOOL, "default": False},
        "app_service_config_files": {**_STR_LIST, "default": []},
        "federation_verify_certificates": {**_BOOL, "default": True},
        "ip_range_blacklist": _STR_LIST,
        "ip_range_blocklist": _STR_LIST,
        "ip_range_whitelist": {**_STR_LIST, "default": []},
        "federation_ip_range_blacklist": _STR_LIST,
        "federation_domain_whitelist": {"type": ["array", "null"], "items": _STR},
        "federation": {
            "type": "object",
            "properties": {
                "client_timeout": _DURATION,
                "destination_min_retry_interval": _DURATION,
                "destination_retry_multiplier": {"type": "number", "minimum": 1},
                "destination_max_retry_interval": _DURATION,
            },
            "additionalProperties": False,
        },
        "trusted_key_servers": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["server_name"],
                "properties": {"server_name": _STR, "verify_keys": {"type": "object"}},
            },
            "default": [{"server_name": "matrix.org"}],
        },
        "default_room_version": {"type": "string", "default": "12"},
        "rc_message": _ratelimit(0.2, 10),
        "rc_registration": _ratelimit(0.17, 3),
        "rc_registration_token_validity": _ratelimit(0.1, 5),
        "rc_login": _nested_ratelimits(
            {"address": (0.003, 5), "account": (0.003, 5), "failed_attempts": (0.17, 3)}
        ),
        "rc_joins": _nested_ratelimits({"local": (0.1, 10), "remote": (0.01, 10)}),
        "rc_joins_per_room": _ratelimit(1, 10),
        "rc_invites": _nested_ratelimits(
            {"per_room": (0.3, 10), "per_user": (0.003, 5), "per_issuer": (0.5, 5)}
        ),
        "rc_media_create": _ratelimit(10, 50),
        "rc_admin_redaction": _ratelimit(1, 50),
        "rc_3pid_validation": _ratelimit(0.003, 5),
        "rc_presence": {"type": "object", "default": {"per_user": {"per_second": 0.1, "burst_count": 1}}},
        "rc_federation": {"type": "object", "default": {}},
        "turn_uris": {**_STR_LIST, "default": []},
        "turn_shared_secret": {**_NULLABLE_STR, "default": None},
        "turn_user_lifetime": {**_DURATION, "default": "1h"},
        "turn_allow_guests": {**_BOOL, "default": True},
        "room_list_publication_rules": {
            "type": "array",
            "items": {"type": "object"},
            "default": [{"action": "allow"}],
        },
        "allow_public_rooms_over_federation": {**_BOOL, "default": False},
        "allow_public_rooms_without_auth": {**_BOOL, "default": False},
        "presence": {
            "type": "object",
            "properties": {"enabled": {"type": ["boolean", "string"]}},
            "default": {"enabled": True},
        },
        "log_config": _NULLABLE_STR,
        "pid_file": _NULLABLE_STR,
        "enable_metrics": {**_BOOL, "default": False},
        "report_stats": _BOOL,
        "macaroon_secret_key": _NULLABLE_STR,
        "form_secret": _NULLABLE_STR,
        "suppress_key_server_warning": _BOOL,
    },
}

# Keys Synapse documents that we accept silently (no warning) even though
# they have no effect here yet.
TOLERATED_KEYS = frozenset({"report_stats", "macaroon_secret_key", "form_secret"})
