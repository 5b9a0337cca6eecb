"""`rlhf chat` on tiny models: scripted sessions through CliRunner, the session API, and one real terminal (pexpect).

The tiny models write random words, so exact answers are computed in-process with the same seed and settings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
from helpers import FakeStream, build_tiny, invoke, ok, one_error

from rlhf_cli.core.generation import LM, Sampling, load_lm
from rlhf_cli.core.manifest import write_manifest
from rlhf_cli.core.reward_model import RewardModel
from rlhf_cli.core.runtime import seed_all
from rlhf_cli.data import load_prefs
from rlhf_cli.interact.chat import ChatSession, chat_loop

FAST = ["--threads", "1", "--max-new-tokens", "8"]
TITLE = re.compile(r"[╭┌]─ (\d) · ")


def chat(*args, input: str):
    """An interactive session read line by line from `input` (-i: stdin is not a terminal here)."""
    return invoke("chat", *args, "-i", *FAST, input=input)


@pytest.fixture
def width(monkeypatch):
    """Set the width of the terminal the chat draws on."""
    from rlhf_cli.cli import display

    def set_width(n: int) -> None:
        monkeypatch.setattr(display.out, "width", n)

    set_width(120)
    return set_width


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny2") / "model", seed=1)


@pytest.fixture(scope="module")
def rm(tiny, tmp_path_factory) -> Path:
    """A reward stage folder: the tiny model with an (untrained) one-output head, and its manifest."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_cli.core.models import load_tokenizer

    folder = tmp_path_factory.mktemp("rm") / "reward"
    model = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
    model.save_pretrained(folder)
    load_tokenizer(tiny).save_pretrained(folder)
    write_manifest(folder, stage="reward", parents=[str(tiny)], args={"max_length": 128}, data={}, metrics={},
                   started=0.0)
    return folder


def expected_answers(model: Path, messages: list[str], seed: int, system: str | None = None) -> list[str]:
    """What `rlhf chat MODEL --seed SEED --max-new-tokens 8` answers to these messages, computed with the library."""
    import torch

    torch.set_num_threads(1)
    session = ChatSession([load_lm(str(model))], Sampling(max_new_tokens=8), system=system)  # the default settings
    seed_all(seed)
    return [session.ask(m).turns[0].text for m in messages]


def test_help_lists_model_argument_and_flags():
    top = ok(invoke("--help")).stdout
    assert "  generate " in top and "  chat " in top
    chat_help = ok(invoke("chat", "--help")).stdout
    assert "Usage: rlhf chat [OPTIONS] [MODEL]" in " ".join(chat_help.split())
    for flag in ("--compare", "--reward", "--save-preferences", "--system", "--prompt", "--interactive",
                 "--temperature", "--top-p", "--top-k", "--repetition-penalty", "--max-new-tokens", "--seed",
                 "--threads", "--allow-pickle", "--trust-remote-code", "--config"):
        assert f" {flag} " in chat_help, flag
    gen_help = ok(invoke("generate", "--help")).stdout
    assert "Usage: rlhf generate [OPTIONS] [MODEL]" in " ".join(gen_help.split())
    for flag in ("--prompts", "--out", "-k", "--num-samples", "--temperature", "--top-p", "--top-k",
                 "--max-new-tokens", "--batch-size", "--seed", "--max-samples", "--threads", "--overwrite"):
        assert f" {flag} " in gen_help or f" {flag}," in gen_help, flag


# ---------------------------------------------------------------------------------------------------------
# the session, without a terminal


def test_history_grows_and_each_model_reads_it(tiny):
    lm = load_lm(str(tiny))
    s = ChatSession([lm], Sampling(max_new_tokens=6), system="Be brief.")
    first = s.ask("hello")
    assert first.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    second = s.ask("and again")
    assert second.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                             {"role": "assistant", "content": first.turns[0].text},
                             {"role": "user", "content": "and again"}]
    assert s.messages == second.prompt[1:] + [{"role": "assistant", "content": second.turns[0].text}]
    assert all(not t.finished and t.tokens == 6 for t in first.turns + second.turns)  # cut at max_new_tokens
    assert s.command("/reset").text == "conversation cleared (4 messages forgotten)"
    assert s.messages == [] and s.system == "Be brief."


