"""LoRA linear layers, the value head and the trainable-parameter filter.

The policy of the paper (SPEC.md section 6) is a frozen base model with
LoRA adapters on every linear layer (Hu et al., 2021) and a scalar value head
(TRL ``AutoModelForCausalLMWithValueHead``). Only the adapters and the value
head are trained, so they are stored as their own ``nnx.Variable`` types and
selected by the filter ``TRAINABLE``::

    graphdef, trainable, frozen = nnx.split(policy, TRAINABLE, ...)

A LoRA linear computes (PEFT semantics, ``peft.tuners.lora.layer.Linear``)::

    y = x W + (dropout(x) A B) * alpha / r

with ``W`` [I, O] the frozen base kernel, ``A`` [I, r] and ``B`` [r, O] the
float32 factors. ``B`` starts at zero, so a fresh adapter leaves the base
model's outputs unchanged; ``A`` starts like PEFT's default
(``kaiming_uniform_(a=sqrt(5))``, i.e. uniform in +-1/sqrt(I)).

Module constructors only declare variables (zero placeholders, cheap under
``nnx.eval_shape``); values come from ``init_trainable`` (adapters, value
head) and from a checkpoint or ``policy.random_base_state`` (frozen base).

Layers are stored stacked over the L (layer) axis by the model that owns them
(see ``decoder.py``), so every parameter here may carry leading axes; the layer
code itself only ever sees one layer's slice.

Randomness is explicit data: dropout takes a ``jax.Array`` key (``None``
means no dropout), so the same code runs under ``jax.vmap`` over learners.

Axis legend: I input features, O output features, R LoRA rank, D model dim,
L layers.
"""

import dataclasses
import math
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moraljax import validation

# Every linear layer of a decoder layer, in PEFT's short names. The
# position in this tuple is also the id folded into a layer's dropout key.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

# Flax's own LoRA parameter type: tools that know nnx.LoRAParam (and PEFT
# exporters written against it) see the factors for what they are.
LoRAParam = nnx.LoRAParam


# Name of every projection's output (the layer's result in the compute
# dtype): what the "dots" rematerialisation policy keeps (decoder.py).
PROJECTION_OUTPUT = "projection_output"


class ValueHeadParam(nnx.Param):
    """Parameters of the value head: trained together with the LoRA factors."""


# The filter that selects everything the optimiser updates.
TRAINABLE = nnx.Any(LoRAParam, ValueHeadParam)

# Names of the trainable leaves; ``init_trainable`` dispatches on them.
LORA_A_NAME = "lora_a"
LORA_B_NAME = "lora_b"
VALUE_KERNEL_NAME = "kernel"
VALUE_BIAS_NAME = "bias"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which linear layers get adapters, and how large they are.

    Attributes:
        rank: r, the inner dimension of the factors (paper: 64).
        alpha: the LoRA alpha; the adapter output is scaled by alpha / rank
            (paper: 32, so scale 0.5).
        dropout: dropout rate on the adapter input, in [0, 1) (paper: 0.05).
        targets: short names of the adapted layers, a non-empty subset of
            ``LORA_TARGETS`` (paper: all seven).
    """

    rank: int = 64
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        validation.check_number("lora.rank", self.rank, low=1, integer=True)
        validation.check_positive("lora.alpha", self.alpha)
        validation.check_number("lora.dropout", self.dropout, low=0, high=1, high_open=True)
        if not isinstance(self.targets, tuple):  # A frozen config holds tuples (configs give lists as tuples).
            validation.fail("lora.targets", self.targets, "a tuple of names from " + ", ".join(LORA_TARGETS))
        validation.check_names("lora.targets", self.targets, LORA_TARGETS, empty_ok=False)

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on the adapter output (PEFT, no rsLoRA)."""
        return self.alpha / self.rank


# Rows of the identity product in ``compute_once``.
_COMPUTE_ONCE_WIDTH = 16


