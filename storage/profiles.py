"""Profiles of local users, and what the user directory loads at start.

A local user's global profile is the ``displayname`` and ``avatar_url``
columns of ``users`` (the profile service owns them); every other profile
field (``m.tz``, custom namespaced keys) is one row of ``profile_fields``
holding the field's JSON value.
"""

import json
from collections.abc import Iterable
from typing import Any

import attrs

from storage.database import Database, Txn

_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

# The profile columns of ``users`` a caller may write.
STANDARD_FIELDS = ("displayname", "avatar_url")


@attrs.frozen
class StoredProfile:
    displayname: str | None
    avatar_url: str | None
    # every other field, decoded from JSON
    fields: dict[str, Any]


@attrs.frozen
class DirectorySnapshot:
    """Everything the user directory needs, read in one transaction."""

    # (room_id, user_id) for every joined membership (of accounts not deactivated)
    joined: list[tuple[str, str]]
    # (room_id, event type, content) of the current join rules and history visibility
    room_settings: list[tuple[str, str, dict[str, Any]]]
    # user_id -> (displayname, avatar_url): global profiles of joined local users
    local_profiles: dict[str, tuple[str | None, str | None]]
    # user_id -> (displayname, avatar_url) from a current join event of joined remote users
    remote_profiles: dict[str, tuple[str | None, str | None]]


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class ProfileStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    # --- profiles -------------------------------------------------------------
    async def get_profile(self, user_id: str) -> StoredProfile | None:
        """The user's whole profile, or None when there is no such local user."""
        return await self.db.run_read("get_profile", self._get_profile_txn, user_id)

    def _get_profile_txn(self, txn: Txn, user_id: str) -> StoredProfile | None:
        row = txn.execute(
            "SELECT displayname, avatar_url FROM users WHERE user_id = ?", (user_id,)
        ).fetchone()
        if row is None:
            return None
        fields = {
            name: json.loads(value)
            for name, value in txn.execute(
                "SELECT field_name, value FROM profile_fields WHERE user_id = ?", (user_id,)
            ).fetchall()
        }
        return StoredProfile(row[0], row[1], fields)

    async def set_standard_field(self, user_id: str, field: str, value: str | None) -> bool:
        """Set ``displayname`` or ``avatar_url`` (None clears it); False if no such user."""
        if field not in STANDARD_FIELDS:
            raise ValueError(f"not a profile column: {field}")

        def txn_func(txn: Txn) -> bool:
            txn.execute(f"UPDATE users SET {field} = ? WHERE user_id = ?", (value, user_id))
            return txn.rowcount > 0

        return await self.db.run_interaction("set_profile_" + field, txn_func)

    async def set_custom_field(self, user_id: str, field: str, value: Any) -> bool:
        """Store any other field's JSON value; False if no such user."""

        def txn_func(txn: Txn) -> bool:
            if txn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone() is None:
                return False
            txn.execute(
                "INSERT INTO profile_fields (user_id, field_name, value) VALUES (?, ?, ?)"
                " ON CONFLICT (user_id, field_name) DO UPDATE SET value = excluded.value",
                (user_id, field, _json_encoder.encode(value)),
            )
            return True

        return await self.db.run_interaction("set_profile_field", txn_func)

    async def delete_custom_field(self, user_id: str, field: str) -> None:
        await self.db.run_interaction(
            "delete_profile_field",
            lambda txn: txn.execute(
                "DELETE FROM profile_fields WHERE user_id = ? AND field_name = ?",
                (user_id, field),
            ),
        )

    async def erase_profile(self, user_id: str) -> None:
        """Clear every field (an erased account)."""

        def txn_func(txn: Txn) -> None:
            txn.execute(
                "UPDATE users SET displayname = NULL, avatar_url = NULL WHERE user_id = ?",
                (user_id,),
            )
            txn.execute("DELETE FROM profile_fields WHERE user_id = ?", (user_id,))

        await self.db.run_interaction("erase_profile", txn_func)

    async def get_standard_profiles(
        self, user_ids: Iterable[str]
    ) -> dict[str, tuple[str | None, str | None]]:
        """(displayname, avatar_url) of each of ``user_ids`` that is a local user."""
        ids = list(dict.fromkeys(user_ids))

        def txn_func(txn: Txn) -> dict[str, tuple[str | None, str | None]]:
            found: dict[str, tuple[str | None, str | None]] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for user_id, displayname, avatar_url in txn.execute(
                    "SELECT user_id, displayname, avatar_url FROM users"
                    f" WHERE user_id IN ({marks})",
                    chunk,
                ).fetchall():
                    found[user_id] = (displayname, avatar_url)
            return found

        return await self.db.run_read("get_standard_profiles", txn_func)

    # --- the user directory -----------------------------------------------------
    async def load_directory(self) -> DirectorySnapshot:
        return await self.db.run_read("load_user_directory", self._load_directory_txn)

    def _load_directory_txn(self, txn: Txn) -> DirectorySnapshot:
        joined = [
            (room_id, user_id)
            for room_id, user_id in txn.execute(
                "SELECT room_id, user_id FROM room_memberships WHERE membership = 'join'"
                " AND user_id NOT IN (SELECT user_id FROM users WHERE deactivated = TRUE)"
            ).fetchall()
        ]
        room_settings = []
        for room_id, event_type, event_json in txn.execute(
            "SELECT cs.room_id, cs.type, e.json FROM current_state cs"
            " JOIN events e ON e.event_id = cs.event_id"
            " WHERE cs.state_key = '' AND cs.type IN ('m.room.join_rules', 'm.room.history_visibility')"
        ).fetchall():
            content = json.loads(event_json).get("content")
            room_settings.append(
                (room_id, event_type, content if isinstance(content, dict) else {})
            )
        local_profiles = {
            user_id: (displayname, avatar_url)
            for user_id, displayname, avatar_url in txn.execute(
                "SELECT u.user_id, u.displayname, u.avatar_url FROM users u WHERE u.user_id IN"
                " (SELECT user_id FROM room_memberships WHERE membership = 'join')"
            ).fetchall()
        }
        remote_profiles: dict[str, tuple[str | None, str | None]] = {}
        for user_id, event_json in txn.execute(
            "SELECT rm.user_id, e.json FROM room_memberships rm"
            " JOIN events e ON e.event_id = rm.event_id"
            " WHERE rm.membership = 'join'"
            " AND NOT EXISTS (SELECT 1 FROM users u WHERE u.user_id = rm.user_id)"
        ).fetchall():
            content = json.loads(event_json).get("content")
            if isinstance(content, dict):
                remote_profiles[user_id] = (
                    _str_or_none(content.get("displayname")),
                    _str_or_none(content.get("avatar_url")),
                )
        return DirectorySnapshot(joined, room_settings, local_profiles, remote_profiles)
