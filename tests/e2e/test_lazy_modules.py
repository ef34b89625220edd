"""Modules the server loads on first use (``homeserver/app/lazy_modules.py``) and its
``-OO`` re-exec (``homeserver/app/__main__.py``).

Run in fresh processes: the test process has imported all of it long ago.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.http import request
from tests.support.server import REPO, start_server

_STAND_INS = textwrap.dedent(
    """
    import sys, threading
    from homeserver.app.lazy_modules import defer_unused_imports, loaded, withdraw_presets

    defer_unused_imports()
    import jsonschema
    from twisted.internet import defer, reactor
    from twisted.web import http, server

    deferred = ("asyncio", "http.cookiejar", "urllib.request", "email.message",
                "twisted.web.util", "twisted.spread.pb", "pickle", "fractions")
    early = [name for name in deferred if loaded(name)]
    assert not early, early
    assert "ssl" not in sys.modules and "http.client" not in sys.modules

    # Two threads at once into a stand-in nobody has used yet: one loads, both get it.
    import pickle
    assert not loaded("pickle")
    barrier, out = threading.Barrier(8), []
    def use():
        barrier.wait()
        out.append(pickle.loads(pickle.dumps({"a": [1, 2]})))
    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert out == [{"a": [1, 2]}] * 8, out

    async def answer():
        return 42
    results = []
    defer.ensureDeferred(answer()).addCallback(results.append)
    defer.Deferred.fromCoroutine(answer()).addCallback(results.append)
    assert results == [42, 42], results
    assert not loaded("asyncio")

    # Twisted's form parsing holds a stand-in for EmailMessage: it works when called.
    assert http._parseContentType(b"multipart/form-data; boundary=x") == b"multipart/form-data"
    assert loaded("email.message")

    withdraw_presets()
    import asyncio
    assert asyncio.Future.__name__ == "Future" and asyncio.Future.__module__ != __name__
    assert asyncio.run(answer()) == 42
    assert loaded("asyncio") and "ssl" in sys.modules

    import email.message, importlib.metadata
    class Sub(email.message.Message):
        pass
    assert Sub()["x"] is None

    from twisted.spread import pb
    assert hasattr(pb.Copyable, "getStateToCopy")
    import fractions
    assert fractions.Fraction(1, 3) * 3 == 1
    import http.cookiejar, urllib.request
    assert len(http.cookiejar.CookieJar()) == 0
    assert urllib.request.Request("http://example.org/").host == "example.org"


    # Start-up's YAML modules go; a later use imports them again.
    from homeserver.app.lazy_modules import release_startup_modules
    import yaml
    first = yaml
    release_startup_modules()
    assert not [n for n in sys.modules if n == "yaml" or n.startswith("yaml.")]
    import yaml
    assert yaml is not first and yaml.safe_load("a: [1, 2]") == {"a": [1, 2]}
    print("ok")
    """
)


def test_stand_ins_load_on_first_use_and_give_the_real_modules():
    out = subprocess.run(
        [sys.executable, "-c", _STAND_INS], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "ok"


def test_the_server_runs_without_docstrings_asyncio_or_ssl(tmp_path):
    server = start_server(tmp_path, enable_registration=True,
                          enable_registration_without_verification=True)
    try:
        assert server.process is not None
        pid = server.process.pid
        # The entry point replaced itself with "python -OO ..." (same PID).
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"-OO" in args, args
        # A client's usual round: register, a room, a message, a sync.
        r = request("POST", f"{server.base_url}/_matrix/client/v3/register",
                    {"username": "lazy", "password": "secret-pass-123",
                     "auth": {"type": "m.login.dummy"}})
        assert r.status == 200, r.body
        auth = {"Authorization": "Bearer " + r.json()["access_token"]}
        r = request("POST", f"{server.base_url}/_matrix/client/v3/createRoom", {}, headers=auth)
        assert r.status == 200, r.body
        room = r.json()["room_id"]
        r = request("PUT", f"{server.base_url}/_matrix/client/v3/rooms/{room}/send/"
                    "m.room.message/t1", {"msgtype": "m.text", "body": "hi"}, headers=auth)
        assert r.status == 200, r.body
        r = request("GET", f"{server.base_url}/_matrix/client/v3/sync", headers=auth)
        assert r.status == 200 and room in r.json()["rooms"]["join"], r.body
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "_ssl." not in maps and "libssl" not in maps
        assert "_asyncio." not in maps
    finally:
        server.stop()


def test_the_installed_command_starts_the_same_way(tmp_path):
    """``homeserver run`` (the console script in the README) goes through the same
    entry point as ``python -m homeserver.app run``."""
    import socket
    import time

    script = Path(sys.executable).with_name("homeserver")
    assert script.exists(), script
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "homeserver.yaml"
    subprocess.run(
        [sys.executable, "-m", "homeserver.app", "generate-config", "--server-name",
         "lazy.test", "--config-path", str(config), "--port", str(port)],
        cwd=tmp_path, check=True, capture_output=True, timeout=60,
    )
    log = (tmp_path / "out.log").open("wb")
    process = subprocess.Popen([str(script), "run", "--config-path", str(config)],
                               cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = request("GET", f"http://127.0.0.1:{port}/_matrix/client/versions", timeout=2)
                if r.status == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None, (tmp_path / "out.log").read_text()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        args = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"-OO" in args, args
        assert "_asyncio." not in Path(f"/proc/{process.pid}/maps").read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
