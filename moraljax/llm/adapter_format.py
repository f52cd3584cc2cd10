"""What a PEFT adapter directory of moraljax holds, and the names both sides agree on.

The one place that knows the format; ``adapter_export.py`` writes it and
``adapter_load.py`` reads it. A morally fine-tuned agent is the frozen base
model plus its LoRA factors and value head (SPEC.md section 6); as a PEFT LoRA
adapter, ``transformers`` + ``peft`` load it
(``PeftModel.from_pretrained(base, directory)``) and any server that reads
PEFT adapters can serve it.

Files of an adapter directory:

    adapter_config.json        PEFT ``LoraConfig``: peft_type "LORA",
                               task_type "CAUSAL_LM", r, lora_alpha,
                               lora_dropout, target_modules, bias "none".
    adapter_model.safetensors  the float32 factors under PEFT's names.
    value_head.safetensors     the value head under TRL's names (TRL's
                               ``AutoModelForCausalLMWithValueHead`` looks for
                               them in ``model.safetensors`` of the adapter
                               directory; the name here keeps the directory
                               from looking like a full model).
    moraljax_adapter.json      base model name and the base architecture's
                               fingerprint, so that loading refuses an adapter
                               trained on another base.

Tensor mapping, for layer l of moraljax's stacked [L, ...] parameters and
``<m>`` one of ``self_attn.{q,k,v,o}_proj`` or ``mlp.{gate,up,down}_proj``:

    model.layers.<m>.lora_a [L, I, R]  base_model.model.model.layers.{l}.<m>.lora_A.weight [R, I] = lora_a[l]^T
    model.layers.<m>.lora_b [L, R, O]  base_model.model.model.layers.{l}.<m>.lora_B.weight [O, R] = lora_b[l]^T
    value_head.kernel [D, 1]           v_head.summary.weight [1, D] = kernel^T
    value_head.bias [1]                v_head.summary.bias [1]

PEFT's adapted torch ``Linear`` computes ``y = x W^T + (x A^T B^T) alpha/r``
(Hu et al., 2021; ``peft.tuners.lora.layer.Linear``) and moraljax computes
``y = x W + (x a b) alpha/r`` (``lora.LoRALinear``), so ``A = a^T`` and
``B = b^T`` give the same function. The conversion is transposes and copies
only: export followed by load returns bit-identical float32 parameters.

The base architecture's fingerprint is ``sha256`` of the canonical JSON of the
``DecoderConfig`` fields that determine the weights' shapes and the forward
pass (``ARCHITECTURE_FIELDS``, then ``FAMILY_FIELDS`` where they differ from
Gemma 2's, so that adapters exported before the other families existed keep
their fingerprint). Gemma-2-2b and Gemma-2-2b-it share one fingerprint: it
tells architectures apart, and ``base_model_name_or_path`` records which
checkpoint the adapter was trained on. The PEFT module names of the targets
are the base family's (``families.Family.peft_module_names``).

Axis legend: L layers, I input features, O output features, R LoRA rank,
D model width.
"""

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from moraljax.llm import decoder_config
from moraljax.llm import families
from moraljax.llm import lora as lora_lib

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
VALUE_HEAD_FILE = "value_head.safetensors"
METADATA_FILE = "moraljax_adapter.json"
METADATA_FORMAT = "moraljax-peft-adapter"
METADATA_VERSION = 1

# moraljax's short target names -> the transformers module names PEFT matches,
# for an adapter exported without a base config (every supported family uses these).
TARGET_MODULES = dict(families.FAMILIES["gemma2"].peft_module_names)
# moraljax's own module names in the parameter tree are the same names.
_TARGET_OF_MODULE = {module: target for target, module in TARGET_MODULES.items()}

# PeftModelForCausalLM wraps the LoRA model (base_model) around the
# transformers model (model); names below that are the transformers ones.
PEFT_PREFIX = "base_model.model."
VALUE_WEIGHT_NAME = "v_head.summary.weight"
VALUE_BIAS_NAME = "v_head.summary.bias"

