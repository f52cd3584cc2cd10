"""The architecture of a decoder-only transformer, as one validated description.

Gemma 2, Gemma 3, Llama 3, Qwen2.5 and Qwen3 are one network (``decoder.py``)
under different settings of ``DecoderConfig``; ``families.py`` maps each
family's Hugging Face ``config.json`` onto it. What differs between them:

| setting                    | Gemma 2       | Gemma 3        | Llama 3     | Qwen2.5   | Qwen3     |
|----------------------------|---------------|----------------|-------------|-----------|-----------|
| norms per layer            | 4 (sandwich)  | 4 (sandwich)   | 2 (pre)     | 2 (pre)   | 2 (pre)   |
| RMSNorm weight             | 1 + w         | 1 + w          | w           | w         | w         |
| q/k norms                  | no            | yes            | no          | no        | yes       |
| q/k/v biases               | no            | no             | no          | yes       | no        |
| attention / final softcap  | 50 / 30       | none           | none        | none      | none      |
| layers                     | local, global | 5 local : 1    | global      | global    | global    |
| RoPE                       | one base      | base per type  | llama3 scal.| one base  | one base  |
| MLP activation             | gelu (tanh)   | gelu (tanh)    | silu        | silu      | silu      |
| embeddings x sqrt(D)       | yes           | yes            | no          | no        | no        |
| LM head                    | tied          | tied           | tied/untied | tied/untied | tied/untied |
| query scale                | q_pre_attn^-.5| q_pre_attn^-.5 | H^-1/2      | H^-1/2    | H^-1/2    |

Field names follow transformers' config names where they exist, so a
config.json reads naturally into them.

Axis legend: H head dim, D model dim, L layers.
"""

import dataclasses
import math

from moraljax import validation

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
ACTIVATIONS = ("gelu_pytorch_tanh", "silu")
ROPE_SCALINGS = ("linear", "llama3")


# How each decoder layer may be rematerialised in the backward pass
# (``decoder.Decoder.remat``; "auto" resolves by depth, ``decoder.remat_for``).
REMAT_POLICIES = ("none", "dots", "full")
REMAT_CHOICES = ("auto",) + REMAT_POLICIES

