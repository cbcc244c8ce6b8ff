"""``python -m parity``: run one twin model through several backends and report how they agree.

    python -m parity run                                   # MLP on digits, AdamW, float32
    python -m parity run --model lm --dtype float64 --steps 500
    python -m parity run --backends sf_optax,sf_torch --baseline sf_torch --warmup-steps 20
    python -m parity run --backends sf_optax               # one backend, its own baseline
    python -m parity run --backends sf_torch,deepspeed_z2,deepspeed_z3 --ranks 2
    python -m parity run --device cuda --dtype bfloat16    # bf16 mixed precision on a GPU
    python -m parity run --backends local_torch,local_optax --workers 4 \
        --sync qsr:h_base=2,alpha=0.01,h_warm=1 --warmup-steps 20   # local steps, K workers
    python -m parity handoff --model mlp --steps 300 --switch-at 100,200
    python -m parity check my_package.pairs:resnet         # the user's own torch/Flax pair
    python -m parity check parity.own.hf:vit --dtype float32 --steps 100
    python -m parity backends                              # what this machine can run
    python -m parity export-digits                         # digits for machines without sklearn

``run`` prints a table (final losses, largest relative differences to the baseline, the
first step over the tolerance), writes ``report.json`` and ``report.png`` into ``--out`` and
exits with 1 when a tolerance of DESIGN.md section 3 is exceeded (``parity.tolerances``), 2
when a backend failed to run (or ``--device cuda`` finds no GPU). Its last line says where
the report is. An argument out of range (``--lr -1``, ``--b2 1``) is exit code 2 and one
``error:`` line naming the flag, before any backend starts. In a terminal a progress bar
shows; where the output goes to a file or a pipe, one line per finished backend (on stderr).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

from parity import data, devices, launch, report, runners, tolerances
from parity.compare import compare
from parity.config import (
    DEFAULT_LR,
    DEVICES,
    DTYPES,
    FIELD_CHECKS,
    OPTIMIZERS,
    SCHEDULE_FREE_OPTIMIZERS,
    RunConfig,
)
from parity.models.canonical import MODELS
from parity.training import local_plan
from parity.training.record import Record
from sf_schedules import validation

EXIT_OK, EXIT_TOLERANCE, EXIT_ERROR = 0, 1, 2
# The handoff checks that a moved run follows the unmoved one to float32/float64 tolerances;
# in bfloat16 two unmoved runs already part after a few steps (parity.tolerances).
HANDOFF_DTYPES = ("float64", "float32")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where there is none to show (a flag, or None,
    whose help says what happens instead)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _add_run_options(p: argparse.ArgumentParser, default_dtype: str, dtypes=DTYPES) -> None:
    d = RunConfig()
    p.add_argument(
        "--model",
        choices=MODELS,
        default=d.model,
        help="mlp: digits MLP; cnn: digits CNN with BatchNorm; lm: tiny causal LM",
    )
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=d.optimizer,
        help="the Schedule-Free optimizer (adamc_plus: Schedule-Free AdamC with a Polyak step "
        "size from the loss, upstream main's ScheduleFree+; sf_optax and sf_torch only)",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="training steps, >= 1")
    dtype_help = "float64: parity to 1e-10; float32: eval loss to 1e-4"
    if "bfloat16" in dtypes:
        dtype_help += (
            "; bfloat16: mixed precision (bf16 params and compute, float32 optimizer state), "
            "its rows measured against a loose sanity bound"
        )
    p.add_argument("--dtype", choices=dtypes, default=default_dtype, help=dtype_help)
    p.add_argument("--seed", type=int, default=d.seed, help="init, data split and batches; >= 0")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="sequences or images per step, >= 1"
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="evaluate at x every this many steps (and at the last); >= 1",
    )
    p.add_argument(
        "--recal-batches",
        type=int,
        default=d.recal_batches,
        help="CNN: training batches that recompute BatchNorm statistics at x; >= 1",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate, >= 0 (default: "
        + ", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items())
        + ")",
    )
    p.add_argument("--b1", type=float, default=d.b1, help="momentum (betas[0]), in (0, 1]")
    p.add_argument(
        "--b2", type=float, default=d.b2, help="second-moment decay (betas[1]), in [0, 1)"
    )
    p.add_argument(
        "--eps", type=float, default=d.eps, help="AdamW/RAdam: added to the denominator, >= 0"
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay, >= 0")
    p.add_argument(
        "--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps, >= 0"
    )
    p.add_argument("--r", type=float, default=d.r, help="polynomial weighting power, >= 0")
    p.add_argument(
        "--weight-lr-power",
        type=float,
        default=d.weight_lr_power,
        help="power of the peak lr in the averaging weights, >= 0",
    )
    p.add_argument(
        "--sgd-phase",
        action="store_true",
        help="RAdam: take SGD steps while rectification is off (silent_sgd_phase=False)",
    )
    p.add_argument(
        "--inner-momentum",
        type=float,
        default=d.inner_momentum,
        help="AdamW: EMA of the gradient inside the direction (upstream main), in [0, 1)",
    )
    p.add_argument(
        "--sf-b1",
        type=float,
        default=d.sf_b1,
        help="adamc_plus: Schedule-Free interpolation y = b x + (1 - b) z, in [0, 1]",
    )
    p.add_argument(
        "--sf-b1-max",
        type=float,
        default=d.sf_b1_max,
        help="adamc_plus: the interpolation at the end of its annealing, in [0, 1)",
    )
    p.add_argument(
        "--sf-b1-anneal-steps",
        type=int,
        default=d.sf_b1_anneal_steps,
        help="adamc_plus: steps over which 1 - sf_b1 moves to 1 - sf_b1_max (0: none), >= 0",
    )
    p.add_argument(
        "--polyak-b",
        type=float,
        default=d.polyak_b,
        help="adamc_plus: EMA decay of the gradient's L1 norm in the Polyak step, in [0, 1)",
    )
    p.add_argument(
        "--c-warmup",
        type=int,
        default=d.c_warmup,
        help="adamc_plus: steps during which x = z (no averaging yet), >= 0",
    )
    p.add_argument("--jobs", type=int, default=2, help="backends run at the same time, >= 1")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress at all (default: a bar where stdout and stderr are terminals, "
        "else one line on stderr per finished backend)",
    )
    p.add_argument(
        "--keep-records",
        action="store_true",
        help="keep each backend's per-step record (.npz, all params) in OUT/records",
    )


# Checked before anything runs: the flags of RunConfig's fields (their ranges are
# FIELD_CHECKS), and counts that are no field (flag: dest, minimum).
_FIELD_FLAGS = {f"--{field.replace('_', '-')}": field for field in FIELD_CHECKS}
_COUNT_FLAGS = {"--jobs": ("jobs", 1), "--ranks": ("ranks", 1), "--workers": ("workers", 1)}


def _flag_error(parser: argparse.ArgumentParser, flag: str, error: Exception):
    """argparse's own form, ``argument --lr: must be in [0, inf), got -1.0``; exits with 2."""
    message = str(error).removeprefix(flag).lstrip()
    parser.error(f"argument {flag}: {message}")


