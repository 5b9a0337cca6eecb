"""`rlhf report`: one page that shows how a run went, stage by stage.

Reads every stage folder of a run (`sft`, `reward`, `ppo`, ...: any subfolder holding `rlhf_manifest.json`, plus
unfinished `*.partial` folders that already hold a `metrics.jsonl`, such as a PPO run still in progress) and draws
PNG plots with matplotlib:

- training loss per stage, from the stage's `metrics.jsonl` (one JSON object per logged step); a stage without
  one falls back to the figures in its manifest (mean train loss at the last step, eval loss before and after);
- reward model accuracy per step, where logged;
- score (mean, with a band of one standard deviation), KL to the reference and response length per PPO update;
- a histogram of the policy's and the baseline's reward-model scores from the stage's `eval_policy.json`
  (written by `rlhf eval policy`).

Tables show what `rlhf eval policy` measured (with a row per judge and the warning when a gain holds only under the
training RM) and, in a reward stage, what `rlhf eval reward` measured (`eval_reward.json`: accuracy, the length
correlations, accuracy where the chosen answer is shorter / longer, accuracy per margin bucket).

The report is a self-contained HTML file (plots embedded as base64 data URIs) or Markdown (plots beside it); both
hold a table of each stage's manifest metrics and a few of PPO's `samples.jsonl`. The PNGs always go to
`REPORT_plots/` next to the report, each exactly FIGSIZE * DPI pixels.

    rlhf report runs/demo                      # writes runs/demo/report.html
    rlhf report runs/demo --out runs/demo/report.md --json
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_cli.core.errors import CheckpointError, ConfigError, RLHFError
from rlhf_cli.core.manifest import MANIFEST, Manifest, read_manifest
from rlhf_cli.core.progress import Reporter, fmt
from rlhf_cli.core.stages import EVAL_FILE, EVAL_REWARD_FILE, ORDER
from rlhf_cli.data.io import json_lines
from rlhf_cli.evaluation.args import ReportArgs

FIGSIZE = (6.4, 4.0)  # inches
DPI = 100  # so every plot is 640 x 400 pixels
SAMPLES_SHOWN = 6


@dataclass
class Stage:
    name: str  # the folder's name: sft, reward, ppo, ppo.partial (a run in progress next to a finished one)
    folder: Path
    stage: str  # the manifest's stage, else guessed from the folder name
    manifest: Manifest | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    source: str = "none"  # metrics.jsonl, manifest, or none
    skipped_lines: int = 0
    eval_policy: dict[str, Any] | None = None
    eval_reward: dict[str, Any] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Reading a run


def _jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Objects of a JSONL file; lines that are not JSON objects (a line cut off while a stage was writing it)
    are skipped and counted."""
    rows, bad = [], 0
    for _, row in json_lines(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        if isinstance(row, dict):
            rows.append(row)
        else:  # not JSON, or not an object
            bad += 1
    return rows, bad


def manifest_rows(m: Manifest | None) -> list[dict[str, Any]]:
    """What a manifest says about training, as metrics rows: the fallback for stages without metrics.jsonl."""
    if m is None:
        return []
    mt = m.metrics
    last = mt.get("steps") or mt.get("updates")
    rows: list[dict[str, Any]] = []
    before = {k: mt[k] for k in ("eval_loss_before", "eval_accuracy_before") if _num(mt.get(k))}
    if before:
        rows.append({"step": 0} | {k.removesuffix("_before"): v for k, v in before.items()})
    if last:
        after = {k: mt[k] for k in ("train_loss", "eval_loss", "eval_accuracy") if _num(mt.get(k))}
        if "train_loss" in after:
            after["loss"] = after.pop("train_loss")
        if after:
            rows.append({"step": last} | after)
    return rows


def flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested manifest metrics (the memory plan) as one row each: `memory.estimate_gb`, ..."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def read_metrics(folder: str | Path) -> tuple[list[dict[str, Any]], str, int]:
    """A stage's metrics rows and where they came from: `metrics.jsonl` when it holds any, else the manifest's
    figures (`manifest`), else nothing (`none`). Also returns how many unreadable lines were skipped."""
    folder = Path(folder)
    path = folder / "metrics.jsonl"
    bad = 0
    if path.is_file():
        rows, bad = _jsonl(path)
        if rows:
            return rows, "metrics.jsonl", bad
    rows = manifest_rows(read_manifest(folder))
    return rows, ("manifest" if rows else "none"), bad


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def find_stages(run: Path) -> list[Stage]:
    """The stage folders of a run (or the run itself, when it is one stage folder), in recipe order."""
    candidates: list[tuple[Path, Manifest | None]] = []
    own = read_manifest(run)
    if own is not None:
        candidates.append((run, own))
    else:
        for d in sorted(p for p in run.iterdir() if p.is_dir()):
            m = read_manifest(d)
            if m is not None:
                candidates.append((d, m))
            elif d.name.endswith(".partial") and (d / "metrics.jsonl").is_file():
                candidates.append((d, None))
    stages = [Stage(name=d.name, folder=d, stage=m.stage if m else d.name.removesuffix(".partial"), manifest=m)
              for d, m in candidates]

    def key(s: Stage) -> tuple:
        started = (s.manifest.data.get("started") if s.manifest else None) or "~"
        rank = ORDER.index(s.stage) if s.stage in ORDER else len(ORDER)
        return (rank, started, s.name, s.manifest is None)

    return sorted(stages, key=key)


def _json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object file, None when missing or unreadable (an evaluation is extra, never a reason to fail)."""
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def load_stage(s: Stage) -> Stage:
    s.rows, s.source, s.skipped_lines = read_metrics(s.folder)
    s.eval_policy = _json_object(s.folder / EVAL_FILE)
    s.eval_reward = _json_object(s.folder / EVAL_REWARD_FILE)
    if (s.folder / "samples.jsonl").is_file():
        s.samples = _jsonl(s.folder / "samples.jsonl")[0][-SAMPLES_SHOWN:]
    return s


# ---------------------------------------------------------------------------------------------------------
# Plots


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(rows):
        if _num(r.get(key)):
            xs.append(r["step"] if _num(r.get("step")) else i + 1)
            ys.append(float(r[key]))
    return xs, ys


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if xlabel in ("step", "update"):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _lines(ax: Any, rows: list[dict[str, Any]], keys: list[str], labels: dict[str, str] | None = None) -> bool:
    drawn = False
    for key in keys:
        xs, ys = _series(rows, key)
        if xs:
            style = "o-" if len(xs) < 30 else "-"
            ax.plot(xs, ys, style, markersize=3, label=(labels or {}).get(key, key))
            drawn = True
    if drawn:
        ax.legend(loc="best", fontsize="small")
    return drawn


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, format="png")  # no bbox_inches="tight": keeps the size exactly FIGSIZE * DPI
    return path


def plot_stage(s: Stage, folder: Path) -> dict[str, Path]:
    """The PNGs for one stage, by plot name."""
    plots: dict[str, Path] = {}
    rows = s.rows
    from_manifest = s.source == "manifest"
    loss_keys = [k for k in ("loss", "eval_loss", "policy_loss", "value_loss") if _series(rows, k)[0]]
    if loss_keys:
        fig, ax = _figure(f"{s.name}: loss" + (" (from the manifest)" if from_manifest else ""),
                          "update" if s.stage == "ppo" else "step", "loss")
        _lines(ax, rows, loss_keys, {"loss": "mean train loss" if from_manifest else "train loss"})
        plots[f"{s.name}_loss"] = _save(fig, folder / f"{s.name}_loss.png")
    acc_keys = [k for k in ("accuracy", "eval_accuracy") if _series(rows, k)[0]]
    if acc_keys:
        fig, ax = _figure(f"{s.name}: pairwise accuracy" + (" (from the manifest)" if from_manifest else ""),
                          "step", "accuracy")
        _lines(ax, rows, acc_keys)
        ax.set_ylim(-0.02, 1.02)
        plots[f"{s.name}_accuracy"] = _save(fig, folder / f"{s.name}_accuracy.png")
    if _series(rows, "score_mean")[0]:
        fig, ax = _figure(f"{s.name}: reward model score per update", "update", "score")
        xs, ys = _series(rows, "score_mean")
        ax.plot(xs, ys, "-", label="mean score")
        band = [(r.get("step", i + 1), r["score_mean"], r["score_std"]) for i, r in enumerate(rows)
                if _num(r.get("score_mean")) and _num(r.get("score_std"))]
        if band:
            bx = [b[0] for b in band]
            ax.fill_between(bx, [b[1] - b[2] for b in band], [b[1] + b[2] for b in band], alpha=0.2,
                            label="± 1 std")
        ax.legend(loc="best", fontsize="small")
        plots[f"{s.name}_score"] = _save(fig, folder / f"{s.name}_score.png")
        for key, title, ylabel in (("kl", "KL to the reference per update", "KL (nats per response)"),
                                   ("response_length", "response length per update", "tokens")):
            if _series(rows, key)[0]:
                fig, ax = _figure(f"{s.name}: {title}", "update", ylabel)
                _lines(ax, rows, [key])
                plots[f"{s.name}_{key}"] = _save(fig, folder / f"{s.name}_{key}.png")
    per = (s.eval_policy or {}).get("per_prompt") or []
    scores = [r["score"] for r in per if isinstance(r, dict) and _num(r.get("score"))]
    base = [r["baseline_score"] for r in per if isinstance(r, dict) and _num(r.get("baseline_score"))]
    if scores and base:
        fig, ax = _figure(f"{s.name}: reward model scores on {len(scores)} prompts (dashed: means)", "score",
                          "answers")
        lo, hi = min(scores + base), max(scores + base)
        bins = 20 if hi > lo else 1
        rng = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
        ax.hist(base, bins=bins, range=rng, alpha=0.55, label=f"baseline {_short(s.eval_policy.get('baseline'))}")
        ax.hist(scores, bins=bins, range=rng, alpha=0.55, label=f"policy {_short(s.eval_policy.get('model'))}")
        for xs, color in ((base, "C0"), (scores, "C1")):
            ax.axvline(sum(xs) / len(xs), color=color, linestyle="--", linewidth=1)
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best", fontsize="small")
        plots[f"{s.name}_eval_scores"] = _save(fig, folder / f"{s.name}_eval_scores.png")
    return plots


def _short(path: Any) -> str:
    p = str(path or "?")
    return p if len(p) <= 40 else "..." + p[-37:]


# ---------------------------------------------------------------------------------------------------------
# HTML and Markdown

EVAL_SHOWN = ("prompts", "win_rate", "win_rate_ci", "tie_rate", "loss_rate", "mean_score", "baseline_mean_score",
              "kl", "mean_length", "baseline_mean_length", "distinct_1", "distinct_2", "baseline_distinct_1",
              "baseline_distinct_2", "baseline", "reward", "prompts_file", "temperature", "top_p", "top_k",
              "max_new_tokens", "seed", "baseline_seed")


EVAL_POLICY_CAPTION = "rlhf eval policy (win_rate counts a tie as half; 95% Wilson interval)"
EVAL_REWARD_SHOWN = ("data", "pairs", "accuracy", "mean_margin", "mean_chosen_score", "mean_rejected_score",
                     "length_pearson", "length_spearman", "mean_chosen_length", "mean_rejected_length",
                     "chosen_shorter_pairs", "chosen_shorter_accuracy", "chosen_longer_pairs",
                     "chosen_longer_accuracy", "chosen_same_length_pairs")


def eval_policy_rows(ev: dict[str, Any]) -> dict[str, Any]:
    """The eval policy table: EVAL_SHOWN, a row per judge when there are several, the warning."""
    rows = {k: ev[k] for k in EVAL_SHOWN if k in ev}
    judges = [j for j in ev.get("judges") or [] if isinstance(j, dict)]
    if len(judges) > 1:
        for j in judges:
            lo, hi = (j.get("win_rate_ci") or [None, None])[:2]
            rows[f"judge {j.get('reward')}" + (" (training RM)" if j.get("training_rm") else "")] = (
                f"win_rate {_value(j.get('win_rate'))} (95% CI {_value(lo)}-{_value(hi)}), mean score "
                f"{_value(j.get('mean_score'))} vs baseline {_value(j.get('baseline_mean_score'))}")
    for k in ("training_reward", "gain_only_under_training_rm", "warning"):
        if ev.get(k) is not None:
            rows[k] = ev[k]
    return rows


def eval_reward_rows(ev: dict[str, Any]) -> dict[str, Any]:
    """The eval reward table: EVAL_REWARD_SHOWN, then accuracy per margin bucket (calibration)."""
    rows = {k: ev[k] for k in EVAL_REWARD_SHOWN if k in ev}
    for i, b in enumerate(ev.get("by_margin") or [], 1):
        if isinstance(b, dict):
            rows[f"accuracy, margin bucket {i} (|margin| {_value(b.get('margin_from'))}-"
                 f"{_value(b.get('margin_to'))})"] = f"{_value(b.get('accuracy'))} ({_value(b.get('pairs'))} pairs)"
    return rows


def _eval_reward_caption(ev: dict[str, Any]) -> str:
    return (f"rlhf eval reward on {ev.get('data')} (length: answer tokens; margin buckets: pairs sorted by "
            f"|chosen - rejected score|, nearly equal counts)")


def _value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, float)):
        return fmt(v)
    if isinstance(v, list) and all(_num(x) for x in v):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def _stage_facts(s: Stage) -> dict[str, Any]:
    facts: dict[str, Any] = {"stage": s.stage, "folder": str(s.folder),
                             "status": "finished" if s.manifest else "unfinished (no manifest yet)",
                             "metrics from": s.source + (f" ({s.skipped_lines} unreadable lines skipped)"
                                                         if s.skipped_lines else "")}
    if s.manifest is not None:
        d = s.manifest.data
        facts |= {"parents": ", ".join(map(str, d.get("parents") or [])) or None, "finished": d.get("finished"),
                  "seconds": d.get("seconds")}
    if s.rows:
        facts["logged steps"] = len(s.rows)
    return {k: v for k, v in facts.items() if v is not None}


def render_html(title: str, run: Path, stages: list[Stage], plots: dict[str, dict[str, Path]]) -> str:
    e = html.escape

    def table(rows: dict[str, Any], caption: str) -> str:
        body = "".join(f"<tr><th>{e(str(k))}</th><td>{e(_value(v))}</td></tr>" for k, v in rows.items())
        return f"<table><caption>{e(caption)}</caption>{body}</table>" if rows else ""

    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 8px;"
             "text-align:left;vertical-align:top}caption{text-align:left;font-weight:bold}"
             "img{max-width:100%;display:block;margin:0.5em 0}td.t{white-space:pre-wrap}</style></head><body>",
             f"<h1>{e(title)}</h1>",
             f"<p>Run folder <code>{e(str(run))}</code>, {len(stages)} stage{'s' if len(stages) != 1 else ''}; "
             f"made {e(_now())} by <code>rlhf report</code>.</p>"]
    for s in stages:
        parts.append(f"<h2 id=\"{e(s.name)}\">{e(s.name)}</h2>")
        parts.append(table(_stage_facts(s), "stage"))
        if s.manifest is not None:
            parts.append(table(flat(s.manifest.metrics), "manifest metrics"))
        if s.eval_reward:
            parts.append(table(eval_reward_rows(s.eval_reward), _eval_reward_caption(s.eval_reward)))
        if s.eval_policy:
            parts.append(table(eval_policy_rows(s.eval_policy), EVAL_POLICY_CAPTION))
        for name, path in plots.get(s.name, {}).items():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(f"<img src=\"data:image/png;base64,{data}\" alt=\"{e(name)}\" width=\"{_px()[0]}\" "
                         f"height=\"{_px()[1]}\">")
        if s.samples:
            rows = "".join(f"<tr><td>{e(str(x.get('step', '')))}</td><td class=\"t\">{e(_prompt_text(x))}</td>"
                           f"<td class=\"t\">{e(str(x.get('response', '')))}</td><td>{e(_value(x.get('score')))}"
                           f"</td></tr>" for x in s.samples)
            parts.append(f"<table><caption>last {len(s.samples)} samples (samples.jsonl)</caption><tr><th>update"
                         f"</th><th>prompt</th><th>response</th><th>score</th></tr>{rows}</table>")
    parts.append("</body></html>\n")
    return "\n".join(p for p in parts if p)


def render_markdown(title: str, run: Path, stages: list[Stage], plots: dict[str, dict[str, Path]],
                    base: Path) -> str:
    def cell(v: Any) -> str:
        return _value(v).replace("|", "\\|").replace("\n", " ")

    def table(rows: dict[str, Any], caption: str) -> list[str]:
        if not rows:
            return []
        return [f"**{caption}**", "", "| | |", "|---|---|"] + [f"| {cell(k)} | {cell(v)} |" for k, v in rows.items()] \
            + [""]

    out = [f"# {title}", "", f"Run folder `{run}`, {len(stages)} stage{'s' if len(stages) != 1 else ''}; made "
           f"{_now()} by `rlhf report`.", ""]
    for s in stages:
        out += [f"## {s.name}", ""]
        out += table(_stage_facts(s), "stage")
        if s.manifest is not None:
            out += table(flat(s.manifest.metrics), "manifest metrics")
        if s.eval_reward:
            out += table(eval_reward_rows(s.eval_reward), _eval_reward_caption(s.eval_reward))
        if s.eval_policy:
            out += table(eval_policy_rows(s.eval_policy), EVAL_POLICY_CAPTION)
        for name, path in plots.get(s.name, {}).items():
            out += [f"![{name}]({path.relative_to(base).as_posix()})", ""]
        if s.samples:
            out += [f"**last {len(s.samples)} samples (samples.jsonl)**", "", "| update | prompt | response | score |",
                    "|---|---|---|---|"]
            out += [f"| {cell(x.get('step', ''))} | {cell(_prompt_text(x))} | {cell(x.get('response', ''))} | "
                    f"{cell(x.get('score'))} |" for x in s.samples] + [""]
    return "\n".join(out) + "\n"


def _prompt_text(sample: dict[str, Any]) -> str:
    p = sample.get("prompt")
    if isinstance(p, list) and p and isinstance(p[-1], dict):
        return str(p[-1].get("content", ""))
    return str(p or "")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _px() -> tuple[int, int]:
    return round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI)


# ---------------------------------------------------------------------------------------------------------
# The command


def make_report(args: ReportArgs, reporter: Reporter | None = None) -> dict[str, Any]:
    """Read the run, draw the plots, write the report; returns a summary (report path, plot paths, metrics)."""
    reporter = reporter or Reporter()
    if args.run is None:
        raise ConfigError("RUN: missing; pass the run folder, e.g. `rlhf report runs/demo`")
    run = Path(args.run)
    if not run.is_dir():
        raise CheckpointError(f"{run}: no such folder; expected a run folder with stage folders (sft, reward, ppo), "
                              f"made by `rlhf sft --run {run} ...`")
    out = Path(args.out) if args.out else run / "report.html"
    if out.suffix.lower() not in (".html", ".htm", ".md"):
        raise ConfigError(f"--out {out}: expected a .html or .md file")
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; expected a .html or .md file")
    stages = [load_stage(s) for s in find_stages(run)]
    if not stages:
        raise CheckpointError(f"{run}: no stage folders in it (no subfolder holds {MANIFEST}); make one with "
                              f"`rlhf sft --run {run} ...`, or pass the run folder that holds them")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RLHFError("rlhf report needs matplotlib: pip install matplotlib") from None

    title = args.title or f"rlhf report: {run}"
    plot_dir = out.with_name(out.stem + "_plots")
    plot_dir.mkdir(parents=True, exist_ok=True)
    for old in plot_dir.glob("*.png"):  # plots of stages that are gone would linger next to a Markdown report
        old.unlink()
    plots: dict[str, dict[str, Path]] = {}
    for s in stages:
        plots[s.name] = plot_stage(s, plot_dir)
        reporter.info(f"{s.name}: {s.stage} stage, metrics from {s.source}, {len(plots[s.name])} plots")
    if out.suffix.lower() == ".md":
        text = render_markdown(title, run, stages, plots, out.parent)
    else:
        text = render_html(title, run, stages, plots)
    out.write_text(text, encoding="utf-8")
    return {
        "report": str(out), "format": "markdown" if out.suffix.lower() == ".md" else "html", "title": title,
        "run": str(run), "plot_dir": str(plot_dir), "plot_size": list(_px()),
        "plots": {name: str(p) for ps in plots.values() for name, p in ps.items()},
        "stages": [{"name": s.name, "stage": s.stage, "folder": str(s.folder), "finished": s.manifest is not None,
                    "metrics_source": s.source, "logged_steps": len(s.rows),
                    "metrics": flat(s.manifest.metrics) if s.manifest else {},
                    "eval_policy": ({k: v for k, v in s.eval_policy.items() if k != "per_prompt"}
                                    if s.eval_policy else None),
                    "eval_reward": s.eval_reward}
                   for s in stages],
    }
