"""Model families: each is a mapping from its Hugging Face files to ``DecoderConfig``.

A family is what transformers calls a ``model_type``. For each supported one
this module knows

- how its ``config.json`` (transformers v4 or v5 spelling) reads into a
  ``DecoderConfig`` (``config_from_hf``), and how a ``DecoderConfig`` is
  written back (``config_to_hf``);
- the names of its weights (``hf_tensor_name``): every family names its
  tensors like Llama (``model.layers.{l}.self_attn.q_proj.weight``, ...),
  except that the pre-norm families call the norm before the MLP
  ``post_attention_layernorm``, which is Gemma's name for the norm AFTER
  attention. moraljax's own parameter tree uses the Gemma names for the
  four positions and maps them per family;
- the PEFT module names of its LoRA targets (``peft_module_names``), so an
  exported adapter loads with ``peft.PeftModel.from_pretrained`` on the same
  base.

Anything a config.json asks for that ``decoder.py`` does not implement
(attention biases on the output projection, MLP biases, other RoPE types,
bidirectional attention, ...) is refused with one line naming the field,
rather than silently dropped.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

from moraljax import validation
from moraljax.llm import decoder_config

DecoderConfig = decoder_config.DecoderConfig
SLIDING, FULL = decoder_config.SLIDING, decoder_config.FULL

# moraljax's LoRA target short names -> the transformers module names PEFT
# matches. The five families share them.
_PEFT_MODULES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
# moraljax module names -> the names pre-norm (Llama-style) checkpoints use.
_PRE_NORM_NAMES = {"pre_feedforward_layernorm": "post_attention_layernorm"}
# The untied LM head's state path and its transformers name.
LM_HEAD_PATH = ("model", "lm_head", "kernel")
LM_HEAD_NAME = "lm_head.weight"


@dataclasses.dataclass(frozen=True)
class Family:
    """One supported model family.

    Attributes:
        model_type: transformers' model_type, the key in ``FAMILIES``.
        label: the family's name for people, e.g. "Llama 3.x".
        architecture: the transformers class the checkpoints are made for.
        from_hf: the plain config.json dict -> the family's ``DecoderConfig``.
        module_names: moraljax module name -> this family's module name,
            where they differ.
        peft_module_names: LoRA target short name -> PEFT module name.
    """

    model_type: str
    label: str
    architecture: str
    from_hf: Callable[[Mapping[str, Any]], DecoderConfig]
    module_names: Mapping[str, str]
    peft_module_names: Mapping[str, str]


# ----------------------------------------------------------------------------
# config.json fields shared by the families.


def _get(cfg: Mapping[str, Any], name: str, default: Any) -> Any:
    """``cfg[name]``, or ``default`` when absent or null."""
    value = cfg.get(name)
    return default if value is None else value


def _require(cfg: Mapping[str, Any], name: str, allowed: tuple, expected: str) -> None:
    """Refuses a config.json field moraljax does not implement."""
    if cfg.get(name) not in allowed:
        validation.fail(name, cfg.get(name), expected)


def _rope_of(params: Mapping[str, Any] | None, field: str, default_theta: float):
    """(theta, RopeScaling or None) of one RoPE parameter dict (v5, or v4's rope_scaling)."""
    params = dict(params or {})
    theta = float(_get(params, "rope_theta", default_theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        validation.fail(f"{field}.partial_rotary_factor", partial, "1.0 (RoPE on the whole head)")
    if rope_type == "default":
        return theta, None
    if rope_type not in decoder_config.ROPE_SCALINGS:
        validation.fail(f"{field}.rope_type", rope_type, "one of 'default', 'linear', 'llama3'")
    scaling = {"rope_type": rope_type, "factor": float(_get(params, "factor", 1.0))}
    if rope_type == "llama3":
        for name in ("low_freq_factor", "high_freq_factor"):
            scaling[name] = float(params.get(name, 0.0))
        scaling["original_max_position_embeddings"] = params.get("original_max_position_embeddings")
    return theta, decoder_config.RopeScaling(**scaling)


def _rope(cfg: Mapping[str, Any], default_theta: float):
    """(theta, scaling) of a family with one RoPE for every layer."""
    if isinstance(cfg.get("rope_parameters"), Mapping):
        return _rope_of(cfg["rope_parameters"], "rope_parameters", default_theta)
    legacy = dict(cfg.get("rope_scaling") or {})
    legacy.setdefault("rope_theta", _get(cfg, "rope_theta", default_theta))
    return _rope_of(legacy, "rope_scaling", default_theta)


def _num_layers(cfg: Mapping[str, Any]) -> int:
    validation.check_positive_int("num_hidden_layers", cfg.get("num_hidden_layers"))
    return cfg["num_hidden_layers"]


def _eos(cfg: Mapping[str, Any], default: Any) -> Any:
    eos = cfg.get("eos_token_id", default)
    return tuple(eos) if isinstance(eos, list) else eos


def _common(cfg: Mapping[str, Any], *, default_head_dim: int | None, default_tied: bool) -> dict[str, Any]:
    """The fields every family spells alike (transformers' class defaults where absent)."""
    hidden_size = cfg.get("hidden_size")
    num_heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or default_head_dim
    if head_dim is None and isinstance(hidden_size, int) and isinstance(num_heads, int) and num_heads > 0:
        head_dim = hidden_size // num_heads
    return dict(
        vocab_size=cfg.get("vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=cfg.get("intermediate_size"),
        num_hidden_layers=cfg.get("num_hidden_layers"),
        num_attention_heads=num_heads,
        num_key_value_heads=_get(cfg, "num_key_value_heads", num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", default_tied)),
        max_position_embeddings=_get(cfg, "max_position_embeddings", 8192),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=_eos(cfg, None),
    )


def _integral(value: Any) -> Any:
    """256.0 -> 256: a whole number is spelled one way, whatever config.json wrote."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _activation(cfg: Mapping[str, Any], default: str) -> str:
    return cfg.get("hidden_activation") or cfg.get("hidden_act") or default


# ----------------------------------------------------------------------------
# The families.


def _gemma_common(cfg: Mapping[str, Any], *, default_tied: bool = True) -> dict[str, Any]:
    _require(cfg, "attention_bias", (None, False), "false (Gemma has no attention biases)")
    _require(cfg, "use_bidirectional_attention", (None, False), "false/null (causal attention)")
    activation = _activation(cfg, "gelu_pytorch_tanh")
    if activation != "gelu_pytorch_tanh":
        validation.fail("hidden_activation", activation, "'gelu_pytorch_tanh' for Gemma")
    fields = _common(cfg, default_head_dim=256, default_tied=default_tied)
    fields.update(
        pad_token_id=cfg.get("pad_token_id", 0),
        bos_token_id=cfg.get("bos_token_id", 2),
        eos_token_id=_eos(cfg, 1),
        norm_offset=1.0,
        post_norms=True,
        scale_embeddings=True,
        hidden_activation=activation,
        query_pre_attn_scalar=_integral(_get(cfg, "query_pre_attn_scalar", 256)),
        sliding_window=_get(cfg, "sliding_window", 4096),
    )
    return fields


def _gemma2_from_hf(cfg: Mapping[str, Any]) -> DecoderConfig:
    """Gemma 2: transformers' default layout slides on even layers (0, 2, ...)."""
    fields = _gemma_common(cfg)
    theta, scaling = _rope(cfg, 10000.0)
    if scaling is not None:
        validation.fail("rope_parameters.rope_type", scaling.rope_type, "'default' for Gemma 2")
    layer_types = cfg.get("layer_types") or [SLIDING if i % 2 == 0 else FULL for i in range(_num_layers(cfg))]
    return DecoderConfig(
        model_type="gemma2",
        layer_types=tuple(layer_types),
        rope_theta=theta,
        attn_logit_softcapping=cfg.get("attn_logit_softcapping", 50.0),
        final_logit_softcapping=cfg.get("final_logit_softcapping", 30.0),
        **fields,
    )


def _gemma3_rope(cfg: Mapping[str, Any]):
    """(global theta, global scaling, local theta): v5's per-layer-type dict, or v4's fields."""
    params = cfg.get("rope_parameters")
    if isinstance(params, Mapping) and (FULL in params or SLIDING in params):
        theta, scaling = _rope_of(params.get(FULL), f"rope_parameters.{FULL}", 1_000_000.0)
        local_theta, local_scaling = _rope_of(params.get(SLIDING), f"rope_parameters.{SLIDING}", 10_000.0)
        if local_scaling is not None:
            validation.fail(f"rope_parameters.{SLIDING}.rope_type", local_scaling.rope_type, "'default'")
        return theta, scaling, local_theta
    theta, scaling = _rope(cfg, 1_000_000.0)
    return theta, scaling, float(_get(cfg, "rope_local_base_freq", 10_000.0))


def _gemma3_from_hf(cfg: Mapping[str, Any]) -> DecoderConfig:
    """Gemma 3 text: q/k norms, 5 local layers per global one, a RoPE base per layer type."""
    fields = _gemma_common(cfg)
    pattern = _get(cfg, "sliding_window_pattern", 6)
    layer_types = cfg.get("layer_types") or [
        SLIDING if (i + 1) % pattern else FULL for i in range(_num_layers(cfg))
    ]
    theta, scaling, local_theta = _gemma3_rope(cfg)
    return DecoderConfig(
        model_type="gemma3_text",
        layer_types=tuple(layer_types),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_rope_theta=local_theta,
        qk_norm=True,
        attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
        **fields,
    )


def _pre_norm_fields(cfg: Mapping[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """Settings shared by Llama and Qwen: pre-norm, weight w, SiLU, H^-1/2, no caps."""
    activation = _activation(cfg, "silu")
    if activation != "silu":
        validation.fail("hidden_act", activation, "'silu'")
    fields.update(
        norm_offset=0.0,
        post_norms=False,
        scale_embeddings=False,
        hidden_activation=activation,
        query_pre_attn_scalar=fields["head_dim"],
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
    )
    return fields


def _llama_from_hf(cfg: Mapping[str, Any]) -> DecoderConfig:
    """Llama 3.x: pre-norm, SiLU, Llama-3 RoPE scaling, tied (1B, 3B) or untied (8B) head."""
    _require(cfg, "attention_bias", (None, False), "false (moraljax has no o_proj bias)")
    _require(cfg, "mlp_bias", (None, False), "false")
    fields = _pre_norm_fields(cfg, _common(cfg, default_head_dim=None, default_tied=False))
    fields.update(bos_token_id=cfg.get("bos_token_id", 1), eos_token_id=_eos(cfg, 2))
    theta, scaling = _rope(cfg, 10000.0)
    return DecoderConfig(
        model_type="llama",
        layer_types=(FULL,) * _num_layers(cfg),
        sliding_window=None,
        rope_theta=theta,
        rope_scaling=scaling,
        **fields,
    )


def _qwen_layers(cfg: Mapping[str, Any]) -> tuple[tuple[str, ...], int | None]:
    """Layer types and window: Qwen slides only with use_sliding_window, from max_window_layers on."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        first = _get(cfg, "max_window_layers", 28)
        layer_types = [SLIDING if window is not None and i >= first else FULL for i in range(_num_layers(cfg))]
    return tuple(layer_types), window


def _qwen_from_hf(cfg: Mapping[str, Any], *, model_type: str) -> DecoderConfig:
    """Qwen2.5 (biases on q, k and v) and Qwen3 (q/k norms; head dim 128 unless given): pre-norm, SiLU."""
    qwen3 = model_type == "qwen3"
    if qwen3:
        _require(cfg, "attention_bias", (None, False), "false (moraljax has no o_proj bias)")
    fields = _pre_norm_fields(cfg, _common(cfg, default_head_dim=128 if qwen3 else None, default_tied=False))
    theta, scaling = _rope(cfg, 10000.0)
    layer_types, window = _qwen_layers(cfg)
    return DecoderConfig(
        model_type=model_type,
        layer_types=layer_types,
        sliding_window=window,
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=not qwen3,
        qk_norm=qwen3,
        **fields,
    )


FAMILIES = {
    family.model_type: family
    for family in (
        Family("gemma2", "Gemma 2", "Gemma2ForCausalLM", _gemma2_from_hf, {}, _PEFT_MODULES),
        Family("gemma3_text", "Gemma 3 (text)", "Gemma3ForCausalLM", _gemma3_from_hf, {}, _PEFT_MODULES),
        Family("llama", "Llama 3.x", "LlamaForCausalLM", _llama_from_hf, _PRE_NORM_NAMES, _PEFT_MODULES),
        Family("qwen2", "Qwen2.5", "Qwen2ForCausalLM", functools.partial(_qwen_from_hf, model_type="qwen2"),
               _PRE_NORM_NAMES, _PEFT_MODULES),
        Family("qwen3", "Qwen3", "Qwen3ForCausalLM", functools.partial(_qwen_from_hf, model_type="qwen3"),
               _PRE_NORM_NAMES, _PEFT_MODULES),
    )
}


def supported() -> str:
    """The supported families in words, for messages."""
    return ", ".join(f"{repr(name)} ({family.label})" for name, family in FAMILIES.items())


def family_of(model_type: Any) -> Family:
    """The ``Family`` of a model_type.

    Raises:
        ValueError: one line naming every supported family.
    """
    if model_type not in FAMILIES:
        validation.fail("model_type", model_type, f"one of {supported()}")
    return FAMILIES[model_type]


def config_from_hf(hf_config: Mapping[str, Any]) -> DecoderConfig:
    """Reads a transformers ``config.json`` dict into a validated ``DecoderConfig``.

    Args:
        hf_config: the parsed config.json (v4 or v5 spelling).

    Returns:
        The config.

    Raises:
        ValueError: "<field>=<value> is not allowed; expected <what>." for an
            unknown model_type, a feature moraljax does not implement, or an
            invalid value.
    """
    cfg = dict(hf_config)
    return family_of(cfg.get("model_type")).from_hf(cfg)


def _rope_to_hf(theta: float, scaling: decoder_config.RopeScaling | None) -> dict[str, Any]:
    if scaling is None:
        return {"rope_type": "default", "rope_theta": float(theta)}
    params = {"rope_type": scaling.rope_type, "rope_theta": float(theta), "factor": float(scaling.factor)}
    if scaling.rope_type == "llama3":
        params.update(
            low_freq_factor=float(scaling.low_freq_factor),
            high_freq_factor=float(scaling.high_freq_factor),
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        )
    return params


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def config_to_hf(config: DecoderConfig, dtype: str = "float32") -> dict[str, Any]:
    """The transformers v5 ``config.json`` dict of a config.

    Args:
        config: the architecture.
        dtype: the stored weights' dtype name ("float32" or "bfloat16").

    Returns:
        A JSON-serialisable dict that the family's transformers config class
        reads back to the same architecture (``config_from_hf`` too).
    """
    family = family_of(config.model_type)
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    out = {
        "architectures": [family.architecture],
        "model_type": config.model_type,
        "dtype": dtype,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
    }
    if config.model_type.startswith("gemma"):
        out["hidden_activation"] = config.hidden_activation
    else:
        out["hidden_act"] = config.hidden_activation
    out["layer_types"] = list(config.layer_types)
    out["sliding_window"] = config.sliding_window
    if config.model_type == "gemma3_text":
        local_theta = config.sliding_rope_theta if config.sliding_rope_theta is not None else config.rope_theta
        out["rope_parameters"] = {
            SLIDING: _rope_to_hf(local_theta, None),
            FULL: _rope_to_hf(config.rope_theta, config.rope_scaling),
        }
    else:
        out["rope_parameters"] = _rope_to_hf(config.rope_theta, config.rope_scaling)
    if config.model_type in ("qwen2", "qwen3"):
        out["use_sliding_window"] = decoder_config.SLIDING in config.layer_types
    out["rms_norm_eps"] = float(config.rms_norm_eps)
    if config.model_type.startswith("gemma"):
        out["query_pre_attn_scalar"] = config.query_pre_attn_scalar
        out["attn_logit_softcapping"] = _float_or_none(config.attn_logit_softcapping)
        out["final_logit_softcapping"] = _float_or_none(config.final_logit_softcapping)
    out.update(
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=eos,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
    )
    return out


def hf_tensor_name(config: DecoderConfig, state_path: tuple[str, ...], layer: int | None) -> str:
    """The transformers tensor name of one frozen leaf of moraljax's tree.

    ``model.layers.<module path>.<leaf>`` becomes
    ``model.layers.{layer}.<family's module path>.weight`` (``.bias`` for a
    bias); ``model.lm_head.kernel`` is ``lm_head.weight``.

    Args:
        config: the architecture (its family names the modules).
        state_path: the leaf's path, e.g. ("model", "layers", "self_attn",
            "q_proj", "kernel").
        layer: the layer index for stacked leaves (``model.layers.*``), else None.

    Returns:
        e.g. "model.layers.3.self_attn.q_proj.weight".
    """
    if tuple(state_path) == LM_HEAD_PATH:
        return LM_HEAD_NAME
    names = family_of(config.model_type).module_names
    modules = [names.get(str(part), str(part)) for part in state_path[:-1]]
    if layer is not None:
        modules.insert(2, str(layer))  # model.layers.{layer}.<...>
    return ".".join(modules) + (".bias" if state_path[-1] == "bias" else ".weight")
