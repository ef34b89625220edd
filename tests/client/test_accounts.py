"""Accounts end to end: registration, login, tokens, devices, passwords, deactivation, admin.

The real server (SQLite and PostgreSQL for everything that touches storage)
driven by matrix-nio, with raw HTTP only for what nio lacks.
"""

import hashlib
import hmac
import os
import sqlite3
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from nio import (
    AsyncClient,
    AsyncClientConfig,
    DeleteDevicesAuthResponse,
    DeleteDevicesResponse,
    DevicesResponse,
    LoginError,
    LoginResponse,
    LogoutResponse,
    RegisterResponse,
    UpdateDeviceResponse,
    WhoamiError,
    WhoamiResponse,
)
from nio.responses import RegisterErrorResponse

from tests.support.clients import run
from tests.support.http import Response, request
from tests.support.postgres import throwaway_database
from tests.support.server import REPO, RunningServer, free_port, start_server

CLIENT = "/_matrix/client/v3"
FAST = {"per_second": 1000, "burst_count": 10000}
FAST_LOGIN = {"address": FAST, "account": FAST, "failed_attempts": FAST}
OPEN = {
    "enable_registration": True,
    "enable_registration_without_verification": True,
    "allow_guest_access": True,
    "rc_registration": FAST,
    "rc_registration_token_validity": FAST,
    "rc_login": FAST_LOGIN,
}
AS_TOKEN = "as-token-for-tests-0123456789"
SCRIPT = REPO / "scripts" / "register_new_matrix_user"


def start(directory: Path, **overrides: Any) -> RunningServer:
    """start_server with cheap bcrypt (the server reads HOMESERVER_BCRYPT_ROUNDS at start-up)."""
    saved = os.environ.get("HOMESERVER_BCRYPT_ROUNDS")
    os.environ["HOMESERVER_BCRYPT_ROUNDS"] = "4"
    try:
        return start_server(directory, **overrides)
    finally:
        if saved is None:
            del os.environ["HOMESERVER_BCRYPT_ROUNDS"]
        else:
            os.environ["HOMESERVER_BCRYPT_ROUNDS"] = saved




def api(
    server: RunningServer,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    prefix: str = CLIENT,
) -> Response:
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    return request(method, server.base_url + prefix + path, body, h)


def register(server: RunningServer, username: str, password: str, **extra: Any) -> dict:
    body = {"username": username, "password": password, "auth": {"type": "m.login.dummy"}}
    r = api(server, "POST", "/register", {**body, **extra})
    assert r.status == 200, r.body
    return r.json()


def password_auth(user: str, password: str, session: str | None = None) -> dict:
    auth = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user},
            "password": password}
    if session is not None:
        auth["session"] = session
    return auth


def client(server: RunningServer, user: str = "") -> AsyncClient:
    return AsyncClient(server.base_url, user,
                       config=AsyncClientConfig(max_limit_exceeded=0, max_timeouts=0))


def assert_error(r: Response, status: int, errcode: str) -> dict:
    assert r.status == status, (r.status, r.body)
    body = r.json()
    assert body["errcode"] == errcode, body
    assert b"Traceback" not in r.body
    return body


def server_config(server: RunningServer) -> dict:
    merged: dict = {}
    for p in server.config_paths:
        merged.update(yaml.safe_load(p.read_text()))
    return merged


def admin_register(server: RunningServer, username: str, password: str, admin: bool) -> dict:
    secret = server_config(server)["registration_shared_secret"]
    url = "/_synapse/admin/v1/register"
    nonce = api(server, "GET", url, prefix="").json()["nonce"]
    mac = hmac.new(secret.encode(), b"\x00".join(
        [nonce.encode(), username.encode(), password.encode(),
         b"admin" if admin else b"notadmin"]), hashlib.sha1).hexdigest()
    r = api(server, "POST", url, {"nonce": nonce, "username": username, "password": password,
                                  "admin": admin, "mac": mac}, prefix="")
    assert r.status == 200, r.body
    return r.json()


# --- servers ------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request, tmp_path_factory):
    """Open registration, guests, one application service; rate limits out of the way."""
    directory = tmp_path_factory.mktemp(f"accounts-{request.param}")
    appservice = directory / "bridge.yaml"
    appservice.write_text(yaml.safe_dump({
        "id": "bridge", "url": None, "as_token": AS_TOKEN, "hs_token": "hs-token-for-tests",
        "sender_localpart": "bridgebot", "rate_limited": False,
        "namespaces": {"users": [{"exclusive": True, "regex": "@bridge_.*"}],
                       "aliases": [], "rooms": []},
    }))
    overrides: dict[str, Any] = {**OPEN, "app_service_config_files": [str(appservice)]}
    with ExitStack() as stack:
        if request.param == "postgres":
            args = stack.enter_context(throwaway_database())
            overrides["database"] = {"name": "psycopg", "args": args}
        s = start(directory, **overrides)
        stack.callback(s.stop)
        yield s
    assert "Traceback" not in s.log()


