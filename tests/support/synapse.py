"""A real Synapse (and our server) federating over loopback TLS, for federation tests.

    synapse = start_synapse(tmp_path / "synapse")        # waits until it answers
    ours = start_federating_server(tmp_path / "ours")     # our server, TLS federation
    user_id, token = register(synapse, "alice")
    status, body = client_call(synapse, "GET", "/_matrix/client/v3/profile/...", token)
    ...
    synapse.stop(); ours.stop()

or the module-scoped pytest fixtures ``synapse_server`` and ``federating_server``
(``tests/federation/conftest.py`` provides them to every test there).

Both listen on 127.0.0.1 only, with server names ``127.0.0.1:<port>``,
self-signed certificates and certificate checks off; each refuses to
contact any address outside 127.0.0.0/8. Synapse drops bad PDUs silently and
still answers 200: ``tests/federation/conftest.py`` attaches the logs of
every server started here (``running_logs()``) to each failing test.
"""

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.servers import generate_tls_certificate, loopback_only_blocklist
from crypto.keys import generate_signing_key, write_signing_keys
from tests.support.clients import E2E_CONFIG
from tests.support.http import request
from tests.support.server import REPO, RunningServer, free_port, write_config

NO_LIMIT = {"per_second": 100000, "burst_count": 100000}

# Every server started by this module, while it runs: name -> log path.
_RUNNING: dict[str, Path] = {}


def running_logs(max_chars: int = 40_000) -> list[tuple[str, str]]:
    """(server, tail of its log) for every server started here that is still up."""
    out = []
    for name, path in list(_RUNNING.items()):
        text = path.read_text(errors="replace") if path.exists() else "(no log)"
        out.append((name, text[-max_chars:]))
    return out


# --- Synapse ------------------------------------------------------------------------


def synapse_config(directory: Path, port: int, **overrides: Any) -> dict[str, Any]:
    cert, key = generate_tls_certificate(directory)
    blocklist = loopback_only_blocklist()
    limits = {
        "rc_message": NO_LIMIT,
        "rc_registration": NO_LIMIT,
        "rc_login": {"address": NO_LIMIT, "account": NO_LIMIT, "failed_attempts": NO_LIMIT},
        "rc_joins": {"local": NO_LIMIT, "remote": NO_LIMIT},
        "rc_joins_per_room": NO_LIMIT,
        "rc_invites": {"per_room": NO_LIMIT, "per_user": NO_LIMIT, "per_issuer": NO_LIMIT},
        "rc_third_party_invite": NO_LIMIT,
        "rc_admin_redaction": NO_LIMIT,
        "rc_key_requests": NO_LIMIT,
        "rc_3pid_validation": NO_LIMIT,
        "rc_media_create": NO_LIMIT,
        "rc_presence": {"per_user": NO_LIMIT},
        "rc_room_creation": NO_LIMIT,
        "rc_delayed_event_mgmt": NO_LIMIT,
        "rc_reports": NO_LIMIT,
        "rc_federation": {
            "window_size": 1000,
            "sleep_limit": 10000,
            "sleep_delay": 1,
            "reject_limit": 100000,
            "concurrent": 10000,
        },
    }
    return {
        "server_name": f"127.0.0.1:{port}",
        "public_baseurl": f"https://127.0.0.1:{port}/",
        "pid_file": str(directory / "homeserver.pid"),
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": True,
                "x_forwarded": False,
                "resources": [{"names": ["client", "federation"], "compress": False}],
            }
        ],
        "tls_certificate_path": str(cert),
        "tls_private_key_path": str(key),
        "database": {"name": "sqlite3", "args": {"database": str(directory / "homeserver.db")}},
        "log_config": str(directory / "log.yaml"),
        "media_store_path": str(directory / "media_store"),
        "signing_key_path": str(directory / "signing.key"),
        "report_stats": False,
        "bcrypt_rounds": 4,
        "macaroon_secret_key": secrets.token_hex(16),
        "form_secret": secrets.token_hex(16),
        "registration_shared_secret": secrets.token_hex(16),
        "enable_registration": True,
        "enable_registration_without_verification": True,
        "federation_verify_certificates": False,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        # Synapse checks IP-literal destinations only against these lists.
        "ip_range_blacklist": blocklist,
        "federation_ip_range_blacklist": blocklist,
        "federation": {
            "destination_min_retry_interval": 100,  # ms
            "destination_retry_multiplier": 1.1,
            "destination_max_retry_interval": 1000,
            "client_timeout": 20_000,
        },
        "room_list_publication_rules": [{"action": "allow"}],
        "allow_public_rooms_over_federation": True,
        "allow_public_rooms_without_auth": True,
        "url_preview_enabled": False,
        "enable_metrics": False,
        **limits,
        **overrides,
    }


_SYNAPSE_LOG_CONFIG = """
version: 1
formatters:
  precise:
    format: '%(asctime)s %(name)s %(levelname)s %(request)s %(message)s'
filters:
  context:
    (): synapse.logging.context.LoggingContextFilter
    request: ""
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filters: [context]
    filename: {log}
loggers:
  synapse.storage.SQL: {{level: WARNING}}
  synapse.federation: {{level: DEBUG}}
  synapse.crypto: {{level: DEBUG}}
  synapse.http.matrixfederationclient: {{level: DEBUG}}
  synapse.handlers.federation: {{level: DEBUG}}
  synapse.handlers.federation_event: {{level: DEBUG}}
root:
  level: INFO
  handlers: [file]
disable_existing_loggers: false
"""


