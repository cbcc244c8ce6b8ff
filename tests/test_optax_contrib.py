"""sf_optax against optax.contrib.schedule_free_adamw, and the documented warmup difference.

Without warmup both implement the same rule and agree to float64 round-off. With warmup,
optax.contrib's z step uses the learning rate of the previous step (its first z step has lr 0)
while its averaging weights do not; sf_optax follows the reference classes (DESIGN 1.3).
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import schedulefree
from optax_problems import Problem, max_rel_diff, run_optax, run_reference

import sf_optax

pytestmark = pytest.mark.usefixtures("x64")


trajectory = run_optax


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("b1", [0.9, 0.7])
def test_agrees_with_contrib_without_warmup(b1, weight_decay):
    problem = Problem(seed=11)
    kw = dict(learning_rate=0.05, b1=b1, b2=0.995, weight_decay=weight_decay)
    ours, ours_state = trajectory(sf_optax.adamw(**kw), problem, 200)
    theirs, their_state = trajectory(optax.contrib.schedule_free_adamw(**kw), problem, 200)
    to_np = lambda t: {k: np.asarray(v) for k, v in t.items()}  # noqa: E731
    assert max_rel_diff(to_np(ours), to_np(theirs)) < 1e-12
    ours_x = sf_optax.eval_params(ours_state, ours)
    their_x = optax.contrib.schedule_free_eval_params(their_state, theirs)
    assert max_rel_diff(to_np(ours_x), to_np(their_x)) < 1e-12
    assert max_rel_diff(to_np(ours), problem.init) > 1e-2


def test_contrib_warmup_lags_one_step():
    problem = Problem(seed=12)
    lr, warmup = 0.05, 10
    theirs, their_state = trajectory(
        optax.contrib.schedule_free_adamw(lr, warmup_steps=warmup), problem, 1
    )
    ours, ours_state = trajectory(sf_optax.adamw(lr, warmup_steps=warmup), problem, 1)
    ref_y, _ = run_reference(schedulefree.AdamWScheduleFree, problem, 1, lr=lr, warmup_steps=warmup)
    to_np = lambda t: {k: np.asarray(v) for k, v in t.items()}  # noqa: E731
    # optax.contrib's first z step has learning rate 0: z has not moved from the init
    for k, v in problem.init.items():
        np.testing.assert_array_equal(np.asarray(their_state.z[k]), v)
    assert max_rel_diff(to_np(sf_optax.find_state(ours_state).z), problem.init) > 1e-4
    # so after one step its params are off the reference by a visible amount, ours are not
    assert max_rel_diff(to_np(theirs), ref_y) > 1e-3
    assert max_rel_diff(to_np(ours), ref_y) < 1e-14


def test_contrib_scalars_take_params_dtype_ours_do_not():
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    theirs = optax.contrib.schedule_free_adamw(1e-3).init(params)
    ours = sf_optax.find_state(sf_optax.adamw(1e-3).init(params))
    assert theirs.weight_sum.dtype == jnp.bfloat16
    assert ours.weight_sum.dtype == jnp.float32 and ours.lr_max.dtype == jnp.float32