@pytest.fixture(scope="module")
def closed_server(tmp_path_factory):
    """The defaults: registration and guests off, a registration_shared_secret set."""
    s = start(tmp_path_factory.mktemp("accounts-closed"), rc_login=FAST_LOGIN)
    yield s
    s.stop()
    assert "Traceback" not in s.log()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    s = start(tmp_path_factory.mktemp("accounts-token"), enable_registration=True,
                     registration_requires_token=True, rc_registration=FAST,
                     rc_registration_token_validity=FAST, rc_login=FAST_LOGIN)
    yield s
    s.stop()
    assert "Traceback" not in s.log()


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    """Tight registration and login limits behind a reverse proxy (X-Forwarded-For)."""
    slow = {"per_second": 0.001, "burst_count": 2}
    s = start(
        tmp_path_factory.mktemp("accounts-limited"),
        enable_registration=True, enable_registration_without_verification=True,
        rc_registration=slow, rc_login={"address": slow, "account": FAST, "failed_attempts": slow},
        listeners=[{"port": free_port(), "bind_addresses": ["127.0.0.1"], "type": "http",
                    "x_forwarded": True, "resources": [{"names": ["client"]}]}],
    )
    yield s
    s.stop()


# --- registration and login -------------------------------------------------------------
def test_register_login_whoami(server):
    async def go():
        alice = client(server)
        try:
            r = await alice.register("alice", "alice-pw", device_name="Alice's phone")
            assert isinstance(r, RegisterResponse), r
            assert r.user_id == f"@alice:{server.server_name}"
            w = await alice.whoami()
            assert isinstance(w, WhoamiResponse)
            assert (w.user_id, w.device_id, w.is_guest) == (r.user_id, r.device_id, False)
        finally:
            await alice.close()
        # by localpart, by full user id, with a chosen device id
        for user in ("alice", f"@alice:{server.server_name}"):
            c = client(server, user)
            try:
                login = await c.login("alice-pw", device_name="laptop")
                assert isinstance(login, LoginResponse), login
                assert login.user_id == r.user_id and login.access_token.startswith("mat_")
                assert login.device_id != r.device_id
                assert (await c.whoami()).device_id == login.device_id
            finally:
                await c.close()

    run(go())
    # the legacy "user" field, and a device id of the client's choosing
    r = api(server, "POST", "/login", {"type": "m.login.password", "user": "alice",
                                       "password": "alice-pw", "device_id": "MYDEVICE",
                                       "initial_device_display_name": "Desk"})
    assert r.status == 200 and r.json()["device_id"] == "MYDEVICE"
    assert r.json()["home_server"] == server.server_name
    token = r.json()["access_token"]
    r = api(server, "GET", "/devices/MYDEVICE", token=token)
    assert r.json()["display_name"] == "Desk" and r.json()["last_seen_ip"] == "127.0.0.1"
    # the r0 alias and the deprecated access_token query parameter
    r = api(server, "GET", f"/account/whoami?access_token={quote(token)}",
            prefix="/_matrix/client/r0")
    assert r.status == 200 and r.json()["device_id"] == "MYDEVICE"
    flows = api(server, "GET", "/login").json()["flows"]
    types = [f["type"] for f in flows]
    assert "m.login.password" in types and "m.login.token" in types


def test_registration_uia_and_username_rules(server):
    # Without auth: the flows, a session, then completing it with the session.
    r = api(server, "POST", "/register", {"username": "bob", "password": "bob-pw"})
    assert r.status == 401
    body = r.json()
    assert body["flows"] == [{"stages": ["m.login.dummy"]}] and body["completed"] == []
    assert "errcode" not in body and body["params"] == {}
    r = api(server, "POST", "/register", {"username": "bob", "password": "bob-pw",
                                          "auth": {"type": "m.login.dummy",
                                                   "session": body["session"]}})
    assert r.status == 200 and r.json()["user_id"] == f"@bob:{server.server_name}"
    # a used session is gone
    r = api(server, "POST", "/register", {"username": "bob2", "password": "x",
                                          "auth": {"type": "m.login.dummy",
                                                   "session": body["session"]}})
    assert_error(r, 400, "M_UNKNOWN")
    # taken (checked before UIA), invalid, reserved
    assert_error(api(server, "POST", "/register", {"username": "bob", "password": "x"}),
                 400, "M_USER_IN_USE")
    for bad in ("bad name", "caf\u00e9", "a:b", "_hidden", "12345", "x" * 260, ""):
        r = api(server, "POST", "/register", {"username": bad, "password": "x",
                                              "auth": {"type": "m.login.dummy"}})
        assert_error(r, 400, "M_INVALID_USERNAME")
    # upper case maps to lower case; the username is optional; inhibit_login
    assert register(server, "Carol", "pw")["user_id"] == f"@carol:{server.server_name}"
    generated = register(server, None, "pw")
    assert generated["user_id"].startswith("@") and generated["access_token"]
    r = register(server, "dave", "pw", inhibit_login=True)
    assert "access_token" not in r and "device_id" not in r
    # a password is required
    r = api(server, "POST", "/register", {"username": "nopw", "auth": {"type": "m.login.dummy"}})
    assert_error(r, 400, "M_MISSING_PARAM")
    # /register/available
    r = api(server, "GET", "/register/available?username=freename")
    assert r.status == 200 and r.json() == {"available": True}
    assert_error(api(server, "GET", "/register/available?username=bob"), 400, "M_USER_IN_USE")
    assert_error(api(server, "GET", "/register/available?username=b%20b"),
                 400, "M_INVALID_USERNAME")
    assert_error(api(server, "GET", "/register/available?username=bridge_x"), 400, "M_EXCLUSIVE")
    # an unknown stage type
    r = api(server, "POST", "/register", {"username": "erin", "password": "x",
                                          "auth": {"type": "m.login.magic"}})
    assert r.status == 401 and r.json()["errcode"] == "M_UNKNOWN" and r.json()["session"]


