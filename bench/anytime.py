"""Anytime benchmark: one Schedule-Free run against AdamW + cosine and AdamW + WSD runs.

    python -m bench.anytime --problem all --framework both --size small
    python -m bench.anytime --problem charlm --size full --device cuda --out reports/anytime_gpu

A cosine or WSD schedule must be told its length ``T`` in advance, and its model is only good
at that length; Schedule-Free needs no length: its ``x`` is meant to be good at every step.
This benchmark measures that claim at three horizons, ``T/4``, ``T/2`` and ``T``:

- per learning rate of a small sweep (``--lrs``), one Schedule-Free AdamW run of ``T`` steps
  (constant lr, linear warmup; ``sf_optax.adamw`` / ``sf_torch.AdamWScheduleFree``) per
  ``--sf-b1``, evaluated at ``x`` at regular points and exactly at each horizon;
- per learning rate and horizon ``h``, one AdamW run with an ``sf_schedules.cosine`` schedule
  and one with ``sf_schedules.wsd`` (linear cooldown over the last 20%), both of
  ``total_steps = h`` (``optax.adamw`` / ``torch.optim.AdamW``: b1 0.9, b2 0.999, and the same
  warmup and weight decay as Schedule-Free).

Every run starts from the same weights and sees the same batches in the same order, in both
frameworks. Problems (``bench/anytime_problems.py``): ``digits``, parity's BatchNorm CNN on the
8x8 digits (eval loss and accuracy on the held-out quarter; BatchNorm statistics recomputed at
the evaluated weights for every method), and ``charlm``, a causal Transformer on the characters
of CPython's help topics (eval loss in nats per character on the held-out 10%).

Output: per problem and framework a table (rows SF / cosine / WSD, columns the horizons: the
best eval loss over the sweep and the lr that won), and under ``--out`` ``results.json`` (every
run's eval curve and, for the baselines, the learning rate each step used, read back from the
optimizer), ``table.md`` and ``anytime.png`` (the curves, and beside them the convex-theory
bounds of the same schedules: ``bench/anytime_plot.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench import anytime_plot, anytime_problems, anytime_runs
from bench.anytime_runs import HORIZON_NAMES

FRAMEWORKS = ("jax", "torch")
DEVICES = ("cpu", "cuda")


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{name}: expected at least one number, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.anytime", description=__doc__.splitlines()[0])
    p.add_argument("--problem", default="all", choices=(*anytime_problems.PROBLEMS, "all"))
    p.add_argument("--framework", default="both", choices=(*FRAMEWORKS, "both"))
    p.add_argument(
        "--size",
        default="small",
        choices=anytime_problems.SIZES,
        help="tiny (CI), small (CPU, minutes), full (digits on CPU, charlm on a GPU)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="T, a multiple of 4 (default: the size's)"
    )
    p.add_argument(
        "--lrs",
        default=None,
        help="comma-separated peak learning rates (default: per problem, "
        f"{anytime_problems.DEFAULT_LRS})",
    )
    p.add_argument(
        "--sf-b1",
        default="0.9",
        help="comma-separated b1 of Schedule-Free; each is one more SF run per lr",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="linear warmup steps for every run (default: T/20)"
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help=f"for every run (default: per problem, {anytime_problems.DEFAULT_WEIGHT_DECAY})",
    )
    p.add_argument(
        "--methods",
        default=",".join(anytime_runs.METHODS),
        help="comma-separated subset of sf,cosine,wsd to run",
    )
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reports/anytime")
    args = p.parse_args(argv)
    if args.steps is not None and (args.steps < 4 or args.steps % 4):
        raise ValueError(f"--steps must be a positive multiple of 4, got {args.steps}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.weight_decay is not None and not args.weight_decay >= 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    args.sf_b1 = _floats(args.sf_b1, "--sf-b1")
    args.lrs = None if args.lrs is None else _floats(args.lrs, "--lrs")
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    return args


def _set_platform(device: str) -> None:
    """JAX's platform, decided before jax is first imported."""
    if "jax" in sys.modules:
        return
    if device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        # torch and JAX share the GPU: JAX must not take most of its memory up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def make_trainer(framework: str, problem, device: str):
    """The framework's trainer for ``problem`` (each framework imported only when asked)."""
    if framework == "jax":
        import jax

        from bench import anytime_jax

        if device == "cuda" and jax.default_backend() != "gpu":
            raise RuntimeError(
                f"--device cuda, but jax {jax.__version__} runs on "
                f"{jax.default_backend()}: install jax with CUDA support"
            )
        return anytime_jax.Trainer(problem), anytime_jax.backend()
    from bench import anytime_torch

    return anytime_torch.Trainer(problem, device), anytime_torch.backend(device)


