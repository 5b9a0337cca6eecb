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
import inspect
import json
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
from rlhf_cli.core.args import SAMPLING_DEFAULTS
from rlhf_cli.core.errors import CheckpointError, ConfigError
from rlhf_cli.core.linear_kernels import packed_linears
from rlhf_cli.core.manifest import manifest_if_stage
from rlhf_cli.core.models import SAFE_LOADING, LoadOptions, load_tokenizer, resolve_model
from rlhf_cli.core.stages import a_stage, command_for

GENERATION_CONFIG = "generation_config.json"


@dataclass
class Sampling:
    """How answers are sampled. temperature 0 means greedy decoding; top_k 0, top_p 1 and repetition_penalty 1
    switch those off. The defaults are `SAMPLING_DEFAULTS` (see `pick_sampling` for where else settings come from)."""

    temperature: float = SAMPLING_DEFAULTS["temperature"]
    top_p: float = SAMPLING_DEFAULTS["top_p"]
    top_k: int = int(SAMPLING_DEFAULTS["top_k"])
    max_new_tokens: int = 256
    repetition_penalty: float = SAMPLING_DEFAULTS["repetition_penalty"]

    def check(self, where: Callable[[str], str] = lambda name: "--" + name.replace("_", "-")) -> Sampling:
        if not self.temperature >= 0:
            raise ConfigError(f"{where('temperature')} {self.temperature}: expected a number >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{where('top_p')} {self.top_p}: expected a probability in (0, 1] (1 = off)")
        if self.top_k < 0:
            raise ConfigError(f"{where('top_k')} {self.top_k}: expected a whole number >= 0 (0 = off)")
        if self.max_new_tokens < 1:
            raise ConfigError(f"{where('max_new_tokens')} {self.max_new_tokens}: expected a whole number >= 1")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"{where('repetition_penalty')} {self.repetition_penalty}: expected a positive "
                              f"number (1 = off)")
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
        """Every sampling setting of `generate`, so nothing comes from the model's own generation config."""
        if self.temperature == 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
                    "repetition_penalty": self.repetition_penalty, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty, "max_new_tokens": self.max_new_tokens}

    def describe(self) -> str:
        """The sampling settings as one phrase (max_new_tokens left out)."""
        if self.temperature == 0:
            penalty = f", repetition_penalty {self.repetition_penalty:g}" if self.repetition_penalty != 1 else ""
            return "temperature 0 (greedy)" + penalty
        return ", ".join(f"{k} {getattr(self, k):g}" for k in SAMPLING_KEYS)


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