def test_refusals(server):
    register(server, "frank", "frank-pw")
    # wrong password, unknown user: the same 403
    for user in ("frank", "nobody"):
        r = api(server, "POST", "/login", {"type": "m.login.password", "password": "nope",
                                           "identifier": {"type": "m.id.user", "user": user}})
        assert_error(r, 403, "M_FORBIDDEN")

    async def nio_bad_password():
        c = client(server, "frank")
        try:
            r = await c.login("wrong")
            assert isinstance(r, LoginError) and r.status_code == "M_FORBIDDEN"
        finally:
            await c.close()

    run(nio_bad_password())
    # tokens
    body = assert_error(api(server, "GET", "/account/whoami", token="mat_nosuchtoken"),
                        401, "M_UNKNOWN_TOKEN")
    assert body["soft_logout"] is False
    assert_error(api(server, "GET", "/account/whoami"), 401, "M_MISSING_TOKEN")
    assert_error(api(server, "GET", "/devices", headers={"Authorization": "Basic Zm9vOmJhcg=="}),
                 401, "M_MISSING_TOKEN")
    # bodies
    for path in ("/login", "/register"):
        assert_error(api(server, "POST", path, b"{not json"), 400, "M_NOT_JSON")
    assert_error(api(server, "POST", "/login", {"type": 1}), 400, "M_BAD_JSON")
    assert_error(api(server, "POST", "/login", {"password": "x"}), 400, "M_BAD_JSON")
    assert_error(api(server, "POST", "/login", ["type"]), 400, "M_BAD_JSON")
    assert_error(api(server, "POST", "/register", {"username": 5}), 400, "M_BAD_JSON")
    assert_error(api(server, "POST", "/login", {"type": "m.login.bogus"}), 400, "M_UNKNOWN")
    r = api(server, "POST", "/login", {"type": "m.login.password", "password": "x",
                                       "identifier": {"type": "m.id.thirdparty",
                                                      "medium": "email", "address": "a@b.c"}})
    assert_error(r, 403, "M_FORBIDDEN")
    assert_error(api(server, "POST", "/register?kind=admin", {}), 400, "M_INVALID_PARAM")
    assert_error(api(server, "POST", "/register/email/requestToken",
                     {"client_secret": "x", "email": "a@b.c", "send_attempt": 1}),
                 403, "M_THREEPID_DENIED")


def test_devices_with_uia(server):
    register(server, "grace", "grace-pw")

    async def go():
        phone, laptop = client(server, "grace"), client(server, "grace")
        try:
            assert isinstance(await phone.login("grace-pw", device_name="phone"), LoginResponse)
            assert isinstance(await laptop.login("grace-pw", device_name="laptop"), LoginResponse)
            listed = await phone.devices()
            assert isinstance(listed, DevicesResponse)
            names = {d.id: d.display_name for d in listed.devices}
            assert names[phone.device_id] == "phone" and names[laptop.device_id] == "laptop"
            r = await phone.update_device(laptop.device_id, {"display_name": "old laptop"})
            assert isinstance(r, UpdateDeviceResponse)
            assert api(server, "GET", f"/devices/{laptop.device_id}",
                       token=phone.access_token).json()["display_name"] == "old laptop"
            # The laptop's token is in the server's cache now...
            assert isinstance(await laptop.whoami(), WhoamiResponse)
            # ...deleting the device needs the password (UIA) and revokes it anyway.
            first = await phone.delete_devices([laptop.device_id])
            assert isinstance(first, DeleteDevicesAuthResponse)
            assert first.flows == [{"stages": ["m.login.password"]}]
            r = await phone.delete_devices([laptop.device_id],
                                           password_auth("grace", "wrong", first.session))
            assert not isinstance(r, DeleteDevicesResponse)
            assert isinstance(await laptop.whoami(), WhoamiResponse)
            r = await phone.delete_devices([laptop.device_id],
                                           password_auth("grace", "grace-pw", first.session))
            assert isinstance(r, DeleteDevicesResponse), r
            gone = await laptop.whoami()
            assert isinstance(gone, WhoamiError) and gone.status_code == "M_UNKNOWN_TOKEN"
            ids = {d.id for d in (await phone.devices()).devices}
            assert phone.device_id in ids and laptop.device_id not in ids
            return phone.access_token, phone.device_id
        finally:
            await phone.close()
            await laptop.close()

    token, device_id = run(go())
    # the failed stage answers 401 with errcode and the same session
    r = api(server, "POST", "/delete_devices", {"devices": ["X"]}, token=token)
    session = r.json()["session"]
    r = api(server, "POST", "/delete_devices",
            {"devices": ["X"], "auth": password_auth("grace", "nope", session)}, token=token)
    assert r.status == 401 and r.json()["errcode"] == "M_FORBIDDEN"
    assert r.json()["session"] == session and r.json()["completed"] == []
    # someone else's password does not do
    register(server, "heidi", "heidi-pw")
    r = api(server, "POST", "/delete_devices",
            {"devices": ["X"], "auth": password_auth("heidi", "heidi-pw", session)}, token=token)
    assert r.status == 401 and r.json()["errcode"] == "M_FORBIDDEN"
    # a session is bound to its operation
    r = api(server, "DELETE", f"/devices/{device_id}",
            {"auth": password_auth("grace", "grace-pw", session)}, token=token)
    assert_error(r, 403, "M_FORBIDDEN")
    # DELETE /devices/{id} for the current device, in one go with the legacy "user" field
    r = api(server, "DELETE", f"/devices/{device_id}",
            {"auth": {"type": "m.login.password", "user": "grace", "password": "grace-pw"}},
            token=token)
    assert r.status == 200, r.body
    assert_error(api(server, "GET", "/devices", token=token), 401, "M_UNKNOWN_TOKEN")
    # unknown devices
    other = register(server, "ivan", "ivan-pw")["access_token"]
    assert_error(api(server, "GET", "/devices/NOPE", token=other), 404, "M_NOT_FOUND")
    assert_error(api(server, "PUT", "/devices/NOPE", {"display_name": "x"}, token=other),
                 404, "M_NOT_FOUND")
    assert_error(api(server, "PUT", "/devices/NOPE", {"display_name": 3}, token=other),
                 400, "M_BAD_JSON")
    assert_error(api(server, "POST", "/delete_devices", {"auth": {}}, token=other),
                 400, "M_BAD_JSON")


