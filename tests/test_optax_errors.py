"""Bad input to sf_optax: a ValueError naming the argument and its accepted range, in the format
of sf_schedules.validation that sf_torch shares; a TypeError when the value is no number."""

import math

import jax
import jax.numpy as jnp
import optax
import pytest

import sf_optax

BAD = [
    (sf_optax.adamw, "learning_rate", -0.1, r"\[0, inf\)"),
    (sf_optax.adamw, "learning_rate", math.nan, r"\[0, inf\)"),
    (sf_optax.adamw, "b1", 0.0, r"\(0, 1\]"),
    (sf_optax.adamw, "b1", 1.5, r"\(0, 1\]"),
    (sf_optax.adamw, "b2", 1.0, r"\[0, 1\)"),
    (sf_optax.adamw, "b2", -0.1, r"\[0, 1\)"),
    (sf_optax.adamw, "eps", -1e-8, r"\[0, inf\)"),
    (sf_optax.adamw, "weight_decay", -0.01, r"\[0, inf\)"),
    (sf_optax.adamw, "warmup_steps", -1, r"\{0, 1, 2, \.\.\.\}"),
    (sf_optax.adamw, "warmup_steps", 2.5, r"\{0, 1, 2, \.\.\.\}"),
    (sf_optax.adamw, "r", -1.0, r"\[0, inf\)"),
    (sf_optax.adamw, "weight_lr_power", -2.0, r"\[0, inf\)"),
    (sf_optax.sgd, "learning_rate", -1.0, r"\[0, inf\)"),
    (sf_optax.sgd, "b1", 0.0, r"\(0, 1\]"),
    (sf_optax.sgd, "weight_decay", -1.0, r"\[0, inf\)"),
    (sf_optax.radam, "b2", 1.0, r"\[0, 1\)"),
    (sf_optax.radam, "learning_rate", -1.0, r"\[0, inf\)"),
    (sf_optax.radam, "b1", 2.0, r"\(0, 1\]"),
    (sf_optax.radam, "eps", -1.0, r"\[0, inf\)"),
    (sf_optax.adamw, "learning_rate", math.inf, r"\[0, inf\)"),  # finite only
    (sf_optax.adamw, "pack_small_leaves", -1, r"\{0, 1, 2, \.\.\.\}"),
]


@pytest.mark.parametrize("factory,name,value,accepted", BAD, ids=lambda v: str(v)[:20])
def test_out_of_range_raises_naming_argument(factory, name, value, accepted):
    with pytest.raises(ValueError, match=rf"^{name} must be in {accepted}, got "):
        factory(**{name: value})


def test_message_is_the_shared_one():
    with pytest.raises(ValueError) as info:
        sf_optax.adamw(b1=1.5)
    assert str(info.value) == "b1 must be in (0, 1], got 1.5"
    with pytest.raises(ValueError) as info:
        sf_optax.sgd(warmup_steps=2.5)
    assert str(info.value) == "warmup_steps must be in {0, 1, 2, ...}, got 2.5"


@pytest.mark.parametrize("value", ["0.9", True, (0.9,), jnp.ones(2)], ids=repr)
def test_a_value_that_is_no_number_is_a_type_error(value):
    with pytest.raises(TypeError, match=r"^b1 must be a real number in \(0, 1\], got "):
        sf_optax.adamw(b1=value)


def test_whole_floats_and_arrays_are_accepted():
    sf_optax.adamw(warmup_steps=3.0, b1=jnp.asarray(0.9), eps=jnp.asarray(1e-8, jnp.bfloat16))


def test_schedules_and_traced_values_are_not_checked_when_built():
    params = {"a": jnp.ones(2)}
    sf_optax.adamw(learning_rate=lambda k: -1.0)  # a schedule's values are not known yet
    tx = optax.inject_hyperparams(sf_optax.radam)(learning_rate=0.1, b1=0.9)
    state = tx.init(params)
    # Inside jit the hyperparameters are tracers: the update builds the optimizer again.
    _, state = jax.jit(tx.update)(params, state, params)
    assert int(state.count) == 1


def test_boundaries_are_accepted():
    sf_optax.adamw(learning_rate=0.0, b1=1.0, b2=0.0, eps=0.0, warmup_steps=0, r=0.0)
    sf_optax.sgd(b1=1.0, weight_lr_power=0.0)
    sf_optax.adamw(b1=0.0, exact_x=True)  # b1 = 0 needs the stored x


def test_b1_zero_needs_exact_x():
    with pytest.raises(ValueError, match=r"^b1 must be in \(0, 1\], got 0.0$"):
        sf_optax.adamw(b1=0.0)


def test_exact_x_must_be_static():
    with pytest.raises(TypeError, match="exact_x must be a Python bool"):
        sf_optax.adamw(exact_x=jnp.asarray(True))


def test_array_hyperparameters_are_checked_too():
    with pytest.raises(ValueError, match="^learning_rate must be in"):
        optax.inject_hyperparams(sf_optax.adamw)(learning_rate=-1.0).init({"a": jnp.ones(2)})


def test_update_without_params_is_a_clear_error():
    tx = sf_optax.adamw()
    state = tx.init({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update({"a": jnp.ones(2)}, state)
