"""`rlhf env`: what this machine and installation are, as one paste-ready block for a bug report.

    rlhf env          # a Markdown list
    rlhf env --json   # the same facts as one JSON object

Versions of Python, the toolkit and the libraries it drives; the OS; the CPU (model, cores, the threads torch
uses, the flags that decide bf16 speed) with the precision probe's measured bf16/fp32 matmul ratio and what
`--precision auto` picks here; whether sampling packs its linear layers for oneDNN (`core.linear_kernels`); the
GPUs and their memory; whether the embedded default model is prepared.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

LIBRARIES = ("torch", "transformers", "trl", "accelerate", "peft", "datasets")


def version_of(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def collect(refresh: bool = False) -> dict[str, Any]:
    """Every fact `rlhf env` shows; `refresh` measures the precision probe again instead of reading its cache."""
    import torch

    from rlhf_cli import __version__
    from rlhf_cli.core import linear_kernels, models, precision, runtime

    found = precision.probe(torch.get_num_threads(), refresh=refresh)
    packed = linear_kernels.probe(refresh=refresh)
    packs, why = linear_kernels.decision()
    choice = runtime.precision_choice("auto")
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                         "bf16": bool(torch.cuda.is_bf16_supported())})
    default = {}
    for mid in models.EMBEDDED:
        status = models.embedded_status(mid)
        default = {"model": mid, "status": status, "path": str(models.embedded_folder(mid))}
        break
    return {
        "rlhf-cli": __version__,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "libraries": {name: version_of(name) for name in LIBRARIES},
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "cpu": {"model": found.cpu, "cores": os.cpu_count() or 1, "usable_cores": usable_cores(),
                "torch_threads": torch.get_num_threads(), "flags": found.flags},
        "bf16_cpu": {"fast": found.bf16_fast, "ratio": round(found.ratio, 3), "threshold": precision.BF16_MIN_RATIO,
                     "fp32_gflops": round(found.fp32_flops / 1e9, 1), "bf16_gflops": round(found.bf16_flops / 1e9, 1),
                     "matmul_size": found.size, "measured_at": found.measured_at,
                     "cache": str(precision.cache_file())},
        "precision_auto": {"precision": choice.precision, "reason": choice.reason},
        "sampling_linear": {"packed": packs, "reason": why, "threshold": linear_kernels.MIN_RATIO,
                            "ratio": round(packed.ratio, 3) if packed else None,
                            "measured_at": packed.measured_at if packed else None,
                            "cache": str(linear_kernels.cache_file())},
        "gpus": gpus,
        "default_model": default,
        "cache_dir": str(models.cache_dir()),
    }


def markdown(env: dict[str, Any]) -> str:
    """The facts as a Markdown list, ready to paste into a bug report."""
    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
    cpu, bf16 = env["cpu"], env["bf16_cpu"]
    gpus = "; ".join(f"{g['name']} ({g['memory_gib']} GiB{', bf16' if g['bf16'] else ''})"
                     for g in env["gpus"]) or "none"
    dm = env["default_model"]
    model = (f"{dm['model']}: {dm['status']}" + (f" ({dm['path']})" if dm["status"] == "ready" else
                                                  " (`rlhf models --prepare` converts it)"
                                                  if dm["status"] == "available" else "")) if dm else "none"
    lines = [
        f"- rlhf-cli: {env['rlhf-cli']}",
        f"- Python: {env['python']} ({env['python_executable']})",
        f"- libraries: {libs}",
        f"- OS: {env['os']}",
        f"- CPU: {cpu['model']}, {cpu['cores']} cores ({cpu['usable_cores']} usable), torch threads "
        f"{cpu['torch_threads']}",
        f"- CPU flags: {', '.join(cpu['flags']) or 'none of ' + 'amx_bf16, avx512_bf16, avx512f, avx2'}",
        f"- bf16 on this CPU: {'fast' if bf16['fast'] else 'slow'}, matmul {bf16['ratio']:.2g}x fp32 "
        f"({bf16['bf16_gflops']:g} vs {bf16['fp32_gflops']:g} GFLOP/s at {bf16['matmul_size']}, threshold "
        f"{bf16['threshold']:g}x; measured {bf16['measured_at']})",
        f"- --precision auto: {env['precision_auto']['precision']} ({env['precision_auto']['reason']})",
        f"- sampling's linear layers on the CPU: "
        f"{'packed for oneDNN' if env['sampling_linear']['packed'] else 'torch linear'} "
        f"({env['sampling_linear']['reason']}; threshold {env['sampling_linear']['threshold']:g}x)",
        f"- GPUs: {gpus}",
        f"- default model: {model}",
        f"- cache: {env['cache_dir']}",
    ]
    return "\n".join(lines)
