"""Trained adapters in PEFT's on-disk format: export, and load back.

A morally fine-tuned agent is the frozen base model plus its LoRA factors
and value head (SPEC.md section 6). ``export_peft_adapter`` writes the
factors as a PEFT LoRA adapter, so that ``transformers`` + ``peft`` load the
agent (``PeftModel.from_pretrained(base, directory)``) and any server that
reads PEFT adapters can serve it; ``load_peft_adapter`` reads such a
directory (ours, or one that PEFT itself wrote) back into moraljax's
trainable state.

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
D model dim.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging
from flax import nnx

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

# safetensors dtypes that widen to float32 exactly (PEFT may save bf16/fp16
# factors when the model it wraps runs in that dtype).
_EXACT_TO_FLOAT32 = ("F32", "BF16", "F16")


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


# ----------------------------------------------------------------------------
# The trainable state, sorted by role.


@dataclasses.dataclass(frozen=True)
class _Factor:
    """One LoRA factor leaf: its state path and where it goes in PEFT's file."""

    path: tuple[str, ...]
    target: str  # short name, e.g. "q"
    module_path: str  # e.g. "model.layers.self_attn.q_proj"
    is_a: bool


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _sort_trainable(flat) -> tuple[dict[tuple, _Factor], dict[str, tuple]]:
    """Splits flat trainable leaves into LoRA factors and value-head leaves.

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
                    f"trainable leaf {_dotted(path)} is a LoRA factor of an unknown layer; "
                    f"allowed: model.layers.<...>.{{{', '.join(_TARGET_OF_MODULE)}}}.lora_a/lora_b."
                )
            factors[path] = _Factor(
                path=path,
                target=_TARGET_OF_MODULE[module],
                module_path=_dotted(path[:-1]),
                is_a=name == lora_lib.LORA_A_NAME,
            )
        elif name in (lora_lib.VALUE_KERNEL_NAME, lora_lib.VALUE_BIAS_NAME) and tuple(path[:-1]) == ("value_head",):
            value_head[name] = path
        else:
            raise ValueError(f"trainable leaf {_dotted(path)} is neither a LoRA factor nor the value head.")
    return factors, value_head


def _targets_in(factors: Mapping[tuple, _Factor]) -> tuple[str, ...]:
    present = {factor.target for factor in factors.values()}
    return tuple(t for t in lora_lib.LORA_TARGETS if t in present)


def _layer_dims(config: decoder_config.DecoderConfig) -> dict[str, tuple[int, int]]:
    """(I, O) of every adaptable linear layer of one decoder layer."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}


def _expected_factor_shape(factor: _Factor, config: decoder_config.DecoderConfig, rank: int) -> tuple[int, int, int]:
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


# ----------------------------------------------------------------------------
# Export.


def _peft_module_names(config: decoder_config.DecoderConfig | None) -> Mapping[str, str]:
    """Target short name -> PEFT module name for the base's family (the common names without a base)."""
    return TARGET_MODULES if config is None else families.family_of(config.model_type).peft_module_names


