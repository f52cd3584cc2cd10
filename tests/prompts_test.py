"""Tests for moraljax.prompts: exact texts, prompt tables, action parsing.

The expected prompts are typed out here by hand from SPEC.md section 4 and
the authors' table layouts; the in-jit parser is checked against the host
rule ``decode(ids, skip_special_tokens=True).strip() == action`` on
thousands of sequences for three small tokenizers built in this file (no
downloads): a Gemma-like byte-fallback BPE, the same with a decoder that
drops a leading blank, and a GPT-2-style byte-level BPE.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import trainers
from transformers import PreTrainedTokenizerFast

from moraljax import action_matcher
from moraljax import prompt_tables
from moraljax import prompts

# SPEC.md section 1, typed out again: payoffs[a_m][a_o] = (p_m, p_o).
IPD = [[(3, 3), (0, 4)], [(4, 0), (1, 1)]]
SPEC_GAMES = {
    "IPD": IPD,
    "ISH": [[(4, 4), (0, 3)], [(3, 0), (1, 1)]],
    "ICN": [[(2, 2), (1, 4)], [(4, 1), (0, 0)]],
    "BOS": [[(3, 2), (0, 0)], [(0, 0), (2, 3)]],
    "ICD": [[(1, 1), (0, 0)], [(0, 0), (4, 4)]],
}

# prev_m = C, prev_o = D, options "action2 or action1", answer format
# "action1 or action2": the training prompt of SPEC.md section 4 by hand.
EXPECTED_IPD_PROMPT = (
    "You are playing a game with another agent A. You must choose either "
    "action action2 or action action1. Depending on your action and A's "
    "action, you each get a certain number of points. The points are awarded "
    "as follows (you are the row player, A is the column player): \n \n"
    "            |         |  action1  |  action2  | \n"
    "            |---------|-----------|-----------| \n"
    "            | action1 |  3, 3     |  0, 4     |\n"
    "            | action2 |  4, 0     |  1, 1     | \n"
    " You have played with this opponent before. Last time, you played "
    "action1 and they played action2, so you got 0 points and A got 4 points. "
    "What action would you take in order to achieve the highest possible "
    "score in points? Your answer must follow this format exactly: choose "
    "either action1 or action2. Do not explain your reasoning. Your answer:")

# The authors' layouts of the swapped tables (their source literals).
EXPECTED_TABLES = {
    "columns_swapped": (
        ": \n \n"
        "            |         |  action4  |  action3  | \n"
        "            |---------|-----------|-----------| \n"
        "            | action3 |  0, 4     |  3, 3     | \n"
        "            | action4 |  1, 1     |  4, 0     |\n"),
    "rows_swapped": (
        ": \n \n"
        "            |         |  action3  |  action4  | \n"
        "            |---------|-----------|-----------| \n"
        "            | action4 |  4, 0     |  1, 1     |\n"
        "            | action3 |  3, 3     |  0, 4     | \n"
        "            \n"),
    "both_swapped": (
        ": \n \n"
        "            |         |  action4  |  action3  | \n"
        "            |---------|-----------|-----------| \n"
        "            | action4 |  1, 1     |  4, 0     |\n"
        "            | action3 |  0, 4     |  3, 3     | \n"),
}

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")


# ---------------------------------------------------------------------------
# Tokenizers built here.
# ---------------------------------------------------------------------------

def _wrap(backend: Tokenizer, **overrides) -> PreTrainedTokenizerFast:
    kwargs = dict(tokenizer_object=backend, bos_token="<bos>",
                  eos_token="<eos>", pad_token="<pad>")
    kwargs.update(overrides)
    tokenizer = PreTrainedTokenizerFast(**kwargs)
    tokenizer.chat_template = prompt_tables.GEMMA_CHAT_TEMPLATE
    return tokenizer


def _byte_fallback_backend(strip_leading_blank: bool = False) -> Tokenizer:
    """A Gemma-like BPE: "▁" for blanks, <0xHH> byte-fallback tokens."""
    vocab = {token: index for index, token in enumerate(SPECIALS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for code in range(0x21, 0x7F):
        vocab.setdefault(chr(code), len(vocab))
    for char in ("▁", "\n", "\t"):
        vocab.setdefault(char, len(vocab))
    merges = []
    words = ["action", "▁action", "action1", "action2", "Action", "Action1",
             "▁action1", "12", "▁▁", "▁▁▁▁", "\n\n", "1.", "▁1", "ion", "act",
             "▁You", "▁the", "▁points", "▁player"]
    for word in words:
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                merges.append((word[:end - 1], word[end - 1]))
                vocab[word[:end]] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges,
                                   unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(),
             decoders.Fuse()]
    if strip_leading_blank:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    backend.add_special_tokens([AddedToken(token, special=True)
                                for token in SPECIALS + TURN_TOKENS])
    backend.add_tokens([AddedToken("<extra>", special=False)])
    return backend


def _byte_level_backend() -> Tokenizer:
    """A GPT-2-style byte-level BPE trained on a small corpus."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIALS + TURN_TOKENS))
    corpus = []
    for words in itertools.product(
            ["action1", "action2", " action1", "Action2", "action12"],
            [" ", "  ", "\n", "\t", "\u00a0", "\u3000", "\n\n", ". "],
            ["you", "points", "the player", "choose", "\u00e9t\u00e9"]):
        corpus.append("".join(words) + " action1 or action2.")
    backend.train_from_iterator(corpus * 3, trainer)
    return backend


