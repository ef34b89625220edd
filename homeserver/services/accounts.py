"""Accounts: registration, login, access tokens, devices, passwords, deactivation.

Passwords are bcrypt-hashed on a worker thread (never on the reactor).
Access tokens are ``mat_`` + 256 random bits; only their SHA-256 is stored.
"""

import hashlib
import hmac
import logging
import os
import re
import secrets
import string
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import threads

from homeserver.errors import MatrixError
from homeserver.services.auth import ApplicationService, Requester, hash_token
from homeserver.services.ratelimit import Ratelimiter, ratelimiter_from_config
from homeserver.services.uia import DUMMY, PASSWORD, REGISTRATION_TOKEN
from storage.accounts import (
    AccountStore,
    DeviceRecord,
    NewLogin,
    RegistrationToken,
    UserRecord,
)

logger = logging.getLogger(__name__)

DEFAULT_BCRYPT_ROUNDS = 12
ACCESS_TOKEN_PREFIX = "mat_"
LOGIN_TOKEN_PREFIX = "mlt_"
LOGIN_TOKEN_LIFETIME_MS = 120_000
NONCE_LIFETIME_MS = 60_000
MAX_USER_ID_LENGTH = 255
MAX_PASSWORD_LENGTH = 512
MAX_DEVICE_ID_LENGTH = 255
USER_TYPES = ("bot", "support")

LOGIN_PASSWORD = "m.login.password"
LOGIN_TOKEN = "m.login.token"
LOGIN_APPSERVICE = "m.login.application_service"

_LOCALPART = re.compile(r"^[a-z0-9._=\-/+]+$")
_REGISTRATION_TOKEN = re.compile(r"^[A-Za-z0-9._~-]{1,64}$")
_DEVICE_ID_ALPHABET = string.ascii_uppercase

DeviceHook = Callable[[str, list[str]], Awaitable[None]]
DeactivationHook = Callable[[str, bool], Awaitable[None]]


def bcrypt_rounds_from_environment() -> int:
    """HOMESERVER_BCRYPT_ROUNDS overrides the cost (tests use 4); 12 otherwise."""
    value = os.environ.get("HOMESERVER_BCRYPT_ROUNDS")
    if not value:
        return DEFAULT_BCRYPT_ROUNDS
    try:
        rounds = int(value)
    except ValueError:
        raise ValueError(f"HOMESERVER_BCRYPT_ROUNDS must be an integer, not {value!r}") from None
    if not 4 <= rounds <= 31:
        raise ValueError("HOMESERVER_BCRYPT_ROUNDS must be between 4 and 31")
    return rounds


def _password_bytes(password: str) -> bytes:
    # NFKC so that the same password typed on different keyboards matches, and
    # bcrypt's own 72-byte limit applied explicitly (hashes written by Synapse,
    # which does the same normalisation, keep verifying).
    return unicodedata.normalize("NFKC", password).encode("utf-8")[:72]


# bcrypt is imported on first use (these run on worker threads): a server that
# nobody has logged in to or registered with since it started does not carry it.


def hash_password_blocking(password: str, rounds: int) -> str:
    import bcrypt

    return bcrypt.hashpw(_password_bytes(password), bcrypt.gensalt(rounds)).decode("ascii")


def check_password_blocking(password: str, password_hash: str) -> bool:
    import bcrypt

    try:
        return bcrypt.checkpw(_password_bytes(password), password_hash.encode("ascii"))
    except ValueError:  # not a bcrypt hash
        return False


def generate_device_id() -> str:
    return "".join(secrets.choice(_DEVICE_ID_ALPHABET) for _ in range(10))


def generate_access_token() -> str:
    return ACCESS_TOKEN_PREFIX + secrets.token_urlsafe(32)


def device_json(
    device: DeviceRecord, pending: tuple[int, str, str | None] | None
) -> dict[str, Any]:
    """A device as the client API shows it: every key present, null when unknown.

    The spec lets unset fields be absent, but clients written against Synapse
    (matrix-nio among them) require all four keys.
    """
    ts, ip = device.last_seen_ts, device.last_seen_ip
    if pending is not None:
        ts, ip = pending[0], pending[1]
    return {
        "device_id": device.device_id,
        "display_name": device.display_name,
        "last_seen_ip": ip,
        "last_seen_ts": ts,
    }


