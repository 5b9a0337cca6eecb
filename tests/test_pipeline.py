"""`rlhf pipeline`: one recipe runs every stage, skips what is done, reruns what changed, resumes after a crash,
loops over rounds (auto-labelled or by people), and refuses a bad recipe before anything runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import EXAMPLES, ROOT, invoke, token_rm

from rlhf_cli.core.manifest import read_manifest

TINY = {"max_steps": 2, "batch_size": 2, "threads": 1}


def write_recipe(path: Path, tiny: Path, run: Path, **sections) -> Path:
    body = {
        "run": str(run), "model": str(tiny),
        "sft": {"data": str(EXAMPLES / "sft_messages.jsonl"), "max_length": 96, **TINY},
        "reward": {"data": str(EXAMPLES / "prefs_ranked.jsonl"), **TINY},
        "stage3": {"algo": "ppo", "prompts": str(EXAMPLES / "prompts.jsonl"), "max_new_tokens": 8, **TINY},
        "eval": {"max_samples": 2, "max_new_tokens": 8, "threads": 1, "prefs": str(EXAMPLES / "prefs_explicit.jsonl")},
    }
    for name, value in sections.items():
        if value is None:
            body.pop(name, None)
        elif isinstance(value, dict) and isinstance(body.get(name), dict):
            body[name] = {k: v for k, v in (body[name] | value).items() if v is not None}
        else:
            body[name] = value
    path.write_text(f"# rlhf pipeline {path}\n" + yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


def statuses(run: Path) -> dict[str, str]:
    """`round:stage` -> ran / resumed / skipped, from the last call's RUN/pipeline.json."""
    body = json.loads((run / "pipeline.json").read_text(encoding="utf-8"))
    return {f"{s['round']}:{s['stage']}": s["status"] for s in body["stages"]}


def pipeline(*args, code: int = 0):
    result = invoke("pipeline", *args)
    assert result.exit_code == code, (result.exit_code, result.stdout[-3000:], result.stderr[-3000:],
                                      result.exception)
    return result


def test_run_skip_change_and_from(tiny, tmp_path):
    run = tmp_path / "run"
    judge = token_rm(tmp_path / "judge", tiny, lambda tok: tok.eos_token_id)  # another RM that judges the policies
    recipe = write_recipe(tmp_path / "r.yaml", tiny, run, eval={"judges": [str(judge)]})
    first = pipeline(recipe)
    for stage in ("sft", "reward", "ppo"):
        assert read_manifest(run / stage).stage == stage
    assert read_manifest(run / "ppo").data["parents"] == [str(run / "sft"), str(run / "reward")]
    ev = json.loads((run / "eval.json").read_text())["results"]
    assert ev["prompts"] == 2 and 0 <= ev["win_rate_vs_sft"] <= 1 and 0 <= ev["rm_accuracy"] <= 1
    assert (run / "ppo" / "eval_policy.json").is_file() and (run / "report.html").is_file()
    assert list(ev["win_rate_vs_sft_by_judge"]) == [str(run / "reward"), str(judge)]
    judged = json.loads((run / "ppo" / "eval_policy.json").read_text())["judges"]
    assert [j["training_rm"] for j in judged] == [True, False]
    rm_eval = json.loads((run / "reward" / "eval_reward.json").read_text())  # eval reward on `prefs`
    assert ev["rm_length_pearson"] == rm_eval["length_pearson"]
    assert sum(b["pairs"] for b in rm_eval["by_margin"]) == rm_eval["pairs"]
    page = (run / "report.html").read_text()
    assert "length_pearson" in page and "margin bucket 1" in page and f"judge {judge}" in page
    assert statuses(run) == {"1:sft": "ran", "1:reward": "ran", "1:ppo": "ran", "1:eval": "ran", "0:report": "ran"}
    assert "talk to the result: rlhf chat" in first.stdout

    pipeline(recipe)
    assert set(statuses(run).values()) == {"skipped"}

    ppo_started = read_manifest(run / "ppo").data["started"]
    sft_started = read_manifest(run / "sft").data["started"]
    write_recipe(recipe, tiny, run, stage3={"kl_coef": 0.2})
    changed = pipeline(recipe)
    assert statuses(run) == {"1:sft": "skipped", "1:reward": "skipped", "1:ppo": "ran", "1:eval": "ran",
                             "0:report": "ran"}
    assert "setting kl_coef changed: 0.05 -> 0.2" in changed.stderr
    assert read_manifest(run / "ppo").args["kl_coef"] == 0.2
    assert read_manifest(run / "ppo").data["started"] >= ppo_started

    pipeline(recipe, "--from", "reward")
    assert statuses(run) == {"1:sft": "skipped", "1:reward": "ran", "1:ppo": "ran", "1:eval": "ran",
                             "0:report": "ran"}
    assert read_manifest(run / "sft").data["started"] == sft_started


