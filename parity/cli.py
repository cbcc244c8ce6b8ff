"""``python -m parity``: run one twin model through several backends and report how they agree.

    python -m parity run                                   # MLP on digits, AdamW, float32
    python -m parity run --model lm --dtype float64 --steps 500
    python -m parity run --backends sf_optax,sf_torch --baseline sf_torch --warmup-steps 20
    python -m parity run --backends sf_torch,deepspeed_z2,deepspeed_z3 --ranks 2
    python -m parity run --device cuda --dtype bfloat16    # bf16 mixed precision on a GPU
    python -m parity handoff --model mlp --steps 300 --switch-at 100,200
    python -m parity backends                              # what this machine can run
    python -m parity export-digits                         # digits for machines without sklearn

``run`` prints a table (final losses, largest relative differences to the baseline, the
first step over the tolerance), writes ``report.json`` and ``report.png`` into ``--out`` and
exits with 1 when a tolerance of DESIGN.md section 3 is exceeded (``parity.tolerances``), 2
when a backend failed to run (or ``--device cuda`` finds no GPU). Its last line says where
the report is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from parity import data, devices, launch, report, runners, tolerances
from parity.compare import compare
from parity.config import DEVICES, DTYPES, OPTIMIZERS, RunConfig
from parity.models.canonical import MODELS
from parity.training.record import Record

EXIT_OK, EXIT_TOLERANCE, EXIT_ERROR = 0, 1, 2


def _add_run_options(p: argparse.ArgumentParser, default_dtype: str, dtypes=DTYPES) -> None:
    d = RunConfig()
    p.add_argument(
        "--model",
        choices=MODELS,
        default=d.model,
        help="mlp: digits MLP; cnn: digits CNN with BatchNorm; lm: tiny causal LM",
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument(
        "--dtype",
        choices=dtypes,
        default=default_dtype,
        help="bfloat16: mixed precision (bf16 params and compute, float32 "
        "optimizer state); its rows are measured against a loose sanity bound",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="init, data split and batches")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="evaluate at x every this many steps (and at the last)",
    )
    p.add_argument(
        "--recal-batches",
        type=int,
        default=d.recal_batches,
        help="CNN: training batches that recompute BatchNorm statistics at x",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: adamw/radam 0.005, sgd 0.2)",
    )
    p.add_argument("--b1", type=float, default=d.b1, help="momentum (betas[0]) in (0, 1]")
    p.add_argument("--b2", type=float, default=d.b2, help="second-moment decay (betas[1])")
    p.add_argument("--eps", type=float, default=d.eps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--r", type=float, default=d.r, help="polynomial weighting power")
    p.add_argument("--weight-lr-power", type=float, default=d.weight_lr_power)
    p.add_argument(
        "--sgd-phase",
        action="store_true",
        help="RAdam: take SGD steps while rectification is off (silent_sgd_phase=False)",
    )
    p.add_argument("--jobs", type=int, default=2, help="backends run at the same time")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--keep-records",
        action="store_true",
        help="keep each backend's per-step record (.npz, all params) in OUT/records",
    )


def _config(args, **extra) -> RunConfig:
    return RunConfig(
        model=args.model,
        optimizer=args.optimizer,
        steps=args.steps,
        dtype=args.dtype,
        seed=args.seed,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        recal_batches=args.recal_batches,
        lr=args.lr,
        b1=args.b1,
        b2=args.b2,
        eps=args.eps,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        r=args.r,
        weight_lr_power=args.weight_lr_power,
        silent_sgd_phase=not args.sgd_phase,
        **extra,
    )


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m parity", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="one model, several backends, one report")
    _add_run_options(run, default_dtype="float32")
    run.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where the torch runners compute and the JAX runners' platform "
        "(sf_optax_mesh stays on 8 CPU devices); cuda: DeepSpeed on NCCL, "
        "one rank per GPU",
    )
    run.add_argument(
        "--ranks", type=int, default=2, help="DeepSpeed ranks (cuda: at most the GPUs there are)"
    )
    run.add_argument(
        "--backends",
        default=None,
        help="comma-separated; default: every backend this machine can run "
        "(see `python -m parity backends`; DeepSpeed: deepspeed_z0 ... _z3, "
        "one row per ZeRO stage)",
    )
    run.add_argument("--baseline", default="sf_torch", help="the row every other is compared to")
    run.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report folder (default reports/<model>_<optimizer>_<dtype>)",
    )
    run.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="BACKEND:KEY=VALUE",
        help="change one config field for one backend (to check that the "
        "checks catch a mismatch), e.g. sf_optax:lr=0.0051",
    )

    handoff = sub.add_parser("handoff", help="move a run JAX -> torch -> JAX mid-run")
    _add_run_options(handoff, default_dtype="float64", dtypes=("float64", "float32"))
    handoff.add_argument(
        "--switch-at",
        default="100,200",
        help="comma-separated steps at which the run changes framework",
    )
    handoff.add_argument(
        "--start",
        choices=("jax", "torch"),
        default="jax",
        help="the framework of the first segment",
    )
    handoff.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report folder (default reports/handoff_<model>_<optimizer>_<dtype>)",
    )

    sub.add_parser("backends", help="list the backends and whether this machine can run them")
    export = sub.add_parser(
        "export-digits",
        help="write scikit-learn's digits to the file that machines without scikit-learn read",
    )
    export.add_argument("--out", type=Path, default=data.DIGITS_FILE)
    args = parser.parse_args(argv)
    if args.command == "run" and args.ranks < 1:
        parser.error("--ranks must be >= 1")
    if args.command not in ("backends", "export-digits") and args.out is None:
        prefix = "handoff_" if args.command == "handoff" else ""
        args.out = Path("reports") / f"{prefix}{args.model}_{args.optimizer}_{args.dtype}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "backends":
        return _backends()
    try:
        if args.command == "export-digits":
            data.save_digits(args.out)
            print(f"wrote {args.out}")
            return EXIT_OK
        if args.command == "run":
            return _run(args)
        return _handoff(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR


def _backends() -> int:
    for name, runner in runners.discover().items():
        why = runners.unavailable(runner)
        print(f"{name:15s} {runner.FRAMEWORK:6s} {runner.ROLE:12s} {why or 'available'}")
    return EXIT_OK


def _select(args, registry):
    if args.backends:
        names = [n.strip() for n in args.backends.split(",") if n.strip()]
        unknown = [n for n in names if n not in registry]
        if unknown:
            raise ValueError(f"unknown backends {unknown}; known: {sorted(registry)}")
    else:
        names = [n for n, r in registry.items() if runners.unavailable(r) is None]
        order = {role: i for i, role in enumerate(runners.ROLES)}
        names.sort(key=lambda n: (order[registry[n].ROLE], n != "sf_torch", n))
    return names


def _overrides(items, names):
    out: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        try:
            backend, assignment = item.split(":", 1)
            key, value = assignment.split("=", 1)
        except ValueError:
            raise ValueError(f"--override wants BACKEND:KEY=VALUE, got {item!r}") from None
        if backend not in names:
            raise ValueError(f"--override names {backend!r}, which is not among {names}")
        out.setdefault(backend, []).append((key.replace("-", "_"), value))
    return out


def _with_cuda(config: RunConfig, selected) -> RunConfig:
    """Checks that the frameworks of ``selected`` see a GPU (ValueError if not) and gives
    DeepSpeed one rank per GPU at most."""

    def on_cuda(runner):  # JAX runners run where JAX_PLATFORMS says (the mesh: always cpu)
        if runner.FRAMEWORK == "jax":
            return runners.environment(runner, config).get("JAX_PLATFORMS") == "cuda"
        return True

    frameworks = {r.FRAMEWORK for r in selected if on_cuda(r)}
    counts = devices.require_cuda(frameworks)
    if "torch" in counts:
        ranks = min(config.extra.get("ranks", 1), counts["torch"])
        config = config.replace(extra={**config.extra, "ranks": ranks})
    return config


def _run(args) -> int:
    started = time.perf_counter()
    config = _config(args, device=args.device, extra={"ranks": args.ranks})
    registry = runners.discover()
    names = _select(args, registry)
    baseline = args.baseline
    if baseline not in names:
        raise ValueError(f"the baseline {baseline!r} is not among the backends {names}")
    overrides = _overrides(args.override, names)
    if config.device == "cuda":
        available = [registry[n] for n in names if runners.unavailable(registry[n]) is None]
        config = _with_cuda(config, available)

    rows_by_name: dict[str, report.Row] = {}
    jobs = []
    for name in names:
        runner = registry[name]
        why = runners.unavailable(runner) or runner.unsupported(runners.configure(runner, config))
        if why:
            status = report.ERROR if name == baseline else report.SKIPPED
            rows_by_name[name] = report.Row(name, runner.ROLE, status, note=f"skipped: {why}")
            continue
        backend_config = runners.configure(runner, config)
        for key, value in overrides.get(name, []):
            backend_config = backend_config.with_override(key, value)
        jobs.append((runner, backend_config))
    if registry[baseline].expected_difference(config):
        raise ValueError(
            f"the baseline {baseline} is expected to differ here "
            f"({registry[baseline].expected_difference(config)}): pick another"
        )

    workdir = args.out / "records"
    outcomes = launch.run_all(jobs, workdir, parallel=args.jobs, progress_bar=not args.no_progress)
    base_outcome = outcomes.get(baseline)
    base_record = base_outcome.record if base_outcome else None
    nominal = tolerances.nominal(config.dtype)
    for runner, backend_config in jobs:
        name = runner.NAME
        outcome = outcomes[name]
        if outcome.record is None:
            rows_by_name[name] = report.Row(
                name, runner.ROLE, report.ERROR, note=outcome.error, seconds=outcome.seconds
            )
            continue
        expected = runner.expected_difference(backend_config)
        notes = [n for n in [runners.note(runner, backend_config)] if n]
        notes += [f"expected to differ: {expected}"] if expected else []
        changed = {k: v for k, v in overrides.get(name, [])}
        if changed:
            notes.append(f"overridden for this backend: {changed}")
        comparison = None
        if name != baseline and base_record is not None:
            comparison = compare(outcome.record, base_record)
        limits = tolerances.limits(runner.ROLE, config.dtype, expected)
        row = report.make_row(
            name,
            runner.ROLE,
            outcome.record,
            comparison,
            limits,
            nominal,
            outcome.seconds,
            "; ".join(notes),
        )
        if name != baseline and base_record is None:
            row.status, row.note = report.ERROR, f"no baseline to compare with ({baseline} failed)"
        rows_by_name[name] = row
    rows = [rows_by_name[n] for n in names]

    if any(r.status == report.ERROR for r in rows):
        code = EXIT_ERROR
    elif any(r.status == report.FAIL for r in rows):
        code = EXIT_TOLERANCE
    else:
        code = EXIT_OK
    title = (
        f"{config.model} / {config.optimizer} / {config.dtype} on {config.device}, "
        f"{config.steps} steps, seed {config.seed}, baseline {baseline}"
    )
    _write(args.out, rows, config, baseline, code, title, started, args.keep_records)
    return code


def _write(out: Path, rows, config, baseline, code, title, started, keep_records, extra=None):
    out.mkdir(parents=True, exist_ok=True)
    text = report.table(rows, baseline, config.dtype)
    print(title)
    print(text)
    for r in rows:
        if r.status == report.ERROR and r.note:
            print(f"\n{r.name} failed: {r.note}", file=sys.stderr)
    payload = report.to_json(rows, config, baseline, code, extra)
    payload["wall_seconds"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(payload, indent=1))
    plotted = report.plot(rows, out / "report.png", title, config.dtype)
    if not keep_records:
        shutil.rmtree(out / "records", ignore_errors=True)
    verdict = {
        EXIT_OK: "all checks passed",
        EXIT_TOLERANCE: "a tolerance was exceeded",
        EXIT_ERROR: "a backend failed",
    }[code]
    png = out / "report.png" if plotted else "no PNG (matplotlib is not installed)"
    sys.stderr.flush()
    print(
        f"\n{verdict} ({time.perf_counter() - started:.1f} s)\nreport: {out / 'report.json'}, "
        f"{png}",
        flush=True,
    )


def _handoff(args) -> int:
    started = time.perf_counter()
    config = _config(args)
    registry = runners.discover()
    by_framework = {"jax": registry["sf_optax"], "torch": registry["sf_torch"]}
    switches = sorted({int(s) for s in args.switch_at.split(",") if s.strip()})
    if not switches or switches[0] <= 0 or switches[-1] >= config.steps:
        raise ValueError(f"--switch-at needs steps in (0, {config.steps}), got {args.switch_at!r}")
    for runner in by_framework.values():
        why = runners.unavailable(runner)
        if why:
            raise ValueError(f"the handoff needs {runner.NAME}, which {why}")

    workdir = (args.out / "records").resolve()
    # The single-framework runs, one per framework, from start to end.
    references = launch.run_all(
        [(r, config) for r in by_framework.values()],
        workdir,
        parallel=args.jobs,
        progress_bar=not args.no_progress,
    )
    # The moving run: segments [0, s1], [s1, s2], ... alternating frameworks.
    bounds = [0, *switches, config.steps]
    order = ["jax", "torch"] if args.start == "jax" else ["torch", "jax"]
    segments, path = [], []
    for i, (first, last) in enumerate(zip(bounds, bounds[1:])):
        framework = order[i % 2]
        path.append(framework)
        seg_config = config.replace(
            steps=last,
            first_step=first,
            resume_from=str(workdir / f"state_{first}.npz") if first else None,
            save_to=str(workdir / f"state_{last}.npz") if last < config.steps else None,
        )
        outcome = launch.run_child(
            by_framework[framework], seg_config, workdir, tag=f"segment{i}_{framework}"
        )
        if outcome.record is None:
            print(
                f"segment {i} ({framework}, steps {first}-{last}) failed: {outcome.error}",
                file=sys.stderr,
            )
            return EXIT_ERROR
        segments.append(outcome)

    chain = Record.concatenate([s.record for s in segments])
    route = " -> ".join(path)
    base_name = by_framework[args.start].NAME
    base = references[base_name]
    if base.record is None:
        print(f"{base_name} failed: {base.error}", file=sys.stderr)
        return EXIT_ERROR
    nominal = tolerances.nominal(config.dtype)
    rows = [report.make_row(base_name, "primary", base.record, None, {}, nominal, base.seconds)]
    for name, outcome in references.items():
        if name == base_name:
            continue
        if outcome.record is None:
            rows.append(report.Row(name, "primary", report.ERROR, note=outcome.error))
            continue
        rows.append(
            report.make_row(
                name,
                "primary",
                outcome.record,
                compare(outcome.record, base.record),
                tolerances.limits("primary", config.dtype),
                nominal,
                outcome.seconds,
            )
        )
    chain_name = f"handoff {route}"
    rows.append(
        report.make_row(
            chain_name,
            "primary",
            chain,
            compare(chain, base.record),
            tolerances.limits("primary", config.dtype),
            nominal,
            sum(s.seconds for s in segments),
            f"framework switched at steps {switches}",
        )
    )
    failed = any(r.status in (report.FAIL, report.ERROR) for r in rows)
    code = EXIT_TOLERANCE if failed else EXIT_OK
    title = (
        f"handoff {route} at steps {switches}: {config.model} / {config.optimizer} / "
        f"{config.dtype}, {config.steps} steps, baseline {base_name}"
    )
    _write(
        args.out,
        rows,
        config,
        base_name,
        code,
        title,
        started,
        args.keep_records,
        extra={"switch_at": switches, "route": path},
    )
    return code
