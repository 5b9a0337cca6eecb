"""What the toolkit refuses to run, and what it refuses to print: pickle weights and a model folder's own code are
not loaded without a flag, YAML tags that build Python objects are refused, and model output cannot drive the
terminal (control sequences removed, Rich markup shown as text) while the files written keep it as it was."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from helpers import EXAMPLES, FakeStream, U, invoke, ok, one_error, write_jsonl

from rlhf_cli.core.generation import LM, Answer
from rlhf_cli.core.text import SafeStream, safe_text

FAST = ["--threads", "1", "--max-new-tokens", "4"]
EVIL = "\x1b]0;owned\x07\x1b[2J[bold red]boom[/] \r\x08"
CONTROLS = ("\x1b", "\x07", "\r", "\x08", "\x9b")


def clean(text: str) -> bool:
    return not any(c in text for c in CONTROLS)


# ---------------------------------------------------------------------------------------------------------
# pickle weights


@pytest.fixture(scope="module")
def pickled(tiny, tmp_path_factory) -> Path:
    """The tiny model with its weights as a pickle file (pytorch_model.bin) and no safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(shutil.copytree(tiny, tmp_path_factory.mktemp("pickled") / "model"))
    model = AutoModelForCausalLM.from_pretrained(tiny)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_weights_are_refused_with_one_clear_line(pickled, tmp_path):
    weights = pickled / "pytorch_model.bin"
    for result in (invoke("chat", pickled, "--prompt", "hi", *FAST),
                   invoke("generate", pickled, "--prompts", EXAMPLES / "prompts.jsonl", "--out", tmp_path / "g.jsonl",
                          "-k", 1, *FAST),
                   invoke("sft", "--model", pickled, "--data", EXAMPLES / "sft_messages.jsonl", "--out",
                          tmp_path / "sft", "--max-steps", 1)):
        line = one_error(result, 1, f"{weights} is a pickle file", "safetensors",
                         "save_pretrained(DIR, safe_serialization=True)", "--allow-pickle")
        assert "\n" not in line
    assert list(tmp_path.iterdir()) == []  # nothing written: not the samples, not the stage


def test_allow_pickle_loads_them(pickled):
    result = ok(invoke("chat", pickled, "--prompt", "hi", "--allow-pickle", *FAST))
    assert result.stdout.strip()


def test_hub_downloads_leave_pickle_weights_out_unless_allowed():
    from rlhf_cli.core.models import LoadOptions

    assert "*.bin" not in LoadOptions().hub_patterns() and "*.safetensors" in LoadOptions().hub_patterns()
    assert "*.bin" in LoadOptions(allow_pickle=True).hub_patterns()
    assert LoadOptions().model_kwargs() == {"use_safetensors": True, "trust_remote_code": False}


# ---------------------------------------------------------------------------------------------------------
# a model folder's own code


