"""Both servers as subprocesses on loopback, and what /proc says about them.

Our server is configured through its own CLI (``generate-config``, then an
overrides file layered on top, as tests/support does). Synapse runs from its own
virtual environment (``.bench/synapse-venv``, created on first use) with a config
written here. Both get: registration open without verification, every ``rc_*``
limit raised out of the way, the same bcrypt cost, the same database engine and
pool size, INFO logging to a file, a client listener on 127.0.0.1:<free port>.

With ``federation=True`` (phase 12) each also gets a TLS federation listener on
another free loopback port and the server name ``127.0.0.1:<that port>``, so the
two can reach each other, as tests/support/synapse.py sets up a federating pair:
a self-signed certificate, certificate checks off, no key notaries, an IP
blocklist of every range except 127.0.0.0/8, short retry intervals, and Synapse's
``rc_federation`` raised. The client listener stays plain HTTP, as in phases 1-11.
"""

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / ".bench"
SYNAPSE_VENV = BENCH_DIR / "synapse-venv"
SERVER_NAME = "localhost"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Large enough never to be hit by the workload, on both servers.
NO_LIMIT = {"per_second": 1_000_000, "burst_count": 1_000_000}

# rc_* keys both servers understand.
COMMON_LIMITS: dict[str, Any] = {
    "rc_message": NO_LIMIT,
    "rc_registration": NO_LIMIT,
    "rc_registration_token_validity": NO_LIMIT,
    "rc_login": {"address": NO_LIMIT, "account": NO_LIMIT, "failed_attempts": NO_LIMIT},
    "rc_joins": {"local": NO_LIMIT, "remote": NO_LIMIT},
    "rc_joins_per_room": NO_LIMIT,
    "rc_invites": {"per_room": NO_LIMIT, "per_user": NO_LIMIT, "per_issuer": NO_LIMIT},
    "rc_media_create": NO_LIMIT,
    "rc_admin_redaction": NO_LIMIT,
    "rc_3pid_validation": NO_LIMIT,
    "rc_presence": {"per_user": NO_LIMIT},
}
# Limits only Synapse has (ours would log them as unknown keys).
SYNAPSE_ONLY_LIMITS: dict[str, Any] = {
    "rc_room_creation": NO_LIMIT,
    "rc_key_requests": NO_LIMIT,
    "rc_third_party_invite": NO_LIMIT,
    "rc_delayed_event_mgmt": NO_LIMIT,
    "rc_reports": NO_LIMIT,
    "rc_user_directory": NO_LIMIT,
    "rc_profile": NO_LIMIT,
}
DB_POOL = {"cp_min": 5, "cp_max": 10}  # Synapse's defaults, given to both

