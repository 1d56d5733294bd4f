"""The ablation's plan (shared stages once, every arm's config wired as its kind says) inspected
without training, then the runner end to end on tiny models: finished runs skipped, bad configs
refused before training, and the report filled from the run directories."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import yaml

from stable_rlhf.ablation import AblationConfig, Plan, build_plan, run
from stable_rlhf.config import ConfigError, load_config
from stable_rlhf.data import DataError
from stable_rlhf.io import read_jsonl
from stable_rlhf.ppo import PPOConfig

pytestmark = pytest.mark.usefixtures("small_model_cpu")

ARMS = ["sft", "rm-ppo-ptx", "am-ppo-sr", "am-ppo-random-rehearsal", "rejection-sampling", "gold-ppo"]


def tiny_config(out, *extra) -> AblationConfig:
    text = f"""
out_dir: {out}
seeds: [0, 1]
run_arms: {json.dumps(ARMS)}
model: {{name_or_path: tiny-random}}
prompts_per_task: 6
eval: {{limit_per_task: 2, every: 2, generation: {{max_new_tokens: 8, top_p: 1.0, batch_size: 16}}}}
score:
  train_data: data/testbed/preferences_train.jsonl
  eval_data: data/testbed/preferences_eval.jsonl
  model: {{name_or_path: tiny-random, tiny_hidden: 32}}
  epochs: 1
  batch_size: 8
select: {{n: 2, drop_truncated: false, n_clusters: 4, k_per_cluster: 2,
          generation: {{max_new_tokens: 8, batch_size: 16}}}}
ppo: {{steps: 2, batch_size: 4, mini_batch_size: 2, lr: 1.0e-3, log_with: none, save_every: 2,
       generation: {{max_new_tokens: 8, batch_size: 4}}}}
rejection_sampling: {{iterations: 1, prompts_per_iteration: 4, n: 2, drop_truncated: false, log_with: none,
                     generation: {{max_new_tokens: 8, batch_size: 8}}}}