def _peft_adapter_config(
    lora: lora_lib.LoraConfig, base_model_name_or_path: str, module_names: Mapping[str, str]
) -> dict[str, Any]:
    """adapter_config.json contents (fields PEFT 0.21 writes for plain LoRA)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": [module_names[t] for t in lora.targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def _host_float32(variable, path: tuple) -> np.ndarray:
    array = np.asarray(variable[...])
    if array.dtype != np.float32:
        raise ValueError(f"trainable leaf {_dotted(path)} has dtype {array.dtype}; adapters are exported from float32.")
    return array


def _factor_tensors(
    flat, factors: Mapping[tuple, _Factor], lora: lora_lib.LoraConfig, base_config
) -> dict[str, np.ndarray]:
    """PEFT's per-layer tensors of every LoRA factor, after checking its shape."""
    tensors = {}
    for state_path, variable in flat:
        if state_path not in factors:
            continue
        factor = factors[state_path]
        array = _host_float32(variable, state_path)
        if array.ndim != 3 or array.shape[2 if factor.is_a else 1] != lora.rank:
            raise ValueError(
                f"trainable leaf {_dotted(state_path)} has shape {array.shape}; expected a stacked "
                f"[L, I, R] / [L, R, O] factor with R = lora.rank = {lora.rank} (select one learner first)."
            )
        if base_config is not None:
            expected = _expected_factor_shape(factor, base_config, lora.rank)
            if array.shape != expected:
                raise ValueError(
                    f"trainable leaf {_dotted(state_path)} has shape {array.shape}, but base_config "
                    f"(fingerprint {base_fingerprint(base_config)}) needs {expected}."
                )
        for layer in range(array.shape[0]):
            # torch Linear layout: A [R, I], B [O, R] (see the module docstring).
            name = peft_tensor_name(factor.module_path, layer, factor.is_a)
            tensors[name] = np.ascontiguousarray(array[layer].T)
    return tensors


def _value_head_tensors(flat, value_paths: Mapping[str, tuple], base_config) -> dict[str, np.ndarray]:
    """TRL's value-head tensors, after checking that the state has a head of the right shape."""
    missing = [n for n in (lora_lib.VALUE_KERNEL_NAME, lora_lib.VALUE_BIAS_NAME) if n not in value_paths]
    if missing:
        raise ValueError(
            f"value_head=True but the trainable state has no value_head.{missing[0]}; "
            "pass value_head=False to export the adapters only."
        )
    kernel_path = value_paths[lora_lib.VALUE_KERNEL_NAME]
    bias_path = value_paths[lora_lib.VALUE_BIAS_NAME]
    kernel = _host_float32(_leaf(flat, kernel_path), kernel_path)
    bias = _host_float32(_leaf(flat, bias_path), bias_path)
    hidden = base_config.hidden_size if base_config is not None else kernel.shape[0]
    if kernel.shape != (hidden, 1) or bias.shape != (1,):
        raise ValueError(
            f"value head has kernel {kernel.shape} and bias {bias.shape}; expected ({hidden}, 1) and (1,)."
        )
    return {VALUE_WEIGHT_NAME: np.ascontiguousarray(kernel.T), VALUE_BIAS_NAME: bias.copy()}


