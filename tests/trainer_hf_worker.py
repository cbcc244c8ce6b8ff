"""transformers' Trainer runs for tests/test_trainer_hf.py: ours and the peer's, fresh and resumed.

Run as ``python tests/trainer_hf_worker.py OUT_DIR '<json options>'``. Options: ``world`` (1: one
process, no DeepSpeed; 2: two CPU ranks, gloo), ``stage`` (ZeRO stage, with world 2), ``init``
(a file with the model's initial state dict, written by the test), ``peer`` (default true: also
the peer's runs), and for trying other configurations by hand ``offload`` (optimizer offload),
``bf16``, ``ga`` (gradient accumulation steps) and ``config_optimizer`` (the optimizer named in
the DeepSpeed config). In each process, four Trainer runs of ``STEPS`` steps on the same data
from the same initial weights:

- ``ours``: ``ScheduleFreeTrainer`` with ``optim="schedule_free_adamw"`` (sf_torch);
- ``ours_resumed``: the same, resumed from ``ours``' checkpoint at step ``RESUME_AT``;
- ``peer``: transformers' own ``Trainer`` with ``optim="schedule_free_adamw"`` (the
  ``schedulefree`` package), no callback;
- ``peer_resumed``: the same, resumed from ``peer``'s checkpoint at step ``RESUME_AT``.

Each run leaves its checkpoints under ``OUT_DIR/<run>`` (the test reads the model files), and
rank 0 writes ``OUT_DIR/results.pt``: per run, the eval losses the Trainer logged (by step), or
the error it raised, and per rank the optimizer's state at the end (sf_torch: the params or
DeepSpeed masters and z; schedulefree: its params and z) for the bitwise comparisons. Every number
comes from the Trainer; the test computes what they should be with a plain loop.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
import warnings

import numpy as np
import torch

VOCAB, LENGTH, LABELS = 40, 8, 3
N_TRAIN, N_EVAL = 16, 16  # one global batch each: every step sees the whole training set
STEPS, EVAL_STEPS, SAVE_STEPS, RESUME_AT = 8, 3, 2, 4
HPARAMS = dict(learning_rate=0.02, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.01)
WARMUP = 2


def make_model():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
        num_labels=LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    # The key bias shifts every attention logit of a query by the same amount, which softmax
    # ignores: its gradient is 0 in exact arithmetic and float32 rounding noise in float32, which
    # Adam's normalization turns into steps of size lr. Frozen, so the runs compare weights that
    # the data determines.
    for layer in model.bert.encoder.layer:
        layer.attention.self.key.bias.requires_grad_(False)
    return model


def make_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Token sequences; the label is the count of tokens below VOCAB/2, mod LABELS."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, LENGTH))
    labels = (ids < VOCAB // 2).sum(axis=1) % LABELS
    return [
        {
            "input_ids": torch.from_numpy(ids[i]).long(),
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            "labels": torch.tensor(int(labels[i])),
        }
        for i in range(n)
    ]


def ds_config(opts: dict) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": 0.0,
        "zero_optimization": {
            "stage": opts["stage"],
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "bf16": {"enabled": "auto"},
    }
    if opts.get("offload"):
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if opts.get("config_optimizer"):  # the optimizer named in the config, not by the Trainer
        cfg["optimizer"] = {
            "type": "AdamWScheduleFree",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
        cfg["optimizer"]["params"]["warmup_steps"] = WARMUP
    return cfg


def training_args(out_dir: str, opts: dict):
    from transformers import TrainingArguments

    world, ga = opts["world"], opts.get("ga", 1)
    return TrainingArguments(
        output_dir=out_dir,
        optim="schedule_free_adamw",
        lr_scheduler_type="constant",
        warmup_steps=WARMUP,
        max_grad_norm=0.0,
        max_steps=STEPS,
        per_device_train_batch_size=N_TRAIN // world // ga,
        gradient_accumulation_steps=ga,
        bf16=bool(opts.get("bf16")),
        per_device_eval_batch_size=N_EVAL // world,
        eval_strategy="steps",
        eval_steps=EVAL_STEPS,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        prediction_loss_only=True,
        dataloader_num_workers=0,
        use_cpu=True,
        seed=0,
        deepspeed=ds_config(opts) if opts.get("stage") is not None else None,
        **HPARAMS,
    )


def final_state(trainer) -> list[torch.Tensor]:
    """This rank's optimizer tensors at the end, flattened: every tensor the optimizer steps
    (the params, or DeepSpeed's fp32 master partitions) followed by its z, in the order the
    optimizer created its state."""
    client = trainer.optimizer
    while hasattr(client, "optimizer"):  # Accelerate's and DeepSpeed's wrappers
        client = client.optimizer
    out = []
    for p, state in client.state.items():
        out.append(p.detach().reshape(-1).clone())
        out.append(state["z"].detach().reshape(-1).clone())
    return out


def one_run(name: str, out_dir: str, opts: dict) -> dict:
    from transformers import Trainer

    from sf_torch.integrations.transformers import ScheduleFreeTrainer

    model = make_model()
    model.load_state_dict(torch.load(opts["init"]))
    ours = name.startswith("ours")
    cls = ScheduleFreeTrainer if ours else Trainer
    run_dir = os.path.join(out_dir, name)
    trainer = cls(
        model=model,
        args=training_args(run_dir, opts),
        train_dataset=make_data(N_TRAIN, 1),
        eval_dataset=make_data(N_EVAL, 2),
    )
    resume = None
    if name.endswith("_resumed"):
        resume = os.path.join(out_dir, name.removesuffix("_resumed"), f"checkpoint-{RESUME_AT}")
    result: dict = {"error": None}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train(resume_from_checkpoint=resume)
    except Exception as err:  # the peer's failures are part of what the test records
        if ours:
            raise
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()[-2000:]
    result["eval_loss"] = {
        int(entry["step"]): float(entry["eval_loss"])
        for entry in trainer.state.log_history
        if "eval_loss" in entry
    }
    if result["error"] is None:
        result["state"] = final_state(trainer)
    return result


def run_all(out_dir: str, opts: dict) -> dict:
    results = {}
    names = ("ours", "ours_resumed", "peer", "peer_resumed")
    for name in names if opts.get("peer", True) else names[:2]:
        if name == "peer_resumed" and results["peer"]["error"] is not None:
            results[name] = {"error": "not run: the peer's first run failed", "eval_loss": {}}
            continue
        results[name] = one_run(name, out_dir, opts)
    return results


def rank_main(rank: int, world: int, port: int, out_dir: str, opts: dict) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    result = run_all(out_dir, opts)
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, result)
    if rank == 0:
        torch.save(gathered, os.path.join(out_dir, "results.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)  # as tests/ds_worker.py: DeepSpeed's CPU comm threads may abort a normal exit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out_dir: str, opts: dict) -> None:
    torch.set_num_threads(1)
    world = opts["world"]
    if world == 1:
        torch.save([run_all(out_dir, opts)], os.path.join(out_dir, "results.pt"))
        return
    import torch.multiprocessing as mp

    os.environ["DS_ACCELERATOR"] = "cpu"  # the ranks inherit it
    mp.spawn(rank_main, args=(world, free_port(), out_dir, opts), nprocs=world, join=True)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
