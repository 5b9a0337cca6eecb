"""Sampling from any causal language model: the shared piece behind `rlhf generate` and `rlhf chat`.

A model spec (stage folder, model folder or hub id) resolves through `rlhf_cli.models.resolve_model`; prompts go
through the model's own chat template. Batches are left-padded so every prompt ends where generation starts, and
the KV cache is on. `LM.sample` returns whole answers for a batch of prompts; `LM.stream` runs one answer in a
background thread and yields text as it is decoded (transformers' TextIteratorStreamer), and can be stopped
early through a stopping criterion (Ctrl-C in `rlhf chat`).

    from rlhf_cli.core.generation import Sampling, load_lm
    lm = load_lm("runs/demo/sft")
    [[answer]] = lm.sample([lm.encode([{"role": "user", "content": "Hi"}])], 1, Sampling(max_new_tokens=32))
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from rlhf_cli.core import runtime
from rlhf_cli.core.errors import CheckpointError, ConfigError
from rlhf_cli.core.manifest import manifest_if_stage
from rlhf_cli.core.models import load_tokenizer, resolve_model
from rlhf_cli.core.stages import a_stage, command_for


@dataclass
class Sampling:
    """How answers are sampled. temperature 0 means greedy decoding; top_k 0 and top_p 1 switch those off."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256

    def check(self, where: Callable[[str], str] = lambda name: "--" + name.replace("_", "-")) -> Sampling:
        if not self.temperature >= 0:
            raise ConfigError(f"{where('temperature')} {self.temperature}: expected a number >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{where('top_p')} {self.top_p}: expected a probability in (0, 1] (1 = off)")
        if self.top_k < 0:
            raise ConfigError(f"{where('top_k')} {self.top_k}: expected a whole number >= 0 (0 = off)")
        if self.max_new_tokens < 1:
            raise ConfigError(f"{where('max_new_tokens')} {self.max_new_tokens}: expected a whole number >= 1")
        return self

    def with_value(self, name: str, text: str) -> Sampling:
        """A copy with one setting parsed from text (`/set top_p 0.9`); errors name the setting."""
        name = name.replace("-", "_")
        types = {f.name: f.type for f in dataclasses.fields(self)}
        if name not in types:
            raise ConfigError(f"{name}: unknown setting; expected one of: {', '.join(types)}")
        kind = int if types[name] in (int, "int") else float
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ConfigError(f"{name} {text}: expected {what}") from None
        return dataclasses.replace(self, **{name: value}).check(lambda n: n)

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
                    "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens}


def render_chat(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool = True) -> str:
    """The conversation as the model reads it: its chat template, or a Human/Assistant transcript when the
    tokenizer has none (base models)."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    names = {"system": "", "user": "\n\nHuman: ", "assistant": "\n\nAssistant: "}
    text = "".join(names[m["role"]] + m["content"] for m in messages)
    return text + ("\n\nAssistant:" if generation_prompt else "")


def encode_chat(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                generation_prompt: bool = True) -> list[int]:
    """Token ids of `render_chat` (the template writes the special tokens itself)."""
    return tok(render_chat(tok, messages, generation_prompt), add_special_tokens=False)["input_ids"]


def stop_ids(tok: PreTrainedTokenizerBase, generation_eos: int | list[int] | None) -> list[int]:
    """The tokenizer's EOS plus the EOS ids of the model's generation config (several chat models have two)."""
    eos = list(generation_eos) if isinstance(generation_eos, (list, tuple)) else [generation_eos]
    return sorted({i for i in eos + [tok.eos_token_id] if i is not None})


def cut_at_eos(ids: list[int], eos_ids: list[int]) -> tuple[list[int], bool]:
    """The answer's tokens up to and including the first EOS (all of them when there is none), and whether it
    reached EOS. Generation pads finished rows after their EOS; a row without EOS is never padded."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[:i + 1], True
    return ids, False


