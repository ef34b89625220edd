"""Accounts: users, devices, access and login tokens, registration tokens, UIA sessions.

Secrets never reach this module in clear: callers pass the SHA-256 hex of
access and login tokens and the bcrypt hash of passwords.
"""

import json
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from storage.database import Database, Txn

_USER_COLUMNS = (
    "user_id, password_hash, created_ts, is_admin, is_guest, deactivated, erased, locked,"
    " suspended, user_type, appservice_id, displayname, avatar_url"
)


@attrs.frozen
class UserRecord:
    user_id: str
    password_hash: str | None
    created_ts: int
    is_admin: bool
    is_guest: bool
    deactivated: bool
    erased: bool
    locked: bool
    suspended: bool
    user_type: str | None
    appservice_id: str | None
    displayname: str | None
    avatar_url: str | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> "UserRecord":
        return cls(
            row[0],
            row[1],
            int(row[2]),
            bool(row[3]),
            bool(row[4]),
            bool(row[5]),
            bool(row[6]),
            bool(row[7]),
            bool(row[8]),
            row[9],
            row[10],
            row[11],
            row[12],
        )


@attrs.frozen
class DeviceRecord:
    user_id: str
    device_id: str
    display_name: str | None
    created_ts: int
    last_seen_ts: int | None
    last_seen_ip: str | None
    last_seen_user_agent: str | None


@attrs.frozen
class TokenRecord:
    """An access token's owner, as needed to authenticate a request."""

    user_id: str
    device_id: str | None
    is_guest: bool
    deactivated: bool
    locked: bool


@attrs.frozen
class RegistrationToken:
    token: str
    uses_allowed: int | None
    pending: int
    completed: int
    expiry_time: int | None

    def is_valid(self, now_ms: int) -> bool:
        if self.expiry_time is not None and self.expiry_time <= now_ms:
            return False
        return self.uses_allowed is None or self.pending + self.completed < self.uses_allowed

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class UiaSessionRecord:
    session_id: str
    operation: str
    user_id: str | None
    created_ts: int
    completed: dict[str, Any]
    data: dict[str, Any]


@attrs.frozen
class NewLogin:
    """A device and access token to create with an account (or for a login)."""

    device_id: str
    display_name: str | None
    token_hash: str
    ip: str | None = None
    user_agent: str | None = None


_DEVICE_COLUMNS = (
    "user_id, device_id, display_name, created_ts, last_seen_ts, last_seen_ip, last_seen_user_agent"
)
_TOKEN_COLUMNS = "token, uses_allowed, pending, completed, expiry_time"
_encode = json.JSONEncoder(separators=(",", ":")).encode


