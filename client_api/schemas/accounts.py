"""Request bodies of the account endpoints: registration, login, devices, passwords, admin.

Optional string fields also accept null (some clients send ``"username": null``);
the services treat null as absent.
"""

from typing import Any

_STR = {"type": "string"}
_OPT_STR = {"type": ["string", "null"]}
_BOOL = {"type": "boolean"}

# Authentication data for user-interactive auth; stage-specific keys pass through.
AUTH_DATA: dict[str, Any] = {
    "type": "object",
    "properties": {"type": _STR, "session": _STR},
}

# POST /register
REGISTER = {
    "type": "object",
    "properties": {
        "auth": AUTH_DATA,
        "username": _OPT_STR,
        "password": _OPT_STR,
        "device_id": {"type": ["string", "null"], "minLength": 1, "maxLength": 255},
        "initial_device_display_name": _OPT_STR,
        "inhibit_login": _BOOL,
        "refresh_token": _BOOL,
    },
}

_IDENTIFIER = {"type": "object", "required": ["type"], "properties": {"type": _STR}}

# POST /login
LOGIN = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": _STR,
        "identifier": _IDENTIFIER,
        "user": _STR,
        "medium": _STR,
        "address": _STR,
        "password": _STR,
        "token": _STR,
        "device_id": {"type": ["string", "null"], "minLength": 1, "maxLength": 255},
        "initial_device_display_name": _OPT_STR,
        "refresh_token": _BOOL,
    },
}

# POST /login/get_token (v1)
GET_LOGIN_TOKEN = {"type": "object", "properties": {"auth": AUTH_DATA}}

# POST /account/password
CHANGE_PASSWORD = {
    "type": "object",
    "required": ["new_password"],
    "properties": {"new_password": _STR, "logout_devices": _BOOL, "auth": AUTH_DATA},
}

# POST /account/deactivate
DEACTIVATE = {
    "type": "object",
    "properties": {"auth": AUTH_DATA, "id_server": _STR, "erase": _BOOL},
}

# PUT /devices/{deviceId}
UPDATE_DEVICE = {
    "type": "object",
    "properties": {"display_name": {"type": ["string", "null"], "maxLength": 100}},
}

# DELETE /devices/{deviceId}
DELETE_DEVICE = {"type": "object", "properties": {"auth": AUTH_DATA}}

# POST /delete_devices
DELETE_DEVICES = {
    "type": "object",
    "required": ["devices"],
    "properties": {
        "devices": {"type": "array", "items": _STR, "maxItems": 1000},
        "auth": AUTH_DATA,
    },
}

# POST /_synapse/admin/v1/register (Synapse's shared-secret registration)
ADMIN_REGISTER = {
    "type": "object",
    "required": ["nonce", "username", "password", "mac"],
    "properties": {
        "nonce": _STR,
        "username": {"type": "string", "maxLength": 512},
        "password": _STR,
        "mac": _STR,
        "admin": _BOOL,
        "user_type": _OPT_STR,
        "displayname": _OPT_STR,
        "inhibit_login": _BOOL,
    },
}

_OPT_INT = {"type": ["integer", "null"]}

# POST /_synapse/admin/v1/registration_tokens/new
NEW_REGISTRATION_TOKEN = {
    "type": "object",
    "properties": {
        "token": _STR,
        "uses_allowed": _OPT_INT,
        "expiry_time": _OPT_INT,
        "length": {"type": "integer"},
    },
}

# PUT /_synapse/admin/v1/registration_tokens/{token}
UPDATE_REGISTRATION_TOKEN = {
    "type": "object",
    "properties": {"uses_allowed": _OPT_INT, "expiry_time": _OPT_INT},
}

# PUT /_matrix/client/v1/admin/lock/{userId}
ADMIN_LOCK = {"type": "object", "required": ["locked"], "properties": {"locked": _BOOL}}

# PUT /_matrix/client/v1/admin/suspend/{userId}
ADMIN_SUSPEND = {"type": "object", "required": ["suspended"], "properties": {"suspended": _BOOL}}