"""
    path = out.parent / f"{out.name}.yaml"
    path.write_text(text)
    return load_config(AblationConfig, path, list(extra))


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation") / "run"
    cfg = tiny_config(out)
    run(cfg)
    return cfg, out


def run_config(out, arm, seed=0) -> dict:
    return yaml.safe_load((out / "arms" / arm / f"seed{seed}" / "config.yaml").read_text())


def shared_stages(tmp_path, arms, *extra) -> list[str]:
    cfg = tiny_config(tmp_path / "plan", f"run_arms={json.dumps(arms)}", *extra)
    return [s.name for s in build_plan(cfg).stages if s.name.startswith("shared/")]


def test_plan_needs_only_what_the_arms_use(tmp_path):
    always = ["shared/prompt_pool", "shared/eval_reference"]
    assert shared_stages(tmp_path, ["sft", "gold-ppo"]) == always
    assert shared_stages(tmp_path, ["rm-ppo"]) == ["shared/prompt_pool", "shared/rm", "shared/rm-pertask",
                                                   "shared/eval_reference"]
    assert shared_stages(tmp_path, ["am-ppo"]) == ["shared/prompt_pool", "shared/am", "shared/eval_reference"]
    assert shared_stages(tmp_path, ["am-ppo"], "am_from_rm=true") == ["shared/prompt_pool", "shared/rm", "shared/am",
                                                                      "shared/rm-pertask", "shared/eval_reference"]
    sr = shared_stages(tmp_path, ["sr"], "arms.sr.score=gold", "arms.sr.rehearsal=random")
    assert sr == ["shared/prompt_pool", "shared/am", "shared/eval_reference", "shared/select-clustered",
                  "shared/select-random"]  # the random selector reuses the clustered one's samples


def test_plan_shares_stages_and_wires_every_arm(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(out, "run_arms=[am-ppo-sr, rm-ppo, rm-ppo-ptx, sft]")
    plan = build_plan(cfg)
    names = [s.name for s in plan.stages]
    assert len(names) == len(set(names))
    for kind, n in (("score", 2), ("select", 1), ("reference", 1), ("pool", 1), ("ppo", 3 * 2), ("sft", 2)):
        assert sum(s.kind == kind for s in plan.stages) == n, kind
    assert names[-8:] == [f"arms/{a}/seed{s}" for s in (0, 1) for a in ("am-ppo-sr", "rm-ppo", "rm-ppo-ptx", "sft")]
    for i, stage in enumerate(plan.stages):  # every stage reads only what an earlier one made
        assert set(stage.inputs) <= set(names[:i]), stage.name
        assert stage.out in (out / stage.name, out / "shared" / "prompt_pool.jsonl")
    rm, am, select = plan["shared/rm"], plan["shared/am"], plan["shared/select-clustered"]
    assert am.config.init_from is None and am.inputs == ()
    from_rm = build_plan(tiny_config(out, "run_arms=[am-ppo]", "am_from_rm=true"))["shared/am"]
    assert from_rm.config.init_from == str(rm.out / "model") and from_rm.inputs == ("shared/rm",)
    assert rm.config.objective == "rm" and am.config.objective == "am" and rm.config.seed == cfg.score_seed
    assert select.config.prompts == str(plan["shared/prompt_pool"].out)
    assert select.config.reward.path == str(am.out / "model") and select.inputs == ("shared/prompt_pool", "shared/am")
    reference = plan["shared/eval_reference"].out
    sr = plan["arms/am-ppo-sr/seed1"]
    assert sr.inputs == ("shared/select-clustered", "shared/am", "shared/eval_reference")
    assert sr.config.rehearsal.data == str(select.out / "rehearsal.jsonl") and sr.config.rehearsal.coef == 0.01
    assert sr.config.prompts == str(select.out / "ppo_prompts.jsonl") and sr.config.ptx.data is None
    assert sr.config.reward.source == "am" and sr.config.reward.path == str(am.out / "model")
    assert sr.config.seed == 1 and sr.config.out_dir == str(out / "arms" / "am-ppo-sr" / "seed1")
    assert sr.config.eval.reference_dir == str(reference) and sr.config.eval.seed == cfg.eval.seed
    rm_ppo, ptx = plan["arms/rm-ppo/seed0"].config, plan["arms/rm-ppo-ptx/seed0"].config
    assert rm_ppo.rehearsal.data is None and rm_ppo.ptx.data is None
    assert rm_ppo.prompts == str(out / "shared" / "prompt_pool.jsonl")
    assert rm_ppo.reward.path == str(rm.out / "model") and plan["arms/rm-ppo/seed0"].inputs[1] == "shared/rm"
    assert ptx.ptx.data == "data/testbed/sft_demos.jsonl" and ptx.ptx.coef == 0.01 and ptx.rehearsal.data is None
    sft = plan["arms/sft/seed1"]
    assert sft.config.seed == cfg.eval.seed + 2 and sft.config.reference_dir == str(reference)
    assert not out.exists()  # planning writes nothing


def test_plan_refuses_a_stage_twice_or_before_its_inputs(tmp_path):
    plan = build_plan(tiny_config(tmp_path / "run", "run_arms=[rm-ppo]"))
    with pytest.raises(ValueError, match="shared/rm is planned twice"):
        Plan(plan.cfg, plan.stages + [plan["shared/rm"]])
    with pytest.raises(ValueError, match=r"shared/rm-pertask reads \['shared/rm'\]"):
        Plan(plan.cfg, [s for s in plan.stages if s.name != "shared/rm"])


def test_runner_resumes_an_interrupted_trainer(tmp_path, monkeypatch):
    from stable_rlhf import ablation, ppo

    plan = build_plan(tiny_config(tmp_path / "run", "run_arms=[gold-ppo]", "seeds=[0]"))
    stage = plan["arms/gold-ppo/seed0"]
    resumed = []
    monkeypatch.setattr(ppo, "train", lambda cfg: resumed.append(cfg.resume))
    ablation.train_stage(plan, stage)
    (stage.out / "checkpoints").mkdir(parents=True)
    ablation.train_stage(plan, stage)
    assert resumed == [False, True] and stage.config.resume is False  # the plan itself is left as built


def test_shared_stages_and_every_arm_seed_ran(ablation):
    cfg, out = ablation
    index = json.loads((out / "ablation.json").read_text())
    assert list(index["arms"]) == ARMS and index["seeds"] == [0, 1]
    for key in ("rm", "am", "rm-pertask", "select-clustered", "select-random"):
        assert key in index["shared"], key
    assert "select-global_topk" not in index["shared"]  # no arm uses it
    pool = [json.loads(line) for line in (out / "shared" / "prompt_pool.jsonl").read_text().splitlines()]
    assert len(pool) == 6 * len({r["task"] for r in pool})
    for arm in ARMS:
        for seed in (0, 1):
            summary = json.loads((out / "arms" / arm / f"seed{seed}" / "summary.json").read_text())
            keys = {"gold_reward", "win", "lose", "tie", "forget_win"} | ({"kl"} if arm != "rejection-sampling" else set())
            assert keys <= set(summary["final"]), arm
            assert summary["per_task"], arm
    # The AM starts where the RM does (not from it); rehearsal selection scored with the shared AM.
    am_cfg = yaml.safe_load((out / "shared" / "am" / "config.yaml").read_text())
    assert am_cfg["init_from"] is None and am_cfg["objective"] == "am"
    report = json.loads((out / "shared" / "select-random" / "selection_report.json").read_text())
    assert report["samples_from"].startswith("reused from") and report["strategy"] == "random"


def test_arm_configs_are_wired_by_kind(ablation):
    cfg, out = ablation
    sr, rnd = run_config(out, "am-ppo-sr"), run_config(out, "am-ppo-random-rehearsal")
    sel = out / "shared" / "select-clustered"
    assert sr["reward"] == {**sr["reward"], "source": "am", "path": str(out / "shared" / "am" / "model")}
    assert sr["prompts"] == str(sel / "ppo_prompts.jsonl") and sr["rehearsal"]["data"] == str(sel / "rehearsal.jsonl")
    assert sr["rehearsal"]["coef"] == 0.01 and sr["ptx"]["data"] is None
    assert rnd["rehearsal"]["data"] == str(out / "shared" / "select-random" / "rehearsal.jsonl")
    # D_R and D_PPO split the pool; the random selector rehearses as many prompts as the clustered one.
    n_pool = len((out / "shared" / "prompt_pool.jsonl").read_text().splitlines())
    for s in ("clustered", "random"):
        d = out / "shared" / f"select-{s}"
        n_r, n_p = (len((d / f).read_text().splitlines()) for f in ("rehearsal.jsonl", "ppo_prompts.jsonl"))
        assert n_r > 0 and n_r + n_p == n_pool
    assert (len((sel / "rehearsal.jsonl").read_text().splitlines())
            == len((out / "shared" / "select-random" / "rehearsal.jsonl").read_text().splitlines()))
    ptx = run_config(out, "rm-ppo-ptx")
    assert ptx["ptx"]["data"] == "data/testbed/sft_demos.jsonl" and ptx["ptx"]["coef"] == 0.01
    assert ptx["rehearsal"]["data"] is None and ptx["prompts"] == str(out / "shared" / "prompt_pool.jsonl")
    assert ptx["reward"]["source"] == "rm"
    gold = run_config(out, "gold-ppo", seed=1)
    assert gold["reward"]["source"] == "gold" and gold["seed"] == 1
    # Every trained arm used the shared SFT reference: identical reference answers, sampled once.
    ref = (out / "shared" / "eval_reference" / "eval_reference_eval.jsonl").read_text()
    for arm in ARMS[1:]:
        assert (out / "arms" / arm / "seed1" / "eval_reference_eval.jsonl").read_text().count("\n") == ref.count("\n")
        assert json.loads((out / "arms" / arm / "seed1" / "eval_reference_eval.jsonl").read_text().splitlines()[0]
                          )["response"] == json.loads(ref.splitlines()[0])["response"]
    # The SFT arm resamples with its own seed and is judged against the same reference.
    sft = json.loads((out / "arms" / "sft" / "seed1" / "summary.json").read_text())
    assert sft["sampling_seed"] == cfg.eval.seed + 2 and sft["final"]["kl"] == 0.0


def test_rerun_skips_finished_stages_and_runs(ablation, capsys):
    cfg, out = ablation
    before = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    timings = (out / "timings.json").read_text()
    run(cfg)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")} == before
    assert (out / "timings.json").read_text() == timings
    printed = capsys.readouterr().out
    stages = build_plan(cfg).stages
    assert printed.count("finished, skipped") == len(stages) - 1  # all but the pool (rewritten only if changed)
    for stage in stages[1:]:
        assert f"[ablation] {stage.name}: finished, skipped" in printed
        assert f"[ablation] {stage.name} ->" not in printed


def test_rerun_with_other_settings_is_refused(ablation):
    cfg, out = ablation
    with pytest.raises(ConfigError, match=r"arms/rm-ppo-ptx/seed0 was made with other settings \(lr differ"):
        run(tiny_config(out, "ppo.lr=0.5"))
    with pytest.raises(ConfigError, match=r"shared/am was made with other settings \(am.margin differ"):
        run(tiny_config(out, "score.am.margin=3.0"))


def test_report_is_filled_from_the_run_directories(ablation):
    from analysis.ablation_report import build_report

    cfg, out = ablation
    path = build_report(out)
    text = path.read_text()
    for heading in ("Table 1", "Table 2", "Gold reward per task", "Style leakage", "Findings"):
        assert heading in text
    def no_constants(name):
        raise AssertionError(f"report.json holds a {name} literal: not JSON")

    data = json.loads((out / "report.json").read_text(), parse_constant=no_constants)
    assert set(data["table1"]) == {"rm", "am", "rm-pertask", "labellers"}
    labellers = json.loads(open("data/testbed/labeler_stats.json").read())["eval"]["labeler/agreement_measured"]
    assert data["table1"]["labellers"]["accuracy"] == labellers and "simulated labellers (the ceiling)" in text
    for arm in ARMS:
        row = data["table2"][arm]
        wins = [json.loads((out / "arms" / arm / f"seed{s}" / "summary.json").read_text())["final"]["win"]
                for s in (0, 1)]
        assert row["win"]["mean"] == pytest.approx(np.mean(wins))
        assert row["win"]["std"] == pytest.approx(np.std(wins, ddof=1))
        assert f"| {cfg.arms[arm].label or arm} | 2 |" in text
    table2 = [line.split(" | ") for line in text.split("## Table 2")[1].split("##")[0].splitlines()
              if line.startswith("| ") and "---" not in line]
    assert table2[0][2:6] == ["gold (norm.)", "win", "lose", "tie"] and len(table2) == 1 + len(ARMS)
    for row in table2[1:]:
        assert "n/a" not in row[2:6] + row[7:8], row  # gold, win/lose/tie, forgetting win always measured
    assert "Degenerate answers" in text and all(0 <= data["table2"][arm]["degenerate"]["mean"] <= 1 for arm in ARMS)
    for name in ("score_distributions", "reliability", "win_lose_tie", "gold_vs_kl", "degenerate_vs_kl",
                 "proxy_vs_kl", "forgetting", "reward_curves"):
        png = out / "plots" / f"{name}.png"
        assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG", name
        assert f"plots/{name}.png" in text
    assert "<table>" in (out / "report.html").read_text()
    # The PPO-type arms' training diagnostics, read from their summaries and metrics.
    assert "Did optimisation work?" in text and "timings" not in data
    for arm in ("rm-ppo-ptx", "am-ppo-sr", "gold-ppo"):
        summaries = [json.loads((out / "arms" / arm / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
        diag = data["diagnostics"][arm]
        assert diag["objective_gain_se"]["values"] == [x["final"]["objective_gain_se"] for x in summaries]
        assert diag["warnings"] == {str(s): x["warnings"] for s, x in zip((0, 1), summaries)}
    assert set(data["diagnostics"]) == {"rm-ppo-ptx", "am-ppo-sr", "am-ppo-random-rehearsal", "gold-ppo"}


def test_bad_configs_are_refused_before_any_stage(tmp_path):
    with pytest.raises(ConfigError, match="rehearsal and ptx are PPO options"):
        tiny_config(tmp_path / "a", "arms.rs.kind=rejection-sampling", "arms.rs.rehearsal=clustered")
    with pytest.raises(ConfigError, match="run_arms names unknown arm"):
        tiny_config(tmp_path / "b", "run_arms=[sft,nope]")
    with pytest.raises(ConfigError, match="arms.rm-ppo-ptx: .*lr"):
        cfg = tiny_config(tmp_path / "c", "arms.rm-ppo-ptx.overrides={lr: fast}")
        run(cfg)
    assert not (tmp_path / "c" / "shared" / "rm").exists()
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "hi", "task": "arithmetic"}\n{"prompt": 3, "task": "arithmetic"}\n')
    with pytest.raises(DataError, match="prompts.jsonl:2: field 'prompt'"):
        run(tiny_config(tmp_path / "d", f"prompts={bad}"))
    assert not (tmp_path / "d" / "shared").exists()


def test_experiment_command_runs_and_reports(ablation, capsys):
    from experiments.ablation import main

    cfg, out = ablation
    config = out.parent / f"{out.name}.yaml"
    os.utime(out / "report.md", (0, 0))
    assert main(["--config", str(config)]) == 0
    assert (out / "report.md").stat().st_mtime > 0 and "report:" in capsys.readouterr().out
    assert main(["--config", str(config), "run_arms=[nope]"]) == 2


def test_strict_json_nulls_non_finite_values_and_says_why():
    from analysis.ablation_report import strict_json

    undefined: dict[str, str] = {}
    out = strict_json({"a": {"mean": float("nan"), "std": None}, "b": [1.0, np.float64("inf"), np.int64(3)]}, "",
                      undefined)
    assert out == {"a": {"mean": None, "std": None}, "b": [1.0, None, 3]}
    assert set(undefined) == {"a.mean", "b[1]"} and undefined["b[1]"] == "infinite"
    json.dumps(out, allow_nan=False)


def test_report_tables_read_runs_made_before_a_metric_existed():
    from analysis.ablation_report import task_table

    old = [{"step": 0, "eval/gold_norm": 0.4, "eval/gold/code": 1.0}, {"step": 8, "eval/gold_norm": 0.5,
                                                                          "eval/gold/code": 2.0}]
    new = [{**r, "eval/degenerate": 0.1 * i, "eval/degenerate/code": 0.1 * i} for i, r in enumerate(old)]
    index = {"arms": {"old": {"label": "Old", "kind": "ppo", "seeds": {0: {"metrics": old}}},
                      "new": {"label": "New", "kind": "ppo", "seeds": {0: {"metrics": new}}}}}
    head, rows = task_table(index, "eval/degenerate")
    assert head == ["arm", "code", "all"]
    assert rows == [["SFT reference answers", "n/a", "n/a"], ["Old", "n/a", "n/a"], ["New", "0.100", "0.100"]]


def test_finished_stages_keep_their_results_but_not_their_checkpoints(ablation):
    cfg, out = ablation
    runs = [d for d in (out / "arms").glob("*/seed*")] + [out / "shared" / "rm", out / "shared" / "am"]
    assert len(runs) >= 2 * len(ARMS)
    for run_dir in runs:
        assert (run_dir / "summary.json").exists() and not (run_dir / "checkpoints").exists(), run_dir


# --------------------------------------------------------------------------- DPO, RLOO and GRPO arms

NEW_ARMS = ["dpo", "grpo-am"]


def test_plan_wires_dpo_rloo_and_grpo_arms(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(out, "run_arms=[dpo, rloo-rm, grpo-rm, grpo-am, rm-ppo]")
    plan = build_plan(cfg)
    names = [s.name for s in plan.stages]
    assert names[-12:] == [f"arms/{a}/seed{s}" + ("/train" if i == 0 else "") for s in (0, 1)
                           for i, a in enumerate(("dpo", "dpo", "rloo-rm", "grpo-rm", "grpo-am", "rm-ppo"))]
    assert shared_stages(tmp_path, ["dpo"]) == ["shared/prompt_pool", "shared/rm", "shared/rm-pertask",
                                                "shared/eval_reference"]  # its proxy is the RM
    assert shared_stages(tmp_path, ["dpo"], "arms.dpo.score=gold") == ["shared/prompt_pool", "shared/eval_reference"]
    # DPO: the score models' comparisons, the SFT policy, the arm's seed, in train/; then the evaluation
    train, ev = plan["arms/dpo/seed1/train"], plan["arms/dpo/seed1"]
    assert train.kind == "dpo" and train.inputs == () and train.out == out / "arms" / "dpo" / "seed1" / "train"
    assert (train.config.train_data, train.config.eval_data) == (cfg.score.train_data, cfg.score.eval_data)
    assert train.config.model == cfg.model and train.config.seed == 1 and train.config.out_dir == str(train.out)
    assert train.config.beta == cfg.dpo.beta and train.config.loss_type == "dpo"
    assert ev.kind == "final-eval" and ev.inputs == ("arms/dpo/seed1/train", "shared/rm", "shared/eval_reference")
    assert ev.config.run_dir == str(train.out) and ev.config.out_dir == str(out / "arms" / "dpo" / "seed1")
    assert ev.config.reward.source == "rm" and ev.config.reward.path == str(plan["shared/rm"].out / "model")
    ppo = plan["arms/rm-ppo/seed1"].config
    assert ev.config.eval == ppo.eval and ev.config.model == ppo.model  # evaluated like a PPO arm
    # RLOO / GRPO: PPO with the arm's estimator; GRPO's KL is a loss term; the others stay gae
    rloo, grpo_rm, grpo_am = (plan[f"arms/{a}/seed0"].config for a in ("rloo-rm", "grpo-rm", "grpo-am"))
    assert (rloo.advantage.estimator, rloo.advantage.kl) == ("rloo", "reward")
    assert (grpo_rm.advantage.estimator, grpo_rm.advantage.kl, grpo_am.advantage.estimator) == ("grpo", "loss", "grpo")
    assert grpo_am.reward.source == "am" and grpo_rm.reward.source == "rm" and grpo_am.advantage.group_size == 4
    assert ppo.advantage.estimator == "gae" and plan["arms/grpo-am/seed0"].inputs[1] == "shared/am"
    over = build_plan(tiny_config(out, "run_arms=[dpo, grpo-am]", "dpo.beta=0.3", "arms.dpo.overrides={epochs: 3}",
                                  "arms.grpo-am.overrides={advantage: {group_size: 2}}"))
    assert over["arms/dpo/seed0/train"].config.beta == 0.3 and over["arms/dpo/seed0/train"].config.epochs == 3
    assert over["arms/grpo-am/seed0"].config.advantage.group_size == 2
    assert not out.exists()


def test_bad_dpo_and_estimator_arms_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="estimator is a PPO option"):
        tiny_config(tmp_path / "a", "arms.x.kind=dpo", "arms.x.estimator=grpo")
    with pytest.raises(ConfigError, match="rehearsal and ptx are PPO options"):
        tiny_config(tmp_path / "b", "arms.x.kind=dpo", "arms.x.rehearsal=clustered")
    with pytest.raises(ConfigError, match="with its estimator field, not overrides"):
        tiny_config(tmp_path / "c", "arms.x.overrides={advantage: {estimator: rloo}}")
    with pytest.raises(ConfigError, match="ppo.advantage.estimator: each arm names its estimator"):
        tiny_config(tmp_path / "d", "ppo.advantage.estimator=grpo")
    with pytest.raises(ConfigError, match="arms.grpo-am: .*group_size"):  # 4 rows cannot be groups of 3
        build_plan(tiny_config(tmp_path / "e", "run_arms=[grpo-am]",
                               "arms.grpo-am.overrides={advantage: {group_size: 3}}"))
    with pytest.raises(ConfigError, match="arms.dpo: .*beta"):
        build_plan(tiny_config(tmp_path / "f", "run_arms=[dpo]", "arms.dpo.overrides={beta: 0}"))


@pytest.fixture(scope="module")
def new_arms(tmp_path_factory):
    """One seed of a DPO arm and a GRPO (AM) arm, on 24 / 12 of the testbed's comparisons."""
    root = tmp_path_factory.mktemp("new-arms")
    for split, n in (("train", 24), ("eval", 12)):  # the files interleave the six tasks
        lines = open(f"data/testbed/preferences_{split}.jsonl").read().splitlines()[:n]
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    out = root / "run"
    cfg = tiny_config(out, f"run_arms={json.dumps(NEW_ARMS)}", "seeds=[0]", f"score.train_data={root / 'train.jsonl'}",
                      f"score.eval_data={root / 'eval.jsonl'}", "dpo.log_with=none", "dpo.max_length=128",
                      "dpo.lr=1.0e-3", "dpo.batch_size=12")
    run(cfg)
    return cfg, out


