-- Profile fields of local users beyond displayname and avatar_url (which are
-- columns of users): m.tz and custom namespaced keys (spec v1.16+).
-- value is the field's JSON value.

CREATE TABLE profile_fields (
    user_id TEXT NOT NULL,
    field_name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (user_id, field_name)
);