def _check_created(conflict: str | None) -> None:
    if conflict == "user_in_use":
        raise MatrixError("M_USER_IN_USE", "User ID already taken")
    if conflict == "session_used":
        raise MatrixError("M_UNKNOWN", "Unknown session ID", 400)


class AccountService:
    def __init__(self, hs: Any) -> None:
        self._hs = hs
        self._clock = hs.clock
        self.config = hs.config
        self.server_name: str = hs.server_name
        self.auth = hs.auth
        self.store = AccountStore(hs.database)
        self.bcrypt_rounds = bcrypt_rounds_from_environment()
        rc_login = self.config["rc_login"]
        self._registration_limiter = ratelimiter_from_config(
            hs.clock, self.config["rc_registration"]
        )
        self._available_limiter = ratelimiter_from_config(hs.clock, self.config["rc_registration"])
        self._token_validity_limiter = ratelimiter_from_config(
            hs.clock, self.config["rc_registration_token_validity"]
        )
        self._login_address_limiter = ratelimiter_from_config(hs.clock, rc_login.get("address", {}))
        self._login_account_limiter = ratelimiter_from_config(hs.clock, rc_login.get("account", {}))
        self._login_failed_limiter = ratelimiter_from_config(
            hs.clock, rc_login.get("failed_attempts", {})
        )
        self._login_token_limiter = Ratelimiter(hs.clock, 1 / 60, 3)
        self._dummy_hash: str | None = None
        # admin registration: nonce -> expiry (ms)
        self._nonces: dict[str, int] = {}
        # Called after devices are deleted (their tokens are already gone):
        # hook(user_id, device_ids). The end-to-end keys service deletes keys here.
        self.device_deletion_hooks: list[DeviceHook] = []
        # Called after an account is deactivated: hook(user_id, erase).
        self.deactivation_hooks: list[DeactivationHook] = []
        self._suspended: set[str] | None = None  # loaded on first use

    # --- identifiers ------------------------------------------------------------------
    def user_id_for(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"

    def is_mine(self, user_id: str) -> bool:
        return user_id.startswith("@") and user_id.partition(":")[2] == self.server_name

    def qualify(self, user: str) -> str | None:
        """A full local user id from a localpart or a user id; None if not ours."""
        if user.startswith("@"):
            localpart, sep, domain = user[1:].partition(":")
            if not sep or domain != self.server_name or not localpart:
                return None
            return self.user_id_for(localpart.lower())
        if not user or ":" in user:
            return None
        return self.user_id_for(user.lower())

    def user_id_from_identifier(self, body: dict[str, Any]) -> str | None:
        """The user a login or UIA body names (``identifier`` m.id.user or legacy ``user``)."""
        identifier = body.get("identifier")
        if isinstance(identifier, dict):
            if identifier.get("type") != "m.id.user" or not isinstance(identifier.get("user"), str):
                return None
            return self.qualify(identifier["user"])
        user = body.get("user")
        if isinstance(user, str):
            return self.qualify(user)
        return None

    # --- passwords ------------------------------------------------------------------------
    async def hash_password(self, password: str) -> str:
        return await threads.deferToThread(hash_password_blocking, password, self.bcrypt_rounds)

    async def check_password(self, user_id: str, password: str) -> bool:
        """Whether ``password`` is the (active) user's password; always costs one bcrypt."""
        user = await self.store.get_user(user_id)
        if user is None or user.password_hash is None or user.deactivated:
            if self._dummy_hash is None:
                self._dummy_hash = await self.hash_password(secrets.token_hex(16))
            await threads.deferToThread(check_password_blocking, password, self._dummy_hash)
            return False
        return await threads.deferToThread(check_password_blocking, password, user.password_hash)

    def _validate_password(self, password: Any) -> str:
        if not isinstance(password, str) or not password:
            raise MatrixError("M_MISSING_PARAM", "Missing password")
        if len(password) > MAX_PASSWORD_LENGTH or "\x00" in password:
            raise MatrixError("M_INVALID_PARAM", "Password is too long or contains NUL")
        return password

    # --- users ------------------------------------------------------------------------------
    async def get_user(self, user_id: str) -> UserRecord | None:
        """The account row (profile columns included), or None for no such local user."""
        return await self.store.get_user(user_id)

    async def user_exists(self, user_id: str) -> bool:
        """Whether a local account has this id (deactivated accounts exist too)."""
        return await self.store.user_exists(user_id)

    async def is_suspended(self, user_id: str) -> bool:
        """From memory after the first call: every send asks this."""
        if self._suspended is None:
            self._suspended = await self.store.get_suspended_users()
        return user_id in self._suspended

    async def check_username(
        self, username: str, app_service: ApplicationService | None = None
    ) -> str:
        """The user id ``username`` maps to, if it may be registered now.

        Raises M_INVALID_USERNAME, M_EXCLUSIVE or M_USER_IN_USE.
        """
        localpart = username.lower()
        if not localpart:
            raise MatrixError("M_INVALID_USERNAME", "User ID cannot be empty")
        if not _LOCALPART.match(localpart):
            raise MatrixError(
                "M_INVALID_USERNAME", "User ID can only contain characters a-z, 0-9, or '=_-./+'"
            )
        if app_service is None:
            if localpart.startswith("_"):
                raise MatrixError("M_INVALID_USERNAME", "User ID may not begin with '_'")
            if localpart.isdigit():
                raise MatrixError(
                    "M_INVALID_USERNAME", "Numeric user IDs are reserved for guest users"
                )
        user_id = self.user_id_for(localpart)
        if len(user_id.encode("utf-8")) > MAX_USER_ID_LENGTH:
            raise MatrixError("M_INVALID_USERNAME", "User ID is too long")
        if app_service is None:
            if self.auth.exclusive_app_service_for_user(user_id) is not None:
                raise MatrixError(
                    "M_EXCLUSIVE", "This user ID is reserved by an application service"
                )
        else:
            owner = self.auth.exclusive_app_service_for_user(user_id)
            if not app_service.is_interested_in_user(user_id) or (
                owner is not None and owner.id != app_service.id
            ):
                raise MatrixError(
                    "M_EXCLUSIVE", "User ID is not in the application service's namespace"
                )
        if await self.store.user_exists(user_id):
            raise MatrixError("M_USER_IN_USE", "User ID already taken")
        return user_id

    async def check_username_available(self, username: str, ip: str) -> None:
        if not self.config["enable_registration"]:
            raise MatrixError("M_FORBIDDEN", "Registration has been disabled")
        self._available_limiter.check(ip)
        await self.check_username(username)

    async def _generated_user_id(self) -> str:
        for _ in range(20):
            user_id = self.user_id_for(str(10**9 + secrets.randbelow(9 * 10**9)))
            if not await self.store.user_exists(user_id):
                return user_id
        raise MatrixError("M_UNKNOWN", "Could not allocate a user ID", 500)

    # --- registration ------------------------------------------------------------------------
    def registration_flows(self) -> list[list[str]]:
        if self.config["registration_requires_token"]:
            # The dummy stage after the token is what Synapse asks for, and
            # clients written against it (matrix-nio) send it.
            return [[REGISTRATION_TOKEN, DUMMY]]
        if self.config["enable_registration_without_verification"]:
            return [[DUMMY]]
        return []

    async def register(
        self,
        body: dict[str, Any],
        *,
        kind: str,
        ip: str,
        user_agent: str | None,
        app_service: ApplicationService | None,
        has_token: bool,
    ) -> dict[str, Any]:
        """POST /register: guests, application services, and users through UIA."""
        if kind == "guest":
            return await self._register_guest(body, ip, user_agent)
        if kind != "user":
            raise MatrixError("M_INVALID_PARAM", "kind must be 'user' or 'guest'")
        auth = body.get("auth")
        if app_service is not None:
            return await self._register_app_service_user(body, app_service)
        if isinstance(auth, dict) and auth.get("type") == LOGIN_APPSERVICE:
            if has_token:
                raise MatrixError(
                    "M_UNKNOWN_TOKEN", "Not an application service token", soft_logout=False
                )
            raise MatrixError("M_MISSING_TOKEN", "Missing application service token")
        if not self.config["enable_registration"]:
            raise MatrixError("M_FORBIDDEN", "Registration has been disabled")
        flows = self.registration_flows()
        if not flows:
            raise MatrixError(
                "M_FORBIDDEN",
                "Registration requires a verification method this server does not offer",
            )
        self._registration_limiter.check(ip, update=False)
        username = body.get("username")
        if username is not None:
            await self.check_username(username)
        saved = {
            "username": username,
            "device_id": body.get("device_id"),
            "initial_device_display_name": body.get("initial_device_display_name"),
            "inhibit_login": body.get("inhibit_login"),
        }
        result = await self._hs.uia.authenticate(
            operation="POST /register", auth=auth, flows=flows, data=saved
        )
        params = result.data
        password = self._validate_password(body.get("password"))
        if params.get("username") is not None:
            user_id = await self.check_username(params["username"])
        else:
            user_id = await self._generated_user_id()
        self._registration_limiter.check(ip)
        password_hash = await self.hash_password(password)
        inhibit_login = bool(params.get("inhibit_login"))
        access_token, login = None, None
        if not inhibit_login:
            access_token = generate_access_token()
            login = NewLogin(
                params.get("device_id") or generate_device_id(),
                params.get("initial_device_display_name"),
                hash_token(access_token),
                ip,
                user_agent,
            )
        conflict = await self.store.create_user(
            user_id,
            self._clock.time_msec(),
            password_hash=password_hash,
            displayname=user_id[1:].partition(":")[0],
            login=login,
            registration_token=result.completed.get(REGISTRATION_TOKEN),
            ui_auth_session=result.session_id,
        )
        _check_created(conflict)
        logger.info("registered %s", user_id)
        return self._registration_response(user_id, access_token, login)

    def _registration_response(
        self, user_id: str, access_token: str | None, login: NewLogin | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"user_id": user_id, "home_server": self.server_name}
        if access_token is not None and login is not None:
            body["access_token"] = access_token
            body["device_id"] = login.device_id
        return body

    async def _register_guest(
        self, body: dict[str, Any], ip: str, user_agent: str | None
    ) -> dict[str, Any]:
        if not self.config["allow_guest_access"]:
            raise MatrixError("M_FORBIDDEN", "Guest access is disabled")
        self._registration_limiter.check(ip)
        display_name = body.get("initial_device_display_name")
        for _ in range(5):
            user_id = await self._generated_user_id()
            access_token = generate_access_token()
            login = NewLogin(
                generate_device_id(),
                display_name if isinstance(display_name, str) else None,
                hash_token(access_token),
                ip,
                user_agent,
            )
            if not await self.store.create_user(
                user_id, self._clock.time_msec(), is_guest=True, login=login
            ):
                return self._registration_response(user_id, access_token, login)
        raise MatrixError("M_UNKNOWN", "Could not allocate a user ID", 500)

    async def _register_app_service_user(
        self, body: dict[str, Any], app_service: ApplicationService
    ) -> dict[str, Any]:
        username = body.get("username")
        if not isinstance(username, str):
            raise MatrixError("M_MISSING_PARAM", "An application service must give a username")
        user_id = await self.check_username(username, app_service)
        access_token, login = None, None
        if not body.get("inhibit_login"):
            access_token = generate_access_token()
            login = NewLogin(
                body.get("device_id") or generate_device_id(),
                body.get("initial_device_display_name"),
                hash_token(access_token),
            )
        conflict = await self.store.create_user(
            user_id,
            self._clock.time_msec(),
            appservice_id=app_service.id,
            displayname=user_id[1:].partition(":")[0],
            login=login,
        )
        _check_created(conflict)
        return self._registration_response(user_id, access_token, login)

    # --- shared-secret (admin) registration, as Synapse's /_synapse/admin/v1/register ---------
    def _shared_secret(self) -> str:
        secret = self.config.get("registration_shared_secret")
        if not secret:
            raise MatrixError("M_UNKNOWN", "Shared secret registration is not enabled", 400)
        return secret

    def new_registration_nonce(self) -> str:
        self._shared_secret()
        now = self._clock.time_msec()
        for nonce, expiry in list(self._nonces.items()):
            if expiry <= now:
                del self._nonces[nonce]
        if len(self._nonces) > 10_000:
            raise MatrixError(
                "M_LIMIT_EXCEEDED", "Too many outstanding nonces", retry_after_ms=1000
            )
        nonce = secrets.token_hex(32)
        self._nonces[nonce] = now + NONCE_LIFETIME_MS
        return nonce

    async def register_with_shared_secret(self, body: dict[str, Any]) -> dict[str, Any]:
        secret = self._shared_secret()
        expiry = self._nonces.pop(body["nonce"], None)
        if expiry is None or expiry <= self._clock.time_msec():
            raise MatrixError("M_UNKNOWN", "unrecognised nonce", 400)
        username, password = body["username"], body["password"]
        if "\x00" in username:
            raise MatrixError("M_INVALID_USERNAME", "Invalid username")
        self._validate_password(password)
        admin = bool(body.get("admin"))
        user_type = body.get("user_type")
        if user_type is not None and user_type not in USER_TYPES:
            raise MatrixError("M_INVALID_PARAM", "Invalid user type")
        mac = hmac.new(secret.encode("utf-8"), digestmod=hashlib.sha1)
        parts = [body["nonce"], username, password, "admin" if admin else "notadmin"]
        if user_type:
            parts.append(user_type)
        mac.update(b"\x00".join(p.encode("utf-8") for p in parts))
        if not hmac.compare_digest(mac.hexdigest(), str(body["mac"]).lower()):
            raise MatrixError("M_FORBIDDEN", "HMAC incorrect")
        user_id = await self.check_username(username)
        password_hash = await self.hash_password(password)
        access_token, login = None, None
        if not body.get("inhibit_login"):
            access_token = generate_access_token()
            login = NewLogin(generate_device_id(), None, hash_token(access_token))
        displayname = body.get("displayname") or user_id[1:].partition(":")[0]
        conflict = await self.store.create_user(
            user_id,
            self._clock.time_msec(),
            password_hash=password_hash,
            is_admin=admin,
            user_type=user_type,
            displayname=displayname,
            login=login,
        )
        _check_created(conflict)
        logger.info("registered %s%s with the shared secret", user_id, " (admin)" if admin else "")
        return self._registration_response(user_id, access_token, login)

    # --- login -----------------------------------------------------------------------------------
    def login_flows(self) -> list[dict[str, Any]]:
        flows: list[dict[str, Any]] = [
            {"type": LOGIN_PASSWORD},
            {"type": LOGIN_TOKEN, "get_login_token": True},
        ]
        if self.auth.app_services:
            flows.append({"type": LOGIN_APPSERVICE})
        return flows

    async def login(
        self,
        body: dict[str, Any],
        *,
        ip: str,
        user_agent: str | None,
        app_service: ApplicationService | None,
        has_token: bool,
    ) -> dict[str, Any]:
        login_type = body["type"]
        if login_type == LOGIN_APPSERVICE:
            user_id = await self._app_service_login(body, app_service, has_token)
        else:
            self._login_address_limiter.check(ip)
            if login_type == LOGIN_PASSWORD:
                user_id = await self._password_login(body)
            elif login_type == LOGIN_TOKEN:
                token = body.get("token")
                user_id = None
                if isinstance(token, str) and token:
                    user_id = await self.store.consume_login_token(
                        hash_token(token), self._clock.time_msec()
                    )
                if user_id is None:
                    raise MatrixError("M_FORBIDDEN", "Invalid login token")
            else:
                raise MatrixError("M_UNKNOWN", "Unknown login type")
        user = await self.store.get_user(user_id)
        if user is None:
            raise MatrixError("M_FORBIDDEN", "Invalid username or password")
        if user.deactivated:
            raise MatrixError("M_USER_DEACTIVATED", "This account has been deactivated")
        if user.locked:
            raise MatrixError("M_USER_LOCKED", "This account has been locked", soft_logout=False)
        device_id = body.get("device_id")
        if device_id is not None and (not device_id or len(device_id) > MAX_DEVICE_ID_LENGTH):
            raise MatrixError("M_INVALID_PARAM", "Invalid device_id")
        access_token = generate_access_token()
        login = NewLogin(
            device_id or generate_device_id(),
            body.get("initial_device_display_name"),
            hash_token(access_token),
            ip,
            user_agent,
        )
        await self.store.add_login(user_id, self._clock.time_msec(), login)
        return {
            "user_id": user_id,
            "access_token": access_token,
            "device_id": login.device_id,
            "home_server": self.server_name,
        }

    async def _password_login(self, body: dict[str, Any]) -> str:
        password = body.get("password")
        user_id = self.user_id_from_identifier(body)
        if user_id is None or not isinstance(password, str):
            if not isinstance(password, str):
                raise MatrixError("M_MISSING_PARAM", "Missing password")
            raise MatrixError("M_FORBIDDEN", "Invalid username or password")
        self._login_account_limiter.check(user_id)
        self._login_failed_limiter.check(user_id, update=False)
        user = await self.store.get_user(user_id)
        if user is not None and user.deactivated:
            raise MatrixError("M_USER_DEACTIVATED", "This account has been deactivated")
        if not await self.check_password(user_id, password):
            try:
                self._login_failed_limiter.check(user_id)
            except MatrixError:
                pass
            raise MatrixError("M_FORBIDDEN", "Invalid username or password")
        return user_id

    async def _app_service_login(
        self, body: dict[str, Any], app_service: ApplicationService | None, has_token: bool
    ) -> str:
        if app_service is None:
            if has_token:
                raise MatrixError(
                    "M_UNKNOWN_TOKEN", "Not an application service token", soft_logout=False
                )
            raise MatrixError("M_MISSING_TOKEN", "Missing application service token")
        user_id = self.user_id_from_identifier(body)
        if user_id is None or not app_service.is_interested_in_user(user_id):
            raise MatrixError("M_FORBIDDEN", "User is not in the application service's namespace")
        return user_id

    async def create_login_token(self, user_id: str) -> dict[str, Any]:
        """A single-use m.login.token for ``user_id`` (POST /login/get_token, after UIA)."""
        self._login_token_limiter.check(user_id)
        token = LOGIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
        await self.store.add_login_token(
            hash_token(token), user_id, self._clock.time_msec() + LOGIN_TOKEN_LIFETIME_MS
        )
        return {"login_token": token, "expires_in_ms": LOGIN_TOKEN_LIFETIME_MS}

    # --- logout and devices -------------------------------------------------------------------
    async def _after_devices_deleted(self, user_id: str, device_ids: list[str]) -> None:
        if not device_ids:
            return
        for hook in list(self.device_deletion_hooks):
            try:
                await hook(user_id, device_ids)
            except Exception:
                logger.exception("device deletion hook failed for %s", user_id)

    async def logout(self, requester: Requester) -> None:
        """Revoke the request's token and delete its device."""
        if requester.app_service_id is not None:
            return  # an as_token lives in the registration file
        if requester.device_id is not None:
            await self.delete_devices(requester.user_id, [requester.device_id])
        if requester.access_token_hash is not None:
            await self.store.delete_access_token(requester.access_token_hash)
            self.auth.invalidate_token(requester.access_token_hash)

    async def logout_all(self, requester: Requester) -> None:
        deleted = await self.store.delete_other_sessions(requester.user_id, None, None)
        self.auth.invalidate_user(requester.user_id)
        self.auth.invalidate_devices(requester.user_id, deleted)
        await self._after_devices_deleted(requester.user_id, deleted)

    async def get_devices(self, user_id: str) -> list[dict[str, Any]]:
        return [
            device_json(d, self.auth.pending_last_seen(user_id, d.device_id))
            for d in await self.store.get_devices(user_id)
        ]

    async def get_device(self, user_id: str, device_id: str) -> dict[str, Any] | None:
        device = await self.store.get_device(user_id, device_id)
        if device is None:
            return None
        return device_json(device, self.auth.pending_last_seen(user_id, device_id))

    async def update_device(
        self, requester: Requester, device_id: str, display_name: str | None, has_name: bool
    ) -> int:
        """Rename a device (200); an application service may create one (201)."""
        if has_name:
            updated = await self.store.set_device_display_name(
                requester.user_id, device_id, display_name
            )
        else:
            updated = await self.store.get_device(requester.user_id, device_id) is not None
        if updated:
            return 200
        if requester.app_service_id is not None:
            if len(device_id) > MAX_DEVICE_ID_LENGTH:
                raise MatrixError("M_INVALID_PARAM", "device_id is too long")
            self._login_address_limiter.check(("appservice", requester.app_service_id))
            await self.store.create_device(
                requester.user_id, device_id, display_name, self._clock.time_msec()
            )
            return 201
        raise MatrixError("M_NOT_FOUND", "Unknown device")

    async def delete_devices(self, user_id: str, device_ids: list[str]) -> None:
        """Delete devices and revoke their access tokens (missing devices are ignored)."""
        deleted = await self.store.delete_devices(user_id, device_ids)
        self.auth.invalidate_devices(user_id, device_ids)
        await self._after_devices_deleted(user_id, deleted)

    async def password_flows(self, user_id: str) -> list[list[str]]:
        """UIA flows to re-authenticate ``user_id`` (sensitive operations)."""
        user = await self.store.get_user(user_id)
        return [[PASSWORD]] if user is not None and user.password_hash else []

    # --- password and deactivation ---------------------------------------------------------------
    async def change_password(
        self, requester: Requester, new_password: str, logout_devices: bool
    ) -> None:
        password_hash = await self.hash_password(self._validate_password(new_password))
        await self.store.set_password_hash(requester.user_id, password_hash)
        if logout_devices:
            deleted = await self.store.delete_other_sessions(
                requester.user_id, requester.device_id, requester.access_token_hash
            )
            self.auth.invalidate_user(
                requester.user_id, keep_token_hash=requester.access_token_hash
            )
            self.auth.invalidate_devices(requester.user_id, deleted)
            await self._after_devices_deleted(requester.user_id, deleted)

    async def deactivate(self, user_id: str, erase: bool = False) -> None:
        deleted = await self.store.deactivate_user(user_id, erase)
        self.auth.invalidate_user(user_id)
        self.auth.invalidate_devices(user_id, deleted)
        await self._after_devices_deleted(user_id, deleted)
        for hook in list(self.deactivation_hooks):
            try:
                await hook(user_id, erase)
            except Exception:
                logger.exception("deactivation hook failed for %s", user_id)
        logger.info("deactivated %s%s", user_id, " (erased)" if erase else "")

    # --- registration tokens -------------------------------------------------------------------
    async def registration_token_valid(self, token: str, ip: str) -> bool:
        if not self.config["enable_registration"]:
            raise MatrixError("M_FORBIDDEN", "Registration is not enabled on this homeserver.")
        self._token_validity_limiter.check(ip)
        record = await self.store.get_registration_token(token)
        return record is not None and record.is_valid(self._clock.time_msec())

    def _check_token_limits(self, body: dict[str, Any]) -> dict[str, int | None]:
        changes: dict[str, int | None] = {}
        if "uses_allowed" in body:
            uses = body["uses_allowed"]
            if uses is not None and (not isinstance(uses, int) or uses < 0):
                raise MatrixError(
                    "M_INVALID_PARAM", "uses_allowed must be a non-negative integer or null"
                )
            changes["uses_allowed"] = uses
        if "expiry_time" in body:
            expiry = body["expiry_time"]
            if expiry is not None and (
                not isinstance(expiry, int) or expiry < self._clock.time_msec()
            ):
                raise MatrixError("M_INVALID_PARAM", "expiry_time must not be in the past")
            changes["expiry_time"] = expiry
        return changes

    async def create_registration_token(self, body: dict[str, Any]) -> RegistrationToken:
        limits = self._check_token_limits(body)
        token = body.get("token")
        if token is not None:
            if not isinstance(token, str) or not _REGISTRATION_TOKEN.match(token):
                raise MatrixError(
                    "M_INVALID_PARAM",
                    "token must be 1-64 characters from A-Z, a-z, 0-9, '.', '_', '~', '-'",
                )
            if not await self.store.create_registration_token(
                token, limits.get("uses_allowed"), limits.get("expiry_time")
            ):
                raise MatrixError("M_INVALID_PARAM", f"Token already exists: {token}")
        else:
            length = body.get("length", 16)
            if not isinstance(length, int) or not 0 < length <= 64:
                raise MatrixError("M_INVALID_PARAM", "length must be an integer from 1 to 64")
            alphabet = string.ascii_letters + string.digits + "._~-"
            for _ in range(5):
                token = "".join(secrets.choice(alphabet) for _ in range(length))
                if await self.store.create_registration_token(
                    token, limits.get("uses_allowed"), limits.get("expiry_time")
                ):
                    break
            else:
                raise MatrixError("M_UNKNOWN", "Could not generate a unique token", 500)
        record = await self.store.get_registration_token(token)
        assert record is not None
        return record

    async def list_registration_tokens(self, valid: bool | None) -> list[RegistrationToken]:
        tokens = await self.store.get_registration_tokens()
        if valid is None:
            return tokens
        now = self._clock.time_msec()
        return [t for t in tokens if t.is_valid(now) == valid]

    async def get_registration_token(self, token: str) -> RegistrationToken:
        record = await self.store.get_registration_token(token)
        if record is None:
            raise MatrixError("M_NOT_FOUND", "No such registration token")
        return record

    async def update_registration_token(
        self, token: str, body: dict[str, Any]
    ) -> RegistrationToken:
        record = await self.store.update_registration_token(token, self._check_token_limits(body))
        if record is None:
            raise MatrixError("M_NOT_FOUND", "No such registration token")
        return record

    async def delete_registration_token(self, token: str) -> None:
        if not await self.store.delete_registration_token(token):
            raise MatrixError("M_NOT_FOUND", "No such registration token")

    # --- server administration -----------------------------------------------------------------
    async def whois(self, user_id: str) -> dict[str, Any]:
        devices: dict[str, Any] = {}
        for d in await self.store.get_devices(user_id):
            pending = self.auth.pending_last_seen(user_id, d.device_id)
            ts, ip, ua = (
                pending
                if pending is not None
                else (d.last_seen_ts, d.last_seen_ip, d.last_seen_user_agent)
            )
            connection: dict[str, Any] = {}
            if ip is not None:
                connection["ip"] = ip
            if ts is not None:
                connection["last_seen"] = ts
            if ua is not None:
                connection["user_agent"] = ua
            devices[d.device_id] = {
                "sessions": [{"connections": [connection] if connection else []}]
            }
        return {"user_id": user_id, "devices": devices}

    async def moderation_target(self, user_id: str) -> UserRecord:
        """The local, active, non-admin user a server admin wants to lock or suspend."""
        if not self.is_mine(user_id):
            raise MatrixError("M_INVALID_PARAM", "User does not belong to the local server.")
        user = await self.store.get_user(user_id)
        if user is None or user.deactivated:
            raise MatrixError("M_NOT_FOUND", "User not found.")
        if user.is_admin:
            raise MatrixError("M_FORBIDDEN", "Cannot moderate a server administrator.")
        return user

    async def set_locked(self, user_id: str, locked: bool) -> None:
        await self.store.set_locked(user_id, locked)
        self.auth.invalidate_user(user_id)

    async def set_suspended(self, user_id: str, suspended: bool) -> None:
        await self.store.set_suspended(user_id, suspended)
        if self._suspended is not None:
            (self._suspended.add if suspended else self._suspended.discard)(user_id)