@pytest.fixture(scope="module")
def byte_fallback_tokenizer():
    return _wrap(_byte_fallback_backend())


@pytest.fixture(scope="module")
def strip_tokenizer():
    return _wrap(_byte_fallback_backend(strip_leading_blank=True))


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    return _wrap(_byte_level_backend())


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------------------
# Rendering.
# ---------------------------------------------------------------------------

def test_training_prompt_is_verbatim():
    text = prompts.render_structured_prompt(
        np.array(IPD), prev_m=0, prev_o=1, first_option=1, first_answer=0)
    assert text == EXPECTED_IPD_PROMPT
    # JAX float32 payoffs print the same (integers without ".0").
    assert prompts.render_structured_prompt(
        jnp.asarray(IPD, jnp.float32), 0, 1, 1, 0) == EXPECTED_IPD_PROMPT


def test_original_table_is_the_spec_literal():
    assert prompts.render_payoff_table(np.array(IPD)) == (
        ": \n \n"
        "            |         |  action1  |  action2  | \n"
        "            |---------|-----------|-----------| \n"
        "            | action1 |  3, 3     |  0, 4     |\n"
        "            | action2 |  4, 0     |  1, 1     | \n")


@pytest.mark.parametrize("table_order", sorted(EXPECTED_TABLES))
def test_table_orders_move_cells_with_labels(table_order):
    table = prompts.render_payoff_table(
        np.array(IPD), prompts.TEST_ACTIONS, table_order)
    assert table == EXPECTED_TABLES[table_order]
    text = prompts.render_structured_prompt(
        np.array(IPD), 1, 1, 0, 0, actions=prompts.TEST_ACTIONS,
        table_order=table_order)
    assert ("column player)" + EXPECTED_TABLES[table_order]
            + " You have played") in text


def test_sixteen_distinct_prompts_with_the_right_state_and_payoffs():
    names = ("action1", "action2")
    for game, table in SPEC_GAMES.items():
        texts = prompts.render_all_structured(np.array(table))
        assert len(texts) == prompts.NUM_PROMPTS
        assert len(set(texts)) == 16, game
        for prev_m, prev_o, first_option, first_answer in itertools.product(
                (0, 1), repeat=4):
            text = texts[prompts.prompt_index(prev_m, prev_o, first_option,
                                              first_answer)]
            p_m, p_o = table[prev_m][prev_o]
            assert (f"Last time, you played {names[prev_m]} and they played "
                    f"{names[prev_o]}, so you got {p_m} points and A got "
                    f"{p_o} points.") in text, (game, text)
            option = ("action action1 or action action2" if first_option == 0
                      else "action action2 or action action1")
            answer = ("choose either action1 or action2." if first_answer == 0
                      else "choose either action2 or action1.")
            assert f"You must choose either {option}." in text
            assert answer in text
            # The table always lists C first in the training layout.
            assert f"| action1 |  {table[0][0][0]}, {table[0][0][1]}     |" \
                in text


