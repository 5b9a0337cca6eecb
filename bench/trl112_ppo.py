"""The baseline of ppo_vs_trl112.py: TRL 1.12's `trl.experimental.ppo.PPOTrainer` (the last PPO TRL shipped) on the
same policy, reward model, prompts and settings as `rlhf ppo`. Runs only in the benchmark virtualenv
bench/.venv-trl112 (trl==1.12.0, never a project dependency); it does not import rlhf_cli.

    bench/.venv-trl112/bin/python bench/trl112_ppo.py --policy P --reward RM --prompts prompts.jsonl --out OUT \
        --updates 10 --batch-size 8 --ppo-epochs 2 --num-minibatches 2 --response-length 32 --lr 1e-3

`--freeze-layers N` freezes the input embeddings and lowest N layers of policy and value model, as `rlhf ppo
--freeze-layers N` does (TRL 1.12's PPOTrainer has no such option; its optimiser skips parameters without
gradients). Policy, reference (a second copy of the policy folder), value model (started from the reward model,
as TRL's own PPO example does and as `rlhf ppo --value-init reward` does) and reward model are loaded in fp32.
Prompts are rendered with the tokenizer's chat template plus the generation prompt, exactly as `rlhf ppo` renders
them. Writes OUT/log_history.jsonl: one line per update with TRL's logged metrics plus `time/update` (seconds
since the previous update's log, the first from the start of training) and `time/since_start` (since this process
began).
"""

from __future__ import annotations

import time

T_PROCESS = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

from ppo_settings import add_settings  # noqa: E402 (this script's folder, bench/)

p = argparse.ArgumentParser()
p.add_argument("--policy", required=True)
p.add_argument("--reward", required=True)
p.add_argument("--prompts", required=True)
p.add_argument("--out", required=True)
add_settings(p)
p.add_argument("--seed", type=int, default=42)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
    set_seed,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

torch.set_num_threads(a.threads)
# PPOTrainer seeds torch itself but not numpy, whose global RNG shuffles its minibatches: seed everything, as a
# training script would, so that a run is repeatable.
set_seed(a.seed)
tok = AutoTokenizer.from_pretrained(a.policy, padding_side="left")
assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id, "needs a pad token distinct from EOS"

rows = [json.loads(x) for x in open(a.prompts, encoding="utf-8") if x.strip()]
ids = [tok(tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
           add_special_tokens=False)["input_ids"] for r in rows]
train = Dataset.from_dict({"input_ids": ids})

f32 = torch.float32
policy = AutoModelForCausalLM.from_pretrained(a.policy, dtype=f32)
ref = AutoModelForCausalLM.from_pretrained(a.policy, dtype=f32)
rm = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, dtype=f32)
value = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, dtype=f32)
for m in (policy, ref, rm, value):
    m.config.pad_token_id = tok.pad_token_id
# --freeze-layers N: as `rlhf ppo --freeze-layers N` does to the models it trains, the input embeddings (with
# SmolLM2's tied embeddings, the LM head too) and the lowest N decoder layers of policy and value model get no
# gradients, so no backward pass runs below layer N
for m in (policy, value) if a.freeze_layers else ():
    m.get_input_embeddings().requires_grad_(False)
    for layer in m.model.layers[:a.freeze_layers]:
        layer.requires_grad_(False)

cfg = PPOConfig(
    output_dir=os.path.join(a.out, "trainer"), seed=a.seed, data_seed=a.seed,
    per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1, num_mini_batches=a.num_minibatches,
    num_ppo_epochs=a.ppo_epochs, total_episodes=a.updates * a.batch_size, response_length=a.response_length,
    stop_token="eos", missing_eos_penalty=a.missing_eos_penalty, kl_coef=a.kl_coef, temperature=a.temperature,
    learning_rate=a.lr, lr_scheduler_type="linear", warmup_steps=0,
    bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, dataloader_pin_memory=False,
    report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, num_sample_generations=0,
)


class Timing(TrainerCallback):
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.last = None

    def on_train_begin(self, args, state, control, **kw):
        self.last = time.time()

    def on_log(self, args, state, control, logs=None, **kw):
        now = time.time()
        self.rows.append({"step": state.global_step, **(logs or {}), "time/update": now - self.last,
                          "time/since_start": now - T_PROCESS})
        self.last = now


timing = Timing()
trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                     value_model=value, train_dataset=train, callbacks=[timing])
t_train = time.time()
trainer.train()
t_end_train = time.time()
trainer.save_model(a.out)  # the policy only, as TRL saves it
tok.save_pretrained(a.out)
os.makedirs(a.out, exist_ok=True)
with open(os.path.join(a.out, "log_history.jsonl"), "w", encoding="utf-8") as f:
    for r in timing.rows:
        f.write(json.dumps(r) + "\n")
with open(os.path.join(a.out, "timing.json"), "w", encoding="utf-8") as f:
    json.dump({"startup_s": t_train - T_PROCESS, "train_s": t_end_train - t_train,
               "save_s": time.time() - t_end_train, "updates": trainer.state.global_step}, f)
