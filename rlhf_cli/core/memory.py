"""Memory planning: a training stage's peak memory, estimated before any weights load, and the batch shape that fits.

The estimate is arithmetic on the model's config (layer sizes), its weight files (exact parameter count), the
precision, what is trained (all weights, LoRA adapters, the layers above --freeze-layers), AdamW's two states,
and the activations autograd keeps for the backward pass, which grow with the tokens of one micro-batch:

    peak = runtime + weights + trainable x (gradient + 2 optimiser states)
           + (tokens x per-layer activations + sequences x heads x length^2) x layers that need a backward pass
           + tokens x vocabulary x (logit copies)       (causal LM losses only)

The constants of the per-token terms were measured on CPU (bench/memory.py, docs/BENCHMARKS.md): the estimate
is within 25% of the measured peak resident memory on the default model.

The planner keeps the effective batch (`--batch-size` x `--grad-accum`) and picks the micro-batch (examples per
forward/backward pass): the largest divisor of the effective batch, no larger than `--batch-size`, that fits in
the budget (free RAM on CPU, free device memory on GPU, or `--max-memory`), and on CPU no larger than about
2,048 tokens, because CPU matmuls gain nothing from bigger micro-batches while padding and memory grow. Gradient
checkpointing is turned on only when no micro-batch fits without it; when nothing fits, one error names what
would, before any weight is read.
"""

from __future__ import annotations

import json
import re
import resource
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf_cli.core.errors import ConfigError

GB = 1e9
RUNTIME_BYTES = 0.6e9  # python with torch, transformers, trl and datasets imported (0.45 GB measured), tokenizer, data
CPU_MICRO_TOKENS = 2048  # on CPU, tokens per micro-batch above which throughput stops improving (bench/memory.py)
SAFETY = 0.85  # of the memory that is free: what other processes and the allocator's slack may take meanwhile

# Activations kept for backward, per token per decoder layer, in units of the activation dtype: multiples of the
# hidden and MLP widths. Counting the saved tensors of a Llama layer gives about 8 and 4; the values here are
# least-squares fits to measured peaks on CPU (bench/memory.py, docs/BENCHMARKS.md "Memory"), which also cover
# the backward pass's temporaries and the allocator's slack.
HIDDEN_COPIES = 6
INTERMEDIATE_COPIES = 3
LOGIT_COPIES = 4  # fp32 logits, their log-softmax, the gradient flowing back, and the trainer's own statistics
CHECKPOINTED_LAYER_COPIES = 1  # with gradient checkpointing only each layer's input is kept


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model folder, read without loading a weight."""

    params: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int = 0

    @classmethod
    def of(cls, folder: Path) -> ModelShape:
        try:
            cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{folder}/config.json: unreadable ({e}); expected a model config") from None
        cfg = cfg.get("text_config", cfg)
        hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or 0
        layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers") or 0
        intermediate = cfg.get("intermediate_size") or cfg.get("n_inner") or cfg.get("ffn_dim") or 4 * hidden
        vocab = cfg.get("vocab_size") or 0
        heads = cfg.get("num_attention_heads") or cfg.get("n_head") or 0
        params = weight_params(Path(folder))
        if not params:  # no safetensors to read: count a decoder's weights from its sizes
            params = vocab * hidden * (1 if cfg.get("tie_word_embeddings", True) else 2) + layers * (
                4 * hidden * hidden + 3 * hidden * intermediate)
        return cls(params=params, hidden=int(hidden), intermediate=int(intermediate), layers=int(layers),
                   vocab=int(vocab), heads=int(heads))


def weight_params(folder: Path) -> int:
    """Parameters in a folder's safetensors files, from their headers alone (a few KB read per file)."""
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > f.stat().st_size - 8:  # not a safetensors header (a damaged file): count from the config
                    return 0
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return 0
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t.get("shape", []):
                    count *= d
                total += count
    return total


@dataclass(frozen=True)
class Workload:
    """One training stage's use of a model, as the estimate sees it."""

    causal: bool  # a language-model loss over the vocabulary (sft, a policy); False: one score per sequence
    seq_len: int  # the longest training sequence, in tokens, after truncation
    seqs_per_example: int = 1  # 2 for a preference pair: chosen and rejected
    trainable: int | None = None  # trainable parameters (None: all)
    frozen_layers: int = 0  # no backward pass through these
    weight_bytes: int = 4
    act_bytes: int = 4
    logit_len: int | None = None  # tokens per sequence that get vocabulary logits (None: all; PPO: the response)
    frozen_params: int = 0  # other models held beside it without gradients (PPO's reference and reward model)
    value_model: bool = False  # a second trainable model of the same shape on the same tokens (PPO's value)