def export_peft_adapter(
    trainable_state: nnx.State,
    lora: lora_lib.LoraConfig,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str,
    base_config: decoder_config.DecoderConfig | None = None,
    value_head: bool = True,
) -> None:
    """Writes one learner's adapters (and value head) as a PEFT LoRA adapter.

    The files and the tensor mapping are in the module docstring. The result
    loads with ``peft.PeftModel.from_pretrained(<Family>ForCausalLM, path)``
    and with ``load_peft_adapter``. A training state holds [N] learners; pass
    one of them, e.g. ``jax.tree.map(lambda x: x[n], trainable)``.

    Args:
        trainable_state: ``split_policy(policy)[1]`` of a single learner: LoRA
            factors lora_a [L, I, R] and lora_b [L, R, O] (float32), and the
            value head kernel [D, 1] and bias [1].
        lora: the adapter settings the state was trained with; its targets
            and rank must be those of the state.
        path: output directory (created if missing; files in it are replaced).
        base_model_name_or_path: the base checkpoint (a hub id such as
            "google/gemma-2-2b-it" or a local directory), written to
            adapter_config.json where PEFT-based loaders look for it.
        base_config: the base architecture. With it, every shape is checked
            against the base and its fingerprint is recorded; without it the
            fingerprint is recorded as null and loading can only check shapes.
        value_head: also write ``value_head.safetensors``.

    Raises:
        ValueError: if ``lora`` does not describe the state (targets, rank),
            a shape does not match ``base_config``, a leaf is not float32 or
            not a LoRA/value-head leaf, or ``value_head`` is True and the state
            has no value head.
    """
    if not isinstance(lora, lora_lib.LoraConfig):
        raise ValueError(f"lora must be a moraljax LoraConfig, got {type(lora).__name__}.")
    if not isinstance(base_model_name_or_path, str) or not base_model_name_or_path:
        raise ValueError(f"base_model_name_or_path must be a non-empty str, got {base_model_name_or_path!r}.")
    flat = list(nnx.to_flat_state(trainable_state))
    factors, value_paths = _sort_trainable(flat)
    targets = _targets_in(factors)
    if set(targets) != set(lora.targets):
        raise ValueError(
            f"lora.targets {lora.targets} do not match the trainable state's adapted layers {targets}."
        )
    tensors = _factor_tensors(flat, factors, lora, base_config)
    value_tensors = _value_head_tensors(flat, value_paths, base_config) if value_head else None

    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    # "format": "pt" is what torch-side readers (transformers, PEFT) expect.
    safetensors.numpy.save_file(tensors, directory / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    if value_tensors is not None:
        safetensors.numpy.save_file(value_tensors, directory / VALUE_HEAD_FILE, metadata={"format": "pt"})
    elif (directory / VALUE_HEAD_FILE).exists():
        # A stale head from an earlier export would be read as this adapter's.
        (directory / VALUE_HEAD_FILE).unlink()
    adapter_config = _peft_adapter_config(lora, base_model_name_or_path, _peft_module_names(base_config))
    _write_json(directory / ADAPTER_CONFIG_FILE, adapter_config)
    _write_json(
        directory / METADATA_FILE,
        {
            "format": METADATA_FORMAT,
            "version": METADATA_VERSION,
            "base_model_name_or_path": base_model_name_or_path,
            "base_fingerprint": None if base_config is None else base_fingerprint(base_config),
            "base_architecture": None if base_config is None else base_architecture(base_config),
            "value_head": value_tensors is not None,
        },
    )


def _leaf(flat, path: tuple):
    for leaf_path, variable in flat:
        if leaf_path == path:
            return variable
    raise KeyError(path)


def _write_json(file: pathlib.Path, content: Mapping[str, Any]) -> None:
    with open(file, "w") as f:
        json.dump(content, f, indent=2, sort_keys=True)
        f.write("\n")


# ----------------------------------------------------------------------------
# Load.


def _read_json(file: pathlib.Path) -> dict[str, Any]:
    try:
        with open(file) as f:
            content = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(content).__name__}.")
    return content


