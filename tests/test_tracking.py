"""Experiment tracking (--report-to), model cards and the hub push, on tiny models and offline.

TensorBoard event files are read back with tensorboard's EventAccumulator; wandb, mlflow and trackio (not
installed here) are stood in for by recording modules; the hub's API is monkeypatched, nothing reaches the network.
"""

from __future__ import annotations

import importlib.machinery
import json
import re
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import EXAMPLES, build_tiny, invoke, learnable_prefs, ok, one_error, write_jsonl

from rlhf_cli.core import tracking
from rlhf_cli.core.config import resolve
from rlhf_cli.core.manifest import MANIFEST, write_manifest
from rlhf_cli.core.models import DEFAULT_MODEL
from rlhf_cli.stages.sft.args import SFTArgs

FAST = ["--max-steps", "2", "--batch-size", "2", "--threads", "1"]


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the stage's TensorBoard folder (OUT/runs/*), as (step, value) lists."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted((out / "runs").iterdir())
    assert runs, f"no event folder in {out / 'runs'}"
    found: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        acc = EventAccumulator(str(run))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


def card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def python_block(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


class FakeHub:
    """HfApi's network methods, recorded; the hub is 'online' with a token."""

    def __init__(self, monkeypatch):
        import huggingface_hub
        from huggingface_hub import HfApi, constants

        self.calls: list[tuple[str, dict]] = []
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
        monkeypatch.setattr(HfApi, "whoami", lambda api, token=None, **kw: {"name": "me"})

        def create_repo(api, **kw):
            self.calls.append(("create_repo", kw))
            return SimpleNamespace(repo_id=kw["repo_id"])

        def upload_folder(api, **kw):
            folder = Path(kw["folder_path"])
            # what is on disk when the upload starts: the finished folder, manifest and card included
            kw["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            kw["card"] = (folder / "README.md").read_text(encoding="utf-8")
            self.calls.append(("upload_folder", kw))

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    def called(self, name: str) -> list[dict]:
        return [kw for n, kw in self.calls if n == name]


# ---------------------------------------------------------------------------------------------------------
# sft and reward: TensorBoard through the Trainer, the model card, --push-to-hub


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """sft (tensorboard, pushed to a fake hub) -> reward (tensorboard) in one run folder."""
    mp = pytest.MonkeyPatch()
    hub = FakeHub(mp)
    try:
        run = tmp_path_factory.mktemp("track") / "demo"
        sft = ok(invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_messages.jsonl", "--run", run,
                        "--max-length", 96, "--report-to", "tensorboard", "--push-to-hub", "me/tiny-sft", *FAST))
        prefs = write_jsonl(run.parent / "prefs.jsonl", learnable_prefs(8))
        reward = ok(invoke("reward", "--run", run, "--data", prefs, "--eval-data", prefs, "--report-to",
                           "tensorboard", *FAST))
    finally:
        mp.undo()
    return SimpleNamespace(run=run, sft=sft, reward=reward, hub=hub)


def test_sft_writes_tensorboard_events_into_the_stage_folder(trained):
    out = trained.run / "sft"
    tags = scalars(out)
    assert {"train/loss", "train/learning_rate", "train/grad_norm"} <= set(tags), sorted(tags)
    assert [step for step, _ in tags["train/loss"]] == [1, 2]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert [v for _, v in tags["train/loss"]] == pytest.approx(losses, rel=1e-5)
    assert not (out / "trainer").exists()  # the Trainer's checkpoints went; its event files moved up


def test_reward_writes_tensorboard_events(trained):
    tags = scalars(trained.run / "reward")
    assert {"train/loss", "train/learning_rate"} <= set(tags), sorted(tags)
    assert [step for step, _ in tags["train/loss"]] == [1, 2]


def test_sft_model_card_parses_and_loads(trained):
    out = trained.run / "sft"
    c = card(out)
    assert c.data.library_name == "transformers"
    assert c.data.tags == ["rlhf-cli", "sft", "trl"]
    assert c.data.pipeline_tag == "text-generation"
    # started from a local folder: no hub base model, no datasets (the data is a local file, described instead)
    assert c.data.base_model is None and c.data.datasets is None
    assert "base model is a local folder" in c.text and "sft_messages.jsonl" in c.text
    assert "| train_loss |" in c.text and "| steps | 2 |" in c.text


def test_reward_model_card_parses_and_its_example_runs(trained, capsys):
    out = trained.run / "reward"
    c = card(out)
    assert c.data.tags == ["rlhf-cli", "reward-model", "trl"]
    assert c.data.pipeline_tag == "text-classification"
    assert str(trained.run / "sft") in c.text  # its parent
    assert "held-out pairwise accuracy went from" in c.text
    # the manifest stays the last file written (the card just before it)
    assert (out / MANIFEST).stat().st_mtime_ns >= (out / "README.md").stat().st_mtime_ns
    assert 'from_pretrained("' + str(out) + '"' in c.text  # not pushed: the example loads the folder
    code = python_block(c.text)
    assert "AutoModelForSequenceClassification" in code and "num_labels=1" in code
    exec(compile(code, "card", "exec"), {})  # the card's own example loads the folder and prints a score
    float(capsys.readouterr().out.strip().splitlines()[-1])


def test_sft_pushed_to_the_hub_after_finishing(trained):
    (create,), (upload,) = trained.hub.called("create_repo"), trained.hub.called("upload_folder")
    assert create["repo_id"] == "me/tiny-sft" and create["exist_ok"] is True and create["private"] is False
    assert upload["repo_id"] == "me/tiny-sft" and Path(upload["folder_path"]) == trained.run / "sft"
    assert {MANIFEST, "README.md", "model.safetensors", "config.json"} <= set(upload["files"])
    assert 'from_pretrained("me/tiny-sft")' in upload["card"]
    assert "pushed to https://huggingface.co/me/tiny-sft" in trained.sft.stderr


# ---------------------------------------------------------------------------------------------------------
# ppo (our own loop, through Tracker) and grpo (TRL, through its config)


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    from test_ppo import PLAIN_TEMPLATE, build_rm, stage

    root = tmp_path_factory.mktemp("track_ppo")
    policy = stage(build_tiny(root / "run" / "sft"), "sft", max_length=128)
    return SimpleNamespace(root=root, run=root / "run", policy=policy,
                           rm=build_rm(root / "run" / "reward", policy),
                           rm_plain=build_rm(root / "rm_plain", policy, template=PLAIN_TEMPLATE),
                           prompts=write_jsonl(root / "prompts.jsonl",
                                               [{"prompt": f"Tell me about topic {i}."} for i in range(8)]))


def test_ppo_logs_its_update_figures_to_tensorboard(ppo_run):
    out = ppo_run.root / "ppo"
    ok(invoke("ppo", "--run", ppo_run.run, "--prompts", ppo_run.prompts, "--out", out, "--max-steps", 2,
              "--batch-size", 4, "--max-new-tokens", 4, "--sample-every", 0, "--threads", 1,
              "--report-to", "tensorboard"))
    tags = scalars(out)
    wanted = {"train/score_mean", "train/score_std", "train/kl", "train/kl_coef", "train/entropy", "train/clipfrac",
              "train/approx_kl", "train/value_loss", "train/policy_loss", "train/response_length",
              "train/episodes_per_second", "train/lr"}
    assert wanted <= set(tags), sorted(wanted - set(tags))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for name in ("score_mean", "kl", "entropy", "value_loss"):
        assert tags[f"train/{name}"] == [(r["step"], pytest.approx(r[name], rel=1e-5, abs=1e-6)) for r in rows]
    c = card(out)
    assert c.data.tags == ["rlhf-cli", "ppo", "trl"] and "AutoModelForCausalLM" in c.text
    assert "mean reward-model score of its answers went from" in c.text


def test_grpo_reports_through_trl(ppo_run):
    out = ppo_run.root / "grpo"
    ok(invoke("ppo", "--algo", "grpo", "--policy", ppo_run.policy, "--reward", ppo_run.rm_plain, "--prompts",
              ppo_run.prompts, "--out", out, "--max-steps", 2, "--batch-size", 4, "--group-size", 2,
              "--max-new-tokens", 4, "--sample-every", 0, "--threads", 1, "--report-to", "tensorboard"))
    tags = scalars(out)
    assert {"train/reward", "train/kl", "train/loss"} <= set(tags), sorted(tags)
    assert not (out / "trainer").exists()
    assert card(out).data.tags == ["rlhf-cli", "ppo", "grpo", "trl"]


# ---------------------------------------------------------------------------------------------------------
# --report-to: bad names, missing packages, YAML lists, the other integrations' APIs


def test_unknown_integration_is_refused_with_the_choices(tiny, tmp_path):
    out = tmp_path / "sft"
    result = invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_messages.jsonl", "--out", out,
                    "--report-to", "tensorboard,nosuch", *FAST)
    one_error(result, 2, "--report-to nosuch", "none, tensorboard, wandb, trackio, mlflow")
    assert not out.exists() and not out.with_name("sft.partial").exists()


