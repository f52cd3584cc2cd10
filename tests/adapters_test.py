"""Tests of llm/adapter_format.py, adapter_export.py, adapter_load.py: PEFT-format LoRA adapters.

The reference is independent: a tiny random transformers Gemma2ForCausalLM
wrapped by ``peft.PeftModel.from_pretrained`` on the exported directory must
give moraljax's LoRA-enabled logits, and an adapter that PEFT itself wrote
must load into moraljax and give PEFT's logits.
"""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from moraljax.llm import adapter_export
from moraljax.llm import adapter_format
from moraljax.llm import adapter_load
from moraljax.llm import checkpoints
from moraljax.llm import decoder
from moraljax.llm import lora as lora_lib
from moraljax.llm import policy as policy_lib
from moraljax.llm import tiny

VOCAB = 160
BASE_NAME = "tiny-gemma2-for-adapter-tests"
ALL = lora_lib.LORA_TARGETS
QV = ("q", "v")


def _hf_config(**overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    return transformers.Gemma2Config(**kwargs)


def _save_random_base(directory, seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.Gemma2ForCausalLM(_hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return _save_random_base(tmp_path_factory.mktemp("base"))


def _lora(targets):
    return lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.05, targets=targets)


def _trained_policy(base_dir, targets, seed=0):
    """A policy on the checkpoint with random non-zero factors (B != 0) and head."""
    policy, config = checkpoints.load_hf_model(base_dir, lora=_lora(targets), key=jax.random.key(seed))
    graphdef, trainable, frozen = policy_lib.split_policy(policy)
    leaves = jax.tree.leaves(trainable)
    keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
    noise = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    trainable = jax.tree.unflatten(jax.tree.structure(trainable), [x + n for x, n in zip(leaves, noise)])
    return policy_lib.merge_policy(graphdef, trainable, frozen), config


def _left_padded_batch(seed=0, batch=3, length=12, pads=(4, 0, 7)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (batch, length))
    mask = (np.arange(length)[None, :] >= np.asarray(pads)[:, None]).astype(np.int64)
    return ids * mask, mask


@nnx.jit(static_argnames="lora_enabled")
def _forward(policy, ids, mask, lora_enabled=True):
    out = policy.forward(ids, decoder.positions_from_mask(mask), mask, lora_enabled=lora_enabled)
    return policy.logits(out.hidden), policy.values(out.hidden)


def _ours(policy, ids, mask, lora_enabled=True):
    logits, values = _forward(policy, jnp.asarray(ids), jnp.asarray(mask), lora_enabled=lora_enabled)
    return np.asarray(logits), np.asarray(values)


def _peft_model(base_dir, adapter_dir):
    base = transformers.Gemma2ForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def _torch_forward(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
            output_hidden_states=True,
        )
    return out.logits.numpy(), out.hidden_states[-1].numpy()


def _flat_arrays(state, only=None):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state) if only is None or p[0] == only}


def _export(policy, config, directory, targets, **kwargs):
    trainable = policy_lib.split_policy(policy)[1]
    kwargs = dict(dict(base_model_name_or_path=BASE_NAME, base_config=config), **kwargs)
    adapter_export.export_peft_adapter(trainable, _lora(targets), directory, **kwargs)
    return trainable


def _template(config, targets, rank=4):
    abstract = nnx.eval_shape(
        lambda: policy_lib.Policy(config, lora=lora_lib.LoraConfig(rank=rank, targets=targets), key=jax.random.key(0))
    )
    return policy_lib.split_policy(abstract)[1]