def test_dpo_and_grpo_arms_run_and_are_evaluated_like_every_arm(new_arms):
    from stable_rlhf.io import read_jsonl

    cfg, out = new_arms
    index = json.loads((out / "ablation.json").read_text())
    assert list(index["arms"]) == NEW_ARMS and index["arms"]["grpo-am"]["estimator"] == "grpo"
    assert index["arms"]["dpo"]["kind"] == "dpo" and index["arms"]["dpo"]["estimator"] is None
    keys = {"gold_reward", "win", "lose", "tie", "kl", "forget_win", "forget_lose", "forget_tie", "proxy_score",
            "degenerate", "forget_degenerate"}
    for arm in NEW_ARMS:
        summary = json.loads((out / "arms" / arm / "seed0" / "summary.json").read_text())
        assert keys <= set(summary["final"]) and summary["per_task"], arm
        assert all(np.isfinite(summary["final"][k]) for k in keys), arm
        assert not (out / "arms" / arm / "seed0" / "checkpoints").exists()
    # DPO trained on the score models' comparisons (24 three-way rankings: 72 pairs) from the SFT policy
    trainer = json.loads((out / "arms" / "dpo" / "seed0" / "train" / "summary.json").read_text())
    assert trainer["train_pairs"] == 72 and trainer["eval_pairs"] == 36 and trainer["steps"] == 6
    assert (out / "arms" / "dpo" / "seed0" / "train" / "model" / "config.json").exists()
    assert not (out / "arms" / "dpo" / "seed0" / "train" / "checkpoints").exists()
    dpo = json.loads((out / "arms" / "dpo" / "seed0" / "summary.json").read_text())
    assert dpo["trainer"] == trainer and dpo["steps"] == 6 and dpo["proxy"] == "rm"
    metrics = read_jsonl(out / "arms" / "dpo" / "seed0" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 6] and metrics[0]["eval/kl"] == 0.0
    assert (metrics[0]["eval/win"], metrics[0]["eval/tie"]) == (0.0, 1.0)  # step 0 is the SFT reference itself
    assert metrics[1]["eval/kl"] == dpo["final"]["kl"] and metrics[1]["eval/win"] == dpo["final"]["win"]
    shared = read_jsonl(out / "shared" / "eval_reference" / "eval_reference_eval.jsonl")
    mine = read_jsonl(out / "arms" / "dpo" / "seed0" / "eval_reference_eval.jsonl")
    assert [r["response"] for r in mine] == [r["response"] for r in shared] and all("proxy" in r for r in mine)
    grpo = run_config(out, "grpo-am")
    assert grpo["advantage"]["estimator"] == "grpo" and grpo["advantage"]["kl"] == "loss"
    ppo_rows = read_jsonl(out / "arms" / "grpo-am" / "seed0" / "metrics.jsonl")
    assert any("objective/kl" in r for r in ppo_rows) and not any("value/mean" in r for r in ppo_rows)  # no critic


