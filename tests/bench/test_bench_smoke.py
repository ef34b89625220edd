"""The benchmark (bench/) still runs, error-free, against our server at minimal scale.

No Synapse here: this only keeps the workload and the report from rotting.
"""

import asyncio

from bench import report
from bench.servers import OurServer
from bench.workload import PHASES, Scale, run_workload


def test_quick_workload_runs_clean_against_our_server(tmp_path):
    server = OurServer(tmp_path / "ours", bcrypt_rounds=4)
    server.start()
    try:
        idle = server.stats()
        scale = Scale.quick()
        results = asyncio.run(run_workload([server], scale, settle_s=0, log=lambda _: None))
        final = server.stats()
    finally:
        server.stop()

    ours = results["ours"]
    assert list(ours) == [p.key for p in PHASES]
    for key, result in ours.items():
        assert result.errors == 0, (key, result.error_samples)
        if result.note is not None:
            # Only media may be missing (reported "not available", never a figure).
            assert key.startswith("media_") and "not available" in result.note, (key, result.note)
            assert all(v is None for v in result.metrics.values())
        else:
            assert result.metrics and all(v is not None for v in result.metrics.values()), (
                key,
                result.metrics,
            )
            assert result.cpu_s is not None and result.cpu_s >= 0
    assert idle.rss_kib > 0 and final.hwm_kib >= idle.rss_kib and final.cpu_s > idle.cpu_s

    resources = {
        "ours": {
            "idle_rss_mib": idle.rss_kib / 1024,
            "peak_rss_mib": final.hwm_kib / 1024,
            "cpu_total_s": final.cpu_s - idle.cpu_s,
        }
    }
    rows = report.build_rows(scale, results, resources)
    table = report.format_table(rows)
    assert "12. federation" in table and "not run (scripts/bench --federation)" in table
    sequential = next(r for r in rows if r["phase"] == "send_sequential" and r["metric"] == "per_s")
    assert sequential["ours"] > 0 and sequential["synapse"] is None and sequential["ratio"] is None