@pytest.mark.parametrize("targets", [ALL, QV], ids=["all", "q_v"])
def test_peft_loads_export_with_identical_logits_and_round_trip_is_exact(base_dir, tmp_path, targets):
    policy, config = _trained_policy(base_dir, targets)
    adapter_dir = tmp_path / "adapter"
    trainable = _export(policy, config, adapter_dir, targets)

    written = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert written["target_modules"] == [adapter_format.TARGET_MODULES[t] for t in targets]
    assert (written["r"], written["lora_alpha"], written["lora_dropout"]) == (4, 8.0, 0.05)
    weights = safetensors.numpy.load_file(adapter_dir / "adapter_model.safetensors")
    assert len(weights) == 2 * len(targets) * config.num_hidden_layers
    assert all(w.dtype == np.float32 for w in weights.values())

    ids, mask = _left_padded_batch()
    valid = mask.astype(bool)
    ours, our_values = _ours(policy, ids, mask)
    base_logits, _ = _ours(policy, ids, mask, lora_enabled=False)
    # The adapter moves the logits a lot, so agreement below is not vacuous.
    assert np.abs(ours - base_logits)[valid].max() > 0.1

    model = _peft_model(base_dir, adapter_dir)
    theirs, hidden = _torch_forward(model, ids, mask)
    np.testing.assert_array_less(np.abs(ours - theirs)[valid].max(), 1e-4)

    # TRL's value head (v = h W^T + b on hidden_states[-1]) from the exported file.
    head = safetensors.numpy.load_file(adapter_dir / "value_head.safetensors")
    assert head["v_head.summary.weight"].shape == (1, config.hidden_size)
    trl_values = (hidden @ head["v_head.summary.weight"].T + head["v_head.summary.bias"])[..., 0]
    np.testing.assert_allclose(our_values[valid], trl_values[valid], atol=1e-5)

    loaded, lora = adapter_load.load_peft_adapter(adapter_dir, _template(config, targets), base_config=config)
    assert lora == _lora(targets)
    expected, got = _flat_arrays(trainable), _flat_arrays(loaded)
    assert expected.keys() == got.keys()
    for path in expected:
        assert got[path].dtype == np.float32
        np.testing.assert_array_equal(got[path], expected[path], err_msg=str(path))


def test_adapter_written_by_peft_loads_into_moraljax(base_dir, tmp_path):
    """An adapter that PEFT made and saved (no moraljax files) gives PEFT's logits."""
    torch.manual_seed(3)
    base = transformers.Gemma2ForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["k_proj", "o_proj", "down_proj"], task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(base, peft_config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.3)  # B as well: PEFT starts it at zero.
    model.save_pretrained(tmp_path / "peft_adapter")
    model.eval()

    config = checkpoints.read_config(base_dir)
    targets = ("k", "o", "down")
    policy, _ = checkpoints.load_hf_model(
        base_dir, lora=lora_lib.LoraConfig(rank=4, targets=targets), key=jax.random.key(1)
    )
    graphdef, template, frozen = policy_lib.split_policy(policy)
    with pytest.raises(FileNotFoundError, match="value_head=False"):
        adapter_load.load_peft_adapter(tmp_path / "peft_adapter", template, base_config=config)
    loaded, lora = adapter_load.load_peft_adapter(
        tmp_path / "peft_adapter", template, base_config=config, value_head=False
    )
    assert lora == lora_lib.LoraConfig(rank=4, alpha=16.0, dropout=0.0, targets=targets)
    # The head comes back unchanged from the template.
    np.testing.assert_array_equal(
        np.asarray(loaded["value_head"]["kernel"][...]), np.asarray(template["value_head"]["kernel"][...])
    )

    # The scale alpha/r lives in the policy's modules, so rebuild them with the adapter's config.
    abstract = nnx.eval_shape(lambda: policy_lib.Policy(config, lora=lora, key=jax.random.key(0)))
    adapted = policy_lib.merge_policy(nnx.graphdef(abstract), loaded, frozen)
    ids, mask = _left_padded_batch(seed=1)
    valid = mask.astype(bool)
    ours, _ = _ours(adapted, ids, mask)
    theirs, _ = _torch_forward(model, ids, mask)
    base_logits, _ = _ours(adapted, ids, mask, lora_enabled=False)
    assert np.abs(ours - base_logits)[valid].max() > 0.1
    np.testing.assert_array_less(np.abs(ours - theirs)[valid].max(), 1e-4)


@pytest.fixture(scope="module")
def exported(base_dir, tmp_path_factory):
    """(adapter dir, base config) of a q,v adapter, shared by the error tests."""
    policy, config = _trained_policy(base_dir, QV, seed=1)
    directory = tmp_path_factory.mktemp("exported")
    _export(policy, config, directory, QV)
    return directory, config


def _copy(directory, destination):
    destination.mkdir()
    for file in directory.iterdir():
        (destination / file.name).write_bytes(file.read_bytes())
    return destination


