"""``python -m bench.local``: local steps against data-parallel, K workers on the CPU.

For each optimizer (AdamW + warmup-cosine, Schedule-Free AdamW) and each row (data-parallel,
constant ``H``, QSR, the 1/lr rule and, for Schedule-Free, ScheduleFreeQSR and
AveragingWindow; :func:`bench.local.rows.rows`), one run per seed from the same initial weights
and batches; the final eval loss and accuracy (Schedule-Free at ``x``), the number of syncs
and the volume communicated (model-size units, :mod:`bench.local.rows`), mean and spread over
the seeds. A Schedule-Free row *reaches* data-parallel when its mean final eval loss is at most
Schedule-Free data-parallel's mean plus one standard deviation over the seeds; the target is to
reach it with at most 25% of data-parallel's volume.

Writes ``results.json``, ``table.txt`` (the printed table) and ``local.png`` (eval loss and
accuracy against volume) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from bench.local import rows as R

TARGET_FRACTION = 0.25
QUICK = dict(steps=40, warmup=4, batch=8, seeds=2)


def _positive_int(name: str, low: int = 1, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            top = "inf)" if high is None else f"{high}]"
            raise argparse.ArgumentTypeError(f"{name} must be in [{low}, {top}, got {value}")
        return value

    return parse


def _positive_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (np.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{name} must be in (0, inf), got {value}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.local", description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=R.TASKS, help="default: charlm (digits with --quick)")
    p.add_argument("--seeds", type=_positive_int("--seeds", 1, 100), help="number of seeds")
    p.add_argument("--steps", type=_positive_int("--steps", 8), help="T, optimizer steps")
    p.add_argument("--workers", type=_positive_int("--workers", 2, 64), help="K (default 4)")
    p.add_argument("--batch", type=_positive_int("--batch", 1), help="per-worker batch")
    p.add_argument("--warmup", type=_positive_int("--warmup", 0), help="warmup steps")
    p.add_argument("--lr", type=_positive_float("--lr"), help="AdamW's peak lr")
    p.add_argument("--sf-lr", type=_positive_float("--sf-lr"), help="Schedule-Free's lr")
    p.add_argument(
        "--backend",
        choices=("vmap", "mesh"),
        default="vmap",
        help="workers as a vmap on one device (default) or one per device of a mesh",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: no files)")
    p.add_argument("--quick", action="store_true", help="digits, T=40, 2 seeds (for tests)")
    return p


def settings_from(args: argparse.Namespace) -> tuple[R.Settings, int]:
    task = args.task or ("digits" if args.quick else "charlm")
    s = R.DEFAULTS[task]
    seeds = 3
    if args.quick:
        s = replace(s, **{k: v for k, v in QUICK.items() if k != "seeds"})
        seeds = QUICK["seeds"]
    given = {
        "steps": args.steps,
        "workers": args.workers,
        "batch": args.batch,
        "warmup": args.warmup,
        "lr": args.lr,
        "sf_lr": args.sf_lr,
    }
    s = replace(s, **{k: v for k, v in given.items() if v is not None})
    if s.warmup >= s.steps:
        raise SystemExit(f"--warmup must be in [0, {s.steps - 1}] (below --steps), got {s.warmup}")
    if s.task == "digits" and s.workers * s.batch > 1347:
        raise SystemExit(
            f"--workers x --batch must be at most 1347 (digits' training images), got "
            f"{s.workers * s.batch}"
        )
    return s, args.seeds if args.seeds is not None else seeds


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
    }


def run_all(s: R.Settings, seeds: int, log=print, backend: str = "vmap") -> dict:
    """Every row for every seed; the JSON-ready results."""
    from bench.local import train  # jax: imported once XLA_FLAGS is set

    table = R.rows(s)
    per_seed = {i: [] for i in range(len(table))}
    start = time.perf_counter()
    for seed in range(seeds):
        batches = R.worker_batches(s, seed)
        eval_set = R.eval_set(s, seed)
        params0 = R.init_params(s, seed)
        for i, row in enumerate(table):
            steps = R.row_sync_steps(s, row)
            mask = np.zeros(s.steps, bool)
            mask[np.asarray(steps) - 1] = True
            t0 = time.perf_counter()
            out = train.run(
                s, row.optimizer, row.data_parallel, mask, params0, batches, eval_set, backend
            )
            out.pop("weights")
            out["seconds"] = time.perf_counter() - t0
            per_seed[i].append(out)
            log(
                f"seed {seed} {row.optimizer:5s} {row.name:24s} eval loss "
                f"{out['eval_loss']:.4f} acc {out['eval_accuracy']:.4f} "
                f"({out['seconds']:.1f} s)"
            )
    results = []
    n_params = sum(v.size for v in R.init_params(s, 0).values())
    for i, row in enumerate(table):
        steps = R.row_sync_steps(s, row)
        results.append(
            {
                "optimizer": row.optimizer,
                "name": row.name,
                "rule": None if row.rule is None else repr(row.rule),
                "note": row.note,
                "syncs": len(steps),
                "sync_steps": list(steps),
                "units_per_sync": 1 if row.data_parallel else R.UNITS_PER_SYNC[row.optimizer],
                "volume": R.volume(s, row),
                "eval_loss": _stats([r["eval_loss"] for r in per_seed[i]]),
                "eval_accuracy": _stats([r["eval_accuracy"] for r in per_seed[i]]),
                "train_loss_tail": _stats([r["train_loss_tail"] for r in per_seed[i]]),
                "per_seed": per_seed[i],
            }
        )
    _compare(results)
    import jax

    return {
        "settings": asdict(s),
        "seeds": list(range(seeds)),
        "backend": backend,
        "model_parameters": int(n_params),
        "target_fraction": TARGET_FRACTION,
        "rows": results,
        "seconds": time.perf_counter() - start,
        "environment": {
            "jax": jax.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "devices": [str(d) for d in jax.devices()[: s.workers if backend == "mesh" else 1]],
        },
    }


def _compare(results: list[dict]) -> None:
    """Adds to every row its volume as a fraction of its optimizer's data-parallel volume and
    whether its mean eval loss is within one seed standard deviation of that row's mean, and
    its eval loss minus data-parallel's on the same seed (mean and std over the seeds)."""
    dp = {r["optimizer"]: r for r in results if r["rule"] is None}
    for r in results:
        base = dp[r["optimizer"]]
        threshold = base["eval_loss"]["mean"] + base["eval_loss"]["std"]
        r["volume_fraction"] = r["volume"] / base["volume"]
        diffs = [a["eval_loss"] - b["eval_loss"] for a, b in zip(r["per_seed"], base["per_seed"])]
        r["loss_minus_dp"] = _stats(diffs)  # paired: the same seed's data-parallel run
        r["reaches_dp"] = bool(r["eval_loss"]["mean"] <= threshold)
        r["meets_target"] = bool(r["reaches_dp"] and r["volume_fraction"] <= TARGET_FRACTION)