def estimate(shape: ModelShape, work: Workload, micro_batch: int, checkpointing: bool = False) -> dict[str, float]:
    """Peak bytes, by part, of training `shape` on micro-batches of `micro_batch` examples."""
    trainable = shape.params if work.trainable is None else work.trainable
    tokens = micro_batch * work.seqs_per_example * work.seq_len
    layers = max(shape.layers - work.frozen_layers, 0)
    per_layer = HIDDEN_COPIES * shape.hidden + INTERMEDIATE_COPIES * shape.intermediate
    # With padding, attention runs on the masked (math) kernel, which keeps each head's L x L probabilities.
    attention = micro_batch * work.seqs_per_example * shape.heads * work.seq_len ** 2 * work.act_bytes
    if checkpointing:  # one layer's activations rebuilt at a time, plus every layer's input
        act = tokens * work.act_bytes * (per_layer + layers * CHECKPOINTED_LAYER_COPIES * shape.hidden) + attention
    else:
        act = (tokens * work.act_bytes * per_layer + attention) * layers
    logit_tokens = tokens if work.logit_len is None else micro_batch * work.seqs_per_example * work.logit_len
    logits = logit_tokens * shape.vocab * 4 * LOGIT_COPIES if work.causal else 0  # the loss upcasts to fp32
    models = 2 if work.value_model else 1
    return {
        "runtime": RUNTIME_BYTES,
        "weights": (shape.params * models + work.frozen_params) * work.weight_bytes,
        "gradients_and_optimizer": trainable * models * work.weight_bytes * 3,
        "activations": act * models,
        "logits": logits,
    }


def total(parts: dict[str, float]) -> float:
    return sum(parts.values())


