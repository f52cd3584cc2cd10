"""Hugging Face checkpoint directories <-> moraljax policies, for every supported family.

A checkpoint directory is what ``transformers``' ``save_pretrained`` writes:
``config.json`` (its model_type names the family, ``families.py``), the
weights as one ``model.safetensors`` or as shards listed in
``model.safetensors.index.json``, and the tokenizer files (with a chat
template). google/gemma-2-2b-it, the other families' instruction models and
the built-in tiny model (``moraljax/llm/tiny``) load through the same code.

Weights are converted one tensor at a time: transformers' ``[out, in]``
linear weights become ``[in, out]`` kernels, the per-layer tensors
``model.layers.{l}.<name>.weight`` (and ``.bias``) are stacked into one
[L, ...] parameter, and everything is cast to ``param_dtype``. At most one
stacked parameter is held on the host at once; with ``shardings`` each is
placed on its devices as soon as it is assembled. ``lm_head.weight`` is read
into the model's own head when the family's config unties it, and ignored
when tied.

Name mapping (moraljax state path -> transformers tensor name), with the
family's module names (``families.hf_tensor_name``):
    model.embed_tokens.embedding          model.embed_tokens.weight
    model.norm.scale                      model.norm.weight
    model.lm_head.kernel                  lm_head.weight (transposed; untied only)
    model.layers.<module path>.kernel     model.layers.{l}.<module path>.weight (transposed)
    model.layers.<module path>.bias       model.layers.{l}.<module path>.bias
    model.layers.<norm>.scale             model.layers.{l}.<norm>.weight

A file that cannot be read is reported in one line naming the file and the
problem (``CheckpointError``), never as a library traceback.
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

from moraljax.llm import decoder
from moraljax.llm import families
from moraljax.llm import lora as lora_lib
from moraljax.llm import policy as policy_lib

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Files of which at least one makes a tokenizer (fast, or SentencePiece/tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json")
# A tokenizer class name that transformers 4.4x and 5.x both read. transformers 5
# writes "TokenizersBackend", which 4.x does not know; in 5.x
# PreTrainedTokenizerFast is that same class.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


class CheckpointError(ValueError):
    """A checkpoint directory's file that cannot be used: one line, naming the file."""


def _is_stacked(path: tuple[str, ...]) -> bool:
    return path[:2] == ("model", "layers")


def _is_kernel(path: tuple[str, ...]) -> bool:
    return path[-1] == "kernel"


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _safe_open(file: pathlib.Path, stack: contextlib.ExitStack):
    """``safetensors.safe_open`` that reports an unreadable file in one line."""
    try:
        return stack.enter_context(safetensors.safe_open(file, framework="np"))
    except (safetensors.SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{file}: cannot be read as safetensors (truncated or corrupt?): {_first_line(error)}"
        ) from error


class _SafetensorsReader:
    """Lazy access to tensors of a single-file or sharded safetensors checkpoint."""

    def __init__(self, directory: pathlib.Path, stack: contextlib.ExitStack):
        single = directory / WEIGHTS_FILE
        index = directory / WEIGHTS_INDEX_FILE
        self._stack = stack
        self._handles = {}
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object.")
            self._files = {name: directory / file for name, file in weight_map.items()}
        elif single.is_file():
            self._files = {name: single for name in self._handle(single).keys()}
        else:
            raise FileNotFoundError(
                f"{directory}: no weights found (expected {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE})."
            )
        for file in set(self._files.values()):
            if not file.is_file():
                raise FileNotFoundError(f"{file}: weight shard listed in {WEIGHTS_INDEX_FILE} does not exist.")
        self.used: set[str] = set()

    def _handle(self, file: pathlib.Path):
        if file not in self._handles:
            self._handles[file] = _safe_open(file, self._stack)
        return self._handles[file]

    def read(self, name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
        """The tensor ``name`` as numpy, after checking its shape.

        Raises:
            ValueError: if the tensor is missing or has another shape.
            CheckpointError: if its file cannot be read.
        """
        if name not in self._files:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}.")
        file = self._files[name]
        handle = self._handle(file)
        try:
            shape = tuple(handle.get_slice(name).get_shape())
            if shape != tuple(expected_shape):
                raise CheckpointError(
                    f"{file}: tensor {name!r} has shape {shape}, expected {tuple(expected_shape)}."
                )
            tensor = handle.get_tensor(name)
        except safetensors.SafetensorError as error:
            raise CheckpointError(f"{file}: tensor {name!r} cannot be read: {_first_line(error)}") from error
        self.used.add(name)
        return tensor

    def unused(self) -> list[str]:
        return sorted(set(self._files) - self.used)