def test_logout_and_logout_all(server):
    register(server, "judy", "judy-pw")

    async def go():
        a, b, c = (client(server, "judy") for _ in range(3))
        try:
            for x in (a, b, c):
                assert isinstance(await x.login("judy-pw"), LoginResponse)
            token_a, device_a = a.access_token, a.device_id
            assert isinstance(await a.logout(), LogoutResponse)
            r = api(server, "GET", "/account/whoami", token=token_a)
            assert_error(r, 401, "M_UNKNOWN_TOKEN")
            listed = await b.devices()
            assert device_a not in {d.id for d in listed.devices} and len(listed.devices) >= 2
            token_c = c.access_token
            assert isinstance(await b.logout(all_devices=True), LogoutResponse)
            assert_error(api(server, "GET", "/account/whoami", token=token_c),
                         401, "M_UNKNOWN_TOKEN")
        finally:
            for x in (a, b, c):
                await x.close()

    run(go())
    token = api(server, "POST", "/login", {"type": "m.login.password", "user": "judy",
                                           "password": "judy-pw"}).json()["access_token"]
    assert [d["device_id"] for d in api(server, "GET", "/devices", token=token)
            .json()["devices"]] == [api(server, "GET", "/account/whoami", token=token)
                                    .json()["device_id"]]


def test_change_password(server):
    me = register(server, "mallory", "old-pw")
    other = api(server, "POST", "/login", {"type": "m.login.password", "user": "mallory",
                                           "password": "old-pw"}).json()
    token = me["access_token"]
    r = api(server, "POST", "/account/password", {"new_password": "new-pw"}, token=token)
    assert r.status == 401 and r.json()["flows"] == [{"stages": ["m.login.password"]}]
    r = api(server, "POST", "/account/password",
            {"new_password": "new-pw", "auth": password_auth("mallory", "old-pw")}, token=token)
    assert r.status == 200, r.body
    # this session stays; the others are logged out
    assert api(server, "GET", "/account/whoami", token=token).status == 200
    assert_error(api(server, "GET", "/account/whoami", token=other["access_token"]),
                 401, "M_UNKNOWN_TOKEN")
    assert [d["device_id"] for d in api(server, "GET", "/devices", token=token)
            .json()["devices"]] == [me["device_id"]]
    login = {"type": "m.login.password", "user": "mallory"}
    assert_error(api(server, "POST", "/login", {**login, "password": "old-pw"}),
                 403, "M_FORBIDDEN")
    kept = api(server, "POST", "/login", {**login, "password": "new-pw"}).json()["access_token"]
    # logout_devices false keeps the other sessions
    r = api(server, "POST", "/account/password",
            {"new_password": "newer-pw", "logout_devices": False,
             "auth": password_auth("mallory", "new-pw")}, token=token)
    assert r.status == 200
    assert api(server, "GET", "/account/whoami", token=kept).status == 200
    assert api(server, "POST", "/login", {**login, "password": "newer-pw"}).status == 200
    assert_error(api(server, "POST", "/account/password", {"logout_devices": True}, token=token),
                 400, "M_BAD_JSON")


