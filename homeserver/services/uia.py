"""User-interactive authentication (UIA): flows, stages, sessions.

An endpoint protected by UIA calls ``authenticate`` with the flows it accepts.
Until one flow's stages are all completed the call raises ``AuthRequired``,
which renders as the spec's 401 ``{flows, params, session, completed}`` (plus
``errcode``/``error`` when a stage just failed). Sessions live in the database,
are bound to one operation and one user, and are deleted once used.
"""

import secrets
from typing import Any

import attrs

from homeserver.errors import MatrixError
from homeserver.services.ratelimit import ratelimiter_from_config
from storage.accounts import AccountStore, UiaSessionRecord

DUMMY = "m.login.dummy"
PASSWORD = "m.login.password"
REGISTRATION_TOKEN = "m.login.registration_token"

SESSION_LIFETIME_MS = 2 * 3600 * 1000
_CLEANUP_INTERVAL_MS = 5 * 60 * 1000


class AuthRequired(MatrixError):
    """401: more authentication stages are needed (or the last one failed)."""

    def __init__(
        self,
        flows: list[list[str]],
        params: dict[str, Any],
        session: str,
        completed: list[str],
        errcode: str | None = None,
        error: str | None = None,
    ) -> None:
        super().__init__(errcode or "M_UNAUTHORIZED", error or "Authentication required", 401)
        self.body: dict[str, Any] = {
            "flows": [{"stages": list(flow)} for flow in flows],
            "params": params,
            "session": session,
            "completed": completed,
        }
        if errcode is not None:
            self.body["errcode"] = errcode
            self.body["error"] = error or ""

    def to_json(self) -> dict[str, Any]:
        return self.body


@attrs.frozen
class UiaResult:
    session_id: str
    completed: dict[str, Any]  # stage type -> its result
    data: dict[str, Any]  # the operation's saved parameters


class UserInteractiveAuth:
    def __init__(self, hs: Any) -> None:
        self._hs = hs
        self._clock = hs.clock
        self.store = AccountStore(hs.database)
        self._failed_password = ratelimiter_from_config(
            hs.clock, hs.config["rc_login"].get("failed_attempts", {})
        )
        self._last_cleanup = 0

    async def authenticate(
        self,
        *,
        operation: str,
        auth: dict[str, Any] | None,
        flows: list[list[str]],
        user_id: str | None = None,
        params: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> UiaResult:
        """Run the stage in ``auth``; return once a flow is complete, else raise AuthRequired.

        ``operation`` names what is being authorised (e.g. "POST /delete_devices");
        a session cannot be reused for another operation or another ``user_id``.
        ``data`` is merged into the session's saved parameters (never put a
        secret in it).
        """
        params = params or {}
        if not flows:
            raise MatrixError("M_FORBIDDEN", "No way to authenticate this request is available")
        now = self._clock.time_msec()
        session_id = auth.get("session") if auth else None
        if session_id is not None and not isinstance(session_id, str):
            raise MatrixError("M_BAD_JSON", "auth.session must be a string")
        if session_id:
            record = await self.store.get_ui_auth_session(session_id)
            if record is None or record.created_ts < now - SESSION_LIFETIME_MS:
                raise MatrixError("M_UNKNOWN", "Unknown session ID", 400)
            if record.operation != operation or record.user_id != user_id:
                raise MatrixError(
                    "M_FORBIDDEN",
                    "Requested operation has changed during the UI authentication session.",
                )
            completed = dict(record.completed)
            saved = dict(record.data)
            if data:
                saved.update({k: v for k, v in data.items() if v is not None})
            changed = saved != record.data
        else:
            await self._maybe_cleanup(now)
            session_id = secrets.token_urlsafe(24)
            completed = {}
            saved = {k: v for k, v in (data or {}).items() if v is not None}
            await self.store.create_ui_auth_session(
                UiaSessionRecord(session_id, operation, user_id, now, {}, saved)
            )
            changed = False

        stage = auth.get("type") if auth else None
        if stage is not None:
            allowed = {s for flow in flows for s in flow}
            if not isinstance(stage, str) or stage not in allowed:
                await self._save(session_id, completed, saved, changed)
                raise AuthRequired(
                    flows,
                    params,
                    session_id,
                    list(completed),
                    "M_UNKNOWN",
                    "Unsupported authentication type",
                )
            if stage not in completed:
                try:
                    completed[stage] = await self._check_stage(stage, auth or {}, user_id, now)
                except _StageFailed as e:
                    await self._save(session_id, completed, saved, changed)
                    raise AuthRequired(
                        flows, params, session_id, list(completed), e.errcode, e.message
                    ) from None
                changed = True
        await self._save(session_id, completed, saved, changed)
        if any(all(s in completed for s in flow) for flow in flows):
            return UiaResult(session_id, completed, saved)
        raise AuthRequired(flows, params, session_id, list(completed))

    async def finish(self, session_id: str) -> None:
        """Delete a session whose operation has been carried out."""
        await self.store.delete_ui_auth_session(session_id)

    async def _save(
        self, session_id: str, completed: dict[str, Any], data: dict[str, Any], changed: bool
    ) -> None:
        if changed:
            await self.store.update_ui_auth_session(session_id, completed, data)

    async def _maybe_cleanup(self, now: int) -> None:
        if now - self._last_cleanup < _CLEANUP_INTERVAL_MS:
            return
        self._last_cleanup = now
        await self.store.delete_expired_ui_auth_sessions(now - SESSION_LIFETIME_MS)

    # --- stages -------------------------------------------------------------------------
    async def _check_stage(
        self, stage: str, auth: dict[str, Any], user_id: str | None, now: int
    ) -> Any:
        if stage == DUMMY:
            return True
        if stage == PASSWORD:
            return await self._check_password(auth, user_id)
        if stage == REGISTRATION_TOKEN:
            token = auth.get("token")
            if not isinstance(token, str) or not token:
                raise _StageFailed("M_MISSING_PARAM", "Missing registration token")
            if not await self.store.reserve_registration_token(token, now):
                raise _StageFailed("M_FORBIDDEN", "Invalid registration token")
            return token
        raise _StageFailed("M_UNKNOWN", "Unsupported authentication type")

    async def _check_password(self, auth: dict[str, Any], user_id: str | None) -> str:
        accounts = self._hs.accounts
        claimed = accounts.user_id_from_identifier(auth)
        password = auth.get("password")
        if user_id is None or claimed is None or not isinstance(password, str):
            raise _StageFailed("M_FORBIDDEN", "Invalid password")
        self._failed_password.check(user_id, update=False)
        if claimed != user_id or not await accounts.check_password(user_id, password):
            try:
                self._failed_password.check(user_id)
            except MatrixError:
                pass
            raise _StageFailed("M_FORBIDDEN", "Invalid password")
        return user_id


class _StageFailed(Exception):
    def __init__(self, errcode: str, message: str) -> None:
        super().__init__(message)
        self.errcode = errcode
        self.message = message