@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A rescaling of RoPE's frequencies (transformers' ``rope_type``).

    ``linear`` divides every inverse frequency by ``factor`` (Gemma 3's
    global layers in its larger models). ``llama3`` (Llama 3.1 onwards)
    keeps the high frequencies, divides the low ones by ``factor`` and
    interpolates in between, by wavelength against
    ``original_max_position_embeddings / {high,low}_freq_factor``.

    Attributes:
        rope_type: "linear" or "llama3".
        factor: the division of the (low) frequencies.
        low_freq_factor: llama3 only.
        high_freq_factor: llama3 only (> low_freq_factor).
        original_max_position_embeddings: llama3 only: the pre-training context.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        validation.check_choice("rope_scaling.rope_type", self.rope_type, ROPE_SCALINGS)
        validation.check_positive("rope_scaling.factor", self.factor)
        validation.check_positive("rope_scaling.low_freq_factor", self.low_freq_factor)
        validation.check_positive("rope_scaling.high_freq_factor", self.high_freq_factor)
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            validation.fail(
                "rope_scaling.high_freq_factor", self.high_freq_factor,
                f"a number > rope_scaling.low_freq_factor={self.low_freq_factor}",
            )
        validation.check_positive_int(
            "rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings
        )


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of one decoder; the defaults are google/gemma-2-2b(-it).

    Attributes:
        model_type: the family (transformers' model_type), e.g. "gemma2";
            selects the weight names and the config.json written back.
        vocab_size: V.
        hidden_size: D.
        intermediate_size: F, the MLP width.
        num_hidden_layers: L.
        num_attention_heads: q_heads, the query heads.
        num_key_value_heads: kv_heads, the key/value heads (divides q_heads;
            fewer kv_heads than q_heads is grouped-query attention).
        head_dim: H (even, for RoPE).
        layer_types: per layer "sliding_attention" or "full_attention".
        sliding_window: window (in tokens, the query included) of sliding
            layers; None only when no layer slides.
        rope_theta: RoPE base of full-attention layers (and of sliding ones
            unless ``sliding_rope_theta`` is set).
        rope_scaling: frequency rescaling of the layers using ``rope_theta``
            (None: plain RoPE).
        sliding_rope_theta: RoPE base of sliding layers, which then use plain
            RoPE (Gemma 3's local base); None: as full layers.
        rms_norm_eps: epsilon of every RMSNorm.
        norm_offset: the RMSNorm weight is ``norm_offset + w`` (Gemma: 1.0,
            weights stored zero-centred and applied in float32; others: 0.0,
            weights applied in the compute dtype, as transformers does).
        post_norms: Gemma's sandwich: norms after attention and after the
            MLP too, before the residual add; False is pre-norm only.
        qk_norm: RMSNorm over H of every query and key head, before RoPE.
        qkv_bias: biases on the q, k and v projections (Qwen2.5).
        hidden_activation: MLP gate activation, "gelu_pytorch_tanh" or "silu".
        tie_word_embeddings: the LM head is the embedding table; False gives
            the model its own ``lm_head``.
        scale_embeddings: multiply embeddings by sqrt(D) (Gemma).
        query_pre_attn_scalar: queries are scaled by its -1/2 power (Gemma's
            name; H for the other families).
        attn_logit_softcapping: attention-logit cap (None: no cap).
        final_logit_softcapping: output-logit cap (None: no cap).
        max_position_embeddings: informational (RoPE has no table).
        pad_token_id, bos_token_id, eos_token_id: special token ids.
    """

    model_type: str = "gemma2"
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    layer_types: tuple[str, ...] = tuple((SLIDING, FULL) * 13)
    sliding_window: int | None = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_rope_theta: float | None = None
    rms_norm_eps: float = 1e-6
    norm_offset: float = 1.0
    post_norms: bool = True
    qk_norm: bool = False
    qkv_bias: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    scale_embeddings: bool = True
    query_pre_attn_scalar: int | float = 256
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    max_position_embeddings: int = 8192
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1

    def __post_init__(self):
        if not isinstance(self.model_type, str) or not self.model_type:
            validation.fail("model_type", self.model_type, "a non-empty family name such as 'gemma2'")
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings",
        ):
            validation.check_positive_int(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            validation.fail(
                "num_key_value_heads", self.num_key_value_heads,
                f"a divisor of num_attention_heads={self.num_attention_heads}",
            )
        if self.head_dim % 2:
            validation.fail("head_dim", self.head_dim, "an even number (RoPE rotates pairs)")
        self._check_layers()
        self._check_numbers()
        for name in ("post_norms", "qk_norm", "qkv_bias", "tie_word_embeddings", "scale_embeddings"):
            validation.check_bool(name, getattr(self, name))
        validation.check_choice("hidden_activation", self.hidden_activation, ACTIVATIONS)
        if self.norm_offset not in (0.0, 1.0) or isinstance(self.norm_offset, bool):
            validation.fail("norm_offset", self.norm_offset, "0.0 (weight w) or 1.0 (weight 1 + w)")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            validation.fail("rope_scaling", self.rope_scaling, "None or a RopeScaling")

    def _check_layers(self) -> None:
        if not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.num_hidden_layers:
            validation.fail(
                "layer_types", self.layer_types,
                f"a tuple of num_hidden_layers={self.num_hidden_layers} entries from {LAYER_TYPES}",
            )
        for layer_type in self.layer_types:
            validation.check_choice("layer_types entry", layer_type, LAYER_TYPES)
        # A window is needed when a layer slides, and must make sense when given.
        if SLIDING in self.layer_types or self.sliding_window is not None:
            validation.check_positive_int("sliding_window", self.sliding_window)

    def _check_numbers(self) -> None:
        validation.check_positive("rope_theta", self.rope_theta)
        validation.check_positive("rms_norm_eps", self.rms_norm_eps)
        validation.check_positive("query_pre_attn_scalar", self.query_pre_attn_scalar)
        for name in ("sliding_rope_theta", "attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None:
                validation.check_positive(name, value)

    @property
    def is_sliding(self) -> tuple[bool, ...]:
        """Per layer, whether it uses sliding-window attention."""
        return tuple(t == SLIDING for t in self.layer_types)

    @property
    def has_sliding_rope(self) -> bool:
        """Whether sliding layers use other RoPE tables than full layers."""
        return self.sliding_rope_theta is not None and SLIDING in self.layer_types

    @property
    def query_scale(self) -> float:
        """The factor on q . k."""
        return self.query_pre_attn_scalar**-0.5

    @property
    def embedding_scale(self) -> float | None:
        """sqrt(D) when embeddings are scaled, else None."""
        return math.sqrt(self.hidden_size) if self.scale_embeddings else None

    def matmul_parameters(self) -> tuple[int, int]:
        """(parameters of the layers' weight matmuls, of the LM head): 2 x these is the FLOPs per token."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        n, k = self.num_attention_heads, self.num_key_value_heads
        per_layer = d * (n + 2 * k) * h + n * h * d + 3 * d * f
        return self.num_hidden_layers * per_layer, self.vocab_size * d

    @classmethod
    def gemma2_2b(cls) -> "DecoderConfig":
        """google/gemma-2-2b(-it) (SPEC.md section 6)."""
        return cls()