def lora_config_from_peft(
    adapter_config: Mapping[str, Any],
    *,
    source: str = ADAPTER_CONFIG_FILE,
    module_names: Mapping[str, str] = TARGET_MODULES,
) -> lora_lib.LoraConfig:
    """moraljax ``LoraConfig`` of a PEFT adapter_config.json, if it is one moraljax runs.

    moraljax implements plain LoRA with scale alpha / r on whole linear
    layers; anything else PEFT can describe is refused rather than dropped.

    Args:
        adapter_config: the parsed adapter_config.json.
        source: file name used in error messages.
        module_names: target short name -> PEFT module name in the base's
            family (``families.Family.peft_module_names``).

    Returns:
        ``LoraConfig(rank=r, alpha=lora_alpha, dropout=lora_dropout,
        targets=...)`` with targets in ``lora.LORA_TARGETS`` order.

    Raises:
        ValueError: for another peft_type or task_type, a target that is not
            one of the seven projections of a decoder layer, bias, DoRA, rsLoRA,
            fan_in_fan_out, per-module rank/alpha patterns, a layer subset,
            or modules_to_save.
    """
    cfg = dict(adapter_config)

    def require(field, allowed, ok):
        value = cfg.get(field)
        if not ok(value):
            raise ValueError(f"{source}: {field} is {value!r}; moraljax loads only {allowed}.")
        return value

    require("peft_type", "'LORA'", lambda v: v == "LORA")
    require("task_type", "'CAUSAL_LM'", lambda v: v == "CAUSAL_LM")
    require("bias", "'none'", lambda v: v in (None, "none"))
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias"):
        require(flag, "false", lambda v: not v)
    for field in ("rank_pattern", "alpha_pattern"):
        require(field, "an empty pattern (one rank and alpha for all layers)", lambda v: not v)
    for field in ("layers_to_transform", "modules_to_save", "target_parameters", "trainable_token_indices"):
        require(field, "null", lambda v: v is None or v == [])
    target_of_module = {module: target for target, module in module_names.items()}
    modules = cfg.get("target_modules")
    if modules == "all-linear":
        # PEFT expands it to every linear layer but the LM head: all seven.
        modules = list(module_names.values())
    if not isinstance(modules, (list, tuple)) or not modules:
        raise ValueError(
            f"{source}: target_modules is {modules!r}; moraljax loads a list of names from "
            f"{list(module_names.values())} or 'all-linear'."
        )
    unknown = [m for m in modules if m not in target_of_module]
    if unknown:
        raise ValueError(
            f"{source}: target_modules has {unknown}; moraljax adapts only {list(module_names.values())}."
        )
    present = {target_of_module[m] for m in modules}
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise ValueError(f"{source}: r must be an int, got {rank!r}.")
    alpha = cfg.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"{source}: lora_alpha must be a number, got {alpha!r}.")
    dropout = cfg.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool):
        raise ValueError(f"{source}: lora_dropout must be a number, got {dropout!r}.")
    try:
        return lora_lib.LoraConfig(
            rank=rank,
            alpha=float(alpha),
            dropout=float(dropout),
            targets=tuple(t for t in lora_lib.LORA_TARGETS if t in present),
        )
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error


def _check_fingerprint(
    directory: pathlib.Path, config: decoder_config.DecoderConfig, base_name: str | None
) -> None:
    """Refuses an adapter whose recorded base architecture differs from ``config``, naming both bases."""
    file = directory / METADATA_FILE
    if not file.is_file():
        logging.info("%s: no %s (not exported by moraljax); checking tensor shapes only.", directory, METADATA_FILE)
        return
    metadata = _read_json(file)
    if metadata.get("format") != METADATA_FORMAT:
        raise ValueError(f"{file}: format is {metadata.get('format')!r}, expected {METADATA_FORMAT!r}.")
    if metadata.get("version") != METADATA_VERSION:
        raise ValueError(f"{file}: version is {metadata.get('version')!r}; this moraljax reads {METADATA_VERSION}.")
    recorded = metadata.get("base_fingerprint")
    if recorded is None:
        logging.warning("%s: exported without a base_config; checking tensor shapes only.", file)
        return
    expected = base_fingerprint(config)
    if recorded == expected:
        return
    architecture = metadata.get("base_architecture") or {}
    ours = base_architecture(config)
    # A family field absent from a record is at Gemma 2's value.
    defaults = base_architecture(_GEMMA2_DEFAULTS) | {name: getattr(_GEMMA2_DEFAULTS, name) for name in FAMILY_FIELDS}
    differences = [
        f"{name}: adapter {architecture.get(name, defaults[name])!r} vs base {ours.get(name, defaults[name])!r}"
        for name in ARCHITECTURE_FIELDS + FAMILY_FIELDS
        if architecture and architecture.get(name, defaults[name]) != ours.get(name, defaults[name])
    ]
    this_base = f"{base_name!r} ({config.model_type})" if base_name else f"a {config.model_type} base"
    raise ValueError(
        f"{directory}: adapter was made for base {metadata.get('base_model_name_or_path')!r} "
        f"(architecture fingerprint {recorded}), not for {this_base} (fingerprint {expected}); differing fields: "
        f"{'; '.join(differences) or 'unknown (base_architecture not recorded)'}."
    )


