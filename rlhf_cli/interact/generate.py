"""`rlhf generate`: sample K answers per prompt from any checkpoint, for people to rank.

InstructGPT's comparison data came from labellers ranking K sampled answers per prompt. This writes one JSON line
per prompt, `{"prompt": [msgs], "responses": [K answers], "model": ..., "finished": [reached EOS, per answer]}`;
once a person orders `responses` best first (or adds `"ranking"`), the file is a ranked-list preference file for
`rlhf reward`.

Prompts are processed in fixed batches of `--batch-size` prompts over the whole prompt list, each batch seeded from
`--seed` and its index, so the same command writes the same file. An existing `--out` is resumed: prompts already
in it are skipped, a last line cut off by a crash is rewritten, and finished lines are never touched; a batch that
was half written is sampled again whole, so a resumed file equals an uninterrupted one.

Sampling settings not given come from the model's generation_config.json, else temperature 0.7 and top-p 0.9
(`GENERATE_SAMPLING`: hotter than the chat, since answers to rank must differ). The file holds the answers as
the model wrote them.

    rlhf generate runs/demo/sft --prompts examples/data/prompts.jsonl --out runs/demo/samples.jsonl -k 4
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.core import runtime
from rlhf_cli.core.config import validate
from rlhf_cli.core.errors import ConfigError, DataError
from rlhf_cli.core.generation import Sampling, load_lm, pick_sampling, refuse_reward_stage, sampling_layers
from rlhf_cli.core.interrupt import StopSignals
from rlhf_cli.core.models import LoadOptions, resolve_model
from rlhf_cli.core.progress import Reporter
from rlhf_cli.data import load_prompts
from rlhf_cli.data.io import json_lines
from rlhf_cli.interact.args import GENERATE_SAMPLING, GenerateArgs


@dataclass
class GenerateResult:
    out: Path
    prompts: int  # in --prompts (after --max-samples)
    written: int  # written by this run
    skipped: int  # already in --out
    samples: int  # answers written by this run
    finished: float | None  # share of this run's answers that reached EOS
    truncated_prompts: int
    repaired_last_line: bool
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {"out": str(self.out), "prompts": self.prompts, "written": self.written, "skipped": self.skipped,
                "answers": self.samples, "reached_eos": self.finished, "truncated_prompts": self.truncated_prompts,
                "repaired_last_line": self.repaired_last_line, "seconds": self.seconds}


def prompt_key(messages: list[dict[str, str]]) -> str:
    return json.dumps(messages, ensure_ascii=False, sort_keys=True)


def _check(args: GenerateArgs) -> None:
    validate(args)
    if args.temperature == 0 and args.num_samples > 1:
        raise ConfigError(f"--temperature 0 is greedy decoding: all {args.num_samples} answers would be the same; "
                          f"use -k 1, or a temperature above 0")
    if args.prompts is None:
        raise ConfigError("--prompts: missing; expected a prompt file (or any SFT or preference file)")
    if args.out is None:
        raise ConfigError("--out: missing; expected the .jsonl file to write")
    if Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out}: is a folder; expected a .jsonl file path")


def _sampling(args: GenerateArgs, folder: Path, say) -> Sampling:
    """The flags, else the model's generation_config.json, else GENERATE_SAMPLING; read before any weights load."""
    sampling, line = pick_sampling(sampling_layers(args, folder, GENERATE_SAMPLING), args.max_new_tokens)
    if sampling.temperature == 0 and args.num_samples > 1:  # greedy from the generation config
        raise ConfigError(f"MODEL {args.model}: its generation_config.json asks for greedy decoding (do_sample "
                          f"false), so all {args.num_samples} answers would be the same; pass --temperature above "
                          f"0 (such as 1.0), or -k 1")
    say(line)
    return sampling