def _check_flags(parser: argparse.ArgumentParser, args) -> None:
    """Every hyperparameter in its range before any backend starts (the same ranges as
    sf_optax and sf_torch, from sf_schedules.validation): a bad value is one clear error
    naming its flag, rather than a backend's traceback or a report of a meaningless run."""
    for flag, field in _FIELD_FLAGS.items():
        value = getattr(args, field, None)
        if value is not None:
            try:
                FIELD_CHECKS[field](flag, value)
            except (TypeError, ValueError) as error:
                _flag_error(parser, flag, error)
    for flag, (dest, minimum) in _COUNT_FLAGS.items():
        if hasattr(args, dest):
            try:
                validation.check_count(flag, getattr(args, dest), minimum)
            except (TypeError, ValueError) as error:
                _flag_error(parser, flag, error)
    if getattr(args, "sync", None) is not None:
        try:
            local_plan.check_sync(args.sync)
        except ValueError as error:
            _flag_error(parser, "--sync", error)
    inner = getattr(args, "inner_momentum", 0.0)
    if inner and args.optimizer != "adamw":
        parser.error(
            f"argument --inner-momentum: AdamW's (--optimizer adamw), got {inner} with "
            f"--optimizer {args.optimizer}"
        )
    if args.command == "handoff" and (args.optimizer == "adamc_plus" or inner):
        parser.error(
            "handoff moves z and v between frameworks (parity/handoff.py), not the x and m that "
            "--optimizer adamc_plus and --inner-momentum keep: use `run`"
        )
    if getattr(args, "plain_sgd", False) and (args.optimizer != "sgd" or args.warmup_steps):
        parser.error(
            "argument --plain-sgd: needs --optimizer sgd and --warmup-steps 0 (plain SGD at a "
            f"constant lr), got --optimizer {args.optimizer} --warmup-steps {args.warmup_steps}"
        )
    if getattr(args, "switch_at", None) is not None:
        try:
            switches = sorted({int(s) for s in args.switch_at.split(",") if s.strip()})
        except ValueError:
            switches = []
        if not switches or switches[0] <= 0 or switches[-1] >= args.steps:
            parser.error(
                f"argument --switch-at: needs comma-separated steps in (0, {args.steps}) "
                f"(--steps {args.steps}), got {args.switch_at!r}"
            )
        args.switch_at = switches


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
        inner_momentum=args.inner_momentum,
        sf_b1=args.sf_b1,
        sf_b1_max=args.sf_b1_max,
        sf_b1_anneal_steps=args.sf_b1_anneal_steps,
        polyak_b=args.polyak_b,
        c_warmup=args.c_warmup,
        **extra,
    )


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m parity",
        description=__doc__.splitlines()[0],
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="one model, several backends, one report", formatter_class=_HelpFormatter
    )
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
        "--ranks",
        type=int,
        default=2,
        help="DeepSpeed and fsdp2 ranks, >= 1 (cuda: at most the GPUs there are)",
    )
    run.add_argument(
        "--backends",
        default=None,
        help="comma-separated (default: every backend this machine can run, see "
        "`python -m parity backends`, except those it marks opt-in (local_torch, local_optax, "
        "...); "
        "DeepSpeed: deepspeed_z0 ... _z3, one row per ZeRO stage)",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=local_plan.DEFAULT_WORKERS,
        help="local_torch/local_optax: workers (torch ranks, JAX CPU devices), >= 1; worker w "
        "trains on rows [w B/K, (w+1) B/K) of each batch",
    )
    run.add_argument(
        "--sync",
        default=local_plan.DEFAULT_SYNC,
        metavar="RULE[:KEY=VALUE,...]",
        help="local_torch/local_optax: when the workers average, a rule of sf_schedules.sync "
        "and its constants: "
        + "; ".join(f"{rule} ({', '.join(keys)})" for rule, keys in local_plan.RULE_KEYS.items())
        + ". warmup_steps defaults to --warmup-steps; b1, r and weight_lr_power are the "
        "optimizer's",
    )
    run.add_argument(
        "--plain-sgd",
        action="store_true",
        help="local_torch/local_optax: the workers step plain SGD (torch.optim.SGD, optax.sgd: "
        "no momentum, not Schedule-Free) at the constant --lr; needs --optimizer sgd "
        "(default: the run's Schedule-Free optimizer)",
    )
    run.add_argument(
        "--baseline",
        default=None,
        help="the row every other is compared to (default: sf_torch where it runs, else the "
        "first primary backend, else the first backend; a lone backend is its own baseline: "
        "its losses are reported and nothing is compared; local_torch where local backends "
        "run another algorithm than data-parallel, the single-process rows then reported only)",
    )
    run.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report folder (default: reports/<model>_<optimizer>_<dtype>)",
    )
    run.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="BACKEND:KEY=VALUE",
        help="change one config field for one backend (to check that the "
        "checks catch a mismatch), e.g. sf_optax:lr=0.0051; repeatable (default: none)",
    )

    handoff = sub.add_parser(
        "handoff", help="move a run JAX -> torch -> JAX mid-run", formatter_class=_HelpFormatter
    )
    _add_run_options(handoff, default_dtype="float64", dtypes=HANDOFF_DTYPES)
    handoff.add_argument(
        "--switch-at",
        default="100,200",
        help="comma-separated steps in (0, --steps) at which the run changes framework",
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
        help="report folder (default: reports/handoff_<model>_<optimizer>_<dtype>)",
    )

    sub.add_parser(
        "backends",
        help="list the backends and whether this machine can run them",
        formatter_class=_HelpFormatter,
    )
    own = sub.add_parser(
        "check",
        help="the same report on your own torch model and Flax twin (parity.own)",
        description="Train sf_torch, sf_optax and the reference rows on the pair that SPEC "
        "returns (parity.own.Pair) from the same initial weights, and report as `run` does.",
        formatter_class=_HelpFormatter,
    )
    _add_check_options(own)
    export = sub.add_parser(
        "export-digits",
        help="write scikit-learn's digits to the file that machines without scikit-learn read",
        formatter_class=_HelpFormatter,
    )
    export.add_argument("--out", type=Path, default=data.DIGITS_FILE, help="the .npz to write")
    args = parser.parse_args(argv)
    if args.command in ("run", "handoff", "check"):
        _check_flags(sub.choices[args.command], args)
    if args.command == "check":
        _check_backends(sub.choices["check"], args)
        if args.out is None:
            name = args.spec.rpartition(":")[2] or "pair"
            args.out = Path("reports") / f"check_{name}_{args.optimizer}_{args.dtype}"
    elif args.command not in ("backends", "export-digits") and args.out is None:
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
        if args.command == "check":
            return _check(args)
        return _handoff(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"python -m parity {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR


def _backends() -> int:
    for name, runner in runners.discover().items():
        why = runners.unavailable(runner)
        opt_in = " (opt-in: name it in --backends)" if getattr(runner, "OPT_IN", False) else ""
        print(f"{name:15s} {runner.FRAMEWORK:6s} {runner.ROLE:12s} {why or 'available'}{opt_in}")
    return EXIT_OK


def _select(args, registry):
    if args.backends:
        names = [n.strip() for n in args.backends.split(",") if n.strip()]
        unknown = [n for n in names if n not in registry]
        if unknown:
            raise ValueError(f"unknown backends {unknown}; known: {sorted(registry)}")
    else:
        names = [
            n
            for n, r in registry.items()
            if runners.unavailable(r) is None and not getattr(r, "OPT_IN", False)
        ]
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


def _progress(args) -> str:
    return launch.OFF if args.no_progress else launch.default_progress()


def _default_baseline(names, registry, config) -> str:
    """sf_torch where it runs, else the first primary backend, else the first backend (of
    those that run here and are not expected to differ)."""
    usable = [
        n
        for n in names
        if runners.unavailable(registry[n]) is None
        and not registry[n].unsupported(runners.configure(registry[n], config))
        and not registry[n].expected_difference(runners.configure(registry[n], config))
    ] or names
    for name in usable:
        if name == "sf_torch":
            return name
    primary = [n for n in usable if registry[n].ROLE == "primary"]
    return (primary or usable)[0]


def _is_local(runner) -> bool:
    return bool(getattr(runner, "LOCAL", False))


def _local_gap(names, registry, config) -> str | None:
    """Where local-step backends are among ``names``: why they follow another trajectory than
    the single-process ones (``local_plan.data_parallel_gap``), else None."""
    if not any(_is_local(registry[n]) for n in names) or local_plan.unsupported(config):
        return None
    return local_plan.data_parallel_gap(config)


def _local_baseline(names, registry, config) -> str | None:
    """The first local backend where local runs differ from single-process ones: the local rows
    are then checked against each other (the single-process rows are reported only)."""
    if _local_gap(names, registry, config) is None:
        return None
    local = [
        n
        for n in names
        if _is_local(registry[n])
        and runners.unavailable(registry[n]) is None
        and not registry[n].unsupported(config)
    ] or [n for n in names if _is_local(registry[n])]
    return "local_torch" if "local_torch" in local else local[0]


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
    local = {"workers": args.workers, "sync": args.sync, "plain_sgd": args.plain_sgd}
    config = _config(args, device=args.device, extra={"ranks": args.ranks, "local": local})
    registry = runners.discover()
    names = _select(args, registry)
    baseline = (
        args.baseline
        or _local_baseline(names, registry, config)
        or _default_baseline(names, registry, config)
    )
    if baseline not in names:
        raise ValueError(
            f"the baseline {baseline!r} (--baseline) is not among the backends {names}: "
            "add it to --backends or pick one of those"
        )
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
            try:
                backend_config = backend_config.with_override(key, value)
            except (TypeError, ValueError) as error:
                raise ValueError(f"--override {name}:{key}={value}: {error}") from None
        jobs.append((runner, backend_config))
    if registry[baseline].expected_difference(config):
        raise ValueError(
            f"the baseline {baseline} is expected to differ here "
            f"({registry[baseline].expected_difference(config)}): pick another"
        )

    workdir = args.out / "records"
    outcomes = launch.run_all(jobs, workdir, parallel=args.jobs, progress=_progress(args))
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
        gap = _local_gap(names, registry, config)
        if not expected and gap and _is_local(runner) != _is_local(registry[baseline]):
            expected = gap  # local steps vs single process: another algorithm, reported only
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
    if code == EXIT_OK and not any(r.comparison is not None for r in rows):
        verdict = f"nothing compared: only the baseline {baseline} ran (add --backends to compare)"
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
    switches = args.switch_at  # parse_args checked and sorted them
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
        progress=_progress(args),
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


# -- check: the user's own pair ---------------------------------------------------------------


def _add_check_options(p: argparse.ArgumentParser) -> None:
    from parity.own.check import BACKENDS, DEFAULT_LR
    from parity.own.check import DTYPES as CHECK_DTYPES

    d = RunConfig()
    p.add_argument(
        "spec",
        metavar="SPEC",
        help="package.module:function returning a parity.own.Pair (called with dtype= when it "
        "takes one), e.g. parity.own.hf:roberta",
    )
    p.add_argument(
        "--dtype",
        choices=CHECK_DTYPES,
        default="float64",
        help="float64: parity to 1e-10; float32: eval loss to 1e-4",
    )
    p.add_argument("--steps", type=int, default=200, help="training steps, >= 1")
    p.add_argument(
        "--optimizer",
        choices=SCHEDULE_FREE_OPTIMIZERS,
        default=d.optimizer,
        help="the Schedule-Free optimizer",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate, >= 0 (default: "
        + ", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items())
        + ")",
    )
    p.add_argument("--b1", type=float, default=d.b1, help="momentum (betas[0]), in (0, 1]")
    p.add_argument(
        "--b2", type=float, default=d.b2, help="second-moment decay (betas[1]), in [0, 1)"
    )
    p.add_argument(
        "--eps", type=float, default=d.eps, help="AdamW/RAdam: added to the denominator, >= 0"
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay, >= 0")
    p.add_argument(
        "--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps, >= 0"
    )
    p.add_argument("--r", type=float, default=d.r, help="polynomial weighting power, >= 0")
    p.add_argument(
        "--weight-lr-power",
        type=float,
        default=d.weight_lr_power,
        help="power of the peak lr in the averaging weights, >= 0",
    )
    p.add_argument(
        "--sgd-phase",
        action="store_true",
        help="RAdam: take SGD steps while rectification is off (silent_sgd_phase=False)",
    )
    p.add_argument(
        "--inner-momentum",
        type=float,
        default=d.inner_momentum,
        help="AdamW: EMA of the gradient inside the direction (upstream main), in [0, 1); "
        "the sf_torch and sf_optax rows (schedulefree 1.4.1 and optax.contrib have none)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=1,
        help="evaluate at x every this many steps (and at the last); >= 1",
    )
    p.add_argument(
        "--recal-batches",
        type=int,
        default=d.recal_batches,
        help="BatchNorm: training batches that recompute the statistics at x; >= 1",
    )
    p.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated, among "
        + ", ".join(BACKENDS)
        + "; opt-in, float32 only: deepspeed_z0 ... deepspeed_z3 (sf_torch under DeepSpeed "
        "ZeRO on 2 CPU ranks, each rebuilding the pair from SPEC, the whole batch on each)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        help="the row every other is compared to (default: sf_torch where selected, else the "
        "first backend)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report folder (default: reports/check_<function>_<optimizer>_<dtype>)",
    )
    p.add_argument(
        "--divergence",
        action="store_true",
        help="before training, compare the first batch layer by layer (parity.own.divergence): "
        "its verdict printed, its figures in report.json",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no line per finished backend on stderr"
    )


def _check_backends(parser: argparse.ArgumentParser, args) -> None:
    from parity.own.check import BACKENDS, DEEPSPEED

    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS + DEEPSPEED]
    if not names or unknown:
        parser.error(
            f"argument --backends: must be comma-separated among "
            f"{', '.join(BACKENDS + DEEPSPEED)}, got {args.backends!r}"
        )
    args.backends = names
    if args.baseline is None:
        args.baseline = "sf_torch" if "sf_torch" in names else names[0]
    elif args.baseline not in names:
        parser.error(
            f"argument --baseline: must be one of the backends {names}, got {args.baseline!r}"
        )


def _before_check(pair, args):
    """``--divergence``: the first training batch through both models, layer by layer
    (parity.own.divergence), before any training; its verdict printed, its figures returned
    for report.json. None without the flag."""
    if not args.divergence:
        return None
    from parity.own import divergence

    found = divergence.find_pair(pair)
    print(f"first batch, layer by layer: {found.verdict()}", flush=True)
    return found.to_dict()


def _check(args) -> int:
    started = time.perf_counter()
    from parity.own import check as check_lib
    from parity.own.spec import load_spec

    try:
        with warnings.catch_warnings():
            # A Flax model built in float64 outside jax.enable_x64 warns per array that it is
            # float32 for now; check_pair casts every leaf to the run's dtype under x64.
            warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
            pair = load_spec(args.spec, dtype=args.dtype)
    except (ValueError, TypeError, ImportError) as error:
        message = " ".join(str(error).split())
        print(f"python -m parity check: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # the SPEC function itself failed: one line, its error named
        message = " ".join(str(error).split())
        print(
            f"python -m parity check: error: SPEC {args.spec!r} raised "
            f"{type(error).__name__}: {message}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    first_batch = _before_check(pair, args)
    result = check_lib.check_pair(
        pair,
        optimizer=args.optimizer,
        steps=args.steps,
        dtype=args.dtype,
        lr=args.lr,
        b1=args.b1,
        b2=args.b2,
        eps=args.eps,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        r=args.r,
        weight_lr_power=args.weight_lr_power,
        silent_sgd_phase=not args.sgd_phase,
        inner_momentum=args.inner_momentum,
        eval_every=args.eval_every,
        recal_batches=args.recal_batches,
        backends=args.backends,
        baseline=args.baseline,
        log=not args.no_progress,
        spec=args.spec,
    )
    result.seconds = time.perf_counter() - started
    result.divergence = first_batch
    print(result.title())
    print(result.table())
    for r in result.rows:
        if r.status == report.ERROR and r.note:
            print(f"\n{r.name} failed: {r.note}", file=sys.stderr)
    path = result.write(args.out)
    verdict = {
        EXIT_OK: "all checks passed",
        EXIT_TOLERANCE: "a tolerance was exceeded",
        EXIT_ERROR: "a backend failed",
    }[result.exit_code]
    sys.stderr.flush()
    print(
        f"\n{verdict} ({time.perf_counter() - started:.1f} s)\nreport: {path}, "
        f"{args.out / 'report.png'}",
        flush=True,
    )
    return result.exit_code
