"""The reward model (RM) as one service: find it, check it, load it, and score with it.

Everything that scores answers goes through here: `rlhf chat --reward`, `rlhf eval reward`, `rlhf eval policy`,
the reward stage's held-out metrics, and PPO/GRPO/RLOO. Two ways in:

- conversations (`score_conversations`, `score`): rendered with the RM's own chat template and tokenizer,
  the last `max_length` tokens kept (counted in `truncated`);
- token ids that are already the RM's (`score_ids` for unpadded lists; `score_tokens` for a padded batch with
  the index of each row's last token), the fast path PPO takes when the policy and the RM share their tokenizer
  and chat template.

    rm = RewardModel.load(RewardModel.locate("runs/demo/reward"))
    rm.score([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_cli.core import runtime
from rlhf_cli.core.errors import CheckpointError, ConfigError
from rlhf_cli.core.generation import encode_chat, pad_batch, position_ids
from rlhf_cli.core.manifest import Manifest, manifest_if_stage, require_stage
from rlhf_cli.core.models import SAFE_LOADING, LoadOptions, load_tokenizer, resolve_model, set_distinct_pad
from rlhf_cli.core.stages import a_stage, command_for
from rlhf_cli.data import DataSet

DEFAULT_MAX_LENGTH = 1024  # when neither the reward stage nor the caller says


def resolve_reward_spec(model: str | None, run: str | None, flag: str = "--model") -> tuple[str, Manifest | None]:
    """The RM's name (RUN/reward when not given) and its manifest; refuses a stage of another kind. No files
    are read beyond the manifest, so a wrong stage fails before anything loads."""
    if model is None:
        if run is None:
            raise ConfigError(f"{flag}: missing; pass {flag} RM_DIR or --run DIR (uses DIR/reward)")
        m = require_stage(Path(run) / "reward", "reward", "--run")
        return str(m.path), m
    m = manifest_if_stage(model)
    if m is not None and m.stage != "reward":
        raise CheckpointError(f"{flag} {model}: is {a_stage(m.stage)}, expected a reward stage, made by "
                              f"`{command_for('reward')}`")
    return model, m


def read_config(path: Path, flag: str) -> dict:
    """A model folder's config.json, read without loading anything else."""
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{flag} {path}: unreadable config.json ({e}); expected a Hugging Face model "
                              f"folder") from None


@dataclass
class RewardSpec:
    """A reward model found and checked, not yet loaded."""

    name: str  # as given (or RUN/reward)
    path: Path  # the local folder
    manifest: Manifest | None
    flag: str = "--reward"
    loading: LoadOptions = SAFE_LOADING  # how `RewardModel.load` may load it

    @property
    def max_length(self) -> int | None:
        """The longest sequence the reward stage was trained on, when it is one of ours."""
        return self.manifest.args.get("max_length") if self.manifest else None


