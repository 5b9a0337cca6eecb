"""Where and how the computation runs: device, precision, CPU threads, process rank, seeding.

Every stage asks here instead of testing `torch.cuda.is_available()` itself, so a change of policy (a new
device kind, a measured precision choice, several processes) is made in one place.

- Device: the process's CUDA device when there is one (`LOCAL_RANK` picks it under a launcher), else the CPU.
- Precision `auto`: bf16 on GPUs that support it (else fp16); on the CPU bf16 only where a measured bf16 matmul
  is clearly faster than fp32 (`core.precision`: AMX / AVX512-BF16 CPUs yes, AVX2 ones emulate it and no).
  Two dtypes follow from it: the one weights load in (`weight_dtype`: fp32 for models that train on the CPU,
  the master copy the optimiser updates) and the one that computes (`compute_dtype`; on the CPU through
  `autocast`, which HF Trainers get from `bf16=True`). Models that only run (reference, RM scoring, generation)
  load straight in the compute dtype.
- Threads: the given number, else one per core this process may use.
- Rank and world size come from the launcher's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`); one process
  without a launcher is rank 0 of 1 (`core.launch` starts the launcher). `barrier`, `any_rank` and `all_reduce`
  are the collectives the toolkit itself makes (our PPO loop sums its statistics with `all_reduce`; DDP and the
  Trainer make the rest).
"""

from __future__ import annotations

import os
import random
from contextlib import AbstractContextManager, nullcontext

import torch

from rlhf_cli.core import launch
from rlhf_cli.core import precision as precision_probe


def has_gpu() -> bool:
    return torch.cuda.is_available()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


# rank and world size: read from the launcher's environment in core/launch.py (light: the CLI imports it at start)
rank, world_size, is_main_process = launch.rank, launch.world_size, launch.is_main


def init_distributed(timeout_s: float | None = None) -> None:
    """Join the launched processes' group (gloo on the CPU, NCCL on GPUs) through accelerate, before the Trainer
    would: the stage folder is made and checked by rank 0 while the others wait. A no-op in one process.
    `timeout_s`: how long a collective may wait (a stage whose rank 0 works alone for long, such as best-of-n's
    sampling, asks for more than the default 30 minutes)."""
    if world_size() <= 1:
        return
    from datetime import timedelta

    from accelerate import PartialState

    kw = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    PartialState(cpu=not has_gpu(), **kw)


def barrier() -> None:
    """Wait for every process (a no-op in one process)."""
    if world_size() <= 1:
        return
    init_distributed()
    torch.distributed.barrier()


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on any process: a stop asked of one rank (a signal) is taken by all at the same
    step, so none waits forever in a collective the others have left. `flag` itself in one process."""
    if world_size() <= 1 or not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device() if torch.distributed.get_backend() == "nccl"
                     else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The element-wise sum (or max) of `values` over every process, in float64 on `values`' device: global
    statistics from each rank's share of a batch. `values` itself in one process."""
    if world_size() <= 1 or not torch.distributed.is_initialized():
        return values
    on = device() if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    t = values.detach().to(on, torch.float64).clone()
    ops = torch.distributed.ReduceOp
    torch.distributed.all_reduce(t, op=ops.SUM if op == "sum" else ops.MAX)
    return t.to(values.device)


def device() -> torch.device:
    """The device this process computes on."""
    if has_gpu():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def to_device(model: torch.nn.Module) -> torch.nn.Module:
    """Move a model onto this process's device (a no-op on the CPU, and for a 4-bit model, which was loaded onto
    it and cannot be moved)."""
    if not has_gpu() or getattr(model, "is_loaded_in_4bit", False):
        return model
    return model.to(device())


def check_load_in_4bit(load_in_4bit: bool) -> None:
    """`--load-in-4bit`: one line when this machine cannot (before any weights load)."""
    if not load_in_4bit:
        return
    import importlib.util

    from rlhf_cli.core.errors import ConfigError

    need = "--load-in-4bit needs a CUDA GPU and `pip install bitsandbytes`"
    if not has_gpu():
        raise ConfigError(f"{need}; this machine has no CUDA GPU (drop --load-in-4bit; --lora alone trains "
                          f"adapters on full-precision weights)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{need}; bitsandbytes is not installed here")


