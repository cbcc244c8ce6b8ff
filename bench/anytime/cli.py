"""The anytime study's command line: run the sweeps, write the JSON, the tables and the figure.

    python -m bench.anytime --problem all --framework both --size small
    python -m bench.anytime --problem charlm --size full --device cuda --out reports/anytime_gpu
    python -m bench.anytime --problem convex --size full --trajectories

Output under ``--out``: ``results.json`` (per problem and framework every run's eval curve and,
for the baselines, the learning rate each step used, read back from the optimizer; the table;
for convex the bounds), ``table.md`` and ``anytime.png``; with ``--trajectories`` also
``trajectories.npz``, every evaluated weight and the weight and gradient norms at every step of
the problems scored from their weights (convex), keyed ``problem/framework/run/key``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from bench.anytime import bounds, plot, problems, runs
from bench.anytime.runs import HORIZON_NAMES

FRAMEWORKS = ("jax", "torch")
DEVICES = ("cpu", "cuda")


def _list(text: str | None, name: str, kind=float) -> tuple | None:
    try:
        return None if text is None else tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated numbers, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.anytime", description=__doc__.split("\n")[0])
    own = "(default: the problem's own, bench/anytime/problems.py)"
    p.add_argument("--problem", default="all", help=f"all, or some of {problems.PROBLEMS}")
    p.add_argument("--framework", default="both", choices=(*FRAMEWORKS, "both"))
    p.add_argument(
        "--size",
        default="small",
        choices=problems.SIZES,
        help="tiny (CI), small (CPU, minutes), full (digits, convex on CPU, charlm on a GPU)",
    )
    p.add_argument("--steps", type=int, help=f"T, a multiple of 4 {own}")
    p.add_argument("--lrs", help=f"comma-separated peak learning rates {own}")
    p.add_argument("--sf-b1", help=f"comma-separated b1, one SF run each per lr {own}")
    p.add_argument("--sf-warmup", help=f"comma-separated warmups of more SF runs {own}")
    p.add_argument("--sf-inner", help=f"comma-separated inner_momentum of more SF runs {own}")
    p.add_argument("--plus-lrs", help=f"comma-separated base lrs of SF+ (AdamC, Polyak) {own}")
    p.add_argument("--plus-weight-decay", type=float, help=f"SF+'s AdamC decay {own}")
    p.add_argument("--warmup", type=int, help=f"warmup steps of every run {own} or T/20")
    p.add_argument("--weight-decay", type=float, help=f"of every run {own}")
    p.add_argument("--methods", help=f"comma-separated, of {','.join(runs.METHODS)} {own}")
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reports/anytime")
    p.add_argument("--trajectories", action="store_true", help="also write trajectories.npz")
    args = p.parse_args(argv)
    args.problem = problems.PROBLEMS if args.problem == "all" else tuple(args.problem.split(","))
    if not set(args.problem) <= set(problems.PROBLEMS):
        raise ValueError(f"--problem must be all or some of {problems.PROBLEMS}: {args.problem}")
    args.sweep = {
        "lrs": _list(args.lrs, "--lrs"),
        "sf_b1": _list(args.sf_b1, "--sf-b1"),
        "sf_warmups": _list(args.sf_warmup, "--sf-warmup", int),
        "sf_inner": _list(args.sf_inner, "--sf-inner"),
        "plus_lrs": _list(args.plus_lrs, "--plus-lrs"),
        "plus_weight_decay": args.plus_weight_decay,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "methods": None if args.methods is None else tuple(args.methods.split(",")),
    }
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

        from bench.anytime import jax_trainer

        if device == "cuda" and jax.default_backend() != "gpu":
            raise RuntimeError(
                f"--device cuda, but jax {jax.__version__} runs on "
                f"{jax.default_backend()}: install jax with CUDA support"
            )
        return jax_trainer.Trainer(problem), jax_trainer.backend()
    from bench.anytime import torch_trainer

    return torch_trainer.Trainer(problem, device), torch_trainer.backend(device)


def _progress(items, desc: str):
    """A progress bar on a terminal; else (a log file) nothing but the lines written."""
    write = functools.partial(print, flush=True)
    if not sys.stdout.isatty():
        return items, write
    try:
        from tqdm import tqdm
    except ImportError:
        return items, write
    return tqdm(items, desc=desc, leave=False, dynamic_ncols=True), tqdm.write


def _num(x: float, sign: str = "") -> str:
    return f"{x:{sign}.4f}" if abs(x) >= 0.01 else f"{x:{sign}.3e}"


def _run_line(problem: str, framework: str, spec, result) -> str:
    acc = result["eval_acc"]
    acc_text = f", acc {acc[-1]:.1%}" if acc else ""
    return (
        f"{problem:6s} {framework:5s} {spec.name:32s} {spec.horizon:5d} steps: "
        f"loss {_num(result['eval_loss'][-1])}{acc_text} ({result['seconds']:.1f} s)"
    )


def run_problem(args, name: str, frameworks, results: dict, save) -> dict:
    """Every run of problem ``name`` in each framework, into ``results``; the trajectories of a
    scored problem, ``{framework: [per run]}``."""
    problem = problems.load(name, args.size, args.seed, args.steps)
    sweep = {**problem.sweep, **{k: v for k, v in args.sweep.items() if v is not None}}
    if sweep["warmup"] is None:
        sweep["warmup"] = problem.steps // 20
    specs = runs.plan(problem.steps, problem.evals, **sweep)
    entry = {
        "steps": problem.steps,
        "horizons": list(runs.horizons(problem.steps)),
        "metric": problem.metric,
        "sweep": sweep,
        "batch": problem.batch,
        "info": problem.info,
        "frameworks": {},
    }
    if problem.score is None:  # else the bounds need the runs' D and G: bounds.analyse
        entry["bounds"] = bounds.optimal_curves(sweep["methods"], problem.steps, sweep["warmup"])
    results["problems"][name] = entry
    trajectories = {}
    for framework in frameworks:
        trainer, backend = make_trainer(framework, problem, args.device)
        done = []
        start = time.perf_counter()
        items, write = _progress(specs, f"{name} {framework}")
        for spec in items:
            result = trainer.run(spec)
            trajectory = result.pop("trajectory")
            if trajectory is not None:
                trajectories.setdefault(framework, []).append(trajectory)
            done.append({"spec": spec.describe(), **result})
            write(_run_line(name, framework, spec, result))
        entry["frameworks"][framework] = {
            "backend": backend,
            "seconds": time.perf_counter() - start,
            "table": runs.table(done, problem.steps),
            "runs": done,
        }
        save()
    if trajectories:
        bounds.analyse(entry, trajectories)
        save()
    return trajectories


def markdown(results: dict) -> str:
    """Per problem and framework, the table of the best loss per row and horizon."""
    lines = []
    for name, entry in results["problems"].items():
        hs, s = entry["horizons"], entry["sweep"]
        for framework, fw in entry["frameworks"].items():
            plus = s.get("plus_lrs")
            plus_text = (
                f"SF+ lrs {', '.join(f'{lr:g}' for lr in plus)} "
                f"(AdamC decay {s['plus_weight_decay']:g}), "
                if plus
                else ""
            )
            lines += [
                f"### {name}, {framework} ({fw['backend']}): {s['optimizer']}, "
                f"T = {entry['steps']}, lrs {', '.join(f'{lr:g}' for lr in s['lrs'])}, "
                f"{plus_text}warmup {s['warmup']}, weight decay {s['weight_decay']:g}, "
                f"{fw['seconds']:.0f} s; {entry['metric']}, the best over the lrs",
                "",
                "| method | " + " | ".join(f"{n} = {h}" for n, h in zip(HORIZON_NAMES, hs)) + " |",
                "| --- |" + " ---: |" * len(hs),
            ]
            table = fw["table"]
            for label, row in table.items():
                cells = []
                for best in (row[n] for n in HORIZON_NAMES):
                    extra = f", {best['acc']:.1%}" if "acc" in best else ""
                    extra += f", bound {best['bound']:.3g}" if "bound" in best else ""
                    cells.append(f"{_num(best['loss'])} (lr {best['lr']:g}{extra})")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            sf = [row for label, row in table.items() if label.startswith("SF")]
            schedules = [row for label, row in table.items() if not label.startswith("SF")]
            if sf and schedules:
                cells = []
                for n in HORIZON_NAMES:
                    best_schedule = min(r[n]["loss"] for r in schedules)
                    gap = min(r[n]["loss"] for r in sf) - best_schedule
                    cells.append(f"{_num(gap, '+')} ({gap / best_schedule:+.1%})")
                lines.append("| best SF - best schedule | " + " | ".join(cells) + " |")
            lines.append("")
        if "convex" in entry:
            lines += [*bounds.report(entry), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    _set_platform(args.device)
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

    arrays = {}
    for name in args.problem:
        for framework, trajectories in run_problem(args, name, frameworks, results, save).items():
            for i, trajectory in enumerate(trajectories):
                arrays |= {f"{name}/{framework}/{i}/{k}": v for k, v in trajectory.items()}
    text = markdown(results)
    (out / "table.md").write_text(text)
    plot.figure(results, out / "anytime.png")
    written = ["results.json", "table.md", "anytime.png"]
    if args.trajectories and arrays:
        np.savez_compressed(out / "trajectories.npz", **arrays)
        written.append("trajectories.npz")
    print(text)
    print(f"wrote {', '.join(str(out / w) for w in written)}")
    return results
