"""Smoke test of the benchmark code (no benchmark runs here, nothing is timed).

The bench modules import, their settings parse (``BENCH_QUICK`` and options),
and the summary is built from synthetic figures: targets are judged
PASS/MISS from the numbers given, pgbench logs and py-spy output are parsed.
"""

from __future__ import annotations

import pytest

from bench import compare, idle, latency, profile, run, scram_client, stats, targets, verdicts, workloads  # noqa: F401
from bench.targets import DIRECT, PGBOUNCER, TENANTGATE


def test_quick_settings_from_environment():
    s = compare.parse_settings([], {"BENCH_QUICK": "1"})
    assert s.quick and s.rounds == 1 and s.seconds <= 3 and 0 < s.idle_clients < 10_000
    full = compare.parse_settings([], {})
    assert (full.rounds, full.idle_clients, full.pool_mode, full.profile) == (3, 10_000, "transaction", False)
    s = compare.parse_settings(["--rounds", "2", "--profile", "--only", "c16 simple"], {"BENCH_QUICK": "1"})
    assert s.rounds == 2 and s.profile and s.only == ("c16 simple",)


def test_bad_settings_are_refused():
    with pytest.raises(SystemExit):
        compare.parse_settings(["--rounds", "0"], {})
    with pytest.raises(SystemExit):
        compare.parse_settings(["--pool-mode", "statement"], {})


def test_stats():
    sp = stats.Spread.of([3.0, 1.0, 2.0])
    assert (sp.median, sp.min, sp.max) == (2.0, 1.0, 3.0)
    assert sp.fmt() == "2 [1-3]"
    assert stats.ratio(stats.Spread.of([1.0]), stats.Spread.of([2.0])) == "0.50x"
    assert stats.ratio(None, sp) == "-"
    assert stats.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert stats.percentile(list(map(float, range(1, 101))), 0.99) == 99.0


def test_pgbench_log_and_profile_parsing(tmp_path):
    (tmp_path / "lat.123").write_text("0 0 120 0 1700000000 1\n0 1 80 0 1700000000 2\n0 2 100 0 1700000000 3\n")
    values = latency.read_latencies_us(tmp_path / "lat")
    assert values == [80.0, 100.0, 120.0] and latency.p50_p99(values) == (100.0, 120.0)
    assert not list(tmp_path.glob("lat.*"))
    raw = tmp_path / "raw.txt"
    raw.write_text("main (/x/a.py:1);f (/x/b.py:2) 7\nmain (/x/a.py:1);g (/x/b.py:9) 3\nmain (/x/a.py:1);f (/x/b.py:2) 1\n")
    total, top = profile.top_own_time(raw, 5)
    assert total == 11 and top[0] == ("f (/x/b.py:2)", 8)


def _results(tg_tps: float, added_p50: float, rss: float, backends: int, hit: float) -> compare.Results:
    res = compare.Results(compare.Settings(rounds=1))
    res.tps = {("-S c16 simple", DIRECT): [100.0], ("-S c16 simple", PGBOUNCER): [60.0],
               ("-S c16 simple", TENANTGATE): [tg_tps]}
    res.latency = {DIRECT: [(100.0, 200.0)], TENANTGATE: [(100.0 + added_p50, 300.0)]}
    res.idle = [idle.IdleResult(TENANTGATE, 10_000, 50.0, rss, 10_000, backends, backends, True, 3.0)]
    res.rewrite = {"statements": 10, "cold_p50_us": 100.0, "cold_p99_us": 500.0, "cached_hit_us": hit}
    return res


def test_report_judges_targets():
    good = "\n".join(compare.report(_results(66.0, 90.0, 120.0, 20, 4.0)))
    # the issue-8 targets, one line each
    assert good.count("- **PASS**") == 4 and "- **MISS**" not in good
    # the issue-17 table judges the same figures against its own (stricter) targets
    assert "| tenantgate / PgBouncer, 16 clients | 0.47x | >= 0.8x | 1.10x | **PASS** |" in good
    assert "| added latency at 1 client, p50 | 65 µs | <= 40 µs | 90 µs | **MISS** |" in good
    assert "| pgbench -S, 16 clients, -M simple | 100 | 60 | - | 66 | 0.66x | 1.10x | - | 0.60x | - / - / - |" in good
    bad = verdicts.issue8(_results(30.0, 200.0, 180.0, 25, 12.0))
    assert [line.split("**")[1] for line in bad] == ["MISS"] * 4
    assert "short by 50%" in bad[0] and "50 µs over" in bad[1] and "30.0 MB over" in bad[2]


def test_workload_scripts_filter_for_direct(tmp_path):
    wk = workloads.Workload("read c16 simple", 16, "simple", "read")
    direct = targets.Target(DIRECT, 1, "u", "p", filtered=True)
    gate = targets.Target(TENANTGATE, 2, "u", "p", filtered=False)
    f_direct = wk.args(direct, 2, tmp_path, 1000)[-1]
    f_gate = wk.args(gate, 2, tmp_path, 1000)[-1]
    assert "AND tenant_id = 'acme'" in open(f_direct).read()
    assert "tenant_id" not in open(f_gate).read()