def test_ctrl_c_stops_the_answer_keeps_it_and_the_session_goes_on(tiny):
    s = ChatSession([load_lm(str(tiny))], Sampling(max_new_tokens=300))
    seen: list[str] = []

    def interrupt_on_third_piece(i: int, piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            raise KeyboardInterrupt

    rnd = s.ask("write a long story", interrupt_on_third_piece)
    t = rnd.turns[0]
    assert rnd.stopped and t.stopped and not t.finished
    assert 3 <= t.tokens < 300  # generation ended soon after the stop, not at max_new_tokens
    assert t.text and s.messages[-1] == {"role": "assistant", "content": t.text}  # the partial answer is kept
    s.sampling.max_new_tokens = 4
    again = s.ask("shorter please")
    assert not again.stopped and len(s.messages) == 4


def test_chat_loop_takes_read_and_write_callables(tiny):
    s = ChatSession([load_lm(str(tiny))], Sampling(max_new_tokens=4))
    script = iter(["hi", "", KeyboardInterrupt, "/set top_k 5", "/nope"])
    written: list[str] = []

    def read(prompt: str) -> str:
        written.append(prompt)
        item = next(script, EOFError)
        if isinstance(item, type):
            raise item
        return item

    assert chat_loop(s, read, written.append, width=80) == 0  # EOF (Ctrl-D) leaves with exit code 0
    text = "".join(written)
    assert text.count("you> ") == 6
    assert "(Ctrl-D or /quit leaves)" in text  # Ctrl-C at the prompt does not leave
    assert "top_k 5" in text and s.sampling.top_k == 5
    assert "unknown command /nope; /help lists the commands" in text
    assert len(s.messages) == 2


# ---------------------------------------------------------------------------------------------------------
# the CLI: scripted sessions


def test_every_slash_command(tiny, tmp_path, width):
    saved = tmp_path / "chat.json"
    script = "\n".join(["/help", "/set", "/set temperature 0.3", "/set temperature abc", "/set top-k -1",
                        "/set beam 2", "/set max_new_tokens", "/system Answer in one word.", "hello",
                        f"/save {saved}", "/system", f"/save {tmp_path / 'no-system.json'}", "/reset",
                        "/prefer 1", "/save", "/bogus", "/quit", f"/save {tmp_path / 'after-quit.json'}"]) + "\n"
    result = ok(chat(tiny, input=script))
    out = result.stdout
    assert "/prefer N [M ...]" in out and "/system TEXT" in out  # /help
    # /set alone shows the settings
    assert "temperature 0.2  top_p 0.9  top_k 0  max_new_tokens 8  repetition_penalty 1" in out
    assert "temperature 0.3  top_p 0.9  top_k 0  max_new_tokens 8  repetition_penalty 1" in out
    errors = [line.split("you> ")[-1] for line in out.splitlines() if "error:" in line]
    assert errors == [
        "error: temperature abc: expected a number",
        "error: top_k -1: expected a whole number >= 0 (0 = off)",
        "error: beam: unknown setting; expected one of: temperature, top_p, top_k, max_new_tokens, "
        "repetition_penalty",
        "error: /set max_new_tokens: expected /set NAME VALUE, for example /set temperature 0.7",
        "error: /prefer: needs two or more answers; start the chat with --compare MODEL_B",
        "error: /save: expected a file name, for example /save chat.json",
    ]
    assert "system prompt: Answer in one word." in out and "system prompt removed" in out
    assert f"saved 2 messages to {saved}" in out
    assert "conversation cleared (2 messages forgotten)" in out
    assert "unknown command /bogus; /help lists the commands" in out
    assert not (tmp_path / "after-quit.json").exists()  # /quit left the chat

    doc = json.loads(saved.read_text(encoding="utf-8"))
    assert doc["model"] == str(tiny) and doc["system"] == "Answer in one word."
    assert doc["settings"] == {"temperature": 0.3, "top_p": 0.9, "top_k": 0, "max_new_tokens": 8,
                               "repetition_penalty": 1.0}
    assert [m["role"] for m in doc["messages"]] == ["user", "assistant"]
    assert doc["messages"][0]["content"] == "hello"
    assert json.loads((tmp_path / "no-system.json").read_text())["system"] is None


def test_multi_turn_history_and_chinese_round_trip(tiny, tmp_path, width):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    system, turns = "你是一个乐于助人的助手。", ["你好，世界", "请再说一遍。"]
    result = ok(chat(tiny, "--seed", 5, "--system", system, input=f"{turns[0]}\n/save {a}\n{turns[1]}\n/save {b}\n"))
    answers = expected_answers(tiny, turns, 5, system)
    first, second = (json.loads(p.read_text(encoding="utf-8")) for p in (a, b))
    assert first["system"] == system
    assert first["messages"] == [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": answers[0]}]
    assert second["messages"] == first["messages"] + [{"role": "user", "content": turns[1]},
                                                      {"role": "assistant", "content": answers[1]}]
    assert turns[0] in a.read_text(encoding="utf-8")  # UTF-8, not \\u escapes
    assert f"saved 2 messages to {a}" in result.stdout and f"saved 4 messages to {b}" in result.stdout


def test_answers_match_the_library_with_the_same_seed(tiny, width):
    result = ok(chat(tiny, "--seed", 3, input="hello there\nand then?\n"))
    for answer in expected_answers(tiny, ["hello there", "and then?"], 3):
        assert answer and " ".join(answer.split()) in " ".join(result.stdout.split())


def test_markup_in_model_output_is_shown_literally(tiny, tmp_path, width, monkeypatch):
    pieces = ["Sure: ", "[bold]x[/bold]", " and [red] stays ", "**done** ", "你好"]
    monkeypatch.setattr(LM, "stream", lambda self, messages, sampling: FakeStream(pieces))
    saved = tmp_path / "chat.json"
    result = ok(chat(tiny, input=f"show me markup\n/save {saved}\n"))
    assert "Sure: [bold]x[/bold] and [red] stays done 你好" in result.stdout  # Markdown bold, Rich markup inert
    doc = json.loads(saved.read_text(encoding="utf-8"))
    assert doc["messages"][1]["content"] == "".join(pieces)

    result = ok(invoke("chat", tiny, "--prompt", "again", *FAST))
    assert result.stdout == "".join(pieces) + "\n"  # --prompt: the raw answer and nothing else


def test_prompt_prints_only_the_answer(tiny):
    result = ok(invoke("chat", tiny, "--prompt", "hello there", "--seed", 3, *FAST))
    [answer] = expected_answers(tiny, ["hello there"], 3)
    assert result.stdout.strip() == answer and result.stdout.endswith("\n")
    assert "loaded" in result.stderr and "you>" not in result.stdout


def test_piped_stdin_is_one_message(tiny):
    result = ok(invoke("chat", tiny, "--seed", 4, *FAST, input="line one\nline two\n"))
    [answer] = expected_answers(tiny, ["line one\nline two"], 4)
    assert result.stdout.strip() == answer
    one_error(invoke("chat", tiny, *FAST, input="  \n"), 2, "stdin: empty", "-i")


def test_reward_score_under_each_answer(tiny, rm, width):
    result = ok(chat(tiny, "--reward", rm, "--seed", 2, input="hello there\n"))
    [answer] = expected_answers(tiny, ["hello there"], 2)
    score = RewardModel.load(RewardModel.locate(str(rm))).score([{"role": "user", "content": "hello there"},
                                                                 {"role": "assistant", "content": answer}])
    assert f"reward {score:.3f}" in result.stdout
    assert f"reward model {rm}" in result.stderr

    once = ok(invoke("chat", tiny, "--reward", rm, "--prompt", "hello there", "--seed", 2, *FAST))
    assert once.stdout.strip() == answer  # stdout: just the answer; the score goes to stderr
    assert f"reward {score:.3f}" in once.stderr


def test_errors_are_one_line(tiny, rm, tmp_path):
    sft = tmp_path / "sft"
    sft.mkdir()
    write_manifest(sft, stage="sft", parents=[str(tiny)], args={}, data={}, metrics={}, started=0.0)
    one_error(invoke("chat", tiny, "--reward", sft, "--prompt", "hi"), 1,
              f"--reward {sft}: is an sft stage, expected a reward stage", "rlhf reward")
    one_error(invoke("chat", tiny, "--reward", tiny, "--prompt", "hi", *FAST), 1, "not a reward model")
    one_error(invoke("chat", rm, "--prompt", "hi"), 1, f"MODEL {rm}: is a reward stage", "rlhf sft")
    one_error(invoke("chat", tiny, "--compare", tmp_path / "nope", "--prompt", "hi"), 1,
              f"--compare {tmp_path / 'nope'}: no such folder")
    one_error(invoke("chat", tiny, "--save-preferences", tmp_path / "p.jsonl", "-i"), 2, "needs --compare")
    one_error(invoke("chat", tiny, "--temperature", -1, "--prompt", "hi"), 2, "--temperature -1")
    one_error(invoke("chat", tiny, "--prompt", "hi", "-i"), 2, "--prompt")
    one_error(invoke("chat", tiny, "--prompt", "  "), 2, "--prompt: empty")


# ---------------------------------------------------------------------------------------------------------
# --compare and /prefer


def test_compare_side_by_side_and_prefer_writes_a_ranked_row(tiny, tiny2, rm, tmp_path, width):
    prefs, saved = tmp_path / "picks" / "prefs.jsonl", tmp_path / "chat.json"
    result = ok(chat(tiny, "--compare", tiny2, "--reward", rm, "--save-preferences", prefs, "--seed", 1,
                     input=f"hello there\n/prefer 2\n/prefer 1\n/save {saved}\n"))
    out = result.stdout
    assert any(len(TITLE.findall(line)) == 2 for line in out.splitlines())  # both answers on the same lines
    assert len(re.findall(r"reward -?\d+\.\d{3}", out)) == 2
    assert f"/prefer N keeps answer N and records it in {prefs}" in out
    assert f"kept answer 2 ({tiny2}); ranking [1, 0] appended to {prefs}" in out
    assert "error: /prefer: already recorded for this turn" in out

    [row] = [json.loads(line) for line in prefs.read_text(encoding="utf-8").splitlines()]
    assert row["prompt"] == [{"role": "user", "content": "hello there"}]
    assert row["ranking"] == [1, 0] and row["models"] == [str(tiny), str(tiny2)]
    assert len(row["responses"]) == 2 and row["responses"][0] != row["responses"][1]
    ds = load_prefs(str(prefs))  # valid input for `rlhf reward`
    assert (ds.format, ds.prompts, ds.kept) == ("ranked", 1, 1)
    assert ds.rows[0]["chosen"] == [{"role": "assistant", "content": row["responses"][1]}]
    assert ds.rows[0]["rejected"] == [{"role": "assistant", "content": row["responses"][0]}]
    doc = json.loads(saved.read_text(encoding="utf-8"))
    assert doc["compare"] == [str(tiny2)]
    assert doc["messages"][-1] == {"role": "assistant", "content": row["responses"][1]}  # the pick continues


def test_compare_stacks_answers_on_a_narrow_terminal(tiny, tiny2, tmp_path, width):
    width(80)
    prefs = tmp_path / "prefs.jsonl"
    result = ok(chat(tiny, "--compare", tiny2, "--compare", tiny, "--save-preferences", prefs, "--seed", 1,
                     input="hello there\n/prefer 9\n/prefer x\n/prefer 2\nnext question\n/prefer 3 1\n"))
    titles = [TITLE.findall(line) for line in result.stdout.splitlines()]
    assert [t for t in titles if t] == [["1"], ["2"], ["3"], ["1"], ["2"], ["3"]]  # one under another
    assert "error: /prefer 9: expected different numbers from 1 to 3" in result.stdout
    assert "error: /prefer x: expected the number of the best answer" in result.stdout
    rows = [json.loads(line) for line in prefs.read_text(encoding="utf-8").splitlines()]
    assert [r["ranking"] for r in rows] == [[1, [0, 2]], [2, 0, 1]]  # answers not ranked are tied
    assert rows[1]["prompt"][1] == {"role": "assistant", "content": rows[0]["responses"][1]}
    ds = load_prefs(str(prefs))
    assert (ds.prompts, ds.kept, ds.dropped["tied pairs skipped"]) == (2, 2 + 3, 1)


def test_config_file_and_one_shot_compare(tiny, tiny2, tmp_path):
    cfg = tmp_path / "chat.yaml"
    cfg.write_text(f"compare: {tiny2}\nmax_new_tokens: 5\nthreads: 1\nseed: 1\n", encoding="utf-8")
    result = ok(invoke("chat", tiny, "--config", cfg, "--prompt", "hello there"))
    blocks = result.stdout.split("\n\n")
    assert blocks[0] == f"## 1 · {tiny}" and blocks[2] == f"## 2 · {tiny2}"
    assert blocks[1].strip() and blocks[3].strip() and len(blocks) == 4


# ---------------------------------------------------------------------------------------------------------
# a real terminal


def test_real_terminal_with_pexpect(tiny):
    pexpect = pytest.importorskip("pexpect")
    script = Path(sys.executable).with_name("rlhf")
    cmd, args = (str(script), []) if script.exists() else (sys.executable, ["-m", "rlhf_cli"])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TERM="xterm-256color", TOKENIZERS_PARALLELISM="false")
    # Ctrl-C as in a user's terminal: a test run started in the background (`make test &`) hands its children
    # SIGINT ignored, and Python keeps an ignored SIGINT ignored.
    child = pexpect.spawn(cmd, args + ["chat", str(tiny), "--threads", "1", "--max-new-tokens", "8", "--seed", "6"],
                          env=env, dimensions=(30, 120), encoding="utf-8", timeout=90,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect_exact("you> ")
        child.sendline("hello there")
        child.expect_exact("you> ")
        screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before)  # drop colours and cursor moves
        [answer] = expected_answers(tiny, ["hello there"], 6)
        assert " ".join(answer.split()) in " ".join(screen.split())
        assert "cut at 8 tokens" in screen

        # Ctrl-C while an answer streams stops it; the session goes on
        child.sendline("/set max_new_tokens 900")
        child.expect_exact("you> ")
        child.sendline("tell me a long story")
        child.expect(r"\x1b\[\?25l.*?\w\w")  # the live view started and shows some text
        child.sendintr()
        child.expect_exact("stopped")
        child.expect_exact("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


# ---------------------------------------------------------------------------------------------------------
# sampling settings: flags, else the model's generation_config.json, else the defaults


def with_generation_config(model: Path, dest: Path, **settings) -> Path:
    folder = Path(shutil.copytree(model, dest))
    path = folder / "generation_config.json"
    path.write_text(json.dumps(json.loads(path.read_text(encoding="utf-8")) | settings), encoding="utf-8")
    return folder


def test_sampling_comes_from_the_generation_config_and_flags_override_it(tiny, tiny2, tmp_path):
    from rlhf_cli.core.progress import Quiet
    from rlhf_cli.interact.args import ChatArgs

    folder = with_generation_config(tiny, tmp_path / "tuned", do_sample=True, temperature=0.35, top_p=0.8, top_k=20,
                                    repetition_penalty=1.1)
    gen = folder / "generation_config.json"
    session = ChatSession.from_args(ChatArgs(model=str(folder), threads=1), Quiet().info)
    assert session.sampling == Sampling(0.35, 0.8, 20, 256, 1.1)
    result = ok(invoke("chat", folder, "--prompt", "hi", *FAST))
    assert f"sampling: temperature 0.35, top_p 0.8, top_k 20, repetition_penalty 1.1 (from {gen})" in result.stderr

    result = ok(invoke("chat", folder, "--prompt", "hi", "--temperature", 0.9, "--top-k", 0, *FAST))
    assert (f"sampling: temperature 0.9, top_p 0.8, top_k 0, repetition_penalty 1.1 (temperature, top_k as given; "
            f"top_p, repetition_penalty from {gen})") in result.stderr
    cfg = tmp_path / "chat.yaml"
    cfg.write_text("top_p: 0.5\n", encoding="utf-8")  # a --config value is given too
    result = ok(invoke("chat", folder, "--config", cfg, "--prompt", "hi", *FAST))
    assert "sampling: temperature 0.35, top_p 0.5, top_k 20, repetition_penalty 1.1 (top_p as given" in result.stderr

    greedy = with_generation_config(tiny, tmp_path / "greedy", do_sample=False, temperature=0.6)
    assert ChatSession.from_args(ChatArgs(model=str(greedy), threads=1), Quiet().info).sampling.temperature == 0
    plain = ChatSession.from_args(ChatArgs(model=str(tiny), threads=1), Quiet().info)
    assert plain.sampling == Sampling(0.2, 0.9, 0, 256, 1.0)  # no sampling settings in the folder: the defaults

    # --compare: every model samples with the first one's settings, and a line says the other's differ
    result = ok(invoke("chat", folder, "--compare", tiny2, "--prompt", "hi", *FAST))
    assert f"--compare {tiny2}: its generation_config.json asks for other sampling settings (none)" in result.stderr


def test_temperature_zero_is_greedy_whatever_the_seed(tiny):
    def answer(seed: int, temperature: float) -> str:
        return ok(invoke("chat", tiny, "--prompt", "hello there", "--temperature", temperature, "--seed", seed,
                         *FAST)).stdout

    assert answer(1, 1.0) != answer(2, 1.0)  # sampled: the seed matters
    assert answer(1, 0) == answer(2, 0)  # greedy: it does not
    assert "sampling: temperature 0 (greedy) (as given)" in ok(invoke("chat", tiny, "--prompt", "hi", "--temperature",
                                                                      0, *FAST)).stderr