def test_deactivate(server):
    me = register(server, "oscar", "oscar-pw")
    token = me["access_token"]
    r = api(server, "POST", "/account/deactivate", {}, token=token)
    assert r.status == 401 and r.json()["flows"] == [{"stages": ["m.login.password"]}]
    r = api(server, "POST", "/account/deactivate",
            {"auth": password_auth("oscar", "wrong", r.json()["session"])}, token=token)
    assert r.status == 401 and r.json()["errcode"] == "M_FORBIDDEN"
    r = api(server, "POST", "/account/deactivate",
            {"auth": password_auth("oscar", "oscar-pw"), "erase": False}, token=token)
    assert r.status == 200 and r.json() == {"id_server_unbind_result": "success"}
    assert_error(api(server, "GET", "/account/whoami", token=token), 401, "M_UNKNOWN_TOKEN")
    r = api(server, "POST", "/login", {"type": "m.login.password", "user": "oscar",
                                       "password": "oscar-pw"})
    assert_error(r, 403, "M_USER_DEACTIVATED")
    assert_error(api(server, "POST", "/register", {"username": "oscar", "password": "x"}),
                 400, "M_USER_IN_USE")


def test_login_token(server):
    me = register(server, "peggy", "peggy-pw")
    token = me["access_token"]
    url = "/_matrix/client/v1/login/get_token"
    r = api(server, "POST", url, {}, token=token, prefix="")
    assert r.status == 401
    r = api(server, "POST", url, {"auth": password_auth("peggy", "peggy-pw",
                                                        r.json()["session"])},
            token=token, prefix="")
    assert r.status == 200, r.body
    assert r.json()["expires_in_ms"] == 120000
    login_token = r.json()["login_token"]

    async def go():
        c = client(server, "peggy")
        try:
            r = await c.login(token=login_token, device_name="new phone")
            assert isinstance(r, LoginResponse), r
            assert r.user_id == me["user_id"]
            await c.close()
            c = client(server, "peggy")
            again = await c.login(token=login_token)
            assert isinstance(again, LoginError) and again.status_code == "M_FORBIDDEN"
        finally:
            await c.close()

    run(go())
    # every call re-prompts: the completed session cannot be replayed
    r = api(server, "POST", url, {}, token=token, prefix="")
    assert r.status == 401 and r.json()["completed"] == []


def test_guests(server):
    r = api(server, "POST", "/register?kind=guest", {"initial_device_display_name": "kiosk",
                                                     "username": "ignored"})
    assert r.status == 200, r.body
    guest = r.json()
    assert not guest["user_id"].startswith("@ignored:")
    who = api(server, "GET", "/account/whoami", token=guest["access_token"]).json()
    assert who["is_guest"] is True and who["device_id"] == guest["device_id"]
    assert_error(api(server, "GET", "/devices", token=guest["access_token"]),
                 403, "M_GUEST_ACCESS_FORBIDDEN")
    caps = api(server, "GET", "/capabilities", token=guest["access_token"]).json()
    assert caps["capabilities"]["m.change_password"] == {"enabled": False}
    assert api(server, "POST", "/logout", {}, token=guest["access_token"]).status == 200


def test_capabilities(server):
    token = register(server, "quentin", "pw")["access_token"]
    r = api(server, "GET", "/capabilities", token=token)
    assert r.status == 200
    caps = r.json()["capabilities"]
    assert caps["m.change_password"] == {"enabled": True}
    assert caps["m.room_versions"]["default"] == "12"
    assert caps["m.room_versions"]["available"] == {str(n): "stable" for n in range(1, 13)}
    assert caps["m.set_displayname"] == {"enabled": True}
    assert caps["m.set_avatar_url"] == {"enabled": True}
    assert caps["m.3pid_changes"] == {"enabled": False}
    assert "m.account_moderation" not in caps
    assert_error(api(server, "GET", "/capabilities"), 401, "M_MISSING_TOKEN")


def test_application_service(server):
    as_auth = {"type": "m.login.application_service"}
    # registration by the application service, in its namespace only
    r = api(server, "POST", "/register", {"username": "bridge_alice", "auth": as_auth,
                                          "inhibit_login": True}, token=AS_TOKEN)
    assert r.status == 200 and "access_token" not in r.json()
    user_id = r.json()["user_id"]
    assert_error(api(server, "POST", "/register", {"username": "outsider", "auth": as_auth},
                     token=AS_TOKEN), 400, "M_EXCLUSIVE")
    assert_error(api(server, "POST", "/register", {"username": "bridge_eve", "password": "x",
                                                   "auth": {"type": "m.login.dummy"}}),
                 400, "M_EXCLUSIVE")
    assert_error(api(server, "POST", "/register", {"username": "bridge_eve", "auth": as_auth}),
                 401, "M_MISSING_TOKEN")
    # identity assertion
    who = api(server, "GET", "/account/whoami", token=AS_TOKEN).json()
    assert who["user_id"] == f"@bridgebot:{server.server_name}" and "device_id" not in who
    r = api(server, "GET", f"/account/whoami?user_id={quote(user_id)}", token=AS_TOKEN)
    assert r.json()["user_id"] == user_id
    for forbidden in (f"@bridge_ghost:{server.server_name}", f"@carol:{server.server_name}"):
        r = api(server, "GET", f"/account/whoami?user_id={quote(forbidden)}", token=AS_TOKEN)
        assert_error(r, 403, "M_FORBIDDEN")
    # login as a namespaced user
    r = api(server, "POST", "/login", {**as_auth, "identifier": {"type": "m.id.user",
                                                                 "user": "bridge_alice"}},
            token=AS_TOKEN)
    assert r.status == 200 and r.json()["user_id"] == user_id
    device_token = r.json()["access_token"]
    assert api(server, "GET", "/account/whoami", token=device_token).json()["user_id"] == user_id
    r = api(server, "POST", "/login", {**as_auth, "identifier": {"type": "m.id.user",
                                                                 "user": "carol"}},
            token=AS_TOKEN)
    assert_error(r, 403, "M_FORBIDDEN")
    # creating a device for a user (201), then deleting it without UIA
    q = f"?user_id={quote(user_id)}"
    r = api(server, "PUT", f"/devices/BRIDGEDEV{q}", {"display_name": "bridge"}, token=AS_TOKEN)
    assert r.status == 201
    r = api(server, "PUT", f"/devices/BRIDGEDEV{q}", {"display_name": "renamed"}, token=AS_TOKEN)
    assert r.status == 200
    r = api(server, "DELETE", f"/devices/BRIDGEDEV{q}", {}, token=AS_TOKEN)
    assert r.status == 200