# Synapse's inbound federation limiter, raised out of the way (phase 12 pushes
# a thousand events through it); the values tests/support/synapse.py uses.
SYNAPSE_FEDERATION_LIMIT = {
    "window_size": 1000,
    "sleep_limit": 10000,
    "sleep_delay": 1,
    "reject_limit": 100000,
    "concurrent": 10000,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- federation on loopback (the equivalents of tests/support/synapse.py's helpers) ---


def loopback_only_blocklist() -> list[str]:
    """CIDR ranges covering every IPv4 and IPv6 address except 127.0.0.0/8 (and its
    IPv4-mapped, -compatible and 6to4 forms, which Synapse derives from IPv4 ranges)."""
    v4 = list(
        ipaddress.ip_network("0.0.0.0/0").address_exclude(ipaddress.ip_network("127.0.0.0/8"))
    )
    v6: list[Any] = [ipaddress.ip_network("::/0")]
    for keep in ("::ffff:127.0.0.0/104", "::127.0.0.0/104", "2002:7f00::/24"):
        keep_net = ipaddress.ip_network(keep)
        v6 = [
            part
            for net in v6
            for part in (net.address_exclude(keep_net) if keep_net.subnet_of(net) else [net])
        ]
    return [str(n) for n in sorted(v4)] + [str(n) for n in ipaddress.collapse_addresses(v6)]


def generate_tls_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost; (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def federation_settings(workdir: Path, fed_port: int) -> dict[str, Any]:
    """Config keys both servers share for federating on loopback."""
    cert, key = generate_tls_certificate(workdir / "tls")
    blocklist = loopback_only_blocklist()
    return {
        "public_baseurl": f"https://127.0.0.1:{fed_port}/",
        "tls_certificate_path": str(cert),
        "tls_private_key_path": str(key),
        "federation_verify_certificates": False,
        "trusted_key_servers": [],
        "ip_range_blacklist": blocklist,
        "federation_ip_range_blacklist": blocklist,
    }


def federation_listener(fed_port: int, names: list[str]) -> dict[str, Any]:
    return {
        "port": fed_port,
        "bind_addresses": ["127.0.0.1"],
        "type": "http",
        "tls": True,
        "x_forwarded": False,
        "resources": [{"names": names, "compress": False}],
    }


# --- /proc ------------------------------------------------------------------------------


@dataclass
class ProcStats:
    rss_kib: int  # VmRSS now, summed over the process and its descendants
    hwm_kib: int  # VmHWM (peak RSS), summed likewise
    cpu_s: float  # utime + stime so far


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(rest[1]), []).append(int(entry.name))
    return children


def _tree(pid: int) -> list[int]:
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def proc_stats(pid: int) -> ProcStats:
    """RSS, peak RSS and CPU seconds of ``pid`` and its descendants, from /proc."""
    rss = hwm = 0
    ticks = 0
    for p in _tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
            # Fields after the parenthesised command name; utime and stime are
            # fields 14 and 15 of the whole line, so 11 and 12 of the rest.
            rest = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1])
        ticks += int(rest[11]) + int(rest[12])
    return ProcStats(rss, hwm, ticks / CLK_TCK)


# --- PostgreSQL ---------------------------------------------------------------------------

