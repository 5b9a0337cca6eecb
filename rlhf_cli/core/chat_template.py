"""Chat templates for training and inference.

Assistant-only loss needs `{% generation %}` markers in the template, so the tokenizer can tell which tokens
the assistant wrote. We build a marked copy of the model's own template and keep it only if it renders every
probe conversation exactly as the original does: inference with the saved tokenizer stays identical to the
model's own template. The end-of-turn token sits inside the markers so the model learns to stop.
"""

from __future__ import annotations

import json
from typing import Any

from rlhf_cli.core.errors import ConfigError

_PROBES = [
    [{"role": "user", "content": "U1"}],
    [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2 \n 二"}],
]


def _chatml(default_system: str | None) -> str:
    sys_part = ""
    if default_system is not None:
        lit = json.dumps(default_system, ensure_ascii=False)
        sys_part = ("{%- if loop.first and messages[0]['role'] != 'system' -%}"
                    "{{ '<|im_start|>system\\n' + " + lit + " + '<|im_end|>\\n' }}{%- endif -%}")
    return (
        "{%- for message in messages -%}" + sys_part +
        "{%- if message['role'] == 'assistant' -%}"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{{ '\\n' }}"
        "{%- else -%}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def _render(tok: Any, template: str, messages: list[dict], gen: bool) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)


def renders_identically(tok: Any, original: str, candidate: str) -> bool:
    try:
        return all(
            _render(tok, original, m, g) == _render(tok, candidate, m, g)
            for m in _PROBES for g in (False, True)
            if not (g and m[-1]["role"] == "assistant")
        )
    except Exception:
        return False


def _candidates(tok: Any, original: str) -> list[str]:
    out = []
    head = _render(tok, original, [{"role": "user", "content": "@@U@@"}], False)
    prefix = head.split("<|im_start|>user", 1)[0] if "<|im_start|>user" in head else None
    if prefix is not None:
        if prefix == "":
            out.append(_chatml(None))
        elif prefix.startswith("<|im_start|>system\n") and prefix.endswith("<|im_end|>\n"):
            out.append(_chatml(prefix[len("<|im_start|>system\n"):-len("<|im_end|>\n")]))
    try:  # TRL knows marked versions of several families' templates (Llama 3, Qwen, Gemma, Phi, ...)
        from trl.chat_template_utils import get_training_chat_template

        out.append(get_training_chat_template(tok))
    except Exception:
        pass
    return out


def training_template(tok: Any) -> str:
    """The model's template with generation markers, rendering identically; ConfigError if none is known."""
    original = tok.chat_template
    if not original:
        raise ConfigError(
            f"{tok.name_or_path}: the tokenizer has no chat template; conversational data needs one "
            f"(use an instruct model, or set chat_template in tokenizer_config.json)")
    if "{% generation %}" in original or "{%- generation %}" in original:
        return original
    for cand in _candidates(tok, original):
        if renders_identically(tok, original, cand):
            return cand
    raise ConfigError(
        f"{tok.name_or_path}: its chat template has no {{% generation %}} markers and no marked twin is known, "
        f"so assistant-only loss cannot find the answers; pass --no-assistant-only-loss to train on whole "
        f"conversations")
