#!/usr/bin/env bash
# bench/gpu_check.sh: the GPU paths end to end on one CUDA GPU, with one table at the end.
#
#   bash bench/gpu_check.sh [RUN_DIR]        (default runs/gpu_check; PYTHON=... picks the interpreter)
#
# 1. Set-up: `pip install -e .` when rlhf_cli is not importable, `pip install vllm` when vllm is not (skip with
#    NO_VLLM_INSTALL=1; without vllm the vLLM rows say so and the rest still runs), the default model prepared.
# 2. `rlhf pipeline examples/recipes/gpu_check.yaml`: sft, reward, our PPO with --use-vllm, eval.
# 3. Beside it, on the same sft and reward stages: our PPO with transformers' generate (the same settings: the
#    baseline of the vLLM rollouts), grpo with TRL's colocated vLLM, best-of-n sampling with vLLM.
# 4. One table: per stage the wall time, generated tokens per second (training throughput for sft/reward), the
#    peak GPU memory (torch's max_memory_allocated from the manifest, and the peak nvidia-smi saw), and whether
#    vLLM generated.
# Sized for under 8 minutes on one H100 (SmolLM2-135M, the example data); each step has its own time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/gpu_check}
PY=${PYTHON:-python}
LOGS=$RUN/gpu_check_logs
STEP_LIMIT=${STEP_LIMIT:-240}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # the embedded default model and the example data: nothing to fetch
export TOKENIZERS_PARALLELISM=false

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "error: bench/gpu_check.sh needs a CUDA GPU (nvidia-smi found none)" >&2
  exit 2
fi
mkdir -p "$LOGS"
: > "$LOGS/steps.tsv"

# ------------------------------------------------------------------------------------------------ set-up
t_setup=$(date +%s)
"$PY" -c "import rlhf_cli" 2>/dev/null || "$PY" -m pip install -q -e . || { echo "error: pip install -e . failed" >&2; exit 1; }
if ! "$PY" -c "import vllm" 2>/dev/null && [ -z "${NO_VLLM_INSTALL:-}" ]; then
  "$PY" -m pip install -q vllm || echo "vllm could not be installed: the vLLM steps will fail with their one-line error" >&2
fi
HAVE_VLLM=$("$PY" -c "import vllm; print(vllm.__version__)" 2>/dev/null || echo "no")
"$PY" -m rlhf_cli models --prepare >/dev/null || { echo "error: could not prepare the default model" >&2; exit 1; }
echo "set-up: $(( $(date +%s) - t_setup ))s; vllm: $HAVE_VLLM; $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader)"

# ------------------------------------------------------------------------------------------------ steps
# step NAME FOLDERS -- COMMAND...: runs COMMAND under a time limit while nvidia-smi samples the GPU's used memory;
# records NAME, seconds, exit status, peak MiB seen and the stage folders it made.
step() {
  local name=$1 folders=$2
  shift 3
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$LOGS/$name.smi" 2>/dev/null &
  local sampler=$!
  local t0 rc
  t0=$(date +%s%N)
  timeout "$STEP_LIMIT" "$@" > "$LOGS/$name.out" 2> "$LOGS/$name.err"
  rc=$?
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  local secs peak
  secs=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  peak=$(sort -n "$LOGS/$name.smi" 2>/dev/null | tail -1)
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$secs" "$rc" "${peak:-?}" "$folders" >> "$LOGS/steps.tsv"
  echo "$name: exit $rc after ${secs}s$([ "$rc" != 0 ] && echo " ($(tail -1 "$LOGS/$name.err"))")"
}

RLHF=("$PY" -m rlhf_cli)
PPO_FLAGS=(--prompts examples/data/hh_prompts_train.jsonl --max-steps 20 --batch-size 32 --num-minibatches 2
           --ppo-epochs 2 --max-new-tokens 64 --temperature 0.7 --lr 1e-5 --kl-coef 0.05 --missing-eos-penalty 1.0
           --sample-every 0 --seed 42)

step pipeline "sft reward ppo" -- "${RLHF[@]}" pipeline examples/recipes/gpu_check.yaml --run "$RUN"
step ppo-hf "ppo-hf" -- "${RLHF[@]}" ppo --run "$RUN" --out "$RUN/ppo-hf" --overwrite "${PPO_FLAGS[@]}"
step grpo-vllm "grpo-vllm" -- "${RLHF[@]}" ppo --run "$RUN" --out "$RUN/grpo-vllm" --overwrite --algo grpo \
  --use-vllm --vllm-gpu-memory-utilization 0.3 --prompts examples/data/hh_prompts_train.jsonl --max-steps 10 \
  --batch-size 32 --group-size 4 --max-new-tokens 64 --lr 1e-6 --sample-every 0 --seed 42
step bon-vllm "bon-vllm" -- "${RLHF[@]}" best-of-n --run "$RUN" --out "$RUN/bon-vllm" --overwrite --use-vllm \
  --prompts examples/data/hh_prompts_train.jsonl --max-samples 128 -k 4 --max-new-tokens 64 --max-steps 10

# ------------------------------------------------------------------------------------------------ the table
"$PY" - "$RUN" "$LOGS/steps.tsv" <<'EOF'
import json
import sys
from pathlib import Path

run, steps = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for line in steps.read_text().splitlines():
    name, secs, rc, smi_peak, folders = line.split("\t")
    for folder in folders.split():
        m_path = run / folder / "rlhf_manifest.json"
        m = json.loads(m_path.read_text()) if m_path.is_file() else {}
        met = m.get("metrics", {})
        tps, what = None, ""
        metrics_file = run / folder / "metrics.jsonl"
        if met.get("updates") and metrics_file.is_file():  # ppo / grpo: generated response tokens per second
            hist = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
            batch = m.get("args", {}).get("batch_size", 0)
            tokens = sum((h.get("response_length") or 0) * batch for h in hist)
            gen = sum(h.get("time/generate") or 0 for h in hist)
            tps, what = (tokens / gen, "gen") if gen else (tokens / max(m.get("seconds", 0), 1e-9), "stage")
        elif met.get("new_tokens") and met.get("sampling_seconds"):  # best-of-n: sampling
            tps, what = met["new_tokens"] / met["sampling_seconds"], "gen"
        else:  # sft / reward: what the Trainer reported
            for k in ("train_tokens_per_second", "train_samples_per_second"):
                if met.get(k):
                    tps, what = met[k], "train tok" if "tokens" in k else "train ex"
                    break
        peak = (met.get("memory") or {}).get("measured_peak_gb")
        rows.append((folder, m.get("seconds"), tps, what, peak, smi_peak, met.get("generation", "-"),
                     "ok" if m else f"exit {rc}"))
head = ("stage", "seconds", "per second", "", "torch peak GB", "nvidia-smi peak MiB", "generation", "status")
table = [head] + [tuple("-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v)) for v in r)
                  for r in rows]
widths = [max(len(r[i]) for r in table) for i in range(len(head))]
for r in table:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
print("per second: generated tokens/s during generation ('gen'), or the Trainer's training throughput")
EOF
