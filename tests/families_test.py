"""Every supported family against transformers and PEFT, and through the whole pipeline.

For each family a small random checkpoint is made here with transformers'
own classes (``<Family>ForCausalLM(config)``, ``save_pretrained``), offline,
with the family's distinctive feature switched on and made to matter:

    gemma2       sliding window (4) shorter than the prompts, both softcaps
    gemma3_text  q/k norms, 5 local layers : 1 global, a RoPE base per layer
                 type, linear RoPE scaling on the global layer
    llama        Llama 3 RoPE scaling (a short original context so every
                 frequency band occurs), untied embeddings, GQA
    qwen2        biases on q, k and v (randomised: transformers starts them at 0)
    qwen3        q/k norms, head dim != D / N, untied embeddings

Norm weights are randomised too (transformers starts them at their neutral
value). Each checkpoint gets a tokenizer with a chat template: the built-in
tiny model's (Gemma's template; "action1" is "action" + "1"), one where
"action1" is ONE token (Llama 3 style template, no pad token) and one where
it is THREE ("act" + "ion" + "1", Qwen style template).
"""

import csv
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import tokenizers
import torch
import transformers
from flax import nnx
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers

from moraljax import config_lib
from moraljax import evaluate
from moraljax import games
from moraljax import action_matcher
from moraljax import prompt_tables
from moraljax import prompts
from moraljax import run_setup
from moraljax import train
from moraljax.llm import adapter_export
from moraljax.llm import adapter_load
from moraljax.llm import checkpoints
from moraljax.llm import decoder
from moraljax.llm import decoder_config
from moraljax.llm import families
from moraljax.llm import lora as lora_lib
from moraljax.llm import policy as policy_lib
from moraljax.llm import sampling
from moraljax.llm import tiny
from moraljax.tiny_build import corpus
from moraljax.evaluation import protocol

