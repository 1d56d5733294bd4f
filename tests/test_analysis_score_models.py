"""analysis.score_models on synthetic RM / AM / per-task-normalised RM run directories."""

import json
import math

import matplotlib.image as mpimg
import numpy as np
import pytest

from analysis import score_models
from analysis.score_models import (
    across_task_spread,
    load_run,
    main,
    plot_reliability,
    plot_score_distributions,
    plot_task_means,
)

TASKS = ("arithmetic", "word_limit", "code")


def _reliability(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> list[dict]:
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    out = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        inside = (conf >= lo) & ((conf < hi) if i < n_bins - 1 else (conf <= hi))
        n = int(inside.sum())
        out.append({
            "lo": float(lo), "hi": float(hi), "count": n,
            "confidence": float(conf[inside].mean()) if n else None,
            "accuracy": float(correct[inside].mean()) if n else None,
        })
    return out


def _write_run(run_dir, objective, task_means, seed, n_pairs=40, margin=None, n_bins=10):
    """A run directory as the score-model trainers write it: pairs of held-out responses per
    task, scores ~ N(task mean + 0.8·gold, 0.5)."""
    rng = np.random.default_rng(seed)
    rows, diffs, correct, per_task = [], [], [], {}
    for task, mu in task_means.items():
        gold = rng.normal(size=(n_pairs, 2))
        score = mu + 0.8 * gold + 0.5 * rng.normal(size=(n_pairs, 2))
        for c in range(n_pairs):
            for r in range(2):
                rows.append({"task": task, "score": float(score[c, r]), "gold": float(gold[c, r]),
                             "comparison": len(diffs) + c, "response": r})
        d = score[:, 0] - score[:, 1]
        diffs.extend(d)
        correct.extend((d > 0) == (gold[:, 0] > gold[:, 1]))
        per_task[task] = {"accuracy": float(np.mean(correct[-n_pairs:])), "ece": 0.05,
                          "score_mean": float(score.mean()), "score_std": float(score.std()), "n": 2 * n_pairs}
    p = 1 / (1 + np.exp(-np.asarray(diffs)))
    conf, correct = np.maximum(p, 1 - p), np.asarray(correct, dtype=float)
    bins = _reliability(conf, correct, n_bins)
    ece = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / len(conf)
    all_scores = np.array([r["score"] for r in rows])
    summary = {
        "objective": objective, "accuracy": float(correct.mean()), "accuracy_labels": float(correct.mean()),
        "ece": float(ece), "score_mean": float(all_scores.mean()), "score_std": float(all_scores.std()),
        "frac_within_margin": None if margin is None else float(np.mean(np.abs(all_scores) <= margin)),
        "margin": margin, "per_task": per_task, "reliability": bins,
    }
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "scores_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


@pytest.fixture
def runs(tmp_path):
    return {
        "RM": _write_run(tmp_path / "rm", "rm", dict(zip(TASKS, (-3.0, 1.0, 4.0))), seed=0),
        "AM": _write_run(tmp_path / "am", "am", dict(zip(TASKS, (0.1, -0.1, 0.0))), seed=1, margin=2.5),
        "RM-pertask": _write_run(tmp_path / "rmpt", "rm-pertask", dict(zip(TASKS, (0.0, 0.0, 0.0))), seed=2),
    }


def _count_kde_calls(monkeypatch) -> list[int]:
    """Record the sample size of every gaussian_kde the module builds."""
    sizes, real = [], score_models.gaussian_kde

    def counting(x):
        sizes.append(len(x))
        return real(x)

    monkeypatch.setattr(score_models, "gaussian_kde", counting)
    return sizes


def _assert_png(path):
    assert path.stat().st_size > 5_000, f"{path} is only {path.stat().st_size} bytes"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] >= 3 and min(img.shape[:2]) > 100