def test_ppo_refuses_an_unknown_integration_before_loading(tmp_path):
    result = invoke("ppo", "--policy", tmp_path / "nothing", "--prompts", tmp_path / "none.jsonl", "--out",
                    tmp_path / "ppo", "--report-to", "nosuch")
    one_error(result, 2, "--report-to nosuch", "expected one of: none, tensorboard, wandb, trackio, mlflow")


def test_missing_integration_names_the_extra(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(tracking.INTEGRATIONS, "wandb", "rlhf_cli_no_such_module")
    out = tmp_path / "sft"
    result = invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_messages.jsonl", "--out", out,
                    "--report-to", "wandb", *FAST)
    one_error(result, 2, "--report-to wandb", 'pip install "rlhf-cli[wandb]"')
    assert not out.exists()


def test_report_to_parsing(tmp_path):
    assert tracking.parse_report_to("none") == [] and tracking.hf_report_to(None) == "none"
    assert tracking.parse_report_to("tensorboard, mlflow,tensorboard") == ["tensorboard", "mlflow"]
    with pytest.raises(Exception, match="cannot be combined"):
        tracking.parse_report_to("none,tensorboard")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("report_to: [tensorboard, mlflow]\n")
    args = resolve(SFTArgs, cfg)
    assert args.report_to == "tensorboard,mlflow"
    assert tracking.hf_report_to(args.report_to) == ["tensorboard", "mlflow"]
    assert SFTArgs().report_to == "none"