def test_crash_in_reward_then_rerun_skips_sft(tiny, tmp_path, monkeypatch):
    import rlhf_cli.stages.reward.train as reward_train

    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny, run)

    def crash(args, reporter=None):
        Path(args.out + ".partial").mkdir(parents=True)
        raise RuntimeError("power cut")

    with monkeypatch.context() as m:
        m.setattr(reward_train, "run_reward", crash)
        result = pipeline(recipe, code=1)
    assert "power cut" in result.stderr
    assert read_manifest(run / "sft") is not None and not (run / "reward").exists()
    sft_started = read_manifest(run / "sft").data["started"]
    out = pipeline(recipe)
    assert statuses(run)["1:sft"] == "skipped" and statuses(run)["1:reward"] == "ran"
    assert "reward: running into" in out.stderr and "(unfinished)" in out.stderr
    assert read_manifest(run / "sft").data["started"] == sft_started
    assert read_manifest(run / "ppo") is not None


def test_stage3_stopped_partway_resumes(tiny, tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny, run, stage3={"stop_after": 1})
    paused = pipeline(recipe, code=3)
    assert "paused:" in paused.stderr and (run / "ppo.partial" / "state" / "state.json").is_file()
    assert not (run / "ppo").exists()
    write_recipe(recipe, tiny, run)  # stop_after does not change the result: the same stage, resumed
    pipeline(recipe)
    s = statuses(run)
    assert s["1:sft"] == "skipped" and s["1:reward"] == "skipped" and s["1:ppo"] == "resumed"
    assert read_manifest(run / "ppo").metrics["updates"] == 2


def test_sigkill_midway_then_rerun_completes(tiny, tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny, run)
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_cli", "pipeline", str(recipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "sft" / "rlhf_manifest.json").is_file():
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_manifest(run / "sft") is not None, "the pipeline ended before sft finished"
    pipeline(recipe)
    s = statuses(run)
    assert s["1:sft"] == "skipped"
    assert read_manifest(run / "ppo") is not None and (run / "eval.json").is_file()


ROUNDS = {"rounds": 2, "generate": {"num_samples": 2, "max_new_tokens": 8, "batch_size": 4, "threads": 1}}


