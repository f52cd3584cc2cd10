"""LoRA adapters, the value head and the functional (split/merge/vmap) API."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moraljax.llm import decoder
from moraljax.llm import lora
from moraljax.llm import policy as policy_lib

CONFIG = decoder.DecoderConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    layer_types=("sliding_attention", "full_attention"),
    sliding_window=4,
    query_pre_attn_scalar=8,
)
LORA = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.25)


def _randomise_b(trainable, key, scale=0.3):
    """Non-zero B factors (fresh adapters are exact no-ops); one normal draw."""
    flat = list(nnx.to_flat_state(trainable))
    sizes = [math.prod(v.shape) if p[-1] == lora.LORA_B_NAME else 0 for p, v in flat]
    noise = scale * jax.random.normal(key, (sum(sizes),))
    leaves, offset = [], 0
    for (path, variable), size in zip(flat, sizes):
        if size:
            variable = variable.copy(noise[offset : offset + size].reshape(variable.shape))
        offset += size
        leaves.append((path, variable))
    return nnx.from_flat_state(leaves)


_randomise_b_jit = jax.jit(_randomise_b)


@pytest.fixture(scope="module")
def parts():
    policy = policy_lib.init_policy(CONFIG, lora=LORA, value_head_dropout=0.5, key=jax.random.key(0))
    return policy_lib.split_policy(policy)


@pytest.fixture(scope="module")
def batch():
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, CONFIG.vocab_size)
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    return tokens, decoder.positions_from_mask(mask), mask


def _run(graphdef, trainable, frozen, batch, *, lora_enabled=True, dropout_key=None):
    policy = policy_lib.merge_policy(graphdef, trainable, frozen)
    out = policy.forward(*batch, lora_enabled=lora_enabled, dropout_key=dropout_key)
    return policy.logits(out.hidden[:, -3:]), policy.values(out.hidden[:, -3:])


_run_jit = jax.jit(_run, static_argnums=0, static_argnames=("lora_enabled",))


def test_lora_linear_by_hand():
    layer = lora.LoRALinear(
        3, 2, target="q", lora=lora.LoraConfig(rank=2, alpha=6.0, dropout=0.0), param_dtype=jnp.float32
    )
    w = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    a = jnp.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    b = jnp.array([[1.0, 1.0], [0.0, -1.0]])
    layer.kernel[...] = w
    layer.lora_a[...] = a
    layer.lora_b[...] = b
    x = jnp.array([[1.0, 2.0, 3.0]])
    # x W = [4, 5]; x A = [1, 4]; (x A) B = [1, -3]; scale 6 / 2 = 3.
    np.testing.assert_allclose(layer(x, lora_enabled=True, dropout_key=None), [[7.0, -4.0]])
    np.testing.assert_allclose(layer(x, lora_enabled=False, dropout_key=None), [[4.0, 5.0]])


def test_lora_dropout_acts_on_the_adapter_input_only():
    config = lora.LoraConfig(rank=2, alpha=2.0, dropout=0.5)
    layer = lora.LoRALinear(64, 1, target="v", lora=config, param_dtype=jnp.float32)
    layer.kernel[...] = jnp.zeros((64, 1))
    layer.lora_a[...] = jnp.eye(64, 2)  # picks x_0 and x_1
    layer.lora_b[...] = jnp.ones((2, 1))
    x = jnp.ones((100, 64))
    y = layer(x, lora_enabled=True, dropout_key=jax.random.key(3))
    # Each of x_0, x_1 is dropped (0) or kept and scaled by 1 / (1 - 0.5) = 2.
    assert set(np.unique(np.asarray(y)).tolist()) <= {0.0, 2.0, 4.0}
    assert len(np.unique(np.asarray(y))) == 3
    np.testing.assert_allclose(layer(x, lora_enabled=True, dropout_key=None), 2.0)


def test_lora_initialisation_like_peft():
    layer = lora.LoRALinear(256, 64, target="up", lora=lora.LoraConfig(rank=32), param_dtype=jnp.bfloat16)
    assert layer.kernel[...].dtype == jnp.bfloat16
    nnx.update(layer, jax.jit(lambda k: lora.init_trainable(layer, k))(jax.random.key(0)))
    a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    bound = 1 / math.sqrt(256)
    assert a.dtype == np.float32 and b.dtype == np.float32
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    np.testing.assert_allclose(a.std(), bound / math.sqrt(3), rtol=0.05)  # uniform(-b, b)
    np.testing.assert_array_equal(b, 0.0)


def test_only_targeted_layers_are_adapted():
    policy = nnx.eval_shape(
        lambda: policy_lib.Policy(CONFIG, lora=lora.LoraConfig(rank=2, targets=("q", "down")), key=jax.random.key(0))
    )
    _, trainable, _ = policy_lib.split_policy(policy)
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert paths == {
        "model.layers.self_attn.q_proj.lora_a",
        "model.layers.self_attn.q_proj.lora_b",
        "model.layers.mlp.down_proj.lora_a",
        "model.layers.mlp.down_proj.lora_b",
        "value_head.bias",
        "value_head.kernel",
    }
    shapes = {".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(trainable)}
    assert shapes["model.layers.self_attn.q_proj.lora_a"] == (2, 32, 2)
    assert shapes["model.layers.mlp.down_proj.lora_b"] == (2, 2, 32)


def test_fresh_adapter_gives_exactly_the_base(parts, batch):
    graphdef, trainable, frozen = parts
    with_lora = _run_jit(graphdef, trainable, frozen, batch)
    without = _run_jit(graphdef, trainable, frozen, batch, lora_enabled=False)
    np.testing.assert_array_equal(with_lora[0], without[0])
    # A policy built without adapters from the same key has the same base.
    base = policy_lib.init_policy(CONFIG, lora=None, value_head_dropout=0.5, key=jax.random.key(0))
    base_graphdef, base_trainable, base_frozen = policy_lib.split_policy(base)
    chex_equal = jax.tree.map(np.array_equal, base_frozen, frozen)
    assert all(jax.tree.leaves(chex_equal))
    np.testing.assert_array_equal(_run_jit(base_graphdef, base_trainable, base_frozen, batch)[0], without[0])


def test_trained_adapter_changes_outputs_and_switches_off(parts, batch):
    graphdef, trainable, frozen = parts
    adapted = _randomise_b_jit(trainable, jax.random.key(5))
    base_logits = _run_jit(graphdef, trainable, frozen, batch, lora_enabled=False)[0]
    on = _run_jit(graphdef, adapted, frozen, batch)[0]
    off = _run_jit(graphdef, adapted, frozen, batch, lora_enabled=False)[0]
    assert np.abs(on - base_logits).max() > 1e-3
    np.testing.assert_array_equal(off, base_logits)


def test_gradients_reach_only_lora_and_value_head(parts, batch):
    graphdef, trainable, frozen = parts
    adapted = _randomise_b_jit(trainable, jax.random.key(6))

    def loss(trainable_state):
        logits, values = _run(graphdef, trainable_state, frozen, batch)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3]) + jnp.mean(values**2)

    grads = jax.jit(jax.grad(loss))(adapted)
    flat = nnx.to_flat_state(grads)
    assert {type(v) for _, v in flat} == {lora.LoRAParam, lora.ValueHeadParam}
    assert len(flat) == len(nnx.to_flat_state(trainable))
    for path, variable in flat:
        assert np.abs(np.asarray(variable[...])).max() > 0, path
    # Every frozen leaf is a plain Param (nothing trainable is left in it).
    assert {type(v) for _, v in nnx.to_flat_state(frozen)} == {nnx.Param}


def test_dropout_key_is_explicit(parts, batch):
    graphdef, trainable, frozen = parts
    adapted = _randomise_b_jit(trainable, jax.random.key(7))
    plain = _run_jit(graphdef, adapted, frozen, batch)
    again = _run_jit(graphdef, adapted, frozen, batch, dropout_key=None)
    key = jax.random.key(8)
    dropped = _run_jit(graphdef, adapted, frozen, batch, dropout_key=key)
    dropped_again = _run_jit(graphdef, adapted, frozen, batch, dropout_key=key)
    other = _run_jit(graphdef, adapted, frozen, batch, dropout_key=jax.random.key(9))
    np.testing.assert_array_equal(plain[0], again[0])
    np.testing.assert_array_equal(dropped[0], dropped_again[0])
    assert np.abs(dropped[0] - plain[0]).max() > 1e-4
    assert np.abs(dropped[0] - other[0]).max() > 1e-4
    # With the adapter off, LoRA dropout has nothing to act on.
    base = _run_jit(graphdef, adapted, frozen, batch, lora_enabled=False)
    base_dropped = _run_jit(graphdef, adapted, frozen, batch, lora_enabled=False, dropout_key=key)
    np.testing.assert_array_equal(base[0], base_dropped[0])


def test_value_head_like_trl():
    head = lora.ValueHead(16, dropout_rate=0.5)
    nnx.update(head, jax.jit(lambda k: lora.init_trainable(head, k))(jax.random.key(0)))
    kernel, bias = np.asarray(head.kernel[...]), np.asarray(head.bias[...])
    assert kernel.shape == (16, 1) and bias.shape == (1,)
    assert np.abs(kernel).max() <= 0.25 and np.abs(bias).max() <= 0.25  # 1 / sqrt(16)
    hidden = jax.random.normal(jax.random.key(1), (3, 5, 16), jnp.bfloat16)
    values = head(hidden)
    assert values.shape == (3, 5) and values.dtype == jnp.float32
    expected = np.asarray(hidden, np.float32) @ kernel[:, 0] + bias[0]
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)
    dropped = head(hidden, jax.random.key(2))
    assert np.abs(np.asarray(dropped) - expected).max() > 1e-3
    with pytest.raises(ValueError, match=re.escape("model.value_head_dropout=1.0 is not allowed; expected ")):
        lora.ValueHead(16, dropout_rate=1.0)


def test_vmap_over_learners_equals_loop(parts, batch):
    graphdef, trainable, frozen = parts
    keys = jax.random.split(jax.random.key(10), 3)
    learners = jax.jit(jax.vmap(lambda k: _randomise_b(lora.init_trainable(trainable, k), k)))(keys)
    dropout_keys = jax.random.split(jax.random.key(11), 3)

    def run(t, k):
        return _run(graphdef, t, frozen, batch, dropout_key=k)

    batched = jax.jit(jax.vmap(run))(learners, dropout_keys)
    for i in range(3):
        single = jax.tree.map(lambda x: x[i], learners)
        expected = _run_jit(graphdef, single, frozen, batch, dropout_key=dropout_keys[i])
        np.testing.assert_allclose(batched[0][i], expected[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(batched[1][i], expected[1], rtol=1e-5, atol=1e-5)
    assert np.abs(batched[0][0] - batched[0][1]).max() > 1e-3


def test_init_trainable_is_a_pure_function_of_the_key(parts):
    _, trainable, _ = parts
    keys = jax.random.split(jax.random.key(12), 2)
    init = jax.jit(lora.init_trainable)
    stacked = jax.jit(jax.vmap(lora.init_trainable, in_axes=(None, 0)))(trainable, keys)
    again = init(trainable, keys[1])
    for (path, var), (_, single) in zip(nnx.to_flat_state(stacked), nnx.to_flat_state(again)):
        values = np.asarray(var[...])
        np.testing.assert_array_equal(values[1], single[...])
        if path[-1] == lora.LORA_B_NAME:
            np.testing.assert_array_equal(values, 0.0)
        else:
            assert np.abs(values[0] - values[1]).max() > 0, path
    # Abstract templates work too (the checkpoint loader uses them).
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    from_abstract = jax.jit(lambda k: lora.init_trainable(abstract, k))(keys[1])
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, from_abstract, again)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "lora.rank=0 is not allowed; expected an integer >= 1"),
        (dict(rank=2.0), "lora.rank=2.0 is not allowed; expected an integer >= 1"),
        (dict(alpha=0.0), "lora.alpha=0.0 is not allowed; expected a finite number > 0"),
        (dict(dropout=1.0), "lora.dropout=1.0 is not allowed; expected a finite number in [0, 1)"),
        (dict(targets=()), "lora.targets=() is not allowed; expected a non-empty list of names"),
        (dict(targets=["q"]), "lora.targets=['q'] is not allowed; expected a tuple of names"),
        (
            dict(targets=("q", "lm_head")),
            "lora.targets=('q', 'lm_head') is not allowed; expected names from q, k, v, o, gate, up, down"
            " (unknown: ['lm_head'])",
        ),
        (dict(targets=("q", "q")), "lora.targets=('q', 'q') is not allowed; expected distinct names"),
    ],
)
def test_lora_config_validation(kwargs, message):
    # The project's one format (moraljax.validation), naming the config field.
    with pytest.raises(ValueError) as info:
        lora.LoraConfig(**kwargs)
    assert str(info.value).startswith(message), str(info.value)


def test_paper_defaults():
    config = lora.LoraConfig()
    assert (config.rank, config.alpha, config.dropout, config.scale) == (64, 32.0, 0.05, 0.5)
    assert config.targets == ("q", "k", "v", "o", "gate", "up", "down")


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey, lambda s: jax.random.key(s, impl="rbg")])
def test_bernoulli_is_jax_random_bernoulli_bit_for_bit(make_key):
    key = make_key(11)
    sample = jax.jit(lora.bernoulli, static_argnums=(1, 2), static_argnames="suffix_of")
    for shape, p in [((5, 213, 64), 0.95), ((7,), 0.5), ((), 0.3), ((2, 3, 4, 5), 0.1)]:
        np.testing.assert_array_equal(sample(key, p, shape), jax.random.bernoulli(key, p, shape))
    # A suffix of the rows of a longer draw, without drawing the rest.
    full = jax.random.bernoulli(key, 0.7, (3, 11, 6))
    for rows in (11, 4, 1):
        np.testing.assert_array_equal(sample(key, 0.7, (3, rows, 6), suffix_of=11), full[:, 11 - rows :])
    # Per-learner keys under vmap.
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(4))
    np.testing.assert_array_equal(
        jax.vmap(lambda k: lora.bernoulli(k, 0.9, (6, 8)))(keys),
        jax.vmap(lambda k: jax.random.bernoulli(k, 0.9, (6, 8)))(keys),
    )
    with pytest.raises(ValueError, match="suffix_of"):
        lora.bernoulli(key, 0.5, (3, 4, 2), suffix_of=3)
