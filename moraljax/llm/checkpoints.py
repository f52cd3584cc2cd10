"""Hugging Face Gemma-2 checkpoint directories <-> moraljax policies.

A checkpoint directory is what ``transformers``' ``save_pretrained`` writes:
``config.json`` (model_type "gemma2"), the weights as one
``model.safetensors`` or as shards listed in ``model.safetensors.index.json``,
and the tokenizer files (with a chat template). google/gemma-2-2b-it and the
built-in tiny model (``moraljax/llm/tiny``) load through the same code.

Weights are converted one tensor at a time: transformers' ``[out, in]``
linear weights become ``[in, out]`` kernels, the per-layer tensors
``model.layers.{l}.<name>.weight`` are stacked into one [L, ...] parameter,
and everything is cast to ``param_dtype``. At most one stacked parameter is
held on the host at once; with ``shardings`` each is placed on its devices as
soon as it is assembled. ``lm_head.weight``, if present, is ignored: Gemma-2
ties it to the embedding.

Name mapping (moraljax state path -> transformers tensor name):
    model.embed_tokens.embedding          model.embed_tokens.weight
    model.norm.scale                      model.norm.weight
    model.layers.<module path>.kernel     model.layers.{l}.<module path>.weight (transposed)
    model.layers.<norm>.scale             model.layers.{l}.<norm>.weight
"""

import contextlib
import json
import os
import pathlib
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging
from flax import nnx

from moraljax.llm import gemma2
from moraljax.llm import lora as lora_lib

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
_TIED_HEAD = "lm_head.weight"



def _hf_name(path: tuple[str, ...], layer: int | None) -> str:
    """transformers tensor name of a frozen leaf (see the module docstring)."""
    module_path = ".".join(path[:-1])  # e.g. model.layers.self_attn.q_proj
    if layer is not None:
        module_path = module_path.replace("model.layers.", f"model.layers.{layer}.", 1)
    return f"{module_path}.weight"


def _is_stacked(path: tuple[str, ...]) -> bool:
    return path[:2] == ("model", "layers")


def _is_kernel(path: tuple[str, ...]) -> bool:
    return path[-1] == "kernel"


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