class _CreateUserConflict(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _device(row: Sequence[Any]) -> DeviceRecord:
    return DeviceRecord(row[0], row[1], row[2], int(row[3]), row[4], row[5], row[6])


def _registration_token(row: Sequence[Any]) -> RegistrationToken:
    return RegistrationToken(row[0], row[1], int(row[2]), int(row[3]), row[4])


def _in_list(n: int) -> str:
    return "(" + ", ".join("?" * n) + ")"


class AccountStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    # --- users -------------------------------------------------------------------
    async def get_user(self, user_id: str) -> UserRecord | None:
        rows = await self.db.select(
            "get_user", f"SELECT {_USER_COLUMNS} FROM users WHERE user_id = ?", (user_id,)
        )
        return UserRecord.from_row(rows[0]) if rows else None

    async def user_exists(self, user_id: str) -> bool:
        rows = await self.db.select(
            "user_exists", "SELECT 1 FROM users WHERE user_id = ?", (user_id,)
        )
        return bool(rows)

    async def create_user(
        self,
        user_id: str,
        now_ms: int,
        *,
        password_hash: str | None = None,
        is_admin: bool = False,
        is_guest: bool = False,
        user_type: str | None = None,
        appservice_id: str | None = None,
        displayname: str | None = None,
        login: NewLogin | None = None,
        registration_token: str | None = None,
        ui_auth_session: str | None = None,
    ) -> str | None:
        """Create the account (and its first device and token) in one transaction.

        A used ``registration_token`` moves from pending to completed; the
        finished ``ui_auth_session`` is deleted. Returns None when done, else
        (writing nothing) "user_in_use" or "session_used" (a concurrent request
        finished the same UIA session first).
        """
        try:
            await self.db.run_interaction(
                "create_user",
                self._create_user_txn,
                user_id,
                now_ms,
                password_hash,
                is_admin,
                is_guest,
                user_type,
                appservice_id,
                displayname,
                login,
                registration_token,
                ui_auth_session,
            )
        except _CreateUserConflict as e:
            return e.reason
        return None

    def _create_user_txn(
        self,
        txn: Txn,
        user_id: str,
        now_ms: int,
        password_hash: str | None,
        is_admin: bool,
        is_guest: bool,
        user_type: str | None,
        appservice_id: str | None,
        displayname: str | None,
        login: NewLogin | None,
        registration_token: str | None,
        ui_auth_session: str | None,
    ) -> None:
        # A conflict raises, so that the transaction rolls back whole.
        if ui_auth_session is not None:
            txn.execute("DELETE FROM ui_auth_sessions WHERE session_id = ?", (ui_auth_session,))
            if txn.rowcount != 1:
                raise _CreateUserConflict("session_used")
        txn.execute(
            "INSERT INTO users (user_id, password_hash, created_ts, is_admin, is_guest,"
            " user_type, appservice_id, displayname) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (user_id) DO NOTHING",
            (
                user_id,
                password_hash,
                now_ms,
                is_admin,
                is_guest,
                user_type,
                appservice_id,
                displayname,
            ),
        )
        if txn.rowcount != 1:
            raise _CreateUserConflict("user_in_use")
        if login is not None:
            self._add_login_txn(txn, user_id, now_ms, login)
        if registration_token is not None:
            txn.execute(
                "UPDATE registration_tokens SET pending = pending - 1, completed = completed + 1"
                " WHERE token = ?",
                (registration_token,),
            )

    async def ensure_user(self, user_id: str, now_ms: int, appservice_id: str | None) -> None:
        """Create a password-less user if missing (an application service's sender)."""
        await self.db.run_interaction(
            "ensure_user",
            lambda txn: txn.execute(
                "INSERT INTO users (user_id, created_ts, appservice_id) VALUES (?, ?, ?)"
                " ON CONFLICT (user_id) DO NOTHING",
                (user_id, now_ms, appservice_id),
            ),
        )

    async def set_password_hash(self, user_id: str, password_hash: str | None) -> None:
        await self.db.run_interaction(
            "set_password_hash",
            lambda txn: txn.execute(
                "UPDATE users SET password_hash = ? WHERE user_id = ?", (password_hash, user_id)
            ),
        )

    async def set_admin(self, user_id: str, is_admin: bool) -> None:
        await self.db.run_interaction(
            "set_admin",
            lambda txn: txn.execute(
                "UPDATE users SET is_admin = ? WHERE user_id = ?", (is_admin, user_id)
            ),
        )

    async def set_locked(self, user_id: str, locked: bool) -> None:
        await self.db.run_interaction(
            "set_locked",
            lambda txn: txn.execute(
                "UPDATE users SET locked = ? WHERE user_id = ?", (locked, user_id)
            ),
        )

    async def get_suspended_users(self) -> set[str]:
        rows = await self.db.select(
            "suspended_users", "SELECT user_id FROM users WHERE suspended = TRUE"
        )
        return {r[0] for r in rows}

    async def set_suspended(self, user_id: str, suspended: bool) -> None:
        await self.db.run_interaction(
            "set_suspended",
            lambda txn: txn.execute(
                "UPDATE users SET suspended = ? WHERE user_id = ?", (suspended, user_id)
            ),
        )

    async def deactivate_user(self, user_id: str, erase: bool) -> list[str]:
        """Mark deactivated, wipe the password, drop every token and device.

        Returns the ids of the devices deleted.
        """

        def txn_fn(txn: Txn) -> list[str]:
            txn.execute(
                "UPDATE users SET deactivated = ?, password_hash = NULL,"
                " erased = (erased OR ?) WHERE user_id = ?",
                (True, erase, user_id),
            )
            devices = [
                r[0]
                for r in txn.execute(
                    "SELECT device_id FROM devices WHERE user_id = ?", (user_id,)
                ).fetchall()
            ]
            txn.execute("DELETE FROM access_tokens WHERE user_id = ?", (user_id,))
            txn.execute("DELETE FROM devices WHERE user_id = ?", (user_id,))
            txn.execute("DELETE FROM login_tokens WHERE user_id = ?", (user_id,))
            return devices

        return await self.db.run_interaction("deactivate_user", txn_fn)

    # --- devices and access tokens ------------------------------------------------
    def _add_login_txn(self, txn: Txn, user_id: str, now_ms: int, login: NewLogin) -> None:
        txn.execute(
            "INSERT INTO devices (user_id, device_id, display_name, created_ts, last_seen_ts,"
            " last_seen_ip, last_seen_user_agent) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (user_id, device_id) DO UPDATE SET last_seen_ts = excluded.last_seen_ts,"
            " last_seen_ip = excluded.last_seen_ip,"
            " last_seen_user_agent = excluded.last_seen_user_agent",
            (
                user_id,
                login.device_id,
                login.display_name,
                now_ms,
                now_ms,
                login.ip,
                login.user_agent,
            ),
        )
        txn.execute(
            "INSERT INTO access_tokens (token_hash, user_id, device_id, created_ts)"
            " VALUES (?, ?, ?, ?)",
            (login.token_hash, user_id, login.device_id, now_ms),
        )

    async def add_login(self, user_id: str, now_ms: int, login: NewLogin) -> None:
        """Create (or reuse) ``login.device_id`` and add an access token for it."""
        await self.db.run_interaction("add_login", self._add_login_txn, user_id, now_ms, login)

    async def create_device(
        self, user_id: str, device_id: str, display_name: str | None, now_ms: int
    ) -> bool:
        """Create a device without a token; False if it already exists."""

        def txn_fn(txn: Txn) -> bool:
            txn.execute(
                "INSERT INTO devices (user_id, device_id, display_name, created_ts)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (user_id, device_id) DO NOTHING",
                (user_id, device_id, display_name, now_ms),
            )
            return txn.rowcount == 1

        return await self.db.run_interaction("create_device", txn_fn)

    async def get_access_token(self, token_hash: str) -> TokenRecord | None:
        rows = await self.db.select(
            "get_access_token",
            "SELECT t.user_id, t.device_id, u.is_guest, u.deactivated, u.locked"
            " FROM access_tokens t JOIN users u ON u.user_id = t.user_id"
            " WHERE t.token_hash = ?",
            (token_hash,),
        )
        if not rows:
            return None
        r = rows[0]
        return TokenRecord(r[0], r[1], bool(r[2]), bool(r[3]), bool(r[4]))

    async def delete_access_token(self, token_hash: str) -> None:
        await self.db.run_interaction(
            "delete_access_token",
            lambda txn: txn.execute(
                "DELETE FROM access_tokens WHERE token_hash = ?", (token_hash,)
            ),
        )

    async def get_device(self, user_id: str, device_id: str) -> DeviceRecord | None:
        rows = await self.db.select(
            "get_device",
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user_id = ? AND device_id = ?",
            (user_id, device_id),
        )
        return _device(rows[0]) if rows else None

    async def get_devices(self, user_id: str) -> list[DeviceRecord]:
        rows = await self.db.select(
            "get_devices",
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user_id = ? ORDER BY device_id",
            (user_id,),
        )
        return [_device(r) for r in rows]

    async def set_device_display_name(
        self, user_id: str, device_id: str, display_name: str | None
    ) -> bool:
        def txn_fn(txn: Txn) -> bool:
            txn.execute(
                "UPDATE devices SET display_name = ? WHERE user_id = ? AND device_id = ?",
                (display_name, user_id, device_id),
            )
            return txn.rowcount > 0

        return await self.db.run_interaction("set_device_display_name", txn_fn)

    async def delete_devices(self, user_id: str, device_ids: Sequence[str]) -> list[str]:
        """Delete the devices and their access tokens; returns the ids that existed."""

        def txn_fn(txn: Txn) -> list[str]:
            deleted = []
            for device_id in device_ids:
                txn.execute(
                    "DELETE FROM access_tokens WHERE user_id = ? AND device_id = ?",
                    (user_id, device_id),
                )
                txn.execute(
                    "DELETE FROM devices WHERE user_id = ? AND device_id = ?", (user_id, device_id)
                )
                if txn.rowcount > 0:
                    deleted.append(device_id)
            return deleted

        return await self.db.run_interaction("delete_devices", txn_fn)

    async def delete_other_sessions(
        self, user_id: str, keep_device_id: str | None, keep_token_hash: str | None
    ) -> list[str]:
        """Delete every device but one and every access token but one; returns deleted devices."""

        def txn_fn(txn: Txn) -> list[str]:
            devices = [
                r[0]
                for r in txn.execute(
                    "SELECT device_id FROM devices WHERE user_id = ?", (user_id,)
                ).fetchall()
                if r[0] != keep_device_id
            ]
            if devices:
                txn.execute(
                    f"DELETE FROM devices WHERE user_id = ? AND device_id IN {_in_list(len(devices))}",
                    (user_id, *devices),
                )
            txn.execute(
                "DELETE FROM access_tokens WHERE user_id = ? AND token_hash <> ?",
                (user_id, keep_token_hash or ""),
            )
            return devices

        return await self.db.run_interaction("delete_other_sessions", txn_fn)

    async def update_last_seen(
        self, entries: Iterable[tuple[str, str, int, str, str | None]]
    ) -> None:
        """Batch of (user_id, device_id, ts, ip, user_agent)."""
        rows = [(ts, ip, ua, user_id, device_id) for user_id, device_id, ts, ip, ua in entries]
        await self.db.run_interaction(
            "update_last_seen",
            lambda txn: txn.executemany(
                "UPDATE devices SET last_seen_ts = ?, last_seen_ip = ?, last_seen_user_agent = ?"
                " WHERE user_id = ? AND device_id = ?",
                rows,
            ),
        )

    # --- login tokens ---------------------------------------------------------------
    async def add_login_token(self, token_hash: str, user_id: str, expiry_ts: int) -> None:
        def txn_fn(txn: Txn) -> None:
            txn.execute("DELETE FROM login_tokens WHERE expiry_ts <= ?", (expiry_ts - 86_400_000,))
            txn.execute(
                "INSERT INTO login_tokens (token_hash, user_id, expiry_ts) VALUES (?, ?, ?)",
                (token_hash, user_id, expiry_ts),
            )

        await self.db.run_interaction("add_login_token", txn_fn)

    async def consume_login_token(self, token_hash: str, now_ms: int) -> str | None:
        """The token's user if it exists and has not expired; the token is gone either way."""

        def txn_fn(txn: Txn) -> str | None:
            row = txn.execute(
                "SELECT user_id, expiry_ts FROM login_tokens WHERE token_hash = ?", (token_hash,)
            ).fetchone()
            if row is None:
                return None
            txn.execute("DELETE FROM login_tokens WHERE token_hash = ?", (token_hash,))
            return row[0] if int(row[1]) > now_ms else None

        return await self.db.run_interaction("consume_login_token", txn_fn)

    # --- registration tokens --------------------------------------------------------
    async def get_registration_token(self, token: str) -> RegistrationToken | None:
        rows = await self.db.select(
            "get_registration_token",
            f"SELECT {_TOKEN_COLUMNS} FROM registration_tokens WHERE token = ?",
            (token,),
        )
        return _registration_token(rows[0]) if rows else None

    async def get_registration_tokens(self) -> list[RegistrationToken]:
        rows = await self.db.select(
            "get_registration_tokens",
            f"SELECT {_TOKEN_COLUMNS} FROM registration_tokens ORDER BY token",
        )
        return [_registration_token(r) for r in rows]

    async def create_registration_token(
        self, token: str, uses_allowed: int | None, expiry_time: int | None
    ) -> bool:
        def txn_fn(txn: Txn) -> bool:
            txn.execute(
                "INSERT INTO registration_tokens (token, uses_allowed, expiry_time)"
                " VALUES (?, ?, ?) ON CONFLICT (token) DO NOTHING",
                (token, uses_allowed, expiry_time),
            )
            return txn.rowcount == 1

        return await self.db.run_interaction("create_registration_token", txn_fn)

    async def update_registration_token(
        self, token: str, changes: dict[str, int | None]
    ) -> RegistrationToken | None:
        def txn_fn(txn: Txn) -> RegistrationToken | None:
            for column in ("uses_allowed", "expiry_time"):
                if column in changes:
                    txn.execute(
                        f"UPDATE registration_tokens SET {column} = ? WHERE token = ?",
                        (changes[column], token),
                    )
            row = txn.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM registration_tokens WHERE token = ?", (token,)
            ).fetchone()
            return _registration_token(row) if row else None

        return await self.db.run_interaction("update_registration_token", txn_fn)

    async def delete_registration_token(self, token: str) -> bool:
        def txn_fn(txn: Txn) -> bool:
            txn.execute("DELETE FROM registration_tokens WHERE token = ?", (token,))
            return txn.rowcount > 0

        return await self.db.run_interaction("delete_registration_token", txn_fn)

    async def reserve_registration_token(self, token: str, now_ms: int) -> bool:
        """Count one pending use of ``token`` if it is still valid."""

        def txn_fn(txn: Txn) -> bool:
            txn.execute(
                "UPDATE registration_tokens SET pending = pending + 1 WHERE token = ?"
                " AND (expiry_time IS NULL OR expiry_time > ?)"
                " AND (uses_allowed IS NULL OR pending + completed < uses_allowed)",
                (token, now_ms),
            )
            return txn.rowcount == 1

        return await self.db.run_interaction("reserve_registration_token", txn_fn)

    # --- user-interactive auth sessions ------------------------------------------------
    async def create_ui_auth_session(self, session: UiaSessionRecord) -> None:
        await self.db.run_interaction(
            "create_ui_auth_session",
            lambda txn: txn.execute(
                "INSERT INTO ui_auth_sessions (session_id, operation, user_id, created_ts,"
                " completed, data) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    session.session_id,
                    session.operation,
                    session.user_id,
                    session.created_ts,
                    _encode(session.completed),
                    _encode(session.data),
                ),
            ),
        )

    async def get_ui_auth_session(self, session_id: str) -> UiaSessionRecord | None:
        rows = await self.db.select(
            "get_ui_auth_session",
            "SELECT session_id, operation, user_id, created_ts, completed, data"
            " FROM ui_auth_sessions WHERE session_id = ?",
            (session_id,),
        )
        if not rows:
            return None
        r = rows[0]
        return UiaSessionRecord(r[0], r[1], r[2], int(r[3]), json.loads(r[4]), json.loads(r[5]))

    async def update_ui_auth_session(
        self, session_id: str, completed: dict[str, Any], data: dict[str, Any]
    ) -> None:
        await self.db.run_interaction(
            "update_ui_auth_session",
            lambda txn: txn.execute(
                "UPDATE ui_auth_sessions SET completed = ?, data = ? WHERE session_id = ?",
                (_encode(completed), _encode(data), session_id),
            ),
        )

    async def delete_ui_auth_session(self, session_id: str) -> None:
        await self.db.run_interaction(
            "delete_ui_auth_session",
            lambda txn: txn.execute(
                "DELETE FROM ui_auth_sessions WHERE session_id = ?", (session_id,)
            ),
        )

    async def delete_expired_ui_auth_sessions(self, before_ms: int) -> int:
        """Drop sessions created before ``before_ms``, releasing their pending tokens."""

        def txn_fn(txn: Txn) -> int:
            rows = txn.execute(
                "SELECT session_id, completed FROM ui_auth_sessions WHERE created_ts < ?",
                (before_ms,),
            ).fetchall()
            for session_id, completed in rows:
                token = json.loads(completed).get("m.login.registration_token")
                if isinstance(token, str):
                    txn.execute(
                        "UPDATE registration_tokens SET pending = pending - 1"
                        " WHERE token = ? AND pending > 0",
                        (token,),
                    )
                txn.execute("DELETE FROM ui_auth_sessions WHERE session_id = ?", (session_id,))
            return len(rows)

        return await self.db.run_interaction("delete_expired_ui_auth_sessions", txn_fn)
