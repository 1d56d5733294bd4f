"""``stable-rlhf select``: Selective Rehearsal's data selector (docs/methods.md, "Selective Rehearsal").

Splits the PPO prompts into a rehearsal set D_R, prompts on which the SFT policy is already
expert-aligned (high advantage), kept with their best SFT response for the NLL term
``γ_R · NLL(D_R)`` of PPO (``ppo.rehearsal.data``), and D_PPO, the prompts left for PPO, where
there is room to improve. ``train(cfg)`` as a recipe:

1. read and validate the prompts (and reused samples) before any model loads;
2. sample ``n`` responses per prompt from π_SFT and score them with the advantage model
   (or read ``scored_samples.jsonl`` of an earlier run: ``reuse_samples``, so every selector
   of an ablation sees the same samples);
3. per prompt: its score is its best sample's score (the best *complete* sample with
   ``drop_truncated``), the mean of its samples is kept beside it;
4. embed every prompt (optionally prompt + best response) with a sentence-transformers
   model, L2-normalised, so k-means on them is k-means on cosine similarity;
5. k-means into c clusters (``cluster``);
6. within each cluster the top-k prompts by score form D_R (``select``); the ablations
   ``random`` and ``global_topk`` take the same number of prompts without the clusters,
   ``none`` takes none;
7. write ``rehearsal.jsonl`` (sft records), ``ppo_prompts.jsonl`` (prompt records) and
   ``selection_report.{json,md}`` (``scored_samples.jsonl`` is written as soon as step 2 ends).

The core (``default_n_clusters``, ``cluster``, ``best_of_samples``, ``select``) is pure
numpy / scikit-learn on arrays; only ``train`` loads models. One process: sampling a few
thousand prompts once does not need a distributed launch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

import numpy as np

from .config import ConfigError, GenerationConfig, ModelConfig, save_config
from .io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from .rewards import RewardConfig

STRATEGIES = ("clustered", "random", "global_topk", "none")
MINIBATCH_ABOVE = 10_000
"""``algorithm='auto'`` switches from KMeans to MiniBatchKMeans above this many points"""


@dataclasses.dataclass
class SelectConfig:
    """``stable-rlhf select``: split PPO prompts into a rehearsal set D_R and the PPO set D_PPO."""

    prompts: str = "data/testbed/prompts_train.jsonl"
    """PPO prompt records to split (a data spec: path.jsonl, hh:path, hf:name[:split], ...)"""
    out_dir: str = "runs/select"
    """run directory; rehearsal.jsonl is PPO's rehearsal.data, ppo_prompts.jsonl its prompts"""
    strategy: Literal["clustered", "random", "global_topk", "none"] = "clustered"
    """clustered: top-k per cluster (the method); random / global_topk: ablations with the same
    |D_R| (a random split; the top by score without clusters); none: D_R empty (the same as PPO
    without rehearsal.data, which must then stay unset: an empty file is not a data set)"""
    limit_per_task: Optional[int] = None
    """keep only the first N prompts of each task (in file order); None: all"""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """the SFT policy whose samples are scored (and become the rehearsal responses)"""
    reward: RewardConfig = dataclasses.field(
        default_factory=lambda: RewardConfig(source="am", path="runs/am/model"))
    """the score of each sample: the advantage model (a train-am run's model/); any source works"""
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    """sampling from the SFT policy (temperature must be > 0 when n > 1)"""
    n: int = 4
    """samples per prompt; a prompt's score is its best sample's"""
    drop_truncated: bool = True
    """a response that hit max_new_tokens without ending is never a prompt's best (nor rehearsed)"""
    reuse_samples: Optional[str] = None
    """a directory with scored_samples.jsonl of an earlier select run: read it instead of
    sampling (no policy or score model loads), so ablation selectors share one set of samples"""
    embedder: str = "minilm"
    """sentence-transformers model: 'minilm' (the packaged all-MiniLM-L6-v2), a directory or hub id"""
    embed_input: Literal["prompt", "prompt+response"] = "prompt"
    """what is embedded: the prompt, or the prompt followed by its best SFT response"""
    embed_batch_size: int = 64
    """texts per embedder forward pass"""
    n_clusters: Optional[int] = None
    """k-means clusters c; None: max(2, round(sqrt(N / 2))) (see default_n_clusters)"""
    algorithm: Literal["auto", "kmeans", "minibatch"] = "auto"
    """k-means implementation: auto is KMeans up to 10,000 prompts, MiniBatchKMeans above"""
    n_init: Optional[int] = None
    """k-means restarts (the best inertia wins); None: 10 for KMeans, 3 for MiniBatchKMeans"""
    k_per_cluster: Optional[int] = None
    """top-k prompts rehearsed per cluster; None: rehearsal_fraction of each cluster"""
    rehearsal_fraction: float = 0.1
    """share of each cluster rehearsed when k_per_cluster is None (k_c = round(f * |c|), halves up)"""
    min_score: Optional[float] = None
    """rehearse only prompts whose score is >= min_score (clustered and global_topk)"""
    seed: int = 0
    """seed for sampling, k-means and the random selector"""

    def __post_init__(self):
        if self.n < 1 or self.embed_batch_size < 1:
            raise ValueError("n and embed_batch_size must be >= 1")
        if self.n > 1 and self.generation.temperature <= 0:
            raise ValueError("greedy decoding gives n identical samples: generation.temperature must be > 0 "
                             "when n > 1")
        if self.n_clusters is not None and self.n_clusters < 1:
            raise ValueError("n_clusters must be >= 1 (or null for the default)")
        if self.n_init is not None and self.n_init < 1:
            raise ValueError("n_init must be >= 1 (or null for the default)")
        if self.k_per_cluster is not None and self.k_per_cluster < 1:
            raise ValueError("k_per_cluster must be >= 1 (or null to use rehearsal_fraction)")
        if not 0 < self.rehearsal_fraction <= 1:
            raise ValueError("rehearsal_fraction must be in (0, 1]")
        if self.limit_per_task is not None and self.limit_per_task < 1:
            raise ValueError("limit_per_task must be >= 1 (or null for all prompts)")