def score_ids(model: PreTrainedModel, ids: list[list[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    """One score per token id list (right padding; the head reads the last non-pad token). Works on any
    one-output sequence classifier, peft-wrapped ones included (the reward stage scores its model mid-training)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths per batch: less padding
    out = [0.0] * len(ids)
    model.eval()
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            x, att = pad_batch([ids[i] for i in idx], pad_id)
            logits = model(input_ids=x.to(dev), attention_mask=att.to(dev)).logits[:, 0].float().cpu()
            for row, i in enumerate(idx):
                out[i] = float(logits[row])
    return out


def encode_pairs(ds: DataSet, tok: PreTrainedTokenizerBase, max_length: int) -> tuple[list[dict], int]:
    """Token ids of prompt+chosen and prompt+rejected through the chat template; over-long sequences keep their
    last `max_length` tokens (the answer), and are counted."""
    rows, truncated = [], 0
    for r in ds.rows:
        ids = []
        for key in ("chosen", "rejected"):
            text = tok.apply_chat_template(r["prompt"] + r[key], tokenize=False)
            x = tok(text, add_special_tokens=False)["input_ids"]
            if len(x) > max_length:
                x = x[-max_length:]
                truncated += 1
            ids.append(x)
        rows.append({"chosen_ids": ids[0], "rejected_ids": ids[1], "margin": r.get("margin", 0.0),
                     "group": r.get("group", len(rows))})
    return rows, truncated


@dataclass
class PairScores:
    accuracy: float
    mean_margin: float
    pairs: int
    chosen: list[float]
    rejected: list[float]


def pair_metrics(model: PreTrainedModel, rows: list[dict], pad_id: int, batch_size: int = 16) -> PairScores:
    """Pairwise accuracy and mean margin of encoded pairs (`chosen_ids`, `rejected_ids`)."""
    ids = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    s = score_ids(model, ids, pad_id, batch_size)
    c, r = s[:len(rows)], s[len(rows):]
    diffs = [a - b for a, b in zip(c, r, strict=True)]
    return PairScores(accuracy=sum(d > 0 for d in diffs) / len(diffs), mean_margin=sum(diffs) / len(diffs),
                      pairs=len(diffs), chosen=c, rejected=r)


def head_model(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(backbone, head) of a sequence classifier, through a peft wrapper if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None) or getattr(base, "classifier", None)
    backbone = getattr(base, base.base_model_prefix, None)
    if head is None or backbone is None:
        raise CheckpointError(f"{type(base).__name__}: cannot find the backbone and score head of this sequence "
                              f"classifier; use a model with a `score` head (Llama, Qwen, Mistral, SmolLM, ...)")
    return backbone, head


def token_scores(model: PreTrainedModel, seq: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The classifier head applied to every hidden state: [B, T] float32 (values, or the RM's score per prefix).
    Left or right padding: positions come from the attention mask."""
    backbone, head = head_model(model)
    hidden = backbone(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn), use_cache=False)
    return head(hidden.last_hidden_state).squeeze(-1).float()


def leading_pad(attn: torch.Tensor) -> int:
    """How many leading columns are padding in every row."""
    return int((attn == 0).all(0).long().cumprod(0).sum())


class RewardModel:
    """A loaded reward model with its tokenizer, ready to score."""

    def __init__(self, name: str, model: PreTrainedModel, tok: PreTrainedTokenizerBase, max_length: int):
        self.name, self.model, self.tok, self.max_length = name, model, tok, max_length
        self.truncated = 0  # conversations cut to their last max_length tokens so far

    # --------------------------------------------------------------------------------------------- finding

    @staticmethod
    def locate(spec: str | None, run: str | None = None, flag: str = "--reward",
               say: Callable[[str], None] = lambda s: None, loading: LoadOptions = SAFE_LOADING) -> RewardSpec:
        """Resolve and check a reward model before any weights load: the stage kind, the folder (and what
        `loading` allows of it), and a config.json that describes a one-output sequence classifier."""
        name, manifest = resolve_reward_spec(spec, run, flag)
        path = resolve_model(name, flag=flag, say=say, loading=loading)
        cfg = read_config(path, flag)
        archs = cfg.get("architectures") or []
        labels = len(cfg.get("id2label") or {}) or cfg.get("num_labels")
        if not any("ForSequenceClassification" in x for x in archs) or labels != 1:
            raise CheckpointError(f"{flag} {name}: not a reward model (expected a sequence classifier with one "
                                  f"output, found {', '.join(archs) or 'no architectures'}); train one with "
                                  f"`{command_for('reward')}`")
        return RewardSpec(name, path, manifest, flag, loading)

    @classmethod
    def load(cls, spec: RewardSpec, precision: str = "auto", tok: PreTrainedTokenizerBase | None = None,
             max_length: int | None = None) -> RewardModel:
        """Weights in eval mode without gradients, on this process's device. `tok`: a tokenizer already loaded
        from the same folder; `max_length`: the fallback when the reward stage does not say."""
        tok = tok or load_tokenizer(spec.path, loading=spec.loading)
        dtype = runtime.torch_dtype(runtime.pick_precision(precision))
        model = AutoModelForSequenceClassification.from_pretrained(spec.path, num_labels=1, dtype=dtype,
                                                                   **spec.loading.model_kwargs())
        set_distinct_pad(tok, model)
        model = runtime.to_device(model).eval().requires_grad_(False)
        return cls(spec.name, model, tok, int(spec.max_length or max_length or DEFAULT_MAX_LENGTH))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --------------------------------------------------------------------------------------------- scoring

    def encode(self, conversation: list[dict[str, str]]) -> list[int]:
        """A whole conversation (ending with the answer) as the RM reads it, cut to its last max_length tokens."""
        ids = encode_chat(self.tok, conversation, generation_prompt=False)
        if len(ids) > self.max_length:
            self.truncated += 1
            ids = ids[-self.max_length:]
        return ids

    def score_ids(self, ids: list[list[int]], batch_size: int = 16) -> list[float]:
        return score_ids(self.model, ids, self.tok.pad_token_id, batch_size)

    def score_conversations(self, conversations: list[list[dict[str, str]]], batch_size: int = 16) -> list[float]:
        """One score per conversation, each ending with the answer to judge."""
        return self.score_ids([self.encode(c) for c in conversations], batch_size)

    def score(self, conversation: list[dict[str, str]]) -> float:
        return self.score_conversations([conversation])[0]

    def score_answers(self, prompts: list[list[dict[str, str]]], answers: list[str],
                      batch_size: int = 16) -> list[float]:
        """Scores of answer texts to prompts (message lists)."""
        return self.score_conversations([p + [{"role": "assistant", "content": a}]
                                         for p, a in zip(prompts, answers, strict=True)], batch_size)

    def score_tokens(self, seq: torch.Tensor, attn: torch.Tensor, last: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Scores [B] of a padded batch of the RM's own token ids (left or right padding), read at each row's
        `last` token. Rows go through in chunks of similar length, without their all-padding columns."""
        out = torch.zeros(seq.shape[0], device=seq.device)
        order = torch.argsort(attn.sum(1), stable=True)
        with torch.no_grad():
            for start in range(0, seq.shape[0], batch_size):
                rows = order[start:start + batch_size]
                a = attn[rows]
                k = leading_pad(a)
                end = int(last[rows].max()) + 1
                scores = token_scores(self.model, seq[rows][:, k:end], a[:, k:end])
                out[rows] = scores.gather(1, (last[rows] - k).unsqueeze(1)).squeeze(1)
        return out

    def score_turns(self, seq: torch.Tensor, attn: torch.Tensor, last: torch.Tensor, ends: torch.Tensor,
                    suffix: list[int], batch_size: int) -> torch.Tensor:
        """Scores of left-padded prompt + response rows in the RM's own token ids, whose answers end at `last`
        (ending with EOS where `ends`). The RM was trained on whole rendered turns, so what the chat template
        writes after an answer's EOS (`suffix`) is appended to the rows that reached it first."""
        extra = len(suffix) if bool(ends.any()) else 0
        rows = seq.shape[0]
        seq = torch.cat([seq, torch.full((rows, extra), self.tok.pad_token_id, dtype=seq.dtype, device=seq.device)], 1)
        attn = torch.cat([attn, torch.zeros((rows, extra), dtype=attn.dtype, device=attn.device)], 1)
        if extra:
            tail = torch.tensor(suffix, dtype=seq.dtype, device=seq.device)
            for i in torch.nonzero(ends).flatten().tolist():
                at = int(last[i]) + 1
                seq[i, at:at + extra] = tail
                attn[i, at:at + extra] = 1
            last = last + ends.long() * extra
        return self.score_tokens(seq, attn, last, batch_size)
