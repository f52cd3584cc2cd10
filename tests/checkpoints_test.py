"""Hugging Face checkpoint directories: save, load, tokenizer, and clear errors."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import torch
import transformers
from flax import nnx

from moraljax import games
from moraljax import prompt_tables
from moraljax import prompts
from moraljax.llm import checkpoints
from moraljax.llm import decoder
from moraljax.llm import lora
from moraljax.llm import policy as policy_lib
from moraljax.llm import tiny

CONFIG = decoder.DecoderConfig(
    vocab_size=40,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    layer_types=("sliding_attention", "full_attention"),
    sliding_window=4,
    query_pre_attn_scalar=8,
    attn_logit_softcapping=5.0,
    final_logit_softcapping=2.0,
)
WORDS = ["you", "choose", "action1", "action2", "the", "game", "is", "score", "play", "round"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start>{{ message['role'] }} {{ message['content'] }}<end>"
    "{% endfor %}{% if add_generation_prompt %}<start>model {% endif %}"
)


def _make_tokenizer(chat_template=CHAT_TEMPLATE):
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start>": 4, "<end>": 5, "user": 6, "model": 7}
    vocab.update({word: 8 + i for i, word in enumerate(WORDS)})
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start>", "<end>"],
        padding_side="left",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def source_policy():
    """A random policy with randomised norms (transformers inits them to zero)."""
    policy = policy_lib.init_policy(CONFIG, key=jax.random.key(0))
    graphdef, trainable, frozen = policy_lib.split_policy(policy)
    flat = []
    for index, (path, variable) in enumerate(nnx.to_flat_state(frozen)):
        value = variable[...]
        if path[-1] == "scale":
            value = 0.5 * jax.random.normal(jax.random.key(index), value.shape)
        else:
            value = 10.0 * value  # beyond the 0.02 init, so the softcaps bind
        flat.append((path, variable.copy(value)))
    return policy_lib.merge_policy(graphdef, trainable, nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def checkpoint_dir(source_policy, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    checkpoints.save_hf_checkpoint(source_policy, directory)
    _make_tokenizer().save_pretrained(directory)
    return directory


def _copy(directory, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return target


def _frozen_leaves(policy):
    return {".".join(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(policy_lib.split_policy(policy)[2])}


def test_saved_checkpoint_loads_in_transformers_with_equal_logits(source_policy, checkpoint_dir):
    hf_model = transformers.Gemma2ForCausalLM.from_pretrained(checkpoint_dir, attn_implementation="eager").eval()
    ids = np.array([[0, 0, 9, 10, 11, 12, 13, 14], [8, 9, 10, 11, 12, 13, 14, 15]])
    mask = (ids != 0).astype(np.int64)
    mask[1] = 1
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        theirs = hf_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()
    out = source_policy.forward(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))
    ours = np.asarray(source_policy.logits(out.hidden))
    valid = mask.astype(bool)
    assert np.abs(ours - theirs)[valid].max() < 1e-4
    assert np.abs(theirs).max() > 0.9 * 2.0  # the final cap binds


def test_load_round_trip_and_tokenizer(source_policy, checkpoint_dir):
    policy, tokenizer, config = checkpoints.load_hf_checkpoint(
        checkpoint_dir, lora=lora.LoraConfig(rank=2), value_head_dropout=0.0, key=jax.random.key(1)
    )
    assert config == CONFIG
    expected = _frozen_leaves(source_policy)
    loaded = _frozen_leaves(policy)
    assert expected.keys() == loaded.keys()
    for name in expected:
        np.testing.assert_array_equal(loaded[name], expected[name], err_msg=name)
    assert policy.value_head.dropout_rate == 0.0
    assert policy.model.layers.mlp.up_proj.lora_a[...].shape == (2, 32, 2)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "you choose action1"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<bos><start>user you choose action1<end><start>model "
    assert tokenizer.decode(tokenizer.encode("action2 game", add_special_tokens=False)) == "action2 game"


def test_bfloat16_save_and_float32_load(source_policy, tmp_path):
    graphdef, trainable, frozen = policy_lib.split_policy(source_policy)
    bf16_frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen)
    abstract = nnx.eval_shape(lambda: policy_lib.Policy(CONFIG, param_dtype=jnp.bfloat16, key=jax.random.key(0)))
    bf16_policy = policy_lib.merge_policy(nnx.graphdef(abstract), trainable, bf16_frozen)
    checkpoints.save_hf_checkpoint(bf16_policy.model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    stored = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == jnp.bfloat16
    assert stored["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)  # [out, in]
    assert stored["model.layers.1.mlp.down_proj.weight"].shape == (32, 48)
    assert "lm_head.weight" not in stored
    upcast, _ = checkpoints.load_hf_model(tmp_path, param_dtype=jnp.float32, key=jax.random.key(0))
    for name, value in _frozen_leaves(upcast).items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, _frozen_leaves(bf16_policy)[name].astype(np.float32))


def test_shardings_are_applied_per_parameter(checkpoint_dir):
    device = jax.devices()[0]
    calls = {}

    def shardings(path, shape):
        calls[path] = shape
        return jax.sharding.SingleDeviceSharding(device)

    policy, _ = checkpoints.load_hf_model(checkpoint_dir, key=jax.random.key(0), shardings=shardings)
    assert calls["model.layers.self_attn.q_proj.kernel"] == (2, 32, 32)
    assert calls["model.embed_tokens.embedding"] == (40, 32)
    assert calls["model.norm.scale"] == (32,)
    assert set(calls) == set(_frozen_leaves(policy))


def test_no_such_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        checkpoints.load_hf_checkpoint(missing, key=jax.random.key(0))
    assert str(missing) in str(info.value)


def test_no_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoints.load_hf_model(tmp_path, key=jax.random.key(0))


def test_wrong_model_type(checkpoint_dir, tmp_path):
    directory = _copy(checkpoint_dir, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "mistral"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(checkpoints.CheckpointError) as info:
        checkpoints.load_hf_model(directory, key=jax.random.key(0))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{directory / 'config.json'}: model_type='mistral' is not allowed; expected one of")
    for family in ("'gemma2'", "'gemma3_text'", "'llama'", "'qwen2'", "'qwen3'"):
        assert family in message


def test_no_weights(checkpoint_dir, tmp_path):
    directory = _copy(checkpoint_dir, tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        checkpoints.load_hf_model(directory, key=jax.random.key(0))


def test_missing_shard_file(checkpoint_dir, tmp_path):
    directory = _copy(checkpoint_dir, tmp_path)
    (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
    names = safetensors.numpy.load_file(directory / "model-00001-of-00002.safetensors")
    weight_map = {name: "model-00001-of-00002.safetensors" for name in names}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        checkpoints.load_hf_model(directory, key=jax.random.key(0))


def _rewrite_weights(directory, edit):
    tensors = safetensors.numpy.load_file(directory / "model.safetensors")
    edit(tensors)
    safetensors.numpy.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(checkpoint_dir, tmp_path):
    directory = _copy(checkpoint_dir, tmp_path)
    _rewrite_weights(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        checkpoints.load_hf_model(directory, key=jax.random.key(0))


def test_misshaped_tensor_is_named_with_both_shapes(checkpoint_dir, tmp_path):
    directory = _copy(checkpoint_dir, tmp_path)

    def transpose_k(tensors):
        name = "model.layers.0.self_attn.k_proj.weight"
        tensors[name] = np.ascontiguousarray(tensors[name].T)

    _rewrite_weights(directory, transpose_k)
    with pytest.raises(ValueError) as info:
        checkpoints.load_hf_model(directory, key=jax.random.key(0))
    message = str(info.value)
    assert "model.layers.0.self_attn.k_proj.weight" in message
    assert "shape (32, 16), expected (16, 32)" in message


def test_tokenizer_without_chat_template(checkpoint_dir, tmp_path):
    directory = _copy(checkpoint_dir, tmp_path)
    for file in directory.glob("tokenizer*"):
        file.unlink()
    for file in directory.glob("chat_template*"):
        file.unlink()
    _make_tokenizer(chat_template=None).save_pretrained(directory)
    with pytest.raises(ValueError, match="no chat template"):
        checkpoints.load_hf_checkpoint(directory, key=jax.random.key(0))


def test_no_tokenizer(checkpoint_dir, tmp_path):
    directory = _copy(checkpoint_dir, tmp_path)
    for file in directory.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            file.unlink()
    with pytest.raises(ValueError, match="tokenizer"):
        checkpoints.load_tokenizer(directory)


# ----------------------------------------------------------------------------
# Unusable directories: one line naming the file, from the library and from the command line.

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _launch_on(model_dir, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "moraljax.launch", f"--config=configs/ipd_util.py:model={model_dir}",
         f"--workdir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def test_empty_model_directory_is_one_line_naming_config_json(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        checkpoints.load_hf_checkpoint(empty, key=jax.random.key(0))
    assert str(info.value) == f"{empty / 'config.json'} not found: not a Hugging Face checkpoint directory."
    result = _launch_on(empty, tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip() == f"moraljax: {info.value}"
    assert not (tmp_path / "run").exists()


def test_truncated_weights_are_one_line_naming_the_file(tmp_path):
    directory = _copy(tiny.CHECKPOINT_DIR, tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(checkpoints.CheckpointError) as info:
        checkpoints.load_hf_checkpoint(directory, key=jax.random.key(0))
    message = str(info.value)
    assert message.startswith(f"{weights}: cannot be read as safetensors (truncated or corrupt?): ")
    assert "\n" not in message
    result = _launch_on(directory, tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip() == f"moraljax: {message}"


def test_unreadable_config_json_is_one_line(checkpoint_dir, tmp_path):
    directory = _copy(checkpoint_dir, tmp_path)
    (directory / "config.json").write_text('{"model_type": "gemma2",')
    with pytest.raises(checkpoints.CheckpointError, match=r"config.json: not valid JSON: "):
        checkpoints.read_config(directory)


# ----------------------------------------------------------------------------
# Tokenizer files that transformers 4.4x reads as well as 5.x.

def _v5_only_form(config):
    """The tokenizer_config.json form that transformers 5 writes and 4.57 refuses.

    transformers 5's own class name, and the extra special tokens as a list
    under a key that 4.x reads as a dict of named tokens.
    """
    out = {}
    for key, value in config.items():
        if key == "additional_special_tokens":
            key = "extra_special_tokens"
        elif key == "tokenizer_class":
            value = "TokenizersBackend"
        out[key] = value
    return out


def test_shipped_tokenizer_config_is_portable_and_reads_exactly_as_before(tmp_path):
    shipped = json.loads((tiny.CHECKPOINT_DIR / "tokenizer_config.json").read_text())
    assert shipped["tokenizer_class"] == checkpoints.PORTABLE_TOKENIZER_CLASS
    assert "extra_special_tokens" not in shipped
    # The same directory with the tokenizer_config.json it shipped with before.
    before = _copy(tiny.CHECKPOINT_DIR, tmp_path)
    (before / "tokenizer_config.json").write_text(json.dumps(_v5_only_form(shipped), indent=2))
    new = transformers.AutoTokenizer.from_pretrained(str(tiny.CHECKPOINT_DIR), local_files_only=True)
    old = transformers.AutoTokenizer.from_pretrained(str(before), local_files_only=True)
    assert type(new) is type(old)
    names = ("pad_token", "bos_token", "eos_token", "unk_token", "padding_side", "chat_template", "all_special_ids")
    for name in names:
        assert getattr(new, name) == getattr(old, name), name
    assert len(new) == len(old)
    # Every structured prompt, as a run tokenises it, gets the same ids.
    for game in games.EVALUATION_GAME_NAMES:
        for actions in (prompts.TRAIN_ACTIONS, prompts.TEST_ACTIONS):
            for order in prompts.TABLE_ORDERS:
                tables = [prompt_tables.build_prompt_table(t, games.GAMES[game].payoffs, actions=actions,
                                                           table_order=order)
                          for t in (new, old)]
                np.testing.assert_array_equal(tables[0].ids, tables[1].ids)
    assert new.encode("hi action3", add_special_tokens=True) == old.encode("hi action3", add_special_tokens=True)
    # The portable rewrite of the old form is the shipped file, byte for byte.
    checkpoints.portable_tokenizer_config(before / "tokenizer_config.json")
    shipped_bytes = (tiny.CHECKPOINT_DIR / "tokenizer_config.json").read_bytes()
    assert (before / "tokenizer_config.json").read_bytes() == shipped_bytes


def test_save_tokenizer_writes_the_portable_form(tmp_path):
    tokenizer = _make_tokenizer()
    checkpoints.save_tokenizer(tokenizer, tmp_path)
    written = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert written["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert written["additional_special_tokens"] == ["<start>", "<end>"] and "extra_special_tokens" not in written
    reloaded = checkpoints.load_tokenizer(tmp_path)
    text = "you choose action1 the game"
    assert reloaded.encode(text) == tokenizer.encode(text)
    assert reloaded.convert_tokens_to_ids(["<start>", "<end>"]) == [4, 5]