def _recording_module(name: str, calls: list) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def record(fn):
        return lambda *a, **kw: calls.append((name, fn, a, kw))

    for fn in ("init", "log", "finish", "start_run", "log_params", "log_metrics", "end_run"):
        setattr(mod, fn, record(fn))
    return mod


def test_tracker_uses_each_library_api(tmp_path, monkeypatch):
    calls: list = []
    for name in ("wandb", "mlflow", "trackio"):
        monkeypatch.setitem(sys.modules, name, _recording_module(name, calls))
    with tracking.Tracker("wandb,mlflow,trackio", tmp_path / "demo" / "ppo.partial", {"lr": 1e-3}) as t:
        t.log(1, {"score_mean": 0.5, "kl": 0.1, "early_stopped": True, "note": "text"})
    by = [(lib, fn) for lib, fn, _, _ in calls]
    assert by == [("wandb", "init"), ("mlflow", "start_run"), ("mlflow", "log_params"), ("trackio", "init"),
                  ("wandb", "log"), ("mlflow", "log_metrics"), ("trackio", "log"),
                  ("wandb", "finish"), ("mlflow", "end_run"), ("trackio", "finish")]
    logged = {lib: (a, kw) for lib, fn, a, kw in calls if fn in ("log", "log_metrics")}
    assert logged["wandb"] == (({"train/score_mean": 0.5, "train/kl": 0.1},), {"step": 1})
    assert logged["mlflow"] == logged["trackio"] == logged["wandb"]
    assert calls[0][3]["name"] == "demo/ppo" and calls[0][3]["config"] == {"lr": 1e-3}


# ---------------------------------------------------------------------------------------------------------
# model cards from manifests alone: base model through the parents, license, hub datasets


