"""Selective rehearsal's selector: k-means recovers known clusters, the selectors pick exactly
what they should, and the `select` stage writes its contract (CPU, tiny models)."""

import json
import math
import random
import time

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from stable_rlhf import selection
from stable_rlhf.cli import main as cli_main
from stable_rlhf.config import load_config
from stable_rlhf.testbed.evaluate import limit_per_task
from stable_rlhf.data import load_records
from stable_rlhf.io import atomic_write_jsonl, read_jsonl
from stable_rlhf.selection import (
    SelectConfig,
    best_of_samples,
    cluster,
    cluster_quota,
    default_n_clusters,
    select,
)

PROMPTS = "data/testbed/prompts_train.jsonl"


def blobs(n_per: int, k: int, d: int, seed: int = 0, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """k well-separated Gaussian blobs in d dimensions: (k * n_per, d) points and true labels,
    shuffled so that no blob is a contiguous run."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)).astype(np.float32)  # centre distances ~ sqrt(2d), noise radius ~ spread·sqrt(d)
    truth = rng.permutation(np.repeat(np.arange(k), n_per))
    return centres[truth] + spread * rng.normal(size=(len(truth), d)).astype(np.float32), truth


def by_cluster(labels, idx) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i in idx:
        out.setdefault(int(labels[i]), []).append(int(i))
    return out


# --------------------------------------------------------------------------- clustering


def test_default_n_clusters():
    assert [default_n_clusters(n) for n in (1, 2, 3, 8, 50, 1800, 100_000)] == [1, 2, 2, 2, 5, 30, 224]
    with pytest.raises(ValueError):
        default_n_clusters(0)


def test_kmeans_recovers_well_separated_blobs():
    X, truth = blobs(n_per=30, k=4, d=16)
    labels = cluster(X, 4, seed=0)
    assert adjusted_rand_score(truth, labels) == 1.0
    # numbered in order of first appearance, and the same on a rerun
    _, first = np.unique(labels, return_index=True)
    assert labels[0] == 0 and np.all(np.diff(first) > 0)
    assert np.array_equal(labels, cluster(X, 4, seed=0))
    # the explicit minibatch path agrees on the same easy data
    assert adjusted_rand_score(truth, cluster(X, 4, seed=0, algorithm="minibatch")) == 1.0
    with pytest.raises(ValueError, match="n_clusters"):
        cluster(X, len(X) + 1)


def test_minibatch_kmeans_on_100k_points():
    X, truth = blobs(n_per=5_000, k=20, d=384, seed=1, spread=0.5)  # 100,000 x 384
    t0 = time.perf_counter()
    labels = cluster(X, 20, seed=0)  # auto: MiniBatchKMeans above 10,000 points
    t = time.perf_counter() - t0
    print(f"[timing] MiniBatchKMeans 100,000 x 384: {t:.1f}s")
    assert adjusted_rand_score(truth, labels) > 0.95


# --------------------------------------------------------------------------- selection


def test_clustered_topk_hand_computed_with_ties_and_min_score():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    scores = np.array([0.5, 0.9, 0.9, 0.1, 0.3, np.nan, 0.2, -1.0, -2.0, -0.5])
    # cluster 0: 0.9 (idx 1) and 0.9 (idx 2) tie: the earlier prompt first; cluster 1: NaN never picked
    assert select(labels, scores, k_per_cluster=2).tolist() == [1, 2, 4, 6, 7, 9]
    assert select(labels, scores, k_per_cluster=1).tolist() == [1, 4, 9]
    # k larger than a cluster: all of its usable prompts
    assert select(labels, scores, k_per_cluster=10).tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    # min_score: cluster 2 has nobody >= 0, cluster 1 only idx 4
    assert select(labels, scores, k_per_cluster=2, min_score=0.25).tolist() == [1, 2, 4]
    assert select(labels, scores, k_per_cluster=3, min_score=0.0).tolist() == [0, 1, 2, 4, 6]
    # the labels' numbering does not matter
    assert select(labels + 7, scores, k_per_cluster=2).tolist() == [1, 2, 4, 6, 7, 9]


def test_fraction_quota_sizes():
    assert [cluster_quota(s, fraction=0.1) for s in (1, 4, 5, 14, 15, 25, 60)] == [0, 0, 1, 1, 2, 3, 6]
    assert cluster_quota(3, fraction=1.0) == 3 and cluster_quota(3, k_per_cluster=5) == 3
    with pytest.raises(ValueError):
        cluster_quota(3)
    with pytest.raises(ValueError):
        cluster_quota(3, k_per_cluster=1, fraction=0.5)
    rng = np.random.default_rng(0)
    sizes = [10, 25, 60, 7]
    labels = np.repeat(np.arange(4), sizes)
    scores = rng.normal(size=len(labels))
    chosen = select(labels, scores, fraction=0.2)
    assert {c: len(v) for c, v in by_cluster(labels, chosen).items()} == {0: 2, 1: 5, 2: 12, 3: 1}
    # each cluster's picks are its top scores
    for c, picked in by_cluster(labels, chosen).items():
        members = np.flatnonzero(labels == c)
        assert sorted(picked) == sorted(members[np.argsort(-scores[members])][: len(picked)].tolist())


@pytest.mark.parametrize("strategy", ["random", "global_topk", "none"])
def test_ablations_have_the_same_size_and_split_is_a_partition(strategy):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, size=200)
    scores = rng.normal(size=200)
    scores[rng.choice(200, 15, replace=False)] = np.nan  # prompts without a usable response
    clustered = select(labels, scores, "clustered", k_per_cluster=4, min_score=-0.5)
    chosen = select(labels, scores, strategy, k_per_cluster=4, min_score=-0.5, seed=1)
    assert len(chosen) == (0 if strategy == "none" else len(clustered))
    assert len(set(chosen.tolist())) == len(chosen) and np.all(np.isfinite(scores[chosen]))
    ppo = np.setdiff1d(np.arange(200), chosen)
    assert sorted(chosen.tolist() + ppo.tolist()) == list(range(200))  # no overlap, nothing lost
    if strategy == "global_topk":
        assert scores[chosen].min() >= np.sort(scores[np.isfinite(scores)])[::-1][len(chosen) - 1]
    if strategy == "random":
        assert np.array_equal(chosen, select(labels, scores, strategy, k_per_cluster=4, min_score=-0.5, seed=1))
        assert not np.array_equal(chosen, select(labels, scores, strategy, k_per_cluster=4, min_score=-0.5, seed=2))


def test_global_topk_concentrates_where_clustered_spreads():
    X, truth = blobs(n_per=25, k=4, d=16, seed=2)
    labels = cluster(X, 4)
    hot = labels[0]  # every high score is in one cluster
    scores = np.where(labels == hot, 10.0, 0.0) + np.random.default_rng(0).uniform(size=len(labels))
    clustered = select(labels, scores, "clustered", k_per_cluster=3)
    topk = select(labels, scores, "global_topk", k_per_cluster=3)
    assert len(clustered) == len(topk) == 12
    assert {c: len(v) for c, v in by_cluster(labels, clustered).items()} == {0: 3, 1: 3, 2: 3, 3: 3}
    assert set(labels[topk].tolist()) == {hot}


def test_best_of_samples():
    # 3 prompts x 2 samples; prompt 1's better sample is truncated; prompt 2 has only truncated ones
    prompt_index = [0, 0, 1, 1, 2, 2]
    scores = [0.2, 0.7, 0.9, 0.1, 0.5, float("nan")]
    truncated = [False, False, True, False, True, True]
    best_row, best, mean = best_of_samples(prompt_index, scores, truncated, 3, drop_truncated=True)
    assert best_row.tolist() == [1, 3, -1]
    assert best[:2].tolist() == [0.7, 0.1] and math.isnan(best[2])
    assert mean.tolist() == pytest.approx([0.45, 0.5, 0.5])  # NaN scores left out of the mean
    best_row, best, _ = best_of_samples(prompt_index, scores, truncated, 3, drop_truncated=False)
    assert best_row.tolist() == [1, 2, 4] and best.tolist() == [0.7, 0.9, 0.5]
    # an unusable response (e.g. empty) is never a prompt's best, but counts in the mean
    usable = [True, False, True, True, True, True]
    best_row, best, mean = best_of_samples(prompt_index, scores, truncated, 3, False, usable)
    assert best_row.tolist() == [0, 2, 4] and best[0] == 0.2 and mean[0] == pytest.approx(0.45)


def test_config_checks():
    with pytest.raises(Exception, match="rehearsal_fraction"):
        load_config(SelectConfig, None, ["rehearsal_fraction=0"])
    with pytest.raises(Exception, match="temperature"):
        load_config(SelectConfig, None, ["generation.temperature=0"])
    assert load_config(SelectConfig, None, ["generation.temperature=0", "n=1"]).n == 1


# --------------------------------------------------------------------------- the stage


def test_cli_rejects_a_malformed_prompts_file_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import stable_rlhf.models as models

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(models, "load_policy", boom)
    monkeypatch.setattr(models, "load_embedder", boom)
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine", "task": "a"}\n{"task": "a", "prompt": 3}\n')
    assert cli_main(["select", f"prompts={bad}", f"out_dir={tmp_path / 'out'}", "reward.source=gold"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: field 'prompt'" in err and "expected a string" in err
    assert not (tmp_path / "out").exists()
    # a reuse_samples directory without samples is reported the same way
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "fine", "task": "a"}\n{"prompt": "also fine", "task": "a"}\n')
    assert cli_main(["select", f"prompts={good}", f"out_dir={tmp_path / 'out'}", f"reuse_samples={tmp_path}"]) == 2
    assert "scored_samples.jsonl: file not found" in capsys.readouterr().err


WORDS = "river stone cloud music garden paper window bread light storm".split()


@pytest.fixture(scope="module")
def tiny_am(tmp_path_factory):
    """A tiny advantage model on the tiny random backbone (the policy's tokenizer), ~2 s."""
    from stable_rlhf.reward_model import ScoreTrainConfig, train

    d = tmp_path_factory.mktemp("am")
    rng = random.Random(0)
    comps = []
    for i in range(16):
        goods = rng.sample(range(4), 3)
        comps.append({"prompt": f"say something about {rng.choice(WORDS)}", "task": "alpha" if i % 2 else "beta",
                      "responses": [" ".join(rng.sample(WORDS, 3) + ["good"] * g) for g in goods],
                      "ranking": sorted(range(3), key=lambda j: -goods[j])})
    atomic_write_jsonl(d / "train.jsonl", comps[:12])
    atomic_write_jsonl(d / "eval.jsonl", comps[12:])
    train(load_config(ScoreTrainConfig, None, [
        "objective=am", f"train_data={d / 'train.jsonl'}", f"eval_data={d / 'eval.jsonl'}", f"out_dir={d / 'run'}",
        "model.name_or_path=tiny-random", "model.tiny_hidden=32", "epochs=1", "batch_size=4", "warmup_ratio=0"]))
    return d / "run" / "model"


def stage_cfg(out, *extra):
    return load_config(SelectConfig, None, [
        f"prompts={PROMPTS}", f"out_dir={out}", "limit_per_task=4", "model.name_or_path=tiny-random",
        "generation.max_new_tokens=8", "generation.batch_size=16", "n=2", "drop_truncated=false",
        "n_clusters=6", "k_per_cluster=2", "embed_batch_size=32", *extra])


def test_select_stage_end_to_end(minilm, tiny_am, tmp_path, monkeypatch):
    import stable_rlhf.models as models

    monkeypatch.setattr(models, "load_embedder", lambda *a, **k: minilm)  # loaded once per session
    run = tmp_path / "clustered"
    report = selection.train(stage_cfg(run, "reward.source=am", f"reward.path={tiny_am}"))

    # the contract: PPO reads rehearsal.jsonl as sft records and ppo_prompts.jsonl as prompts
    rehearsal = load_records(str(run / "rehearsal.jsonl"), "sft")
    ppo = load_records(str(run / "ppo_prompts.jsonl"), "prompt")
    prompts = load_records(PROMPTS, "prompt")
    ids = [r["id"] for r in limit_per_task(prompts, 4)]
    assert len(ids) == 24
    assert sorted([r["id"] for r in rehearsal] + [r["id"] for r in ppo]) == sorted(ids)  # a partition
    assert len(rehearsal) == report["n_rehearsal"] == 12  # 2 per cluster, 6 clusters of >= 2
    assert {r["cluster"] for r in rehearsal} == set(range(6))
    for r in rehearsal:
        assert {"prompt", "response", "task", "id", "score", "cluster"} <= set(r) and math.isfinite(r["score"])
    samples = read_jsonl(run / "scored_samples.jsonl")
    assert len(samples) == 24 * 2 and {"id", "response", "score", "truncated"} <= set(samples[0])
    # a rehearsed response is its prompt's best sample, and it outscores the prompt's others
    for r in rehearsal:
        mine = [s for s in samples if s["id"] == r["id"]]
        assert r["response"] in [s["response"] for s in mine] and r["score"] == max(s["score"] for s in mine)
    # within each cluster, the rehearsed prompts outscore the others
    for c in range(6):
        kept = [r["score"] for r in rehearsal if r["cluster"] == c]
        rest = [r["score"] for r in ppo if r["cluster"] == c]
        assert min(kept) >= max(rest, default=-math.inf)
    saved = json.loads((run / "selection_report.json").read_text())
    assert saved["n_prompts"] == 24 and len(saved["clusters"]) == 6 and sum(c["size"] for c in saved["clusters"]) == 24
    assert set(saved["tasks"]) == {"arithmetic", "bullets", "lowercase", "word_limit", "keywords", "code"}
    assert {"rehearsal", "ppo", "all"} <= set(saved["scores"]["best"]) and saved["seconds"]["total"] > 0
    for phase in ("sample", "score", "embed", "cluster", "select"):
        assert phase in saved["seconds"]
    assert "| cluster |" in (run / "selection_report.md").read_text() and (run / "config.yaml").is_file()

    # the ablations reuse the same samples (no policy or score model loads) and keep |D_R|
    def boom(*a, **k):
        raise AssertionError("reuse_samples must not sample again")

    monkeypatch.setattr(models, "load_policy", boom)
    for strategy in ("global_topk", "random"):
        out = tmp_path / strategy
        ablation = selection.train(stage_cfg(out, f"strategy={strategy}", f"reuse_samples={run}",
                                             "embed_input=prompt+response"))
        assert ablation["n_rehearsal"] == 12 and ablation["scorer"].startswith("am")
        assert read_jsonl(out / "scored_samples.jsonl") == samples
        chosen = load_records(str(out / "rehearsal.jsonl"), "sft")
        rest = load_records(str(out / "ppo_prompts.jsonl"), "prompt")
        assert sorted([r["id"] for r in chosen] + [r["id"] for r in rest]) == sorted(ids)
    # a subset of the prompts reuses the same samples (the others' rows are skipped)
    subset = selection.train(stage_cfg(tmp_path / "none", "strategy=none", f"reuse_samples={run}", "limit_per_task=2"))
    assert subset["n_rehearsal"] == 0 and subset["n_ppo"] == 12
    assert len(read_jsonl(tmp_path / "none" / "scored_samples.jsonl")) == 12 * 2
    top = sorted(r["score"] for r in load_records(str(tmp_path / "global_topk" / "rehearsal.jsonl"), "sft"))
    best = sorted((max(s["score"] for s in samples if s["id"] == i) for i in ids), reverse=True)[:12]
    assert top == sorted(best)
