"""Bad input to sf_optax: a ValueError naming the argument and its accepted range, in the format
of sf_schedules.validation that sf_torch shares; a TypeError when the value is no number."""

import math

import jax
import jax.numpy as jnp
import numpy as np
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


# --- What a new user tripped over (the list) --------------------------------------------

ALIASES = [sf_optax.adamw, sf_optax.sgd, sf_optax.radam]


@pytest.mark.parametrize("factory", ALIASES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=repr)
def test_non_finite_learning_rate_is_refused(factory, value):
    with pytest.raises(ValueError, match=r"^learning_rate must be in \[0, inf\), got "):
        factory(learning_rate=value)


@pytest.mark.parametrize(
    "name,value,error,accepted",
    [
        ("warmup_steps", "10", TypeError, r"\{0, 1, 2, \.\.\.\}"),
        ("warmup_steps", True, TypeError, r"\{0, 1, 2, \.\.\.\}"),
        ("b1", "0.9", TypeError, r"\(0, 1\]"),
        ("b1", (0.9, 0.99), TypeError, r"\(0, 1\]"),  # not a shape error: it names b1
        ("b2", (0.9, 0.99), TypeError, r"\[0, 1\)"),
        ("learning_rate", "1e-3", TypeError, r"\[0, inf\)"),
    ],
    ids=repr,
)
def test_values_that_are_no_numbers_name_the_argument(name, value, error, accepted):
    with pytest.raises(error, match=rf"^{name} must be a real number in {accepted}, got "):
        sf_optax.adamw(**{name: value})


FLOAT_DTYPES = [None, jnp.float32, jnp.bfloat16, jnp.float16, "float32", jnp.dtype("bfloat16")]
NOT_FLOAT_DTYPES = [jnp.int32, jnp.bool_, bool, int, jnp.complex64, "int8"]
NOT_DTYPES = ["foo", 3, jnp.ones(2), (jnp.float32,)]


def _state_dtype_factories():
    return [
        *ALIASES,
        lambda state_dtype: sf_optax.schedule_free(optax.identity(), 0.1, state_dtype=state_dtype),
        lambda state_dtype: sf_optax.scale_by_second_moment(state_dtype=state_dtype),
    ]


@pytest.mark.parametrize("dtype", NOT_FLOAT_DTYPES, ids=repr)
@pytest.mark.parametrize("factory", _state_dtype_factories())
def test_state_dtype_must_be_floating(factory, dtype):
    # int32 state rounds z and v to integers (training silently diverges); bool breaks them.
    with pytest.raises(ValueError, match=r"^state_dtype must be a floating dtype \(jnp.float32"):
        factory(state_dtype=dtype)


@pytest.mark.parametrize("dtype", NOT_DTYPES, ids=repr)
@pytest.mark.parametrize("factory", _state_dtype_factories())
def test_state_dtype_that_is_no_dtype_is_a_type_error(factory, dtype):
    with pytest.raises(TypeError, match=r"^state_dtype must be a floating dtype .* or None, got "):
        factory(state_dtype=dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=repr)
def test_floating_state_dtypes_are_accepted(dtype):
    params = {"a": jnp.ones(3, jnp.bfloat16)}
    tx = sf_optax.adamw(state_dtype=dtype)
    z = sf_optax.find_state(tx.init(params)).z["a"]
    assert z.dtype == (jnp.bfloat16 if dtype is None else jnp.dtype(dtype))


@pytest.mark.parametrize(
    "mask", [3, "abc", {"a": 1}, {"a": "yes"}, {"a": jnp.ones(2, bool)}], ids=repr
)
def test_mask_that_is_no_tree_of_bools_is_a_type_error(mask):
    # optax.masked would take any truthy leaf for True (3, "abc") and silently decay everything.
    with pytest.raises(TypeError, match=r"^mask must be None, a tree of Python bools"):
        sf_optax.adamw(weight_decay=0.1, mask=mask)


def test_mask_function_result_is_checked_when_called():
    tx = sf_optax.sgd(weight_decay=0.1, mask=lambda params: jax.tree.map(lambda p: p.size, params))
    with pytest.raises(TypeError, match=r"^mask must be None, a tree of Python bools"):
        tx.init({"a": jnp.ones(2)})


def test_valid_masks_are_accepted():
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    masks = [
        {"a": True, "b": False},
        {"a": np.bool_(True), "b": jnp.asarray(False)},
        True,  # a prefix of the params, as optax.masked takes it
        lambda p: jax.tree.map(lambda x: x.ndim > 0, p),
    ]
    for mask in masks:
        tx = sf_optax.adamw(weight_decay=0.1, mask=mask)
        tx.update(params, tx.init(params), params)