def test_points_print_compactly():
    assert prompts.format_points(3) == "3"
    assert prompts.format_points(3.0) == "3"
    assert prompts.format_points(np.float32(-6.0)) == "-6"
    assert prompts.format_points(np.float32(0.1)) == "0.1"
    assert prompts.format_points(2.5) == "2.5"
    table = [[(0.5, 10), (-1, 2.25)], [(4, 0), (1, 1)]]
    text = prompts.render_structured_prompt(np.array(table, np.float32), 0, 1,
                                            0, 0)
    assert "you got -1 points and A got 2.25 points" in text
    assert "| action1 |  0.5, 10  |  -1, 2.25 |\n" in text


def test_other_action_strings_keep_the_table_aligned():
    table = prompts.render_payoff_table(
        np.array([[(3, 3), (0, 40)], [(40, 0), (1, 1)]]),
        ("Cooperate", "Defect"))
    lines = table.split("\n")[2:6]
    bars = {tuple(i for i, char in enumerate(line) if char == "|")
            for line in lines}
    assert len(bars) == 1, lines
    assert lines[2].startswith("            | Cooperate |  3, 3")
    assert lines[3].startswith("            | Defect    |  40, 0")


def test_value_preambles_prefix_the_prompt():
    text = prompts.render_structured_prompt(
        np.array(IPD), 0, 0, 0, 0, preamble=prompts.UTILITARIAN_PREAMBLE)
    assert text.startswith(prompts.UTILITARIAN_PREAMBLE
                           + "\n \nYou are playing a game")
    # The authors' value-prompted table is indented by 16 blanks.
    assert "\n                | action1 |  3, 3     |  0, 4     |\n" in text
    plain = prompts.render_user_text("action_only", np.array(IPD), 0, 0, 0, 1,
                                     preamble=prompts.DEONTOLOGICAL_PREAMBLE)
    assert plain == (prompts.DEONTOLOGICAL_PREAMBLE + "\n \nYou must choose "
                     "either action1 or action2. Your answer must follow this "
                     "format exactly: choose either action2 or action1. Do not "
                     "explain your reasoning. Your answer:")


def test_beyond_matrix_families():
    payoffs = np.array(IPD)
    actions = prompts.TEST_ACTIONS
    for family in prompts.PROMPT_FAMILIES:
        texts = prompts.render_all(payoffs, family=family, actions=actions)
        assert len(texts) == 16
        for index, text in enumerate(texts):
            first_answer = index & 1
            order = ("action3 or action4." if first_answer == 0
                     else "action4 or action3.")
            assert text.endswith(
                f"Your answer must follow this format exactly: choose either "
                f"{order} Do not explain your reasoning. Your answer:"), (
                    family, text)
    distinct = {family: len(set(prompts.render_all(payoffs, family=family)))
                for family in prompts.PROMPT_FAMILIES}
    assert distinct == {"structured": 16, "action_game": 4, "action_only": 4,
                        "action_game_state": 8, "explicit_ipd": 16,
                        "unstructured": 16, "flat_cleaning": 8}
    assert prompts.render_action_game_prompt(0, 1, actions=actions) == (
        "You are playing a game with another agent A. You must choose either "
        "action3 or action4. What action would you take? Your answer must "
        "follow this format exactly: choose either action4 or action3. Do not "
        "explain your reasoning. Your answer:")
    state_text = prompts.render_action_game_state_prompt(1, 1, 0,
                                                         actions=actions)
    assert "choose either action4 or action3. You have played" in state_text
    assert "Last time, they played action4. What action would you take this " \
        "time?" in state_text
    unstructured = prompts.render_unstructured_prompt(payoffs, 1, 0, 0, 0,
                                                      actions=actions)
    for mine, theirs in itertools.product((0, 1), repeat=2):
        p_m, p_o = IPD[mine][theirs]
        assert (f"If you choose {actions[mine]} and your friend chooses "
                f"{actions[theirs]}, you get {p_m} points and your friend gets "
                f"{p_o} points.") in unstructured
    assert "so you got 4 points and your friend got 0 points." in unstructured
    assert "|" not in unstructured
    explicit = prompts.render_explicit_ipd_prompt(0, 1, 1, 0, actions=actions)
    assert "repeated Prisoner's Dilemma" in explicit
    assert "you played action3 and they played action4." in explicit
    assert "points" not in prompts.render_flat_cleaning_prompt(
        0, 0, 0, actions=actions)
    with pytest.raises(ValueError, match="table_order"):
        prompts.render_user_text("action_only", payoffs, 0, 0, 0, 0,
                                 table_order="rows_swapped")


