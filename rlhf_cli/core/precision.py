"""`--precision auto` by measurement: is bf16 worth it on this CPU?

CPUs differ: with AMX or AVX512-BF16 a bf16 matmul runs several times faster than fp32; with AVX2 only, torch
emulates bf16 and it runs several times slower. Flags alone do not settle it (the kernels torch ships, the
thread count and the hypervisor all count), so `probe()` times a short square matmul in both dtypes with the
threads the process will use, once per machine, through `torch.nn.functional.linear` (x @ W^T), the kernel a
model's layers run (on an AVX2 CPU torch's bf16 linear is about 3x its bf16 `a @ b`). The result is cached in
`RLHF_CLI_CACHE/precision_probe.json` (default ~/.cache/rlhf-cli), keyed by CPU model, torch version and
threads. A cache file that cannot be read is measured again, never an error.

`choose(requested, gpu=...)` turns the request into a `Choice` with the reason shown in plans and manifests:

- an explicit `--precision fp32|bf16|fp16` is used as given; so is `RLHF_PRECISION` when the flag is `auto`;
- on a GPU: bf16 where the GPU supports it, else fp16;
- on the CPU: bf16 when the measured bf16/fp32 speed ratio is at least `BF16_MIN_RATIO`, else fp32.

Training with bf16 on the CPU keeps fp32 master weights and optimiser state and computes under bf16 autocast
(`core.runtime.weight_dtype` / `autocast`). torch is imported inside the functions: reading the cache is cheap.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# bf16 autocast pays for itself only when its matmuls are clearly faster: the casts around every op, the fp32
# master weights and the ops autocast keeps in fp32 eat part of the gain, so a bare-matmul ratio of 1.3 is about
# where whole training steps break even (measured: 3.4x matmul gave 1.5x sft steps on an AVX512-BF16 CPU).
BF16_MIN_RATIO = 1.3
ENV_PRECISION = "RLHF_PRECISION"
PRECISIONS = ("fp32", "bf16", "fp16")
FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma")
MATMUL_SIZE = 1024  # the largest square size timed; smaller where one bf16 matmul would take over SLOW_MATMUL
SIZES = (1024, 512, 256)
SLOW_MATMUL = 0.04  # seconds: emulated bf16 (AVX2) runs near 1 GFLOP/s, so 1024^3 would take seconds
WINDOW_SECONDS = 0.04  # per window; the best of WINDOWS windows per dtype (a moment's contention does not count)
WINDOWS = 4
PROBE_VERSION = 2  # part of the cache key: a change to how the probe measures measures again
# With several threads each dtype is also timed on one, and rated at the faster of the two. On
# an oversubscribed machine threads that wait on a descheduled sibling slow short fp32 matmuls 10-30x (measured
# on 2 busy cores: 0.8 GFLOP/s with 2 threads, 8-14 with 1), enough to make emulated bf16 look competitive.


@dataclass
class Probe:
    """What one measurement found (or the cache held): matmul speeds in FLOP/s and their ratio bf16 / fp32."""

    cpu: str
    flags: list[str]
    threads: int
    torch: str
    fp32_flops: float
    bf16_flops: float
    size: int = MATMUL_SIZE
    measured_at: str = ""
    cached: bool = field(default=False, compare=False)

    @property
    def ratio(self) -> float:
        return self.bf16_flops / self.fp32_flops if self.fp32_flops > 0 else 0.0

    @property
    def bf16_fast(self) -> bool:
        return self.ratio >= BF16_MIN_RATIO

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("cached")
        return d | {"ratio": round(self.ratio, 3)}


@dataclass(frozen=True)
class Choice:
    """The precision a run uses and why, e.g. ("fp32", "auto: fp32, bf16 0.2x fp32 here")."""

    precision: str
    reason: str

    def __str__(self) -> str:
        return f"{self.precision} ({self.reason})"


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and those of `FLAGS` it has, from /proc/cpuinfo on Linux; elsewhere the platform's
    processor name and no flags (the measurement decides alone)."""
    model, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return model, [f for f in FLAGS if f in flags]


def cache_file() -> Path:
    from rlhf_cli.core.models import cache_dir

    return cache_dir() / "precision_probe.json"


def cache_key(cpu: str, torch_version: str, threads: int) -> str:
    return f"{cpu} | torch {torch_version} | {threads} threads | probe {PROBE_VERSION}"


def matmul_flops(dtype_name: str, size: int = MATMUL_SIZE, windows: int = WINDOWS,
                 window: float = WINDOW_SECONDS) -> float:
    """FLOP/s of a (size x size) x (size x size) linear layer (x @ W^T) on the CPU in `dtype_name` with torch's
    current threads: the best of `windows` windows of about `window` seconds each (at least one matmul each)."""
    return _best_of_windows((dtype_name,), size, windows, window)[dtype_name]


def _best_of_windows(dtypes: tuple[str, ...], size: int, windows: int, window: float) -> dict[str, float]:
    """The best FLOP/s of each dtype over `windows` rounds in which the dtypes take turns, one window each: load
    from other processes that comes and goes then hits both alike (threads waiting on a descheduled sibling slow
    short fp32 matmuls most)."""
    import torch
    from torch.nn.functional import linear

    pairs = {}
    for name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        pairs[name] = (torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype))
        linear(*pairs[name])  # first call: allocation and kernel choice
    best = dict.fromkeys(dtypes, 0.0)
    for _ in range(windows):
        for name, (a, b) in pairs.items():
            done, t0 = 0, time.perf_counter()
            while done == 0 or time.perf_counter() - t0 < window:
                linear(a, b)
                done += 1
            best[name] = max(best[name], 2.0 * size ** 3 * done / max(time.perf_counter() - t0, 1e-9))
    return best