def parse_size(text: str, flag: str = "--max-memory") -> float:
    """'8GB', '512MB', '1.5GiB', '8' (GB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{flag} {text}: expected a size such as 8GB, 512MB or 1.5GiB")
    unit = {"": 1e9, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    if m.group(3):
        unit = {"": 2**30, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return float(m.group(1)) * unit


def free_memory() -> tuple[float, str]:
    """Bytes this process may still use, and where the figure comes from (GPU, cgroup limit, RAM)."""
    try:
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            return float(free), "free GPU memory"
    except Exception:  # no torch or no driver: plan for the CPU
        pass
    avail = _meminfo("MemAvailable")
    source = "available RAM"
    limit = _cgroup_room()
    if limit is not None and (avail is None or limit < avail):
        avail, source = limit, "the container's memory limit"
    return float(avail or 8 * GB), source


def _meminfo(key: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> float | None:
    """Room left under a cgroup v2 / v1 memory limit, if one is set below the machine's RAM."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max":
                return None
            limit, usage = float(raw), float(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        total_ram = _meminfo("MemTotal")
        if total_ram is not None and limit >= total_ram:
            return None
        return max(limit - usage, 0.0)
    return None


def peak_rss() -> float:
    """This process's peak resident memory so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


@dataclass
class MemoryPlan:
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    estimate_gb: float
    budget_gb: float
    budget_source: str
    parts_gb: dict[str, float]
    changed: str | None = None  # one line saying what the planner changed, None when nothing
    tight: bool = False  # the budget, not speed, decided the shape: freed memory goes back to the system at once

    def describe(self) -> str:
        line = (f"memory: estimated peak {self.estimate_gb:.1f} GB of {self.budget_gb:.1f} GB "
                f"({self.budget_source}); micro-batch {self.micro_batch} x {self.grad_accum} accumulation"
                + (", gradient checkpointing" if self.gradient_checkpointing else ""))
        return line + (f"; {self.changed}" if self.changed else "")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_peak(self) -> dict:
        """The plan and the peak measured so far: what a stage's manifest records as `metrics.memory`."""
        return self.to_dict() | {"measured_peak_gb": measured_peak_gb()}


def plan(shape: ModelShape, work: Workload, batch_size: int, grad_accum: int, *, checkpointing: bool = False,
         max_memory: str | None = None, micro_batch: int | None = None, cpu: bool = True,
         what: str = "--batch-size") -> MemoryPlan:
    """The micro-batch, accumulation and checkpointing to train with; see the module docstring for the rule."""
    effective = batch_size * grad_accum
    if max_memory:
        budget, source = parse_size(max_memory), "--max-memory"
    else:
        free, source = free_memory()
        budget, source = free * SAFETY, f"{SAFETY:.0%} of {source}"

    def fits(micro: int, ckpt: bool) -> bool:
        return total(estimate(shape, work, micro, ckpt)) <= budget

    def make(micro: int, ckpt: bool, why: str | None) -> MemoryPlan:
        parts = estimate(shape, work, micro, ckpt)
        tight = bool(max_memory) or (ckpt and not checkpointing) or not fits(min(batch_size, effective), ckpt)
        return MemoryPlan(micro_batch=micro, grad_accum=effective // micro, gradient_checkpointing=ckpt,
                          estimate_gb=round(total(parts) / GB, 2), budget_gb=round(budget / GB, 2),
                          budget_source=source, parts_gb={k: round(v / GB, 3) for k, v in parts.items()},
                          changed=why, tight=tight)

    if micro_batch is not None:  # the user's micro-batch: checked, never changed
        if effective % micro_batch:
            raise ConfigError(f"--micro-batch-size {micro_batch}: must divide the effective batch {effective} "
                              f"({what} x --grad-accum)")
        if not fits(micro_batch, checkpointing):
            need = total(estimate(shape, work, micro_batch, checkpointing)) / GB
            raise ConfigError(f"--micro-batch-size {micro_batch}: needs about {need:.1f} GB, {budget / GB:.1f} GB "
                              f"is the budget ({source}); expected a smaller micro-batch, or leave it out to let "
                              f"the planner choose")
        return make(micro_batch, checkpointing, None)

    divisors = [d for d in range(min(batch_size, effective), 0, -1) if effective % d == 0]
    if cpu:
        per_example = work.seqs_per_example * work.seq_len
        capped = [d for d in divisors if d * per_example <= CPU_MICRO_TOKENS] or [1]
        divisors = [d for d in divisors if d <= capped[0]]
    for ckpt in ([checkpointing] if checkpointing else [False, True]):
        for micro in divisors:
            if fits(micro, ckpt):
                changes = []
                if micro != batch_size:
                    reason = "to fit" if not fits(min(batch_size, effective), ckpt) else \
                        f"on CPU, above {CPU_MICRO_TOKENS} tokens per pass is slower"
                    changes.append(f"{what} {batch_size} x --grad-accum {grad_accum} runs as micro-batches of "
                                   f"{micro} x {effective // micro} (same effective batch {effective}, {reason})")
                if ckpt and not checkpointing:
                    changes.append("gradient checkpointing on (slower, but nothing fits without it)")
                return make(micro, ckpt, "; ".join(changes) or None)
    need = total(estimate(shape, work, 1, True)) / GB
    raise ConfigError(
        f"memory: this run needs at least {need:.1f} GB (one example of {work.seq_len} tokens per pass, gradient "
        f"checkpointing), {budget / GB:.1f} GB is the budget ({source}); expected a smaller --max-length, --lora, "
        f"--freeze-layers N, or a larger --max-memory if that memory is really free")


def trainable_params(shape: ModelShape, *, lora: bool = False, lora_r: int = 16, freeze_layers: int = 0) -> int:
    """Trainable parameters before the model exists: all, those above the frozen layers, or LoRA adapters."""
    embeddings = shape.vocab * shape.hidden
    per_layer = max(shape.params - embeddings, 0) // max(shape.layers, 1)
    layers = shape.layers - freeze_layers
    if lora:  # A and B of every linear layer: q, k, v, o (hidden x hidden at most) and the MLP's three
        return layers * lora_r * (8 * shape.hidden + 3 * (shape.hidden + shape.intermediate))
    return shape.params - (embeddings + freeze_layers * per_layer if freeze_layers else 0)


def measured_peak_gb() -> float:
    """The peak so far: allocated device memory on a GPU, resident memory on CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return round(torch.cuda.max_memory_allocated() / GB, 2)
    except Exception:  # no torch: resident memory below
        pass
    return round(peak_rss() / GB, 2)


def return_freed_memory() -> bool:
    """Make glibc hand large freed blocks (1 MB and up) back to the system instead of keeping them for reuse.

    By default glibc raises its mmap threshold after big frees, so the activations of later steps come from a
    heap that only grows: measured on a 4 GB budget, peak resident memory 4.17 GB with the default against
    2.95 GB with a fixed threshold (the estimate: 3.0 GB), for about 10% more time. Used only when memory, not
    speed, decides the run's shape. Returns whether it took effect (glibc on Linux only)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
