"""`rlhf generate` on the tiny model: K answers per prompt, the JSON shape, seeds, and resuming a cut-off file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import EXAMPLES, invoke, ok, one_error, read_jsonl, write_jsonl

from rlhf_cli import GenerateArgs, run_generate
from rlhf_cli.core.manifest import write_manifest
from rlhf_cli.core.progress import Quiet
from rlhf_cli.data import load_prefs, load_prompts

PROMPTS = EXAMPLES / "prompts.jsonl"
FAST = ["--threads", "1", "--max-new-tokens", "6"]


@pytest.fixture(scope="module", autouse=True)
def wide_stdout():
    from rlhf_cli.cli import display

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(display.out, "width", 400)
        yield


def generate(model, out, *extra, prompts=PROMPTS, n=5):
    return invoke("generate", model, "--prompts", prompts, "--out", out, "-k", 3, "--max-samples", n,
                  "--batch-size", 2, *FAST, *extra)


@pytest.fixture(scope="module")
def full(tiny, tmp_path_factory) -> bytes:
    """One uninterrupted run: 5 prompts, 3 answers each, batches of 2 prompts."""
    out = tmp_path_factory.mktemp("gen") / "samples.jsonl"
    ok(generate(tiny, out))
    return out.read_bytes()


def test_k_answers_per_prompt_in_the_documented_shape(tiny, tmp_path):
    out = tmp_path / "deep" / "samples.jsonl"  # parent folders are made
    result = ok(generate(tiny, out))
    assert f"{PROMPTS}: prompts format, 40 rows read, 5 rows kept" in result.stderr
    assert f"next: rlhf reward --data {out}" in result.stdout
    summary = {line.split("│")[1].strip(): line.split("│")[2].strip()
               for line in result.stdout.splitlines() if line.count("│") == 3}
    assert (summary["prompts"], summary["written"], summary["skipped"], summary["answers"]) == ("5", "5", "0", "15")

    got = read_jsonl(out)
    expected = [r["prompt"] for r in load_prompts(str(PROMPTS), 5).rows]
    assert [r["prompt"] for r in got] == expected  # input order, one line per prompt
    for r in got:
        assert set(r) == {"prompt", "responses", "model", "finished"}
        assert r["model"] == str(tiny)
        assert len(r["responses"]) == 3 and all(isinstance(x, str) and x for x in r["responses"])
        assert len(r["finished"]) == 3 and all(isinstance(x, bool) for x in r["finished"])
    # the output is a prompt file, and (once ranked) a ranked-list preference file: 3 answers -> 3 pairs a prompt
    assert [r["prompt"] for r in load_prompts(str(out)).rows] == expected
    prefs = load_prefs(str(out))
    assert (prefs.format, prefs.prompts, prefs.kept) == ("ranked", 5, 15)


def test_the_same_seed_writes_the_same_file(tiny, tmp_path, full):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ok(generate(tiny, a))
    assert a.read_bytes() == full
    ok(generate(tiny, b, "--seed", 7))
    assert b.read_bytes() != full
    assert [r["prompt"] for r in read_jsonl(b)] == [json.loads(line)["prompt"] for line in full.decode().splitlines()]


def test_resume_after_a_crash_mid_line_rewrites_only_the_cut_line(tiny, tmp_path, full):
    out = tmp_path / "samples.jsonl"
    lines = full.splitlines(keepends=True)
    cut = b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2]  # prompt 4 was being written
    out.write_bytes(cut)
    result = ok(generate(tiny, out))
    assert "the last line was cut off" in result.stderr
    assert "3 of 5 prompts already done, skipped; 2 to go" in result.stderr
    assert out.read_bytes() == full  # the half-written batch is sampled again whole: same answers as before
    assert out.read_bytes().startswith(b"".join(lines[:3]))


def test_resume_after_removing_the_last_lines(tiny, tmp_path, full):
    out = tmp_path / "samples.jsonl"
    lines = full.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]))
    result = ok(generate(tiny, out))
    assert "2 of 5 prompts already done, skipped; 3 to go" in result.stderr
    assert "cut off" not in result.stderr
    assert out.read_bytes() == full

    before = out.stat().st_mtime_ns
    result = ok(generate(tiny, out))  # nothing left to do: the model is not even loaded
    assert "5 of 5 prompts already done, skipped; 0 to go" in result.stderr
    assert "sampling" not in result.stderr
    assert out.stat().st_mtime_ns == before and out.read_bytes() == full


def test_library_api_reports_done_and_skipped(tiny, tmp_path, full):
    out = tmp_path / "samples.jsonl"
    out.write_bytes(b"".join(full.splitlines(keepends=True)[:4]))
    args = GenerateArgs(model=str(tiny), prompts=str(PROMPTS), out=str(out), num_samples=3, max_samples=5,
                        batch_size=2, max_new_tokens=6, threads=1)
    res = run_generate(args, Quiet())
    assert (res.prompts, res.written, res.skipped, res.samples) == (5, 1, 4, 3)
    assert res.out == out and not res.repaired_last_line
    assert 0.0 <= res.finished <= 1.0
    assert out.read_bytes() == full


def test_prompts_from_a_preference_file(tiny, tmp_path):
    out = tmp_path / "samples.jsonl"
    prefs = EXAMPLES / "prefs_ranked.jsonl"
    ok(generate(tiny, out, "-k", 2, prompts=prefs, n=3))
    got = read_jsonl(out)
    assert [r["prompt"] for r in got] == [r["prompt"] for r in load_prompts(str(prefs), 3).rows]
    assert all(len(r["responses"]) == 2 for r in got)


def test_chinese_prompts_round_trip(tiny, tmp_path):
    out = tmp_path / "zh.jsonl"
    ok(generate(tiny, out, prompts=EXAMPLES / "zh_prefs.jsonl", n=2))
    text = out.read_text(encoding="utf-8")
    assert "怎样泡一杯好喝的绿茶？" in text  # written as UTF-8, not \\u escapes
    assert read_jsonl(out)[0]["prompt"] == [{"role": "user", "content": "怎样泡一杯好喝的绿茶？"}]


def test_overwrite_starts_afresh(tiny, tmp_path, full):
    out = tmp_path / "samples.jsonl"
    out.write_bytes(full.splitlines(keepends=True)[0] + b"garbage that is not json\n")
    ok(generate(tiny, out, "--overwrite"))
    assert out.read_bytes() == full


def test_refusals_leave_the_file_untouched(tiny, tmp_path, full):
    out = tmp_path / "samples.jsonl"
    out.write_bytes(full)
    one_error(generate(tiny.parent, tmp_path / "g.jsonl"), 1, f"MODEL {tiny.parent}: no config.json")
    one_error(invoke("generate", tiny, "--prompts", PROMPTS, "--out", out, "-k", 4, *FAST), 2,
              "-k 4", "holds 3 answers per prompt", "--overwrite")
    other = write_jsonl(tmp_path / "other.jsonl", [dict(json.loads(full.splitlines()[0]), model="someone/else")])
    one_error(generate(tiny, other), 2, "holds answers from 'someone/else'", "--overwrite")
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(full.splitlines(keepends=True)[0] + b"{not json\n" + full.splitlines(keepends=True)[2])
    snapshot = broken.read_bytes()
    one_error(generate(tiny, broken), 1, f"{broken}:2: not valid JSON", "--overwrite")
    assert broken.read_bytes() == snapshot and out.read_bytes() == full

    one_error(generate(tiny, tmp_path / "g.jsonl", "--temperature", 0), 2, "--temperature 0", "-k 1")
    one_error(generate(tiny, tmp_path / "g.jsonl", "--top-p", 1.5), 2, "--top-p 1.5")
    one_error(invoke("generate", tiny, "--out", tmp_path / "g.jsonl"), 2, "--prompts: missing")
    one_error(invoke("generate", tiny, "--prompts", PROMPTS), 2, "--out: missing")
    one_error(generate(tiny, tmp_path, "--overwrite"), 2, "is a folder")
    assert not (tmp_path / "g.jsonl").exists()


def test_refuses_a_reward_model(tiny, tmp_path):
    rm = tmp_path / "reward"
    rm.mkdir()
    write_manifest(rm, stage="reward", parents=[str(tiny)], args={}, data={}, metrics={}, started=0.0)
    one_error(generate(rm, tmp_path / "g.jsonl"), 1, f"MODEL {rm}: is a reward stage", "rlhf sft")


def test_sampling_from_the_generation_config_flags_and_greedy(tiny, tmp_path):
    folder = Path(shutil.copytree(tiny, tmp_path / "tuned"))
    gen = folder / "generation_config.json"
    gen.write_text(json.dumps(json.loads(gen.read_text()) | {"do_sample": True, "temperature": 0.45, "top_k": 30}))
    result = ok(generate(folder, tmp_path / "a.jsonl", n=1))
    assert (f"sampling: temperature 0.45, top_p 0.9, top_k 30, repetition_penalty 1 (temperature, top_k from {gen}; "
            f"top_p, repetition_penalty from the defaults)") in result.stderr
    result = ok(generate(folder, tmp_path / "b.jsonl", "--temperature", 1.2, n=1))
    assert "sampling: temperature 1.2, top_p 0.9, top_k 30, repetition_penalty 1 (temperature as given; " \
        in result.stderr
    result = ok(generate(tiny, tmp_path / "c.jsonl", n=1))
    assert "sampling: temperature 0.7, top_p 0.9, top_k 0, repetition_penalty 1 (from the defaults)" in result.stderr

    gen.write_text(json.dumps(json.loads(gen.read_text()) | {"do_sample": False}))
    one_error(generate(folder, tmp_path / "d.jsonl"), 2, f"MODEL {folder}: its generation_config.json asks for "
              "greedy decoding", "--temperature", "-k 1")
    assert not (tmp_path / "d.jsonl").exists()

    # --temperature 0 is greedy: other seeds write the same answers
    files = [tmp_path / f"greedy{s}.jsonl" for s in (1, 2)]
    for s, out in zip((1, 2), files, strict=True):
        ok(invoke("generate", tiny, "--prompts", PROMPTS, "--out", out, "-k", 1, "--max-samples", 3, "--temperature",
                  0, "--seed", s, *FAST))
    assert files[0].read_bytes() == files[1].read_bytes()