def attention_kwargs(path, auto_class: type, precision: str) -> dict:
    """The attention kernel for `auto_class.from_pretrained(path)`: flash-attention 2 on a GPU in bf16/fp16 when
    `flash_attn` is installed and the model's class supports it; otherwise nothing, and transformers picks SDPA
    (its default, where the model supports it, else eager)."""
    import importlib.util

    if not (has_gpu() and precision in ("bf16", "fp16") and importlib.util.find_spec("flash_attn") is not None):
        return {}
    try:
        from transformers import AutoConfig

        model_class = auto_class._model_mapping[type(AutoConfig.from_pretrained(path))]
    except Exception:  # a config transformers does not map (remote code): leave the choice to transformers
        return {}
    return {"attn_implementation": "flash_attention_2"} if getattr(model_class, "_supports_flash_attn", False) else {}


def load_kwargs(path, auto_class: type, precision: str, load_in_4bit: bool = False, trained: bool = True) -> dict:
    """What the device and precision add to a model's `from_pretrained`: the dtype (`weight_dtype`: fp32 master
    weights for a model that trains on the CPU), the attention kernel, and with `load_in_4bit` NF4 weights
    (double quantisation, compute in the training precision) placed straight on this process's GPU."""
    kw: dict = {"dtype": weight_dtype(precision, trained), **attention_kwargs(path, auto_class, precision)}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(precision))
        kw["device_map"] = {"": device()}
    return kw


def precision_choice(precision: str) -> precision_probe.Choice:
    """The precision for a `--precision` value, with the reason plans and manifests show: as given; else
    `RLHF_PRECISION`; else bf16 on GPUs that support it, fp16 on older GPUs, and on the CPU what the cached
    measurement of this machine says (see `rlhf_cli.core.precision`)."""
    return precision_probe.choose(precision, gpu=has_gpu(), bf16_supported=lambda: torch.cuda.is_bf16_supported(),
                                  threads=torch.get_num_threads())


def pick_precision(precision: str) -> str:
    return precision_choice(precision).precision


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in."""
    return torch_dtype(precision)


def weight_dtype(precision: str, trained: bool = True) -> torch.dtype:
    """The dtype a model's weights load in: on the CPU a model that trains keeps fp32 master weights (and so
    fp32 optimiser state) and computes under `autocast`; on a GPU, and for models that only run, the compute
    dtype itself."""
    if trained and not has_gpu():
        return torch.float32
    return torch_dtype(precision)


def autocast(precision: str) -> AbstractContextManager:
    """Around forward passes of fp32-weight models on the CPU when the precision is not fp32: torch's CPU
    autocast to the compute dtype; otherwise (fp32, or a GPU whose weights already are the compute dtype)
    nothing."""
    if has_gpu() or precision == "fp32":
        return nullcontext()
    return torch.autocast("cpu", dtype=torch_dtype(precision))


def configure_threads(threads: int | None) -> int:
    """Torch intra-op threads: the given number, else one per core the process may use."""
    if threads is None or threads <= 0:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:
            threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def trainer_device_kwargs() -> dict[str, bool]:
    """The device settings of a transformers TrainingArguments."""
    return {"use_cpu": not has_gpu(), "dataloader_pin_memory": has_gpu()}


def seed_all(seed: int) -> None:
    """Seed torch on every device (sampling draws only from torch)."""
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random generator's state, for a checkpoint that resumes exactly. Plain Python values and tensors
    only (numpy's key array as a list), so the checkpoint loads with `torch.load(weights_only=True)`."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": random.getstate(), "torch": torch.get_rng_state(),
          "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))}
    if has_gpu():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import numpy as np

    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in st and has_gpu():
        torch.cuda.set_rng_state_all(st["cuda"])


# Warnings the training libraries raise about settings the toolkit makes for the user (deprecated argument names
# inside transformers/trl, advice about generation or padding flags it sets itself): (category, message regex,
# module regex). Warnings from torch, datasets and this toolkit are always shown.
_NOISE = (
    (FutureWarning, r".* is deprecated and will be removed", r"(transformers|trl|peft)(\.|$)"),
    (UserWarning, r"", r"(transformers|trl|peft)(\.|$)"),
)


def quiet_libraries() -> None:
    """The toolkit shows its own progress: silence the libraries' progress bars, their info logging, and the
    specific advisory warnings listed in `_NOISE`."""
    import logging
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    os.environ.setdefault("TQDM_DISABLE", "1")  # trl's own bars (DPO's reference pass) read this at each use
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("trl").setLevel(logging.ERROR)
    for category, message, module in _NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