class _SafetensorsReader:
    """Lazy access to tensors of a single-file or sharded safetensors checkpoint."""

    def __init__(self, directory: pathlib.Path, stack: contextlib.ExitStack):
        single = directory / WEIGHTS_FILE
        index = directory / WEIGHTS_INDEX_FILE
        if index.is_file():
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object.")
            self._files = {name: directory / file for name, file in weight_map.items()}
        elif single.is_file():
            with safetensors.safe_open(single, framework="np") as f:
                self._files = {name: single for name in f.keys()}
        else:
            raise FileNotFoundError(
                f"{directory}: no weights found (expected {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE})."
            )
        for file in set(self._files.values()):
            if not file.is_file():
                raise FileNotFoundError(f"{file}: weight shard listed in {WEIGHTS_INDEX_FILE} does not exist.")
        self._stack = stack
        self._handles = {}
        self.used: set[str] = set()

    def _handle(self, file: pathlib.Path):
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safetensors.safe_open(file, framework="np"))
        return self._handles[file]

    def read(self, name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
        """The tensor ``name`` as numpy, after checking its shape.

        Raises:
            ValueError: if the tensor is missing or has another shape.
        """
        if name not in self._files:
            raise ValueError(f"checkpoint is missing tensor {name!r}.")
        file = self._files[name]
        handle = self._handle(file)
        shape = tuple(handle.get_slice(name).get_shape())
        if shape != tuple(expected_shape):
            raise ValueError(f"{file}: tensor {name!r} has shape {shape}, expected {tuple(expected_shape)}.")
        self.used.add(name)
        return handle.get_tensor(name)

    def unused(self) -> list[str]:
        return sorted(set(self._files) - self.used - {_TIED_HEAD})


def read_config(path: str | os.PathLike) -> gemma2.Gemma2Config:
    """Reads and validates ``config.json`` of a checkpoint directory.

    Args:
        path: the checkpoint directory.

    Returns:
        The ``Gemma2Config``.

    Raises:
        FileNotFoundError: if the directory or its config.json is missing.
        ValueError: if the config is not a supported Gemma-2 config.
    """
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist.")
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a Hugging Face checkpoint directory.")
    with open(config_file) as f:
        hf_config = json.load(f)
    model_type = hf_config.get("model_type")
    if model_type != "gemma2":
        raise ValueError(f"{config_file}: model_type must be 'gemma2', got {model_type!r}.")
    try:
        return gemma2.Gemma2Config.from_hf(hf_config)
    except ValueError as error:
        raise ValueError(f"{config_file}: {error}") from error


def load_hf_model(
    path: str | os.PathLike,
    *,
    param_dtype: jnp.dtype = jnp.float32,
    lora: lora_lib.LoraConfig | None = lora_lib.LoraConfig(),
    value_head_dropout: float = 0.1,
    key: jax.Array,
    shardings: gemma2.ShardingFn | None = None,
) -> tuple[gemma2.Policy, gemma2.Gemma2Config]:
    """Builds a ``Policy`` whose frozen base holds a checkpoint's weights.

    The policy is first built abstractly (no random base weights are made),
    then each parameter is read, converted and placed. LoRA factors and the
    value head are fresh: ``lora.init_trainable(policy, key)``.

    Args:
        path: checkpoint directory.
        param_dtype: dtype of the frozen weights (float32, or bfloat16 on
            accelerators).
        lora: adapter settings, or None for none.
        value_head_dropout: dropout on the value head's input.
        key: PRNG key for the trainable parameters.
        shardings: optional ``fn(path, shape) -> Sharding | None`` called for
            every frozen parameter with its dotted state path (e.g.
            "model.layers.self_attn.q_proj.kernel") and shape; the parameter
            is ``jax.device_put`` there (None: default device).

    Returns:
        (policy, config).

    Raises:
        FileNotFoundError: missing directory, config.json or weights.
        ValueError: non-gemma2 config, missing or mis-shaped tensor.
    """
    directory = pathlib.Path(path)
    config = read_config(directory)
    abstract = nnx.eval_shape(
        lambda: gemma2.Policy(
            config, lora=lora, value_head_dropout=value_head_dropout, param_dtype=param_dtype, key=key
        )
    )
    graphdef, trainable_abstract, frozen_abstract = gemma2.split_policy(abstract)
    num_layers = config.num_hidden_layers

    frozen_leaves = []
    with contextlib.ExitStack() as stack:
        reader = _SafetensorsReader(directory, stack)
        for state_path, variable in nnx.to_flat_state(frozen_abstract):
            shape, dtype = tuple(variable.shape), np.dtype(variable.dtype)
            per_layer_shape = shape[1:] if _is_stacked(state_path) else shape
            hf_shape = per_layer_shape[::-1] if _is_kernel(state_path) else per_layer_shape

            def convert(tensor, state_path=state_path):
                return tensor.T if _is_kernel(state_path) else tensor

            if _is_stacked(state_path):
                host = np.empty(shape, dtype)
                for layer in range(num_layers):
                    host[layer] = convert(reader.read(_hf_name(state_path, layer), hf_shape))
            else:
                host = np.asarray(convert(reader.read(_hf_name(state_path, None), hf_shape)), dtype)
            frozen_leaves.append((state_path, variable.copy(gemma2.place(host, _dotted(state_path), shardings))))
            del host
        unused = reader.unused()
    if unused:
        logging.warning("%s: ignoring %d unused tensors, e.g. %s", directory, len(unused), unused[:5])

    frozen = nnx.from_flat_state(frozen_leaves)
    trainable = jax.jit(lambda k: lora_lib.init_trainable(trainable_abstract, k))(key)
    return gemma2.merge_policy(graphdef, trainable, frozen), config


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer, from local files only.

    Args:
        path: checkpoint directory.

    Returns:
        A ``transformers.PreTrainedTokenizerBase`` with a chat template.

    Raises:
        FileNotFoundError: if the directory does not exist.
        ValueError: if no tokenizer can be loaded or it has no chat template.
    """
    import transformers  # Heavy import, needed only here.

    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist.")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"{directory}: could not load a tokenizer: {error}") from error
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{directory}: the tokenizer has no chat template (chat_template is empty).")
    return tokenizer


def load_hf_checkpoint(
    path: str | os.PathLike,
    *,
    param_dtype: jnp.dtype = jnp.float32,
    lora: lora_lib.LoraConfig | None = lora_lib.LoraConfig(),
    value_head_dropout: float = 0.1,
    key: jax.Array,
    shardings: gemma2.ShardingFn | None = None,
):
    """Policy, tokenizer and config of a Hugging Face Gemma-2 directory.

    Args:
        path: checkpoint directory.
        param_dtype, lora, value_head_dropout, key, shardings: see
            ``load_hf_model``.

    Returns:
        (policy, tokenizer, config).

    Raises:
        FileNotFoundError, ValueError: see ``load_hf_model`` and
            ``load_tokenizer``.
    """
    tokenizer = load_tokenizer(path)
    policy, config = load_hf_model(
        path,
        param_dtype=param_dtype,
        lora=lora,
        value_head_dropout=value_head_dropout,
        key=key,
        shardings=shardings,
    )
    return policy, tokenizer, config


def save_hf_checkpoint(model: gemma2.Policy | gemma2.Gemma2, path: str | os.PathLike) -> None:
    """Writes the frozen base as ``config.json`` + ``model.safetensors``.

    The result loads with ``transformers.Gemma2ForCausalLM.from_pretrained``
    and with ``load_hf_model``. LoRA factors and the value head are not
    written (they belong to training checkpoints). Tokenizer files are the
    caller's (``tokenizer.save_pretrained(path)``).

    Args:
        model: a ``Policy`` or a bare ``Gemma2``.
        path: output directory (created if missing).
    """
    base = model.model if isinstance(model, gemma2.Policy) else model
    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for state_path, variable in nnx.to_flat_state(nnx.state(base, nnx.Not(lora_lib.TRAINABLE))):
        state_path = ("model", *state_path)
        array = np.asarray(variable[...])
        if _is_stacked(state_path):
            for layer in range(array.shape[0]):
                tensor = array[layer].T if _is_kernel(state_path) else array[layer]
                tensors[_hf_name(state_path, layer)] = np.ascontiguousarray(tensor)
        else:
            tensors[_hf_name(state_path, None)] = np.ascontiguousarray(array)
    safetensors.numpy.save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    with open(directory / CONFIG_FILE, "w") as f:
        json.dump(base.config.to_hf(dtype=str(base.dtype)), f, indent=2)
