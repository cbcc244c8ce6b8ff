"""A parity report: one row per backend, as a printed table, a JSON file and a PNG plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from parity import tolerances
from parity.compare import Comparison
from parity.training.record import Record

# Row status: what the row's numbers mean for the exit code.
BASELINE, OK, FAIL, REPORTED, SKIPPED, ERROR = (
    "baseline",
    "ok",
    "FAIL",
    "reported",
    "skipped",
    "ERROR",
)


@dataclass
class Row:
    name: str
    role: str
    status: str
    note: str = ""  # why skipped / expected to differ / the error
    limits: dict = field(default_factory=dict)
    final_train_loss: float = math.nan
    final_eval_loss: float = math.nan
    max_diff: dict = field(default_factory=dict)  # metric -> worst relative difference
    first_step_over: int | None = None
    seconds: float = math.nan
    record: Record | None = None
    comparison: Comparison | None = None

    @property
    def failed(self) -> bool:
        return self.status in (FAIL, ERROR)


def make_row(name, role, record, comparison, limits, nominal, seconds, note="") -> Row:
    """A measured row: its verdict against ``limits`` (empty: reported only)."""
    checked = limits or nominal
    first = comparison.first_step_over(checked) if comparison is not None else None
    if comparison is None:
        status = BASELINE
    elif limits:
        status = FAIL if first is not None else OK
    else:
        status = REPORTED
    final_eval = record.eval_loss[~np.isnan(record.eval_loss)]
    return Row(
        name=name,
        role=role,
        status=status,
        note=note,
        limits=limits,
        final_train_loss=float(record.train_loss[-1]),
        final_eval_loss=float(final_eval[-1]) if len(final_eval) else math.nan,
        max_diff={m: comparison.worst(m) for m in tolerances.METRICS} if comparison else {},
        first_step_over=first,
        seconds=seconds,
        record=record,
        comparison=comparison,
    )


def _num(value: float, fmt: str = ".3e") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def table(rows: list[Row], baseline: str, dtype: str) -> str:
    header = [
        "backend",
        "role",
        "train loss (y)",
        "eval loss (x)",
        "params diff",
        "train loss diff",
        "eval loss diff",
        "first step over",
        "status",
    ]
    lines = [header]
    for r in rows:
        d = r.max_diff
        lines.append(
            [
                r.name,
                r.role,
                _num(r.final_train_loss, ".6f"),
                _num(r.final_eval_loss, ".6f"),
                _num(d.get("params")),
                _num(d.get("train_loss")),
                _num(d.get("eval_loss")),
                "-" if r.first_step_over is None else str(r.first_step_over),
                r.status,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    limits = ", ".join(f"{m} <= {v:g}" for m, v in tolerances.nominal(dtype).items())
    kind = (
        "sanity bound (mixed precision, no parity claimed)"
        if dtype == "bfloat16"
        else ("tolerance")
    )
    out.append("")
    out.append(
        f"diffs: largest relative difference to {baseline} over all steps; "
        f"{dtype} {kind}: {limits or 'none'}"
    )
    by_note: dict[str, list[str]] = {}  # rows sharing a note (DeepSpeed's stages) say it once
    for r in rows:
        if r.note:
            by_note.setdefault(r.note, []).append(r.name)
    for note, names in by_note.items():
        out.append(f"{', '.join(names)}: {note}")
    return "\n".join(out)


def _series(values: np.ndarray) -> list:
    return [None if (v is None or not math.isfinite(v)) else float(v) for v in values]


def to_json(rows, config, baseline, exit_code, extra=None) -> dict:
    out = {
        "config": json.loads(config.to_json()),
        "baseline": baseline,
        "tolerances": {
            "nominal": tolerances.nominal(config.dtype),
            "float64_relative": tolerances.FLOAT64_RELATIVE,
            "float32_eval_loss_relative": tolerances.FLOAT32_EVAL_LOSS_RELATIVE,
            "bfloat16_eval_loss_relative": tolerances.BFLOAT16_EVAL_LOSS_RELATIVE,
        },
        "exit_code": exit_code,
        "rows": [],
    }
    for r in rows:
        row = {k: v for k, v in asdict(r).items() if k not in ("record", "comparison")}
        row["max_diff"] = {k: (v if math.isfinite(v) else None) for k, v in r.max_diff.items()}
        for k in ("final_train_loss", "final_eval_loss", "seconds"):
            row[k] = row[k] if math.isfinite(row[k]) else None
        if r.record is not None:
            row["steps"] = r.record.steps.tolist()
            row["train_loss"] = _series(r.record.train_loss)
            row["eval_loss"] = _series(r.record.eval_loss)
            row["meta"] = r.record.meta
        if r.comparison is not None:
            row["relative_diff"] = {
                "steps": r.comparison.steps.tolist(),
                **{m: _series(r.comparison.series(m)) for m in tolerances.METRICS},
            }
        out["rows"].append(row)
    out.update(extra or {})
    return out


def plot(rows: list[Row], path: Path, title: str, dtype: str) -> bool:
    """Draw the report's four panels into ``path``; False (nothing drawn) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.record is not None]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    (ax_train, ax_eval), (ax_params, ax_loss) = axes
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    floor = 1e-17  # exact agreement, drawn at the bottom of the log scale
    for i, r in enumerate(measured):
        style = dict(
            linestyle=styles[i % len(styles)],
            color=colors[i % len(colors)],
            linewidth=1.2,
            label=r.name,
        )
        rec = r.record
        ax_train.plot(rec.steps[:-1], rec.train_loss, **style)
        evaluated = ~np.isnan(rec.eval_loss)
        ax_eval.plot(rec.steps[evaluated], rec.eval_loss[evaluated], **style)
        if r.comparison is not None:
            c = r.comparison
            ax_params.plot(c.steps, np.maximum(c.params, floor), **style)
            ok = ~np.isnan(c.eval_loss)
            ax_loss.plot(c.steps[ok], np.maximum(c.eval_loss[ok], floor), **style)
    ax_train.set(title="training loss at y (before each step)", xlabel="step", ylabel="loss")
    ax_eval.set(title="eval loss at x", xlabel="step", ylabel="loss")
    ax_params.set(
        title="params: max relative difference to baseline (0 drawn at 1e-17)",
        xlabel="step",
        yscale="log",
    )
    ax_loss.set(
        title="eval loss at x: relative difference to baseline (0 drawn at 1e-17)",
        xlabel="step",
        yscale="log",
    )
    for ax, metric in ((ax_params, "params"), (ax_loss, "eval_loss")):
        limit = tolerances.nominal(dtype).get(metric)
        if limit and ax.has_data():  # a lone tolerance line (nothing compared) has no y range
            ax.axhline(
                limit, color="red", linewidth=0.8, linestyle=":", label=f"tolerance {limit:g}"
            )
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
