"""Where sampled tokens come from: a generation engine behind one small interface.

Our PPO's rollouts and best-of-n's K answers need token ids only: PPO computes every log-probability with its own
forward pass (`stages.ppo.rollout.rollout_forward`), so the engine that samples may be a different program
holding a copy of the weights. Two engines:

- `HFEngine` (the default): the model's own `generate`, on the model being trained (nothing to sync).
- `VLLMEngine` (`--use-vllm`): a vLLM `LLM` colocated on the same GPU (it takes `--vllm-gpu-memory-utilization`
  of its memory, reserved before the memory planner measures what is free), kept in this process so weights
  can be handed to it by reference. After each PPO update the trainer calls `load_weights` with the policy's
  current tensors (`engine_weights`: LoRA adapters merged out of place, names as in a Hugging Face checkpoint,
  which is what vLLM's model `load_weights` reads).

`vllm` is imported only inside `VLLMEngine`; `vllm_problem` says, without importing it, why `--use-vllm` cannot
run here, so the check comes before any weights load. The vLLM path is written against vLLM's offline `LLM` API
and checked on the CPU with a stand-in engine (tests/test_vllm_engine.py); see docs/SCALING.md for what has been
run on a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rlhf_cli.core.errors import ConfigError

NEEDS = "--use-vllm needs a CUDA GPU and `pip install vllm`"


@dataclass(frozen=True)
class SampleSettings:
    """How one generate call samples: `n` answers per prompt; temperature 0 is greedy; top_k 0, top_p 1 and
    repetition_penalty 1 are off; `seed` makes the call's draws repeatable."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    n: int = 1
    seed: int | None = None


class Engine(Protocol):
    name: str  # shown in logs and manifests: "hf" or "vllm"

    def generate(self, prompts: list[list[int]], sampling: SampleSettings) -> list[list[int]]:
        """The new token ids of `sampling.n` answers per prompt, prompt-major (prompt 0's answers, then prompt
        1's ...), each up to and including its first EOS when it has one (what follows an EOS means nothing)."""
        ...

    def load_weights(self, named: Iterator[tuple[str, Any]]) -> None:
        """Take the policy's current weights (Hugging Face names)."""
        ...

    def close(self) -> None:
        """Free what the engine holds (GPU memory) before the next phase needs it."""
        ...


# ---------------------------------------------------------------------------------------------------------


def vllm_problem() -> str | None:
    """Why `--use-vllm` cannot run in this process (None: it can), without importing vllm or loading weights."""
    import torch

    if not torch.cuda.is_available():
        return f"{NEEDS}; this machine has no CUDA GPU (drop --use-vllm to sample with transformers)"
    if importlib.util.find_spec("vllm") is None:
        return f"{NEEDS}; vllm is not installed here (pip install vllm, or drop --use-vllm)"
    return None


def check_vllm(use_vllm: bool, processes: int = 1, mode: str = "colocate", what: str = "") -> None:
    """The one-line refusals of `--use-vllm`, before any weights load. `what`: the command, for the rule that
    only TRL's trainers (grpo/rloo) run vLLM under several processes or as a server."""
    from rlhf_cli.core.args import check_vllm_layout

    if not use_vllm:
        return
    check_vllm_layout(use_vllm, processes, mode, what)
    problem = vllm_problem()
    if problem:
        raise ConfigError(problem)


def describe(use_vllm: bool, mode: str, gpu_memory_utilization: float, server_url: str | None = None) -> str:
    """The line `--dry-run` and the run's log show for the generation engine."""
    if not use_vllm:
        return "transformers generate (the default; --use-vllm for vLLM on a GPU)"
    where = (f"colocated, {gpu_memory_utilization:.0%} of the GPU's memory" if mode == "colocate"
             else f"server at {server_url or 'http://localhost:8000'}")
    problem = vllm_problem()
    return f"vLLM ({where})" + (f"; not available on this machine: {problem}" if problem else "")


# ---------------------------------------------------------------------------------------------------------