def pad_batch(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one padded batch: (ids, attention mask), long tensors on the CPU. Left padding for
    generation, right padding elsewhere."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, cols] = torch.tensor(s, dtype=torch.long)
        attn[row, cols] = 1
    return ids, attn


@dataclass
class Answer:
    text: str
    finished: bool  # reached EOS (False: cut at max_new_tokens, or stopped)
    tokens: int


class LM:
    """A causal LM with its tokenizer (left padding), ready to sample."""

    def __init__(self, name: str, path: Path, model: PreTrainedModel, tok: PreTrainedTokenizerBase):
        self.name, self.path, self.model, self.tok = name, path, model, tok
        self.eos_ids = stop_ids(tok, model.generation_config.eos_token_id)
        self.context = getattr(model.config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_chat(self.tok, messages)

    def fit(self, messages: list[dict[str, str]], max_new_tokens: int) -> tuple[list[int], int]:
        """Token ids of the conversation, dropping its oldest turns (never the system prompt or the last user
        turn) until the answer fits the model's context; also returns how many messages were dropped."""
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        dropped = 0
        while True:
            ids = self.encode(system + turns)
            if self.context is None or len(ids) + max_new_tokens <= self.context or len(turns) <= 1:
                return ids, dropped
            cut = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), len(turns) - 1)
            turns, dropped = turns[cut:], dropped + cut

    def fit_prompts(self, prompts: list[list[dict[str, str]]], max_new_tokens: int,
                    flag: str = "MODEL") -> tuple[list[list[int]], int]:
        """Token ids of one-turn prompts, each cut to its last tokens where prompt + answer would not fit the
        context; also returns how many were cut."""
        room = (self.context - max_new_tokens) if self.context else None
        if room is not None and room < 1:
            raise ConfigError(f"--max-new-tokens {max_new_tokens}: leaves no room for the prompt in {flag} "
                              f"{self.name}'s {self.context}-token context; expected fewer")
        out, cut = [], 0
        for p in prompts:
            ids = self.encode(p)
            if room is not None and len(ids) > room:
                ids, cut = ids[-room:], cut + 1
            out.append(ids)
        return out, cut

    def answer(self, new_ids: list[int]) -> Answer:
        """Generated token ids as an answer: cut at the first EOS, decoded without special tokens."""
        kept, finished = cut_at_eos(new_ids, self.eos_ids)
        kept = kept[:-1] if finished else kept
        return Answer(self.tok.decode(kept, skip_special_tokens=True).strip(), finished, len(kept))

    def sample_ids(self, prompts: list[list[int]], n: int, sampling: Sampling) -> list[list[int]]:
        """The raw new token ids of `n` answers per prompt (rows: prompt 0 answer 0..n-1, prompt 1 ...),
        generated in one left-padded batch with the KV cache."""
        pad = self.tok.pad_token_id
        x, att = pad_batch(prompts, pad, left=True)
        width = x.shape[1]
        self.model.eval()
        with torch.inference_mode():
            out = self.model.generate(input_ids=x.to(self.device), attention_mask=att.to(self.device),
                                      num_return_sequences=n, use_cache=True, pad_token_id=pad,
                                      eos_token_id=self.eos_ids, **sampling.generate_kwargs())
        return out[:, width:].cpu().tolist()

    def sample(self, prompts: list[list[int]], n: int, sampling: Sampling) -> list[list[Answer]]:
        """`n` answers for each prompt (token ids), decoded."""
        new = self.sample_ids(prompts, n, sampling)
        return [[self.answer(new[p * n + j]) for j in range(n)] for p in range(len(prompts))]

    def stream(self, messages: list[dict[str, str]], sampling: Sampling) -> Stream:
        ids, dropped = self.fit(messages, sampling.max_new_tokens)
        return Stream(self, ids, sampling, dropped)


class Stream:
    """One answer generated in a background thread. Iterate for text pieces as they are decoded; `stop()` ends
    generation after the current token; `finish()` waits for the thread and returns the text not yet read."""

    def __init__(self, lm: LM, ids: list[int], sampling: Sampling, dropped: int = 0):
        self._flag = threading.Event()
        self.lm, self.dropped = lm, dropped
        self.answer: Answer | None = None
        self.error: BaseException | None = None
        self.streamer = TextIteratorStreamer(lm.tok, skip_prompt=True, skip_special_tokens=True)
        self._kwargs = dict(use_cache=True, pad_token_id=lm.tok.pad_token_id, eos_token_id=lm.eos_ids,
                            streamer=self.streamer, stopping_criteria=StoppingCriteriaList([StopFlag(self._flag)]),
                            **sampling.generate_kwargs())
        self._ids = ids
        self._ended = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            x = torch.tensor([self._ids], dtype=torch.long, device=self.lm.device)
            self.lm.model.eval()
            with torch.inference_mode():
                out = self.lm.model.generate(input_ids=x, attention_mask=torch.ones_like(x), **self._kwargs)
            self.answer = self.lm.answer(out[0, len(self._ids):].cpu().tolist())
        except BaseException as e:  # surfaced by finish(); end() unblocks the reader
            self.error = e
            self.streamer.end()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._ended:
            raise StopIteration
        try:
            return next(self.streamer)
        except StopIteration:
            self._ended = True  # the end marker is read once; finish() must not wait for another
            raise

    def stop(self) -> None:
        self._flag.set()

    @property
    def stopped(self) -> bool:
        return self._flag.is_set()

    def finish(self) -> str:
        rest = "".join(self)
        self._thread.join()
        if self.error is not None:
            raise self.error
        return rest


class StopFlag(StoppingCriteria):
    """Stops generation once its event is set (Ctrl-C in `rlhf chat`)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def refuse_reward_stage(spec: str, flag: str) -> None:
    """A reward stage given where a model that writes answers is expected: one clear error."""
    m = manifest_if_stage(spec)
    if m is not None and m.stage == "reward":
        raise CheckpointError(f"{flag} {spec}: is {a_stage(m.stage)} (it scores answers, it cannot write them); "
                              f"expected a model that generates: an sft or ppo stage, made by "
                              f"`{command_for('sft')}`, a model folder or a hub id")


def load_lm(spec: str, flag: str = "MODEL", precision: str = "auto", say: Callable[[str], None] = lambda s: None,
            ) -> LM:
    """A causal LM from any model spec; refuses reward models with a message naming what is expected."""
    refuse_reward_stage(spec, flag)
    path = resolve_model(spec, flag, say)
    cfg = AutoConfig.from_pretrained(path)
    if any("ForSequenceClassification" in a for a in (cfg.architectures or [])):
        raise CheckpointError(f"{flag} {spec}: is a sequence classifier ({', '.join(cfg.architectures)}), not a "
                              f"language model; expected a model that generates, such as an sft stage")
    tok = load_tokenizer(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=runtime.torch_dtype(runtime.pick_precision(precision)))
    model = runtime.to_device(model).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return LM(spec, path, model, tok)