def _progress(items, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return items, print
    bar = tqdm(items, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
    return bar, tqdm.write


def _run_line(name, framework, spec, result) -> str:
    horizon = spec.horizon
    final = result["eval_loss"][-1]
    acc = result.get("eval_acc")
    acc_text = f", acc {acc[-1]:.1%}" if acc else ""
    b1 = f" b1 {spec.b1:g}" if spec.method == "sf" else ""
    return (
        f"{name:6s} {framework:5s} {spec.method:6s}{b1} lr {spec.lr:<7g} "
        f"{horizon:5d} steps: eval loss {final:.4f}{acc_text} ({result['seconds']:.1f} s)"
    )


def run_problem(args, name: str, frameworks: tuple[str, ...], results: dict, save) -> None:
    problem = anytime_problems.load(name, args.size, args.seed)
    if args.steps is not None:
        problem = dataclasses.replace(problem, steps=args.steps)
    steps = problem.steps
    warmup = steps // 20 if args.warmup is None else args.warmup
    lrs = args.lrs or anytime_problems.DEFAULT_LRS[name]
    weight_decay = (
        anytime_problems.DEFAULT_WEIGHT_DECAY[name]
        if args.weight_decay is None
        else args.weight_decay
    )
    specs = anytime_runs.plan(
        steps, problem.evals, lrs, args.sf_b1, warmup, weight_decay, args.methods
    )
    entry = {
        "steps": steps,
        "horizons": list(anytime_runs.horizons(steps)),
        "lrs": list(lrs),
        "sf_b1": list(args.sf_b1),
        "warmup": warmup,
        "weight_decay": weight_decay,
        "batch": problem.batch,
        "model": problem.lm or "parity cnn",
        "eval_examples": int(len(problem.eval_labels)),
        "bounds": anytime_plot.bound_curves(steps, warmup),
        "frameworks": {},
    }
    results["problems"][name] = entry
    for framework in frameworks:
        trainer, backend = make_trainer(framework, problem, args.device)
        runs = []
        start = time.perf_counter()
        bar, write = _progress(specs, f"{name} {framework}")
        for spec in bar:
            result = trainer.run(spec)
            runs.append({"spec": spec.describe(), **result})
            write(_run_line(name, framework, spec, result))
        entry["frameworks"][framework] = {
            "backend": backend,
            "seconds": time.perf_counter() - start,
            "table": anytime_runs.table(runs, steps),
            "runs": runs,
        }
        save()


def markdown(results: dict) -> str:
    """Per problem and framework, the table of best eval loss per method and horizon."""
    lines = []
    for name, entry in results["problems"].items():
        hs = entry["horizons"]
        for framework, fw in entry["frameworks"].items():
            lines += [
                f"### {name}, {framework} ({fw['backend']}): T = {entry['steps']}, "
                f"lrs {', '.join(f'{lr:g}' for lr in entry['lrs'])}, warmup {entry['warmup']}, "
                f"weight decay {entry['weight_decay']:g}, {fw['seconds']:.0f} s",
                "",
                "| method | " + " | ".join(f"{n} = {h}" for n, h in zip(HORIZON_NAMES, hs)) + " |",
                "| --- |" + " ---: |" * len(hs),
            ]
            table = fw["table"]
            for label, row in table.items():
                cells = []
                for h_name in HORIZON_NAMES:
                    best = row[h_name]
                    acc = f", {best['acc']:.1%}" if "acc" in best else ""
                    cells.append(f"{best['loss']:.4f} (lr {best['lr']:g}{acc})")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            sf = [row for label, row in table.items() if label.startswith("SF")]
            schedules = [row for label, row in table.items() if not label.startswith("SF")]
            if sf and schedules:
                cells = []
                for h_name in HORIZON_NAMES:
                    best_sf = min(r[h_name]["loss"] for r in sf)
                    best_schedule = min(r[h_name]["loss"] for r in schedules)
                    gap = best_sf - best_schedule
                    cells.append(f"{gap:+.4f} ({gap / best_schedule:+.1%})")
                lines.append("| best SF - best schedule | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    _set_platform(args.device)
    problems = anytime_problems.PROBLEMS if args.problem == "all" else (args.problem,)
    frameworks = FRAMEWORKS if args.framework == "both" else (args.framework,)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "command": "python -m bench.anytime "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "size": args.size,
        "device": args.device,
        "seed": args.seed,
        "host": platform.node(),
        "problems": {},
    }

    def save():
        # Written after every framework, so an interrupted sweep keeps what it finished.
        (out / "results.json").write_text(json.dumps(results, indent=1))

    for name in problems:
        run_problem(args, name, frameworks, results, save)
    text = markdown(results)
    (out / "table.md").write_text(text)
    anytime_plot.figure(results, out / "anytime.png")
    print(text)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'anytime.png'}")
    return results


if __name__ == "__main__":
    main()