def test_two_auto_labelled_rounds_chain(tiny, tmp_path):
    run = tmp_path / "run"
    prompts = tmp_path / "more_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name a colour, number {i}."}) + "\n" for i in range(6)))
    recipe = write_recipe(tmp_path / "r.yaml", tiny, run, **ROUNDS, rounds_prompts=str(prompts),
                          auto_label=str(run / "reward"), reward_init="previous")
    out = pipeline(recipe)
    r2 = run / "round2"
    rankings = [json.loads(x) for x in (r2 / "rankings.jsonl").read_text().splitlines()]
    assert len(rankings) == 6 and all(r["annotator"] == f"auto:{run / 'reward'}" for r in rankings)
    assert all(r["scores"] == sorted(r["scores"], reverse=True) and len(r["responses"]) == 2 for r in rankings)
    rm2 = read_manifest(r2 / "reward")
    assert rm2.args["data"] == str(r2 / "prefs.jsonl")
    assert rm2.data["parents"] == [str(run / "reward")]  # reward_init: previous
    sources = {json.loads(x)["source"] for x in (r2 / "prefs.jsonl").read_text().splitlines()}
    assert sources == {str(EXAMPLES / "prefs_ranked.jsonl"), str(r2 / "rankings.jsonl")}
    assert rm2.data["data"]["train"]["source"] == str(r2 / "prefs.jsonl")
    ppo2 = read_manifest(r2 / "ppo")
    assert ppo2.data["parents"] == [str(run / "ppo"), str(r2 / "reward")]
    assert read_manifest(run / "ppo").data["parents"] == [str(run / "sft"), str(run / "reward")]
    assert (run / "report.html").is_file() and (r2 / "report.html").is_file()
    ev2 = json.loads((r2 / "eval.json").read_text())["results"]
    assert ev2["round"] == 2 and "win_rate_vs_previous" in ev2 and "rm_accuracy" in ev2
    round_rows = [x for x in out.stdout.splitlines() if x.startswith(("│ 1 ", "│ 2 "))]  # the rounds table
    assert len(round_rows) == 2 and "held-out RM" in out.stdout
    pipeline(recipe)
    assert set(statuses(run).values()) == {"skipped"}


def test_human_labels_stop_then_continue(tiny, tmp_path):
    run = tmp_path / "run"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say hi {i}."}) + "\n" for i in range(3)))
    recipe = write_recipe(tmp_path / "r.yaml", tiny, run, **ROUNDS, rounds_prompts=[str(prompts)])
    r2 = run / "round2"
    stopped = pipeline(recipe, code=3)
    msg = " ".join(stopped.stderr.split())
    assert f"rlhf label {r2 / 'samples.jsonl'} --out {r2 / 'rankings.jsonl'}" in msg
    assert "3 of 3 sampled prompts" in msg and not (r2 / "reward").exists()

    samples = [json.loads(x) for x in (r2 / "samples.jsonl").read_text().splitlines()]
    ranked = [{"prompt": s["prompt"], "responses": s["responses"][::-1]} for s in samples]
    (r2 / "rankings.jsonl").write_text(json.dumps(ranked[0]) + "\n")  # one of three: still waiting
    assert "2 of 3 sampled prompts" in " ".join(pipeline(recipe, code=3).stderr.split())

    (r2 / "rankings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ranked))
    pipeline(recipe)
    s = statuses(run)
    assert s["1:sft"] == "skipped" and s["2:samples"] == "skipped" and s["2:rankings"] == "skipped"
    assert s["2:reward"] == "ran" and s["2:ppo"] == "ran"
    assert read_manifest(r2 / "ppo").data["parents"] == [str(run / "ppo"), str(r2 / "reward")]
    assert read_manifest(r2 / "reward").data["parents"] == [str(run / "sft")]  # reward_init: sft (default)


@pytest.mark.parametrize("change, where, words", [
    ({"sft": {"lrr": 1e-5}}, "sft: unknown key 'lrr'", "did you mean 'lr'?"),
    ({"stage3": {"algo": "ppx"}}, "stage3: key 'algo'", "'ppx' is not one of: ppo, grpo, rloo, best-of-n, dpo"),
    ({"reward": {"data": "nope/prefs.jsonl"}}, "reward: key 'data'", "nope/prefs.jsonl: no such file"),
    ({"stage3": {"batch_size": 3, "num_minibatches": 2}}, "stage3: key 'num_minibatches'", "must divide"),
    ({"sft": {"out": "x"}}, "sft: key 'out'", "set by the pipeline"),
    ({"rouns": 2}, "unknown key 'rouns'", "did you mean 'rounds'?"),
    ({"eval": {"judges": ["./nope/rm"]}}, "eval: key 'judges'", "./nope/rm: no such file"),
    ({"eval": {"judges": [1]}}, "eval: key 'judges'", "expected a list of reward model folders"),
])
def test_bad_recipe_one_error_nothing_run(tiny, tmp_path, change, where, words):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "bad.yaml", tiny, run, **change)
    result = pipeline(recipe, code=2)
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    text = " ".join(result.stderr.split())
    assert lines[0].startswith("error: ") and f"{recipe}:" in text
    assert where in text and words in text, text
    assert not run.exists()