def _read_json(file: pathlib.Path) -> dict:
    try:
        with open(file) as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file}: not valid JSON: {_first_line(error)}") from error
    if not isinstance(content, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(content).__name__}.")
    return content


def _checkpoint_directory(path: str | os.PathLike) -> pathlib.Path:
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist.")
    return directory


def read_config(path: str | os.PathLike) -> decoder.DecoderConfig:
    """Reads and validates ``config.json`` of a checkpoint directory.

    Args:
        path: the checkpoint directory.

    Returns:
        The ``DecoderConfig`` of its family.

    Raises:
        FileNotFoundError: if the directory or its config.json is missing.
        CheckpointError: if config.json is unreadable, of an unsupported
            family, or asks for something the decoder does not implement
            (one line: the file, then the field, value and what is allowed).
    """
    directory = _checkpoint_directory(path)
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a Hugging Face checkpoint directory.")
    hf_config = _read_json(config_file)
    try:
        return families.config_from_hf(hf_config)
    except ValueError as error:
        raise CheckpointError(f"{config_file}: {error}") from error


def _read_frozen_leaves(reader: _SafetensorsReader, config: decoder.DecoderConfig, frozen_abstract, shardings):
    """(path, variable) of every frozen leaf, read, converted and placed."""
    leaves = []
    for state_path, variable in nnx.to_flat_state(frozen_abstract):
        shape, dtype = tuple(variable.shape), np.dtype(variable.dtype)
        per_layer_shape = shape[1:] if _is_stacked(state_path) else shape
        hf_shape = per_layer_shape[::-1] if _is_kernel(state_path) else per_layer_shape

        def convert(tensor, state_path=state_path):
            return tensor.T if _is_kernel(state_path) else tensor

        if _is_stacked(state_path):
            host = np.empty(shape, dtype)
            for layer in range(config.num_hidden_layers):
                host[layer] = convert(reader.read(families.hf_tensor_name(config, state_path, layer), hf_shape))
        else:
            name = families.hf_tensor_name(config, state_path, None)
            host = np.asarray(convert(reader.read(name, hf_shape)), dtype)
        leaves.append((state_path, variable.copy(policy_lib.place(host, _dotted(state_path), shardings))))
        del host
    return leaves