class SynapseServer:
    def __init__(self, directory: Path, port: int | None = None, **overrides: Any) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = port or free_port()
        self.server_name = f"127.0.0.1:{self.port}"
        self.base_url = f"https://127.0.0.1:{self.port}"
        self.log_path = directory / "homeserver.log"
        self.config = synapse_config(directory, self.port, **overrides)
        self.config_path = directory / "homeserver.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        (directory / "log.yaml").write_text(_SYNAPSE_LOG_CONFIG.format(log=self.log_path))
        key_path = Path(self.config["signing_key_path"])
        if not key_path.exists():
            write_signing_keys(key_path, [generate_signing_key()])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> "SynapseServer":
        _ensure_synapse_installed()
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
            stdout=log,
            stderr=log,
            cwd=self.directory,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        _RUNNING[f"synapse {self.server_name}"] = self.log_path
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Synapse exited {self.process.returncode}:\n{self.log()}")
            try:
                if (
                    request("GET", self.base_url + "/_matrix/client/versions", timeout=2).status
                    == 200
                ):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Synapse did not start in {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        _RUNNING.pop(f"synapse {self.server_name}", None)
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signing_key(self) -> Any:
        from crypto.keys import read_signing_keys

        return read_signing_keys(self.config["signing_key_path"])[0]


def _ensure_synapse_installed() -> None:
    try:
        import synapse  # noqa: F401
    except ImportError:
        # matrix-synapse is in the project's test extra.
        subprocess.run([sys.executable, "-m", "pip", "install", "-e", f"{REPO}[test]"], check=True)


def start_synapse(directory: Path, **overrides: Any) -> SynapseServer:
    """A Synapse on a free loopback port, started and answering."""
    return SynapseServer(directory, **overrides).start()


# --- our server, federating -----------------------------------------------------------


class FederatingServer(RunningServer):
    """Our server with a TLS listener for client, federation and key resources."""

    def start(self, timeout: float = 30.0) -> "FederatingServer":
        super().start(timeout)
        _RUNNING[f"ours {self.server_name}"] = self.log_path
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        _RUNNING.pop(f"ours {self.server_name}", None)
        return super().stop(sig, timeout)

    def signing_key(self) -> Any:
        from crypto.keys import read_signing_keys

        merged: dict[str, Any] = {}
        for p in self.config_paths:
            merged.update(yaml.safe_load(p.read_text()))
        path = Path(merged["signing_key_path"])
        if not path.is_absolute():
            path = self.config_paths[0].parent / path
        return read_signing_keys(path)[0]


def federating_config(directory: Path, port: int, **overrides: Any) -> dict[str, Any]:
    cert, key = generate_tls_certificate(directory)
    return {
        **E2E_CONFIG,
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": True,
                "resources": [{"names": ["client", "federation", "keys", "media"]}],
            }
        ],
        "public_baseurl": f"https://127.0.0.1:{port}/",
        "tls_certificate_path": str(cert),
        "tls_private_key_path": str(key),
        "federation_verify_certificates": False,
        "federation_ip_range_blacklist": loopback_only_blocklist(),
        "ip_range_blacklist": loopback_only_blocklist(),
        "trusted_key_servers": [],
        "allow_public_rooms_over_federation": True,
        "room_list_publication_rules": [{"action": "allow"}],
        "federation": {
            "destination_min_retry_interval": "100ms",
            "destination_retry_multiplier": 1.1,
            "destination_max_retry_interval": "1s",
        },
        **overrides,
    }


def start_federating_server(directory: Path, **overrides: Any) -> FederatingServer:
    """Our server on a free loopback port, server name ``127.0.0.1:<port>``, federating."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server_name = f"127.0.0.1:{port}"
    config = write_config(directory, server_name, **federating_config(directory, port, **overrides))
    server = FederatingServer([config, directory / "overrides.yaml"], directory / "server.log")
    return server.start()


# --- pytest fixtures (module scope: a Synapse takes a few seconds to start) -------------


@pytest.fixture(scope="module")
def synapse_server(tmp_path_factory: Any) -> Iterator[SynapseServer]:
    """A running Synapse for the module (re-export it from a conftest.py)."""
    server = SynapseServer(tmp_path_factory.mktemp("synapse")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def federating_server(tmp_path_factory: Any) -> Iterator[FederatingServer]:
    """Our server for the module, federating over loopback TLS."""
    server = start_federating_server(tmp_path_factory.mktemp("ours"))
    try:
        yield server
    finally:
        server.stop()


# --- client helpers (blocking; both servers are other processes) -----------------------


def client_call(
    server: Any,
    method: str,
    path: str,
    token: str | None = None,
    body: Any = None,
    timeout: float = 30,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    r = request(method, server.base_url + path, body=body, headers=headers, timeout=timeout)
    try:
        return r.status, r.json()
    except ValueError:
        return r.status, r.body


def register(
    server: Any, localpart: str, password: str = "correct horse battery"
) -> tuple[str, str]:
    """Register through the client API (UIA with m.login.dummy); (user_id, access_token)."""
    path = "/_matrix/client/v3/register"
    body: dict[str, Any] = {"username": localpart, "password": password, "inhibit_login": False}
    status, response = client_call(server, "POST", path, body=body)
    if status == 401 and isinstance(response, dict) and "session" in response:
        body["auth"] = {"type": "m.login.dummy", "session": response["session"]}
        status, response = client_call(server, "POST", path, body=body)
    if status != 200:
        raise AssertionError(
            f"registering {localpart} on {server.server_name}: {status} {response}"
        )
    return response["user_id"], response["access_token"]