def probe_size() -> int:
    """The square size both dtypes are timed at: `MATMUL_SIZE`, or smaller when one bf16 matmul of it would take
    longer than `SLOW_MATMUL` (judged from a 256 one), so the probe stays well under 2 s on any CPU. The same size
    for both dtypes: the ratio compares like with like."""
    import torch
    from torch.nn.functional import linear

    small = SIZES[-1]
    a = torch.randn(small, small, dtype=torch.bfloat16)
    linear(a, a)
    t0 = time.perf_counter()
    linear(a, a)
    per_flop = (time.perf_counter() - t0) / (2.0 * small ** 3)
    return next((n for n in SIZES if 2.0 * n ** 3 * per_flop <= SLOW_MATMUL), small)


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, entries: dict) -> None:
    try:
        from rlhf_cli.core.files import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(entries, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only home: measure again next time


def cached_probe(path: Path, key: str, make: Callable[..., Any], usable: Callable[[Any], bool],
                 refresh: bool = False) -> tuple[dict, Any]:
    """A machine probe's cache (this one's and `linear_kernels`'): the file's entries, and the entry under `key`
    built with `make(**entry, cached=True)` when it is there, of the right shape and `usable` (else None, and the
    caller measures again; also with `refresh`)."""
    entries = _read_cache(path)
    if not refresh and isinstance(entries.get(key), dict):
        try:
            found = make(**entries[key], cached=True)
            if usable(found):
                return entries, found
        except TypeError:
            pass  # an entry of another shape: measure again
    return entries, None


def remember(path: Path, entries: dict, key: str, found: Any) -> None:
    """Store a measured probe (a dataclass with a `cached` field, which is not stored) under `key`."""
    entries[key] = {k: v for k, v in asdict(found).items() if k != "cached"}
    _write_cache(path, entries)


def probe(threads: int | None = None, *, refresh: bool = False,
          measure: Callable[[str], float] | None = None) -> Probe:
    """The bf16/fp32 matmul speeds of this CPU with `threads` (default: torch's current setting), from the cache
    when it holds this CPU, torch version and thread count, else measured (well under 2 s) and cached.
    `measure(dtype_name) -> FLOP/s` is the timing (tests inject their own)."""
    import torch

    threads = threads or torch.get_num_threads()
    cpu, flags = cpu_info()
    key = cache_key(cpu, torch.__version__, threads)
    path = cache_file()
    entries, found = cached_probe(path, key, Probe, lambda f: f.fp32_flops > 0 and f.bf16_flops > 0, refresh)
    if found is not None:
        return found
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if measure is not None:
            size, fp32, bf16 = MATMUL_SIZE, measure("fp32"), measure("bf16")
        else:
            size = probe_size()
            speeds = _best_of_windows(("fp32", "bf16"), size, WINDOWS, WINDOW_SECONDS)
            if threads > 1:  # never rated below what one thread does (see the note above `Probe`)
                torch.set_num_threads(1)
                alone = _best_of_windows(("fp32", "bf16"), size, WINDOWS, WINDOW_SECONDS)
                speeds = {k: max(v, alone[k]) for k, v in speeds.items()}
            fp32, bf16 = speeds["fp32"], speeds["bf16"]
    finally:
        torch.set_num_threads(before)
    found = Probe(cpu=cpu, flags=flags, threads=threads, torch=torch.__version__, fp32_flops=float(fp32),
                  bf16_flops=float(bf16), size=size, measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    remember(path, entries, key, found)
    return found


def cpu_choice(found: Probe) -> Choice:
    """fp32 or bf16 on the CPU from a probe's measured ratio."""
    if found.bf16_fast:
        return Choice("bf16", f"auto: bf16 measured {found.ratio:.1f}x fp32 here")
    return Choice("fp32", f"auto: fp32, bf16 {found.ratio:.2g}x fp32 here")


def choose(requested: str, *, gpu: bool, bf16_supported: Callable[[], bool] = lambda: False,
           threads: int | None = None, probe_fn: Callable[..., Probe] = probe) -> Choice:
    """The precision for `requested` ('auto' or one of `PRECISIONS`); see the module docstring for the order."""
    if requested != "auto":
        return Choice(requested, f"--precision {requested}")
    forced = os.environ.get(ENV_PRECISION, "").strip().lower()
    if forced and forced != "auto":
        if forced not in PRECISIONS:
            from rlhf_cli.core.errors import ConfigError

            raise ConfigError(f"{ENV_PRECISION}={forced}: not a precision; expected one of "
                              f"{', '.join(PRECISIONS)} or auto (or unset it)")
        return Choice(forced, f"{ENV_PRECISION}={forced}")
    if gpu:
        return Choice("bf16", "auto: the GPU supports bf16") if bf16_supported() else \
            Choice("fp16", "auto: fp16, the GPU has no bf16")
    return cpu_choice(probe_fn(threads))