ADMIN_DSN = os.environ.get(
    "BENCH_POSTGRES_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)


@contextmanager
def throwaway_databases() -> Iterator[Any]:
    """Yields ``create(label) -> conninfo dict``; drops every database made on exit.

    Databases are created with C collation from template0: Synapse requires it,
    and ours gets the same so neither has an advantage in index comparisons.
    """
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    made: list[str] = []
    params = conninfo_to_dict(ADMIN_DSN)

    def create(label: str) -> dict[str, Any]:
        name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(
                f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' "
                "TEMPLATE template0"
            )
        made.append(name)
        return {
            "dbname": name,
            "user": params.get("user", "postgres"),
            "host": params.get("host", "127.0.0.1"),
            "port": int(params.get("port", 5432)),
        }

    try:
        yield create
    finally:
        for name in made:
            try:
                with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as e:  # noqa: BLE001 - report and keep dropping the others
                print(f"bench: could not drop database {name}: {e}", file=sys.stderr)


# --- the servers ----------------------------------------------------------------------------


class ServerProcess:
    """One server subprocess: start, wait until it answers, stop, measure."""

    label = "?"

    def __init__(self, workdir: Path, federation: bool = False) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.federation = federation
        # With federation, the TLS listener other servers reach us on, and the
        # server name that leads them there.
        self.fed_port = free_port() if federation else None
        self.server_name = f"127.0.0.1:{self.fed_port}" if federation else SERVER_NAME
        self.log_path = workdir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.version = "?"
        self.profile: Path | None = None
        self._server_pid: int | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    @property
    def pid(self) -> int:
        """The server's own process (under py-spy, its child)."""
        assert self.process is not None
        if self.profile is None:
            return self.process.pid
        if self._server_pid is None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                children = _children_map().get(self.process.pid)
                if children:
                    self._server_pid = children[0]
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"py-spy started no {self.label} process")
        return self._server_pid

    def start(
        self,
        timeout: float = 180.0,
        profile: Path | None = None,
        profile_format: str = "flamegraph",
    ) -> None:
        """Start and wait until /_matrix/client/versions answers.

        With ``profile``, the server runs under ``py-spy record`` (attaching to a
        running process is not permitted on every machine; spawning always is),
        which writes the profile when the server exits.
        """
        command = self.command()
        if profile is not None:
            self.profile = profile
            command = [
                py_spy(),
                "record",
                "--rate",
                "100",
                "--format",
                profile_format,
                "--output",
                str(profile),
                "--",
                *command,
            ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it until exit
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self.environment(),
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        url = self.base_url + "/_matrix/client/versions"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.label} exited with status {self.process.returncode}; "
                    f"log: {self.log_path}\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"{self.label} did not answer within {timeout:.0f}s; log: {self.log_path}"
        )

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            if self.profile is not None and self._server_pid is not None:
                # Stop the server, not py-spy: py-spy then writes the profile.
                try:
                    os.kill(self._server_pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            else:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def stats(self) -> ProcStats:
        return proc_stats(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class OurServer(ServerProcess):
    label = "ours"

    def __init__(
        self,
        workdir: Path,
        database: dict[str, Any] | None = None,
        bcrypt_rounds: int = 12,
        federation: bool = False,
    ) -> None:
        super().__init__(workdir, federation)
        self.bcrypt_rounds = bcrypt_rounds
        self.config_path = workdir / "homeserver.yaml"
        self.overrides_path = workdir / "overrides.yaml"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "homeserver.app",
                "generate-config",
                "--server-name",
                self.server_name,
                "--config-path",
                str(self.config_path),
                "--port",
                str(self.port),
                "--bind-address",
                "127.0.0.1",
            ],
            check=True,
            capture_output=True,
            cwd=REPO,
        )
        overrides: dict[str, Any] = {
            "enable_registration": True,
            "enable_registration_without_verification": True,
            **COMMON_LIMITS,
        }
        if database is not None:
            overrides["database"] = {"name": "psycopg", "args": {**database, **DB_POOL}}
        if federation:
            assert self.fed_port is not None
            overrides.update(federation_settings(workdir, self.fed_port))
            overrides["listeners"] = [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client", "media"]}],
                },
                federation_listener(self.fed_port, ["federation", "keys"]),
            ]
            overrides["federation"] = {
                "destination_min_retry_interval": "100ms",
                "destination_retry_multiplier": 1.1,
                "destination_max_retry_interval": "1s",
            }
        self.overrides_path.write_text(yaml.safe_dump(overrides))
        self.database = "postgresql" if database else "sqlite"
        try:
            self.version = (
                "git "
                + subprocess.run(
                    ["git", "rev-parse", "--short", "HEAD"],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.strip()
            )
        except (OSError, subprocess.CalledProcessError):
            self.version = "?"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "homeserver.app",
            "run",
            "--config-path",
            str(self.config_path),
            "--config-path",
            str(self.overrides_path),
        ]

    def environment(self) -> dict[str, str]:
        env = {**super().environment(), "HOMESERVER_BCRYPT_ROUNDS": str(self.bcrypt_rounds)}
        env["PYTHONPATH"] = str(REPO)
        return env


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def synapse_python(postgres: bool = False, log: Any = sys.stderr) -> Path:
    """The Python of Synapse's own venv, creating/completing it when needed."""
    python = SYNAPSE_VENV / "bin" / "python"
    BENCH_DIR.mkdir(exist_ok=True)
    ignore = BENCH_DIR / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")

    def works(module: str) -> bool:
        return (
            python.exists()
            and subprocess.run(
                [str(python), "-c", f"import {module}"], capture_output=True
            ).returncode
            == 0
        )

    if not python.exists():
        print(f"bench: creating {SYNAPSE_VENV}", file=log)
        subprocess.run([sys.executable, "-m", "venv", str(SYNAPSE_VENV)], check=True)
    wanted = "matrix-synapse[postgres]" if postgres else "matrix-synapse"
    if not works("synapse.app.homeserver") or (postgres and not works("psycopg2")):
        print(f"bench: pip install {wanted} into {SYNAPSE_VENV} (once)", file=log)
        subprocess.run([str(SYNAPSE_VENV / "bin" / "pip"), "install", "-q", wanted], check=True)
    return python


