"""Fine-tune a small BERT classifier with transformers' Trainer and sf_torch's Schedule-Free AdamW.

The model is built from a config (no downloads) and reads scikit-learn's digits as sequences of
64 pixel tokens (intensity 0-16). ``ScheduleFreeTrainer`` is transformers' ``Trainer`` with
``optim="schedule_free_adamw"`` giving ``sf_torch.AdamWScheduleFree``: evaluation runs at x,
every checkpoint's model file holds x (what you publish), training continues at y, and
``--resume`` continues a run bitwise where it stopped. At the end the last checkpoint's model
file is loaded into a fresh model and evaluated again: the same loss as the Trainer's.

    python -m examples.trainers.hf_trainer --output-dir /tmp/sf_hf --steps 300
    python -m examples.trainers.hf_trainer --output-dir /tmp/sf_hf --steps 300 --resume

Under DeepSpeed (here 2 CPU ranks; on GPUs leave out DS_ACCELERATOR), ``--zero STAGE`` builds
the config, ``--deepspeed CONFIG.json`` takes yours:

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m examples.trainers.hf_trainer \\
        --zero 3 --output-dir /tmp/sf_hf_ds --steps 300
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", required=True, help="checkpoints go here")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size (default 32)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    p.add_argument(
        "--warmup-steps", type=int, default=30, help="optimizer warmup steps (default 30)"
    )
    p.add_argument("--weight-decay", type=float, default=0.01, help="default 0.01")
    p.add_argument("--eval-steps", type=int, default=100, help="evaluate every N steps")
    p.add_argument("--save-steps", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--deepspeed", metavar="CONFIG", help="a DeepSpeed config (JSON file)")
    p.add_argument("--zero", type=int, choices=range(4), help="DeepSpeed ZeRO stage (0-3)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.deepspeed and args.zero is not None:
        p.error("--deepspeed and --zero: give one (a config file, or a stage to build one)")
    for name in ("steps", "batch_size", "eval_steps", "save_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


class Digits(torch.utils.data.Dataset):
    """scikit-learn's digits (8x8, intensities 0-16) as 64 tokens; token ids 1-17, 0 unused."""

    def __init__(self, rows: np.ndarray, labels: np.ndarray):
        self.ids = torch.from_numpy(rows.astype(np.int64) + 1)
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def datasets(seed: int) -> tuple[Digits, Digits]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    rows, labels = digits.data[order], digits.target[order]
    # 296 eval rows: one eval batch per rank for 1, 2, 4 or 8 ranks, so that the Trainer's
    # eval loss is the plain mean over the set (it weights a rank's padded last batch otherwise).
    return Digits(rows[:1500], labels[:1500]), Digits(rows[1500:1796], labels[1500:1796])


def make_model(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=18,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=10,
    )
    return BertForSequenceClassification(config)


def deepspeed_config(args: argparse.Namespace) -> dict | None:
    if args.deepspeed:
        with open(args.deepspeed) as f:
            return json.load(f)
    if args.zero is None:
        return None
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": args.zero,
            # ZeRO-3: gather the weights into the checkpoint's model file (at x)
            "stage3_gather_16bit_weights_on_model_save": True,
        },
    }


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


@torch.no_grad()
def published_eval_loss(folder: str, eval_set: Digits) -> float:
    """The model file in `folder` (model.safetensors) loaded into a fresh model and evaluated in
    plain torch (float32, no Schedule-Free anywhere): the mean loss over the eval set. (Not
    ``from_pretrained``: under ZeRO-3 it would join DeepSpeed's collective init on one rank.)"""
    from safetensors.torch import load_file

    model = make_model(0)
    model.load_state_dict(
        {k: v.float() for k, v in load_file(f"{folder}/model.safetensors").items()}
    )
    model.eval()
    rows = [eval_set[i] for i in range(len(eval_set))]
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    return float(model(**batch).loss)


def main(argv=None) -> dict:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of {world} ranks")
    ds = deepspeed_config(args)
    if ds is not None and world > 1 and os.environ.get("DS_ACCELERATOR") == "cpu":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")

    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from sf_torch.integrations.transformers import ScheduleFreeTrainer

    train_set, eval_set = datasets(args.seed)
    training = TrainingArguments(
        output_dir=args.output_dir,
        optim="schedule_free_adamw",  # sf_torch.AdamWScheduleFree under ScheduleFreeTrainer
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,  # the optimizer's warmup
        lr_scheduler_type="constant",  # no decay on top of Schedule-Free
        weight_decay=args.weight_decay,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size // world,
        per_device_eval_batch_size=-(-len(eval_set) // world),
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        logging_steps=args.eval_steps,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=args.bf16,
        seed=args.seed,
        deepspeed=ds,
    )
    trainer = ScheduleFreeTrainer(
        model=make_model(args.seed),
        args=training,
        train_dataset=train_set,
        eval_dataset=eval_set,
        compute_metrics=accuracy,
    )
    resume = get_last_checkpoint(args.output_dir) if args.resume else None
    if args.resume and resume is None:
        raise SystemExit(f"--resume: no checkpoint in {args.output_dir}")
    trainer.train(resume_from_checkpoint=resume)
    final = trainer.evaluate()  # the model is at x after train()
    last = get_last_checkpoint(args.output_dir)
    result = {"eval_loss": final["eval_loss"], "eval_accuracy": final["eval_accuracy"]}
    if trainer.args.process_index == 0:
        result["checkpoint"] = last
        result["published_eval_loss"] = published_eval_loss(last, eval_set)
        print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