# DecoderConfig fields that fix the weights' shapes and the forward pass; token
# ids and max_position_embeddings (informational for RoPE) do not matter.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "layer_types",
    "sliding_window",
    "rope_theta",
    "rms_norm_eps",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
)

# The fields the other families added, recorded only where they differ from
# Gemma 2's (the DecoderConfig defaults), which keeps Gemma 2 fingerprints as
# they were before these fields existed.
FAMILY_FIELDS = (
    "model_type",
    "rope_scaling",
    "sliding_rope_theta",
    "norm_offset",
    "post_norms",
    "qk_norm",
    "qkv_bias",
    "hidden_activation",
    "tie_word_embeddings",
    "scale_embeddings",
)
_GEMMA2_DEFAULTS = decoder_config.DecoderConfig()

_REAL_FIELDS = (
    "rope_theta", "rms_norm_eps", "attn_logit_softcapping", "final_logit_softcapping", "sliding_rope_theta",
    "norm_offset",
)


# ----------------------------------------------------------------------------
# Base architecture fingerprint.


def base_architecture(config: decoder_config.DecoderConfig) -> dict[str, Any]:
    """The ``ARCHITECTURE_FIELDS`` of a config, and its ``FAMILY_FIELDS`` off Gemma 2's, as JSON-ready values.

    Args:
        config: the base model's architecture.

    Returns:
        A dict field -> value (tuples as lists; real-valued fields as floats,
        so that the spelling 50 or 50.0 in a config.json does not matter;
        the RoPE scaling as a dict).
    """
    names = ARCHITECTURE_FIELDS + tuple(
        name for name in FAMILY_FIELDS if getattr(config, name) != getattr(_GEMMA2_DEFAULTS, name)
    )
    architecture = {}
    for name in names:
        value = getattr(config, name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, decoder_config.RopeScaling):
            value = dataclasses.asdict(value)
        elif name in _REAL_FIELDS and value is not None:
            # 50 and 50.0 (as config.json files may spell a cap) must hash alike.
            value = float(value)
        architecture[name] = value
    return architecture


