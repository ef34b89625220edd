#!/usr/bin/env python3
"""The event core's benchmark: ours next to Synapse's own functions, same inputs, same run.

Prints three figures from scripts/bench_events.py, bench_auth.py and
bench_state_res.py (each can also run alone):
- building + signing, and verifying signatures + hashes, of N events;
- auth-checking N events;
- state resolution over a room with 5,000 state events and 200 conflicted keys.

Usage: .venv/bin/python scripts/bench_event_core.py [--events 10000] [--json out.json]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_auth  # noqa: E402
import bench_events  # noqa: E402
import bench_state_res  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    events = bench_events.run(args.events)
    auth = bench_auth.run(args.events)
    state_res = bench_state_res.run()
    results = {"events": events, "auth": auth, "state_res": state_res}

    print(f"\nEvent core, {args.events} events, room version {events['room_version']}")
    print(f"{'':42}{'ours':>12}{'synapse':>12}{'ratio':>8}")
    for label, ours, theirs in (
        ("build + sign (events/s)", events["ours"]["build"], events["synapse"]["build"]),
        ("verify sigs + hashes (events/s)", events["ours"]["verify"], events["synapse"]["verify"]),
    ):
        print(f"{label:42}{ours:12.0f}{theirs:12.0f}{ours / theirs:8.2f}")
    print(json.dumps({"auth": auth, "state_res": state_res}, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
