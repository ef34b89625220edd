"""Configuration: Synapse key names, layering, validation and generate-config."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crypto.keys import read_signing_keys
from homeserver.config import ConfigError, load_config
from homeserver.config.generate import generate_config, render_sample_config
from homeserver.config.schema import CONFIG_SCHEMA

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_sample_config_is_the_rendered_template_and_loads():
    sample = REPO / "sample_config.yaml"
    assert sample.read_text() == render_sample_config()
    config = load_config([sample])
    assert config.server_name == "example.com"
    assert config.database_engine == "sqlite3"
    assert config["default_room_version"] == "12"
    assert config["enable_registration"] is False


def test_sample_config_documents_every_key():
    text = (REPO / "sample_config.yaml").read_text()
    for key in CONFIG_SCHEMA["properties"]:
        if key in {"report_stats", "macaroon_secret_key", "form_secret", "suppress_key_server_warning"}:
            continue  # Synapse keys we accept but that mean nothing here
        if key in {"ip_range_blacklist", "ip_range_blocklist"}:
            assert "ip_range_blacklist" in text and "ip_range_blocklist" in text
            continue
        assert re.search(rf"^#?{key}:", text, re.M), f"{key} is not in sample_config.yaml"


def test_generate_config_writes_config_data_dir_and_synapse_format_key(tmp_path):
    path = tmp_path / "hs.yaml"
    generate_config(path, "example.org")
    config = load_config([path])
    assert config.server_name == "example.org"
    assert config["enable_registration"] is False
    assert Path(config.database_args["database"]) == tmp_path / "data" / "homeserver.db"
    assert Path(config["media_store_path"]) == tmp_path / "data" / "media_store"
    key_line = Path(config["signing_key_path"]).read_text().strip()
    assert re.fullmatch(r"ed25519 a_[A-Za-z0-9_-]+ [A-Za-z0-9+/]{43}", key_line)
    assert len(read_signing_keys(config["signing_key_path"])) == 1


def test_generate_config_refuses_to_overwrite(tmp_path):
    path = tmp_path / "hs.yaml"
    generate_config(path, "example.org")
    before = path.read_text()
    with pytest.raises(FileExistsError):
        generate_config(path, "other.org")
    assert path.read_text() == before
    result = subprocess.run(
        [sys.executable, "-m", "homeserver.app", "generate-config", "--server-name", "x.org",
         "--config-path", str(path)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert "already exists" in result.stderr
    assert path.read_text() == before


def test_later_files_override_top_level_keys(tmp_path):
    base = write(tmp_path / "a.yaml", {"server_name": "first.org", "enable_registration": True,
                                         "database": {"name": "sqlite3", "args": {"database": "a.db"}}})
    over = write(tmp_path / "b.yaml", {"server_name": "second.org",
                                         "database": {"name": "psycopg2", "args": {"dbname": "x"}}})
    config = load_config([base, over])
    assert config.server_name == "second.org"
    assert config["enable_registration"] is True
    # Top-level replacement, not a deep merge (as Synapse does).
    assert config.database_engine == "psycopg"
    assert config.database_args == {"dbname": "x"}


@pytest.mark.parametrize(
    "data, key",
    [
        ({"server_name": "a.org", "listeners": 5}, "listeners"),
        ({"server_name": "a.org", "database": {"name": "mysql"}}, "database.name"),
        ({"server_name": "a.org", "listeners": [{"port": "eighty"}]}, "listeners.0.port"),
        ({"server_name": "a.org", "enable_registration": "yes"}, "enable_registration"),
        ({"listeners": []}, "server_name"),
    ],
)
def test_bad_values_name_the_key_and_file(tmp_path, data, key):
    path = write(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError) as e:
        load_config([path])
    assert f"'{key}'" in str(e.value)
    assert str(path) in str(e.value)


def test_error_names_the_file_that_set_the_key(tmp_path):
    good = write(tmp_path / "good.yaml", {"server_name": "a.org"})
    bad = write(tmp_path / "override.yaml", {"listeners": 5})
    with pytest.raises(ConfigError) as e:
        load_config([good, bad])
    assert str(bad) in str(e.value) and str(good) not in str(e.value)


def test_unknown_key_is_only_a_warning(tmp_path, caplog):
    path = write(tmp_path / "hs.yaml", {"server_name": "a.org", "frobnicate": 1})
    config = load_config([path])
    assert config.server_name == "a.org"
    assert "frobnicate" in caplog.text


def test_synapse_spellings_are_accepted(tmp_path):
    path = write(tmp_path / "hs.yaml", {
        "server_name": "a.org",
        "ip_range_blacklist": ["10.0.0.0/8"],
        "federation_ip_range_blacklist": ["192.168.0.0/16"],
        "max_upload_size": "10M",
        "presence": {"enabled": False},
        "report_stats": False,
    })
    config = load_config([path])
    assert config.ip_range_blocklist == ["10.0.0.0/8"]
    assert config.federation_ip_range_blocklist == ["192.168.0.0/16"]
    assert config.max_upload_size == 10 * 1024 * 1024
    assert config.presence_enabled is False


@pytest.mark.parametrize(
    "data, key",
    [({"listeners": 5}, "listeners"), ({"database": {"name": "oracle"}}, "database.name")],
)
def test_run_exits_with_status_2_naming_the_key(tmp_path, data, key):
    path = write(tmp_path / "hs.yaml", {"server_name": "a.org", **data})
    result = subprocess.run(
        [sys.executable, "-m", "homeserver.app", "run", "--config-path", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert result.returncode == 2
    assert key in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr
