"""`rlhf pipeline`: the InstructGPT recipe as one resumable command, in rounds.

Round 1 is the recipe as the stage commands run it: `sft` (RUN/sft) -> `reward` (RUN/reward) -> stage 3 (RUN/ppo,
or RUN/dpo, RUN/best-of-n: one table of algorithms, `recipe.ALGOS`) -> eval (`rlhf eval reward` on the recipe's
held-out preferences, `rlhf eval policy` against the sft stage) -> `rlhf report RUN`.

Rounds 2..N follow InstructGPT's loop, where people rank answers that the *current* policy writes: round 1 trains
its reward model (RM) on the recipe's preference data, and each later round k

1. samples K answers per prompt from round k-1's policy on round k's new prompts (`rlhf generate`) into
   RUN/roundK/samples.jsonl;
2. has them ranked into RUN/roundK/rankings.jsonl (ranked lists, best first): by people (the pipeline stops and
   names the `rlhf label` command; the next `rlhf pipeline` call continues once every sampled prompt is ranked), or
   with `auto_label: RM_DIR` by a judge RM standing in for them (annotator "auto:RM_DIR");
3. trains round k's RM (from the sft model, or with `reward_init: previous` from round k-1's RM) on every ranking
   so far: RUN/roundK/prefs.jsonl holds the recipe's preference pairs and every round's rankings as pairs, each
   row naming its source; the RM's manifest records that file and its fingerprint;
4. runs stage 3 again from round k-1's policy against round k's RM (RUN/roundK/ppo: its manifest's parents are
   both), then evaluates it against the sft stage and against round k-1's policy.

A stage is skipped when its folder holds a finished manifest whose settings and parents are what this run would
pass, whose parents were not made again since, and whose training data has the same fingerprint. Settings left
unset in the recipe are the stage's to choose (it records what it chose), and settings that do not change the
result (`IGNORED`) are not compared. A stage that runs makes every stage after it run too. An unfinished stage
resumes from the checkpoint in OUT.partial where the stage keeps one (sft, reward, ppo/grpo/rloo with `save_every`,
or after Ctrl-C), else starts again; finished stages are never touched until their replacement is complete.

    rlhf pipeline examples/recipes/demo.yaml
    rlhf pipeline examples/recipes/two_rounds_cpu.yaml --from reward
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_cli.core.config import to_dict
from rlhf_cli.core.errors import CheckpointError, ConfigError, RLHFError
from rlhf_cli.core.files import atomic_write_text
from rlhf_cli.core.manifest import manifest_if_stage, read_manifest
from rlhf_cli.core.progress import Reporter
from rlhf_cli.pipeline.args import FROM_STAGES
from rlhf_cli.pipeline.recipe import Recipe, load_class, stage3_args

# Settings that do not change what a stage produces: changing them does not make it run again.
IGNORED = ("out", "run", "overwrite", "resume", "stop_after", "threads", "max_memory", "save_every", "sample_every",
           "logging_steps")
EVAL_FILE = "eval.json"  # the pipeline's evaluation of a round, in the round's folder


class Paused(RLHFError):
    """The pipeline stopped before the end on purpose (answers to rank, a stage's --stop-after); the same command
    continues it."""

    exit_code = 3


@dataclass
class StageRun:
    """What happened to one step of the pipeline, for its table."""

    round: int
    name: str  # sft, reward, ppo, samples, rankings, eval, report
    folder: Path
    status: str  # ran, resumed, skipped
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    why: str = ""


@dataclass
class PipelineResult:
    run: Path
    stages: list[StageRun]
    rounds: list[dict[str, Any]]
    report: str | None
    policy: Path
    reward: Path
    sft: Path


def _norm(p: Any) -> str:
    """A parent as a comparable string: the resolved folder when it is local, else the name as given (a hub id)."""
    path = Path(str(p))
    return str(path.resolve()) if path.exists() else str(p)


def _finished(folder: Path) -> str | None:
    m = manifest_if_stage(folder)
    return m.data.get("finished") if m else None


# Key figures for the tables: (manifest metric, shown name)
KEY_METRICS = {
    "sft": (("train_loss", "train loss"), ("eval_loss", "eval loss"), ("steps", "steps")),
    "reward": (("eval_accuracy", "eval accuracy"), ("train_loss", "train loss"), ("steps", "steps")),
    "ppo": (("final_score_mean", "score"), ("final_kl", "kl"), ("updates", "updates"), ("steps", "steps")),
    "eval": (("rm_accuracy", "RM accuracy"), ("mean_score", "mean score"), ("kl_to_sft", "KL to sft"),
             ("win_rate_vs_sft", "win vs sft"), ("win_rate_vs_previous", "win vs previous")),
}


def key_metrics(stage: str, metrics: dict[str, Any]) -> dict[str, Any]:
    wanted = KEY_METRICS.get(stage)
    if wanted is None:
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out = {}
    for key, name in wanted:
        value = metrics.get(key)
        if value is not None:
            out[name] = value
    return out


class Pipeline:
    def __init__(self, recipe: Recipe, from_stage: str | None = None,
                 reporter_for: Callable[[str], Reporter] | None = None,
                 on_stage: Callable[[StageRun], None] | None = None):
        if from_stage is not None and from_stage not in FROM_STAGES:
            if from_stage != recipe.algo.stage:
                raise ConfigError(f"--from {from_stage}: this recipe's stage 3 is {recipe.algo.stage} "
                                  f"(algo {recipe.algo_name}); expected one of: {', '.join(FROM_STAGES)}, "
                                  f"{recipe.algo.stage}")
            from_stage = "stage3"
        self.recipe, self.from_stage = recipe, from_stage
        self.reporter_for = reporter_for or (lambda name: Reporter())
        self.on_stage = on_stage or (lambda s: None)
        self.say = self.reporter_for("pipeline").info
        self.stages: list[StageRun] = []
        self.rounds: list[dict[str, Any]] = []
        self.remade: set[str] = set()  # folders and files made again by this call

    # ---------------------------------------------------------------------------------------------- the loop

    def run(self) -> PipelineResult:
        """Round 1 (sft -> reward -> stage 3 -> eval), each later round (samples -> rankings -> reward ->
        stage 3 -> eval), then the report."""
        r = self.recipe
        run = r.run
        run.mkdir(parents=True, exist_ok=True)
        sft = self.train_stage(1, "sft", run / "sft", self.sft_args(), "rlhf_cli.stages.sft.train:run_sft",
                               [r.model], self.forced("sft"))
        reward_start = str(r.reward_values.get("model") or sft)
        rm = self.train_stage(1, "reward", run / "reward", self.reward_args(reward_start, run / "reward"),
                              "rlhf_cli.stages.reward.train:run_reward", [reward_start], self.forced("reward"))
        policy = self.stage3(1, sft, rm, run / r.algo.stage)
        self.evaluate(1, policy, sft, sft, rm, run)
        rankings: list[Path] = []
        for k in range(2, r.rounds + 1):
            folder = run / f"round{k}"
            folder.mkdir(exist_ok=True)
            samples = self.sample(k, policy, self.round_prompts(k, folder), folder)
            rankings.append(self.rank(k, samples, folder))
            prefs = self.combine(k, rankings, folder)
            start = str(rm if r.reward_init == "previous" else (r.reward_values.get("model") or sft))
            rm = self.train_stage(k, "reward", folder / "reward", self.reward_args(start, folder / "reward", prefs),
                                  "rlhf_cli.stages.reward.train:run_reward", [start], False)
            previous, policy = policy, self.stage3(k, policy, rm, folder / r.algo.stage)
            self.evaluate(k, policy, previous, sft, rm, folder)
        report = self.report()
        self.write_summary(report)
        return PipelineResult(run, self.stages, self.rounds, report, policy, rm, sft)

    def forced(self, stage: str) -> bool:
        """--from STAGE: that round-1 stage and every one after it run again (later rounds follow their parents)."""
        return self.from_stage is not None and FROM_STAGES.index(stage) >= FROM_STAGES.index(self.from_stage)

    def record(self, s: StageRun) -> None:
        self.stages.append(s)
        self.on_stage(s)

    # ---------------------------------------------------------------------------------------------- args

    def sft_args(self) -> Any:
        from rlhf_cli.stages.sft.args import SFTArgs

        return SFTArgs(**self.recipe.sft_values | {"model": self.recipe.model, "out": str(self.recipe.run / "sft"),
                                                   "run": None})

    def reward_args(self, start: str, out: Path, data: Path | None = None) -> Any:
        from rlhf_cli.stages.reward.args import RewardArgs

        values = self.recipe.reward_values | {"model": start, "out": str(out), "run": None}
        if data is not None:  # a later round: the combined pairs file (its own format; every pair of it)
            values |= {"data": str(data), "format": "auto", "max_samples": None}
        return RewardArgs(**values)

    # ---------------------------------------------------------------------------------------------- stages

    def why_run(self, folder: Path, args: Any, parents: list[str], force: bool) -> str | None:
        """None when the finished stage in `folder` is what this run would make; else why it runs."""
        if force:
            return f"--from {self.from_stage}"
        try:
            m = read_manifest(folder)
        except CheckpointError:
            return "its manifest is unreadable"
        if m is None:
            partial = folder.with_name(folder.name + ".partial")
            return "unfinished" if partial.exists() else "not run yet"
        for p in parents:
            if _norm(p) in self.remade:
                return f"its parent {p} was made again"
            done = _finished(Path(p))
            if done and done > m.data.get("started", ""):
                return f"its parent {p} is newer than it"
        before = sorted(_norm(p) for p in m.data.get("parents", []))
        if before != sorted(_norm(p) for p in parents):
            return f"its parents changed: {', '.join(m.data.get('parents', []))} -> {', '.join(parents)}"
        for name, value in to_dict(args).items():
            if name in IGNORED or value is None or name not in m.args:
                continue
            if m.args[name] != value:
                return f"setting {name} changed: {m.args[name]!r} -> {value!r}"
        return self.data_changed(m, args)

    def data_changed(self, m: Any, args: Any) -> str | None:
        """The training data's fingerprint against the manifest's, where the stage records one for the whole
        file (no held-out split cut from it)."""
        data = m.data.get("data") if isinstance(m.data.get("data"), dict) else {}
        recorded = (data.get("train") or data.get("prompts") or {}).get("fingerprint")
        if recorded is None or getattr(args, "eval_split", 0):
            return None
        from rlhf_cli.data import load_prefs, load_prompts, load_sft

        try:
            if m.stage == "sft":
                now = load_sft(args.data, args.format, args.max_samples).fingerprint()
                spec = args.data
            elif m.stage == "reward":
                now = load_prefs(args.data, args.format, args.max_samples, use_margin=args.margin).fingerprint()
                spec = args.data
            elif getattr(args, "prompts", None) is not None and "prompts" in data:
                now = load_prompts(args.prompts, args.max_samples).fingerprint()
                spec = args.prompts
            else:
                return None
        except RLHFError:
            return None  # the stage itself words what is wrong with the data
        return f"its data {spec} changed (fingerprint {recorded} -> {now})" if now != recorded else None

    def can_resume(self, args: Any, partial: Path, stage: str) -> bool:
        if not partial.is_dir() or not hasattr(args, "resume"):
            return False
        if stage == "ppo" and getattr(args, "algo", None) == "ppo":
            return (partial / "state" / "state.json").is_file()
        from rlhf_cli.core.training import complete_checkpoints

        return bool(complete_checkpoints(partial))

    def train_stage(self, k: int, stage: str, folder: Path, args: Any, run_path: str, parents: list[str],
                    force: bool) -> Path:
        """Skip the stage if it is done with these settings, else run it (resuming where it can)."""
        why = self.why_run(folder, args, [str(p) for p in parents], force)
        if why is None:
            m = read_manifest(folder)
            self.say(f"round {k}: {stage}: {folder} is done with the same settings, skipped")
            self.record(StageRun(k, stage, folder, "skipped", 0.0, key_metrics(stage, m.metrics), "up to date"))
            return folder
        partial = folder.with_name(folder.name + ".partial")
        resume = not force and self.can_resume(args, partial, stage)
        self.say(f"round {k}: {stage}: {'resuming' if resume else 'running'} into {folder} ({why})")
        fields = set(to_dict(args))
        aside = None
        if "overwrite" in fields:
            args.overwrite = folder.exists()
        elif folder.exists():  # a stage without --overwrite: keep the finished one until the new one is complete
            aside = folder.with_name(folder.name + ".old")
            shutil.rmtree(aside, ignore_errors=True)
            folder.rename(aside)
        if "resume" in fields:
            args.resume = resume
        fn = load_class(run_path)
        t0 = time.time()
        try:
            out = fn(args, self.reporter_for(stage))
        except ConfigError as e:
            if not resume or "resum" not in str(e):
                raise
            self.say(f"round {k}: {stage}: cannot resume ({e}); starting again")
            args.resume, resume = False, False
            out = fn(args, self.reporter_for(stage))
        m = read_manifest(out) if out is not None else None
        if m is None:
            raise Paused(f"{stage} stopped before the end (--stop-after); its checkpoint is in {out}: run "
                         f"`rlhf pipeline {self.recipe.path}` again to resume it")
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        self.remade.add(_norm(folder))
        self.record(StageRun(k, stage, folder, "resumed" if resume else "ran", round(time.time() - t0, 2),
                             key_metrics(stage, m.metrics), why))
        return folder

    def stage3(self, k: int, policy: Path, rm: Path, folder: Path) -> Path:
        r = self.recipe
        reward = str(rm) if r.algo.reward_key else None
        args = stage3_args(r, str(policy), reward, folder, False, False)
        parents = [str(policy)] + ([str(rm)] if reward else [])
        return self.train_stage(k, r.algo.stage, folder, args, r.algo.run, parents, k == 1 and self.forced("stage3"))

    # ---------------------------------------------------------------------------------------------- rounds

    def round_prompts(self, k: int, folder: Path) -> str:
        """Round k's prompts: its own file, or its part of the one file cut into rounds-1 disjoint parts."""
        r = self.recipe
        if r.round_prompts:
            return r.round_prompts[k - 2]
        from rlhf_cli.data import load_prompts

        rows = load_prompts(r.split_prompts).rows
        parts = r.rounds - 1
        lo, hi = (k - 2) * len(rows) // parts, (k - 1) * len(rows) // parts
        if lo == hi:
            raise ConfigError(f"{r.path}: rounds_prompts: {r.split_prompts} holds {len(rows)} prompts, too few for "
                              f"{parts} later rounds; add prompts or give one file per round")
        dest = folder / "prompts.jsonl"
        text = "".join(json.dumps({"prompt": x["prompt"]}, ensure_ascii=False) + "\n" for x in rows[lo:hi])
        if not dest.is_file() or dest.read_text(encoding="utf-8") != text:
            atomic_write_text(dest, text)
        return str(dest)

    def sample(self, k: int, policy: Path, prompts: str, folder: Path) -> Path:
        """K answers per prompt from the current policy (`rlhf generate`, which resumes a cut-off file)."""
        from rlhf_cli.interact.args import GenerateArgs

        out, meta = folder / "samples.jsonl", folder / "samples.json"
        args = GenerateArgs(**self.recipe.generate_values | {"model": str(policy), "prompts": prompts,
                                                              "out": str(out)})
        key = {"policy": _norm(policy), "policy_finished": _finished(policy),
               "args": {n: v for n, v in to_dict(args).items() if n not in IGNORED}}
        if meta.is_file() and out.is_file() and json.loads(meta.read_text(encoding="utf-8")) == key:
            self.record(StageRun(k, "samples", out, "skipped", 0.0, {}, "up to date"))
            return out
        why = "not sampled yet"
        if meta.is_file():  # the policy or the settings changed: these answers are not the current policy's
            args.overwrite, why = True, "the policy or the sampling settings changed"
            meta.unlink()
        elif out.is_file():
            why = "unfinished"
        self.say(f"round {k}: sampling {args.num_samples} answers per prompt from {policy} into {out} ({why})")
        from rlhf_cli.interact.generate import run_generate

        t0 = time.time()
        res = run_generate(args, self.reporter_for("samples"))
        atomic_write_text(meta, json.dumps(key, indent=1) + "\n")
        self.remade.add(_norm(out))
        self.record(StageRun(k, "samples", out, "ran", round(time.time() - t0, 2),
                             {"prompts": res.prompts, "answers": res.prompts * args.num_samples}, why))
        return out

    def rank(self, k: int, samples: Path, folder: Path) -> Path:
        """RUN/roundK/rankings.jsonl covering every sampled prompt: by the judge RM, or else by people."""
        from rlhf_cli.data.io import json_lines

        out = folder / "rankings.jsonl"
        rows = [row for _, row in json_lines(samples.read_text(encoding="utf-8").splitlines())]
        missing, stale = self.uncovered(rows, out)
        judge = self.recipe.auto_label
        meta = folder / "rankings.json"  # which judge ranked them (auto_label), so a judge made again re-ranks
        judged = {"judge": _norm(judge), "judge_finished": _finished(Path(judge))} if judge else None
        if judged and meta.is_file() and json.loads(meta.read_text(encoding="utf-8")) != judged:
            missing = list(range(len(rows)))
        if not missing:
            self.record(StageRun(k, "rankings", out, "skipped", 0.0, {"prompts": len(rows)}, "every prompt ranked"))
            return out
        if self.recipe.auto_label is None:
            extra = (f" ({stale} rows of it rank other answers than {samples.name} holds now: the samples were drawn "
                     f"again, so rank them again)" if stale else "")
            raise Paused(f"round {k}: {len(missing)} of {len(rows)} sampled prompts in {samples} are not ranked yet"
                         f"{extra}: run `rlhf label {samples} --out {out}`, then `rlhf pipeline "
                         f"{self.recipe.path}` again to continue")
        t0 = time.time()
        self.auto_rank(rows, out)
        atomic_write_text(meta, json.dumps(judged, indent=1) + "\n")
        self.remade.add(_norm(out))
        self.record(StageRun(k, "rankings", out, "ran", round(time.time() - t0, 2), {"prompts": len(rows)},
                             f"ranked by {self.recipe.auto_label}"))
        return out

    @staticmethod
    def uncovered(samples: list[dict], rankings: Path) -> tuple[list[int], int]:
        """Indices of sampled rows with no ranking of the same answers, and how many rankings rank other answers."""
        from rlhf_cli.data.io import json_lines
        from rlhf_cli.interact.generate import prompt_key

        def key(prompt: Any) -> str:
            return prompt_key([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)

        ranked: dict[str, list[str]] = {}
        if rankings.is_file():
            for _, row in json_lines(rankings.read_text(encoding="utf-8").splitlines()):
                if isinstance(row, dict) and "prompt" in row and isinstance(row.get("responses"), list):
                    ranked[key(row["prompt"])] = sorted(map(str, row["responses"]))
        missing, stale = [], 0
        for i, row in enumerate(samples):
            got = ranked.get(key(row["prompt"]))
            if got != sorted(map(str, row["responses"])):
                missing.append(i)
                stale += got is not None
        return missing, stale

    def auto_rank(self, rows: list[dict], out: Path) -> None:
        """The judge RM scores every answer; each row's answers best first, with their scores."""
        from rlhf_cli.core.reward_model import RewardModel

        label = self.recipe.auto_label
        self.say(f"ranking {sum(len(r['responses']) for r in rows)} answers with the judge {label} (auto_label)")
        judge = RewardModel.load(RewardModel.locate(label, None, "auto_label"))
        prompts = [r["prompt"] for r in rows for _ in r["responses"]]
        answers = [a for r in rows for a in r["responses"]]
        scores = judge.score_answers(prompts, answers)
        lines, at = [], 0
        for r in rows:
            n = len(r["responses"])
            order = sorted(range(n), key=lambda i, s=scores[at:at + n]: -s[i])
            lines.append({"prompt": r["prompt"], "responses": [r["responses"][i] for i in order],
                          "scores": [scores[at + i] for i in order], "annotator": f"auto:{label}"})
            at += n
        atomic_write_text(out, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))

    def combine(self, k: int, rankings: list[Path], folder: Path) -> Path:
        """Every preference so far as pairs in one file: the recipe's reward data, then each round's rankings;
        each row names its source file."""
        from rlhf_cli.data import load_prefs

        rv = self.recipe.reward_values
        margin = bool(rv.get("margin"))
        sources = [(str(rv["data"]), rv.get("format", "auto"), rv.get("max_samples"))]
        sources += [(str(p), "ranked", None) for p in rankings]
        lines = []
        for spec, fmt, limit in sources:
            ds = load_prefs(spec, fmt, limit, flag=f"round {k} preferences", use_margin=margin)
            lines += [json.dumps({"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
                                  "margin": p["margin"], "source": spec}, ensure_ascii=False) + "\n" for p in ds.rows]
        out = folder / "prefs.jsonl"
        text = "".join(lines)
        if not out.is_file() or out.read_text(encoding="utf-8") != text:
            atomic_write_text(out, text)
        return out

    # ---------------------------------------------------------------------------------------------- eval, report

    def evaluate(self, k: int, policy: Path, previous: Path, sft: Path, rm: Path, folder: Path) -> dict[str, Any]:
        """Held-out RM accuracy, and the policy against the sft stage and against the previous round's policy."""
        from rlhf_cli.evaluation.args import EvalPolicyArgs, EvalRewardArgs

        ev = self.recipe.eval_values
        judge = str(ev.get("reward") or rm)
        dest = folder / EVAL_FILE
        key = {"policy": _norm(policy), "policy_finished": _finished(policy), "previous": _norm(previous),
               "previous_finished": _finished(previous), "sft_finished": _finished(sft), "judge": _norm(judge),
               "judge_finished": _finished(Path(judge)), "rm": _norm(rm), "rm_finished": _finished(rm),
               "prefs": self.recipe.eval_prefs, "args": {n: v for n, v in ev.items() if n not in IGNORED}}
        saved = json.loads(dest.read_text(encoding="utf-8")) if dest.is_file() else None
        if saved and saved.get("key") == key and not (k == 1 and self.forced("eval")) \
                and _norm(policy) not in self.remade:
            self.rounds.append(saved["results"])
            self.record(StageRun(k, "eval", dest, "skipped", 0.0, key_metrics("eval", saved["results"]),
                                 "up to date"))
            return saved["results"]
        from rlhf_cli.evaluation.eval_policy import eval_policy
        from rlhf_cli.evaluation.eval_reward import eval_reward

        t0 = time.time()
        results: dict[str, Any] = {"round": k, "policy": str(policy), "reward": str(rm)}
        if self.recipe.eval_prefs:
            acc = eval_reward(EvalRewardArgs(model=str(rm), data=self.recipe.eval_prefs, threads=ev.get("threads")),
                              self.reporter_for("eval reward"))
            results |= {"rm_accuracy": acc["accuracy"], "rm_length_pearson": acc["length_pearson"],
                        "rm_chosen_shorter_accuracy": acc["chosen_shorter_accuracy"]}
        base = ev | {"model": str(policy), "reward": judge}
        first_round = _norm(previous) == _norm(sft)  # round 1: the previous policy is the sft model
        vs_previous = None if first_round else eval_policy(EvalPolicyArgs(**base | {"baseline": str(previous)}),
                                                           self.reporter_for("eval policy"))
        # against the sft stage last: its eval_policy.json stays in the policy's folder for `rlhf report`
        vs_sft = eval_policy(EvalPolicyArgs(**base | {"baseline": str(sft)}), self.reporter_for("eval policy"))
        vs_previous = vs_previous or vs_sft
        results |= {"mean_score": vs_sft["mean_score"], "kl_to_sft": vs_sft["kl"], "win_rate_vs_sft":
                    vs_sft["win_rate"], "win_rate_vs_previous": vs_previous["win_rate"], "prompts": vs_sft["prompts"]}
        if len(vs_sft.get("judges") or []) > 1:  # `judges:` in the eval section: the win rate under each
            results |= {"win_rate_vs_sft_by_judge": {j["reward"]: j["win_rate"] for j in vs_sft["judges"]},
                        "gain_only_under_training_rm": vs_sft.get("gain_only_under_training_rm")}
        atomic_write_text(dest, json.dumps({"key": key, "results": results}, indent=1, default=str) + "\n")
        self.rounds.append(results)
        self.record(StageRun(k, "eval", dest, "ran", round(time.time() - t0, 2), key_metrics("eval", results), ""))
        return results

    def report(self) -> str | None:
        from rlhf_cli.evaluation.args import ReportArgs
        from rlhf_cli.evaluation.report import make_report

        dest = self.recipe.run / "report.html"
        if dest.is_file() and all(s.status == "skipped" for s in self.stages):
            self.record(StageRun(0, "report", dest, "skipped", 0.0, {}, "nothing changed"))
            return str(dest)
        t0 = time.time()
        res = make_report(ReportArgs(run=str(self.recipe.run)), self.reporter_for("report"))
        plots = len(res["plots"])
        # `rlhf report` reads the stage folders right under a run folder: a later round's folder is a run folder
        # of its own (its reward and stage-3 folders), with a report of its own
        for k in range(2, self.recipe.rounds + 1):
            folder = self.recipe.run / f"round{k}"
            plots += len(make_report(ReportArgs(run=str(folder), title=f"rlhf report: {folder} (round {k})"),
                                     self.reporter_for("report"))["plots"])
        self.record(StageRun(0, "report", Path(res["report"]), "ran", round(time.time() - t0, 2),
                             {"rounds": self.recipe.rounds, "plots": plots}, ""))
        return res["report"]

    def write_summary(self, report: str | None) -> None:
        """RUN/pipeline.json: the recipe, what each step did this time, and each round's figures."""
        body = {"recipe": str(self.recipe.path), "report": report, "rounds": self.rounds,
                "stages": [{"round": s.round, "stage": s.name, "folder": str(s.folder), "status": s.status,
                            "seconds": s.seconds, "why": s.why} for s in self.stages]}
        atomic_write_text(self.recipe.run / "pipeline.json", json.dumps(body, indent=1, default=str) + "\n")


def run_pipeline(recipe: Recipe, from_stage: str | None = None,
                 reporter_for: Callable[[str], Reporter] | None = None,
                 on_stage: Callable[[StageRun], None] | None = None) -> PipelineResult:
    """Run a checked recipe (`recipe.load_recipe`); see the module docstring."""
    return Pipeline(recipe, from_stage, reporter_for, on_stage).run()