def test_secrets_are_not_stored_in_clear(server):
    if "database" in server_config(server):
        pytest.skip("reads the SQLite file")
    me = register(server, "trent", "trent-secret-password")
    login = api(server, "POST", "/login", {"type": "m.login.password", "user": "trent",
                                           "password": "trent-secret-password"}).json()
    r = api(server, "POST", "/_matrix/client/v1/login/get_token",
            {"auth": password_auth("trent", "trent-secret-password")},
            token=me["access_token"], prefix="")
    login_token = r.json()["login_token"]
    secrets_ = [b"trent-secret-password", me["access_token"].encode(),
                login["access_token"].encode(), login_token.encode()]
    db = Path(server.config_paths[0]).parent / "data" / "homeserver.db"
    conn = sqlite3.connect(db)
    try:
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                for cell in row:
                    data = cell if isinstance(cell, bytes) else str(cell).encode()
                    for secret in secrets_:
                        assert secret not in data, f"a secret in clear in {table}"
        (hashed,) = conn.execute("SELECT password_hash FROM users WHERE user_id = ?",
                                 (me["user_id"],)).fetchone()
        assert hashed.startswith("$2b$")
        stored = {h for (h,) in conn.execute(
            "SELECT token_hash FROM access_tokens WHERE user_id = ?", (me["user_id"],))}
        assert hashlib.sha256(me["access_token"].encode()).hexdigest() in stored
    finally:
        conn.close()
    # every file the server wrote
    for path in db.parent.iterdir():
        if path.is_file():
            data = path.read_bytes()
            assert all(secret not in data for secret in secrets_), path.name


# --- closed registration, admin registration -------------------------------------------------
def test_registration_disabled(closed_server):
    s = closed_server
    assert_error(api(s, "POST", "/register", {"username": "zed", "password": "x",
                                              "auth": {"type": "m.login.dummy"}}),
                 403, "M_FORBIDDEN")

    async def go():
        c = client(s)
        try:
            r = await c.register("zed", "zed-pw")
            assert isinstance(r, RegisterErrorResponse) and r.status_code == "M_FORBIDDEN"
        finally:
            await c.close()

    run(go())
    assert_error(api(s, "POST", "/register?kind=guest", {}), 403, "M_FORBIDDEN")
    assert_error(api(s, "GET", "/register/available?username=zed"), 403, "M_FORBIDDEN")
    r = api(s, "GET", "/register/m.login.registration_token/validity?token=abc",
            prefix="/_matrix/client/v1")
    assert_error(r, 403, "M_FORBIDDEN")


def test_register_new_matrix_user_script(closed_server):
    s = closed_server
    configs = [arg for p in s.config_paths for arg in ("-c", str(p))]

    def script(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                              text=True, timeout=60)

    # the server's address comes from the config's client listener
    r = script("-u", "root", "-p", "root-pw", "-a", *configs)
    assert r.returncode == 0, r.stderr
    assert f"@root:{s.server_name}" in r.stdout
    secret = server_config(s)["registration_shared_secret"]
    r = script("-u", "plain", "-p", "plain-pw", "--no-admin", "-k", secret, s.base_url)
    assert r.returncode == 0, r.stderr
    r = script("-u", "plain", "-p", "plain-pw", "--no-admin", "-k", secret, s.base_url)
    assert r.returncode == 1 and "already taken" in r.stderr
    assert script("-u", "plain", "-p", "x", "--no-admin", "--exists-ok", "-k", secret,
                  s.base_url).returncode == 0
    r = script("-u", "wrong", "-p", "x", "--no-admin", "-k", "not-the-secret", s.base_url)
    assert r.returncode == 1 and "HMAC incorrect" in r.stderr

    def login(user: str, password: str) -> str:
        r = api(s, "POST", "/login", {"type": "m.login.password", "user": user,
                                      "password": password})
        assert r.status == 200, r.body
        return r.json()["access_token"]

    root, plain = login("root", "root-pw"), login("plain", "plain-pw")
    tokens = "/_synapse/admin/v1/registration_tokens"
    assert api(s, "GET", tokens, token=root, prefix="").status == 200
    assert_error(api(s, "GET", tokens, token=plain, prefix=""), 403, "M_FORBIDDEN")


