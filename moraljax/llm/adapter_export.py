"""Writes one learner's trained adapter as a PEFT LoRA adapter directory.

``export_peft_adapter`` writes the files and tensor names of
``adapter_format.py`` (its docstring has the mapping), so that
``transformers`` + ``peft`` load the agent and ``adapter_load`` reads it back
bit for bit.

Axis legend: L layers, I input features, O output features, R LoRA rank,
D model width.
"""

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors.numpy
from flax import nnx

from moraljax.llm import adapter_format
from moraljax.llm import decoder_config
from moraljax.llm import lora as lora_lib


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
        raise ValueError(
            f"trainable leaf {adapter_format.dotted_path(path)} has dtype {array.dtype}; "
            "adapters are exported from float32."
        )
    return array


def _factor_tensors(
    flat, factors: Mapping[tuple, adapter_format.Factor], lora: lora_lib.LoraConfig, base_config
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
                f"trainable leaf {adapter_format.dotted_path(state_path)} has shape {array.shape}; "
                f"expected a stacked [L, I, R] / [L, R, O] factor with R = lora.rank = {lora.rank} "
                "(select one learner first)."
            )
        if base_config is not None:
            expected = adapter_format.expected_factor_shape(factor, base_config, lora.rank)
            if array.shape != expected:
                raise ValueError(
                    f"trainable leaf {adapter_format.dotted_path(state_path)} has shape {array.shape}, "
                    f"but base_config (fingerprint {adapter_format.base_fingerprint(base_config)}) needs {expected}."
                )
        for layer in range(array.shape[0]):
            # torch Linear layout: A [R, I], B [O, R] (see adapter_format's docstring).
            name = adapter_format.peft_tensor_name(factor.module_path, layer, factor.is_a)
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
    kernel = _host_float32(adapter_format.leaf_at(flat, kernel_path), kernel_path)
    bias = _host_float32(adapter_format.leaf_at(flat, bias_path), bias_path)
    hidden = base_config.hidden_size if base_config is not None else kernel.shape[0]
    if kernel.shape != (hidden, 1) or bias.shape != (1,):
        raise ValueError(
            f"value head has kernel {kernel.shape} and bias {bias.shape}; expected ({hidden}, 1) and (1,)."
        )
    return {
        adapter_format.VALUE_WEIGHT_NAME: np.ascontiguousarray(kernel.T),
        adapter_format.VALUE_BIAS_NAME: bias.copy(),
    }


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

    The files and the tensor mapping are in ``adapter_format``'s docstring.
    The result loads with ``peft.PeftModel.from_pretrained(<Family>ForCausalLM,
    path)`` and with ``adapter_load.load_peft_adapter``. A training state holds [N] learners; pass
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
    factors, value_paths = adapter_format.sort_trainable(flat)
    targets = adapter_format.targets_in(factors)
    if set(targets) != set(lora.targets):
        raise ValueError(
            f"lora.targets {lora.targets} do not match the trainable state's adapted layers {targets}."
        )
    tensors = _factor_tensors(flat, factors, lora, base_config)
    value_tensors = _value_head_tensors(flat, value_paths, base_config) if value_head else None

    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    # "format": "pt" is what torch-side readers (transformers, PEFT) expect.
    safetensors.numpy.save_file(tensors, directory / adapter_format.ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    value_head_file = directory / adapter_format.VALUE_HEAD_FILE
    if value_tensors is not None:
        safetensors.numpy.save_file(value_tensors, value_head_file, metadata={"format": "pt"})
    elif value_head_file.exists():
        # A stale head from an earlier export would be read as this adapter's.
        value_head_file.unlink()
    module_names = adapter_format.peft_module_names(base_config)
    adapter_config = _peft_adapter_config(lora, base_model_name_or_path, module_names)
    _write_json(directory / adapter_format.ADAPTER_CONFIG_FILE, adapter_config)
    _write_json(
        directory / adapter_format.METADATA_FILE,
        {
            "format": adapter_format.METADATA_FORMAT,
            "version": adapter_format.METADATA_VERSION,
            "base_model_name_or_path": base_model_name_or_path,
            "base_fingerprint": None if base_config is None else adapter_format.base_fingerprint(base_config),
            "base_architecture": None if base_config is None else adapter_format.base_architecture(base_config),
            "value_head": value_tensors is not None,
        },
    )


def _write_json(file: pathlib.Path, content: Mapping[str, Any]) -> None:
    with open(file, "w") as f:
        json.dump(content, f, indent=2, sort_keys=True)
        f.write("\n")

