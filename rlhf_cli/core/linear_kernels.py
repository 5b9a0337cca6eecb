"""Faster linear layers for sampling on the CPU, chosen by measurement.

A model's `nn.Linear` runs torch's fp32 `linear`, which on the CPU goes to MKL's sgemm. Sampling multiplies a few
rows (one new token per answer) by every weight matrix at every step, and on some CPUs sgemm handles such skinny
products poorly: on an AMD EPYC with AVX2 an 8-row product with a 1536x576 weight runs at about 30 GFLOP/s through
MKL and about 60 through oneDNN (which torch also ships) with the weight packed once in oneDNN's own layout;
with SmolLM2's 49152x576 LM head, 10 against 46. Elsewhere the two may be even, so nothing is assumed:

- `probe()` times an 8-row product both ways (alternating windows, best of each), once per machine, and caches it
  in `RLHF_CLI_CACHE/linear_probe.json`, keyed by CPU model, torch version and threads;
- `packed_linears(model)` (a context manager) packs the weights of the model's fp32 `nn.Linear` layers on the CPU
  and routes their no-gradient calls through oneDNN while it is open, when the probe measured oneDNN at least
  `MIN_RATIO` times faster and the packed copies fit in half the free memory. On leaving, the layers are as they
  were, and the copies are freed unless `keep=True` (a model that only samples keeps them for its next call);
  the weights must not change while it is open (sampling only).

Results differ from MKL's by float rounding only (about 1e-5 relative; the same tokens were sampled in the runs
measured). A call with gradients enabled, under autocast, or in another dtype takes the usual path.
`RLHF_CLI_PACKED_LINEAR=0` turns it off, `=1` turns it on wherever it is supported, whatever the probe says.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

ENV = "RLHF_CLI_PACKED_LINEAR"
MIN_RATIO = 1.15  # packing costs about 2 ms per million weights per sampling call: below this, not worth it
ROWS, IN_FEATURES, OUT_FEATURES = 8, 1024, 4096  # the probe's product: a decode step of 8 answers, a 16 MB weight
WINDOW_SECONDS, WINDOWS = 0.05, 4
PROBE_VERSION = 1
MEMORY_SHARE = 0.5  # the packed copies may take at most this share of the free memory


@dataclass
class Probe:
    """One measurement (or the cache's): FLOP/s of the probe's product through torch's `linear` and through
    oneDNN with a packed weight."""

    cpu: str
    threads: int
    torch: str
    default_flops: float
    packed_flops: float
    measured_at: str = ""
    cached: bool = field(default=False, compare=False)

    @property
    def ratio(self) -> float:
        return self.packed_flops / self.default_flops if self.default_flops > 0 else 0.0


def supported() -> bool:
    """Whether this torch has oneDNN's packed linear (CPU builds on x86 and ARM do)."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


def pack(weight):
    """`weight` [out, in] in oneDNN's layout for products of about `ROWS` rows (any row count works)."""
    import torch

    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS)


def packed_linear(x, packed, bias):
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def cache_file():
    from rlhf_cli.core.models import cache_dir

    return cache_dir() / "linear_probe.json"


def _best_of_windows() -> tuple[float, float]:
    import torch
    from torch.nn.functional import linear

    x = torch.randn(ROWS, IN_FEATURES)
    w = torch.randn(OUT_FEATURES, IN_FEATURES)
    p = pack(w)
    calls = {"default": lambda: linear(x, w), "packed": lambda: packed_linear(x, p, None)}
    for f in calls.values():
        f()
    best = dict.fromkeys(calls, 0.0)
    flop = 2.0 * ROWS * IN_FEATURES * OUT_FEATURES
    for _ in range(WINDOWS):
        for name, f in calls.items():
            done, t0 = 0, time.perf_counter()
            while done == 0 or time.perf_counter() - t0 < WINDOW_SECONDS:
                f()
                done += 1
            best[name] = max(best[name], flop * done / max(time.perf_counter() - t0, 1e-9))
    return best["default"], best["packed"]


