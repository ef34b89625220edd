"""One table with both servers' figures and the ratio, and the JSON record of a run.

The ratio is oriented so that > 1 means ours is better: ours / synapse for
rates, synapse / ours for times and memory.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.workload import MEDIA_MIB, PhaseResult, Scale

OURS, SYNAPSE = "ours", "synapse"


@dataclass(frozen=True)
class Metric:
    phase: str
    key: str
    label: str
    unit: str
    higher_is_better: bool
    target: float | None = None  # the target, as a ratio (> 1 = ours better)


def metrics(scale: Scale, bcrypt_rounds: int | None = None) -> list[Metric]:
    s = scale
    cost = f", bcrypt {bcrypt_rounds}" if bcrypt_rounds is not None else ""
    rows = [
        Metric(
            "register",
            "per_s",
            f"1. register {s.users} users (m.login.dummy{cost})",
            "users/s",
            True,
        ),
        Metric("register", "p50_ms", "   register latency p50", "ms", False),
        Metric("create_join", "create_ms", "2. createRoom", "ms", False),
        Metric("create_join", "join_p50_ms", f"   join, {s.users - 1} users, p50", "ms", False),
        Metric(
            "send_sequential", "per_s", f"3. sequential send, {s.messages} msgs", "msg/s", True, 25
        ),
        Metric("send_sequential", "p50_ms", "   send latency p50", "ms", False),
        Metric("send_sequential", "p95_ms", "   send latency p95", "ms", False),
        Metric("send_sequential", "p99_ms", "   send latency p99", "ms", False),
        Metric(
            "send_concurrent_one_room",
            "per_s",
            f"4. concurrent send, {s.concurrency} clients, one room",
            "msg/s",
            True,
            25,
        ),
        Metric(
            "send_concurrent_rooms",
            "per_s",
            f"   concurrent send, {s.concurrency} clients, own rooms",
            "msg/s",
            True,
            25,
        ),
        Metric("delivery", "p50_ms", "5. delivery to a long-polling /sync, p50", "ms", False, 10),
        Metric("delivery", "p95_ms", "   delivery p95", "ms", False),
        Metric(
            "sync_initial",
            "p50_ms",
            f"6. initial /sync, {s.rooms} rooms x {s.history} msgs, p50",
            "ms",
            False,
            5,
        ),
        Metric("sync_initial", "first_ms", "   initial /sync, first device", "ms", False),
        Metric("sync_incremental", "p50_ms", "   incremental /sync, nothing new, p50", "ms", False),
        Metric("paging", "per_s", "7. /messages paging back, all history", "events/s", True, 5),
        Metric("paging", "page_p50_ms", f"   /messages page of {s.page_limit}, p50", "ms", False),
    ]
    for n, mib in enumerate(MEDIA_MIB):
        phase = f"media_{mib}mib"
        rows += [
            Metric(
                phase,
                "upload_mb_s",
                f"{'   ' if n else '8. '}media upload {mib} MiB",
                "MB/s",
                True,
                2,
            ),
            Metric(phase, "download_mb_s", f"   media download {mib} MiB", "MB/s", True, 2),
        ]
    rows += [
        Metric(
            "reactions",
            "send_per_s",
            f"9. {s.reactions} reactions from {s.reactors} users",
            "reactions/s",
            True,
        ),
        Metric("reactions", "relations_ms", "   /relations, all of them", "ms", False),
        Metric(
            "big_room", "join_p50_ms", f"10. {s.members} members join one by one, p50", "ms", False
        ),
        Metric("big_room", "join_last10pct_ms", "    join, last 10% of joiners, mean", "ms", False),
        Metric("newcomer_sync", "join_ms", f"    member {s.members + 1} joins", "ms", False),
        Metric("newcomer_sync", "sync_ms", "    ... and its initial /sync", "ms", False),
        Metric("resources", "idle_rss_mib", "11. idle RSS after start-up", "MiB", False, 3),
        Metric("resources", "peak_rss_mib", "    peak RSS (VmHWM)", "MiB", False, 3),
        Metric("resources", "cpu_total_s", "    server CPU seconds, whole run", "s", False),
    ]
    return rows


FEDERATION_PHASES = ("fed_join", "fed_messages")


def federation_metrics(scale: Scale) -> list[Metric]:
    """Phase 12. Columns: the joining server (12a), the receiving server (12b)."""
    s = scale
    return [
        Metric(
            "fed_join",
            "join_s",
            f"12a. join a {s.fed_members}-member room of the other server"
            + (f", median of {s.fed_joins}" if s.fed_joins > 1 else ""),
            "s",
            False,
            1,  # the target: our join no slower than Synapse's
        ),
        Metric("fed_join", "sync_s", "     ... until the joiner's /sync shows it", "s", False),
        Metric(
            "fed_join", "joiner_cpu_s", "     CPU s of the joining server, per join", "s", False
        ),
        Metric(
            "fed_messages",
            "per_s",
            f"12b. receive {s.fed_messages} msgs sent by the other server"
            + (f" at {s.fed_rate:g}/s" if s.fed_rate else ""),
            "events/s",
            True,
        ),
        Metric("fed_messages", "p50_ms", "     cross-server latency p50", "ms", False),
        Metric("fed_messages", "p95_ms", "     cross-server latency p95", "ms", False),
        Metric("fed_messages", "cpu_s", "     CPU s of the receiving server", "s", False),
    ]


def ratio(metric: Metric, ours: float | None, synapse: float | None) -> float | None:
    if ours is None or synapse is None or ours <= 0 or synapse <= 0:
        return None
    return ours / synapse if metric.higher_is_better else synapse / ours


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(
    results: dict[str, PhaseResult] | None, resources: dict[str, float] | None, metric: Metric
) -> tuple[str, float | None]:
    if results is None:
        return "not run", None
    if metric.phase == "resources":
        value = (resources or {}).get(metric.key)
        return _fmt(value), value
    result = results.get(metric.phase)
    if result is None:
        return "not run", None
    if result.note:
        return "n/a", None
    if result.errors:
        return f"{result.errors} errors", None
    value = result.cpu_s if metric.key == "cpu_s" else result.metrics.get(metric.key)
    return _fmt(value), value


def build_rows(
    scale: Scale,
    results: dict[str, dict[str, PhaseResult]],
    resources: dict[str, dict[str, float]],
    bcrypt_rounds: int | None = None,
) -> list[dict[str, Any]]:
    def row(metric: Metric) -> dict[str, Any]:
        ours_text, ours = _cell(results.get(OURS), resources.get(OURS), metric)
        syn_text, syn = _cell(results.get(SYNAPSE), resources.get(SYNAPSE), metric)
        r = ratio(metric, ours, syn)
        return {
            "phase": metric.phase,
            "metric": metric.key,
            "label": metric.label,
            "unit": metric.unit,
            "higher_is_better": metric.higher_is_better,
            "ours": ours,
            "synapse": syn,
            "ratio": r,
            "target": metric.target,
            "met": None if r is None or metric.target is None else r >= metric.target,
            "ours_text": ours_text,
            "synapse_text": syn_text,
        }

    rows = [row(metric) for metric in metrics(scale, bcrypt_rounds)]
    # CPU seconds of the timed part of each phase (phase 12 has its own rows).
    phases = [
        k
        for k in dict.fromkeys(k for per in results.values() for k in per)
        if k not in FEDERATION_PHASES
    ]
    for key in phases:
        cells = {}
        for label in (OURS, SYNAPSE):
            r = results.get(label, {}).get(key)
            cells[label] = None if r is None or r.cpu_s is None else r.cpu_s
        cpu_metric = Metric(key, "cpu_s", f"    CPU s: {key}", "s", False)
        r = ratio(cpu_metric, cells[OURS], cells[SYNAPSE])
        rows.append(
            {
                "phase": key,
                "metric": "cpu_s",
                "label": cpu_metric.label,
                "unit": "s",
                "higher_is_better": False,
                "ours": cells[OURS],
                "synapse": cells[SYNAPSE],
                "ratio": r,
                "target": None,
                "met": None,
                "ours_text": _fmt(cells[OURS]) if OURS in results else "not run",
                "synapse_text": _fmt(cells[SYNAPSE]) if SYNAPSE in results else "not run",
            }
        )
    if any(k in per for per in results.values() for k in FEDERATION_PHASES):
        rows += [row(metric) for metric in federation_metrics(scale)]
    else:
        rows.append(
            {
                "phase": "federation",
                "metric": "-",
                "label": "12. federation",
                "unit": "",
                "higher_is_better": True,
                "ours": None,
                "synapse": None,
                "ratio": None,
                "target": None,
                "met": None,
                "ours_text": "not run (scripts/bench --federation)",
                "synapse_text": "",
            }
        )
    return rows


def _note(row: dict[str, Any]) -> bool:
    """A row that is only a note (phase 12 not run), spanning the value columns."""
    return row["phase"] == "federation" and row["metric"] == "-"


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("what", "unit", "ours", "synapse", "ratio", "target")
    lines: list[tuple[str, ...]] = [header]
    notes: set[int] = set()  # lines (notes) that do not set the column widths
    for row in rows:
        if _note(row):
            notes.add(len(lines))
            lines.append((row["label"], "", row["ours_text"], "", "", ""))
            continue
        r = row["ratio"]
        target = row["target"]
        lines.append(
            (
                row["label"],
                row["unit"],
                row["ours_text"],
                row["synapse_text"],
                "-" if r is None else f"{r:.2f}x",
                ""
                if target is None
                else f">={target:g}x "
                + ("ok" if row["met"] else "-" if row["met"] is None else "MISS"),
            )
        )
    # A note may overflow its column; do not widen the table for it.
    widths = [
        max(len(line[i]) for n, line in enumerate(lines) if n not in notes)
        for i in range(len(header))
    ]
    out = []
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(line[2:], widths[2:], strict=True)]
        if n in notes:
            cells = [line[0].ljust(widths[0]), "", line[2]]
        out.append(" | ".join(cells).rstrip())
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def format_markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| what | unit | ours | synapse | ratio (>1 = ours better) | target |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        if _note(row):
            out.append(f"| {row['label']} | | {row['ours_text']} | | | |")
            continue
        r = row["ratio"]
        target = (
            ""
            if row["target"] is None
            else (
                f"≥ {row['target']:g}× "
                + ("met" if row["met"] else "-" if row["met"] is None else "**missed**")
            )
        )
        label = row["label"].strip().replace("|", "/")
        out.append(
            f"| {label} | {row['unit']} | {row['ours_text']} | {row['synapse_text']} | "
            f"{'-' if r is None else f'{r:.2f}×'} | {target} |"
        )
    return "\n".join(out)


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