# --------------------------------------------------------------------------- clustering


def default_n_clusters(n: int) -> int:
    """c = max(2, round(sqrt(N / 2))), at most N: the k ≈ sqrt(N/2) rule of thumb (Mardia,
    Kent & Bibby, *Multivariate Analysis*, 1979).

    It gives clusters of about sqrt(2N) prompts, so the number of clusters (how many
    regions of the prompt space D_R must cover) and their size (how much a top-k within one
    means) both grow with N. On the testbed, N = 1,800 gives 30 clusters of ~60 prompts:
    about five per task family, i.e. sub-topics within a task, and with the default 10%
    fraction 6 rehearsed prompts in each; a cluster per task family (c = 6) would let one
    topic fill a task's whole quota."""
    if n < 1:
        raise ValueError(f"no points to cluster (n={n})")
    return min(n, max(2, math.floor(math.sqrt(n / 2) + 0.5)))


def _first_seen_order(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters 0, 1, ... in order of first appearance: the labels then no longer depend
    on the k-means implementation's numbering, and cluster 0 holds point 0."""
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[np.unique(labels, return_inverse=True)[1]]


def resolve_algorithm(algorithm: str, n: int) -> str:
    """'auto' -> 'kmeans' up to ``MINIBATCH_ABOVE`` points, 'minibatch' above; others as given."""
    if algorithm == "auto":
        return "minibatch" if n > MINIBATCH_ABOVE else "kmeans"
    return algorithm


def cluster(
    embeddings: np.ndarray,
    n_clusters: int,
    seed: int = 0,
    algorithm: Literal["auto", "kmeans", "minibatch"] = "auto",
    n_init: int | None = None,
    max_iter: int | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """k-means cluster labels (N,) int64 of the rows of ``embeddings`` (N, d), numbered in
    order of first appearance.

    ``auto`` runs scikit-learn's KMeans (k-means++, ``n_init`` 10) up to ``MINIBATCH_ABOVE``
    points and MiniBatchKMeans (``n_init`` 3, 4,096-point batches) above: full Lloyd passes cost
    O(N·c·d) each, minibatches a fixed amount per step. MiniBatchKMeans stops early when its
    smoothed inertia stops improving, so ``max_iter`` (100) is a bound, not a cost."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    X = np.asarray(embeddings, dtype=np.float32)  # (N, d)
    if X.ndim != 2:
        raise ValueError(f"embeddings must be (N, d), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("embeddings contain non-finite values")
    N = len(X)
    if not 1 <= n_clusters <= N:
        raise ValueError(f"n_clusters must be in 1..{N} (the number of points), got {n_clusters}")
    algorithm = resolve_algorithm(algorithm, N)
    if algorithm == "kmeans":
        model = KMeans(n_clusters, n_init=n_init or 10, max_iter=max_iter or 300, random_state=seed)
    elif algorithm == "minibatch":
        model = MiniBatchKMeans(n_clusters, n_init=n_init or 3, max_iter=max_iter or 100,
                                batch_size=min(batch_size, N), random_state=seed)
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected auto, kmeans or minibatch")
    return _first_seen_order(model.fit(X).labels_)


# --------------------------------------------------------------------------- selection


def best_of_samples(
    prompt_index: Sequence[int],
    scores: Sequence[float],
    truncated: Sequence[bool],
    n_prompts: int,
    drop_truncated: bool = True,
    usable: Sequence[bool] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prompt, from its scored samples (rows): the best row, its score, the mean score.

    Returns ``best_row`` (P,) int64 (-1: no usable sample), ``best`` (P,) float64 (NaN where
    no usable sample: such a prompt is never rehearsed) and ``mean`` (P,) float64 (mean of
    the finite scores of all its samples, truncated and unusable ones included). The best
    row is ``rejection_sampling.select_best``'s: the highest finite score, complete if
    ``drop_truncated``, the first sample on ties, among the rows ``usable`` allows (the
    stage passes False for a response that is not a valid demonstration, e.g. empty)."""
    from .rejection_sampling import select_best

    scores = [float(s) for s in scores]
    usable = [True] * len(scores) if usable is None else list(usable)
    if len(usable) != len(scores):
        raise ValueError(f"{len(usable)} usable flags for {len(scores)} scores")
    candidates = [s if ok else math.nan for s, ok in zip(scores, usable)]  # select_best skips NaN
    best_row = np.full(n_prompts, -1, dtype=np.int64)
    for row in select_best(prompt_index, candidates, [bool(t) for t in truncated], None, drop_truncated):
        best_row[prompt_index[row]] = row
    values = np.asarray(scores, dtype=np.float64)
    best = np.where(best_row >= 0, values[np.maximum(best_row, 0)], np.nan)
    totals, counts = np.zeros(n_prompts), np.zeros(n_prompts)
    finite = np.isfinite(values)
    np.add.at(totals, np.asarray(prompt_index)[finite], values[finite])
    np.add.at(counts, np.asarray(prompt_index)[finite], 1)
    mean = np.divide(totals, counts, out=np.full(n_prompts, np.nan), where=counts > 0)
    return best_row, best, mean


def cluster_quota(size: int, k_per_cluster: int | None = None, fraction: float | None = None) -> int:
    """How many prompts a cluster of ``size`` rehearses: min(k, size), or round(f · size)
    with halves rounded up (not Python's round-half-even: 0.1 · 25 gives 3, not 2)."""
    if (k_per_cluster is None) == (fraction is None):
        raise ValueError("give exactly one of k_per_cluster and fraction")
    if k_per_cluster is not None:
        return min(k_per_cluster, size)
    return min(size, math.floor(fraction * size + 0.5))


def _by_score(idx: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``idx`` sorted by score, highest first; ties go to the lower index (the earlier prompt)."""
    return idx[np.lexsort((idx, -scores[idx]))]


def select(
    labels: np.ndarray,
    scores: np.ndarray,
    strategy: Literal["clustered", "random", "global_topk", "none"] = "clustered",
    k_per_cluster: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    min_score: float | None = None,
) -> np.ndarray:
    """Indices of the rehearsal prompts D_R, sorted ascending; the rest form D_PPO.

    labels (N,) cluster of each prompt; scores (N,) the prompt's score (NaN: no usable
    response, never selected). Exactly one of ``k_per_cluster`` / ``fraction`` sizes the
    per-cluster quota (``cluster_quota``).

    clustered    in every cluster, its quota of top-scoring prompts whose score is finite
                 and >= ``min_score`` (a cluster with fewer such prompts gives fewer)
    global_topk  the same number m of prompts, the top m by score over all clusters
                 (``min_score`` holds; m prompts pass it, since the clustered ones do)
    random       m prompts drawn uniformly (``seed``) from those with a usable response;
                 scores and ``min_score`` play no part, as in a random split
    none         no prompt
    Ties in score go to the earlier prompt."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be the same (N,) shape")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    usable = np.isfinite(scores)
    eligible = usable & (scores >= min_score if min_score is not None else True)
    clustered = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        quota = cluster_quota(len(members), k_per_cluster, fraction)
        clustered.append(_by_score(members[eligible[members]], scores)[:quota])
    chosen = np.concatenate(clustered) if clustered else np.zeros(0, dtype=np.int64)
    m = len(chosen)
    if strategy == "none":
        chosen = chosen[:0]
    elif strategy == "global_topk":
        chosen = _by_score(np.flatnonzero(eligible), scores)[:m]
    elif strategy == "random":
        chosen = np.random.default_rng(seed).choice(np.flatnonzero(usable), size=m, replace=False)
    return np.sort(chosen).astype(np.int64)


# --------------------------------------------------------------------------- report


def summarise(values: Sequence[float]) -> dict:
    """n, missing (non-finite), mean, std and quantiles of a set of scores (None when empty)."""
    x = np.asarray(values, dtype=np.float64)
    finite = x[np.isfinite(x)]
    out = {"n": int(len(x)), "missing": int(len(x) - len(finite))}
    keys = ("mean", "std", "min", "p10", "p25", "median", "p75", "p90", "max")
    if not len(finite):
        return {**out, **dict.fromkeys(keys)}
    q = np.quantile(finite, [0.1, 0.25, 0.5, 0.75, 0.9])
    stats = (finite.mean(), finite.std(), finite.min(), *q, finite.max())
    return {**out, **{k: float(v) for k, v in zip(keys, stats)}}


def _counts(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))


