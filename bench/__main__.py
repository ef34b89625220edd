"""``python -m bench``: our server and Synapse side by side. See docs/performance.md."""

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import report
from bench.federation import run_federation
from bench.servers import (
    BENCH_DIR,
    REPO,
    OurServer,
    ServerProcess,
    SynapseServer,
    throwaway_databases,
)
from bench.workload import Scale, run_workload


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark this homeserver side by side with Synapse (client-server API).",
    )
    p.add_argument("--quick", action="store_true", help="minimal scale (a smoke run)")
    p.add_argument("--users", type=int, help="users registered and joined to the main room")
    p.add_argument("--messages", type=int, help="sequential sends; total of each concurrent run")
    p.add_argument("--delivery", type=int, help="messages timed to a long-polling /sync")
    p.add_argument("--rooms", type=int, help="rooms of the initial-sync user")
    p.add_argument("--history", type=int, help="messages in each of those rooms")
    p.add_argument("--devices", type=int, help="initial syncs (one per device)")
    p.add_argument("--members", type=int, help="members joining the big room one by one")
    p.add_argument("--reactions", type=int, help="reactions to one message")
    p.add_argument("--media-reps", type=int, help="uploads+downloads per media size")
    p.add_argument(
        "--federation",
        action="store_true",
        help="also run phase 12: both servers federate over loopback TLS; each joins a "
        "--fed-members room of the other, and --fed-messages messages go across each way "
        "(adds several minutes at the default scale)",
    )
    p.add_argument(
        "--federation-only",
        action="store_true",
        help="run phase 12 alone (implies --federation; phases 1-10 show 'not run')",
    )
    p.add_argument(
        "--fed-members", type=int, help="members of the room each server joins (default 500)"
    )
    p.add_argument(
        "--fed-joins",
        type=int,
        help="joins in each direction, each into a fresh room; the median is reported (default 3)",
    )
    p.add_argument(
        "--fed-messages", type=int, help="messages sent across in each direction (default 1000)"
    )
    p.add_argument(
        "--fed-rate",
        type=float,
        help="phase 12's senders send at most this many messages a second (default: "
        "as fast as each send is answered)",
    )
    p.add_argument(
        "--fed-room-version",
        help="room version of phase 12's rooms, the same on both servers (default 10)",
    )
    p.add_argument(
        "--postgres",
        action="store_true",
        help="both servers on throw-away PostgreSQL databases (127.0.0.1:5432, user "
        "postgres; BENCH_POSTGRES_DSN overrides) instead of SQLite",
    )
    p.add_argument("--no-synapse", action="store_true", help="run against our server only")
    p.add_argument(
        "--bcrypt-rounds",
        type=int,
        default=4,
        help="password hashing cost on both servers (default 4, so that phase 1 "
        "and the set-up of the big room measure the servers rather than "
        "bcrypt; 12 is both servers' production default)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=0.5,
        help="seconds of quiet between phase runs (default 0.5)",
    )
    p.add_argument("--output", type=Path, help="JSON file (default bench-results/<timestamp>.json)")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the servers' directories (configs, logs, databases)",
    )
    p.add_argument(
        "--profile",
        choices=["ours", "synapse", "both"],
        help="run that server under py-spy record, profile written beside the "
        "JSON file (sampling costs CPU: not for the figures)",
    )
    p.add_argument(
        "--show",
        type=Path,
        metavar="JSON",
        help="print the table of an earlier run's JSON file instead of running",
    )
    p.add_argument("--markdown", action="store_true", help="with --show: a Markdown table")
    p.add_argument(
        "--profile-format",
        choices=["flamegraph", "raw", "speedscope"],
        default="flamegraph",
        help="py-spy output format (default: flamegraph, SVG)",
    )
    return p.parse_args(argv)


