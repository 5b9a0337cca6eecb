"""The same training as `rlhf sft` / `rlhf reward`, written directly against TRL: the baseline of
stage_overhead.py. Same model folder, data, steps, batch, length, learning rate, seed, precision and threads.

    python bench/direct_trl.py sft MODEL_DIR DATA.jsonl OUT_DIR --steps 4 --batch-size 4 --max-length 256
    python bench/direct_trl.py reward MODEL_DIR PREFS.jsonl OUT_DIR --steps 4 --batch-size 4 --max-length 256
"""

from __future__ import annotations

import argparse

p = argparse.ArgumentParser()
p.add_argument("stage", choices=["sft", "reward"])
p.add_argument("model")
p.add_argument("data")
p.add_argument("out")
p.add_argument("--steps", type=int, default=4)
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--max-length", type=int, default=256)
p.add_argument("--lr", type=float, default=2e-5)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

torch.set_num_threads(a.threads)
tok = AutoTokenizer.from_pretrained(a.model)
ds = load_dataset("json", data_files=a.data, split="train")
common = dict(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.batch_size, learning_rate=a.lr,
              lr_scheduler_type="cosine", warmup_steps=0.05, seed=42, data_seed=42, bf16=False,
              gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
              disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False)
if a.stage == "sft":
    from trl import SFTConfig, SFTTrainer

    # The model folder's template already carries {% generation %} markers (rlhf sft saves it so).
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    cfg = SFTConfig(**common, max_length=a.max_length, assistant_only_loss=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
else:
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    cfg = RewardConfig(**common, max_length=a.max_length)
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
trainer.train()
trainer.save_model(a.out)