FAMILIES = ("gemma2", "gemma3_text", "llama", "qwen2", "qwen3")
LENGTH, WINDOW = 20, 4
PADS = [5, 11, 0]

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Pre-tokenisation of the two byte-level BPEs: whole words ("action1" is
# learnt as one token), or words with "act" and "ion" and every digit split
# off ("action1" is three tokens).
ONE_TOKEN_PIECES = r" ?[A-Za-z0-9]+|\s+|[^\sA-Za-z0-9]+"
THREE_TOKEN_PIECES = r" ?act|ion| ?[A-Za-z]+|[0-9]|\s+|[^\sA-Za-z0-9]+"


def _byte_level_tokenizer(pieces, special_tokens, template, **named_tokens):
    """A GPT-2-style byte-level BPE learnt on every prompt moraljax renders."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(pieces), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(special_tokens),
    )
    backend.train_from_iterator(corpus.tokenizer_corpus(corpus.all_prompt_specs()), trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **named_tokens)
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers_by_length():
    """Tokenizers in which "action1" is 1, 2 and 3 tokens."""
    one = _byte_level_tokenizer(
        ONE_TOKEN_PIECES, ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        LLAMA_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
    )
    three = _byte_level_tokenizer(
        THREE_TOKEN_PIECES, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN_TEMPLATE,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    two = transformers.AutoTokenizer.from_pretrained(str(tiny.CHECKPOINT_DIR), local_files_only=True)
    return {1: one, 2: two, 3: three}


# family -> how many tokens "action1" is in the family's test tokenizer.
ACTION_TOKENS = {"gemma2": 2, "gemma3_text": 2, "llama": 1, "qwen2": 3, "qwen3": 3}


def _hf_model(family: str, vocab_size: int, pad_token_id: int):
    """A random transformers model of the family, with its feature on and random norms and biases."""
    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, initializer_range=0.2, pad_token_id=pad_token_id,
        bos_token_id=pad_token_id, eos_token_id=pad_token_id, attn_implementation="eager",
    )
    if family == "gemma2":
        config = transformers.Gemma2Config(
            **common, layer_types=["sliding_attention", "full_attention"], sliding_window=WINDOW,
            query_pre_attn_scalar=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        )
    elif family == "gemma3_text":
        config = transformers.Gemma3TextConfig(
            **dict(common, num_hidden_layers=6), sliding_window=WINDOW, query_pre_attn_scalar=8,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
            },
        )
    elif family == "llama":
        config = transformers.LlamaConfig(
            **common, tie_word_embeddings=False, max_position_embeddings=64,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        )
    elif family == "qwen2":
        config = transformers.Qwen2Config(**{k: v for k, v in common.items() if k != "head_dim"},
                                          tie_word_embeddings=True)
    else:
        config = transformers.Qwen3Config(**dict(common, head_dim=16), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    neutral = 0.0 if family.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(neutral, 0.5)
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizers_by_length):
    """family -> (checkpoint directory, the transformers model saved there)."""
    out = {}
    for family in FAMILIES:
        tokenizer = tokenizers_by_length[ACTION_TOKENS[family]]
        # Qwen's embedding tables are larger than their tokenizers: ids past
        # the tokenizer can be sampled, and decode to nothing.
        vocab_size = len(tokenizer) + (32 if family.startswith("qwen") else 0)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model = _hf_model(family, vocab_size, pad)
        directory = tmp_path_factory.mktemp(family)
        model.save_pretrained(directory)
        checkpoints.save_tokenizer(tokenizer, directory)
        out[family] = (directory, model)
    return out


def _left_padded_batch(seed, vocab_size, batch=3, length=LENGTH, pads=PADS):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, (batch, length))
    mask = (np.arange(length)[None, :] >= np.asarray(pads)[:, None]).astype(np.int64)
    return ids * mask, mask


def _torch_logits(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        )
    return out.logits.numpy()


@nnx.jit(static_argnames="lora_enabled")
def _forward_logits(policy, ids, mask, lora_enabled=False):
    out = policy.forward(ids, decoder.positions_from_mask(mask), mask, lora_enabled=lora_enabled)
    return policy.logits(out.hidden)


def _our_logits(policy, ids, mask, lora_enabled=False):
    return np.asarray(_forward_logits(policy, jnp.asarray(ids), jnp.asarray(mask), lora_enabled=lora_enabled))


def _max_diff(ours, theirs, mask):
    return float(np.abs(ours - theirs)[mask.astype(bool)].max())


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_on_left_padded_prompts(family_dirs, family):
    directory, model = family_dirs[family]
    policy, config = checkpoints.load_hf_model(directory, lora=None, key=jax.random.key(0))
    assert config.model_type == family
    ids, mask = _left_padded_batch(0, config.vocab_size)
    diff = _max_diff(_our_logits(policy, ids, mask), _torch_logits(model, ids, mask), mask)
    print(f"{family}: max |logit difference| {diff:.2e}")
    assert diff < 1e-4


# What the family's distinctive feature is, undone on the same weights: the
# logits must move, so the parity above covered the feature.
def _without_feature(family, policy):
    config = policy.config
    if family == "gemma2":
        return dataclasses.replace(config, sliding_window=1000), None
    if family == "gemma3_text":
        return dataclasses.replace(config, sliding_rope_theta=None, rope_scaling=None), None
    if family == "llama":
        return dataclasses.replace(config, rope_scaling=None), None
    if family == "qwen2":
        return config, lambda path, value: jnp.zeros_like(value) if path[-1] == "bias" else value
    return config, lambda path, value: jnp.ones_like(value) if path[-2] in ("q_norm", "k_norm") else value


@pytest.mark.parametrize("family", FAMILIES)
def test_the_distinctive_feature_changes_the_logits(family_dirs, family):
    directory, _ = family_dirs[family]
    policy, config = checkpoints.load_hf_model(directory, lora=None, key=jax.random.key(0))
    new_config, edit = _without_feature(family, policy)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: policy_lib.Policy(new_config, lora=None, key=jax.random.key(0))))
    leaves = [(p, v.copy(edit(p, v[...])) if edit else v) for p, v in nnx.to_flat_state(nnx.state(policy))]
    changed = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    ids, mask = _left_padded_batch(1, config.vocab_size)
    assert _max_diff(_our_logits(changed, ids, mask), _our_logits(policy, ids, mask), mask) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(family_dirs, family):
    directory, model = family_dirs[family]
    policy, config = checkpoints.load_hf_model(directory, lora=None, key=jax.random.key(0))
    ids, mask = _left_padded_batch(3, config.vocab_size, length=12, pads=[4, 0, 9])
    with torch.no_grad():
        hf_out = model.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8, do_sample=False,
            pad_token_id=config.pad_token_id, eos_token_id=None,
        )
    hf_tokens = hf_out[:, ids.shape[1]:].numpy()
    generate = nnx.jit(sampling.generate, static_argnames=("gen_len", "top_k", "lora_enabled"))
    ours = generate(policy, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), gen_len=8, top_k=1)
    np.testing.assert_array_equal(np.asarray(ours.tokens), hf_tokens)


def _with_random_adapters(policy, seed):
    """Non-zero LoRA factors (fresh B factors are zero, which would hide errors)."""
    graphdef, trainable, frozen = policy_lib.split_policy(policy)
    leaves = jax.tree.leaves(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return policy_lib.merge_policy(graphdef, jax.tree.unflatten(jax.tree.structure(trainable), noisy), frozen)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_logits_match_peft_and_the_exported_adapter_reloads_exactly(family_dirs, family, tmp_path):
    directory, _ = family_dirs[family]
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.0)
    policy, config = checkpoints.load_hf_model(directory, lora=lora, key=jax.random.key(1))
    policy = _with_random_adapters(policy, 2)
    trainable = policy_lib.split_policy(policy)[1]
    adapter_export.export_peft_adapter(
        trainable, lora, tmp_path / "adapter", base_model_name_or_path=str(directory), base_config=config
    )
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["target_modules"] == list(families.family_of(family).peft_module_names.values())

    ids, mask = _left_padded_batch(2, config.vocab_size)
    ours = _our_logits(policy, ids, mask, lora_enabled=True)
    assert _max_diff(ours, _our_logits(policy, ids, mask), mask) > 0.1  # the adapter matters
    base = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    )
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    diff = _max_diff(ours, _torch_logits(peft_model, ids, mask), mask)
    print(f"{family}: max |LoRA logit difference| vs PEFT {diff:.2e}")
    assert diff < 1e-4

    loaded, loaded_lora = adapter_load.load_peft_adapter(tmp_path / "adapter", trainable, base_config=config)
    assert loaded_lora == lora
    for (path, want), (_, got) in zip(nnx.to_flat_state(trainable), nnx.to_flat_state(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(got[...]), np.asarray(want[...]), err_msg=str(path))


def test_an_adapter_for_another_family_is_refused_naming_both_bases(family_dirs, tmp_path):
    lora = lora_lib.LoraConfig(rank=2, alpha=4.0, dropout=0.0)
    qwen_dir, llama_dir = family_dirs["qwen3"][0], family_dirs["llama"][0]
    qwen, qwen_config = checkpoints.load_hf_model(qwen_dir, lora=lora, key=jax.random.key(0))
    adapter_export.export_peft_adapter(
        policy_lib.split_policy(qwen)[1], lora, tmp_path / "qwen_adapter", base_model_name_or_path="my-qwen3",
        base_config=qwen_config,
    )
    llama, llama_config = checkpoints.load_hf_model(llama_dir, lora=lora, key=jax.random.key(0))
    with pytest.raises(ValueError) as info:
        adapter_load.load_peft_adapter(
            tmp_path / "qwen_adapter", policy_lib.split_policy(llama)[1], base_config=llama_config,
            base_model_name_or_path="my-llama",
        )
    message = str(info.value)
    assert "'my-qwen3'" in message and "'my-llama' (llama)" in message
    assert "model_type: adapter 'qwen3' vs base 'llama'" in message
    assert "qk_norm: adapter True vs base False" in message


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_reads_back_in_transformers_and_moraljax(family_dirs, family, tmp_path):
    directory, model = family_dirs[family]
    policy, config = checkpoints.load_hf_model(directory, lora=None, key=jax.random.key(0))
    checkpoints.save_hf_checkpoint(policy, tmp_path)
    assert checkpoints.read_config(tmp_path) == config
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(model)
    ids, mask = _left_padded_batch(4, config.vocab_size)
    np.testing.assert_allclose(_torch_logits(reloaded, ids, mask), _torch_logits(model, ids, mask), atol=1e-6)


# ----------------------------------------------------------------------------
# config.json mapping.


def test_config_json_spellings_of_transformers_4_and_5_agree():
    common = dict(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=4)
    gemma2_v4 = dict(common, model_type="gemma2", sliding_window=4, rope_theta=123.0, hidden_act="gelu_pytorch_tanh")
    gemma2_v5 = dict(common, model_type="gemma2", sliding_window=4, layer_types=None,
                     rope_parameters={"rope_type": "default", "rope_theta": 123.0})
    config = families.config_from_hf(gemma2_v4)
    assert config == families.config_from_hf(gemma2_v5)
    assert config.is_sliding == (True, False, True)  # transformers' default: even layers slide
    llama_scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}
    llama_v4 = dict(common, model_type="llama", rope_theta=500000.0, rope_scaling=llama_scaling)
    llama_v5 = dict(common, model_type="llama", rope_parameters=dict(llama_scaling, rope_theta=500000.0))
    assert families.config_from_hf(llama_v4) == families.config_from_hf(llama_v5)
    gemma3_v4 = dict(common, model_type="gemma3_text", num_hidden_layers=7, sliding_window=4, rope_theta=1e6,
                     rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0})
    gemma3 = families.config_from_hf(gemma3_v4)
    assert gemma3.is_sliding == (True,) * 5 + (False, True)  # 5 local : 1 global
    assert (gemma3.rope_theta, gemma3.sliding_rope_theta, gemma3.rope_scaling.factor) == (1e6, 1e4, 8.0)
    qwen = families.config_from_hf(dict(common, model_type="qwen2", sliding_window=32768, use_sliding_window=False))
    assert qwen.qkv_bias and qwen.sliding_window is None and not any(qwen.is_sliding)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trips_through_transformers_config_classes(family_dirs, family):
    config = checkpoints.read_config(family_dirs[family][0])
    written = families.config_to_hf(config)
    hf_config = transformers.AutoConfig.for_model(**written)
    assert families.config_from_hf(hf_config.to_dict()) == config
    assert families.config_from_hf(json.loads(json.dumps(written))) == config


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(model_type="mistral"), "model_type='mistral'"),
        (dict(model_type="llama", hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(model_type="llama", attention_bias=True), "attention_bias=True"),
        (dict(model_type="llama", mlp_bias=True), "mlp_bias=True"),
        (dict(model_type="llama", rope_parameters={"rope_type": "yarn", "rope_theta": 1.0, "factor": 2.0}),
         "rope_parameters.rope_type='yarn'"),
        (dict(model_type="gemma2", hidden_activation="relu"), "hidden_activation='relu'"),
        (dict(model_type="gemma2", rope_parameters={"rope_type": "linear", "rope_theta": 1.0, "factor": 2.0}),
         "rope_parameters.rope_type='linear'"),
        (dict(model_type="gemma2", use_bidirectional_attention=True), "use_bidirectional_attention=True"),
        (dict(model_type="gemma2", num_attention_heads=3), "num_key_value_heads=2"),
        (dict(model_type="gemma2", layer_types=["full_attention"]), "layer_types=('full_attention',)"),
        (dict(model_type="gemma2", layer_types=["local", "full_attention"]), "layer_types entry='local'"),
        (dict(model_type="gemma2", sliding_window=0), "sliding_window=0"),
        (dict(model_type="gemma2", attn_logit_softcapping=-1.0), "attn_logit_softcapping=-1.0"),
        (dict(model_type="qwen3", hidden_size=None), "hidden_size=None"),
        (dict(model_type="gemma2", head_dim=3), "head_dim=3"),
    ],
)
def test_unsupported_configs_are_refused_in_one_line(overrides, field):
    base = dict(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, head_dim=4, sliding_window=4)
    with pytest.raises(ValueError) as info:
        families.config_from_hf(dict(base, **overrides))
    message = str(info.value)
    assert message.startswith(f"{field} is not allowed; expected ")
    assert "\n" not in message


def test_unknown_model_type_names_every_supported_family():
    with pytest.raises(ValueError) as info:
        families.config_from_hf({"model_type": "mistral"})
    message = str(info.value)
    for family in families.FAMILIES.values():
        assert repr(family.model_type) in message and family.label in message


# ----------------------------------------------------------------------------
# Tokenizers, prompt tables and the in-jit action matcher.


@pytest.mark.parametrize("length", [1, 2, 3])
def test_action_matcher_agrees_with_the_host_rule_whatever_the_action_length(tokenizers_by_length, length, tmp_path):
    # Through the files, as a run reads them (the 1-token one has no pad token: the loader pads with EOS).
    checkpoints.save_tokenizer(tokenizers_by_length[length], tmp_path)
    tokenizer = checkpoints.load_tokenizer(tmp_path)
    assert tokenizer.pad_token == (tokenizer.eos_token if length == 1 else tokenizers_by_length[length].pad_token)
    rng = np.random.default_rng(length)
    for actions in (prompts.TRAIN_ACTIONS, prompts.TEST_ACTIONS):
        gen_len = action_matcher.action_token_length(tokenizer, actions)
        assert gen_len == length
        pieces = [tokenizer.encode(a, add_special_tokens=False) for a in actions]
        pieces += [tokenizer.encode(" " + a, add_special_tokens=False) for a in actions]
        pool = sorted({t for p in pieces for t in p} | {tokenizer.eos_token_id})
        # Rows of the actions' own tokens, rows of anything in the vocabulary
        # (and past it), and whole answers followed by EOS (legal) or noise.
        ids = rng.integers(0, len(tokenizer) + 8, (2000, gen_len + 1))
        ids[:1000] = rng.choice(pool, (1000, gen_len + 1))
        for index, (row, piece) in enumerate(zip(ids[1000:1400], pieces * 100)):
            if index % 2 == 0:
                row[:] = tokenizer.eos_token_id
            row[: len(piece)] = piece
        matcher = action_matcher.build_action_matcher(tokenizer, actions, gen_len + 1)
        host = [action_matcher.parse_action_host(tokenizer, row, actions) for row in ids]
        np.testing.assert_array_equal(np.asarray(action_matcher.match_actions(matcher, jnp.asarray(ids))), host)
        assert sum(h >= 0 for h in host) > 50
        table = prompt_tables.build_prompt_table(tokenizer, games.GAMES["IPD"].payoffs, actions=actions)
        assert table.ids.shape[0] == prompts.NUM_PROMPTS
        for row, row_mask in zip(np.asarray(table.ids), np.asarray(table.mask)):
            text = tokenizer.decode(row[row_mask.astype(bool)].tolist())
            assert text.count(actions[0]) >= 3 and text.count(actions[1]) >= 3


# ----------------------------------------------------------------------------
# The main command and evaluation on every family.

# A small evaluation: one game, one variant, a short protocol (the
# beyond-matrix families run the same model code, tested in evaluate_test.py).
SMALL_EVALUATION = protocol.EvalSettings(
    games=("IPD",), table_orders=("original",), extra_actions=(), episodes=2, decisions=2, value_preambles=(),
    beyond_families=(),
)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_and_evaluation_run_on_the_family(family_dirs, family, tmp_path):
    directory, _ = family_dirs[family]
    config = config_lib.experiment_config(f"model={directory}", reward="util")
    config.run.seeds = (1,)
    config.run.num_episodes = 3
    config.run.episodes_per_chunk = 3
    config.run.checkpoint_every = 3
    config.model.param_dtype = "float32"
    config.lora.rank = 4
    cfg = config_lib.experiment_from_config_dict(config)
    run = run_setup.build_run(cfg)
    run.start_fresh()
    tokens = ACTION_TOKENS[family]
    assert run.sampling_settings.gen_len == tokens  # the action strings' token length, from the tokenizer
    assert run.base_config.model_type == family
    if family == "llama":  # Llama 3's tokenizer has no pad token: prompts are padded with EOS.
        assert run.tokenizer.pad_token_id == run.tokenizer.eos_token_id

    summary = train.train(cfg, tmp_path / "run", progress=False)
    assert summary is not None
    with (tmp_path / "run" / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["episode"]) for r in rows] == [0, 1, 2]
    counts = [sum(float(r[k]) for k in r if k.startswith("n_")) for r in rows]
    assert counts == [5.0, 5.0, 5.0]  # every decision parsed as an action type
    adapter = tmp_path / "run" / "adapters" / "util_vs_tft_seed1"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(directory)

    result = evaluate.evaluate_workdir(tmp_path / "run", SMALL_EVALUATION, progress=False)
    with (tmp_path / "run" / "evaluation" / "decisions.csv").open(newline="") as handle:
        decisions = list(csv.DictReader(handle))
    assert len(decisions) == 2 * 1 * 1 * 2 * 2  # models (fine-tuned, base) x games x variants x episodes x decisions
    assert {r["kind"] for r in decisions} == {"fine_tuned", "base"}
    assert result["checkpoint_episode"] == 3


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(norm_offset=0.5), "norm_offset=0.5"),
        (dict(hidden_activation="relu"), "hidden_activation='relu'"),
        (dict(qk_norm=1), "qk_norm=1"),
        (dict(query_pre_attn_scalar=0), "query_pre_attn_scalar=0"),
        (dict(sliding_rope_theta=-1.0), "sliding_rope_theta=-1.0"),
        (dict(model_type=""), "model_type=''"),
    ],
)
def test_decoder_config_refuses_bad_values_in_one_line(changes, field):
    with pytest.raises(ValueError, match=f"^{re.escape(field)} is not allowed; expected "):
        dataclasses.replace(decoder.DecoderConfig(), **changes)


def test_rope_scaling_refuses_bad_values_in_one_line():
    with pytest.raises(ValueError, match=r"^rope_scaling.rope_type='yarn' is not allowed"):
        decoder_config.RopeScaling(rope_type="yarn", factor=2.0)
    with pytest.raises(ValueError, match=r"^rope_scaling.high_freq_factor=1.0 is not allowed; expected a number > "):
        decoder_config.RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=1.0)
