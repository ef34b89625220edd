"""The real server, started as an operator would, answering over loopback."""

import datetime
import signal
import time

import pytest
import yaml
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json
from unpaddedbase64 import decode_base64

from tests.support.http import request
from tests.support.postgres import throwaway_database
from tests.support.server import RunningServer, free_port, start_server, write_config


@pytest.fixture
def server(tmp_path):
    s = start_server(tmp_path)
    yield s
    s.stop()


def verified_server_key(base_url: str, server_name: str) -> dict:
    body = request("GET", f"{base_url}/_matrix/key/v2/server").json()
    assert body["server_name"] == server_name
    assert body["valid_until_ts"] > time.time() * 1000
    assert body["old_verify_keys"] == {}
    for key_id, key in body["verify_keys"].items():
        verify_key = decode_verify_key_bytes(key_id, decode_base64(key["key"]))
        verify_signed_json(body, server_name, verify_key)  # raises if the signature is bad
    return body["verify_keys"]


def test_versions_and_discovery(server):
    r = request("GET", f"{server.base_url}/_matrix/client/versions")
    assert r.status == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert isinstance(body["versions"], list)
    assert isinstance(body["unstable_features"], dict)
    r = request("GET", f"{server.base_url}/.well-known/matrix/client")
    assert r.json() == {"m.homeserver": {"base_url": f"https://{server.server_name}/"}}
    r = request("GET", f"{server.base_url}/.well-known/matrix/server")
    assert r.status == 404 and r.json()["errcode"] == "M_NOT_FOUND"
    r = request("GET", f"{server.base_url}/_matrix/federation/v1/version")
    assert r.json()["server"]["name"] == "homeserver"
    assert request("GET", f"{server.base_url}/health").body == b"OK"


def test_key_is_self_signed_and_survives_restart(server):
    keys = verified_server_key(server.base_url, server.server_name)
    assert len(keys) == 1
    server.stop()
    server.start()
    assert verified_server_key(server.base_url, server.server_name) == keys


def test_cors_and_preflight(server):
    r = request("OPTIONS", f"{server.base_url}/_matrix/client/v3/rooms/!a:b/send/m.room.message/1",
                headers={"Origin": "https://app.example", "Access-Control-Request-Method": "PUT"})
    assert r.status == 200
    assert r.headers["access-control-allow-origin"] == "*"
    for method in ("GET", "POST", "PUT", "DELETE", "OPTIONS"):
        assert method in r.headers["access-control-allow-methods"]
    for header in ("X-Requested-With", "Content-Type", "Authorization"):
        assert header in r.headers["access-control-allow-headers"]
    r = request("GET", f"{server.base_url}/_matrix/client/versions")
    assert r.headers["access-control-allow-origin"] == "*"


def test_unknown_paths_and_methods_get_matrix_errors(server):
    r = request("GET", f"{server.base_url}/_matrix/client/v3/no/such/endpoint")
    assert r.status == 404
    assert r.json() == {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}
    r = request("GET", f"{server.base_url}/")
    assert r.status == 404 and r.json()["errcode"] == "M_UNRECOGNIZED"
    r = request("POST", f"{server.base_url}/_matrix/client/versions", body=b"{not json")
    assert r.status == 405 and r.json()["errcode"] == "M_UNRECOGNIZED"
    r = request("DELETE", f"{server.base_url}/_matrix/key/v2/server")
    assert r.status == 405 and b"Traceback" not in r.body


def test_second_config_file_overrides_server_name(tmp_path):
    config = write_config(tmp_path)
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"server_name": "override.example"}))
    s = RunningServer([config, override], tmp_path / "server.log").start()
    try:
        assert s.server_name == "override.example"
        verified_server_key(s.base_url, "override.example")
    finally:
        s.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_cleanly(server, sig):
    assert request("GET", f"{server.base_url}/health").status == 200
    assert server.stop(sig) == 0
    log = server.log()
    assert "listening on http://127.0.0.1:" in log
    assert "database closed" in log and "shutdown complete" in log
    assert "Traceback" not in log


def test_postgres_database(tmp_path):
    with throwaway_database() as args:
        s = start_server(tmp_path, database={"name": "psycopg", "args": args})
        try:
            keys = verified_server_key(s.base_url, s.server_name)
            s.stop()
            s.start()
            assert verified_server_key(s.base_url, s.server_name) == keys
        finally:
            assert s.stop() == 0
        assert "database closed" in s.log()
        import psycopg

        with psycopg.connect(dbname=args["dbname"], user=args["user"], host=args["host"],
                             port=args["port"]) as conn:
            (version,) = conn.execute("SELECT version FROM schema_version").fetchone()
            assert version >= 1


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def test_tls_listener(tmp_path):
    _self_signed(tmp_path)
    port = free_port()
    s = start_server(
        tmp_path,
        tls_certificate_path=str(tmp_path / "cert.pem"),
        tls_private_key_path=str(tmp_path / "key.pem"),
        listeners=[{"port": port, "bind_addresses": ["127.0.0.1"], "tls": True, "type": "http",
                    "resources": [{"names": ["client", "federation", "keys"]}]}],
    )
    try:
        assert s.base_url.startswith("https://")
        r = request("GET", f"{s.base_url}/_matrix/client/versions")
        assert r.status == 200 and "versions" in r.json()
        verified_server_key(s.base_url, s.server_name)
    finally:
        s.stop()
