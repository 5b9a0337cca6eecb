"""The model card (`README.md`) of every finished stage folder, in the Hugging Face format.

`core.manifest.write_manifest` writes it just before the manifest, so every stage gets one, including stages
added later, from what the manifest records: YAML front matter the hub reads (base_model, library_name, tags,
pipeline_tag, datasets when the data is a hub dataset, the base model's license when it is known), then prose:
what the stage did, what it started from, its key settings and metrics, and five lines of plain transformers that
load it. The base model is found by following the parents' manifests back to the first model that is not a stage;
its license comes from its model card, its config, or the embedded default model's GGUF metadata. Torch-free.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from rlhf_cli.core.files import atomic_write_text
from rlhf_cli.core.stages import REWARD, STAGES

CARD = "README.md"
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+|[\w.-]+")

# What each stage did, in a sentence; a stage not listed is described from its command.
ABOUT = {
    "sft": "supervised fine-tuning (SFT) on written demonstrations: the model learns to imitate the answers of "
           "`<prompt, answer>` examples",
    "reward": "a reward model (RM): it reads a prompt and an answer and outputs one score, higher for answers people "
              "prefer, trained with the pairwise ranking loss `-log sigmoid(r_chosen - r_rejected)` on preference "
              "pairs",
    "ppo": "reinforcement learning from human feedback: the policy was trained to raise a reward model's score with "
           "a per-token KL penalty that keeps it close to the policy it started from",
    "dpo": "direct preference optimisation on preference pairs: the policy learns from chosen and rejected answers "
           "without a separate reward model",
    "best-of-n": "best-of-n distillation: the policy is fine-tuned on the best of N sampled answers per prompt, as "
                 "judged by a reward model",
}
TAGS = {"reward": "reward-model"}
# Settings worth a line in the card, when a stage has them (the manifest keeps all of them).
KEY_SETTINGS = ("algo", "method", "epochs", "max_steps", "lr", "lr_scheduler", "batch_size", "grad_accum",
                "max_length", "max_new_tokens", "kl_coef", "beta", "ppo_epochs", "group_size", "k", "lora",
                "lora_r", "freeze_layers", "precision", "seed")
HEADLINES = {  # (before, after, words) pairs summarised in prose when both are recorded
    "sft": [("eval_loss_before", "eval_loss", "held-out loss"), ("first_loss", "last_loss", "training loss")],
    "reward": [("eval_accuracy_before", "eval_accuracy", "held-out pairwise accuracy"),
               ("eval_mean_margin_before", "eval_mean_margin", "mean margin r(chosen) - r(rejected)")],
    "ppo": [("initial_score_mean", "final_score_mean", "mean reward-model score of its answers")],
}


def kind_of(stage: str) -> str:
    s = STAGES.get(stage)
    return s.kind if s else (REWARD if "reward" in stage else "policy")


def front_matter(path: Path) -> dict[str, Any]:
    """The YAML block at the top of a model card, {} when there is none or it is unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    m = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _manifest(folder: Path) -> dict | None:
    from rlhf_cli.core.manifest import MANIFEST

    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def is_hub_id(name: str | None) -> bool:
    """A hub repo id rather than a local path (one that does not exist here and looks like NAME or USER/NAME)."""
    if not name or Path(name).exists() or name.startswith((".", "/", "~")) or name.endswith(FILE_SUFFIXES):
        return False
    return bool(_HUB_ID.fullmatch(name))


def hub_dataset(spec: str | None) -> str | None:
    """The hub dataset id of a --data value (`name`, `name:split`, `name:config:split`), None for local data."""
    if not spec:
        return None
    name = str(spec).split(":")[0]
    return name if is_hub_id(name) and "/" in name else None


def base_model(parents: list[str], depth: int = 0) -> str | None:
    """The first model up the chain of parents that is not a stage folder, when it is a hub id."""
    if not parents or depth > 20:
        return None
    first = str(parents[0])
    p = Path(first)
    if p.is_dir():
        m = _manifest(p)
        return base_model(m.get("parents") or [], depth + 1) if m else None
    return first if is_hub_id(first) else None


def license_of(model: str | None, depth: int = 0) -> str | None:
    """A model's license: its card's front matter, its config.json, the parents of a stage, the embedded default
    model's GGUF metadata, or the card in the Hugging Face cache; None when unknown."""
    if not model or depth > 20:
        return None
    p = Path(model)
    if p.is_dir():
        found = front_matter(p / CARD).get("license")
        if not found:
            try:
                found = json.loads((p / "config.json").read_text(encoding="utf-8")).get("license")
            except (OSError, json.JSONDecodeError, AttributeError):
                found = None
        m = _manifest(p)
        if not found and m and m.get("parents"):
            found = license_of(str(m["parents"][0]), depth + 1)
        return str(found) if found else None
    from rlhf_cli.core.models import EMBEDDED

    if model in EMBEDDED and EMBEDDED[model].license:
        return EMBEDDED[model].license
    if is_hub_id(model):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, CARD)
        except Exception:  # a malformed id, no cache: unknown
            cached = None
        if isinstance(cached, str):
            found = front_matter(Path(cached)).get("license")
            return str(found) if found else None
    return None


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _code(name: str) -> str:
    return f"`{name}`" if name else "?"


def _data_prose(data: dict[str, Any], args: dict[str, Any]) -> list[str]:
    lines = []
    for key, summary in data.items():
        if not isinstance(summary, dict):
            continue
        source = summary.get("source", "?")
        where = "the hub dataset" if hub_dataset(source) else "the local data"
        counts = [f"{summary[k]} {w}" for k, w in (("rows_read", "rows read"), ("kept", "kept"),
                                                   ("prompts", "prompts"), ("used", "used")) if k in summary]
        fmt = f"{summary['format']} format, " if summary.get("format") else ""
        fp = f"; fingerprint `{summary['fingerprint']}`" if summary.get("fingerprint") else ""
        lines.append(f"- {key}: {where} {_code(source)} ({fmt}{', '.join(counts)}{fp})")
    return lines