def test_admin_register_nonces_and_macs(closed_server):
    s = closed_server
    url = "/_synapse/admin/v1/register"
    secret = server_config(s)["registration_shared_secret"]
    nonce = api(s, "GET", url, prefix="").json()["nonce"]

    def body(username: str, nonce: str, key: str = secret, **extra: Any) -> dict:
        mac = hmac.new(key.encode(), f"{nonce}\0{username}\0pw\0notadmin".encode(),
                       hashlib.sha1).hexdigest()
        return {"nonce": nonce, "username": username, "password": "pw", "mac": mac, **extra}

    assert_error(api(s, "POST", url, body("sam", nonce, "bad-key"), prefix=""),
                 403, "M_FORBIDDEN")
    # a nonce is single-use, even after a failure
    assert_error(api(s, "POST", url, body("sam", nonce), prefix=""), 400, "M_UNKNOWN")
    assert_error(api(s, "POST", url, body("sam", "made-up-nonce"), prefix=""), 400, "M_UNKNOWN")
    nonce = api(s, "GET", url, prefix="").json()["nonce"]
    r = api(s, "POST", url, body("sam", nonce), prefix="")
    assert r.status == 200 and r.json()["access_token"].startswith("mat_")
    assert_error(api(s, "POST", url, {"nonce": "x"}, prefix=""), 400, "M_BAD_JSON")


def test_admin_whois_lock_suspend(closed_server):
    s = closed_server
    root = admin_register(s, "boss", "boss-pw", admin=True)
    worker = admin_register(s, "worker", "worker-pw", admin=False)
    caps = api(s, "GET", "/capabilities", token=root["access_token"]).json()["capabilities"]
    assert caps["m.account_moderation"] == {"suspend": True, "lock": True}
    whois = f"/admin/whois/{quote(worker['user_id'])}"
    r = api(s, "GET", whois, token=root["access_token"])
    assert r.status == 200 and worker["device_id"] in r.json()["devices"]
    assert api(s, "GET", whois, token=worker["access_token"]).status == 200
    assert_error(api(s, "GET", f"/admin/whois/{quote(root['user_id'])}",
                     token=worker["access_token"]), 403, "M_FORBIDDEN")
    lock = f"/admin/lock/{quote(worker['user_id'])}"
    v1 = "/_matrix/client/v1"
    assert_error(api(s, "PUT", lock, {"locked": True}, token=worker["access_token"], prefix=v1),
                 403, "M_FORBIDDEN")
    assert api(s, "PUT", lock, {"locked": True}, token=root["access_token"],
               prefix=v1).json() == {"locked": True}
    assert api(s, "GET", lock, token=root["access_token"], prefix=v1).json() == {"locked": True}
    body = assert_error(api(s, "GET", "/account/whoami", token=worker["access_token"]),
                        401, "M_USER_LOCKED")
    assert body["soft_logout"] is True
    assert api(s, "PUT", lock, {"locked": False}, token=root["access_token"],
               prefix=v1).status == 200
    assert api(s, "GET", "/account/whoami", token=worker["access_token"]).status == 200
    suspend = f"/admin/suspend/{quote(worker['user_id'])}"
    assert api(s, "PUT", suspend, {"suspended": True}, token=root["access_token"],
               prefix=v1).json() == {"suspended": True}
    assert api(s, "GET", suspend, token=root["access_token"],
               prefix=v1).json() == {"suspended": True}
    # A suspended user cannot send; once unsuspended they can.
    room = api(s, "POST", "/createRoom", {"preset": "public_chat"},
               token=root["access_token"]).json()["room_id"]
    assert api(s, "POST", f"/join/{quote(room)}", {}, token=worker["access_token"]).status == 200
    send = f"/rooms/{quote(room)}/send/m.room.message/"
    assert_error(api(s, "PUT", send + "s1", {"msgtype": "m.text", "body": "hi"},
                     token=worker["access_token"]), 403, "M_USER_SUSPENDED")
    assert api(s, "PUT", suspend, {"suspended": False}, token=root["access_token"],
               prefix=v1).status == 200
    assert api(s, "PUT", send + "s2", {"msgtype": "m.text", "body": "hi"},
               token=worker["access_token"]).status == 200
    assert_error(api(s, "GET", f"/admin/lock/{quote('@x:elsewhere.example')}",
                     token=root["access_token"], prefix=v1), 400, "M_INVALID_PARAM")
    assert_error(api(s, "GET", f"/admin/lock/{quote('@nobody:' + s.server_name)}",
                     token=root["access_token"], prefix=v1), 404, "M_NOT_FOUND")


