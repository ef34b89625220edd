"""Benchmark: build+sign and verify events, ours against Synapse's functions.

Same inputs, same process. Synapse's side is what it runs per event:
building = ``add_hashes_and_signatures`` + ``make_event_from_dict`` (event
id); verifying = ``event_from_pdu_json`` (format checks, event id) +
``check_event_content_hash`` + ``verify_signed_json`` over the pruned event
(what its Keyring does once the key is known). Ours: ``build_event`` and
``verify_received_pdu``.

    .venv/bin/python scripts/bench_events.py [-n 10000] [--room-version 12]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crypto.b64 import encode_base64  # noqa: E402
from crypto.keys import generate_signing_key  # noqa: E402
from homeserver.core.builder import build_event  # noqa: E402
from homeserver.core.room_versions import KNOWN_ROOM_VERSIONS  # noqa: E402
from homeserver.core.signatures import verify_received_pdu  # noqa: E402

SERVER = "bench.example"


def _inputs(n: int, room_id: str) -> list[dict]:
    return [
        {
            "type": "m.room.message",
            "sender": f"@user{i % 50}:{SERVER}",
            "room_id": room_id,
            "content": {"msgtype": "m.text", "body": f"message number {i} " + "lorem ipsum " * 8},
            "prev_events": [f"$prev{i}_{j}" for j in range(2)],
            "auth_events": [f"$auth{j}" for j in range(3)],
            "depth": i + 10,
            "origin_server_ts": 1_700_000_000_000 + i,
        }
        for i in range(n)
    ]


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def run(n: int = 10_000, room_version: str = "12") -> dict:
    """Return {"ours"|"synapse": {"build": events/s, "verify": events/s}, "n": n, ...}."""
    from signedjson.key import decode_signing_key_base64, get_verify_key
    from signedjson.sign import verify_signed_json
    from synapse.api.room_versions import KNOWN_ROOM_VERSIONS as SYNAPSE_VERSIONS
    from synapse.crypto.event_signing import add_hashes_and_signatures, check_event_content_hash
    from synapse.events import make_event_from_dict
    from synapse.events.utils import prune_event
    from synapse.federation.federation_base import event_from_pdu_json

    rv = KNOWN_ROOM_VERSIONS[room_version]
    if rv.event_id_in_pdu:
        raise ValueError("benchmark rooms 3+ (rooms 1-2 need per-event reference hashes)")
    srv = SYNAPSE_VERSIONS[room_version]
    key = generate_signing_key("bench")
    skey = decode_signing_key_base64("ed25519", "bench", encode_base64(bytes(key.signing_key)))
    svk = get_verify_key(skey)
    room_id = "!" + "B" * 43 if rv.room_id_is_create_event_hash else f"!room:{SERVER}"
    inputs = _inputs(n, room_id)

    # Ours and Synapse's alternate in chunks so load changes on the machine
    # hit both sides alike.
    chunks = [inputs[i : i + 500] for i in range(0, n, 500)]
    keys = {(SERVER, key.key_id): key.verify_key}
    lookup = lambda server, key_id: keys.get((server, key_id))  # noqa: E731
    times = {"ours_build": 0.0, "synapse_build": 0.0, "ours_verify": 0.0, "synapse_verify": 0.0}
    for chunk in chunks:
        # --- build + sign ---
        t0 = time.perf_counter()
        ours = [
            build_event(
                rv,
                server_name=SERVER,
                signing_key=key,
                event_type=e["type"],
                sender=e["sender"],
                content=e["content"],
                room_id=e["room_id"],
                prev_events=e["prev_events"],
                auth_events=e["auth_events"],
                depth=e["depth"],
                origin_server_ts=e["origin_server_ts"],
            )
            for e in chunk
        ]
        t1 = time.perf_counter()
        theirs = []
        for e in chunk:
            event_dict = {**e, "content": dict(e["content"]), "signatures": {}}
            add_hashes_and_signatures(srv, event_dict, SERVER, skey)
            event = make_event_from_dict(event_dict, srv)
            event.event_id  # noqa: B018 - computed lazily; part of building
            theirs.append(event)
        t2 = time.perf_counter()
        times["ours_build"] += t1 - t0
        times["synapse_build"] += t2 - t1
        assert [p.event_id for p in ours] == [e.event_id for e in theirs], "outputs differ"

        # --- verify format, event id, signatures, content hash ---
        wire = [p.data for p in ours]
        t0 = time.perf_counter()
        for data in wire:
            _, ok = verify_received_pdu(data, rv, lookup)
            assert ok
        t1 = time.perf_counter()
        for data in wire:
            event = event_from_pdu_json(dict(data), srv)
            event.event_id  # noqa: B018
            verify_signed_json(prune_event(event).get_pdu_json(), SERVER, svk)
            assert check_event_content_hash(event)
        t2 = time.perf_counter()
        times["ours_verify"] += t1 - t0
        times["synapse_verify"] += t2 - t1
    ours_build, synapse_build = times["ours_build"], times["synapse_build"]
    ours_verify, synapse_verify = times["ours_verify"], times["synapse_verify"]

    return {
        "n": n,
        "room_version": room_version,
        "ours": {"build": _rate(n, ours_build), "verify": _rate(n, ours_verify)},
        "synapse": {"build": _rate(n, synapse_build), "verify": _rate(n, synapse_verify)},
    }


def _print_table(result: dict) -> None:
    print(f"events: {result['n']}, room version {result['room_version']}")
    print(f"{'operation':<16}{'ours ev/s':>12}{'synapse ev/s':>14}{'ratio':>8}")
    for op, label in (("build", "build+sign"), ("verify", "verify")):
        ours, theirs = result["ours"][op], result["synapse"][op]
        print(f"{label:<16}{ours:>12,.0f}{theirs:>14,.0f}{ours / theirs:>7.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--room-version", default="12")
    args = parser.parse_args()
    _print_table(run(args.n, args.room_version))