def build_report(records: list[dict], labels: np.ndarray, best: np.ndarray, mean: np.ndarray,
                 rehearsal: np.ndarray, info: dict) -> dict:
    """Sizes, per-cluster and per-task composition of D_R vs D_PPO, and score summaries."""
    N = len(records)
    in_r = np.zeros(N, dtype=bool)
    in_r[rehearsal] = True
    tasks = [r["task"] for r in records]
    clusters = []
    for c in range(int(labels.max()) + 1 if N else 0):
        members = np.flatnonzero(labels == c)
        comp = _counts(tasks[i] for i in members)
        major = max(comp, key=comp.get)
        clusters.append({
            "cluster": c, "size": int(len(members)), "rehearsal": int(in_r[members].sum()),
            "majority_task": major, "majority_share": comp[major] / len(members), "tasks": comp,
            "rehearsal_tasks": _counts(tasks[i] for i in members if in_r[i]),
            "score_mean": summarise(best[members])["mean"],
            "rehearsal_score_mean": summarise(best[members[in_r[members]]])["mean"],
        })
    per_task = {}
    for task in sorted(set(tasks)):
        idx = np.array([i for i, t in enumerate(tasks) if t == task])
        per_task[task] = {"prompts": int(len(idx)), "rehearsal": int(in_r[idx].sum()), "ppo": int((~in_r[idx]).sum()),
                          "clusters": int(len(np.unique(labels[idx])))}
    return {
        **info,
        "n_prompts": N,
        "n_rehearsal": int(in_r.sum()),
        "n_ppo": int(N - in_r.sum()),
        "n_clusters": len(clusters),
        # share of prompts in a cluster whose majority task is their own (1: clusters never mix tasks)
        "task_purity": sum(c["majority_share"] * c["size"] for c in clusters) / max(N, 1),
        "clusters": clusters,
        "tasks": per_task,
        "scores": {"best": {"rehearsal": summarise(best[in_r]), "ppo": summarise(best[~in_r]), "all": summarise(best)},
                   "mean": {"rehearsal": summarise(mean[in_r]), "ppo": summarise(mean[~in_r]), "all": summarise(mean)}},
    }


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def report_markdown(report: dict) -> str:
    """The report as Markdown tables: sizes, scores, tasks, clusters, seconds."""
    lines = [f"# Selection report: {report['strategy']}", "",
             f"{report['n_prompts']} prompts -> D_R {report['n_rehearsal']}, D_PPO {report['n_ppo']}; "
             f"{report['n_clusters']} clusters ({report['algorithm']}), task purity {_f(report['task_purity'])}; "
             f"{report['samples_per_prompt']} samples per prompt ({report['samples_from']}), scored by "
             f"{report['scorer']}.", "", "## Scores (a prompt's best sample; mean of its samples)", "",
             "| score | set | n | missing | mean | std | min | p25 | median | p75 | max |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind in ("best", "mean"):
        for name in ("rehearsal", "ppo", "all"):
            s = report["scores"][kind][name]
            lines.append(f"| {kind} | {name} | {s['n']} | {s['missing']} | " + " | ".join(
                _f(s[k]) for k in ("mean", "std", "min", "p25", "median", "p75", "max")) + " |")
    lines += ["", "## Tasks", "", "| task | prompts | D_R | D_PPO | D_R share | clusters |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for task, t in report["tasks"].items():
        lines.append(f"| {task} | {t['prompts']} | {t['rehearsal']} | {t['ppo']} | "
                     f"{_f(t['rehearsal'] / t['prompts'])} | {t['clusters']} |")
    lines += ["", "## Clusters", "",
              "| cluster | size | D_R | majority task (share) | score mean | D_R score mean | tasks |",
              "| ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    for c in report["clusters"]:
        comp = ", ".join(f"{t} {n}" for t, n in c["tasks"].items())
        lines.append(f"| {c['cluster']} | {c['size']} | {c['rehearsal']} | {c['majority_task']} "
                     f"({_f(c['majority_share'], 2)}) | {_f(c['score_mean'])} | "
                     f"{_f(c['rehearsal_score_mean'])} | {comp} |")
    lines += ["", "## Seconds", "", "| phase | seconds |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["seconds"].items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- inputs


def _check_unique_ids(records: list[dict], spec: str) -> None:
    from .data import DataError

    first: dict[str, int] = {}
    for i, r in enumerate(records):
        if r["id"] in first:
            raise DataError(spec, None, "id", f"id {r['id']!r} is used by records {first[r['id']] + 1} and {i + 1}; "
                                              "the selection keys prompts by id")
        first[r["id"]] = i


def read_scored_samples(path: Path, records: list[dict]) -> tuple[list[dict], int]:
    """The rows of an earlier run's ``scored_samples.jsonl`` for ``records`` (by id, prompt
    text checked), ordered by prompt then sample; and how many rows were for other prompts.
    Every prompt must have at least one sample."""
    from .data import DataError

    if not path.is_file():
        raise DataError(path, None, None, "file not found (reuse_samples names a select run directory)")
    by_id = {r["id"]: i for i, r in enumerate(records)}
    rows, others = [], 0
    for line, text in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, line, "<line>", f"malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(path, line, "<line>", "expected a JSON object")
        for field, ok in (("id", lambda v: isinstance(v, str)), ("prompt", lambda v: isinstance(v, str)),
                          ("sample", lambda v: isinstance(v, int) and not isinstance(v, bool)),
                          ("response", lambda v: isinstance(v, str)), ("truncated", lambda v: isinstance(v, bool)),
                          ("score", lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))):
            if field not in row or not ok(row[field]):
                raise DataError(path, line, field, "missing" if field not in row else f"bad value {row[field]!r}")
        if row["id"] not in by_id:
            others += 1
            continue
        if row["prompt"] != records[by_id[row["id"]]]["prompt"]:
            raise DataError(path, line, "prompt", f"differs from the prompt with id {row['id']!r} in the prompts file")
        rows.append(row)
    missing = sorted(set(by_id) - {r["id"] for r in rows})
    if missing:
        raise DataError(path, None, "id", f"no samples for {len(missing)} prompt(s), e.g. id {missing[0]!r}: the "
                                          "samples were drawn for another prompt set")
    rows.sort(key=lambda r: (by_id[r["id"]], r["sample"]))
    return rows, others


# --------------------------------------------------------------------------- the stage


def _valid_demo(prompt: str, response: str) -> bool:
    """Whether (prompt, response) passes ``load_records(..., 'sft')``, as PPO will read it."""
    from .data import DataError, validate_record

    try:
        validate_record({"prompt": prompt, "response": response}, "sft")
    except DataError:
        return False
    return True


def _sample_and_score(cfg: SelectConfig, records: list[dict], device) -> tuple[list[dict], dict]:
    """n samples per prompt from the SFT policy, each scored; the models are freed on return."""
    from .generation import generate
    from .models import load_policy
    from .rewards import build_reward

    seconds = {}
    t0 = time.time()
    policy, tokenizer = load_policy(cfg.model, device=device)
    reward = build_reward(cfg.reward, device=device)
    seconds["load_models"] = time.time() - t0

    t0 = time.time()
    gen = generate(policy, tokenizer, [r["prompt"] for r in records], cfg.generation, n=cfg.n, seed=cfg.seed,
                   device=device, progress=True)
    seconds["sample"] = time.time() - t0

    t0 = time.time()
    rows = [records[i] for i in gen.prompt_index]  # (P * n,) records, prompt-major
    scores = reward(rows, gen.responses).float().cpu().tolist()  # (P * n,)
    seconds["score"] = time.time() - t0

    tokens = gen.response_mask.sum(-1).tolist()
    samples = [{"id": r["id"], "task": r["task"], "prompt": r["prompt"], "sample": j % cfg.n, "response": resp,
                "score": s if math.isfinite(s) else None, "truncated": bool(t), "tokens": int(k)}
               for j, (r, resp, s, t, k) in enumerate(zip(rows, gen.responses, scores, gen.truncated.tolist(), tokens))]
    return samples, seconds


def _drawn_or_reused(cfg: SelectConfig, records: list[dict], reused: list[dict] | None,
                     device) -> tuple[list[dict], dict[str, float]]:
    """The scored samples and the seconds of their phases: drawn now when nothing is ``reused``
    (the models' memory is freed before returning), else the reused ones with zero seconds."""
    from .models import free_memory

    if reused is not None:
        return reused, {"load_models": 0.0, "sample": 0.0, "score": 0.0}
    samples, phase_seconds = _sample_and_score(cfg, records, device)
    free_memory()
    return samples, phase_seconds


def _embed(cfg: SelectConfig, texts: list[str], device) -> np.ndarray:
    """(N, d) float32 unit-norm sentence embeddings; the embedder is freed on return."""
    from .models import load_embedder

    embedder = load_embedder(cfg.embedder, device=device)
    return embedder.encode(texts, batch_size=cfg.embed_batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)


def _scorer(cfg: SelectConfig) -> str:
    """What scored the samples: this config's reward, or the reused run's (from its report)."""
    if not cfg.reuse_samples:
        return cfg.reward.source + (f" ({cfg.reward.path})" if cfg.reward.source != "gold" else "")
    earlier = Path(cfg.reuse_samples) / "selection_report.json"
    scorer = json.loads(earlier.read_text())["scorer"] if earlier.is_file() else "unknown"
    return scorer if scorer.endswith(", reused") else f"{scorer}, reused"


@contextlib.contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Record the block's wall time as ``seconds[phase]``."""
    t0 = time.time()
    yield
    seconds[phase] = time.time() - t0


def _read_prompts(cfg: SelectConfig) -> tuple[list[dict], int]:
    """The prompt records (ids unique) and the number of clusters, checked against them."""
    from .data import load_records
    from .testbed.evaluate import limit_per_task

    records = limit_per_task(load_records(cfg.prompts, "prompt"), cfg.limit_per_task)
    _check_unique_ids(records, cfg.prompts)
    n_clusters = cfg.n_clusters or default_n_clusters(len(records))
    if n_clusters > len(records):
        raise ConfigError(f"n_clusters={n_clusters} but there are only {len(records)} prompts")
    return records, n_clusters


def _read_reused_samples(cfg: SelectConfig, records: list[dict]) -> tuple[list[dict] | None, str, int]:
    """An earlier run's scored samples when ``reuse_samples`` is set (else None, once the reward
    has checked it can score these prompts), where they come from, and how many rows were skipped."""
    from .rewards import check_reward_inputs

    if not cfg.reuse_samples:
        check_reward_inputs(cfg.reward, records, cfg.prompts)
        return None, "drawn from the SFT policy", 0
    samples, other_rows = read_scored_samples(Path(cfg.reuse_samples) / "scored_samples.jsonl", records)
    return samples, f"reused from {cfg.reuse_samples}", other_rows


def _best_per_prompt(cfg: SelectConfig, records: list[dict],
                     samples: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``best_of_samples`` over the sample rows: (best_row, best, mean), each (P,), and the
    number of responses that are not valid demonstrations."""
    index = {r["id"]: i for i, r in enumerate(records)}
    prompt_index = [index[s["id"]] for s in samples]
    sample_scores = [math.nan if s["score"] is None else s["score"] for s in samples]
    # A rehearsal pair must load as PPO's sft data: an empty (or NUL-carrying) response cannot be a best one.
    usable = [_valid_demo(s["prompt"], s["response"]) for s in samples]
    best_row, best, mean = best_of_samples(prompt_index, sample_scores, [s["truncated"] for s in samples],
                                           len(records), cfg.drop_truncated, usable)
    return best_row, best, mean, usable.count(False)


def _embedding_texts(cfg: SelectConfig, records: list[dict], samples: list[dict], best_row: np.ndarray) -> list[str]:
    """Each prompt, followed by its best response when ``embed_input`` asks for it (and it has one)."""
    return [r["prompt"] if cfg.embed_input == "prompt" or best_row[i] < 0
            else f"{r['prompt']}\n\n{samples[best_row[i]]['response']}" for i, r in enumerate(records)]


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _write_split(out: Path, records: list[dict], samples: list[dict], rehearsal: np.ndarray, labels: np.ndarray,
                 best_row: np.ndarray, best: np.ndarray, mean: np.ndarray) -> None:
    """``rehearsal.jsonl`` (D_R as sft records: each prompt with its best response) and
    ``ppo_prompts.jsonl`` (D_PPO as prompt records), both with their scores and cluster."""
    in_r = np.zeros(len(records), dtype=bool)
    in_r[rehearsal] = True
    rehearsal_rows = []
    for i in rehearsal:
        r = records[i]
        rehearsal_rows.append({"prompt": r["prompt"], "response": samples[best_row[i]]["response"], "task": r["task"],
                               "id": r["id"], "score": _finite_or_none(best[i]), "score_mean": _finite_or_none(mean[i]),
                               "cluster": int(labels[i]), **({"meta": r["meta"]} if "meta" in r else {})})
    ppo_rows = [{**records[i], "score": _finite_or_none(best[i]), "score_mean": _finite_or_none(mean[i]),
                 "cluster": int(labels[i])} for i in np.flatnonzero(~in_r)]
    atomic_write_jsonl(out / "rehearsal.jsonl", rehearsal_rows)
    atomic_write_jsonl(out / "ppo_prompts.jsonl", ppo_rows)


def _write_report(out: Path, report: dict) -> None:
    """``selection_report.{json,md}``, and the run's outcome in one line."""
    atomic_write_json(out / "selection_report.json", report)
    atomic_write_text(out / "selection_report.md", report_markdown(report))
    best_means = {k: _f(report["scores"]["best"][k]["mean"]) for k in ("rehearsal", "ppo")}
    print(f"[select] D_R {report['n_rehearsal']} prompts (best score {best_means['rehearsal']}), D_PPO "
          f"{report['n_ppo']} ({best_means['ppo']}); {report['seconds']['total']:.1f}s -> {out}")


def train(cfg: SelectConfig) -> dict:
    """Run the selection (the stage entry point, named like every stage's)."""
    from .models import default_device, free_memory

    start_time = time.time()
    out = Path(cfg.out_dir)
    seconds: dict[str, float] = {}

    # 1. Data first: prompts (and reused samples) are validated before a model loads.
    records, n_clusters = _read_prompts(cfg)
    N = len(records)
    samples, samples_from, other_rows = _read_reused_samples(cfg, records)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    seconds["load_data"] = time.time() - start_time
    print(f"[select] {N} prompts, strategy {cfg.strategy}, {n_clusters} clusters; samples {samples_from}"
          + (f" ({other_rows} rows for other prompts skipped)" if other_rows else ""))

    # 2. n samples per prompt from π_SFT, scored (or those of an earlier run). Written at once:
    #    they are the expensive part, and a run that fails later can reuse them (reuse_samples=out_dir).
    device = default_device()
    samples, phase_seconds = _drawn_or_reused(cfg, records, samples, device)
    seconds.update(phase_seconds)
    atomic_write_jsonl(out / "scored_samples.jsonl", samples)

    # 3. A prompt's score is its best (complete) sample's; the mean is kept beside it.
    best_row, best, mean, invalid_responses = _best_per_prompt(cfg, records, samples)

    # 4. Sentence embeddings, L2-normalised: k-means on them clusters by cosine similarity.
    with _timed(seconds, "embed"):
        embeddings = _embed(cfg, _embedding_texts(cfg, records, samples, best_row), device)  # (N, d)
        free_memory()

    # 5. k-means.
    with _timed(seconds, "cluster"):
        algorithm = resolve_algorithm(cfg.algorithm, N)
        labels = cluster(embeddings, n_clusters, cfg.seed, algorithm, cfg.n_init)  # (N,)

    # 6. D_R: top-k per cluster (or an ablation of the same size); D_PPO: the rest.
    with _timed(seconds, "select"):
        fraction = None if cfg.k_per_cluster is not None else cfg.rehearsal_fraction
        rehearsal = select(labels, best, cfg.strategy, cfg.k_per_cluster, fraction, cfg.seed, cfg.min_score)

    # 7. Outputs, each written atomically.
    with _timed(seconds, "write"):
        _write_split(out, records, samples, rehearsal, labels, best_row, best, mean)
    seconds["total"] = time.time() - start_time
    info = {
        "strategy": cfg.strategy, "prompts": cfg.prompts, "algorithm": algorithm, "embedder": cfg.embedder,
        "embed_input": cfg.embed_input, "k_per_cluster": cfg.k_per_cluster, "rehearsal_fraction": fraction,
        "min_score": cfg.min_score, "seed": cfg.seed, "scorer": _scorer(cfg), "samples_from": samples_from,
        "samples_per_prompt": len(samples) / N,
        "prompts_without_usable_sample": int((best_row < 0).sum()),
        "invalid_responses": invalid_responses, "seconds": seconds,
    }
    report = build_report(records, labels, best, mean, rehearsal, info)
    _write_report(out, report)
    return report
