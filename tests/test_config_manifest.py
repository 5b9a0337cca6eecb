"""rlhf_cli.core.config (defaults < YAML < flags) and rlhf_cli.core.manifest (finished-stage proof, staged output)."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from rlhf_cli.core.config import dump_yaml, resolve, to_dict
from rlhf_cli.core.errors import CheckpointError, ConfigError
from rlhf_cli.core.manifest import (
    MANIFEST,
    StagedOutput,
    read_manifest,
    require_stage,
    stage_dir,
    write_manifest,
)
from rlhf_cli.core.stages import a_stage, command_for
from rlhf_cli.stages.reward.args import RewardArgs
from rlhf_cli.stages.sft.args import SFTArgs

# ---------------------------------------------------------------------------------------------------------
# config.resolve


def write_yaml(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_when_nothing_given():
    args = resolve(SFTArgs)
    assert args == SFTArgs()
    assert (args.batch_size, args.lr, args.epochs, args.lora, args.format) == (8, None, 1.0, False, "auto")


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", "batch_size: 4\nlr: 1.0e-4\nmax-steps: 7\nlora: true\nseed: 3\n")
    args = resolve(SFTArgs, cfg, {"batch_size": 2, "lr": None, "max_steps": None, "lora": None, "epochs": 2.0})
    assert args.batch_size == 2  # flag beats YAML
    assert args.lr == 1e-4 and args.max_steps == 7 and args.lora is True and args.seed == 3  # YAML beats default
    assert args.epochs == 2.0  # flag beats default
    assert args.grad_accum == 1  # neither: default


def test_flag_false_overrides_yaml_true(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", "lora: true\nassistant_only_loss: false\n")
    args = resolve(SFTArgs, cfg, {"lora": False, "assistant_only_loss": None})
    assert args.lora is False and args.assistant_only_loss is False


def test_flags_as_strings_are_coerced():
    args = resolve(SFTArgs, None, {"batch_size": "4", "lr": "3e-4", "lora": "yes"})
    assert (args.batch_size, args.lr, args.lora) == (4, 3e-4, True)


def test_empty_yaml_is_defaults(tmp_path):
    assert resolve(SFTArgs, write_yaml(tmp_path / "e.yaml", "# nothing\n")) == SFTArgs()


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", "batch_size: 4\nlearning_rate: 1e-4\n")
    with pytest.raises(ConfigError) as e:
        resolve(SFTArgs, cfg)
    msg = str(e.value)
    assert msg.startswith(f"{cfg}: unknown key 'learning_rate'; expected one of: ")
    assert "lr" in msg.split("expected one of: ")[1].split(", ")
    assert e.value.exit_code == 2


@pytest.mark.parametrize("text,expected", [
    ("batch_size: many\n", "key 'batch_size': expected an integer, found 'many'"),
    ("batch_size: 2.5\n", "key 'batch_size': expected an integer, found 2.5"),
    ("batch_size: true\n", "key 'batch_size': expected an integer, found True"),
    ("lr: fast\n", "key 'lr': expected a number, found 'fast'"),
    ("lora: maybe\n", "key 'lora': expected true or false, found 'maybe'"),
    ("data: [a, b]\n", "key 'data': expected a string, found ['a', 'b']"),
])
def test_bad_yaml_type(tmp_path, text, expected):
    cfg = write_yaml(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as e:
        resolve(SFTArgs, cfg)
    assert str(e.value) == f"{cfg}: {expected}"


def test_bad_flag_type_names_flag():
    with pytest.raises(ConfigError, match=r"^--max-steps: expected an integer, found 'ten'$"):
        resolve(SFTArgs, None, {"max_steps": "ten"})


def test_choices_checked_from_yaml_and_flags(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", "lr_scheduler: wobbly\n")
    with pytest.raises(ConfigError) as e:
        resolve(SFTArgs, cfg)
    assert str(e.value) == "--lr-scheduler: 'wobbly' is not one of: linear, cosine, constant, constant_with_warmup"
    with pytest.raises(ConfigError, match=r"--format: 'ranked' is not one of: auto, messages"):
        resolve(SFTArgs, None, {"format": "ranked"})
    assert resolve(RewardArgs, None, {"format": "ranked"}).format == "ranked"


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        resolve(SFTArgs, tmp_path / "missing.yaml")
    bad = write_yaml(tmp_path / "bad.yaml", "batch_size: 4\nlr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: not valid YAML"):
        resolve(SFTArgs, bad)
    lst = write_yaml(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of setting: value, found list"):
        resolve(SFTArgs, lst)


def test_dumped_yaml_resolves_to_the_same_args(tmp_path):
    args = resolve(SFTArgs, None, {"data": "d.jsonl", "out": "o", "lr": 1e-4, "lora": True, "max_steps": 5})
    dump_yaml(args, tmp_path / "saved.yaml", header="# rlhf sft --config saved.yaml\n")
    text = (tmp_path / "saved.yaml").read_text()
    assert text.startswith("# rlhf sft --config saved.yaml\n")
    assert yaml.safe_load(text) == to_dict(args)
    assert resolve(SFTArgs, tmp_path / "saved.yaml") == args


# ---------------------------------------------------------------------------------------------------------
# manifest


def make_stage(folder, stage="sft", **kw):
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, stage=stage, parents=kw.get("parents", ["base"]), args=kw.get("args", {"lr": 1e-4}),
                   data=kw.get("data", {"train": {"kept": 3}}), metrics=kw.get("metrics", {"train_loss": 1.5}),
                   started=time.time() - 2)
    return folder


def test_write_and_read_manifest(tmp_path):
    folder = make_stage(tmp_path / "s", "sft", args={"max_length": 64, "note": "中文"}, metrics={"steps": 3})
    raw = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    assert raw["stage"] == "sft" and raw["format"] == 1 and raw["parents"] == ["base"]
    assert raw["args"] == {"max_length": 64, "note": "中文"} and raw["metrics"] == {"steps": 3}
    assert raw["seconds"] >= 2 and raw["started"] < raw["finished"]
    assert {"python", "torch", "transformers", "trl"} <= set(raw["versions"])
    assert not (folder / (MANIFEST + ".tmp")).exists()
    m = read_manifest(folder)
    assert (m.stage, m.args["max_length"], m.metrics["steps"], m.path) == ("sft", 64, 3, folder)
    assert read_manifest(tmp_path) is None


def test_unreadable_manifest(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        read_manifest(tmp_path)


def test_require_stage_accepts_the_right_stage(tmp_path):
    folder = make_stage(tmp_path / "rm", "reward")
    assert require_stage(folder, "reward", "--model").stage == "reward"


def test_require_stage_missing_folder(tmp_path):
    with pytest.raises(CheckpointError) as e:
        require_stage(tmp_path / "nope", "sft", "--run")
    assert str(e.value) == (f"--run {tmp_path / 'nope'}: no such folder; expected a finished sft stage, made by "
                            f"`{command_for('sft')}`")


def test_require_stage_folder_without_manifest(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        require_stage(tmp_path / "half", "reward", "--model")
    msg = str(e.value)
    assert f"--model {tmp_path / 'half'}: no {MANIFEST}, so not a finished stage" in msg
    assert "expected a reward stage" in msg and "rlhf reward --model SFT_DIR --data PREFS --out DIR" in msg


@pytest.mark.parametrize("found,expected", [("reward", "sft"), ("sft", "reward")])
def test_require_stage_wrong_stage_names_expected_stage_and_command(tmp_path, found, expected):
    folder = make_stage(tmp_path / "x", found)
    with pytest.raises(CheckpointError) as e:
        require_stage(folder, expected, "--model")
    assert str(e.value) == (f"--model {folder}: is {a_stage(found)}, expected {a_stage(expected)}, made by "
                            f"`{command_for(expected)}`")
    assert e.value.exit_code == 1


def test_a_stage_article():
    assert (a_stage("sft"), a_stage("reward"), a_stage("ppo")) == ("an sft stage", "a reward stage", "a ppo stage")


def test_stage_dir():
    assert str(stage_dir("x/out", "r", "sft")) == "x/out"
    assert str(stage_dir(None, "r", "reward")) == "r/reward"
    assert stage_dir(None, None, "sft") is None


# ---------------------------------------------------------------------------------------------------------
# StagedOutput


def test_staged_output_fresh_folder(tmp_path):
    out = tmp_path / "deep" / "sft"
    with StagedOutput(out, overwrite=False) as dest:
        assert dest == tmp_path / "deep" / "sft.partial" and dest.is_dir()
        (dest / "weights.bin").write_text("new")
        assert not out.exists()  # nothing at OUT until complete
    assert (out / "weights.bin").read_text() == "new"
    assert not (tmp_path / "deep" / "sft.partial").exists()


def test_staged_output_refuses_a_finished_stage_without_overwrite(tmp_path):
    out = make_stage(tmp_path / "sft", "sft")
    with pytest.raises(ConfigError) as e:
        StagedOutput(out, overwrite=False)
    assert str(e.value) == (f"--out {out}: already holds a finished sft stage; pass --overwrite to replace it, or "
                            f"choose another --out")
    assert not (tmp_path / "sft.partial").exists()


def test_staged_output_refuses_other_files_and_files(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds files \\(not a finished stage\\)"):
        StagedOutput(tmp_path / "busy", overwrite=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file; expected a folder path"):
        StagedOutput(tmp_path / "afile", overwrite=True)
    (tmp_path / "empty").mkdir()
    StagedOutput(tmp_path / "empty", overwrite=False)  # an empty folder is fine


def test_staged_output_keeps_old_folder_when_the_body_raises(tmp_path):
    out = make_stage(tmp_path / "sft", "sft")
    (out / "weights.bin").write_text("old")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="boom"):
        with StagedOutput(out, overwrite=True) as dest:
            (dest / "weights.bin").write_text("half-written")
            raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert (tmp_path / "sft.partial" / "weights.bin").read_text() == "half-written"  # kept for inspection


def test_staged_output_replaces_old_folder_on_success(tmp_path):
    out = make_stage(tmp_path / "sft", "sft")
    (out / "stale.bin").write_text("old")
    (tmp_path / "sft.partial").mkdir()  # left over from an earlier crash
    (tmp_path / "sft.partial" / "junk").write_text("junk")
    with StagedOutput(out, overwrite=True) as dest:
        assert not (dest / "junk").exists()
        (dest / "weights.bin").write_text("new")
        make_stage(dest, "sft", metrics={"train_loss": 0.5})
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "README.md", "weights.bin"])  # with its card
    assert read_manifest(out).metrics == {"train_loss": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]  # no .partial, no .old