def table_text(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"bench.local: task {s['task']}, K = {s['workers']} workers x batch {s['batch']}, "
        f"T = {s['steps']}, warmup {s['warmup']}, AdamW lr {s['lr']:g} (cosine), "
        f"Schedule-Free lr {s['sf_lr']:g} (b1 {s['b1']:g}), weight decay "
        f"{s['weight_decay']:g}; seeds {results['seeds']}; {results['model_parameters']} "
        "params",
        "volume: model-size all-reduces (data-parallel 1 per step; a local AdamW sync 1, a "
        "local Schedule-Free sync 2: y and z)",
        "loss / acc: final eval, mean +- std over seeds [min, max]; reaches: mean loss <= "
        "data-parallel's mean + std; target: reaches with volume <= 25% of data-parallel; "
        "loss - DP: minus the same seed's data-parallel run, mean +- std",
        "",
        f"{'opt':5s} {'row':24s} {'syncs':>6s} {'volume':>7s} {'%DP':>6s}  "
        f"{'eval loss':>26s}  {'eval acc':>24s}  {'loss - DP (paired)':>18s}  {'reaches':>7s} "
        f"{'target':>6s}",
    ]
    for r in results["rows"]:
        lo, ac, pd = r["eval_loss"], r["eval_accuracy"], r["loss_minus_dp"]
        lines.append(
            f"{r['optimizer']:5s} {r['name']:24s} {r['syncs']:6d} {r['volume']:7d} "
            f"{100 * r['volume_fraction']:5.1f}%  "
            f"{lo['mean']:.4f} +- {lo['std']:.4f} [{lo['min']:.3f}, {lo['max']:.3f}]  "
            f"{ac['mean']:.4f} +- {ac['std']:.4f} [{ac['min']:.3f},{ac['max']:.3f}]  "
            f"{pd['mean']:+.4f} +- {pd['std']:.4f}  "
            f"{'yes' if r['reaches_dp'] else 'no':>7s} {'yes' if r['meets_target'] else 'no':>6s}"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> str | None:
    """Eval loss and accuracy against volume (log scale), one marker per row, bars = min..max
    over seeds. Returns None, or why no plot was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"adamw": "tab:blue", "sf": "tab:red"}
    markers = "osD^v<>Xph*"
    for ax, key in zip(axes, ("eval_loss", "eval_accuracy")):
        for opt in ("adamw", "sf"):
            own = [r for r in results["rows"] if r["optimizer"] == opt]
            for j, r in enumerate(own):
                st = r[key]
                ax.errorbar(
                    r["volume"],
                    st["mean"],
                    yerr=[[st["mean"] - st["min"]], [st["max"] - st["mean"]]],
                    fmt=markers[j % len(markers)],
                    color=colors[opt],
                    capsize=3,
                    label=f"{'AdamW' if opt == 'adamw' else 'SF'} {r['name']}",
                )
        ax.set_xscale("log")
        ax.set_xlabel("volume communicated (model-size all-reduces)")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    s = results["settings"]
    fig.suptitle(
        f"bench.local: {s['task']}, K = {s['workers']}, T = {s['steps']}, "
        f"{len(results['seeds'])} seeds (bars: min..max)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    s, seeds = settings_from(args)
    if "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={s.workers}".strip()
        )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    results = run_all(
        s, seeds, log=lambda m: print(m, file=sys.stderr, flush=True), backend=args.backend
    )
    text = table_text(results)
    print(text, flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        (args.out / "table.txt").write_text(text + "\n")
        why = plot(results, args.out / "local.png")
        print(why or f"wrote {args.out}/results.json, table.txt, local.png", flush=True)
    return results