@pytest.mark.parametrize("value", [1, None, "yes", np.bool_(True)], ids=repr)
def test_exact_x_type_names_it(value):
    with pytest.raises(TypeError, match=r"^exact_x must be a Python bool"):
        sf_optax.adamw(exact_x=value)


@pytest.mark.parametrize("value", [True, 2.5, "8"], ids=repr)
def test_pack_small_leaves_type_names_it(value):
    with pytest.raises(TypeError, match=r"^pack_small_leaves must be a Python int"):
        sf_optax.sgd(pack_small_leaves=value)


# --- Values that cannot raise: traced inside jax.jit, or a schedule's ----------------------------

PARAMS = {"w": jnp.asarray([[0.5, -1.0], [2.0, 0.25]]), "b": jnp.zeros(2)}
GRADS = {"w": jnp.asarray([[1.0, -0.5], [0.25, 2.0]]), "b": jnp.asarray([0.5, -1.0])}
VALID = {"learning_rate": 0.1, "b1": 0.9, "weight_decay": 0.01}
VALID_ADAM = {**VALID, "b2": 0.99, "eps": 1e-8}

# (factory, hyperparameters it is made with, the one changed in the state, its bad value)
TRACED_BAD = [
    (sf_optax.adamw, VALID_ADAM, "learning_rate", -1.0),
    (sf_optax.adamw, VALID_ADAM, "learning_rate", math.inf),
    (sf_optax.adamw, VALID_ADAM, "b1", 1.5),
    (sf_optax.adamw, VALID_ADAM, "b1", 0.0),  # x = (y - (1 - b1) z) / b1 would divide by 0
    (sf_optax.adamw, VALID_ADAM, "b1", -0.5),
    (sf_optax.adamw, VALID_ADAM, "b2", 1.0),
    (sf_optax.adamw, VALID_ADAM, "b2", -0.5),
    (sf_optax.adamw, VALID_ADAM, "eps", -1.0),
    (sf_optax.adamw, VALID_ADAM, "weight_decay", -0.5),
    (sf_optax.adamw, {**VALID_ADAM, "r": 0.5}, "r", -1.0),
    (sf_optax.adamw, {**VALID_ADAM, "weight_lr_power": 2.0}, "weight_lr_power", -2.0),
    (sf_optax.adamw, {**VALID_ADAM, "warmup_steps": 2.0}, "warmup_steps", -1.0),
    (sf_optax.adamw, {**VALID_ADAM, "warmup_steps": 2.0}, "warmup_steps", 2.5),
    (sf_optax.sgd, VALID, "learning_rate", -1.0),
    (sf_optax.sgd, VALID, "b1", 2.0),
    (sf_optax.sgd, VALID, "weight_decay", -1.0),
    # RAdam's first steps have rect = 0, where -1 * rect is -0.0: still refused.
    (sf_optax.radam, VALID_ADAM, "learning_rate", -1.0),
    (sf_optax.radam, VALID_ADAM, "b2", 1.0),
]
TRACED_IDS = [f"{f.__name__}-{name}={value}" for f, _, name, value in TRACED_BAD]


def _injected(factory, hyper, name, value):
    """An inject_hyperparams optimizer whose ``name`` is set to ``value`` in its state, as a
    training loop would change it, and the jitted update (the values are tracers there)."""
    tx = optax.inject_hyperparams(factory)(**hyper)
    state = tx.init(PARAMS)
    dtype = state.hyperparams[name].dtype
    state.hyperparams[name] = jnp.asarray(value, dtype)
    return tx, state


