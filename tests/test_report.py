"""`rlhf report` on a real short run of the tiny model: sft -> reward -> ppo (a few steps each, through the real
CLI) -> `rlhf eval policy`, then the report: valid PNGs of exactly the size asked for, an HTML file that headless
Chromium opens and whose embedded images it decodes, a Markdown file whose image links resolve, and the fallback
to manifest metrics for a stage without metrics.jsonl.

Needs Debian's `chromium` (`apt-get install chromium`): without it the HTML test fails rather than skips.
`--threads 1` throughout: on a small shared machine, two torch threads fighting other processes are several times
slower than one.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import EXAMPLES, invoke, ok, one_error, read_jsonl, write_jsonl

from rlhf_cli.core.manifest import MANIFEST, write_manifest
from rlhf_cli.core.progress import fmt
from rlhf_cli.evaluation.report import DPI, FIGSIZE, flat, read_metrics

FAST = ["--max-steps", "2", "--batch-size", "2", "--threads", "1"]
PX = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
PLOTS = {"sft_loss", "reward_loss", "reward_accuracy", "ppo_loss", "ppo_score", "ppo_kl", "ppo_response_length",
         "ppo_eval_scores"}


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """A real short run: sft, reward and ppo through the CLI, then eval policy (writes ppo/eval_policy.json)."""
    r = tmp_path_factory.mktemp("report") / "run"
    ok(invoke("sft", "--model", tiny, "--data", EXAMPLES / "sft_messages.jsonl", "--run", r, "--max-length", 96,
              *FAST))
    ok(invoke("reward", "--run", r, "--data", EXAMPLES / "prefs_ranked.jsonl", *FAST))
    ok(invoke("ppo", "--run", r, "--prompts", EXAMPLES / "prompts.jsonl", "--max-steps", 3, "--batch-size", 4,
              "--max-new-tokens", 6, "--sample-every", 1, "--threads", 1))
    ok(invoke("eval", "policy", "--run", r, "--prompts", EXAMPLES / "prompts.jsonl", "--max-samples", 8,
              "--baseline-seed", 1, "--threads", 1))
    return SimpleNamespace(dir=r)


def test_report_html_opens_in_chromium_with_every_plot(run, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: the HTML report check needs Debian's chromium "
                    "(apt-get install chromium)")
    out = tmp_path / "report.html"
    res = json.loads(ok(invoke("report", run.dir, "--out", out, "--title", "Tiny run report", "--json")).stdout)
    assert res["report"] == str(out) and res["format"] == "html" and res["plot_size"] == list(PX)
    assert set(res["plots"]) == PLOTS
    for path in res["plots"].values():
        assert Path(path).parent == tmp_path / "report_plots"
        assert png_size(Path(path).read_bytes()) == PX

    # the manifest metrics of every stage, in the summary and in the page
    by_name = {s["name"]: s for s in res["stages"]}
    assert list(by_name) == ["sft", "reward", "ppo"]
    for name, s in by_name.items():
        m = json.loads((run.dir / name / MANIFEST).read_text(encoding="utf-8"))
        assert s["metrics"] == flat(m["metrics"]) and s["finished"] and s["metrics_source"] == "metrics.jsonl"
        assert s["logged_steps"] == len(read_jsonl(run.dir / name / "metrics.jsonl"))
    ev = by_name["ppo"]["eval_policy"]
    assert ev["prompts"] == 8 and "per_prompt" not in ev

    page = out.read_text(encoding="utf-8")
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([\w]+)"', page)
    assert {alt for _, alt in embedded} == PLOTS
    assert all(png_size(base64.b64decode(data)) == PX for data, _ in embedded)
    for s in res["stages"]:  # every manifest metric is a row of its stage's table
        for k, v in s["metrics"].items():
            shown = fmt(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            assert f"<tr><th>{k}</th><td>{html.escape(str(shown))}</td></tr>" in page, k

    # Chromium opens the page and decodes every image (a copy reports their natural sizes into the DOM)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", "<script>window.addEventListener('load', () => document.body."
                                  "setAttribute('data-sizes', [...document.images].map(i => i.naturalWidth + 'x' + "
                                  "i.naturalHeight).join(',')));</script></body>"), encoding="utf-8")
    for target in (out, probe):
        proc = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=5000", "--dump-dom",
             target.as_uri()], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        dom = proc.stdout
        assert "<h1>Tiny run report</h1>" in dom and "<title>Tiny run report</title>" in dom
        assert dom.count('<img src="data:image/png;base64,') == len(PLOTS)
        for name in ("sft", "reward", "ppo"):
            assert f'<h2 id="{name}">{name}</h2>' in dom
    sizes = re.search(r'data-sizes="([^"]*)"', dom).group(1).split(",")
    assert sizes == [f"{PX[0]}x{PX[1]}"] * len(PLOTS)


def test_report_markdown_with_plots_beside_it(run, tmp_path):
    out = tmp_path / "notes" / "run.md"
    out.parent.mkdir()
    result = ok(invoke("report", run.dir, "--out", out))
    assert f"report: {out}" in result.stdout
    text = out.read_text(encoding="utf-8")
    assert text.startswith(f"# rlhf report: {run.dir}\n")
    links = re.findall(r"!\[(\w+)\]\(([^)]+)\)", text)
    assert {name for name, _ in links} == PLOTS
    for _, rel in links:
        assert rel.startswith("run_plots/") and png_size((out.parent / rel).read_bytes()) == PX
    assert "| train_loss |" in text and "**rlhf eval policy" in text and "| win_rate_ci | [" in text
    assert "samples (samples.jsonl)" in text  # ppo's samples, shown as a table


def test_default_out_is_report_html_in_the_run(run):
    ok(invoke("report", run.dir))
    assert (run.dir / "report.html").is_file() and len(list((run.dir / "report_plots").glob("*.png"))) == len(PLOTS)
    # a second report finds the report's own files in the run and ignores them (they are no stages)
    res = json.loads(ok(invoke("report", run.dir, "--json")).stdout)
    assert [s["name"] for s in res["stages"]] == ["sft", "reward", "ppo"]


def test_stage_without_metrics_jsonl_falls_back_to_the_manifest(run, tmp_path):
    """An sft stage without metrics.jsonl (older runs) plots its manifest figures; an unfinished PPO folder with a
    half-written last line is reported as unfinished, the cut line skipped."""
    r = tmp_path / "run"
    shutil.copytree(run.dir / "sft", r / "sft")
    (r / "sft" / "metrics.jsonl").unlink()
    m = json.loads((r / "sft" / MANIFEST).read_text(encoding="utf-8"))["metrics"]
    rows, source, bad = read_metrics(r / "sft")
    assert source == "manifest" and bad == 0
    assert rows == [{"step": m["steps"], "loss": m["train_loss"]}]
    partial = r / "ppo.partial"
    partial.mkdir()
    updates = [{"step": i, "score_mean": 0.1 * i, "score_std": 0.05, "kl": 0.01 * i, "response_length": 5 + i,
                "policy_loss": -0.01, "value_loss": 0.2 / i} for i in range(1, 6)]
    write_jsonl(partial / "metrics.jsonl", updates)
    with (partial / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"step": 6, "score_me')  # the line being written when the report was made
    rows, source, bad = read_metrics(partial)
    assert (rows, source, bad) == (updates, "metrics.jsonl", 1)

    res = json.loads(ok(invoke("report", r, "--json")).stdout)
    stages = {s["name"]: s for s in res["stages"]}
    assert stages["sft"]["metrics_source"] == "manifest" and stages["sft"]["finished"]
    assert stages["ppo.partial"]["finished"] is False and stages["ppo.partial"]["stage"] == "ppo"
    assert stages["ppo.partial"]["logged_steps"] == 5
    assert set(res["plots"]) == {"sft_loss"} | {f"ppo.partial_{k}" for k in ("loss", "score", "kl",
                                                                            "response_length")}
    assert all(png_size(Path(p).read_bytes()) == PX for p in res["plots"].values())
    page = (r / "report.html").read_text(encoding="utf-8")
    assert "<tr><th>metrics from</th><td>manifest</td></tr>" in page
    assert "<tr><th>status</th><td>unfinished (no manifest yet)</td></tr>" in page
    assert "<tr><th>metrics from</th><td>metrics.jsonl (1 unreadable lines skipped)</td></tr>" in page

    # a single stage folder is a report of its own
    one = json.loads(ok(invoke("report", run.dir / "reward", "--out", tmp_path / "rm.html", "--json")).stdout)
    assert [s["name"] for s in one["stages"]] == ["reward"]


def test_import_stays_light():
    """`rlhf --help` stays instant: importing the CLI loads neither matplotlib nor torch."""
    code = ("import sys, rlhf_cli.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'torch'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_report_errors(tmp_path):
    missing = tmp_path / "nope"
    one_error(invoke("report", missing), 1, f"{missing}: no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error(invoke("report", empty), 1, f"{empty}: no stage folders in it", "rlhf sft --run")
    (empty / "sft").mkdir()
    (empty / "sft" / "config.json").write_text("{}")  # an interrupted stage: no manifest, no metrics
    one_error(invoke("report", empty), 1, "no stage folders in it")
    assert not (empty / "report.html").exists()
    write_manifest(empty / "sft", stage="sft", parents=[], args={}, data={}, metrics={}, started=time.time())
    one_error(invoke("report", empty, "--out", tmp_path / "r.pdf"), 2, "expected a .html or .md file")
    one_error(invoke("report"), 2, "RUN: missing")
