"""Loading, merging and validating configuration files.

Later files override earlier ones key by key at the top level, as Synapse
does. Relative paths in a file are resolved against that file's directory.
"""

import copy
import logging
import re
from pathlib import Path
from typing import Any

import attrs
import jsonschema

from homeserver.config.schema import CONFIG_SCHEMA, TOLERATED_KEYS

logger = logging.getLogger(__name__)

# Synapse's defaults: everything that is not the public internet.
DEFAULT_IP_RANGE_BLOCKLIST = [
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
    "192.0.0.0/24", "169.254.0.0/16", "192.88.99.0/24", "198.18.0.0/15", "192.0.2.0/24",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "0.0.0.0/8", "::1/128", "fe80::/10",
    "fc00::/7", "2001:db8::/32", "ff00::/8", "fec0::/10", "::/128",
]

# Keys whose values are paths, resolved against the directory of the file
# that set them.
_PATH_KEYS = ("signing_key_path", "media_store_path", "tls_certificate_path",
              "tls_private_key_path", "log_config", "pid_file")


class ConfigError(Exception):
    """A configuration problem that stops start-up (exit status 2)."""


_DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000,
                   "w": 604_800_000, "y": 31_536_000_000}
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_duration_ms(value: str | int) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d|w|y)?", value)
    if not m:
        raise ValueError(f"bad duration {value!r}")
    return int(m.group(1)) * _DURATION_UNITS[m.group(2) or "ms"]


def parse_size(value: str | int) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"(\d+)([KMGT]?)", value)
    if not m:
        raise ValueError(f"bad size {value!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


@attrs.frozen
class HomeserverConfig:
    """The merged, validated configuration with defaults filled in."""

    values: dict[str, Any]
    config_dir: Path  # directory of the first file: where the data lives
    sources: dict[str, str]  # top-level key -> file that set it

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    @property
    def server_name(self) -> str:
        return self.values["server_name"]

    @property
    def public_baseurl(self) -> str:
        base = self.values.get("public_baseurl")
        return base if base else f"https://{self.server_name}/"

    @property
    def max_upload_size(self) -> int:
        return parse_size(self.values["max_upload_size"])

    @property
    def ip_range_blocklist(self) -> list[str]:
        v = self.values
        return v.get("ip_range_blocklist") or v.get("ip_range_blacklist") or DEFAULT_IP_RANGE_BLOCKLIST

    @property
    def federation_ip_range_blocklist(self) -> list[str]:
        return self.values.get("federation_ip_range_blacklist") or self.ip_range_blocklist

    @property
    def database_engine(self) -> str:
        """"sqlite3" or "psycopg" ("psycopg2" is Synapse's name for the latter)."""
        name = self.values["database"]["name"]
        return "psycopg" if name == "psycopg2" else name

    @property
    def database_args(self) -> dict[str, Any]:
        return dict(self.values["database"].get("args") or {})

    @property
    def presence_enabled(self) -> bool:
        enabled = self.values["presence"].get("enabled", True)
        return enabled is True or enabled == "untracked"


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml  # only at start-up (see homeserver.app.lazy_modules.release_startup_modules)

    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    return data


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    for key in _PATH_KEYS:
        if isinstance(data.get(key), str):
            data[key] = str((base / data[key]).resolve())
    db = data.get("database")
    if isinstance(db, dict) and db.get("name") == "sqlite3" and isinstance(db.get("args"), dict):
        name = db["args"].get("database")
        if isinstance(name, str) and name != ":memory:":
            db["args"]["database"] = str((base / name).resolve())
    files = data.get("app_service_config_files")
    if isinstance(files, list):
        data["app_service_config_files"] = [
            str((base / f).resolve()) if isinstance(f, str) else f for f in files
        ]


def _key_of(error: jsonschema.ValidationError) -> str:
    path = [str(p) for p in error.absolute_path]
    if not path and error.validator == "required":
        m = re.search(r"'([^']+)' is a required property", error.message)
        return m.group(1) if m else "<top level>"
    return ".".join(path) if path else "<top level>"


def _fill_defaults(values: dict[str, Any], config_dir: Path) -> None:
    for key, prop in CONFIG_SCHEMA["properties"].items():
        if key not in values and "default" in prop:
            values[key] = copy.deepcopy(prop["default"])
    if "signing_key_path" not in values:
        values["signing_key_path"] = str(config_dir / f"{values['server_name']}.signing.key")
    values["media_store_path"] = str((config_dir / values["media_store_path"]).resolve())
    db = values["database"]
    if db.get("name") == "sqlite3":
        db.setdefault("args", {}).setdefault("database", "homeserver.db")
        name = db["args"]["database"]
        if name != ":memory:":
            db["args"]["database"] = str((config_dir / name).resolve())


def load_config(paths: list[str | Path]) -> HomeserverConfig:
    """Read, merge and validate config files; raise ConfigError naming key and file."""
    if not paths:
        raise ConfigError("no config file given")
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for p in paths:
        path = Path(p)
        data = _read_yaml(path)
        _resolve_paths(data, path.parent.resolve())
        for key, value in data.items():
            merged[key] = value
            sources[key] = str(path)

    validator = jsonschema.Draft202012Validator(CONFIG_SCHEMA)
    errors = sorted(validator.iter_errors(merged), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        key = _key_of(error)
        top = key.split(".")[0]
        where = sources.get(top, ", ".join(str(p) for p in paths))
        raise ConfigError(f"{where}: invalid config key '{key}': {error.message}")
    for key in merged:
        if key not in CONFIG_SCHEMA["properties"] and key not in TOLERATED_KEYS:
            logger.warning("%s: unknown config key '%s' is ignored", sources[key], key)

    config_dir = Path(paths[0]).parent.resolve()
    _fill_defaults(merged, config_dir)
    return HomeserverConfig(values=merged, config_dir=config_dir, sources=sources)