class _TensorFile:
    """Checked reads from one safetensors file; remembers what was read."""

    def __init__(self, file: pathlib.Path, handle):
        self.file = file
        self._handle = handle
        self._names = set(handle.keys())
        self.used: set[str] = set()

    def read(self, name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
        """The tensor as float32 numpy, after checking name, shape and dtype.

        Raises:
            ValueError: if missing, mis-shaped or of a dtype that does not
                widen to float32 exactly.
        """
        if name not in self._names:
            raise ValueError(f"{self.file}: missing tensor {name!r}.")
        tensor_slice = self._handle.get_slice(name)
        shape, dtype = tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
        if shape != tuple(expected_shape):
            raise ValueError(f"{self.file}: tensor {name!r} has shape {shape}, expected {tuple(expected_shape)}.")
        if dtype not in _EXACT_TO_FLOAT32:
            raise ValueError(f"{self.file}: tensor {name!r} has dtype {dtype}; allowed: {_EXACT_TO_FLOAT32}.")
        self.used.add(name)
        # The "flax" reader also handles bfloat16, which numpy cannot name.
        return np.asarray(self._handle.get_tensor(name), np.float32)

    def check_all_used(self) -> None:
        unused = sorted(self._names - self.used)
        if unused:
            raise ValueError(
                f"{self.file}: {len(unused)} unexpected tensors that the template has no place for, "
                f"e.g. {unused[:5]} (another base model, layer count or target set?)."
            )


def _check_template(
    flat, factors: Mapping[tuple, _Factor], lora: lora_lib.LoraConfig, base_config, config_file: pathlib.Path
) -> None:
    """Refuses a template whose targets, rank or shapes do not fit the adapter and the base."""
    template_targets = _targets_in(factors)
    if template_targets != lora.targets:
        raise ValueError(
            f"{config_file}: the adapter adapts targets {lora.targets} but the template has {template_targets}; "
            "build the policy with the LoraConfig this adapter describes."
        )
    for state_path, variable in flat:
        if state_path not in factors:
            continue
        factor = factors[state_path]
        template_rank = variable.shape[-1] if factor.is_a else variable.shape[-2]
        if template_rank != lora.rank:
            raise ValueError(
                f"{config_file}: the adapter has rank r={lora.rank} but the template's "
                f"{_dotted(state_path)} has rank {template_rank} (shape {tuple(variable.shape)})."
            )
        expected = _expected_factor_shape(factor, base_config, lora.rank)
        if tuple(variable.shape) != expected:
            raise ValueError(
                f"template leaf {_dotted(state_path)} has shape {tuple(variable.shape)}, but base_config "
                f"(fingerprint {base_fingerprint(base_config)}) needs {expected}."
            )


def _read_factors(weights_file: pathlib.Path, flat, factors: Mapping[tuple, _Factor]) -> list[tuple[tuple, Any]]:
    """The template's factor leaves, filled from PEFT's per-layer tensors (all of which must be used)."""
    leaves = []
    with safetensors.safe_open(weights_file, framework="flax") as handle:
        reader = _TensorFile(weights_file, handle)
        for state_path, variable in flat:
            if state_path not in factors:
                continue
            factor = factors[state_path]
            shape = tuple(variable.shape)
            per_layer_peft_shape = shape[1:][::-1]
            host = np.empty(shape, np.float32)
            for layer in range(shape[0]):
                name = peft_tensor_name(factor.module_path, layer, factor.is_a)
                host[layer] = reader.read(name, per_layer_peft_shape).T
            leaves.append((state_path, variable.copy(jnp.asarray(host))))
        reader.check_all_used()
    return leaves


def load_peft_adapter(
    path: str | os.PathLike,
    template_trainable_state: nnx.State | nnx.Module,
    *,
    base_config: decoder_config.DecoderConfig,
    value_head: bool = True,
    base_model_name_or_path: str | None = None,
) -> tuple[nnx.State, lora_lib.LoraConfig]:
    """Reads a PEFT LoRA adapter directory into moraljax's trainable state.

    Inverse of ``export_peft_adapter`` (bit-exact); also reads adapters that
    PEFT wrote for a transformers model of a supported family
    (``get_peft_model(...).save_pretrained``), whose directory has no value
    head and no moraljax metadata. Per-layer tensors are stacked on the L
    axis, transposed to [I, R] / [R, O] and widened to float32.

    Args:
        path: the adapter directory.
        template_trainable_state: trainable state (arrays or
            ``jax.ShapeDtypeStruct`` leaves) of a policy built for this
            adapter, e.g. ``split_policy(policy)[1]`` for a policy made with
            the returned ``LoraConfig``; or the policy itself. Only its
            structure and shapes are used, except with ``value_head=False``.
        base_config: architecture of the base the adapter will run on.
        value_head: read ``value_head.safetensors``; False returns the
            template's value-head leaves unchanged (e.g. a fresh head for an
            adapter trained without a critic).
        base_model_name_or_path: the base's name or directory, for messages.

    Returns:
        (trainable state with the template's structure, the adapter's
        ``LoraConfig``).

    Raises:
        FileNotFoundError: if the directory or one of its files is missing.
        ValueError: an adapter_config moraljax cannot run; an adapter made
            for another base architecture (both bases, both fingerprints and
            the differing fields are named); a template with other targets,
            another rank or shapes that do not fit ``base_config``; a
            missing, mis-shaped or unexpected tensor (named).
    """
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist.")
    config_file = directory / ADAPTER_CONFIG_FILE
    weights_file = directory / ADAPTER_WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} not found: a PEFT adapter directory holds {ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE}."
            )
    lora = lora_config_from_peft(
        _read_json(config_file), source=str(config_file), module_names=_peft_module_names(base_config)
    )
    _check_fingerprint(directory, base_config, base_model_name_or_path)
    template = (
        nnx.state(template_trainable_state, lora_lib.TRAINABLE)
        if isinstance(template_trainable_state, nnx.Module)
        else template_trainable_state
    )
    flat = list(nnx.to_flat_state(template))
    factors, value_paths = _sort_trainable(flat)
    _check_template(flat, factors, lora, base_config, config_file)
    new_leaves = _read_factors(weights_file, flat, factors)
    if value_paths:
        if value_head:
            new_leaves.extend(_read_value_head(directory, flat, value_paths, base_config))
        else:
            new_leaves.extend((p, v) for p, v in flat if p in value_paths.values())
    return nnx.from_flat_state(new_leaves), lora