def read_existing(out: Path, model: str, k: int, say) -> tuple[set[str], bool]:
    """Prompts already in `out`, after cutting off a last line left incomplete by a crash mid-write.

    Complete lines are never changed; one that is not a row this command wrote is an error, not overwritten."""
    data = out.read_bytes()
    repaired = False
    if data and not data.endswith(b"\n"):
        tail = data[data.rfind(b"\n") + 1:]
        try:
            whole = isinstance(json.loads(tail.decode("utf-8")), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            whole = False
        with out.open("r+b") as f:
            if whole:  # a complete row without its newline (an editor dropped it): keep it
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
                data += b"\n"
            else:
                f.truncate(len(data) - len(tail))
                data = data[:len(data) - len(tail)]
                repaired = True
                say(f"{out}: the last line was cut off (interrupted while writing); it will be written again")
    done: set[str] = set()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{out}: not UTF-8 text ({e.reason} at byte {e.start}); expected a file written by "
                        f"`rlhf generate`: choose another --out, or pass --overwrite") from None
    for i, row in json_lines(text.splitlines()):
        if isinstance(row, json.JSONDecodeError):
            raise DataError(f"{out}:{i}: not valid JSON ({row.msg}), so this file cannot be resumed; fix or delete "
                            f"the line, choose another --out, or pass --overwrite")
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), list)
                and isinstance(row.get("responses"), list)):
            raise DataError(f"{out}:{i}: expected a row written by `rlhf generate` (prompt, responses, model); "
                            f"choose another --out, or pass --overwrite")
        if row.get("model") != model:
            raise ConfigError(f"--out {out}: line {i} holds answers from {row.get('model')!r}, not {model!r}; "
                              f"choose another --out, or pass --overwrite to start afresh")
        if len(row["responses"]) != k:
            raise ConfigError(f"-k {k}: {out}:{i} holds {len(row['responses'])} answers per prompt; resume with "
                              f"-k {len(row['responses'])}, choose another --out, or pass --overwrite")
        done.add(prompt_key(row["prompt"]))
    return done, repaired


def run_generate(args: GenerateArgs, reporter: Reporter | None = None) -> GenerateResult:
    """Sample `args.num_samples` answers for every prompt into `args.out`, resuming what is already there."""
    reporter = reporter or Reporter()
    say = reporter.info
    t0 = time.time()
    _check(args)
    out = Path(args.out)
    ds = load_prompts(args.prompts, args.max_samples)
    say(ds.describe())
    prompts = [r["prompt"] for r in ds.rows]
    keys = [prompt_key(p) for p in prompts]

    done: set[str] = set()
    repaired = False
    if out.exists() and args.overwrite:
        out.unlink()
    elif out.exists():
        done, repaired = read_existing(out, args.model, args.num_samples, say)
    skipped = sum(k in done for k in keys)
    todo = len(keys) - skipped
    if skipped:
        say(f"{out}: {skipped} of {len(keys)} prompts already done, skipped; {todo} to go")
    result = GenerateResult(out, len(keys), 0, skipped, 0, None, 0, repaired, 0.0)
    if todo == 0:
        result.seconds = round(time.time() - t0, 2)
        return result

    loading = LoadOptions.of(args)
    refuse_reward_stage(args.model, "MODEL")
    sampling = _sampling(args, resolve_model(args.model, "MODEL", say, loading), say)
    runtime.quiet_libraries()
    threads = runtime.configure_threads(args.threads)
    lm = load_lm(args.model, "MODEL", args.precision, say, loading)
    encoded, result.truncated_prompts = lm.fit_prompts(prompts, sampling.max_new_tokens)
    if result.truncated_prompts:
        room = lm.context - sampling.max_new_tokens
        say(f"{result.truncated_prompts} prompts longer than {room} tokens kept their last {room} tokens")
    say(f"sampling {args.num_samples} answers per prompt from {args.model} ({threads} thread"
        f"{'s' if threads != 1 else ''}, {sampling.describe()}, max_new_tokens {sampling.max_new_tokens})")

    out.parent.mkdir(parents=True, exist_ok=True)
    reporter.start(todo)
    t1 = time.time()
    new_tokens = eos = 0
    bs = args.batch_size
    try:
        with StopSignals(reporter.info, "batch") as signals, out.open("a", encoding="utf-8") as f:
            for b, start in enumerate(range(0, len(keys), bs)):
                idx = range(start, min(start + bs, len(keys)))
                missing = [i for i in idx if keys[i] not in done]
                if not missing:
                    continue
                # Seeded per fixed batch: a resumed run samples the same answers an uninterrupted one would.
                runtime.seed_all(args.seed * 100_003 + b)
                answers = lm.sample([encoded[i] for i in idx], args.num_samples, sampling)
                for i, ans in zip(idx, answers, strict=True):
                    if i not in missing:
                        continue
                    row = {"prompt": prompts[i], "responses": [a.text for a in ans], "model": args.model,
                           "finished": [a.finished for a in ans]}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    result.written += 1
                    result.samples += len(ans)
                    eos += sum(a.finished for a in ans)
                    new_tokens += sum(a.tokens for a in ans)
                f.flush()
                os.fsync(f.fileno())
                elapsed = time.time() - t1
                reporter.update(result.written, todo, {"tokens/s": new_tokens / max(elapsed, 1e-9)}, elapsed)
                if signals and result.written < todo:  # the lines so far are on disk; the same command resumes
                    raise signals.stop(f"after {result.written} of {todo} prompts", str(out), flag="")
    finally:
        reporter.finish()
    result.finished = eos / result.samples if result.samples else None
    result.seconds = round(time.time() - t0, 2)
    return result