def _fingerprint_of(architecture: Mapping[str, Any]) -> str:
    canonical = json.dumps(architecture, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def base_fingerprint(config: decoder_config.DecoderConfig) -> str:
    """Fingerprint of a base architecture: sha256 of its canonical JSON.

    ``"sha256:" + sha256(json(base_architecture(config), sorted keys))[:16]``.

    Args:
        config: the base model's architecture.

    Returns:
        A string like ``"sha256:0123456789abcdef"``.
    """
    return _fingerprint_of(base_architecture(config))


def architecture_differences(recorded: Mapping[str, Any], config: decoder_config.DecoderConfig) -> list[str]:
    """The fields where an adapter's recorded base architecture differs from ``config``'s.

    Args:
        recorded: the ``base_architecture`` an adapter's metadata holds (a
            family field absent from it is at Gemma 2's value); empty when
            the adapter recorded none.
        config: the architecture of the base the adapter is to run on.

    Returns:
        One "<field>: adapter <value> vs base <value>" per differing field, in
        ``ARCHITECTURE_FIELDS + FAMILY_FIELDS`` order; empty for an empty
        ``recorded``.
    """
    ours = base_architecture(config)
    # A family field absent from a record is at Gemma 2's value.
    defaults = base_architecture(_GEMMA2_DEFAULTS) | {name: getattr(_GEMMA2_DEFAULTS, name) for name in FAMILY_FIELDS}
    return [
        f"{name}: adapter {recorded.get(name, defaults[name])!r} vs base {ours.get(name, defaults[name])!r}"
        for name in ARCHITECTURE_FIELDS + FAMILY_FIELDS
        if recorded and recorded.get(name, defaults[name]) != ours.get(name, defaults[name])
    ]


# ----------------------------------------------------------------------------
# PEFT's names, and the trainable state sorted by role.


def peft_module_names(config: decoder_config.DecoderConfig | None) -> Mapping[str, str]:
    """Target short name -> PEFT module name for the base's family (the common names without a base)."""
    return TARGET_MODULES if config is None else families.family_of(config.model_type).peft_module_names


@dataclasses.dataclass(frozen=True)
class Factor:
    """One LoRA factor leaf: its state path and where it goes in PEFT's file."""

    path: tuple[str, ...]
    target: str  # short name, e.g. "q"
    module_path: str  # e.g. "model.layers.self_attn.q_proj"
    is_a: bool


def dotted_path(path: tuple) -> str:
    """A state path as the dotted name error messages use, e.g. "value_head.kernel"."""
    return ".".join(str(p) for p in path)


def sort_trainable(flat) -> tuple[dict[tuple, Factor], dict[str, tuple]]:
    """Splits flat trainable leaves into LoRA factors and value-head leaves.

    Args:
        flat: ``nnx.to_flat_state`` of a trainable state, as a list of
            (path, variable) pairs.

    Returns:
        (factors by path, value-head paths by leaf name "kernel"/"bias").

    Raises:
        ValueError: for a leaf that is neither.
    """
    factors, value_head = {}, {}
    for path, _ in flat:
        name = path[-1]
        if name in (lora_lib.LORA_A_NAME, lora_lib.LORA_B_NAME):
            module = path[-2] if len(path) >= 2 else None
            if module not in _TARGET_OF_MODULE or tuple(path[:2]) != ("model", "layers"):
                raise ValueError(
                    f"trainable leaf {dotted_path(path)} is a LoRA factor of an unknown layer; "
                    f"allowed: model.layers.<...>.{{{', '.join(_TARGET_OF_MODULE)}}}.lora_a/lora_b."
                )
            factors[path] = Factor(
                path=path,
                target=_TARGET_OF_MODULE[module],
                module_path=dotted_path(path[:-1]),
                is_a=name == lora_lib.LORA_A_NAME,
            )
        elif name in (lora_lib.VALUE_KERNEL_NAME, lora_lib.VALUE_BIAS_NAME) and tuple(path[:-1]) == ("value_head",):
            value_head[name] = path
        else:
            raise ValueError(f"trainable leaf {dotted_path(path)} is neither a LoRA factor nor the value head.")
    return factors, value_head


def targets_in(factors: Mapping[tuple, Factor]) -> tuple[str, ...]:
    """The short names of the adapted layers, in ``lora.LORA_TARGETS`` order."""
    present = {factor.target for factor in factors.values()}
    return tuple(t for t in lora_lib.LORA_TARGETS if t in present)


def _layer_dims(config: decoder_config.DecoderConfig) -> dict[str, tuple[int, int]]:
    """(I, O) of every adaptable linear layer of one decoder layer."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}


def expected_factor_shape(factor: Factor, config: decoder_config.DecoderConfig, rank: int) -> tuple[int, int, int]:
    """The [L, I, R] (factor A) or [L, R, O] (factor B) shape ``config`` and ``rank`` give a factor."""
    in_features, out_features = _layer_dims(config)[factor.target]
    if factor.is_a:
        return (config.num_hidden_layers, in_features, rank)
    return (config.num_hidden_layers, rank, out_features)


def peft_tensor_name(module_path: str, layer: int, is_a: bool) -> str:
    """PEFT's name of one layer's LoRA factor.

    Args:
        module_path: moraljax module path, e.g. "model.layers.self_attn.q_proj".
        layer: the layer index l.
        is_a: True for the A (down-projection) factor, False for B.

    Returns:
        e.g. "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight".
    """
    per_layer = module_path.replace("model.layers.", f"model.layers.{layer}.", 1)
    return f"{PEFT_PREFIX}{per_layer}.lora_{'A' if is_a else 'B'}.weight"


def leaf_at(flat, path: tuple):
    """The variable at ``path`` of a flat state (list of (path, variable) pairs).

    Raises:
        KeyError: if no leaf has that path.
    """
    for leaf_path, variable in flat:
        if leaf_path == path:
            return variable
    raise KeyError(path)