def load_hf_model(
    path: str | os.PathLike,
    *,
    param_dtype: jnp.dtype = jnp.float32,
    lora: lora_lib.LoraConfig | None = lora_lib.LoraConfig(),
    value_head_dropout: float = 0.1,
    key: jax.Array,
    shardings: policy_lib.ShardingFn | None = None,
) -> tuple[policy_lib.Policy, decoder.DecoderConfig]:
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
        CheckpointError: unsupported config, missing or mis-shaped tensor,
            unreadable file.
    """
    directory = pathlib.Path(path)
    config = read_config(directory)
    abstract = nnx.eval_shape(
        lambda: policy_lib.Policy(
            config, lora=lora, value_head_dropout=value_head_dropout, param_dtype=param_dtype, key=key
        )
    )
    graphdef, trainable_abstract, frozen_abstract = policy_lib.split_policy(abstract)
    with contextlib.ExitStack() as stack:
        reader = _SafetensorsReader(directory, stack)
        frozen_leaves = _read_frozen_leaves(reader, config, frozen_abstract, shardings)
        unused = reader.unused()
    if config.tie_word_embeddings and families.LM_HEAD_NAME in unused:
        unused.remove(families.LM_HEAD_NAME)  # A tied head saved anyway is the embedding again.
    if unused:
        logging.warning("%s: ignoring %d unused tensors, e.g. %s", directory, len(unused), unused[:5])

    frozen = nnx.from_flat_state(frozen_leaves)
    trainable = jax.jit(lambda k: lora_lib.init_trainable(trainable_abstract, k))(key)
    return policy_lib.merge_policy(graphdef, trainable, frozen), config


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer and chat template, from local files only.

    A tokenizer without a pad token (Llama 3's) gets its EOS token as pad:
    prompt tables are left-padded and the padding is masked, so any id will
    do.

    Args:
        path: checkpoint directory.

    Returns:
        A ``transformers.PreTrainedTokenizerBase`` with a chat template and a
        pad token.

    Raises:
        FileNotFoundError: if the directory does not exist.
        CheckpointError: if it has no tokenizer files, or the tokenizer
            cannot be loaded or has no chat template.
    """
    import transformers  # Heavy import, needed only here.

    directory = _checkpoint_directory(path)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{directory}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}).")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{directory}: could not load a tokenizer: {_first_line(error)}") from error
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(f"{directory}: the tokenizer has no chat template (chat_template is empty).")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CheckpointError(f"{directory}: the tokenizer has neither a pad nor an EOS token to pad with.")
        logging.info("%s: no pad token; padding with the EOS token %r.", directory, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_hf_checkpoint(
    path: str | os.PathLike,
    *,
    param_dtype: jnp.dtype = jnp.float32,
    lora: lora_lib.LoraConfig | None = lora_lib.LoraConfig(),
    value_head_dropout: float = 0.1,
    key: jax.Array,
    shardings: policy_lib.ShardingFn | None = None,
):
    """Policy, tokenizer and config of a Hugging Face checkpoint directory.

    config.json is read first, so a directory that is not a checkpoint at
    all is reported as such.

    Args:
        path: checkpoint directory.
        param_dtype, lora, value_head_dropout, key, shardings: see
            ``load_hf_model``.

    Returns:
        (policy, tokenizer, config).

    Raises:
        FileNotFoundError, CheckpointError: see ``load_hf_model`` and
            ``load_tokenizer``.
    """
    read_config(path)
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


def save_hf_checkpoint(model: policy_lib.Policy | decoder.Decoder, path: str | os.PathLike) -> None:
    """Writes the frozen base as ``config.json`` + ``model.safetensors``.

    The result loads with the family's ``<Family>ForCausalLM.from_pretrained``
    and with ``load_hf_model``. LoRA factors and the value head are not
    written (they belong to training checkpoints). Tokenizer files are
    written by ``save_tokenizer``.

    Args:
        model: a ``Policy`` or a bare ``Decoder``.
        path: output directory (created if missing).
    """
    base = model.model if isinstance(model, policy_lib.Policy) else model
    config = base.config
    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for state_path, variable in nnx.to_flat_state(nnx.state(base, nnx.Not(lora_lib.TRAINABLE))):
        state_path = ("model", *state_path)
        array = np.asarray(variable[...])
        if _is_stacked(state_path):
            for layer in range(array.shape[0]):
                tensor = array[layer].T if _is_kernel(state_path) else array[layer]
                tensors[families.hf_tensor_name(config, state_path, layer)] = np.ascontiguousarray(tensor)
        else:
            tensor = array.T if _is_kernel(state_path) else array
            tensors[families.hf_tensor_name(config, state_path, None)] = np.ascontiguousarray(tensor)
    safetensors.numpy.save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    with open(directory / CONFIG_FILE, "w") as f:
        json.dump(families.config_to_hf(config, dtype=str(base.dtype)), f, indent=2)


def save_tokenizer(tokenizer, path: str | os.PathLike) -> None:
    """``tokenizer.save_pretrained(path)``, readable by transformers 4.4x as well as 5.x.

    transformers 5 writes a tokenizer_config.json that only it reads (see
    ``portable_tokenizer_config``); this rewrites it in the form both read.
    The tokenizer itself (tokenizer.json) is written unchanged.

    Args:
        tokenizer: a transformers fast tokenizer.
        path: output directory.
    """
    tokenizer.save_pretrained(str(path))
    portable_tokenizer_config(pathlib.Path(path) / TOKENIZER_CONFIG_FILE)


def portable_tokenizer_config(file: pathlib.Path) -> None:
    """Rewrites a transformers-5 tokenizer_config.json so that transformers 4.4x reads it too.

    Two spellings of transformers 5 break 4.x: the class name
    "TokenizersBackend" (4.x knows its fast tokenizer as
    ``PORTABLE_TOKENIZER_CLASS``, which is the same class in 5.x), and
    ``extra_special_tokens`` as a list (4.x reads that key as a dict of named
    tokens; the list is what both call ``additional_special_tokens``). Only
    these two entries change; the key order is kept. A file in neither
    spelling is left as it is.
    """
    config = _read_json(file)
    portable = {}
    for key, value in config.items():
        if key == "tokenizer_class" and value == "TokenizersBackend":
            value = PORTABLE_TOKENIZER_CLASS
        elif key == "extra_special_tokens" and isinstance(value, list):
            key = "additional_special_tokens"
        portable[key] = value
    if portable != config or list(portable) != list(config):
        file.write_text(json.dumps(portable, indent=2, ensure_ascii=False) + "\n")