def folder_sampling(folder: Path | None) -> dict[str, float]:
    """The sampling settings a model folder's generation_config.json states, and only those: `do_sample: false`
    is greedy decoding (temperature 0); settings it leaves out are not filled in."""
    try:
        cfg = json.loads((Path(folder) / GENERATION_CONFIG).read_text(encoding="utf-8"))
    except (OSError, TypeError, ValueError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    found = {k: cfg[k] for k in SAMPLING_KEYS
             if isinstance(cfg.get(k), (int, float)) and not isinstance(cfg.get(k), bool)}
    if cfg.get("do_sample") is False:
        found = {"temperature": 0.0} | ({"repetition_penalty": found["repetition_penalty"]}
                                        if "repetition_penalty" in found else {})
    return found


def pick_sampling(layers: list[tuple[str, dict[str, Any]]], max_new_tokens: int,
                  where: Callable[[str], str] = lambda name: "--" + name.replace("_", "-"),
                  ) -> tuple[Sampling, str]:
    """Each setting's first value in `layers`, (source, settings) pairs from the highest precedence down (the
    flags, a parent stage, the model's generation_config.json, the defaults), checked; and one line saying what
    was chosen and where each setting came from."""
    values: dict[str, Any] = {}
    sources: dict[str, list[str]] = {}
    for name in SAMPLING_KEYS:
        for source, settings in layers:
            if settings.get(name) is not None:
                values[name] = settings[name]
                sources.setdefault(source, []).append(name)
                break
    values["top_k"] = int(values.get("top_k", 0))
    sampling = Sampling(**values, max_new_tokens=max_new_tokens).check(where)
    if sampling.temperature == 0:  # greedy: only the settings that still count are named
        counted = {"temperature"} | ({"repetition_penalty"} if sampling.repetition_penalty != 1 else set())
        sources = {k: [n for n in v if n in counted] for k, v in sources.items()}
        sources = {k: v for k, v in sources.items() if v}
    order = [source for source, _ in layers if source in sources]  # highest precedence first
    if len(order) == 1:
        why = order[0]
    else:
        why = "; ".join(f"{', '.join(sources[source])} {source}" for source in order)
    return sampling, f"sampling: {sampling.describe()} ({why})"


def sampling_layers(given: Any, folder: Path | None,
                    fallback: dict[str, float] = SAMPLING_DEFAULTS) -> list[tuple[str, dict[str, Any]]]:
    """The usual layers of `pick_sampling`: the settings given (flags or --config, None = not given), then the
    folder's generation_config.json, then `fallback`."""
    stated = {k: getattr(given, k, None) for k in SAMPLING_KEYS}
    return [("as given", stated), (f"from {Path(folder) / GENERATION_CONFIG}", folder_sampling(folder)),
            ("from the defaults for small instruct models" if fallback == SAMPLING_DEFAULTS else
             "from the defaults", fallback)]


def sampling_differs(first: tuple[str, Path], other: tuple[str, Path], what: str) -> str | None:
    """A line when `other`'s generation_config.json asks for other sampling settings than `first`'s: models that
    are compared always sample with one set of settings (the first model's), and `what` says why."""
    mine, theirs = folder_sampling(first[1]), folder_sampling(other[1])
    if mine == theirs:
        return None

    def shown(s: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in s.items()) or "none"

    return (f"{other[0]}: its generation_config.json asks for other sampling settings ({shown(theirs)}) than "
            f"{first[0]}'s ({shown(mine)}); both sample with the settings above, {what}")


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


def position_ids(attn: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as generate does with left padding."""
    return (attn.long().cumsum(1) - 1).clamp_min(0)


def _innermost(model: torch.nn.Module) -> torch.nn.Module:
    """The model under its wrappers: DistributedDataParallel's `module`, peft's base model."""
    while True:
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def last_logits(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor, keep: int) -> torch.Tensor:
    """A causal LM's logits [B, keep, V] for the last `keep` positions of `ids`, positions counted over real
    tokens. Vocabulary logits are computed for those positions only where the model's forward takes
    `logits_to_keep` (transformers' causal LMs do; through DDP or peft wrappers too); for an architecture without
    it, every position's logits are computed and the last `keep` kept: the same values, more memory."""
    kwargs = dict(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False)
    if "logits_to_keep" in inspect.signature(_innermost(model).forward).parameters:
        kwargs["logits_to_keep"] = keep
    return model(**kwargs).logits[:, -keep:]


@dataclass
class Answer:
    text: str
    finished: bool  # reached EOS (False: cut at max_new_tokens, or stopped)
    tokens: int


class LM:
    """A causal LM with its tokenizer (left padding), ready to sample."""

    def __init__(self, name: str, path: Path, model: PreTrainedModel | None, tok: PreTrainedTokenizerBase,
                 eos_ids: list[int] | None = None, context: int | None = None):
        """`model` None: only the tokenizer's side (encoding prompts, decoding answers) for answers sampled by
        another engine (`core.vllm_engine`); then `eos_ids` and `context` come from the folder's files."""
        self.name, self.path, self.model, self.tok = name, path, model, tok
        self.eos_ids = eos_ids or stop_ids(tok, model.generation_config.eos_token_id)
        self.context = context if model is None else getattr(model.config, "max_position_embeddings", None)

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
        with torch.inference_mode(), packed_linears(self.model, keep=True):
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
            with torch.inference_mode(), packed_linears(self.lm.model, keep=True):
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


def tokenizer_lm(spec: str, path: Path, loading: LoadOptions = SAFE_LOADING) -> LM:
    """An `LM` without weights, for a model whose answers another engine samples: the tokenizer (left padding),
    the stop ids of its generation_config.json and its context length from config.json."""
    tok = load_tokenizer(path, padding_side="left", loading=loading)
    try:
        gen = json.loads((path / GENERATION_CONFIG).read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, json.JSONDecodeError):
        gen = None
    try:
        context = json.loads((path / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, json.JSONDecodeError):
        context = None
    return LM(spec, path, None, tok, eos_ids=stop_ids(tok, gen), context=context)


def load_lm(spec: str, flag: str = "MODEL", precision: str = "auto", say: Callable[[str], None] = lambda s: None,
            loading: LoadOptions = SAFE_LOADING) -> LM:
    """A causal LM from any model spec; refuses reward models with a message naming what is expected."""
    refuse_reward_stage(spec, flag)
    path = resolve_model(spec, flag, say, loading)
    cfg = AutoConfig.from_pretrained(path, **loading.code_kwargs())
    if any("ForSequenceClassification" in a for a in (cfg.architectures or [])):
        raise CheckpointError(f"{flag} {spec}: is a sequence classifier ({', '.join(cfg.architectures)}), not a "
                              f"language model; expected a model that generates, such as an sft stage")
    tok = load_tokenizer(path, padding_side="left", loading=loading)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=runtime.torch_dtype(runtime.pick_precision(precision)),
                                                 **loading.model_kwargs())
    model = runtime.to_device(model).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return LM(spec, path, model, tok)
