"""A 200 MB upload and download never sit in the server's memory.

The file is written to disk in chunks, sent with aiohttp straight from the
file and read back chunk by chunk; the server's peak resident set
(VmHWM) must grow by far less than the file's size.
"""

import hashlib
import json
import os
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from tests.media.helpers import CLIENT_MEDIA, MEDIA, mxc_parts, run
from tests.support.clients import close, register, start_e2e_server

SIZE = 200 * 1024 * 1024
CHUNK = 1024 * 1024
MAX_GROWTH_KIB = 50 * 1024


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def write_big_file(path: Path) -> str:
    digest = hashlib.sha256()
    block = os.urandom(CHUNK)
    with open(path, "wb") as f:
        for i in range(SIZE // CHUNK):
            chunk = i.to_bytes(8, "big") + block[8:]
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_200_mb_round_trip_in_constant_memory(tmp_path):
    big = tmp_path / "big.bin"
    expected = write_big_file(big)
    with ExitStack() as stack:
        server = start_e2e_server(stack, tmp_path / "hs", "sqlite3", max_upload_size="300M")
        assert server.process is not None
        pid = server.process.pid

        async def scenario() -> None:
            alice = await register(server)
            headers = {
                "Authorization": f"Bearer {alice.access_token}",
                "Content-Type": "application/octet-stream",
            }
            before = peak_rss_kib(pid)
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                started = time.monotonic()
                with open(big, "rb") as f:
                    async with session.post(
                        server.base_url + f"{MEDIA}/upload?filename=big.bin",
                        data=f,
                        headers=headers,
                    ) as response:
                        body = await response.read()
                        assert response.status == 200, body
                upload_s = time.monotonic() - started
                server_name, media_id = mxc_parts(json.loads(body)["content_uri"])
                digest = hashlib.sha256()
                received = 0
                started = time.monotonic()
                async with session.get(
                    server.base_url + f"{CLIENT_MEDIA}/download/{quote(server_name)}/{media_id}",
                    headers=headers,
                ) as response:
                    assert response.status == 200
                    assert response.headers["Content-Length"] == str(SIZE)
                    async for chunk in response.content.iter_chunked(CHUNK):
                        digest.update(chunk)
                        received += len(chunk)
                download_s = time.monotonic() - started
            assert received == SIZE and digest.hexdigest() == expected
            growth = peak_rss_kib(pid) - before
            print(
                f"upload {SIZE / upload_s / 1e6:.0f} MB/s, download {SIZE / download_s / 1e6:.0f}"
                f" MB/s, peak RSS growth {growth / 1024:.1f} MiB"
            )
            assert growth < MAX_GROWTH_KIB, f"peak RSS grew by {growth} KiB"
            await close(alice)

        run(scenario(), timeout=240)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_100_mb_chunked_upload_in_constant_memory(tmp_path):
    """Without a Content-Length the body goes through the worker lanes (writes and
    hashing on threads, reads paused while they are behind): memory stays flat too."""
    size = 100 * 1024 * 1024
    block = os.urandom(CHUNK)
    digest = hashlib.sha256()
    for i in range(size // CHUNK):
        digest.update(i.to_bytes(8, "big") + block[8:])
    with ExitStack() as stack:
        server = start_e2e_server(stack, tmp_path / "hs", "sqlite3", max_upload_size="300M")
        assert server.process is not None
        pid = server.process.pid

        async def chunks():
            for i in range(size // CHUNK):
                yield i.to_bytes(8, "big") + block[8:]

        async def scenario() -> None:
            alice = await register(server)
            headers = {
                "Authorization": f"Bearer {alice.access_token}",
                "Content-Type": "application/octet-stream",
            }
            before = peak_rss_kib(pid)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
                async with session.post(
                    server.base_url + f"{MEDIA}/upload", data=chunks(), headers=headers
                ) as response:
                    body = await response.read()
                    assert response.status == 200, body
                server_name, media_id = mxc_parts(json.loads(body)["content_uri"])
                got = hashlib.sha256()
                async with session.get(
                    server.base_url + f"{CLIENT_MEDIA}/download/{quote(server_name)}/{media_id}",
                    headers=headers,
                ) as response:
                    assert response.status == 200
                    async for chunk in response.content.iter_chunked(CHUNK):
                        got.update(chunk)
            assert got.hexdigest() == digest.hexdigest()
            growth = peak_rss_kib(pid) - before
            print(f"chunked upload: peak RSS growth {growth / 1024:.1f} MiB")
            assert growth < MAX_GROWTH_KIB, f"peak RSS grew by {growth} KiB"
            await close(alice)

        run(scenario(), timeout=240)