def _all_nan(tree):
    return all(bool(jnp.all(jnp.isnan(leaf))) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("factory,hyper,name,value", TRACED_BAD, ids=TRACED_IDS)
def test_traced_out_of_range_hyperparameter_makes_the_step_nan(factory, hyper, name, value):
    tx, state = _injected(factory, hyper, name, value)
    updates, new_state = jax.jit(tx.update)(GRADS, state, PARAMS)
    assert _all_nan(updates)  # never a finite step, gradient ascent included
    sf = sf_optax.find_state(new_state)
    assert _all_nan(sf.z) and _all_nan(sf.lr_max)


def test_apply_if_finite_checks_the_gradients_not_the_updates():
    """What the docstrings say: optax.apply_if_finite around the optimizer does not catch a bad
    traced hyperparameter (it looks at the finite gradients); the NaN updates show it."""
    tx = optax.apply_if_finite(optax.inject_hyperparams(sf_optax.adamw)(**VALID_ADAM), 3)
    state = tx.init(PARAMS)
    state.inner_state.hyperparams["learning_rate"] = jnp.asarray(-1.0)
    updates, new_state = jax.jit(tx.update)(GRADS, state, PARAMS)
    assert int(new_state.notfinite_count) == 0
    assert _all_nan(updates)


@pytest.mark.parametrize(
    "factory,hyper,name,value",
    [TRACED_BAD[0], TRACED_BAD[2], TRACED_BAD[8]],  # learning_rate -1, b1 1.5, weight_decay -0.5
    ids=[TRACED_IDS[0], TRACED_IDS[2], TRACED_IDS[8]],
)
def test_keeping_the_previous_step_where_updates_are_not_finite_skips_it(
    factory, hyper, name, value
):
    """The way the docstrings give to skip such a step: keep params and state where the updates
    are not finite. Nothing changes, and once the value is back in range training goes on as if
    the bad step had never been."""
    tx = optax.inject_hyperparams(factory)(**hyper)

    @jax.jit
    def step(params, state):
        updates, new_state = tx.update(GRADS, state, params)
        finite = jnp.all(jnp.asarray([jnp.isfinite(u).all() for u in jax.tree.leaves(updates)]))
        new = (optax.apply_updates(params, updates), new_state)
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, (params, state))

    state = tx.init(PARAMS)
    good = dict(state.hyperparams)
    state.hyperparams[name] = jnp.asarray(value, jnp.float32)
    params, skipped = step(PARAMS, state)
    for a, b in zip(jax.tree.leaves((PARAMS, state)), jax.tree.leaves((params, skipped))):
        np.testing.assert_array_equal(a, b)

    skipped.hyperparams.update(good)
    state.hyperparams.update(good)
    for a, b in zip(jax.tree.leaves(step(params, skipped)), jax.tree.leaves(step(PARAMS, state))):
        np.testing.assert_array_equal(a, b)