def test_load_run(runs, tmp_path):
    run = load_run(runs["RM"])
    assert run["summary"]["objective"] == "rm" and len(run["scores"]) == 3 * 2 * 40
    assert set(run["scores"][0]) == {"task", "score", "gold", "comparison", "response"}
    (runs["AM"] / "scores_eval.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="scores_eval.jsonl"):
        load_run(runs["AM"])
    with pytest.raises(FileNotFoundError, match="summary.json"):
        load_run(tmp_path / "does-not-exist")


def test_across_task_spread_by_hand():
    # means -2, 0, 2: mean 0, squared deviations 4, 0, 4 -> variance 8/3 (ddof=0)
    summary = {"per_task": {"a": {"score_mean": -2.0}, "b": {"score_mean": 0.0}, "c": {"score_mean": 2.0},
                            "all": {"score_mean": 100.0}}}  # the pooled row is not a task
    assert across_task_spread(summary) == pytest.approx(math.sqrt(8 / 3), abs=1e-12)
    assert across_task_spread({"per_task": {"a": {"score_mean": 1.5}}}) == 0.0
    with pytest.raises(ValueError, match="no per-task"):
        across_task_spread({"per_task": {}})


def test_spread_separates_rm_from_am(runs):
    rm, am = (load_run(runs[k])["summary"] for k in ("RM", "AM"))
    assert across_task_spread(rm) > 2.0 > 0.5 > across_task_spread(am)


def test_plots(runs, tmp_path, monkeypatch):
    kde_sizes = _count_kde_calls(monkeypatch)
    out = tmp_path / "plots"
    plot_score_distributions(runs, out / "dist.png", margin=2.5)
    plot_task_means(runs, out / "means.png")
    plot_reliability(runs, out / "rel.png")
    for name in ("dist.png", "means.png", "rel.png"):
        _assert_png(out / name)
    assert kde_sizes == [80] * 9  # 3 tasks x 3 runs, all large enough for a KDE
    assert not list(out.glob(".*"))  # atomic writes leave no temporaries behind


def test_small_or_constant_tasks_fall_back_to_histograms(runs, tmp_path, monkeypatch):
    # The AM gets a task with 3 scores and the RM one with 6 equal scores: neither may reach
    # gaussian_kde (a singular covariance); a task seen in only one run is still drawn.
    def append(run_dir, task, scores):
        with open(run_dir / "scores_eval.jsonl", "a") as f:
            for i, s in enumerate(scores):
                f.write(json.dumps({"task": task, "score": s, "gold": 0.0, "comparison": 999, "response": i}) + "\n")

    append(runs["AM"], "sorting", (0.3, -0.2, 0.1))
    append(runs["RM"], "constant", (1.0,) * 6)
    kde_sizes = _count_kde_calls(monkeypatch)
    plot_score_distributions(runs, tmp_path / "dist.png")
    _assert_png(tmp_path / "dist.png")
    assert kde_sizes == [80] * 9


def test_empty_reliability_bins(runs, tmp_path):
    summary = json.loads((runs["AM"] / "summary.json").read_text())
    # every bin but one empty, as a model that is always confident produces
    summary["reliability"] = [{"lo": lo, "hi": lo + 0.1, "count": 0, "confidence": None, "accuracy": None}
                              for lo in (0.5, 0.6, 0.7, 0.8)]
    summary["reliability"].append({"lo": 0.9, "hi": 1.0, "count": 40, "confidence": 0.97, "accuracy": 0.6})
    (runs["AM"] / "summary.json").write_text(json.dumps(summary))
    summary["reliability"] = [dict(b, count=0, confidence=None, accuracy=None) for b in summary["reliability"]]
    (runs["RM"] / "summary.json").write_text(json.dumps(summary))  # all empty
    plot_reliability(runs, tmp_path / "rel.png")
    _assert_png(tmp_path / "rel.png")


def test_main(runs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a for label, d in runs.items() for a in ("--run", f"{label}={d}")]
    assert main([*argv, "--out", str(out), "--margin", "2.5"]) == 0
    for name in ("score_distributions.png", "task_means.png", "reliability.png"):
        _assert_png(out / name)
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["label", "objective"]
    for line, (label, d) in zip(table[1:4], runs.items()):
        s = json.loads((d / "summary.json").read_text())
        fields = line.split()
        assert fields[0] == label and fields[1] == s["objective"]
        assert float(fields[2]) == pytest.approx(s["accuracy"], abs=1e-4)
        assert float(fields[3]) == pytest.approx(100 * s["ece"], abs=1e-2)
        assert float(fields[4]) == pytest.approx(across_task_spread(s), abs=1e-3)


def test_main_errors(runs, tmp_path, capsys):
    (runs["AM"] / "scores_eval.jsonl").unlink()
    assert main(["--run", f"RM={runs['RM']}", "--run", f"AM={runs['AM']}", "--out", str(tmp_path / "o")]) == 2
    assert "scores_eval.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:
        main(["--run", str(runs["RM"]), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "LABEL=DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--run", f"RM={runs['RM']}", "--run", f"RM={runs['RM-pertask']}", "--out", str(tmp_path / "o")])
    assert "distinct" in capsys.readouterr().err
