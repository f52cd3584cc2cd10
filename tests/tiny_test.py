"""The built-in tiny base model and its builder (moraljax/tiny_build): files, tokenizer, parity, behaviour, build.

The checkpoint under moraljax/llm/tiny/checkpoint is what these tests read;
the build is only re-run for a few steps (determinism), never in full.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from moraljax import action_matcher
from moraljax import games
from moraljax import prompt_tables
from moraljax import prompts
from moraljax.llm import checkpoints
from moraljax.llm import tiny
from moraljax.tiny_build import corpus
from moraljax.tiny_build import probes
from moraljax.tiny_build import tokenizer as tokenizer_lib
from moraljax.tiny_build import training

_MAX_BYTES = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(
        str(tiny.CHECKPOINT_DIR), local_files_only=True)


@pytest.fixture(scope="module")
def policy():
    policy, _, _ = checkpoints.load_hf_checkpoint(
        tiny.CHECKPOINT_DIR, key=jax.random.key(0), lora=None)
    return policy


def _ipd_table(tokenizer, actions=prompts.TRAIN_ACTIONS):
    return prompt_tables.build_prompt_table(tokenizer, games.GAMES["IPD"].payoffs,
                                      actions=actions)


def test_checkpoint_files_and_size():
    names = {path.name for path in tiny.CHECKPOINT_DIR.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"):
        assert required in names
    total = sum(path.stat().st_size for path in tiny.CHECKPOINT_DIR.iterdir())
    print(f"checkpoint bytes: {total}")
    assert total < _MAX_BYTES
    config = json.loads((tiny.CHECKPOINT_DIR / "config.json").read_text())
    assert config["model_type"] == "gemma2"
    assert config["tie_word_embeddings"] is True
    assert config["layer_types"] == ["sliding_attention", "full_attention"]


def test_config_matches_the_builder(tokenizer):
    config = checkpoints.read_config(tiny.CHECKPOINT_DIR)
    assert config == training.tiny_config(len(tokenizer))
    # The window is shorter than a prompt, so the sliding path is exercised.
    assert config.sliding_window < _ipd_table(tokenizer).mask.sum(-1).min()


def test_tokenizer_splits_actions_like_gemma(tokenizer):
    for action in prompts.TRAIN_ACTIONS + prompts.TEST_ACTIONS:
        ids = tokenizer.encode(action, add_special_tokens=False)
        assert tokenizer.convert_ids_to_tokens(ids) == ["action", action[-1]]
        ids = tokenizer.encode(" " + action, add_special_tokens=False)
        assert tokenizer.convert_ids_to_tokens(ids) == ["\u2581action",
                                                        action[-1]]


def test_tokenizer_special_tokens_and_decoding(tokenizer):
    assert [tokenizer.pad_token_id, tokenizer.eos_token_id,
            tokenizer.bos_token_id, tokenizer.unk_token_id] == [0, 1, 2, 3]
    assert tokenizer.convert_tokens_to_ids(
        ["<start_of_turn>", "<end_of_turn>"]) == [4, 5]
    # Gemma's tokenizer prepends <bos> when asked for special tokens.
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id
    assert tokenizer.encode("hi", add_special_tokens=False)[0] != (
        tokenizer.bos_token_id)
    # Blanks survive, leading ones included; unknown characters fall back to
    # bytes and come back intact.
    for text in ("  two  blanks ", "caf\u00e9 \u2603 \u4e2d", "a\n\nb"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    ids = tokenizer.encode("<start_of_turn>model\naction3<end_of_turn><eos>",
                           add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "model\naction3"
    assert action_matcher.parse_action_host(
        tokenizer, tokenizer.encode(" action4<end_of_turn>",
                                    add_special_tokens=False),
        prompts.TEST_ACTIONS) == 1


def test_in_jit_parser_agrees_with_host_rule(tokenizer):
    # The default model's tokenizer must be one the token automaton handles.
    rng = np.random.default_rng(0)
    ids = rng.integers(0, len(tokenizer), (3000, 2))
    starts = tokenizer.convert_tokens_to_ids(["action", "\u2581action"])
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    ids[:1500, 0] = rng.choice(starts, 1500)
    ids[:1500, 1] = rng.choice(digits, 1500)
    for actions in (prompts.TRAIN_ACTIONS, prompts.TEST_ACTIONS):
        matcher = action_matcher.build_action_matcher(tokenizer, actions, gen_len=2)
        expected = [action_matcher.parse_action_host(tokenizer, row, actions)
                    for row in ids]
        np.testing.assert_array_equal(
            np.asarray(action_matcher.match_actions(matcher, jnp.asarray(ids))),
            expected)
        assert 0 < np.sum(np.asarray(expected) >= 0) < len(ids)


def test_chat_template_renders_gemma_turns(tokenizer):
    assert tokenizer.chat_template == prompt_tables.GEMMA_CHAT_TEMPLATE
    text = prompt_tables.apply_chat_template(tokenizer, "  Pick one.  ")
    assert text == ("<bos><start_of_turn>user\nPick one.<end_of_turn>\n"
                    "<start_of_turn>model\n")


def test_structured_ipd_prompt_length(tokenizer):
    lengths = np.asarray(_ipd_table(tokenizer).mask.sum(-1))
    print(f"structured IPD prompt: {lengths.min()}-{lengths.max()} tokens "
          "(Gemma-2: 215)")
    # Phrase-level merges keep the toy's prompt short (tokenizer_lib.PIECE_PATTERN);
    # each state and payoff digit is still a token of its own.
    assert 20 <= lengths.min() and lengths.max() <= 40


def test_shipped_tokenizer_is_what_the_builder_makes(tokenizer):
    rebuilt = tokenizer_lib.build_tokenizer(corpus.tokenizer_corpus(
        corpus.all_prompt_specs()))
    assert rebuilt.backend_tokenizer.to_str() == (
        tokenizer.backend_tokenizer.to_str()), (
            "the prompts changed since the tiny model was built: rerun "
            "python -m moraljax.tiny_build.build")


def test_logits_match_transformers(tokenizer, policy):
    reference = transformers.Gemma2ForCausalLM.from_pretrained(
        str(tiny.CHECKPOINT_DIR), dtype=torch.float32,
        attn_implementation="eager").eval()
    table = _ipd_table(tokenizer)
    ids, mask = np.asarray(table.ids), np.asarray(table.mask)
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        expected = reference(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            position_ids=torch.from_numpy(positions.astype(np.int64)),
        ).logits.numpy()
    hidden = policy.forward(table.ids, jnp.asarray(positions),
                            table.mask).hidden
    actual = np.asarray(policy.logits(hidden))
    real = mask.astype(bool)
    np.testing.assert_allclose(actual[real], expected[real], atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("actions", [prompts.TRAIN_ACTIONS,
                                     prompts.TEST_ACTIONS])
def test_base_answers_mostly_legal_with_both_actions(tokenizer, policy,
                                                     actions):
    shares = probes.answer_shares(policy, tokenizer,
                                 _ipd_table(tokenizer, actions), actions,
                                 jax.random.key(7), samples_per_prompt=256)
    legal = shares["C"] + shares["D"]
    print(f"IPD {'/'.join(actions)}: C {shares['C']:.3f} D {shares['D']:.3f} "
          f"illegal {shares['illegal']:.3f}")
    assert legal >= 0.7
    assert 0.4 <= shares["C"] / legal <= 0.6
    assert shares["illegal"] >= 0.02


def test_answer_distribution_ignores_state_and_order(tokenizer, policy):
    # Exact probabilities by teacher forcing, on every structured prompt of
    # every game and table order: p("action") and p(digit | "action").
    prefix = tokenizer.convert_tokens_to_ids("action")
    probe = jax.jit(probes.answer_probabilities)
    for actions in (prompts.TRAIN_ACTIONS, prompts.TEST_ACTIONS):
        digits = training.action_digit_ids(tokenizer, actions)
        rows = []
        for name in games.GAME_NAMES:
            for order in prompts.TABLE_ORDERS:
                table = prompt_tables.build_prompt_table(
                    tokenizer, games.GAMES[name].payoffs, actions=actions,
                    table_order=order, pad_to=200)
                per_digit = [probe(policy, table, jnp.asarray(
                    [[prefix, digit]] * prompts.NUM_PROMPTS))
                             for digit in digits]
                rows.append(np.stack([per_digit[0][:, 0], per_digit[0][:, 1],
                                      per_digit[1][:, 1]], -1))
        probs = np.concatenate(rows)  # [prompts, (action, C digit, D digit)]
        print(f"{'/'.join(actions)}: p(action) {probs[:, 0].min():.3f}-"
              f"{probs[:, 0].max():.3f}, p(C|action) {probs[:, 1].min():.3f}-"
              f"{probs[:, 1].max():.3f}, p(D|action) {probs[:, 2].min():.3f}-"
              f"{probs[:, 2].max():.3f}")
        np.testing.assert_allclose(probs[:, 0], 0.85, atol=0.03)
        np.testing.assert_allclose(probs[:, 1:], 0.5, atol=0.04)


def test_lora_learns_reciprocity_quickly():
    # The deontological agent must read the opponent's last move from the
    # prompt; a rank-8 adapter should get there in a few dozen steps.
    result = probes.lora_probe(tiny.CHECKPOINT_DIR, "reciprocate", steps=30,
                              eval_every=30)
    print(f"reciprocate: p(target) {result.mean_target_prob}")
    assert result.mean_target_prob[0] < 0.5
    assert result.min_target_prob[-1] > 0.9


def test_training_is_deterministic():
    specs = (corpus.all_prompt_specs(
        action_pairs=(prompts.TRAIN_ACTIONS,), families=("structured",),
        preambles=(None,), payoff_tables=[games.GAMES["IPD"].payoffs])[:8]
             + corpus.recall_prompt_specs(
                 action_pairs=(prompts.TRAIN_ACTIONS,),
                 payoff_tables=[games.GAMES["IPD"].payoffs])[:8])
    tokenizer = tokenizer_lib.build_tokenizer(corpus.tokenizer_corpus(specs),
                                      vocab_size=800)
    again = tokenizer_lib.build_tokenizer(corpus.tokenizer_corpus(specs),
                                  vocab_size=800)
    assert tokenizer.backend_tokenizer.to_str() == (
        again.backend_tokenizer.to_str())
    data = training.build_training_set(tokenizer, specs, recall_share=0.5)
    config = training.tiny_config(len(tokenizer))
    train = training.TrainConfig(steps=3, batch_size=4, log_every=3)
    first = jax.tree.leaves(training.train_base(config, data, train))
    second = jax.tree.leaves(training.train_base(config, data, train))
    for left, right in zip(first, second, strict=True):
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))