def test_traced_learning_rate_passed_in_makes_the_step_nan():
    @jax.jit
    def update(learning_rate, b1):
        tx = sf_optax.sgd(learning_rate, b1=b1)
        return tx.update(GRADS, tx.init(PARAMS), PARAMS)[0]

    assert _all_nan(update(-1.0, 0.9))
    assert _all_nan(update(0.1, 1.5))
    updates = update(0.1, 0.9)
    assert not any(bool(jnp.any(jnp.isnan(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("jit", [False, True])
def test_schedule_with_a_negative_value_makes_the_step_nan(jit):
    schedule = optax.linear_schedule(0.1, -0.1, 4)  # 0.1, 0.05, 0.0, -0.05, ...
    tx = sf_optax.adamw(schedule)
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(PARAMS)
    for _ in range(3):
        updates, state = update(GRADS, state, PARAMS)
        assert not any(bool(jnp.any(jnp.isnan(u))) for u in jax.tree.leaves(updates))
    updates, state = update(GRADS, state, PARAMS)
    assert _all_nan(updates)


def test_traced_boundary_values_are_valid():
    hyper = {**VALID_ADAM, "warmup_steps": 0.0, "r": 0.0, "weight_lr_power": 0.0}
    boundary = {"learning_rate": 0.0, "b1": 1.0, "b2": 0.0, "eps": 0.0, "weight_decay": 0.0}
    tx = optax.inject_hyperparams(sf_optax.adamw)(**hyper)
    state = tx.init(PARAMS)
    state.hyperparams.update({k: jnp.asarray(v, jnp.float32) for k, v in boundary.items()})
    updates, _ = jax.jit(tx.update)(GRADS, state, PARAMS)
    assert not any(bool(jnp.any(jnp.isnan(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize(
    "factory,hyper",
    [
        (sf_optax.adamw, {**VALID_ADAM, "warmup_steps": 3, "r": 0.5, "weight_lr_power": 1.5}),
        (sf_optax.sgd, {**VALID, "warmup_steps": 2}),
        (sf_optax.radam, {**VALID_ADAM, "b2": 0.9}),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_the_check_does_not_change_valid_numbers(monkeypatch, factory, hyper):
    """Bit for bit the same numbers as the program without the check (every condition made a
    Python True, so that no ``jnp.where`` is built); the numbers themselves are checked
    against the references in test_optax_reference.py."""
    import sf_optax.alias
    import sf_optax.transform

    schedule = optax.cosine_decay_schedule(hyper["learning_rate"], 10)

    def run():
        out = []
        for tx in (
            optax.inject_hyperparams(factory)(**hyper),
            factory(**{**hyper, "learning_rate": schedule}),
        ):
            params, state = PARAMS, tx.init(PARAMS)

            @jax.jit
            def step(params, state, tx=tx):
                grads = jax.tree.map(lambda p, g: jnp.sin(p) + g, params, GRADS)
                updates, state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), state

            for _ in range(8):
                params, state = step(params, state)
                out += jax.tree.leaves((params, state))
        return out

    checked = run()
    for module in (sf_optax.transform, sf_optax.alias):  # every check now passes untraced
        monkeypatch.setattr(module, "all_valid", lambda *conditions: True)
    unchecked = run()
    assert len(checked) == len(unchecked)
    for a, b in zip(checked, unchecked):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- The base of schedule_free must be momentum-free ----------------------------------------------

MOMENTUM_BASES = {
    "adam": lambda: optax.adam(1.0),
    "adamw": lambda: optax.adamw(1.0),
    "scale_by_adam_b1_0": lambda: optax.scale_by_adam(b1=0.0),  # still keeps mu: refused
    "sgd_momentum": lambda: optax.sgd(1.0, momentum=0.9),
    "sgd_nesterov": lambda: optax.sgd(1.0, momentum=0.9, nesterov=True),
    "lion": lambda: optax.lion(1.0),
    "chain_trace": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.trace(0.9)),
    "masked_trace": lambda: optax.masked(optax.trace(0.9), {"w": True, "b": False}),
    "rmsprop_momentum": lambda: optax.rmsprop(1.0, momentum=0.9),
    "adabelief": lambda: optax.adabelief(1.0),
    "amsgrad": lambda: optax.amsgrad(1.0),
    "novograd": lambda: optax.novograd(1.0),
    "injected_adam": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1.0),
    "schedule_free_inside": lambda: sf_optax.sgd(1.0),
    "contrib_schedule_free_inside": lambda: optax.contrib.schedule_free(optax.sgd(1.0), 1.0),
}

MOMENTUM_FREE_BASES = {
    "scale_by_rms": lambda: optax.scale_by_rms(),
    "sgd": lambda: optax.sgd(1.0),  # momentum=None: no trace
    "identity": lambda: optax.identity(),
    "scale_by_second_moment": lambda: sf_optax.scale_by_second_moment(),
    "chain_clip_rms": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_rms()),
    "rmsprop_centered": lambda: optax.rmsprop(1.0, centered=True),  # mu centres, no momentum
    "adafactor": lambda: optax.adafactor(1.0),
    "injected_rms": lambda: optax.inject_hyperparams(optax.scale_by_rms)(decay=0.9),
}


@pytest.mark.parametrize("make", MOMENTUM_BASES.values(), ids=MOMENTUM_BASES.keys())
def test_base_with_momentum_is_refused(make):
    tx = sf_optax.schedule_free(make(), 0.1)
    with pytest.raises(ValueError, match=r"^base must be a momentum-free direction") as info:
        tx.init(PARAMS)
    assert "sf_optax.scale_by_second_moment" in str(info.value)  # what to pass instead
    assert "optax.identity()" in str(info.value)


def test_refusal_names_the_buffer():
    with pytest.raises(ValueError, match=r"ScaleByAdamState\.mu"):
        sf_optax.schedule_free(optax.adam(1.0), 0.1).init(PARAMS)
    with pytest.raises(ValueError, match=r"TraceState\.trace"):
        sf_optax.schedule_free(optax.sgd(1.0, momentum=0.9), 0.1).init(PARAMS)


@pytest.mark.parametrize("make", MOMENTUM_FREE_BASES.values(), ids=MOMENTUM_FREE_BASES.keys())
def test_momentum_free_bases_are_accepted(make):
    tx = sf_optax.schedule_free(make(), 0.1)
    updates, _ = jax.jit(tx.update)(GRADS, tx.init(PARAMS), PARAMS)
    assert not any(bool(jnp.any(jnp.isnan(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("factory", ALIASES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("extra", [{}, {"pack_small_leaves": 4}, {"exact_x": True}], ids=repr)
def test_the_aliases_bases_are_accepted(factory, extra):
    tx = factory(weight_decay=0.01, mask={"w": True, "b": False}, **extra)
    jax.jit(tx.update)(GRADS, tx.init(PARAMS), PARAMS)
