"""What one run is: model, optimizer and its hyperparameters, data, dtype, steps.

A ``RunConfig`` is written to JSON by the parent and read by every runner's child process, so
all backends train from the same description. Hyperparameters use the names of DESIGN.md
(``b1``, ``b2``); each runner maps them to its framework's names (``betas``, ``momentum``).

Beyond schedulefree 1.4.1 (upstream main's ScheduleFree+): ``inner_momentum`` (AdamW's EMA of
the gradient inside its direction) and the optimizer ``adamc_plus`` (Schedule-Free AdamC with
a Polyak step size from the loss: ``sf_optax.adamc_plus``, ``sf_torch.AdamCScheduleFreePlus``),
whose own fields are ``sf_b1``, ``sf_b1_max``, ``sf_b1_anneal_steps``, ``polyak_b`` and
``c_warmup`` (``b1``, ``b2`` are Adam's moments there; ``lr`` multiplies the Polyak step size).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from parity.models.canonical import MODELS
from sf_schedules import validation

OPTIMIZERS = ("adamw", "sgd", "radam", "adamc_plus")
# The optimizers of schedulefree 1.4.1's rule (every backend's; adamc_plus is sf_optax's and
# sf_torch's only).
SCHEDULE_FREE_OPTIMIZERS = ("adamw", "sgd", "radam")
# bfloat16 is mixed precision: bf16 params and compute, float32 optimizer state and loss.
DTYPES = ("float64", "float32", "bfloat16")
DEVICES = ("cpu", "cuda")

# Learning rates that train the twin models well in a few hundred steps. The other defaults
# are those of the `schedulefree` reference classes.
DEFAULT_LR = {"adamw": 0.005, "sgd": 0.2, "radam": 0.005, "adamc_plus": 1.0}


def _count(minimum: int):
    return lambda name, value: validation.check_count(name, value, minimum)


# The accepted range of each numeric field: the ranges sf_optax and sf_torch accept, from their
# shared checks. The CLI checks its flags with them (naming the flag), RunConfig its fields
# (naming the field: an --override, or a config file a child reads).
FIELD_CHECKS = {
    "steps": _count(1),
    "seed": _count(0),
    "batch_size": _count(1),
    "eval_every": _count(1),
    "recal_batches": _count(1),
    "lr": validation.check_nonnegative,
    "b1": validation.check_b1,
    "b2": validation.check_b2,
    "eps": validation.check_nonnegative,
    "weight_decay": validation.check_nonnegative,
    "warmup_steps": _count(0),
    "r": validation.check_nonnegative,
    "weight_lr_power": validation.check_nonnegative,
    "inner_momentum": lambda name, value: validation.check_real(
        name, value, 0.0, 1.0, high_open=True, required=True
    ),
    "sf_b1": lambda name, value: validation.check_real(name, value, 0.0, 1.0, required=True),
    "sf_b1_max": lambda name, value: validation.check_real(
        name, value, 0.0, 1.0, high_open=True, required=True
    ),
    "sf_b1_anneal_steps": _count(0),
    "polyak_b": lambda name, value: validation.check_real(
        name, value, 0.0, 1.0, high_open=True, required=True
    ),
    "c_warmup": _count(0),
}


@dataclass
class RunConfig:
    model: str = "mlp"
    optimizer: str = "adamw"
    steps: int = 300
    dtype: str = "float64"
    device: str = "cpu"  # torch runners' device; JAX runners' platform (JAX_PLATFORMS)
    seed: int = 0
    batch_size: int = 32
    eval_every: int = 1
    recal_batches: int = 4  # CNN: batches that recompute BatchNorm statistics at x
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    r: float = 0.0
    weight_lr_power: float = 2.0
    silent_sgd_phase: bool = True  # RAdam only
    inner_momentum: float = 0.0  # AdamW only: upstream main's EMA of g in the direction
    # adamc_plus only (upstream's sf_beta1, sf_beta1_max, sf_beta1_anneal_steps, polyak_beta)
    sf_b1: float = 0.9
    sf_b1_max: float = 0.965
    sf_b1_anneal_steps: int = 0
    polyak_b: float = 0.0
    c_warmup: int = 0
    # A segment of a longer run (the handoff): start at `first_step` from the snapshot file
    # `resume_from` and, at the end, write the state to `save_to` (parity/handoff.py's format).
    first_step: int = 0
    resume_from: str | None = None
    save_to: str | None = None
    digits_file: str | None = None  # parity.data.save_digits's file (spares children sklearn)
    extra: dict = field(default_factory=dict)  # runner-specific knobs (e.g. ranks)

    def __post_init__(self):
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.optimizer, 0.005)
        self.validate()

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name, check in FIELD_CHECKS.items():
            check(name, getattr(self, name))
        if self.inner_momentum != 0 and self.optimizer != "adamw":
            raise ValueError(
                f"inner_momentum is AdamW's (optimizer adamw), got {self.inner_momentum} with "
                f"optimizer {self.optimizer!r}"
            )
        if self.optimizer == "adamc_plus" and self.sf_b1_anneal_steps and self.sf_b1 == 1:
            raise ValueError("sf_b1 must be in [0, 1) when sf_b1_anneal_steps > 0, got 1")
        if not 0 <= self.first_step < self.steps:
            raise ValueError(
                f"need 0 <= first_step < steps, got first_step {self.first_step}, "
                f"steps {self.steps}"
            )
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")

    @property
    def host_dtype(self) -> str:
        """The numpy dtype of data and records: numpy has no bfloat16, and every bfloat16
        value is exactly a float32 one."""
        return "float32" if self.dtype == "bfloat16" else self.dtype

    def evaluates_at(self, step: int) -> bool:
        """Eval loss at x is recorded every ``eval_every`` steps, at the first and the last."""
        return step % self.eval_every == 0 or step in (self.first_step, self.steps)

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls(**json.loads(text))

    def with_override(self, key: str, value: str) -> RunConfig:
        """A copy with one field set from its text form (``--override backend:key=value``)."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        if key not in fields or key in (
            "extra",
            "resume_from",
            "save_to",
            "first_step",
            "digits_file",
        ):
            raise ValueError(f"cannot override {key!r}; fields: {sorted(fields)}")
        current = getattr(self, key)
        try:
            if isinstance(current, bool):
                parsed = value.lower() in ("1", "true", "yes")
            elif isinstance(current, int):
                parsed = int(value)
            elif isinstance(current, float):
                parsed = float(value)
            else:
                parsed = value
        except ValueError:
            raise ValueError(f"{key} wants a {type(current).__name__}, got {value!r}") from None
        return self.replace(**{key: parsed})