def test_missing_tensor_is_named(exported, tmp_path):
    directory, config = exported
    broken = _copy(directory, tmp_path / "broken")
    weights = safetensors.numpy.load_file(broken / "adapter_model.safetensors")
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del weights[name]
    safetensors.numpy.save_file(weights, broken / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        adapter_load.load_peft_adapter(broken, _template(config, QV), base_config=config)


def test_unexpected_tensor_is_refused(exported, tmp_path):
    directory, config = exported
    broken = _copy(directory, tmp_path / "extra")
    weights = safetensors.numpy.load_file(broken / "adapter_model.safetensors")
    weights["base_model.model.lm_head.weight"] = np.zeros((VOCAB, config.hidden_size), np.float32)
    safetensors.numpy.save_file(weights, broken / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="unexpected tensors.*lm_head"):
        adapter_load.load_peft_adapter(broken, _template(config, QV), base_config=config)


def test_mis_shaped_tensor_is_named(exported, tmp_path):
    directory, config = exported
    broken = _copy(directory, tmp_path / "shape")
    weights = safetensors.numpy.load_file(broken / "adapter_model.safetensors")
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    weights[name] = weights[name].T.copy()
    safetensors.numpy.save_file(weights, broken / "adapter_model.safetensors")
    escaped = re.escape(name)
    with pytest.raises(ValueError, match=rf"'{escaped}' has shape \(32, 4\), expected \(4, 32\)"):
        adapter_load.load_peft_adapter(broken, _template(config, QV), base_config=config)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(hidden_size=48), "hidden_size"),
        (dict(num_hidden_layers=3, layer_types=("full_attention",) * 3), "num_hidden_layers"),
    ],
    ids=["hidden_size", "layers"],
)
def test_adapter_of_another_base_is_refused_with_both_fingerprints(exported, change, field):
    directory, config = exported
    other = dataclasses.replace(config, **change)
    with pytest.raises(ValueError) as error:
        adapter_load.load_peft_adapter(directory, _template(other, QV), base_config=other)
    message = str(error.value)
    assert adapter_format.base_fingerprint(config) in message
    assert adapter_format.base_fingerprint(other) in message
    assert f"{field}: adapter {getattr(config, field)!r} vs base {getattr(other, field)!r}" in message
    assert BASE_NAME in message


def test_another_base_without_metadata_fails_on_tensors(exported, tmp_path):
    """A bare PEFT directory still cannot load into a deeper model."""
    directory, config = exported
    bare = _copy(directory, tmp_path / "bare")
    (bare / "moraljax_adapter.json").unlink()
    deeper = dataclasses.replace(config, num_hidden_layers=3, layer_types=("full_attention",) * 3)
    missing = "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
    with pytest.raises(ValueError, match=f"missing tensor '{missing}'"):
        adapter_load.load_peft_adapter(bare, _template(deeper, QV), base_config=deeper)
    shallower = dataclasses.replace(config, num_hidden_layers=1, layer_types=("full_attention",))
    with pytest.raises(ValueError, match="unexpected tensors.*layers.1"):
        adapter_load.load_peft_adapter(bare, _template(shallower, QV), base_config=shallower)