# --- registration tokens ---------------------------------------------------------------------
def test_registration_tokens(token_server):
    s = token_server
    admin = admin_register(s, "tokenadmin", "pw", admin=True)["access_token"]
    base = "/_synapse/admin/v1/registration_tokens"
    r = api(s, "POST", base + "/new", {"token": "invite-1", "uses_allowed": 1},
            token=admin, prefix="")
    assert r.status == 200, r.body
    assert r.json() == {"token": "invite-1", "uses_allowed": 1, "pending": 0, "completed": 0,
                        "expiry_time": None}
    generated = api(s, "POST", base + "/new", {"length": 20}, token=admin, prefix="").json()
    assert len(generated["token"]) == 20
    assert_error(api(s, "POST", base + "/new", {"token": "invite-1"}, token=admin, prefix=""),
                 400, "M_INVALID_PARAM")
    assert_error(api(s, "POST", base + "/new", {"token": "bad token!"}, token=admin, prefix=""),
                 400, "M_INVALID_PARAM")

    def validity(token: str) -> bool:
        r = api(s, "GET", f"/register/m.login.registration_token/validity?token={token}",
                prefix="/_matrix/client/v1")
        assert r.status == 200, r.body
        return r.json()["valid"]

    assert validity("invite-1") is True and validity("nope") is False
    r = api(s, "POST", "/register", {"username": "tina", "password": "pw"})
    assert r.json()["flows"] == [{"stages": ["m.login.registration_token", "m.login.dummy"]}]
    # the dummy flow alone is not offered
    r = api(s, "POST", "/register", {"username": "tina", "password": "pw",
                                     "auth": {"type": "m.login.dummy"}})
    assert r.status == 401 and "access_token" not in r.json()

    async def go():
        c, d = client(s), client(s)
        try:
            r = await c.register_with_token("tina", "tina-pw", "invite-1")
            assert isinstance(r, RegisterResponse), r
            assert isinstance(await c.whoami(), WhoamiResponse)
            second = await d.register_with_token("uma", "uma-pw", "invite-1")
            assert isinstance(second, RegisterErrorResponse)
        finally:
            await c.close()
            await d.close()

    run(go())
    assert validity("invite-1") is False
    r = api(s, "GET", base + "/invite-1", token=admin, prefix="")
    assert (r.json()["pending"], r.json()["completed"]) == (0, 1)
    r = api(s, "POST", "/register", {"username": "uma", "password": "pw",
                                     "auth": {"type": "m.login.registration_token",
                                              "token": "invite-1"}})
    assert r.status == 401 and r.json()["errcode"] == "M_FORBIDDEN"
    # raising the limit makes it valid again; listing; deleting
    r = api(s, "PUT", base + "/invite-1", {"uses_allowed": 2}, token=admin, prefix="")
    assert r.json()["uses_allowed"] == 2 and validity("invite-1") is True
    listed = api(s, "GET", base + "?valid=true", token=admin, prefix="").json()
    assert {t["token"] for t in listed["registration_tokens"]} == {"invite-1",
                                                                   generated["token"]}
    assert api(s, "DELETE", base + "/invite-1", token=admin, prefix="").status == 200
    assert_error(api(s, "GET", base + "/invite-1", token=admin, prefix=""), 404, "M_NOT_FOUND")
    assert_error(api(s, "PUT", base + "/invite-1", {"uses_allowed": "x"}, token=admin,
                     prefix=""), 400, "M_BAD_JSON")


# --- rate limits --------------------------------------------------------------------------------
def test_rate_limits_per_client_address(limited_server):
    s = limited_server

    def from_ip(ip: str) -> dict[str, str]:
        return {"X-Forwarded-For": f"{ip}, 10.9.9.9"}

    for i in range(2):
        r = api(s, "POST", "/register", {"username": f"rl{i}", "password": "pw",
                                         "auth": {"type": "m.login.dummy"}},
                headers=from_ip("192.0.2.1"))
        assert r.status == 200, r.body
    r = api(s, "POST", "/register", {"username": "rl2", "password": "pw",
                                     "auth": {"type": "m.login.dummy"}},
            headers=from_ip("192.0.2.1"))
    body = assert_error(r, 429, "M_LIMIT_EXCEEDED")
    assert body["retry_after_ms"] > 0
    # another address has its own budget
    r = api(s, "POST", "/register", {"username": "rl2", "password": "pw",
                                     "auth": {"type": "m.login.dummy"}},
            headers=from_ip("192.0.2.2"))
    assert r.status == 200
    # login: per address
    login = {"type": "m.login.password", "user": "rl0", "password": "pw"}
    for _ in range(2):
        assert api(s, "POST", "/login", login, headers=from_ip("192.0.2.3")).status == 200
    assert_error(api(s, "POST", "/login", login, headers=from_ip("192.0.2.3")),
                 429, "M_LIMIT_EXCEEDED")

    # failed attempts: per account, whatever the address
    async def attempt(password: str, ip: str) -> LoginError | LoginResponse:
        c = AsyncClient(s.base_url, "rl1", config=AsyncClientConfig(
            max_limit_exceeded=0, custom_headers={"X-Forwarded-For": ip}))
        try:
            return await c.login(password)
        finally:
            await c.close()

    async def go():
        for i in range(2):
            r = await attempt("wrong", f"192.0.2.{10 + i}")
            assert isinstance(r, LoginError) and r.status_code == "M_FORBIDDEN"
        r = await attempt("pw", "192.0.2.20")
        assert isinstance(r, LoginError) and r.status_code == "M_LIMIT_EXCEEDED"
        r = await attempt("pw", "192.0.2.21")
        assert isinstance(r, LoginError) and r.status_code == "M_LIMIT_EXCEEDED"

    run(go())
