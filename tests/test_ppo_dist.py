"""Our PPO (`rlhf ppo --algo ppo`) in several processes: statistics over the global batch, and real 2-process runs.

Sampling differs per process (each draws from its own seed), so a 2-process run does not repeat a 1-process run
sample for sample. What is checked instead: (a) the batch statistics that decide the update (advantage whitening,
the running reward statistics, the token-weighted figures) are those of the whole batch, on a real 2-rank gloo
group; (b) every process ends with the same weights (the run checks this itself and records `weights_in_sync`);
(c) 2 processes x --batch-size B raise the known-preference score as 1 process x 2B does, over the same prompts;
(d) a run stopped by --stop-after and resumed in 2 processes reaches the uninterrupted 2-process result.

The reward model is test_ppo's hand-set one (the score reads the last token through the policy's own
embeddings), on the same peaky tiny policy, so the score rises within a few dozen updates.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch
from helpers import invoke, ok, one_error, read_jsonl, write_jsonl
from test_ppo import build_rm, peaky_sft
from test_scale import manifest, manifests_under, rlhf, run

from rlhf_cli.core import launch
from rlhf_cli.core.manifest import MANIFEST

# ---------------------------------------------------------------------------------------------------------
# (a) statistics over the global batch, on a real 2-rank gloo group (fast)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_stats(rank: int, world: int, port: int, x: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor,
                out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from rlhf_cli.core import runtime
    from rlhf_cli.stages.ppo.core import RunningMoments, masked_whiten

    share = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
    whitened = masked_whiten(x[share], mask[share], sum_all=runtime.all_reduce)
    moments = RunningMoments()
    for update in scores.split(4):  # three updates of 4 scores, 2 on each process
        moments.update(update.reshape(world, -1)[rank], sum_all=runtime.all_reduce)
    stop = runtime.any_rank(rank == 1)  # a stop asked of rank 1 alone
    torch.save({"whitened": whitened, "moments": moments.state_dict(), "stop": stop}, f"{out}/{rank}.pt")
    torch.distributed.destroy_process_group()


def test_whitening_and_reward_statistics_span_every_process(tmp_path):
    from rlhf_cli.stages.ppo.core import RunningMoments, masked_whiten

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3 + 1
    x[3:] += 4  # the second process's share has another mean: local whitening would differ from global
    mask = torch.ones(6, 5, dtype=torch.float64)
    mask[0, 3:], mask[4, 1:] = 0, 0  # ragged responses, and more tokens on one process than the other
    scores = torch.randn(12, generator=g, dtype=torch.float64) * 2 + 5
    torch.multiprocessing.spawn(_rank_stats, args=(2, _free_port(), x, mask, scores, str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]

    whole = masked_whiten(x, mask)  # one process holding the whole batch
    torch.testing.assert_close(torch.cat([got[0]["whitened"], got[1]["whitened"]]), whole)
    local = masked_whiten(x[:3], mask[:3])
    assert not torch.allclose(got[0]["whitened"], local)  # the test can tell local statistics from global ones
    one = RunningMoments()
    for update in scores.split(4):
        one.update(update)
    for r in (0, 1):
        assert got[r]["moments"]["count"] == one.count == 12
        assert got[r]["moments"]["mean"] == pytest.approx(one.mean, rel=1e-12)
        assert got[r]["moments"]["m2"] == pytest.approx(one.m2, rel=1e-12)
        assert got[r]["stop"] is True  # every rank takes a stop that one rank was asked for


# ---------------------------------------------------------------------------------------------------------
# the command line (fast: nothing is launched)


def test_ppo_dry_run_shows_the_global_batch(tiny, tmp_path):
    from rlhf_cli import PPOArgs, run_ppo
    from rlhf_cli.core.progress import Quiet

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(32)])
    rm = build_rm(tmp_path / "rm", tiny)
    reporter = Quiet()
    run_ppo(PPOArgs(policy=str(tiny), reward=str(rm), prompts=str(prompts), out=str(tmp_path / "ppo"), batch_size=4,
                    num_processes=2, threads=1, max_new_tokens=4, dry_run=True), reporter)
    summary = reporter.planned.summary
    assert summary["optimisation steps"].startswith("4 updates x 8 rollouts (2 processes x --batch-size 4)")
    assert summary["processes"].startswith("2 (accelerate launch")


def test_ppo_refuses_sharded_configs(tmp_path):
    cfg = tmp_path / "zero3.yaml"
    cfg.write_text("distributed_type: DEEPSPEED\nnum_processes: 2\n")
    one_error(invoke("ppo", "--run", tmp_path, "--prompts", tmp_path / "p.jsonl", "--accelerate-config", cfg), 2,
              "does not shard them with DeepSpeed", "examples/accelerate/ddp.yaml")


# ---------------------------------------------------------------------------------------------------------
# real 2-process runs (gloo on the CPU)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_dist")
    run_dir = root / "run"
    policy = peaky_sft(run_dir / "sft")
    build_rm(run_dir / "reward", policy)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(32)])
    return SimpleNamespace(root=root, run=run_dir, prompts=prompts)


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


STEPS = 12
# per process: minibatches of 4 in 2 micro-batches (DDP's no_sync inside a minibatch), reward normalisation and the
# adaptive KL controller on (both fed the global batch); a constant learning rate, so the first updates of a
# longer run are those of a shorter one
COMMON = ["--num-minibatches", 2, "--grad-accum", 2, "--lr", "1e-3", "--lr-scheduler", "constant", "--threads", 1,
          "--max-new-tokens", 4, "--sample-every", 1, "--normalize-rewards", "--adaptive-kl", "--kl-target", 2,
          "--kl-horizon", 200]


@pytest.fixture(scope="module")
def two(w):
    """A 2-process run of STEPS updates x 2 x 8 rollouts, and what the launcher printed."""
    out = w.root / "two" / "ppo"
    launched = run("ppo", "--run", w.run, "--prompts", w.prompts, *COMMON, "--max-steps", STEPS, "--out", out,
                   "--batch-size", 8, "--num-processes", 2)
    return SimpleNamespace(out=out, stderr=launched.stderr, stdout=launched.stdout)


@pytest.mark.slow
def test_two_processes_learn_like_one(w, two):
    one = w.root / "one" / "ppo"
    ok(invoke("ppo", "--run", w.run, "--prompts", w.prompts, *COMMON, "--max-steps", STEPS, "--out", one,
              "--batch-size", 16))
    assert "launching 2 processes: accelerate launch" in two.stderr
    assert f"{STEPS} updates x 16 rollouts (2 processes x 8)" in two.stderr
    assert two.stdout.count("ppo finished") == 1  # rank 0 speaks

    m2, m1 = manifest(two.out), manifest(one)
    assert (m2["processes"], m1["processes"]) == (2, 1)
    assert m2["metrics"]["episodes"] == m1["metrics"]["episodes"] == STEPS * 16
    assert m2["metrics"]["weights_in_sync"] is True and "weights_in_sync" not in m1["metrics"]
    assert manifests_under(w.root / "two") == [two.out / MANIFEST]
    assert sorted(p.name for p in (w.root / "two").iterdir()) == ["ppo"]  # no .partial left

    r2, r1 = read_jsonl(two.out / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert [r["step"] for r in r2] == list(range(1, STEPS + 1))
    assert [r["episodes"] for r in r2] == [r["episodes"] for r in r1]
    # the same prompts each update: rank 0 takes the first half of the one-process batch (samples: its first 3)
    s2, s1 = read_jsonl(two.out / "samples.jsonl"), read_jsonl(one / "samples.jsonl")
    assert [(s["step"], s["prompt"]) for s in s2] == [(s["step"], s["prompt"]) for s in s1]
    # both learn the known preference (different samples: not equal, update by update)
    for rows in (r1, r2):
        first, last = mean(r["score_mean"] for r in rows[:4]), mean(r["score_mean"] for r in rows[-4:])
        assert last > first + 0.4, (first, last)
        assert max(r["check/first_logratio_max"] for r in rows) < 1e-5  # ratio 1 at the start of every update
    assert r2[-1]["kl_coef"] != r2[0]["kl_coef"]  # the adaptive controller moved (on the global KL)


@pytest.mark.slow
def test_two_processes_stop_and_resume(w, two):
    """--stop-after in 2 processes, then --resume in 2: the first updates of the uninterrupted 2-process run, figure
    for figure (each process re-seeds from (seed, update, rank); rank 0's checkpoint holds the shared state)."""
    cut = w.root / "cut" / "ppo"
    common = ["ppo", "--run", w.run, "--prompts", w.prompts, *COMMON, "--max-steps", 4, "--out", cut,
              "--batch-size", 8]
    run(*common, "--num-processes", 2, "--stop-after", 2)
    partial = cut.with_name("ppo.partial")
    assert json.loads((partial / "state" / "state.json").read_text())["processes"] == 2
    assert len(read_jsonl(partial / "metrics.jsonl")) == 2
    one_error(invoke(*common, "--resume"), 2, "made by 2 processes, not 1", "--num-processes 2")
    run(*common, "--num-processes", 2, "--resume")
    assert manifest(cut)["processes"] == 2 and not partial.exists()
    rc, r2 = read_jsonl(cut / "metrics.jsonl"), read_jsonl(two.out / "metrics.jsonl")[:4]
    assert [r["step"] for r in rc] == [1, 2, 3, 4]
    for a, b in zip(r2, rc, strict=True):
        for k, v in a.items():
            if not k.startswith("time/") and k != "episodes_per_second":
                assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (a["step"], k)


@pytest.mark.slow
def test_sigterm_stops_both_processes_after_the_same_update(w):
    out = w.root / "term" / "ppo"
    cmd = ["ppo", "--run", w.run, "--prompts", w.prompts, *COMMON, "--max-steps", 200, "--save-every", 2,
           "--out", out, "--batch-size", 4, "--num-processes", 2]
    env = dict(os.environ, COLUMNS="400")
    for k in launch.LAUNCHER_ENV:
        env.pop(k, None)
    proc = subprocess.Popen(rlhf(*cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ready = out.with_name("ppo.partial") / "state" / "state.json"
    t0 = time.time()
    while not ready.is_file():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 180, "no checkpoint appeared"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to the launcher, which passes it to both ranks
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, (proc.returncode, stderr[-3000:])
    line = " ".join(stderr.split())
    assert "stopped by SIGTERM after update" in line and "--num-processes 2 --resume" in line, stderr[-3000:]
    state = json.loads(ready.read_text())
    assert 2 < state["step"] < 200 and state["processes"] == 2  # the stop's own checkpoint
    assert len(read_jsonl(out.with_name("ppo.partial") / "metrics.jsonl")) == state["step"]  # rank 0 logged each once
    assert not out.exists()