def test_wrong_rank_or_targets_in_template(exported):
    directory, config = exported
    with pytest.raises(ValueError, match=r"rank r=4 but the template's .* has rank 8"):
        adapter_load.load_peft_adapter(directory, _template(config, QV, rank=8), base_config=config)
    with pytest.raises(ValueError, match=r"targets \('q', 'v'\) but the template has \('q', 'k', 'v'"):
        adapter_load.load_peft_adapter(directory, _template(config, ALL), base_config=config)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("use_rslora", True, "use_rslora is True"),
        ("use_dora", True, "use_dora is True"),
        ("peft_type", "IA3", "peft_type is 'IA3'"),
        ("target_modules", ["q_proj", "lm_head"], r"target_modules has \['lm_head'\]"),
        ("target_modules", ".*proj", "target_modules is '.\\*proj'"),
        ("rank_pattern", {"q_proj": 8}, "rank_pattern"),
    ],
)
def test_adapter_configs_moraljax_cannot_run_are_refused(exported, tmp_path, field, value, message):
    directory, config = exported
    broken = _copy(directory, tmp_path / "config")
    adapter_config = json.loads((broken / "adapter_config.json").read_text())
    adapter_config[field] = value
    (broken / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(ValueError, match=message):
        adapter_load.load_peft_adapter(broken, _template(config, QV), base_config=config)


def test_all_linear_means_all_seven_targets():
    lora = adapter_load.lora_config_from_peft(
        dict(peft_type="LORA", task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear")
    )
    assert lora == lora_lib.LoraConfig(rank=8, alpha=16.0, dropout=0.0, targets=ALL)


def test_export_checks_the_state(exported, base_dir, tmp_path):
    _, config = exported
    trainable = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _template(config, QV))
    with pytest.raises(ValueError, match=r"lora.targets \('q', 'k', 'v'.*do not match .* \('q', 'v'\)"):
        adapter_export.export_peft_adapter(trainable, _lora(ALL), tmp_path / "a", base_model_name_or_path=BASE_NAME)
    with pytest.raises(ValueError, match="R = lora.rank = 8"):
        adapter_export.export_peft_adapter(
            trainable, lora_lib.LoraConfig(rank=8, targets=QV), tmp_path / "b", base_model_name_or_path=BASE_NAME
        )
    learners = jax.tree.map(lambda x: jnp.stack([x, x]), trainable)
    with pytest.raises(ValueError, match="select one learner first"):
        adapter_export.export_peft_adapter(learners, _lora(QV), tmp_path / "c", base_model_name_or_path=BASE_NAME)
    wider = dataclasses.replace(config, hidden_size=48)
    with pytest.raises(ValueError, match=r"needs \(2, 48, 4\)"):
        adapter_export.export_peft_adapter(
            trainable, _lora(QV), tmp_path / "d", base_model_name_or_path=BASE_NAME, base_config=wider
        )


def test_export_without_base_config_or_value_head_round_trips(exported, base_dir, tmp_path):
    _, config = exported
    policy, _ = _trained_policy(base_dir, QV, seed=2)
    directory = tmp_path / "no_head"
    trainable = _export(policy, config, directory, QV, base_config=None, value_head=False)
    assert not (directory / "value_head.safetensors").exists()
    metadata = json.loads((directory / "moraljax_adapter.json").read_text())
    assert metadata["base_fingerprint"] is None and metadata["value_head"] is False
    template = _template(config, QV)
    loaded, _ = adapter_load.load_peft_adapter(directory, template, base_config=config, value_head=False)
    expected, got = _flat_arrays(trainable, only="model"), _flat_arrays(loaded, only="model")
    assert expected.keys() == got.keys()
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=str(path))


def test_fingerprint_depends_on_architecture_only():
    config = decoder.DecoderConfig.gemma2_2b()
    assert adapter_format.base_fingerprint(config) == adapter_format.base_fingerprint(decoder.DecoderConfig.gemma2_2b())
    same_architecture = dataclasses.replace(config, eos_token_id=(1, 107))
    assert adapter_format.base_fingerprint(same_architecture) == adapter_format.base_fingerprint(config)
    integer_spelling = dataclasses.replace(config, attn_logit_softcapping=50, rope_theta=10000)
    assert adapter_format.base_fingerprint(integer_spelling) == adapter_format.base_fingerprint(config)
    softcap = dataclasses.replace(config, attn_logit_softcapping=None)
    assert adapter_format.base_fingerprint(softcap) != adapter_format.base_fingerprint(config)
    # Each family field counts once it leaves Gemma 2's value.
    for field, value in [("qk_norm", True), ("qkv_bias", True), ("norm_offset", 0.0), ("post_norms", False),
                         ("tie_word_embeddings", False), ("hidden_activation", "silu"), ("sliding_rope_theta", 1e6)]:
        changed = dataclasses.replace(config, **{field: value})
        assert adapter_format.base_fingerprint(changed) != adapter_format.base_fingerprint(config), field
        assert adapter_format.base_architecture(changed)[field] == value
        assert field not in adapter_format.base_architecture(config)


def test_gemma2_fingerprints_are_those_adapters_were_exported_with_before_the_families():
    # The built-in model's fingerprint as recorded in adapters exported by the
    # Gemma-2-only moraljax (before DecoderConfig had the family fields).
    config = checkpoints.read_config(tiny.CHECKPOINT_DIR)
    assert adapter_format.base_fingerprint(config) == "sha256:3b09e77732b62ad7"
    assert sorted(adapter_format.base_architecture(config)) == sorted(adapter_format.ARCHITECTURE_FIELDS)