def test_bad_recipe_names_the_line(tiny, tmp_path):
    recipe = write_recipe(tmp_path / "bad.yaml", tiny, tmp_path / "run", sft={"lr": 5})
    line = next(i for i, x in enumerate(recipe.read_text().splitlines(), 1) if x.strip().startswith("lr:"))
    text = " ".join(pipeline(recipe, code=2).stderr.split())
    assert f"{recipe}:{line}: sft: key 'lr': 5.0: expected" in text


def test_algo_not_in_this_version(tiny, tmp_path, monkeypatch):
    from rlhf_cli.pipeline import recipe as recipe_mod

    monkeypatch.setitem(recipe_mod.ALGOS, "dpo", recipe_mod.Algo(
        "dpo", "rlhf_cli.stages.no_such_dpo.args:DPOArgs", "rlhf_cli.stages.no_such_dpo.train:run_dpo", "model",
        None, "data"))
    recipe = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run", stage3={"algo": "dpo"})
    text = " ".join(pipeline(recipe, code=2).stderr.split())
    assert "stage3: key 'algo': algo dpo is not available in this version" in text


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples" / "recipes").glob("*.yaml")))
def test_shipped_recipes_validate(name, monkeypatch):
    from rlhf_cli.pipeline.recipe import load_recipe

    monkeypatch.chdir(ROOT)  # their paths are relative to the repository, as `make demo` runs them
    path = Path("examples/recipes") / name
    first = path.read_text().splitlines()[0]
    assert first == f"# rlhf pipeline {path}"
    r = load_recipe(path)
    assert r.algo.stage in ("ppo", "dpo", "best-of-n")


def test_shipped_recipe_names():
    assert {p.name for p in (ROOT / "examples" / "recipes").glob("*.yaml")} >= {
        "demo.yaml", "two_rounds_cpu.yaml", "gpu_0.5b.yaml"}


def test_recipe_check_loads_no_torch():
    """Checking a recipe (and `rlhf pipeline --help`) loads no heavy library: stages are imported when they run."""
    code = ("import sys; from rlhf_cli.pipeline.recipe import load_recipe; load_recipe('examples/recipes/demo.yaml');"
            " import rlhf_cli.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', "
            "'trl', 'matplotlib'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_sft_model_in_its_section_must_match_the_top(tiny, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run", sft={"model": "other/model"})
    text = " ".join(pipeline(recipe, code=2).stderr.split())
    assert "sft: key 'model': other/model differs from the recipe's top-level" in text


def test_from_names_this_recipes_stage3(tiny, tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny, run)
    text = " ".join(pipeline(recipe, "--from", "dpo", code=2).stderr.split())
    assert "--from dpo: this recipe's stage 3 is ppo (algo ppo)" in text and not (run / "sft").exists()


@pytest.mark.parametrize("stage3,folder", [
    ({"algo": "dpo", "data": str(EXAMPLES / "prefs_explicit.jsonl"), "prompts": None, "max_new_tokens": None},
     "dpo"),
    ({"algo": "best-of-n", "k": 2, "sample_batch_size": 4, "max_samples": 4}, "best-of-n"),
])
def test_dpo_and_best_of_n_as_stage_3(tiny, tmp_path, stage3, folder):
    """The other stage-3 choices run through the same dispatch table, chain to sft (and reward), are judged by the
    eval step, and a second call skips them."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny, run, stage3=stage3,
                          eval={"prompts": str(EXAMPLES / "prompts.jsonl")})
    pipeline(recipe)
    m = read_manifest(run / folder)
    assert m.stage == folder and m.data["parents"][0] == str(run / "sft")
    if folder == "best-of-n":
        assert m.data["parents"][1] == str(run / "reward")
    assert (run / folder / "eval_policy.json").is_file()
    assert statuses(run)[f"1:{folder}"] == "ran"
    pipeline(recipe)
    assert statuses(run)[f"1:{folder}"] == "skipped"