def _load_example(kind: str, repo: str) -> str:
    if kind == REWARD:
        return f"""```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{repo}")
rm = AutoModelForSequenceClassification.from_pretrained("{repo}", num_labels=1)
chat = [{{"role": "user", "content": "Hi!"}}, {{"role": "assistant", "content": "Hello! How can I help?"}}]
inputs = tok.apply_chat_template(chat, return_tensors="pt", return_dict=True)
print(rm(**inputs).logits[0, 0].item())  # higher: an answer people would prefer
```"""
    return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{repo}")
model = AutoModelForCausalLM.from_pretrained("{repo}")
chat = [{{"role": "user", "content": "What is a reward model?"}}]
inputs = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
answer = model.generate(**inputs, max_new_tokens=64)[0, inputs["input_ids"].shape[1]:]
print(tok.decode(answer, skip_special_tokens=True))
```"""


def render(folder: Path, body: dict[str, Any], repo_id: str | None = None) -> str:
    """The card's text for a stage folder from its manifest body (`stage`, `parents`, `args`, `data`, `metrics`,
    `versions`)."""
    stage, args = body.get("stage", "?"), body.get("args") or {}
    parents, metrics = [str(p) for p in body.get("parents") or []], body.get("metrics") or {}
    kind = kind_of(stage)
    final = Path(folder).with_name(Path(folder).name.removesuffix(".partial"))
    repo = repo_id or args.get("push_to_hub") or str(final)
    tags = ["rlhf-cli", TAGS.get(stage, stage)]
    for extra in (args.get("algo"), args.get("method")):
        if isinstance(extra, str) and extra not in tags:
            tags.append(extra)
    tags.append("trl")
    base = base_model(parents)
    datasets = sorted({d for d in (hub_dataset(args.get(k)) for k in ("data", "eval_data", "prompts")) if d})
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "transformers"
    lic = license_of(base) or license_of(parents[0] if parents else None)
    if lic:
        meta["license"] = lic
    meta["tags"] = tags
    meta["pipeline_tag"] = "text-classification" if kind == REWARD else "text-generation"
    if datasets:
        meta["datasets"] = datasets
    title = repo_id or args.get("push_to_hub") or f"{final.parent.name}/{final.name}"

    out = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", "", f"# {title}", ""]
    about = ABOUT.get(stage, f"a {'reward model' if kind == REWARD else 'policy'} made by `rlhf {stage}`")
    out += [f"The **{stage}** stage of an RLHF run made with rlhf-cli "
            f"(`rlhf {stage}`): {about}.", ""]
    if stage == "ppo" and args.get("algo") not in (None, "ppo"):
        out += [f"Algorithm: TRL's {str(args['algo']).upper()} (group baselines, no value model).", ""]
    if parents:
        if stage == "ppo" and len(parents) > 1:
            out += [f"It started from the policy {_code(parents[0])} and was scored by the reward model "
                    f"{_code(parents[1])}.", ""]
        else:
            out += ["It started from " + ", ".join(_code(p) for p in parents) + "."
                    + (f" The base model is [{base}](https://huggingface.co/{base})." if base else
                       " The base model is a local folder, not a hub model."), ""]
    data = _data_prose(body.get("data") or {}, args)
    if data:
        out += ["## Data", "", *data, ""]
        if not datasets:
            out += ["The data is local: it is described here rather than linked.", ""]

    settings = [(k, args[k]) for k in KEY_SETTINGS if args.get(k) not in (None, "")
                and not (k == "lora_r" and not args.get("lora"))]
    if settings:
        out += ["## Training settings", "",
                "Key settings (all of them are in `rlhf_config.yaml` and `rlhf_manifest.json`): "
                + ", ".join(f"{k} {_fmt(v)}" for k, v in settings) + ".", ""]

    headline = [f"the {words} went from {_fmt(metrics[a])} to {_fmt(metrics[b])}"
                for a, b, words in HEADLINES.get(stage, []) if isinstance(metrics.get(a), (int, float))
                and isinstance(metrics.get(b), (int, float))]
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    if rows:
        out += ["## Metrics", ""]
        if headline:
            out += ["During this stage " + "; ".join(headline) + ".", ""]
        out += ["| metric | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rows), ""]

    cls = "AutoModelForSequenceClassification" if kind == REWARD else "AutoModelForCausalLM"
    if args.get("lora") and args.get("lora_merge") is False:
        out += ["## Use", "", f"This folder holds a LoRA adapter only, in `adapter/` (`--no-lora-merge`): load it "
                f"with peft on top of {_code(parents[0] if parents else '?')}, for example "
                f"`AutoPeftModelForCausalLM.from_pretrained(\"{repo}\", subfolder=\"adapter\")`.", ""]
        return "\n".join(out)
    out += ["## Use", "", f"A plain Hugging Face folder: load it with `{cls}`"
            + (" with `num_labels=1` (one score per conversation)" if kind == REWARD else "")
            + " and the same tokenizer, whose chat template it was trained with.", "", _load_example(kind, repo), ""]
    versions = body.get("versions") or {}
    if versions:
        out += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", ""]
    return "\n".join(out)


def write_model_card(folder: Path, body: dict[str, Any], repo_id: str | None = None) -> Path:
    path = Path(folder) / CARD
    atomic_write_text(path, render(folder, body, repo_id))
    return path
