"""Benchmark: media upload and download throughput, and the server's peak memory.

Starts a real server (SQLite, on loopback) with the test helpers, then over
HTTP: uploads and downloads a 1 MiB file several times and a 100 MiB file
(streamed from and to disk, as a client would) and reports MB/s for each,
plus the server's resident memory before and its peak (VmHWM) after.

    .venv/bin/python scripts/bench_media.py [--small-repeats 20] [--large-repeats 2]
"""

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402

from tests.support.clients import E2E_CONFIG  # noqa: E402
from tests.support.server import RunningServer, start_server  # noqa: E402

MIB = 1024 * 1024
CHUNK = MIB


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _write_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = os.urandom(CHUNK)
    with open(path, "wb") as f:
        for i in range(0, size, CHUNK):
            chunk = (i // CHUNK).to_bytes(8, "big") + block[8 : min(CHUNK, size - i)]
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


async def _register(session: aiohttp.ClientSession, server: RunningServer) -> str:
    body = {
        "username": f"bench{os.getpid()}",
        "password": "bench password 123",
        "auth": {"type": "m.login.dummy"},
    }
    async with session.post(server.base_url + "/_matrix/client/v3/register", json=body) as r:
        data = await r.json()
        assert r.status == 200, data
        return data["access_token"]


async def _round_trips(
    session: aiohttp.ClientSession,
    server: RunningServer,
    token: str,
    path: Path,
    size: int,
    digest: str,
    repeats: int,
) -> dict:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    upload_s = download_s = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        with open(path, "rb") as f:
            async with session.post(
                server.base_url + "/_matrix/media/v3/upload", data=f, headers=headers
            ) as r:
                body = await r.read()
                assert r.status == 200, body
        upload_s += time.perf_counter() - started
        server_name, media_id = json.loads(body)["content_uri"][6:].split("/")
        url = f"{server.base_url}/_matrix/client/v1/media/download/{quote(server_name)}/{media_id}"
        got = hashlib.sha256()
        started = time.perf_counter()
        async with session.get(url, headers=headers) as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(CHUNK):
                got.update(chunk)
        download_s += time.perf_counter() - started
        assert got.hexdigest() == digest, "downloaded bytes differ"
    total = size * repeats / 1e6
    return {
        "bytes": size,
        "repeats": repeats,
        "upload_mb_s": round(total / upload_s, 1),
        "download_mb_s": round(total / download_s, 1),
    }


def run(small_repeats: int = 20, large_repeats: int = 2, large_mib: int = 100) -> dict:
    """Return {"1MiB"|"<large>MiB": {"upload_mb_s", "download_mb_s", ...}, "rss": {...}}."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        small, large = directory / "small.bin", directory / "large.bin"
        small_digest = _write_file(small, MIB)
        large_digest = _write_file(large, large_mib * MIB)
        (directory / "hs").mkdir()
        server = start_server(directory / "hs", **E2E_CONFIG, max_upload_size=f"{large_mib + 10}M")
        try:
            assert server.process is not None
            pid = server.process.pid

            async def scenario() -> dict:
                timeout = aiohttp.ClientTimeout(total=600)
                async with aiohttp.ClientSession(timeout=timeout) as session:
                    token = await _register(session, server)
                    rss_before = _proc_kib(pid, "VmRSS")
                    peak_before = _proc_kib(pid, "VmHWM")
                    result = {
                        "1MiB": await _round_trips(
                            session, server, token, small, MIB, small_digest, small_repeats
                        ),
                        f"{large_mib}MiB": await _round_trips(
                            session,
                            server,
                            token,
                            large,
                            large_mib * MIB,
                            large_digest,
                            large_repeats,
                        ),
                    }
                    peak = _proc_kib(pid, "VmHWM")
                    result["rss"] = {
                        "before_mib": round(rss_before / 1024, 1),
                        "peak_mib": round(peak / 1024, 1),
                        "peak_growth_mib": round((peak - peak_before) / 1024, 1),
                    }
                    return result

            return asyncio.run(scenario())
        finally:
            server.stop()


def _print_table(result: dict) -> None:
    print(f"{'file':<10}{'upload MB/s':>14}{'download MB/s':>16}{'repeats':>9}")
    for name, row in result.items():
        if name == "rss":
            continue
        print(
            f"{name:<10}{row['upload_mb_s']:>14,.1f}{row['download_mb_s']:>16,.1f}"
            f"{row['repeats']:>9}"
        )
    rss = result["rss"]
    print(
        f"server RSS before: {rss['before_mib']} MiB, peak: {rss['peak_mib']} MiB "
        f"(peak grew {rss['peak_growth_mib']} MiB)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-repeats", type=int, default=20)
    parser.add_argument("--large-repeats", type=int, default=2)
    parser.add_argument("--large-mib", type=int, default=100)
    args = parser.parse_args()
    _print_table(run(args.small_repeats, args.large_repeats, args.large_mib))
