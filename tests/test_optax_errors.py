"""Bad input to sf_optax: a ValueError naming the argument and its accepted range."""

import math

import jax.numpy as jnp
import optax
import pytest

import sf_optax

BAD = [
    (sf_optax.adamw, "learning_rate", -0.1, r"\[0.0, inf\]"),
    (sf_optax.adamw, "learning_rate", math.nan, r"\[0.0, inf\]"),
    (sf_optax.adamw, "b1", 0.0, r"\(0.0, 1.0\]"),
    (sf_optax.adamw, "b1", 1.5, r"\(0.0, 1.0\]"),
    (sf_optax.adamw, "b2", 1.0, r"\[0.0, 1.0\)"),
    (sf_optax.adamw, "b2", -0.1, r"\[0.0, 1.0\)"),
    (sf_optax.adamw, "eps", -1e-8, r"\[0.0, inf\]"),
    (sf_optax.adamw, "weight_decay", -0.01, r"\[0.0, inf\]"),
    (sf_optax.adamw, "warmup_steps", -1, r"integers in \[0, inf\]"),
    (sf_optax.adamw, "warmup_steps", 2.5, r"integers in \[0, inf\]"),
    (sf_optax.adamw, "r", -1.0, r"\[0.0, inf\]"),
    (sf_optax.adamw, "weight_lr_power", -2.0, r"\[0.0, inf\]"),
    (sf_optax.sgd, "learning_rate", -1.0, r"\[0.0, inf\]"),
    (sf_optax.sgd, "b1", 0.0, r"\(0.0, 1.0\]"),
    (sf_optax.sgd, "weight_decay", -1.0, r"\[0.0, inf\]"),
    (sf_optax.radam, "b2", 1.0, r"\[0.0, 1.0\)"),
    (sf_optax.radam, "learning_rate", -1.0, r"\[0.0, inf\]"),
    (sf_optax.radam, "b1", 2.0, r"\(0.0, 1.0\]"),
]


@pytest.mark.parametrize("factory,name,value,accepted", BAD, ids=lambda v: str(v)[:20])
def test_out_of_range_raises_naming_argument(factory, name, value, accepted):
    with pytest.raises(ValueError, match=rf"^{name} must be in {accepted}, got "):
        factory(**{name: value})


def test_boundaries_are_accepted():
    sf_optax.adamw(learning_rate=0.0, b1=1.0, b2=0.0, eps=0.0, warmup_steps=0, r=0.0)
    sf_optax.sgd(b1=1.0, weight_lr_power=0.0)
    sf_optax.adamw(b1=0.0, exact_x=True)  # b1 = 0 needs the stored x


def test_b1_zero_needs_exact_x():
    with pytest.raises(ValueError, match=r"^b1 must be in \(0.0, 1.0\]"):
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