def compute_once(x: jax.Array) -> jax.Array:
    """``x`` itself, computed once and then read from memory by all its users.

    XLA:CPU fuses cheap-looking elementwise producers (cos/sin, a cipher's
    integer rounds) into every consumer and re-evaluates them there, per
    consumer element; ``lax.optimization_barrier`` is expanded away before
    fusion on CPU. A dot is never fused into its consumers, so a product with
    the exact identity (x * 1 + 0 + ... = x, bit for bit, for finite values)
    pins ``x`` in memory for 16 multiply-adds per element.

    Args:
        x: float array of finite values. Sizes that are not a multiple of 16
            are returned as they are.

    Returns:
        ``x``, bit for bit.
    """
    if x.size % _COMPUTE_ONCE_WIDTH:
        return x
    identity = jnp.eye(_COMPUTE_ONCE_WIDTH, dtype=x.dtype)
    rows = x.reshape(-1, _COMPUTE_ONCE_WIDTH)
    return jnp.matmul(rows, identity, precision=jax.lax.Precision.HIGHEST).reshape(x.shape)


# Threefry-2x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
# SC 2011), 20 rounds: the rotation distances of the even and odd groups of
# four rounds, and the key-schedule parity constant.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = 0x1BD11BDA


def _threefry2x32(key0: jax.Array, key1: jax.Array, count0: jax.Array, count1: jax.Array):
    """The Threefry-2x32 block cipher on uint32 counter pairs, fully unrolled.

    Same function as JAX's ``threefry2x32`` primitive. XLA:CPU lowers that
    primitive to a 5-trip while loop that writes both words to memory on
    every trip; written out as 20 plain rounds it becomes one elementwise
    fusion, about 5x faster for dropout-sized arrays.
    """

    def rotate_left(value, distance):
        return (value << jnp.uint32(distance)) | (value >> jnp.uint32(32 - distance))

    schedule = (key0, key1, key0 ^ key1 ^ jnp.uint32(_THREEFRY_PARITY))
    x0, x1 = count0 + schedule[0], count1 + schedule[1]
    for group in range(5):
        for distance in _THREEFRY_ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = rotate_left(x1, distance) ^ x0
        x0 = x0 + schedule[(group + 1) % 3]
        x1 = x1 + schedule[(group + 2) % 3] + jnp.uint32(group + 1)
    return x0, x1


