"""The PPO actor-critic: the decoder with LoRA adapters and a value head, and its states.

A ``Policy`` is the frozen base (``decoder.Decoder``, ``nnx.Param``
weights) with trainable LoRA factors and a value head (``lora.TRAINABLE``).
``split_policy`` separates the two, so that pure functions of (graphdef,
trainable, frozen) can ``jax.vmap`` over a learner axis of trainable states
that share one frozen base; ``merge_policy`` puts them back together.
``init_policy`` builds a policy with a random base (tests, benchmarks);
``checkpoints.load_hf_model`` one with a checkpoint's base.

Axis legend: B rows of one model call, T tokens, D model width, V vocabulary.
"""

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moraljax.llm import decoder
from moraljax.llm import lora as lora_lib


@flax.struct.dataclass
class ForwardOutput:
    """Result of ``Policy.forward``.

    Attributes:
        hidden: float32 [B, T, D] final-normed hidden states (transformers'
            ``hidden_states[-1]``), input of both the LM head and value head.
        cache: the updated ``decoder.KVCache``, or None when called without one.
    """

    hidden: jax.Array
    cache: decoder.KVCache | None


class LanguageModel(nnx.Module):
    """The decoder alone: the reference model (the base, no adapters), and what ``Policy`` extends.

    Attributes:
        model: the ``decoder.Decoder``.
    """

    def __init__(
        self,
        config: decoder.DecoderConfig,
        *,
        lora: lora_lib.LoraConfig | None = None,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.model = decoder.Decoder(config, lora=lora, param_dtype=param_dtype)

    @property
    def config(self) -> decoder.DecoderConfig:
        return self.model.config

    def forward(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        cache: decoder.KVCache | None = None,
        *,
        lora_enabled: bool = True,
        dropout_key: jax.Array | None = None,
        num_outputs: int | None = None,
    ) -> ForwardOutput:
        """Hidden states of new tokens; see ``decoder.Decoder.__call__`` for the arguments."""
        hidden, cache = self.model(
            tokens,
            positions,
            attention_mask,
            cache,
            lora_enabled=lora_enabled,
            dropout_key=dropout_key,
            num_outputs=num_outputs,
        )
        return ForwardOutput(hidden=hidden, cache=cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 [..., V] softcapped logits of ``hidden`` [..., D]."""
        return self.model.logits(hidden)


class Policy(LanguageModel):
    """The decoder with LoRA adapters and a value head: the PPO actor-critic.

    Attributes:
        model: the ``decoder.Decoder`` (frozen ``nnx.Param`` weights, trainable
            ``LoRAParam`` factors).
        value_head: the ``ValueHead`` (``ValueHeadParam``).
    """

    def __init__(
        self,
        config: decoder.DecoderConfig,
        *,
        lora: lora_lib.LoraConfig | None = lora_lib.LoraConfig(),
        value_head_dropout: float = 0.1,
        param_dtype: jnp.dtype = jnp.float32,
        key: jax.Array,
    ):
        """Builds a policy with fresh adapters and value head and a ZERO base.

        The frozen base comes from ``checkpoints.load_hf_model`` or
        ``random_base_state``; ``init_policy`` does the random case.

        Args:
            config: architecture.
            lora: adapter settings (paper: ``LoraConfig()``), None for none.
            value_head_dropout: TRL's ``summary_dropout_prob`` (default 0.1).
            param_dtype: dtype of the frozen weights.
            key: PRNG key of the trainable parameters (``lora.init_trainable``).
        """
        super().__init__(config, lora=lora, param_dtype=param_dtype)
        self.value_head = lora_lib.ValueHead(config.hidden_size, dropout_rate=value_head_dropout)
        nnx.update(self, lora_lib.init_trainable(self, key))

    def values(self, hidden: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """float32 [...] value-head outputs of ``hidden`` [..., D]."""
        return self.value_head(hidden, dropout_key)


def reference_graphdef(policy: Policy) -> nnx.GraphDef:
    """The graph of ``policy``'s base without adapters or value head: the reference model.

    Its state is exactly the policy's frozen state (``split_policy``), so
    ``merge_reference(graphdef, frozen)`` needs no learner's trainable state.
    It computes what the policy computes with ``lora_enabled=False``.
    """
    abstract = nnx.eval_shape(lambda: LanguageModel(policy.config, param_dtype=policy.model.dtype))
    abstract.model.remat = policy.model.remat
    graphdef, _ = nnx.split(abstract)
    return graphdef


def merge_reference(graphdef: nnx.GraphDef, frozen_state: nnx.State) -> LanguageModel:
    """The reference model from ``reference_graphdef`` and the policy's frozen state."""
    return nnx.merge(graphdef, frozen_state)


# (dotted state path, shape) -> where to put that parameter (None: default device).
ShardingFn = Callable[[str, tuple[int, ...]], jax.sharding.Sharding | None]


def place(host: np.ndarray, path: str, shardings: ShardingFn | None) -> jax.Array:
    """Moves one host parameter to its devices (``shardings(path, shape)``)."""
    sharding = None if shardings is None else shardings(path, tuple(host.shape))
    return jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host)


def random_base_state(
    frozen_template: nnx.State,
    key: jax.Array,
    *,
    shardings: ShardingFn | None = None,
    norm_weight: float = 0.0,
) -> nnx.State:
    """Random frozen weights like transformers' init: N(0, 0.02^2), biases 0, norms neutral.

    Drawn on the host with numpy (seeded by ``key`` and the leaf's index in
    sorted order), one leaf at a time: no XLA compilation per initialiser and
    no device copy beyond the result. For tests and benchmarks; real runs
    load a checkpoint.

    Args:
        frozen_template: the frozen state (arrays or ``ShapeDtypeStruct``s).
        key: concrete PRNG key.
        shardings: optional placement, as in ``checkpoints.load_hf_model``.
        norm_weight: the value of every RMSNorm weight, ``1 - norm_offset``
            so that the norms start as plain RMS normalisation (Gemma's are
            stored zero-centred: 0).

    Returns:
        A state with the template's structure, dtypes and shapes.
    """
    seed = np.asarray(jax.random.key_data(key)).astype(np.uint64).ravel().tolist()
    leaves = []
    for index, (path, variable) in enumerate(nnx.to_flat_state(frozen_template)):
        shape, dtype = tuple(variable.shape), np.dtype(variable.dtype)
        if path[-1] == "scale":
            host = np.full(shape, norm_weight, dtype)
        elif path[-1] == "bias":
            host = np.zeros(shape, dtype)
        else:
            rng = np.random.default_rng([*seed, index])
            host = (0.02 * rng.standard_normal(shape, np.float32)).astype(dtype)
        leaves.append((path, variable.copy(place(host, ".".join(map(str, path)), shardings))))
        del host
    return nnx.from_flat_state(leaves)


def init_policy(
    config: decoder.DecoderConfig,
    *,
    lora: lora_lib.LoraConfig | None = lora_lib.LoraConfig(),
    value_head_dropout: float = 0.1,
    param_dtype: jnp.dtype = jnp.float32,
    key: jax.Array,
    shardings: ShardingFn | None = None,
) -> Policy:
    """A policy with a random base (``random_base_state``) and fresh adapters.

    Built abstractly first, so no zero copy of the base is ever allocated.

    Args:
        config, lora, value_head_dropout, param_dtype: as for ``Policy``.
        key: concrete PRNG key; ``fold_in(key, 0)`` seeds the base and
            ``fold_in(key, 1)`` the trainable parameters. The base does not
            depend on ``lora``, so policies with and without adapters made
            from one key share it.
        shardings: optional placement of the frozen parameters.

    Returns:
        The ``Policy``.
    """
    key_base, key_trainable = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    abstract = nnx.eval_shape(
        lambda: Policy(
            config, lora=lora, value_head_dropout=value_head_dropout, param_dtype=param_dtype, key=key_trainable
        )
    )
    graphdef, trainable_abstract, frozen_abstract = split_policy(abstract)
    frozen = random_base_state(
        frozen_abstract, key_base, shardings=shardings, norm_weight=1.0 - config.norm_offset
    )
    trainable = jax.jit(lambda k: lora_lib.init_trainable(trainable_abstract, k))(key_trainable)
    return merge_policy(graphdef, trainable, frozen)


def split_policy(policy: Policy) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Splits a policy into (graphdef, trainable_state, frozen_state).

    The trainable state holds the LoRA factors and the value head (the
    ``lora.TRAINABLE`` filter); the frozen state holds everything else.
    Functions of these three are pure, so ``jax.vmap`` over a leading learner
    axis of the trainable state with one shared frozen state works.
    """
    graphdef, trainable, frozen = nnx.split(policy, lora_lib.TRAINABLE, ...)
    return graphdef, trainable, frozen


def merge_policy(graphdef: nnx.GraphDef, trainable_state: nnx.State, frozen_state: nnx.State) -> Policy:
    """Inverse of ``split_policy``."""
    return nnx.merge(graphdef, trainable_state, frozen_state)
