"""Request bodies of the profile and user directory endpoints.

The profile bodies hold one property named like the field in the URL. Its
presence is checked by the handler (a missing one is M_MISSING_PARAM, as the
spec asks); these schemas check its type. Lengths and the mxc:// form of
avatar_url are checked by the profile service, the one place that knows them.
"""

# PUT /profile/{userId}/displayname: a string; null or "" clears the name.
SET_DISPLAYNAME = {
    "type": "object",
    "properties": {"displayname": {"type": ["string", "null"]}},
}

# PUT /profile/{userId}/avatar_url: an mxc:// URI; null or "" clears the avatar.
SET_AVATAR_URL = {
    "type": "object",
    "properties": {"avatar_url": {"type": ["string", "null"]}},
}

# PUT /profile/{userId}/m.tz: an IANA time zone name (not checked against the database).
SET_TIMEZONE = {
    "type": "object",
    "properties": {"m.tz": {"type": "string"}},
}

# PUT /profile/{userId}/{keyName} for any other (namespaced) key: any JSON value.
SET_PROFILE_FIELD = {
    "type": "object",
    "minProperties": 1,
}

# POST /user_directory/search
USER_DIRECTORY_SEARCH = {
    "type": "object",
    "required": ["search_term"],
    "properties": {
        "search_term": {"type": "string", "maxLength": 1000},
        "limit": {"type": "integer"},
    },
}