def remote_code_folder(tiny: Path, dest: Path, model_type: str) -> tuple[Path, Path]:
    """The tiny model with Python files that write a marker file when imported, named by config.json's auto_map."""
    folder = Path(shutil.copytree(tiny, dest))
    marker = dest.parent / f"{dest.name}.imported"
    touch = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    (folder / "configuration_evil.py").write_text(
        touch + "from transformers import LlamaConfig\n\n\nclass EvilConfig(LlamaConfig):\n"
                "    model_type = 'llama'\n", encoding="utf-8")
    (folder / "modeling_evil.py").write_text(
        touch + "from transformers import LlamaForCausalLM\n\nfrom .configuration_evil import EvilConfig\n\n\n"
                "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n", encoding="utf-8")
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg |= {"model_type": model_type, "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                                                   "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return folder, marker


def test_remote_code_is_not_run_without_the_flag(tiny, tmp_path):
    folder, marker = remote_code_folder(tiny, tmp_path / "known", "llama")
    result = ok(invoke("chat", folder, "--prompt", "hi", *FAST))
    assert result.stdout.strip() and not marker.exists()
    [note] = [line for line in result.stderr.splitlines() if "auto_map" in line]
    assert "not running the folder's own code (configuration_evil.py, modeling_evil.py" in note
    assert "built-in llama classes" in note and "--trust-remote-code" in note

    folder, marker = remote_code_folder(tiny, tmp_path / "unknown", "evil")
    one_error(invoke("chat", folder, "--prompt", "hi", *FAST), 1, "runs the Python code in its folder",
              "no built-in class for its model_type 'evil'", "--trust-remote-code")
    one_error(invoke("sft", "--model", folder, "--data", EXAMPLES / "sft_messages.jsonl", "--out", tmp_path / "sft"),
              1, "--trust-remote-code")
    assert not marker.exists() and not (tmp_path / "sft").exists()


def test_trust_remote_code_reaches_the_loader(tiny, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # keep ~/.cache clean
    folder, marker = remote_code_folder(tiny, tmp_path / "trusted", "llama")
    ok(invoke("chat", folder, "--prompt", "hi", "--trust-remote-code", *FAST))
    assert marker.read_text() == "ran"


# ---------------------------------------------------------------------------------------------------------
# YAML


def test_yaml_tags_that_build_python_objects_are_refused(tiny, tmp_path):
    marker = tmp_path / "ran"
    cfg = tmp_path / "chat.yaml"
    cfg.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8")
    one_error(invoke("chat", tiny, "--config", cfg, "--prompt", "hi"), 2, f"{cfg}:1: not valid YAML",
              "python/object/apply:os.system")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# terminal output


def test_safe_text_removes_control_sequences_whole():
    assert safe_text(EVIL) == "[bold red]boom[/] "
    assert safe_text("a\tb\nc\x1b[31mred\x1b[0m \x9b2J\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\ \x7f\x00") == \
        "a\tb\ncred link "
    text = "start " + EVIL + " middle \x1b]0;title\x1b\\ end"
    for cut in range(1, len(text)):  # a sequence split across two streamed pieces is removed whole
        stream = SafeStream()
        assert stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.flush() == safe_text(text)


# EVIL in pieces that split its control sequences
EVIL_PIECES = ["Sure: \x1b]0;ow", "ned\x07\x1b", "[2J[bold red]boom[/] \r\x08"]


def test_chat_shows_model_output_as_plain_text(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(LM, "stream", lambda self, messages, sampling: FakeStream(EVIL_PIECES))
    once = ok(invoke("chat", tiny, "--prompt", "hi", *FAST))
    assert once.stdout == "Sure: [bold red]boom[/] \n"

    saved = tmp_path / "chat.json"
    session = ok(invoke("chat", tiny, "-i", *FAST, input=f"hi\n/save {saved}\n"))
    assert clean(session.output) and "Sure: [bold red]boom[/]" in session.stdout
    assert json.loads(saved.read_text(encoding="utf-8"))["messages"][1]["content"] == "Sure: " + EVIL  # raw


def test_generate_writes_raw_answers_and_shows_none_of_their_controls(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(LM, "sample", lambda self, prompts, n, sampling: [[Answer(EVIL, True, 3)] * n
                                                                          for _ in prompts])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "say it " + EVIL}])
    out = tmp_path / "samples.jsonl"
    result = ok(invoke("generate", tiny, "--prompts", prompts, "--out", out, "-k", 2, *FAST))
    assert clean(result.output)
    [row] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert row["responses"] == [EVIL, EVIL] and row["prompt"] == [U("say it " + EVIL)]


def test_training_samples_and_progress_lines_are_plain_text(monkeypatch):
    from rich.console import Console

    from rlhf_cli.cli import display
    from rlhf_cli.core.progress import Reporter

    shown = io.StringIO()
    monkeypatch.setattr(display, "err", Console(file=shown, width=200, color_system=None))
    rich = display.RichReporter("ppo")
    rich.samples("samples at update 1", [{"prompt": "hi " + EVIL, "response": EVIL, "score": 0.5}])
    rich.info("a line quoting data: " + EVIL)
    plain = io.StringIO()
    Reporter(plain).info("a line quoting data: " + EVIL)
    for text in (shown.getvalue(), plain.getvalue()):
        assert clean(text) and "[bold red]boom[/]" in text