def test_report_has_rows_and_curves_for_dpo_and_grpo(new_arms, capsys):
    from analysis.ablation_report import build_report, kl_at, load

    cfg, out = new_arms
    text = build_report(out).read_text()
    data = json.loads((out / "report.json").read_text())
    table2 = [line.split(" | ") for line in text.split("## Table 2")[1].split("##")[0].splitlines()
              if line.startswith("| ") and "---" not in line]
    assert [row[0] for row in table2[1:]] == ["| DPO", "| GRPO (AM)"]
    for row in table2[1:]:
        assert "n/a" not in row[2:10], row  # gold, win/lose/tie, KL, forgetting win, proxy, degenerate
    dpo = json.loads((out / "arms" / "dpo" / "seed0" / "summary.json").read_text())
    assert data["table2"]["dpo"]["kl"]["mean"] == pytest.approx(dpo["final"]["kl"])
    runs = load(out)["arms"]["dpo"]["seeds"][0]["metrics"]
    assert kl_at(runs, 0) == 0.0 and kl_at(runs, 6) == dpo["final"]["kl"]  # DPO's points on the KL axis
    for name in ("win_lose_tie", "gold_vs_kl", "proxy_vs_kl", "reward_curves", "forgetting"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 5000, name
    run(cfg)  # a second run: everything finished, nothing redone
    printed = capsys.readouterr().out
    assert "arms/dpo/seed0/train: finished, skipped" in printed and "arms/dpo/seed0: finished, skipped" in printed


def test_final_eval_alone_samples_its_own_reference_and_measures_kl(new_arms, tmp_path):
    from stable_rlhf import final_eval
    from stable_rlhf.models import load_policy

    cfg, out = new_arms
    ev = final_eval.FinalEvalConfig(run_dir=str(out / "arms" / "dpo" / "seed0" / "train"), out_dir=str(tmp_path),
                                    model=cfg.model, eval=cfg.eval)
    summary = final_eval.train(ev)
    assert summary["proxy"] is None and summary["final"]["proxy_score"] is None  # gold: no proxy
    assert (tmp_path / "eval_reference_eval.jsonl").exists() and summary["final"]["kl"] is not None
    # the KL estimate: zero for the SFT policy against itself, whatever the batching; none when greedy
    sft, tokenizer = load_policy(cfg.model, device="cpu")
    rows = json.loads("[" + ",".join((tmp_path / "samples" / "eval-step000006.jsonl").read_text().splitlines()) + "]")
    assert final_eval.answer_kl(sft, sft, tokenizer, rows, ev) == [0.0] * len(rows)
    trained, _ = load_policy(cfg.model.__class__(name_or_path=ev.run_dir + "/model"), device="cpu")
    one = final_eval.answer_kl(trained, sft, tokenizer, rows, dataclasses.replace(ev, kl_batch_size=1))
    assert final_eval.answer_kl(trained, sft, tokenizer, rows, ev) == pytest.approx(one, abs=1e-4)
    assert np.mean(one) == pytest.approx(summary["final"]["kl"], abs=1e-4)
    greedy = dataclasses.replace(ev, eval=dataclasses.replace(ev.eval, generation=dataclasses.replace(
        ev.eval.generation, temperature=0.0)))
    assert final_eval.answer_kl(trained, sft, tokenizer, rows, greedy) is None


def test_the_same_command_twice_gives_the_same_report(tmp_path):
    """Reproducibility: the same ablation command run twice from scratch, in two interpreters
    with different string-hash seeds, into two directories, writes identical report.json files
    and identical arm summaries, wall times aside."""
    import subprocess
    import sys

    reports, summaries = [], []
    for hash_seed, name in ((1, "first"), (2, "second")):
        out = tmp_path / name
        tiny_config(out)  # writes <out>.yaml
        proc = subprocess.run([sys.executable, "-m", "experiments.ablation", "--config", str(tmp_path / f"{name}.yaml"),
                               'run_arms=["sft", "am-ppo-sr", "rejection-sampling"]', "seeds=[0]"],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONHASHSEED": str(hash_seed), "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports.append((out / "report.json").read_text())
        summaries.append({str(p.relative_to(out)): {k: v for k, v in json.loads(p.read_text()).items()
                                                    if k != "seconds"}
                          for p in sorted(out.glob("arms/*/seed0/summary.json"))})
    json.loads(reports[0])  # strict JSON
    assert reports[0] == reports[1]
    assert summaries[0] == summaries[1] and len(summaries[0]) == 3


def test_the_report_shows_the_first_warnings_of_a_run_and_counts_the_rest():
    from analysis.ablation_report import warning_line

    assert warning_line("RM-PPO", "0", ["w1", "w2", "w3", "w4", "w5"]) == \
        "Warnings, RM-PPO seed 0 (5): w1; w2; w3; and 2 more (summary.json)."
    assert warning_line("AM-PPO", "1", ["only"]) == "Warnings, AM-PPO seed 1 (1): only."


def test_objective_null_is_the_reference_objective_ppo_starts_from(ablation):
    """experiments.objective_null scores the SFT arm's answers against the reference answers
    with an arm's score and shaping; its start is the arm's own step-0 eval/objective."""
    from experiments.objective_null import null_gain
    from stable_rlhf.policy_eval import same_sampling

    cfg, out = ablation
    arm_cfg = load_config(PPOConfig, str(out / "arms" / "rm-ppo-ptx" / "seed0" / "config.yaml"), [])
    assert same_sampling(arm_cfg.generation, arm_cfg.eval.generation)
    g = null_gain(out, "rm-ppo-ptx")
    step0 = next(r for r in read_jsonl(out / "arms" / "rm-ppo-ptx" / "seed0" / "metrics.jsonl") if "eval/objective" in r)
    assert step0["step"] == 0 and g["start"] == pytest.approx(step0["eval/objective"], abs=1e-5)
    sft = read_jsonl(out / "arms" / "sft" / "seed0" / "samples" / "eval-step000000.jsonl")
    ref = read_jsonl(out / "shared" / "eval_reference" / "eval_reference_eval.jsonl")
    assert (g["gain_se"] is not None and math.isfinite(g["gain_se"])) or \
        [r["response"] for r in sft] == [r["response"] for r in ref]