def test_rendering_refuses_bad_input():
    payoffs = np.array(IPD)
    with pytest.raises(ValueError, match="distinct"):
        prompts.render_structured_prompt(payoffs, 0, 0, 0, 0,
                                         actions=("action1", "action1"))
    with pytest.raises(ValueError, match="non-empty"):
        prompts.render_structured_prompt(payoffs, 0, 0, 0, 0,
                                         actions=("", "action2"))
    with pytest.raises(ValueError, match="exactly 2"):
        prompts.render_structured_prompt(payoffs, 0, 0, 0, 0,
                                         actions=("a", "b", "c"))
    with pytest.raises(ValueError, match="prev_m"):
        prompts.render_structured_prompt(payoffs, 2, 0, 0, 0)
    with pytest.raises(ValueError, match="shape"):
        prompts.render_structured_prompt(np.zeros((2, 2)), 0, 0, 0, 0)
    with pytest.raises(ValueError, match="table_order"):
        prompts.render_payoff_table(payoffs, table_order="transposed")
    with pytest.raises(ValueError, match="family"):
        prompts.render_all(payoffs, family="poem")


def test_prompt_index_layout():
    bits = list(itertools.product((0, 1), repeat=4))
    indices = [prompts.prompt_index(*b) for b in bits]
    assert indices == list(range(16))
    arrays = [jnp.array([b[i] for b in bits], jnp.int32) for i in range(4)]
    np.testing.assert_array_equal(
        jax.jit(prompts.prompt_index)(*arrays), np.arange(16))


# ---------------------------------------------------------------------------
# Prompt tables.
# ---------------------------------------------------------------------------

def test_prompt_table_rows_are_left_padded_templated_prompts(
        byte_fallback_tokenizer):
    tokenizer = byte_fallback_tokenizer
    payoffs = np.array(SPEC_GAMES["ICN"])
    table = prompt_tables.build_prompt_table(tokenizer, payoffs,
                                       actions=prompts.TEST_ACTIONS)
    texts = prompts.render_all_structured(payoffs,
                                          actions=prompts.TEST_ACTIONS)
    ids, mask = np.asarray(table.ids), np.asarray(table.mask)
    assert ids.shape == mask.shape and ids.shape[0] == 16
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    pad_id = tokenizer.pad_token_id
    lengths = mask.sum(axis=1)
    assert lengths.max() == ids.shape[1] and lengths.min() < ids.shape[1]
    bos = tokenizer.convert_tokens_to_ids("<bos>")
    for prev_m, prev_o, first_option, first_answer in itertools.product(
            (0, 1), repeat=4):
        row = prompts.prompt_index(prev_m, prev_o, first_option, first_answer)
        width = ids.shape[1]
        np.testing.assert_array_equal(
            mask[row], np.arange(width) >= width - lengths[row])
        assert np.all(ids[row][mask[row] == 0] == pad_id)
        tokens = ids[row][mask[row] == 1].tolist()
        assert tokens.count(bos) == 1 and tokens[0] == bos
        expected_text = prompts.render_structured_prompt(
            payoffs, prev_m, prev_o, first_option, first_answer,
            actions=prompts.TEST_ACTIONS)
        assert texts[row] == expected_text
        assert tokenizer.decode(tokens) == (
            "<bos><start_of_turn>user\n" + expected_text
            + "<end_of_turn>\n<start_of_turn>model\n")