def _raw_threefry_key(key: jax.Array) -> jax.Array | None:
    """uint32 [2] data of a threefry key (typed or raw), else None."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        key = jax.random.key_data(key)
    elif jax.config.jax_default_prng_impl != "threefry2x32":
        return None
    return key if key.shape == (2,) and key.dtype == jnp.uint32 else None


def bernoulli(
    key: jax.Array, p: float, shape: tuple[int, ...], *, suffix_of: int | None = None
) -> jax.Array:
    """``jax.random.bernoulli(key, p, shape)``, bit for bit, computed faster on CPU.

    For a threefry key (JAX's default) under ``jax_threefry_partitionable``
    (the default since JAX 0.5), the entry at flat index i is
    ``u_i < p`` with ``u_i = ((b0 ^ b1) >> 9) * 2^-23`` and
    ``(b0, b1) = threefry2x32(key, (0, i))``; this function computes exactly
    that with the unrolled ``_threefry2x32``. Any other key type, or more
    than 2^32 entries, goes to ``jax.random.bernoulli`` itself.
    tests/lora_test.py checks the equality.

    Args:
        key: PRNG key (typed or raw uint32 [2]).
        p: static probability of True.
        shape: static output shape [..., n, d].
        suffix_of: static; when given, the result is the last n rows (axis
            -2) of the draw for shape [..., suffix_of, d], computed without
            drawing the rest (the counter-based generator evaluates any
            subset of indices).

    Returns:
        bool ``shape``.
    """
    if suffix_of is not None and (len(shape) < 2 or suffix_of < shape[-2]):
        raise ValueError(f"bernoulli: suffix_of={suffix_of} needs a shape [..., n <= suffix_of, d], got {shape}.")
    raw = _raw_threefry_key(key)
    full_shape = shape if suffix_of is None else (*shape[:-2], suffix_of, shape[-1])
    if raw is None or not jax.config.jax_threefry_partitionable or math.prod(full_shape) >= 2**32:
        full = jax.random.bernoulli(key, p, full_shape)
        return full if full_shape == shape else full[..., suffix_of - shape[-2] :, :]
    if len(shape) >= 2:
        full_length = full_shape[-2]
        lead, rows, width = math.prod(shape[:-2]), shape[-2], shape[-1]
        lead_index = jax.lax.broadcasted_iota(jnp.uint32, (lead, rows, width), 0)
        row_index = jax.lax.broadcasted_iota(jnp.uint32, (lead, rows, width), 1) + jnp.uint32(full_length - rows)
        column = jax.lax.broadcasted_iota(jnp.uint32, (lead, rows, width), 2)
        counts = ((lead_index * jnp.uint32(full_length) + row_index) * jnp.uint32(width) + column).reshape(shape)
    else:
        counts = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    bits0, bits1 = _threefry2x32(raw[0], raw[1], jnp.zeros_like(counts), counts)
    # The top 23 bits as the mantissa of a float in [1, 2), minus 1: exactly
    # jax.random.uniform's construction.
    one_to_two = jax.lax.bitcast_convert_type(((bits0 ^ bits1) >> jnp.uint32(9)) | jnp.uint32(0x3F800000), jnp.float32)
    return one_to_two - jnp.float32(1.0) < jnp.float32(p)


def dropout(x: jax.Array, rate: float, key: jax.Array | None, *, suffix_of: int | None = None) -> jax.Array:
    """Inverted dropout: zero each entry with probability ``rate``, scale by 1/(1-rate).

    The kept entries are ``jax.random.bernoulli(key, 1 - rate, x.shape)``
    (computed by ``bernoulli``).

    Args:
        x: any array.
        rate: static drop probability in [0, 1).
        key: PRNG key, or None for the identity (evaluation).
        suffix_of: static; ``x`` [..., n, d] holds the last n positions of a
            length-``suffix_of`` sequence, and gets the matching rows of that
            sequence's mask (see ``bernoulli``).

    Returns:
        Array like ``x``.
    """
    if key is None or rate == 0.0:
        return x
    keep = bernoulli(key, 1.0 - rate, x.shape, suffix_of=suffix_of)
    # The mask is read again by the backward pass: keep it rather than
    # have XLA re-run the 20 cipher rounds there (see ``compute_once``).
    keep = compute_once(keep.astype(jnp.float32)) > 0
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class LoRALinear(nnx.Module):
    """A linear layer (bias optional) with an optional LoRA adapter.

    Attributes:
        kernel: frozen base weight, ``nnx.Param`` [..., I, O] in the param dtype.
        bias: frozen base bias, ``nnx.Param`` [..., O], present with ``use_bias``.
        lora_a: ``LoRAParam`` [..., I, R] float32, present when adapted.
        lora_b: ``LoRAParam`` [..., R, O] float32, zeros at init.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        target: str,
        lora: LoraConfig | None,
        param_dtype: jnp.dtype,
        stack: tuple[int, ...] = (),
        use_bias: bool = False,
    ):
        """Declares the layer's variables (zero placeholders, see the module doc).

        Args:
            in_features: I.
            out_features: O.
            target: this layer's short name in ``LORA_TARGETS``.
            lora: adapter settings; the layer is adapted when ``target`` is in
                ``lora.targets``. None builds a plain linear layer.
            param_dtype: dtype of the frozen kernel (bfloat16 or float32).
            stack: leading axes (e.g. (L,)) when the owner stores layers stacked.
            use_bias: give the base layer a (frozen) bias, as Qwen2.5's q, k
                and v projections have.

        Raises:
            ValueError: if ``target`` is not one of ``LORA_TARGETS``.
        """
        if target not in LORA_TARGETS:
            raise ValueError(f"LoRALinear target must be one of {LORA_TARGETS}, got {target!r}.")
        self.target_id = LORA_TARGETS.index(target)
        self.kernel = nnx.Param(jnp.zeros((*stack, in_features, out_features), param_dtype))
        if use_bias:
            self.bias = nnx.Param(jnp.zeros((*stack, out_features), param_dtype))
        self.use_bias = use_bias
        self.adapted = lora is not None and target in lora.targets
        if self.adapted:
            self.scale = lora.scale
            self.dropout_rate = float(lora.dropout)
            self.lora_a = LoRAParam(jnp.zeros((*stack, in_features, lora.rank), jnp.float32))
            self.lora_b = LoRAParam(jnp.zeros((*stack, lora.rank, out_features), jnp.float32))

    def __call__(
        self,
        x: jax.Array,
        *,
        lora_enabled: bool,
        dropout_key: jax.Array | None,
        suffix_of: int | None = None,
    ) -> jax.Array:
        """Applies the layer.

        Args:
            x: [..., I] in the compute dtype (the kernel's dtype).
            lora_enabled: static; False gives the base layer (the reference model).
            dropout_key: the calling decoder layer's key (this layer folds in its
                own target id), or None for no dropout.
            suffix_of: static; ``x`` [B, n, I] is the last n positions of a
                length-``suffix_of`` input, and its dropout mask is the matching
                rows of that input's (so the outputs equal those rows of the
                full computation). None: ``x`` is the whole input.

        Returns:
            [..., O] in the dtype of ``x``.
        """
        # Matmuls run on a 2-D [M, I] view of x (M = all leading axes). On XLA:CPU
        # the backward pass of a dot contracting several leading axes (as
        # [B, T, I] @ [I, O] gives for the factor gradients) transposes its
        # large [B, T, O] cotangent inside an elementwise fusion, which costs
        # ~10x the matmul itself; the 2-D form keeps every gradient dot in
        # row-major layout. The values are the same.
        lead = x.shape[:-1]
        kernel = self.kernel[...]
        x2 = x.reshape(-1, x.shape[-1])
        # Accumulated in float32 and rounded once to the compute dtype, which is
        # what a bfloat16 matmul does anyway (up to summation order); asking
        # for the float32 result lets XLA:CPU use its fast bfloat16 kernels
        # (1.4-4x faster than its bfloat16-output path on an AVX512-BF16 Xeon).
        y = jnp.matmul(x2, kernel, preferred_element_type=jnp.float32)
        if self.use_bias:
            # Added before the one rounding, as a fused addmm does.
            y = y + self.bias[...].astype(jnp.float32)
        y = y.astype(x.dtype)
        if not (self.adapted and lora_enabled):
            return checkpoint_name(y, PROJECTION_OUTPUT).reshape(*lead, kernel.shape[-1])
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, self.target_id)
        if x.dtype == jnp.float32:
            x_lora = dropout(x, self.dropout_rate, key, suffix_of=suffix_of).reshape(x2.shape)
            delta = (x_lora @ self.lora_a[...]) @ self.lora_b[...]
        else:
            # A bfloat16 base: the adapter's input stays bfloat16 and A is
            # rounded to it for the first matmul, accumulated in float32. What
            # the backward pass keeps of each of the seven adapted inputs is
            # then bfloat16, half of PEFT's float32 upcast. The price: A's
            # gradient passes through that rounding (bfloat16 precision, a
            # relative 2^-8, before it reaches the float32 factor and Adam);
            # B's gradient and both factors stay float32.
            x_lora = dropout(x, self.dropout_rate, key, suffix_of=suffix_of).reshape(x2.shape)
            down = jnp.matmul(x_lora, self.lora_a[...].astype(x.dtype), preferred_element_type=jnp.float32)
            delta = down @ self.lora_b[...]
        out = (y.astype(jnp.float32) + self.scale * delta).astype(y.dtype)
        return checkpoint_name(out, PROJECTION_OUTPUT).reshape(*lead, kernel.shape[-1])


