"""A frozen trunk that PPO's models share, computed once per rollout.

With `--freeze-layers N` the policy keeps its embeddings and lowest N layers as the SFT model has them, and so does
the reference (the SFT model itself). The value model, started from a reward model trained with the same
`--freeze-layers` from the same SFT model (or from the policy), holds the very same weights there too. The hidden
states after layer N of a rollout are then the same for all three models, and they do not change during the
update: none of those weights is trained. So they are computed once per rollout, and every other pass (old and
reference log-probabilities, values, and each PPO epoch's training passes) runs only the layers above N.
With the demo's 20 of 30 layers frozen, that leaves a third of each forward pass to run.

Only where it is exact: the trunk's weights are compared tensor by tensor at start-up (those of a model loaded
from the policy's own folder are the same by construction: only their layout is checked), the model family is one
whose layer stack this module reproduces (its attention mask, rotary embeddings and layers called as the model's
own forward calls them), and the first rollout checks the shortcut against the model's full forward pass.
Anything else (LoRA, several processes, another family, different weights) runs the full passes as before.
Once found equal, the reference's and value model's lower layers become the policy's own modules: one copy of
the frozen weights in memory instead of three.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from rlhf_cli.core.generation import position_ids
from rlhf_cli.core.reward_model import head_model

# families whose decoder forward is: embed, causal mask, rotary embeddings, the layers, final norm
FAMILIES = ("llama",)


def _backbone(model: PreTrainedModel) -> torch.nn.Module | None:
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if all(hasattr(backbone, k) for k in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return backbone
    return None


def why_not_shared(models: list[PreTrainedModel], n: int, same_files: tuple[PreTrainedModel, ...] = ()
                   ) -> str | None:
    """None when the embeddings and lowest `n` layers of every model are the same frozen weights of a supported
    family; else the reason they cannot be shared. `same_files`: models loaded from the first one's own files
    (the reference, when not resuming), the same weights by construction: their layout is checked, not every
    value, so their lower layers need not be read at all."""
    if n <= 0:
        return "no frozen layers"
    families = {getattr(m.config, "model_type", None) for m in models}
    if not families <= set(FAMILIES):
        return f"model family {', '.join(sorted(map(str, families)))} (shared only for {', '.join(FAMILIES)})"
    backbones = [_backbone(m) for m in models]
    if any(b is None for b in backbones) or any(len(b.layers) <= n for b in backbones):
        return "the models' layer stacks differ from the expected layout"
    first = backbones[0]
    for m, b in zip(models[1:], backbones[1:], strict=True):
        compare = not any(m is x for x in same_files)
        parts = [(first.embed_tokens, b.embed_tokens)] + [(first.layers[i], b.layers[i]) for i in range(n)]
        for mine, theirs in parts:
            a, c = dict(mine.named_parameters()), dict(theirs.named_parameters())
            if a.keys() != c.keys():
                return "the models' lower layers differ in shape"
            for k, p in a.items():
                q = c[k]
                if p.requires_grad or q.requires_grad:
                    return "a lower layer is trained"
                if p.shape != q.shape or p.dtype != q.dtype or (compare and not torch.equal(p, q)):
                    return ("the value model's lower layers are not the policy's (a reward model trained with "
                            "other frozen layers, or from another SFT model)")
    return None


class SharedTrunk:
    """The embeddings and lowest `n` layers of `model` (the same frozen weights in every model it serves)."""

    def __init__(self, model: PreTrainedModel, n: int):
        self.model, self.n = model, n

    def _context(self, backbone: torch.nn.Module, h: torch.Tensor, attn: torch.Tensor) -> dict:
        from transformers.masking_utils import create_causal_mask

        pos = position_ids(attn)
        mask = create_causal_mask(config=backbone.config, inputs_embeds=h, attention_mask=attn, cache=None,
                                  position_ids=pos)
        return {"attention_mask": mask, "position_ids": pos,
                "position_embeddings": backbone.rotary_emb(h, position_ids=pos)}

    def states(self, seq: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, H] after the shared layers (no gradient: none of these weights trains)."""
        backbone = _backbone(self.model)
        with torch.no_grad():
            h = backbone.embed_tokens(seq)
            ctx = self._context(backbone, h, attn)
            for layer in backbone.layers[:self.n]:
                h = layer(h, use_cache=False, **ctx)
        return h

    def top(self, model: PreTrainedModel, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """`model`'s layers above the trunk and its final norm, from the trunk's states."""
        backbone = _backbone(model)
        ctx = self._context(backbone, h, attn)
        for layer in backbone.layers[self.n:]:
            h = layer(h, use_cache=False, **ctx)
        return backbone.norm(h)

    def response_logits(self, model: PreTrainedModel, h: torch.Tensor, attn: torch.Tensor, prompt_len: int,
                        temperature: float) -> torch.Tensor:
        """As `rollout.response_logits`, from the trunk's states."""
        r = h.shape[1] - prompt_len
        hidden = self.top(model, h, attn)[:, -(r + 1):]
        return model.get_output_embeddings()(hidden)[:, :-1].float() / temperature

    def token_scores(self, model: PreTrainedModel, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """As `reward_model.token_scores` (the head on every hidden state), from the trunk's states."""
        _, head = head_model(model)
        return head(self.top(model, h, attn)).squeeze(-1).float()


def share_layers(policy: PreTrainedModel, others: list[PreTrainedModel], n: int) -> None:
    """Make the lowest `n` layers of `others` the policy's own modules (the same frozen weights, found equal):
    one copy of them in memory instead of one per model."""
    first = _backbone(policy)
    for m in others:
        layers = _backbone(m).layers
        for i in range(n):
            layers[i] = first.layers[i]


def find_trunk(policy: PreTrainedModel, others: list[PreTrainedModel], n: int,
               same_files: tuple[PreTrainedModel, ...] = ()) -> tuple[SharedTrunk | None, str]:
    """The shared trunk of the policy and `others` (reference, value model), or None and the reason. When there
    is one, the others' lowest `n` layers become the policy's (`share_layers`)."""
    why = why_not_shared([policy, *others], n, same_files)
    if why is not None:
        return None, why
    share_layers(policy, others, n)
    return SharedTrunk(policy, n), f"embeddings and lowest {n} layers computed once per rollout"