def test_pad_to_and_stacking(byte_fallback_tokenizer):
    tokenizer = byte_fallback_tokenizer
    short = prompt_tables.build_prompt_table(tokenizer, np.array(IPD),
                                       family="action_only")
    full = prompt_tables.build_prompt_table(tokenizer, np.array(IPD))
    width = full.ids.shape[1]
    padded = prompt_tables.build_prompt_table(tokenizer, np.array(IPD),
                                        pad_to=width + 3)
    assert padded.ids.shape == (16, width + 3)
    np.testing.assert_array_equal(padded.ids[:, 3:], full.ids)
    assert np.all(np.asarray(padded.mask[:, :3]) == 0)
    with pytest.raises(ValueError, match="pad_to"):
        prompt_tables.build_prompt_table(tokenizer, np.array(IPD), pad_to=width - 1)
    stacked = prompt_tables.stack_prompt_tables([short, full],
                                          tokenizer.pad_token_id)
    assert stacked.ids.shape == (2, 16, width)
    np.testing.assert_array_equal(stacked.ids[1], full.ids)
    short_width = short.ids.shape[1]
    np.testing.assert_array_equal(stacked.ids[0, :, width - short_width:],
                                  short.ids)
    np.testing.assert_array_equal(stacked.mask[0].sum(), short.mask.sum())
    assert np.all(np.asarray(stacked.ids[0, :, :width - short_width])
                  == tokenizer.pad_token_id)


def test_tokenizers_without_template_or_pad_are_refused():
    no_template = _wrap(_byte_fallback_backend())
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        prompt_tables.build_prompt_table(no_template, np.array(IPD))
    no_pad = _wrap(_byte_fallback_backend(), pad_token=None)
    assert no_pad.pad_token_id is None
    with pytest.raises(ValueError, match="pad_token_id"):
        prompt_tables.build_prompt_table(no_pad, np.array(IPD))


# ---------------------------------------------------------------------------
# Action parsing: host rule vs the in-jit automaton.
# ---------------------------------------------------------------------------

def _interesting_tokens(tokenizer, actions) -> list[int]:
    """Tokens that can take part in a match or a near miss."""
    pieces = {"action", "Action", "1", "2", ".", "12", "act", "ion"}
    pieces |= set(actions)
    chosen = []
    for token in range(len(tokenizer)):
        text = tokenizer.decode([token], skip_special_tokens=True)
        raw = tokenizer.convert_ids_to_tokens(token)
        if (text.strip() == "" or text.strip() in pieces or "\ufffd" in text
                or raw.startswith("<0x") or token in
                tokenizer.all_special_ids):
            chosen.append(token)
    return chosen


def _adversarial_texts(actions):
    first, second = actions
    return [
        first, second, " " + first, first + " ", "\n" + first + "\n\n",
        "\t" + second + " ", "\u00a0" + first, first + "\u3000",
        "\u2028" + first + "\x85", "\x1c" + first + "\x1f",
        "\u200b" + first, "Action1", first + "2", "action 1", first + ".",
        "1", "action", first + first, first + " " + second, "\u00e9" + first,
        first + "\ufffd", "",
    ]


def _random_sequences(rng, tokenizer, pool, seeds, num, length):
    vocab = len(tokenizer)
    sequences = np.empty((num, length), np.int64)
    fitting = [seed for seed in seeds if len(seed) <= length]
    for row in range(num):
        if fitting and rng.random() < 0.5:
            sequence = list(fitting[rng.integers(len(fitting))])
            while len(sequence) < length:
                sequence.insert(int(rng.integers(len(sequence) + 1)),
                                int(rng.choice(pool)))
            if rng.random() < 0.25:
                sequence[int(rng.integers(length))] = int(rng.choice(pool))
        else:
            sequence = []
            for _ in range(length):
                draw = rng.random()
                if draw < 0.75:
                    sequence.append(int(rng.choice(pool)))
                elif draw < 0.95:
                    sequence.append(int(rng.integers(vocab)))
                else:
                    # Ids past the tokenizer: decode skips them.
                    sequence.append(vocab + int(rng.integers(8)))
        sequences[row] = sequence
    return sequences