def scale_from(args: argparse.Namespace) -> Scale:
    scale = Scale.quick() if args.quick else Scale()
    for name in (
        "users",
        "messages",
        "delivery",
        "rooms",
        "history",
        "devices",
        "members",
        "reactions",
        "media_reps",
        "fed_members",
        "fed_joins",
        "fed_messages",
        "fed_room_version",
        "fed_rate",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(scale, name, value)
    scale.check()
    return scale


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def show(path: Path, markdown: bool) -> int:
    record = json.loads(path.read_text())
    rows = record["rows"]
    load = record["host"]["load_average_start"], record["host"]["load_average_end"]
    print(
        f"{record['database']}; ours {record['versions'].get('ours', '?')} vs synapse "
        f"{record['versions'].get('synapse', 'not run')}; {record['started']}; load average "
        f"{load[0][0]:.2f} at start, {load[1][0]:.2f} at end, {record['host']['cpus']} CPUs\n"
    )
    print(report.format_markdown(rows) if markdown else report.format_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.show is not None:
        return show(args.show, args.markdown)
    try:
        scale = scale_from(args)
    except ValueError as e:
        log(f"bench: {e}")
        return 2
    federation = args.federation or args.federation_only
    if federation and args.no_synapse:
        log("bench: --federation needs Synapse (drop --no-synapse)")
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = args.output or REPO / "bench-results" / f"{stamp}.json"
    workdir = BENCH_DIR / "runs" / stamp
    workdir.mkdir(parents=True, exist_ok=True)
    (BENCH_DIR / ".gitignore").write_text("*\n")
    started = datetime.datetime.now().astimezone()
    load_start = os.getloadavg()
    engine = "postgresql" if args.postgres else "sqlite"
    log(f"bench: {engine}, scale {scale}, load average {load_start[0]:.2f}")
    servers: list[ServerProcess] = []
    resources: dict[str, dict[str, float]] = {}
    versions: dict[str, str] = {}
    keep = args.keep
    try:
        with ExitStack() as stack:
            create_db = stack.enter_context(throwaway_databases()) if args.postgres else None
            ours = OurServer(
                workdir / "ours",
                create_db("ours") if create_db else None,
                args.bcrypt_rounds,
                federation=federation,
            )
            servers.append(ours)
            if not args.no_synapse:
                synapse = SynapseServer(
                    workdir / "synapse",
                    create_db("synapse") if create_db else None,
                    args.bcrypt_rounds,
                    federation=federation,
                )
                servers.append(synapse)
            for server in servers:
                log(f"bench: starting {server.label} on {server.base_url}")
                stack.callback(server.stop)
                profile = None
                if args.profile in (server.label, "both"):
                    suffix = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}
                    profile = output.with_name(
                        f"{output.stem}-{server.label}.{suffix[args.profile_format]}"
                    )
                    profile.parent.mkdir(parents=True, exist_ok=True)
                    log(f"bench: profiling {server.label} into {profile}")
                t0 = time.perf_counter()
                server.start(profile=profile, profile_format=args.profile_format)
                resources[server.label] = {"startup_s": time.perf_counter() - t0}
                versions[server.label] = server.version
            time.sleep(5)  # let start-up work settle before reading idle memory
            for server in servers:
                st = server.stats()
                resources[server.label].update(
                    idle_rss_mib=st.rss_kib / 1024, startup_cpu_s=st.cpu_s
                )
            if args.federation_only:
                results: dict[str, dict[str, Any]] = {s.label: {} for s in servers}
            else:
                results = asyncio.run(run_workload(servers, scale, settle_s=args.settle, log=log))
            # Row 11 covers phases 1-10 only, as in runs without phase 12.
            for server in servers:
                st = server.stats()
                resources[server.label].update(
                    peak_rss_mib=st.hwm_kib / 1024,
                    final_rss_mib=st.rss_kib / 1024,
                    cpu_total_s=st.cpu_s - resources[server.label]["startup_cpu_s"],
                )
            if federation:
                log(
                    f"bench: phase 12, federation: {ours.server_name} (ours) and "
                    f"{synapse.server_name} (synapse)"
                )
                fed_t0 = time.perf_counter()
                fed = asyncio.run(
                    run_federation(ours, synapse, scale, settle_s=args.settle, log=log)
                )
                for server in servers:
                    results[server.label].update(fed[server.label])
                    st = server.stats()
                    resources[server.label].update(
                        peak_rss_after_federation_mib=st.hwm_kib / 1024,
                        cpu_total_with_federation_s=st.cpu_s
                        - resources[server.label]["startup_cpu_s"],
                    )
                log(f"bench: phase 12 took {time.perf_counter() - fed_t0:.0f}s")
                if any(r.errors for per in fed.values() for r in per.values()):
                    keep = True
                    log(
                        "bench: phase 12 had errors; keeping the servers' logs: "
                        + ", ".join(str(x.log_path) for x in servers)
                        + f" (Synapse's own log: {workdir / 'synapse' / 'homeserver.log'})"
                    )
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    load_end = os.getloadavg()
    rows = report.build_rows(scale, results, resources, args.bcrypt_rounds)
    table = report.format_table(rows)
    errors = sum(r.errors for per in results.values() for r in per.values())
    record: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "database": engine,
        "host": {
            "cpus": os.cpu_count(),
            "load_average_start": load_start,
            "load_average_end": load_end,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "versions": versions,
        "scale": scale.__dict__,
        "bcrypt_rounds": args.bcrypt_rounds,
        "resources": resources,
        "phases": {
            label: {k: r.as_dict() for k, r in per.items()} for label, per in results.items()
        },
        "rows": rows,
        "errors": errors,
    }
    report.write_json(output, record)
    print(
        f"\n{engine}; ours {versions.get('ours', '?')} vs synapse "
        f"{versions.get('synapse', 'not run')}; load average {load_start[0]:.2f} at start, "
        f"{load_end[0]:.2f} at end, {os.cpu_count()} CPUs\n"
    )
    print(table)
    print(
        f"\nratio > 1: ours better (rates ours/synapse, times and memory synapse/ours). "
        f"{errors} errors. JSON: {output}"
    )
    if errors:
        for label, per in results.items():
            for r in per.values():
                for sample in r.error_samples:
                    print(f"  {label} {r.key}: {sample}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
