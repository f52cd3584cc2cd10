"""Reads a PEFT LoRA adapter directory back into moraljax's trainable state.

``load_peft_adapter`` reads the directories ``adapter_export`` writes (bit for
bit) and those PEFT itself writes (``get_peft_model(...).save_pretrained``)
for a base of a supported family, and refuses an adapter trained on another
base architecture (``adapter_format.base_fingerprint``) or one that needs a
LoRA variant moraljax does not run (``lora_config_from_peft``).

Axis legend: L layers, I input features, O output features, R LoRA rank,
D model width.
"""

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors
from absl import logging
from flax import nnx

from moraljax.llm import adapter_format
from moraljax.llm import decoder_config
from moraljax.llm import lora as lora_lib

# safetensors dtypes that widen to float32 exactly (PEFT may save bf16/fp16
# factors when the model it wraps runs in that dtype).
_EXACT_TO_FLOAT32 = ("F32", "BF16", "F16")


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
    source: str = adapter_format.ADAPTER_CONFIG_FILE,
    module_names: Mapping[str, str] = adapter_format.TARGET_MODULES,
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
    targets = _targets_of_modules(cfg.get("target_modules"), module_names, source)
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
            targets=targets,
        )
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error


def _targets_of_modules(modules: Any, module_names: Mapping[str, str], source: str) -> tuple[str, ...]:
    """The short target names of adapter_config.json's target_modules, in ``lora.LORA_TARGETS`` order.

    Raises:
        ValueError: for anything but a non-empty list of the family's module
            names or "all-linear".
    """
    target_of_module = {module: target for target, module in module_names.items()}
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
    return tuple(t for t in lora_lib.LORA_TARGETS if t in present)


def _check_fingerprint(
    directory: pathlib.Path, config: decoder_config.DecoderConfig, base_name: str | None
) -> None:
    """Refuses an adapter whose recorded base architecture differs from ``config``, naming both bases."""
    file = directory / adapter_format.METADATA_FILE
    if not file.is_file():
        logging.info(
            "%s: no %s (not exported by moraljax); checking tensor shapes only.",
            directory,
            adapter_format.METADATA_FILE,
        )
        return
    metadata = _read_json(file)
    if metadata.get("format") != adapter_format.METADATA_FORMAT:
        raise ValueError(f"{file}: format is {metadata.get('format')!r}, expected {adapter_format.METADATA_FORMAT!r}.")
    if metadata.get("version") != adapter_format.METADATA_VERSION:
        raise ValueError(
            f"{file}: version is {metadata.get('version')!r}; this moraljax reads {adapter_format.METADATA_VERSION}."
        )
    recorded = metadata.get("base_fingerprint")
    if recorded is None:
        logging.warning("%s: exported without a base_config; checking tensor shapes only.", file)
        return
    expected = adapter_format.base_fingerprint(config)
    if recorded == expected:
        return
    differences = adapter_format.architecture_differences(metadata.get("base_architecture") or {}, config)
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
        """Refuses a file with tensors that were never read (named)."""
        unused = sorted(self._names - self.used)
        if unused:
            raise ValueError(
                f"{self.file}: {len(unused)} unexpected tensors that the template has no place for, "
                f"e.g. {unused[:5]} (another base model, layer count or target set?)."
            )


def _check_template(
    flat,
    factors: Mapping[tuple, adapter_format.Factor],
    lora: lora_lib.LoraConfig,
    base_config: decoder_config.DecoderConfig,
    config_file: pathlib.Path,
) -> None:
    """Refuses a template whose targets, rank or shapes do not fit the adapter and the base."""
    template_targets = adapter_format.targets_in(factors)
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
                f"{adapter_format.dotted_path(state_path)} has rank {template_rank} (shape {tuple(variable.shape)})."
            )
        expected = adapter_format.expected_factor_shape(factor, base_config, lora.rank)
        if tuple(variable.shape) != expected:
            raise ValueError(
                f"template leaf {adapter_format.dotted_path(state_path)} has shape {tuple(variable.shape)}, "
                f"but base_config (fingerprint {adapter_format.base_fingerprint(base_config)}) needs {expected}."
            )


def _read_factors(
    weights_file: pathlib.Path, flat, factors: Mapping[tuple, adapter_format.Factor]
) -> list[tuple[tuple, Any]]:
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
                name = adapter_format.peft_tensor_name(factor.module_path, layer, factor.is_a)
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

    Inverse of ``adapter_export.export_peft_adapter`` (bit-exact); also reads adapters that
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
    config_file = directory / adapter_format.ADAPTER_CONFIG_FILE
    weights_file = directory / adapter_format.ADAPTER_WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} not found: a PEFT adapter directory holds {adapter_format.ADAPTER_CONFIG_FILE} "
                f"and {adapter_format.ADAPTER_WEIGHTS_FILE}."
            )
    lora = lora_config_from_peft(
        _read_json(config_file), source=str(config_file), module_names=adapter_format.peft_module_names(base_config)
    )
    _check_fingerprint(directory, base_config, base_model_name_or_path)
    template = (
        nnx.state(template_trainable_state, lora_lib.TRAINABLE)
        if isinstance(template_trainable_state, nnx.Module)
        else template_trainable_state
    )
    flat = list(nnx.to_flat_state(template))
    factors, value_paths = adapter_format.sort_trainable(flat)
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
    """The template's value-head leaves, filled from ``value_head.safetensors`` (TRL's names)."""
    file = directory / adapter_format.VALUE_HEAD_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found; pass value_head=False to keep the template's value head "
            "(adapters written by PEFT alone have none)."
        )
    hidden = base_config.hidden_size
    with safetensors.safe_open(file, framework="flax") as handle:
        reader = _TensorFile(file, handle)
        kernel = reader.read(adapter_format.VALUE_WEIGHT_NAME, (1, hidden)).T  # [D, 1]
        bias = reader.read(adapter_format.VALUE_BIAS_NAME, (1,))
        reader.check_all_used()
    values = {lora_lib.VALUE_KERNEL_NAME: kernel, lora_lib.VALUE_BIAS_NAME: bias}
    leaves = []
    for name, state_path in value_paths.items():
        variable = adapter_format.leaf_at(flat, state_path)
        if tuple(variable.shape) != values[name].shape:
            raise ValueError(
                f"template leaf {adapter_format.dotted_path(state_path)} has shape {tuple(variable.shape)}, "
                f"expected {values[name].shape} for hidden_size {hidden}."
            )
        leaves.append((state_path, variable.copy(jnp.asarray(np.ascontiguousarray(values[name])))))
    return leaves