def probe(*, refresh: bool = False) -> Probe | None:
    """This CPU's measurement with torch's current threads, from the cache or measured (about 0.5 s) and cached;
    None where packed linears are not supported."""
    import torch

    from rlhf_cli.core.precision import cached_probe, cpu_info, remember

    if not supported():
        return None
    threads = torch.get_num_threads()
    cpu, _ = cpu_info()
    key = f"{cpu} | torch {torch.__version__} | {threads} threads | probe {PROBE_VERSION}"
    path = cache_file()
    entries, found = cached_probe(path, key, Probe, lambda f: f.default_flops > 0 and f.packed_flops > 0, refresh)
    if found is not None:
        return found
    try:
        default, packed = _best_of_windows()
    except RuntimeError:  # the op exists but refuses this CPU
        return None
    found = Probe(cpu=cpu, threads=threads, torch=torch.__version__, default_flops=default, packed_flops=packed,
                  measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    remember(path, entries, key, found)
    return found


def decision() -> tuple[bool, str]:
    """Whether sampling packs its linear layers on this machine, and why (for plans and logs)."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("0", "off", "false", "no"):
        return False, f"{ENV}={forced}"
    if not supported():
        return False, "torch has no oneDNN packed linear here"
    if forced in ("1", "on", "true", "yes"):
        return True, f"{ENV}={forced}"
    found = probe()
    if found is None:
        return False, "oneDNN's packed linear is not usable on this CPU"
    if found.ratio < MIN_RATIO:
        return False, f"measured only {found.ratio:.2f}x torch's linear at {ROWS} rows here"
    return True, f"measured {found.ratio:.1f}x torch's linear at {ROWS} rows here"


def kernel_name() -> str:
    """What sampling's linear layers run here: 'onednn-packed' or 'default' (part of cache keys)."""
    return "onednn-packed" if decision()[0] else "default"


def eligible(model) -> list:
    """The model's layers that can be packed: exactly `nn.Linear` (not quantised or wrapped subclasses), fp32
    weights on the CPU, and no forward already replaced by someone else (accelerate's hooks, for one)."""
    import torch

    return [m for m in model.modules()
            if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
            and "forward" not in m.__dict__ and not hasattr(m, "_hf_hook")]


def _forward(module, packed, bias):
    import torch
    from torch.nn.functional import linear

    def forward(x):
        if (torch.is_grad_enabled() or x.dtype != torch.float32 or x.numel() == 0
                or torch.is_autocast_enabled("cpu")):
            return linear(x, module.weight, module.bias)
        return packed_linear(x, packed, bias)

    return forward


KEPT = "_rlhf_packed"  # a layer's kept packed weight: (weight's identity and version, packed tensor)


def _stamp(weight) -> tuple[int, int, int]:
    """What a packed copy was made from: the weight tensor, its storage and its in-place version (an optimiser
    step or a `load_state_dict` bumps it)."""
    return id(weight), weight.data_ptr(), weight._version


def _packed_weight(m, keep: bool):
    kept = m.__dict__.get(KEPT)
    if kept is not None and kept[0] == _stamp(m.weight):
        return kept[1]
    packed = pack(m.weight)
    if keep:
        m.__dict__[KEPT] = (_stamp(m.weight), packed)
    else:
        m.__dict__.pop(KEPT, None)
    return packed


@contextlib.contextmanager
def packed_linears(model, enabled: bool | None = None, keep: bool = False) -> Iterator[int]:
    """While open, `model`'s eligible linear layers run through oneDNN with packed weights (see the module
    docstring); yields how many were packed (0 when the probe, the memory or `enabled=False` says no).

    `keep=True` (models that only sample, as in `rlhf chat`, `generate` and `eval policy`) keeps the packed copies
    on the layers for the next call, which packs only a weight changed since; the default frees them on leaving
    (a policy in training changes its weights between calls, and its memory matters more)."""
    import torch

    # under autocast (bf16 on the CPU) every call would take the usual path: packing would be wasted
    layers = eligible(model) if enabled is not False and not torch.is_autocast_enabled("cpu") else []
    if layers and enabled is None and not decision()[0]:  # measured only where there is something to pack
        layers = []
    if layers:
        from rlhf_cli.core.memory import free_memory

        need = sum(m.weight.numel() * 4 for m in layers if KEPT not in m.__dict__)
        if need > MEMORY_SHARE * free_memory()[0]:
            layers = []
    try:
        forwards = [_forward(m, _packed_weight(m, keep), None if m.bias is None else m.bias.detach())
                    for m in layers]
    except RuntimeError:  # a shape or layout oneDNN refuses: every layer takes the usual path
        layers, forwards = [], []
    try:
        for m, f in zip(layers, forwards, strict=True):
            m.forward = f
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
