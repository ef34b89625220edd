#!/usr/bin/env python3
"""Two of our servers federating on loopback TLS: the time for a user of one to join
a room of the other, then N messages sent one at a time from the first and the
rate and latency at which they reach a long-polling client of the second.

    .venv/bin/python scripts/bench_federation_pair.py [N]      # default 1000

(Phase 12 of scripts/bench does the same against Synapse.) Prints figures; the
servers run in a temporary directory and are stopped at the end.
"""

import http.client
import json
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.synapse import register, start_federating_server  # noqa: E402

TIMELINE = quote(json.dumps({"room": {"timeline": {"limit": 1000}}}), safe="")


class Client:
    """One keep-alive HTTPS connection (the servers' certificates are self-signed)."""

    def __init__(self, server: object, token: str) -> None:
        host, port = server.base_url.split("//")[1].rstrip("/").split(":")  # type: ignore[attr-defined]
        self.conn = http.client.HTTPSConnection(
            host, int(port), context=ssl._create_unverified_context())
        self.token = token

    def call(self, method: str, path: str, body: object = None) -> dict:
        self.conn.request(method, "/_matrix/client/v3" + path,
                          json.dumps(body) if body is not None else None,
                          {"Authorization": f"Bearer {self.token}",
                           "Content-Type": "application/json"})
        response = self.conn.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200, (method, path, response.status, answer)
        return answer


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        a = start_federating_server(Path(tmp) / "a")
        b = start_federating_server(Path(tmp) / "b")
        try:
            alice = Client(a, register(a, "alice")[1])
            bob = Client(b, register(b, "bob")[1])
            room = alice.call("POST", "/createRoom", {"preset": "public_chat"})["room_id"]
            t0 = time.perf_counter()
            bob.call("POST", f"/join/{quote(room)}?via={quote(a.server_name)}", {})
            print(f"join of a room on the other server: {(time.perf_counter() - t0) * 1000:.0f} ms")
            since = bob.call("GET", "/sync?timeout=0")["next_batch"]
            sent: dict[int, float] = {}
            got: dict[int, float] = {}

            def receive() -> None:
                token = since
                while len(got) < n:
                    answer = bob.call("GET", f"/sync?timeout=5000&filter={TIMELINE}&since={token}")
                    token, now = answer["next_batch"], time.perf_counter()
                    room_sync = answer.get("rooms", {}).get("join", {}).get(room, {})
                    for event in room_sync.get("timeline", {}).get("events", []):
                        body = event.get("content", {}).get("body", "")
                        if body.startswith("m "):
                            got.setdefault(int(body[2:]), now)

            receiver = threading.Thread(target=receive, daemon=True)
            receiver.start()
            t0 = time.perf_counter()
            for i in range(n):
                sent[i] = time.perf_counter()
                alice.call("PUT", f"/rooms/{quote(room)}/send/m.room.message/t{i}",
                           {"msgtype": "m.text", "body": f"m {i}"})
            sending = time.perf_counter() - t0
            receiver.join(timeout=120)
            latencies = sorted(got[i] - sent[i] for i in got)
            span = max(got.values()) - t0
            print(f"sent {n} in {sending:.2f} s ({n / sending:.0f} msg/s)")
            print(f"received {len(got)} of {n} in {span:.2f} s ({len(got) / span:.0f} events/s);"
                  f" latency p50 {latencies[len(latencies) // 2] * 1000:.1f} ms,"
                  f" p95 {latencies[int(len(latencies) * 0.95)] * 1000:.1f} ms")
        finally:
            a.stop()
            b.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
