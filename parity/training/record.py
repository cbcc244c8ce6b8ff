"""The per-step record of one run, in numpy, and its file format (one ``.npz``).

Step ``t`` counts optimizer steps taken. For ``t`` in ``[first_step, steps]``:

- ``params[name][t - first_step]``: the parameters the model holds after ``t`` steps (``y``,
  canonical layout);
- ``eval_loss[t - first_step]``: the loss on the eval set at ``x`` after ``t`` steps (NaN
  where not evaluated, see ``RunConfig.eval_every``);

and for ``t`` in ``[first_step, steps)``, ``train_loss[t - first_step]``: the loss of step
``t``'s training batch at ``y``, before the step (the loss whose gradient the step used).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Record:
    first_step: int
    train_loss: np.ndarray
    eval_loss: np.ndarray
    params: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, first_step: int, steps: int, shapes: dict, dtype) -> Record:
        n = steps - first_step
        return cls(
            first_step=first_step,
            train_loss=np.full(n, np.nan),
            eval_loss=np.full(n + 1, np.nan),
            params={k: np.zeros((n + 1, *s), dtype=dtype) for k, s in shapes.items()},
        )

    @property
    def last_step(self) -> int:
        return self.first_step + len(self.train_loss)

    @property
    def steps(self) -> np.ndarray:
        """The step of each entry of ``eval_loss`` and ``params``."""
        return np.arange(self.first_step, self.last_step + 1)

    def set_params(self, step: int, params: dict) -> None:
        for name, value in params.items():
            self.params[name][step - self.first_step] = np.asarray(value)

    def save(self, path) -> None:
        arrays = {f"param/{k}": v for k, v in self.params.items()}
        np.savez(
            path,
            first_step=self.first_step,
            train_loss=self.train_loss,
            eval_loss=self.eval_loss,
            meta=json.dumps(self.meta),
            **arrays,
        )

    @classmethod
    def load(cls, path) -> Record:
        with np.load(path) as f:
            params = {k[len("param/") :]: f[k] for k in f.files if k.startswith("param/")}
            return cls(
                first_step=int(f["first_step"]),
                train_loss=f["train_loss"],
                eval_loss=f["eval_loss"],
                params=params,
                meta=json.loads(str(f["meta"])),
            )

    @classmethod
    def concatenate(cls, parts: list[Record]) -> Record:
        """Segments run one after the other (each starts where the last ended) as one record."""
        for a, b in zip(parts, parts[1:]):
            if a.last_step != b.first_step:
                raise ValueError(
                    f"segments do not join: one ends at {a.last_step}, the next "
                    f"starts at {b.first_step}"
                )
        first = parts[0]
        # Each joint step appears twice (end of one segment, start of the next): keep the
        # later segment's value for params (it loaded them) and the earlier's eval loss where
        # only that one has it.
        eval_loss = list(first.eval_loss)
        params = {k: [v] for k, v in first.params.items()}
        for part in parts[1:]:
            joint = part.eval_loss[0]
            if not np.isnan(joint):
                eval_loss[-1] = joint
            eval_loss.extend(part.eval_loss[1:])
            for k, v in part.params.items():
                params[k][-1] = params[k][-1][:-1]
                params[k].append(v)
        return cls(
            first_step=first.first_step,
            train_loss=np.concatenate([p.train_loss for p in parts]),
            eval_loss=np.asarray(eval_loss),
            params={k: np.concatenate(v) for k, v in params.items()},
            meta={"segments": [p.meta for p in parts]},
        )