def test_card_follows_parents_to_the_hub_base_model_and_its_license(tmp_path):
    sft = tmp_path / "run" / "sft"
    sft.mkdir(parents=True)
    write_manifest(sft, stage="sft", parents=[DEFAULT_MODEL], args={"model": DEFAULT_MODEL, "data":
                   "HuggingFaceH4/no_robots:train", "lr": 2e-5}, data={}, metrics={"train_loss": 1.5},
                   started=time.time())
    rm = tmp_path / "run" / "reward"
    rm.mkdir()
    write_manifest(rm, stage="reward", parents=[str(sft)], args={"model": str(sft), "data": str(tmp_path / "p.jsonl"),
                   "eval_data": "Anthropic/hh-rlhf"}, data={}, metrics={"eval_accuracy": 0.75},
                   started=time.time())
    s, r = card(sft).data, card(rm).data
    assert s.base_model == DEFAULT_MODEL and s.license == "apache-2.0" and s.datasets == ["HuggingFaceH4/no_robots"]
    assert r.base_model == DEFAULT_MODEL and r.license == "apache-2.0" and r.datasets == ["Anthropic/hh-rlhf"]
    assert r.tags == ["rlhf-cli", "reward-model", "trl"]
    assert "num_labels=1" in card(rm).text


def test_card_of_an_unknown_license_omits_it(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    write_manifest(d, stage="sft", parents=["someone/unknown-model"], args={}, data={}, metrics={},
                   started=time.time())
    data = card(d).data
    assert data.base_model == "someone/unknown-model" and data.license is None


# ---------------------------------------------------------------------------------------------------------
# the hub: checked before training, `rlhf push`


def test_push_to_hub_offline_fails_before_training(tiny, tmp_path):
    out = tmp_path / "sft"
    result = invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_messages.jsonl", "--out", out,
                    "--push-to-hub", "me/x", *FAST)
    one_error(result, 1, "--push-to-hub me/x", "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE", "hf auth login",
              "HF_TOKEN", "rlhf push DIR me/x")
    assert not out.exists() and not out.with_name("sft.partial").exists()


def test_push_to_hub_without_a_token_fails_before_training(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    result = invoke("ppo", "--policy", tmp_path / "p", "--reward", tmp_path / "r", "--prompts", tmp_path / "x.jsonl",
                    "--out", tmp_path / "ppo", "--push-to-hub", "me/x")
    one_error(result, 1, "--push-to-hub me/x: no Hugging Face token", "hf auth login", "rlhf push DIR me/x")
    assert not (tmp_path / "ppo").exists()


def test_push_to_hub_refuses_a_bad_repo_id(tiny, tmp_path):
    result = invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_messages.jsonl", "--out", tmp_path / "o",
                    "--push-to-hub", "me/x/y", *FAST)
    one_error(result, 2, "--push-to-hub me/x/y: not a hub repo id", "USER/NAME")


def finished(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    write_manifest(folder, stage="sft", parents=[DEFAULT_MODEL], args={}, data={}, metrics={}, started=time.time())
    return folder


def test_push_a_finished_folder_offline_says_how_to_fix(tmp_path):
    folder = finished(tmp_path / "sft")
    one_error(invoke("push", folder, "me/x"), 1, "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE", "hf auth login",
              f"rlhf push {folder} me/x")


def test_push_an_unfinished_folder_names_the_missing_manifest(tmp_path):
    folder = tmp_path / "sft.partial"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    one_error(invoke("push", folder, "me/x"), 1, f"{folder}: no {MANIFEST}", "not a finished stage")
    one_error(invoke("push", tmp_path / "nothing", "me/x"), 1, "no such folder")


def test_push_uploads_the_folder_with_a_card_for_the_repo(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    folder = finished(tmp_path / "sft")
    result = ok(invoke("push", folder, "me/x", "--private"))
    (create,), (upload,) = hub.called("create_repo"), hub.called("upload_folder")
    assert create == {"repo_id": "me/x", "private": True, "exist_ok": True, "repo_type": "model"}
    assert upload["repo_id"] == "me/x" and Path(upload["folder_path"]) == folder
    assert 'from_pretrained("me/x")' in upload["card"] and MANIFEST in upload["files"]
    assert "pushed" in result.stdout and "https://huggingface.co/me/x" in result.stdout