class HFEngine:
    """transformers' `generate` on the model itself (left-padded batch, KV cache). Its weights are the model's,
    so `load_weights` has nothing to do."""

    name = "hf"

    def __init__(self, model: Any, pad_id: int, eos_ids: list[int]):
        self.model, self.pad_id, self.eos_ids = model, pad_id, eos_ids

    def generate(self, prompts: list[list[int]], sampling: SampleSettings) -> list[list[int]]:
        import torch

        from rlhf_cli.core.generation import pad_batch

        device = next(self.model.parameters()).device
        ids, attn = (t.to(device) for t in pad_batch(prompts, self.pad_id, left=True))
        greedy = sampling.temperature == 0
        kw: dict[str, Any] = dict(do_sample=not greedy, max_new_tokens=sampling.max_new_tokens,
                                  num_return_sequences=sampling.n, pad_token_id=self.pad_id,
                                  eos_token_id=self.eos_ids, use_cache=True)
        if not greedy:
            kw.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        if sampling.repetition_penalty != 1.0:
            kw["repetition_penalty"] = sampling.repetition_penalty
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        from rlhf_cli.core.linear_kernels import packed_linears

        with torch.no_grad(), packed_linears(self.model):
            out = self.model.generate(input_ids=ids, attention_mask=attn, **kw)
        return [cut_after_eos(row, self.eos_ids) for row in out[:, ids.shape[1]:].tolist()]

    def load_weights(self, named: Iterator[tuple[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


def cut_after_eos(ids: list[int], eos_ids: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[:i + 1]
    return ids


class VLLMEngine:
    """A vLLM `LLM` in this process on this process's GPU, sampling from token ids. Not run by the CPU tests."""

    name = "vllm"

    def __init__(self, path: Path, *, dtype: str, gpu_memory_utilization: float, max_model_len: int,
                 eos_ids: list[int], seed: int = 0, trust_remote_code: bool = False):
        # One engine in this process: vLLM's "external_launcher" executor keeps the model in-process (no worker
        # process), so `load_weights` can hand it the trainer's tensors; it joins a one-process group.
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        from vllm import LLM

        self.eos_ids = eos_ids
        self.llm = LLM(model=str(path), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, seed=seed, distributed_executor_backend="external_launcher",
                       enable_prefix_caching=True, trust_remote_code=trust_remote_code)

    def generate(self, prompts: list[list[int]], sampling: SampleSettings) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or -1,
            repetition_penalty=sampling.repetition_penalty, max_tokens=sampling.max_new_tokens,
            stop_token_ids=list(self.eos_ids), seed=sampling.seed)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        rows: list[list[int]] = []
        for out in outs:  # vLLM returns requests in the order given
            for c in out.outputs:
                ids = list(c.token_ids)
                # a stop token id ends the answer; keep it, as transformers does, so masks find the EOS
                if isinstance(c.stop_reason, int) and (not ids or ids[-1] != c.stop_reason):
                    ids.append(c.stop_reason)
                rows.append(ids)
        return rows

    def model(self) -> Any:
        """The vLLM model object in this process (its place moved between vLLM versions)."""
        engine = self.llm.llm_engine
        for path in ("model_executor.driver_worker.model_runner.model",
                     "model_executor.driver_worker.worker.model_runner.model",
                     "engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model"):
            obj: Any = engine
            try:
                for part in path.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                continue
            return obj
        raise RuntimeError("--use-vllm: cannot reach the vLLM model in this process to update its weights; "
                           "expected a vLLM version whose LLM keeps its model in-process (external_launcher)")

    def load_weights(self, named: Iterator[tuple[str, Any]]) -> None:
        model = self.model()
        for name, tensor in named:  # one at a time: no second copy of the whole model
            model.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()  # cached prompt states came from the old weights

    def close(self) -> None:
        import gc

        import torch

        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------


def hf_name(name: str) -> str:
    """A parameter's name inside DDP / PEFT / torch.compile / checkpoint wrappers -> its name in a Hugging Face
    checkpoint of the plain model (what vLLM's `load_weights` expects)."""
    name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
    if name.startswith("module."):
        name = name[len("module."):]
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def engine_weights(model: Any) -> Iterator[tuple[str, Any]]:
    """The model's current weights as (Hugging Face name, tensor). LoRA layers give base + B A x scale, computed
    out of place: merging into the base and unmerging after would drift the frozen base (the reference) by a
    rounding error every update. Adapter tensors and PEFT's saved originals are left out."""
    merged: dict[str, Any] = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "get_delta_weight") or not hasattr(base, "weight"):
            continue
        weight = base.weight.detach()
        for adapter in getattr(module, "active_adapters", []):
            if adapter in getattr(module, "lora_A", {}):
                weight = weight + module.get_delta_weight(adapter).detach().to(weight.dtype)
        merged[hf_name(name) + ".weight"] = weight
    for name, tensor in model.state_dict().items():
        if ".lora_" in name or ".original_module." in name:
            continue
        key = hf_name(name)
        yield key, merged.get(key, tensor.detach())