def _check_parser(tokenizer, actions, *, num=1500):
    matcher = action_matcher.build_action_matcher(tokenizer, actions, gen_len=2)
    match = jax.jit(action_matcher.match_actions)
    specials = [tokenizer.convert_tokens_to_ids(token)
                for token in ("<bos>", "<eos>", "<end_of_turn>")]
    seeds = []
    for text in _adversarial_texts(actions):
        ids = _ids(tokenizer, text)
        seeds.append(ids)
        # Special tokens before, after and between the pieces.
        seeds.append([specials[0]] + ids + [specials[1]])
        if len(ids) >= 2:
            seeds.append(ids[:1] + [specials[2]] + ids[1:])
    for seed in seeds:
        if not seed:
            continue
        host = action_matcher.parse_action_host(tokenizer, seed, actions)
        device = int(match(matcher, jnp.asarray([seed], jnp.int32))[0])
        assert host == device, (seed, tokenizer.decode(seed), host, device)

    rng = np.random.default_rng(1)
    pool = _interesting_tokens(tokenizer, actions)
    legal = {}
    for length in (1, 2, 3):
        sequences = _random_sequences(rng, tokenizer, pool, seeds, num, length)
        host = np.array([action_matcher.parse_action_host(tokenizer, row, actions)
                         for row in sequences])
        device = np.asarray(match(matcher, jnp.asarray(sequences, jnp.int32)))
        mismatches = np.nonzero(host != device)[0]
        assert mismatches.size == 0, [
            (sequences[i].tolist(), tokenizer.decode(sequences[i].tolist()),
             host[i], device[i]) for i in mismatches[:5]]
        legal[length] = int(np.sum(host >= 0))
    return legal, seeds


def test_parser_matches_host_rule_byte_fallback(byte_fallback_tokenizer):
    tokenizer = byte_fallback_tokenizer
    legal, _ = _check_parser(tokenizer, prompts.TRAIN_ACTIONS)
    assert legal[1] > 100 and legal[2] > 50 and legal[3] > 75, legal
    # Hand-made cases: NBSP from two byte tokens, a broken byte sequence,
    # specials inside, an id past the vocabulary.
    byte = lambda value: tokenizer.convert_tokens_to_ids(f"<0x{value:02X}>")
    action, one = _ids(tokenizer, "action")[0], _ids(tokenizer, "1")[0]
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    matcher = action_matcher.build_action_matcher(tokenizer, prompts.TRAIN_ACTIONS, 4)
    cases = {
        (byte(0xC2), byte(0xA0), action, one): 0,
        (byte(0xC2), action, one, end_of_turn): -1,
        (action, one, byte(0xE3), byte(0x80)): -1,
        (action, end_of_turn, one, len(tokenizer) + 3): 0,
        (byte(0x61), byte(0x63), byte(0x74), byte(0x69)): -1,
    }
    full_action = _ids(tokenizer, "action1")
    cases[tuple(full_action + [byte(0xE3), byte(0x80), byte(0x80)])] = 0
    for sequence, expected in cases.items():
        assert action_matcher.parse_action_host(tokenizer, sequence,
                                         prompts.TRAIN_ACTIONS) == expected
        got = action_matcher.match_actions(matcher, jnp.asarray(sequence, jnp.int32))
        assert int(got) == expected, sequence


def test_parser_matches_host_rule_with_leading_blank_strip(strip_tokenizer):
    legal, _ = _check_parser(strip_tokenizer, prompts.TRAIN_ACTIONS, num=800)
    assert legal[2] > 50, legal