def _read_value_head(
    directory: pathlib.Path, flat, value_paths: Mapping[str, tuple], base_config: decoder_config.DecoderConfig
) -> list[tuple[tuple, Any]]:
    file = directory / VALUE_HEAD_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found; pass value_head=False to keep the template's value head "
            "(adapters written by PEFT alone have none)."
        )
    hidden = base_config.hidden_size
    with safetensors.safe_open(file, framework="flax") as handle:
        reader = _TensorFile(file, handle)
        kernel = reader.read(VALUE_WEIGHT_NAME, (1, hidden)).T  # [D, 1]
        bias = reader.read(VALUE_BIAS_NAME, (1,))
        reader.check_all_used()
    values = {lora_lib.VALUE_KERNEL_NAME: kernel, lora_lib.VALUE_BIAS_NAME: bias}
    leaves = []
    for name, state_path in value_paths.items():
        variable = _leaf(flat, state_path)
        if tuple(variable.shape) != values[name].shape:
            raise ValueError(
                f"template leaf {_dotted(state_path)} has shape {tuple(variable.shape)}, "
                f"expected {values[name].shape} for hidden_size {hidden}."
            )
        leaves.append((state_path, variable.copy(jnp.asarray(np.ascontiguousarray(values[name])))))
    return leaves
