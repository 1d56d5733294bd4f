"""The side-by-side benchmark's bookkeeping: each side in its own process, TRL first, with
the same arguments; the ratio is TRL's seconds per step over ours from the same round.
(TRL is an optional extra: the sides themselves are not run here.)"""

import json
import subprocess
import sys
from pathlib import Path

from experiments import benchmark_vs_trl


def test_sides_alternate_in_subprocesses_and_the_ratio_is_per_round(tmp_path, monkeypatch, capsys):
    seconds = {"trl": [14.0, 16.0], "ours": [10.0, 8.0]}
    calls = []

    def fake_run(cmd, cwd, check):
        side, out = cmd[cmd.index("--side") + 1], Path(cmd[cmd.index("--json") + 1])
        assert cmd[:3] == [sys.executable, "-m", "experiments.benchmark_vs_trl"]
        assert cmd.count("--json") == 1 and str(tmp_path / "r.json") not in cmd and "--ours-set" in cmd
        calls.append(side)
        s = seconds[side][sum(c == side for c in calls) - 1]
        out.write_text(json.dumps({"side": side, "seconds_per_step": s, "generated_tokens_per_step": 256,
                                   "peak_rss_mb": 1000.0 if side == "trl" else 800.0}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(benchmark_vs_trl, "prepare", lambda work, n: {})
    monkeypatch.setattr(subprocess, "run", fake_run)
    result = benchmark_vs_trl.main(["--repeats", "2", "--work-dir", str(tmp_path), "--json", str(tmp_path / "r.json"),
                                    "--ours-set", "precision=bf16-mixed"])
    assert calls == ["trl", "ours", "trl", "ours"]
    assert [r["speedup"] for r in result["rounds"]] == [1.4, 2.0]
    assert [r["memory_ratio"] for r in result["rounds"]] == [0.8, 0.8]
    assert json.loads((tmp_path / "r.json").read_text()) == result
    table = capsys.readouterr().out
    assert "| 1 | ours (precision=bf16-mixed) | 8.00 | 1.000 | 256 | 800 | 2.00x |" in table