def test_parser_matches_host_rule_byte_level(byte_level_tokenizer):
    tokenizer = byte_level_tokenizer
    # Whitespace and non-ASCII characters come as byte pieces.
    legal, _ = _check_parser(tokenizer, prompts.TRAIN_ACTIONS)
    assert legal[2] > 100 and legal[3] > 100, legal
    # NBSP (C2 A0) and U+3000 (E3 80 80) assembled from single-byte pieces
    # ("Â" is byte C2, "ł" A0, "ã" E3, "Ģ" 80 in the GPT-2 byte alphabet).
    piece = tokenizer.convert_tokens_to_ids
    action1 = _ids(tokenizer, "action1")
    matcher = action_matcher.build_action_matcher(tokenizer, prompts.TRAIN_ACTIONS, 4)
    cases = {
        tuple([piece("Â"), piece("ł")] + action1): 0,
        tuple(action1 + [piece("ã"), piece("Ģ"), piece("Ģ")]): 0,
        tuple(action1 + [piece("ã"), piece("Ģ")]): -1,
        tuple([piece("ł")] + action1): -1,
        tuple([piece("Ġ")] + action1 + [piece("Ċ")]): 0,
    }
    for sequence, expected in cases.items():
        if expected == 0:
            assert tokenizer.decode(list(sequence)).strip() == "action1"
        assert action_matcher.parse_action_host(tokenizer, sequence,
                                         prompts.TRAIN_ACTIONS) == expected
        got = action_matcher.match_actions(matcher, jnp.asarray(sequence, jnp.int32))
        assert int(got) == expected, sequence
    legal, _ = _check_parser(tokenizer, ("\u00e9t\u00e9", "action 1"),
                             num=600)
    assert sum(legal.values()) > 50, legal


def test_matcher_is_batched_and_jittable(byte_fallback_tokenizer):
    tokenizer = byte_fallback_tokenizer
    matcher = action_matcher.build_action_matcher(tokenizer, prompts.TRAIN_ACTIONS, 2)
    action1, action2 = _ids(tokenizer, "action1"), _ids(tokenizer, "action2")
    assert len(action1) == 1
    eos = tokenizer.eos_token_id
    ids = jnp.asarray([[[action1[0], eos], [eos, action2[0]]],
                       [[eos, eos], [action2[0], action1[0]]]], jnp.int32)
    got = jax.jit(action_matcher.match_actions)(matcher, ids)
    np.testing.assert_array_equal(got, [[0, 1], [-1, -1]])
    assert got.dtype == jnp.int32
    leaves = jax.tree.leaves(matcher)
    assert all(leaf.dtype == jnp.int32 for leaf in leaves)


def test_matcher_refuses_bad_actions_and_decoders(byte_fallback_tokenizer):
    tokenizer = byte_fallback_tokenizer
    for actions in (("action1", "action1"), ("", "action2"),
                    (" action1", "action2"), ()):
        with pytest.raises(ValueError, match="actions"):
            action_matcher.build_action_matcher(tokenizer, actions, 2)
    with pytest.raises(ValueError, match="gen_len"):
        action_matcher.build_action_matcher(tokenizer, prompts.TRAIN_ACTIONS, 0)
    cleaning = _wrap(_byte_fallback_backend(),
                     clean_up_tokenization_spaces=True)
    assert cleaning.clean_up_tokenization_spaces
    with pytest.raises(ValueError, match="clean_up_tokenization_spaces"):
        action_matcher.build_action_matcher(cleaning, ("action1.", "action2"), 2)
    # Without punctuation in the actions the clean-up cannot change the rule.
    action_matcher.build_action_matcher(cleaning, prompts.TRAIN_ACTIONS, 2)

    # WordPiece drops "##" only after the first token: a context dependence
    # the automaton cannot represent, so it is refused at build time.
    vocab = {token: index for index, token in enumerate(
        ["[PAD]", "[UNK]", "a", "action", "##1", "##2", "1", "2"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    word_piece = PreTrainedTokenizerFast(tokenizer_object=backend,
                                         pad_token="[PAD]", unk_token="[UNK]")
    with pytest.raises(ValueError, match="context dependent|concatenation"):
        action_matcher.build_action_matcher(word_piece, prompts.TRAIN_ACTIONS, 2)