class SynapseServer(ServerProcess):
    label = "synapse"

    def __init__(
        self,
        workdir: Path,
        database: dict[str, Any] | None = None,
        bcrypt_rounds: int = 12,
        federation: bool = False,
    ) -> None:
        super().__init__(workdir, federation)
        self.python = synapse_python(postgres=database is not None)
        self.config_path = workdir / "homeserver.yaml"
        log_config = workdir / "log.yaml"
        log_config.write_text(
            yaml.safe_dump(
                {
                    "version": 1,
                    "formatters": {
                        "precise": {
                            "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - "
                            "%(request)s - %(message)s"
                        }
                    },
                    "filters": {
                        "context": {
                            "()": "synapse.logging.context.LoggingContextFilter",
                            "request": "",
                        }
                    },
                    "handlers": {
                        "file": {
                            "class": "logging.FileHandler",
                            "formatter": "precise",
                            "filename": str(workdir / "homeserver.log"),
                            "filters": ["context"],
                            "encoding": "utf8",
                        }
                    },
                    "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
                    "root": {"level": "INFO", "handlers": ["file"]},
                    "disable_existing_loggers": False,
                }
            )
        )
        if database is not None:
            db: dict[str, Any] = {"name": "psycopg2", "args": {**database, **DB_POOL}}
        else:
            db = {"name": "sqlite3", "args": {"database": str(workdir / "homeserver.db")}}
        config: dict[str, Any] = {
            "server_name": self.server_name,
            "pid_file": str(workdir / "homeserver.pid"),
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "tls": False,
                    "type": "http",
                    "x_forwarded": False,
                    "resources": [{"names": ["client", "media"], "compress": False}],
                }
            ],
            "database": db,
            "log_config": str(log_config),
            "media_store_path": str(workdir / "media_store"),
            "signing_key_path": str(workdir / "signing.key"),
            "report_stats": False,
            "suppress_key_server_warning": True,
            "trusted_key_servers": [],
            "enable_registration": True,
            "enable_registration_without_verification": True,
            "bcrypt_rounds": bcrypt_rounds,
            "max_upload_size": "50M",
            "macaroon_secret_key": uuid.uuid4().hex,
            "form_secret": uuid.uuid4().hex,
            "registration_shared_secret": uuid.uuid4().hex,
            **COMMON_LIMITS,
            **SYNAPSE_ONLY_LIMITS,
        }
        if federation:
            assert self.fed_port is not None
            config.update(federation_settings(workdir, self.fed_port))
            config["listeners"].append(federation_listener(self.fed_port, ["federation"]))
            config["rc_federation"] = SYNAPSE_FEDERATION_LIMIT
            config["federation"] = {
                "destination_min_retry_interval": 100,
                "destination_retry_multiplier": 1.1,
                "destination_max_retry_interval": 1000,
            }
        self.config_path.write_text(yaml.safe_dump(config))
        self.database = "postgresql" if database else "sqlite"
        subprocess.run(
            [
                str(self.python),
                "-m",
                "synapse.app.homeserver",
                "-c",
                str(self.config_path),
                "--generate-keys",
            ],
            check=True,
            capture_output=True,
            cwd=workdir,
        )
        self.version = (
            subprocess.run(
                [
                    str(self.python),
                    "-c",
                    "import importlib.metadata as m; print(m.version('matrix-synapse'))",
                ],
                capture_output=True,
                text=True,
                cwd=workdir,
            ).stdout.strip()
            or "?"
        )

    def command(self) -> list[str]:
        return [str(self.python), "-m", "synapse.app.homeserver", "-c", str(self.config_path)]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        return env