class ValueHead(nnx.Module):
    """TRL's ValueHead: dropout, then Linear(D -> 1) with bias, in float32.

    Attributes:
        kernel: ``ValueHeadParam`` [D, 1] float32.
        bias: ``ValueHeadParam`` [1] float32.
        dropout_rate: TRL's ``summary_dropout_prob`` (default 0.1).
    """

    def __init__(self, hidden_size: int, *, dropout_rate: float):
        """Declares the head (zero placeholders; ``init_trainable`` sets values).

        Args:
            hidden_size: D.
            dropout_rate: dropout on the head's input, in [0, 1).

        Raises:
            ValueError: if ``dropout_rate`` is outside [0, 1).
        """
        validation.check_number("model.value_head_dropout", dropout_rate, low=0, high=1, high_open=True)
        self.dropout_rate = float(dropout_rate)
        self.kernel = ValueHeadParam(jnp.zeros((hidden_size, 1), jnp.float32))
        self.bias = ValueHeadParam(jnp.zeros((1,), jnp.float32))

    def __call__(self, hidden: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """Values of hidden states.

        Args:
            hidden: [..., D] final-normed hidden states.
            dropout_key: PRNG key for the input dropout, or None for none.

        Returns:
            [...] float32 values.
        """
        x = dropout(hidden.astype(jnp.float32), self.dropout_rate, dropout_key)
        return (x @ self.kernel[...] + self.bias[...])[..., 0]


def init_trainable(template: nnx.Module | nnx.State, key: jax.Array) -> nnx.State:
    """Fresh LoRA factors and value head for a new seed, as a trainable state.

    A pure function of ``key`` (only shapes are read from ``template``), so
    ``jax.vmap(lambda k: init_trainable(policy, k))(keys)`` gives a learner
    axis of independent initialisations over one shared frozen base.

    Initial values (PEFT and TRL defaults):
        lora_a [..., I, R]: U(+-1/sqrt(I))  (kaiming_uniform, a=sqrt(5));
        lora_b: zeros, so the adapted model starts equal to the base;
        value head kernel [D, 1] and bias [1]: U(+-1/sqrt(D))  (torch Linear).
    All random leaves are slices of ONE U(-1, 1) draw, taken in the state's
    sorted flat order and scaled by their bound: one random kernel instead of
    one per leaf (each costs about a second of XLA compile time on CPU).

    Args:
        template: a module containing ``TRAINABLE`` variables (e.g. a Policy), or
            its trainable state (arrays or ``jax.ShapeDtypeStruct`` leaves).
        key: PRNG key.

    Returns:
        An ``nnx.State`` with the structure of ``nnx.state(template, TRAINABLE)``.

    Raises:
        ValueError: if a trainable leaf has a name this function cannot
            initialise.
    """
    state = nnx.state(template, TRAINABLE) if isinstance(template, nnx.Module) else template
    flat = list(nnx.to_flat_state(state))
    value_fan_in = {path[:-1]: variable.shape[0] for path, variable in flat if path[-1] == VALUE_KERNEL_NAME}
    bounds = []
    for path, variable in flat:
        name = path[-1]
        if name == LORA_A_NAME:
            bounds.append(1.0 / math.sqrt(variable.shape[-2]))
        elif name == LORA_B_NAME:
            bounds.append(None)
        elif name in (VALUE_KERNEL_NAME, VALUE_BIAS_NAME) and path[:-1] in value_fan_in:
            bounds.append(1.0 / math.sqrt(value_fan_in[path[:-1]]))
        else:
            raise ValueError(f"init_trainable: no initialiser for trainable leaf {'.'.join(map(str, path))}.")
    sizes = [math.prod(v.shape) if b is not None else 0 for (_, v), b in zip(flat, bounds)]
    uniform = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    new_leaves, offset = [], 0
    for (path, variable), bound, size in zip(flat, bounds, sizes):
        if bound is None:
            value = jnp.zeros(variable.shape, jnp.float32)
        else:
            value = bound * uniform[offset : offset + size].reshape(variable.shape)
        offset += size
        new_leaves.append((path, variable.copy(value)))
    return nnx.from_flat_state(new_leaves)
