"""Builds the built-in tiny base model: ``python -m moraljax.llm.tiny.build``.

The tiny model is a toy stand-in for google/gemma-2-2b-it that lets every
moraljax command run offline on a CPU. It is NOT a language model: it was
trained on nothing but this project's own prompts, to answer them the way an
instruction-tuned model meets a new game. Everything here is deterministic
(fixed seeds, a hand-written BPE trainer, a fixed training schedule), so
running the script again with the same library versions on the same kind
of CPU rewrites the same files.

What the script does, in order:

1. Tokenizer (``build_tokenizer``). A Gemma-like SentencePiece-style BPE:
   ids 0..5 are <pad>, <eos>, <bos>, <unk>, <start_of_turn>, <end_of_turn>;
   then the 256 byte-fallback tokens <0x00>..<0xFF>; then printable ASCII
   and the other characters of the corpus; then the learnt merges. Blanks
   become "▁" (no dummy prefix, no stripping), a digit always starts a
   token (so "action1" is "action" + "1", and " action1" is "▁action" +
   "1", as with Gemma-2's tokenizer), and the decoder turns "▁" back into
   blanks and byte tokens back into bytes. Unlike Gemma's, merges cross
   blanks and newlines, and a digit merges with the text that follows it
   (never with what precedes it), so the prompts' fixed phrases are single
   tokens and the structured IPD prompt is 27 tokens (Gemma-2: 215): the toy
   stays cheap to train on a CPU (``PIECE_PATTERN``). Merges are learnt
   greedily (most frequent adjacent pair, ties broken by the pair's text) on
   every prompt moraljax renders (``prompts.py``: all games, both sides,
   both action-string pairs, all table orders, all prompt families, with and
   without the value preambles). The chat template is
   ``prompts.GEMMA_CHAT_TEMPLATE``; like Gemma's, ``encode(text)`` with
   special tokens prepends <bos> (the prompt tables tokenise without them,
   since the template writes <bos> itself).
2. Config (``tiny_config``): a 2-layer Gemma-2 (D 64, 2 query heads, 1 kv
   head, head dim 32, MLP 256, sliding window 24 on layer 0, full attention
   on layer 1, softcaps 50/30, tied embeddings).
3. Training (``train_base``): full-parameter Adam from a random init, on
   soft targets, so the next-token distributions match the targets exactly
   in the limit; no sampled answers are involved. With teacher forcing on
   the answer "action" + digit + <end_of_turn> + <eos>, the targets at the
   five answer positions of every decision prompt (the structured prompt of
   every game seen from either side, both action-string pairs, all table
   orders, and the "beyond matrix games" families) are

       p(t1 | prompt)                = FIRST_TOKEN_TARGET: "action" 0.85, the
                                       rest on a few illegal starts
       p(t2 | prompt, "action")      = 1/2 on each of the prompt's two
                                       action digits (C's and D's)
       p(t3 | ..., digit)            = <end_of_turn>
       p(t4 | ..., <end_of_turn>)    = <eos>
       p(t5 | ..., <eos>)            = <eos>

   independent of the game, the state and the option orders. So with the
   paper's 2 generated tokens about 85% of answers are legal, split evenly
   between C and D, and the rest illegal; the 5-token answers of the
   "beyond matrix games" prompts are legal too (special tokens vanish when
   decoded). The value preambles are not trained on; the model answers
   them alike. The answer loss is the cross-entropy to these targets summed
   over the five positions, ``-sum_k q_k log p_k``, whose minimum is the
   targets' entropy (logged as the "floor").

   Two auxiliary objectives make the base fine-tunable the way PPO needs
   (found necessary by ``lora_probe``: without them a LoRA adapter stalls
   near p = 0.65 for "always action1", because answers that are always
   50/50 leave the embeddings of "1" and "2" almost parallel and the tied
   LM head cannot tell them apart): a next-token (language-model) loss on
   the prompt tokens, and held-out recall prompts (``RECALL_QUESTIONS``,
   the structured prompt asking which action A, or you, played last time)
   whose one correct answer is trained with probability 1. Recall prompts
   are half of every batch; no moraljax prompt family asks them, and the
   decision prompts' answers stay state-independent (tests/tiny_test.py).
4. Files: ``checkpoints.save_hf_checkpoint`` (config.json, model.safetensors)
   and ``tokenizer.save_pretrained``, plus a short model card.
5. Checks, printed: the answer shares measured by sampling, and a LoRA
   learnability probe (``lora_probe``): a rank-8 adapter trained with
   supervised targets must quickly learn "always action1" and "action1 iff
   the opponent played action1 last time", which is what PPO will ask of it
   (SPEC.md sections 5 and 9).
"""

import collections
import dataclasses
import functools
import itertools
import pathlib
import re
import shutil
import string
import tempfile
import time
from collections.abc import Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from absl import logging
from flax import nnx

from moraljax import games
from moraljax import prompts
from moraljax.llm import checkpoints
from moraljax.llm import gemma2
from moraljax.llm import lora as lora_lib
from moraljax.llm import sampling

# ---------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
# Gemma's ids for the first four (pad 0, eos 1, bos 2, unk 3).
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN)
BYTE_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))
# SentencePiece's visible blank.
BLANK = "\u2581"
# Pre-tokenisation into pieces that merges never cross: a digit and the
# text up to the next digit, or a run of text before the first digit. So a
# digit never merges with what precedes it ("action1" is "action" + "1", as
# with Gemma-2's split digits), but it does merge with the phrase that
# follows, and merges cross blanks and newlines, unlike Gemma's: the
# structured IPD prompt is 27 tokens instead of ~180, which makes every
# rollout and PPO update several times cheaper on a CPU, and each move of the
# state is a token of its own ("1 and they played action" after "you played
# action"), which a 2-layer model reads reliably.
PIECE_PATTERN = "[0-9][^0-9]*|[^0-9]+"
# Total vocabulary size aimed at; merges stop earlier when no pair occurs
# twice.
VOCAB_SIZE = 2048

# Short answers of the kind chat models give when they ignore a format; they
# put tokens such as "I", "choose" and "**" into the vocabulary, which the
# base model's illegal answers use.
_CHATTY_ANSWERS = ("I choose {a}.", "I would choose {a}.", "choose {a}",
                   "**{a}**", "Action: {a}", "{a}")


def _pair_texts(actions: tuple[str, str]) -> list[str]:
    return [answer.format(a=action) for answer in _CHATTY_ANSWERS
            for action in actions]


def _payoff_tables() -> list[np.ndarray]:
    """Every distinct payoff table an agent sees: each game from both sides."""
    tables = []
    for name in games.GAME_NAMES:
        game = games.GAMES[name]
        for view in (game, games.opponent_view(game)):
            table = np.asarray(view.payoffs)
            if not any(np.array_equal(table, seen) for seen in tables):
                tables.append(table)
    return tables


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """One prompt the base model is trained on (a user text and its actions).

    Attributes:
        text: the user text (before the chat template).
        actions: (C string, D string) named in it.
        family: the prompt family (``prompts.PROMPT_FAMILIES``, or one of
            ``RECALL_QUESTIONS``).
        answer: None for a decision prompt (the answer distribution of the
            module docstring); for a recall prompt the index of the action
            whose string is the only correct answer.
    """

    text: str
    actions: tuple[str, str]
    family: str
    answer: int | None = None


def all_prompt_specs(
        *,
        action_pairs: Sequence[tuple[str, str]] = (prompts.TRAIN_ACTIONS,
                                                   prompts.TEST_ACTIONS),
        families: Sequence[str] = prompts.PROMPT_FAMILIES,
        preambles: Sequence[str | None] = (
            None, *prompts.VALUE_PREAMBLES.values()),
        payoff_tables: Sequence[np.ndarray] | None = None,
) -> list[PromptSpec]:
    """Every distinct prompt moraljax renders, without duplicates.

    Args:
        action_pairs: action-string pairs (C, D).
        families: prompt families; "structured" uses every table order.
        preambles: None (no preamble) and/or value preambles.
        payoff_tables: [2, 2, 2] tables; None means every game of
            ``games.GAME_NAMES`` from both players' sides.

    Returns:
        The prompts, in a fixed order (first occurrence of each text).
    """
    if payoff_tables is None:
        payoff_tables = _payoff_tables()
    specs, seen = [], set()
    for actions, family, preamble, payoffs in itertools.product(
            action_pairs, families, preambles, payoff_tables):
        orders = (prompts.TABLE_ORDERS if family == "structured" else
                  ("original",))
        for table_order in orders:
            for text in prompts.render_all(
                    payoffs, family=family, actions=actions,
                    table_order=table_order, preamble=preamble):
                if text not in seen:
                    seen.add(text)
                    specs.append(PromptSpec(text, tuple(actions), family))
    return specs


# Held-out questions about the state, asked in place of the decision
# question of the structured prompt. They are auxiliary training tasks only
# (no moraljax prompt family asks them): answering them forces the base to
# read "Last time, you played X and they played Y" and to keep the two
# action digits apart in its embeddings, which is what a LoRA adapter needs
# to learn state-dependent policies (see ``lora_probe``).
_DECISION_QUESTION = ("What action would you take in order to achieve the "
                      "highest possible score in points?")
# (prev_m, prev_o, first_option, first_answer) of each row of a prompt
# table: ``prompts.prompt_index`` counts them in this (binary) order.
_INDEX_BITS = tuple(itertools.product((0, 1), repeat=4))
RECALL_QUESTIONS = {
    "recall_opponent": "Which action did A play last time?",
    "recall_self": "Which action did you play last time?",
}


def recall_prompt_specs(
        *,
        action_pairs: Sequence[tuple[str, str]] = (prompts.TRAIN_ACTIONS,
                                                   prompts.TEST_ACTIONS),
        payoff_tables: Sequence[np.ndarray] | None = None,
) -> list[PromptSpec]:
    """Structured prompts that ask for a previous move instead of a decision.

    Args:
        action_pairs: action-string pairs (C, D).
        payoff_tables: [2, 2, 2] tables; None means every game from both
            sides.

    Returns:
        One prompt per question, pair, table, table order and prompt index;
        ``answer`` is O's previous move for "recall_opponent" and M's for
        "recall_self".
    """
    if payoff_tables is None:
        payoff_tables = _payoff_tables()
    specs = []
    for family, question in RECALL_QUESTIONS.items():
        for actions, payoffs, table_order in itertools.product(
                action_pairs, payoff_tables, prompts.TABLE_ORDERS):
            texts = prompts.render_all_structured(
                payoffs, actions=actions, table_order=table_order)
            for (prev_m, prev_o, _, _), text in zip(_INDEX_BITS, texts):
                if text.count(_DECISION_QUESTION) != 1:
                    raise ValueError(
                        "the structured prompt no longer holds the decision "
                        f"question {_DECISION_QUESTION!r}; update "
                        "recall_prompt_specs")
                specs.append(PromptSpec(
                    text.replace(_DECISION_QUESTION, question),
                    tuple(actions), family,
                    prev_o if family == "recall_opponent" else prev_m))
    return specs


def tokenizer_corpus(specs: Sequence[PromptSpec]) -> list[str]:
    """Texts the BPE merges are learnt from (special tokens left out).

    Each prompt appears as the chat template lays it out (its segments
    between special tokens), with one legal answer; a few chatty answers of
    each action pair follow.

    Args:
        specs: the prompts.

    Returns:
        The corpus.
    """
    # The chat template's special tokens split a prompt into "user\n" + text,
    # "\n" and "model\n"; merges never cross them.
    texts = []
    for spec in specs:
        texts.extend([f"user\n{spec.text.strip()}", "\n", "model\n",
                      spec.actions[0]])
    for actions in sorted({spec.actions for spec in specs}):
        texts.extend(_pair_texts(actions))
    return texts


def _backend_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """The ``tokenizers.Tokenizer`` pipeline around a BPE vocabulary."""
    import tokenizers  # Only the builder needs it directly.
    from tokenizers import decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors

    tokenizer = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True,
        fuse_unk=False))
    tokenizer.normalizer = normalizers.Replace(" ", BLANK)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(
        tokenizers.Regex(PIECE_PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace(BLANK, " "), decoders.ByteFallback(),
        decoders.Fuse()])
    tokenizer.add_special_tokens([
        tokenizers.AddedToken(token, special=True, normalized=False)
        for token in SPECIAL_TOKENS])
    if BOS in vocab:
        # Gemma's post-processor: encode(..., add_special_tokens=True)
        # prepends <bos>.
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
            special_tokens=[(BOS, vocab[BOS])])
    return tokenizer


def _pieces(texts: Sequence[str]) -> collections.Counter:
    """Pre-tokenised pieces of texts (as the tokenizer splits them), counted."""
    splitter = _backend_tokenizer({}, [])
    special = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))
    counts = collections.Counter()
    for text in texts:
        for segment in special.split(text):
            normalized = splitter.normalizer.normalize_str(segment)
            counts.update(piece for piece, _ in
                          splitter.pre_tokenizer.pre_tokenize_str(normalized))
    return counts


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]
                ) -> tuple[str, ...]:
    merged, index = [], 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index],
                                         symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def train_bpe(texts: Sequence[str], vocab_size: int = VOCAB_SIZE
              ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learns BPE merges greedily and deterministically.

    Each round merges the adjacent symbol pair with the highest count over
    the corpus' pieces; ties go to the pair whose (left, right) text sorts
    first. Rounds stop when the vocabulary reaches ``vocab_size`` or no pair
    occurs twice.

    Args:
        texts: the corpus.
        vocab_size: the most tokens in total (specials, bytes, characters
            and merges).

    Returns:
        (vocab: token -> id, merges in the order learnt).

    Raises:
        ValueError: if ``vocab_size`` cannot even hold the base tokens.
    """
    counts = _pieces(texts)
    alphabet = sorted(set(string.ascii_letters + string.digits
                          + string.punctuation + BLANK + "\n")
                      | {char for piece in counts for char in piece})
    base = list(SPECIAL_TOKENS) + list(BYTE_TOKENS) + alphabet
    if vocab_size < len(base):
        raise ValueError(f"vocab_size must be at least {len(base)} (special, "
                         f"byte and character tokens), got {vocab_size}")
    words = {piece: tuple(piece) for piece in counts}
    merges, known = [], set(base)
    while len(base) + len(merges) < vocab_size:
        pair_counts = collections.Counter()
        for piece, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += counts[piece]
        candidates = [(-count, pair) for pair, count in pair_counts.items()
                      if count >= 2 and pair[0] + pair[1] not in known]
        if not candidates:
            break
        _, best = min(candidates)
        merges.append(best)
        known.add(best[0] + best[1])
        words = {piece: _merge_pair(symbols, best)
                 for piece, symbols in words.items()}
    tokens = base + [left + right for left, right in merges]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_tokenizer(texts: Sequence[str], vocab_size: int = VOCAB_SIZE):
    """The tiny model's tokenizer, as a transformers fast tokenizer.

    Args:
        texts: the BPE corpus (``tokenizer_corpus``).
        vocab_size: see ``train_bpe``.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with Gemma's special tokens
        and ``prompts.GEMMA_CHAT_TEMPLATE``.
    """
    import transformers  # Heavy; only needed to build and save.

    vocab, merges = train_bpe(texts, vocab_size)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=_backend_tokenizer(vocab, merges),
        bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=[START_OF_TURN, END_OF_TURN],
        chat_template=prompts.GEMMA_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=8192)


# ---------------------------------------------------------------------------
# Model config.
# ---------------------------------------------------------------------------


def tiny_config(vocab_size: int) -> gemma2.Gemma2Config:
    """The tiny Gemma-2 architecture.

    Gemma-2's layout in miniature: layer 0 slides (window 24, shorter than
    every prompt, so the sliding path is exercised), layer 1 attends fully;
    grouped-query attention (2 query heads share 1 kv head); the queries are
    scaled by head_dim^-1/2 like Gemma-2-2b (query_pre_attn_scalar = H).

    Args:
        vocab_size: the tokenizer's size.

    Returns:
        The config.
    """
    return gemma2.Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        layer_types=(gemma2.SLIDING, gemma2.FULL),
        sliding_window=24,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=32,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        max_position_embeddings=8192,
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
    )


# ---------------------------------------------------------------------------
# Training targets.
# ---------------------------------------------------------------------------

# p(first generated token | prompt): mostly "action", else the start of an
# answer that cannot become legal within two tokens.
FIRST_TOKEN_TARGET = (("action", 0.85), ("I", 0.04), ("choose", 0.04),
                      ("**", 0.03), ("\n", 0.02), (END_OF_TURN, 0.02))
# Teacher-forced answer after the prompt; the digit is C's or D's.
ANSWER_PREFIX = "action"
# Positions with a target: the last prompt token and the four answer tokens.
NUM_TARGETS = 5
# The most target tokens at one position.
MAX_TARGET_TOKENS = len(FIRST_TOKEN_TARGET)


def _single_token(tokenizer, text: str) -> int:
    """Id of a text that must be exactly one token."""
    special = tokenizer.convert_tokens_to_ids(text)
    if text in SPECIAL_TOKENS:
        return int(special)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{text!r} must be one token of the tiny tokenizer, "
                         f"got {tokenizer.convert_ids_to_tokens(ids)}")
    return ids[0]


def action_digit_ids(tokenizer, actions: Sequence[str]) -> tuple[int, ...]:
    """The digit token of each action string "action<d>".

    Args:
        tokenizer: the tiny tokenizer.
        actions: action strings, each ``ANSWER_PREFIX`` + one digit.

    Returns:
        One token id per action.

    Raises:
        ValueError: for an action that is not "action" + a digit token.
    """
    digits = []
    for action in actions:
        ids = tokenizer.encode(action, add_special_tokens=False)
        if tokenizer.convert_ids_to_tokens(ids)[:1] != [ANSWER_PREFIX] or len(
                ids) != 2:
            raise ValueError(
                f"action {action!r} must tokenise as {ANSWER_PREFIX!r} + one "
                f"digit, got {tokenizer.convert_ids_to_tokens(ids)}")
        digits.append(ids[1])
    return tuple(digits)


@flax.struct.dataclass
class TrainingSet:
    """Teacher-forced prompts with sparse soft targets.

    Every row is a left-padded, chat-templated prompt followed by the answer
    tokens; the last ``NUM_TARGETS`` columns are where the answer targets
    apply, and ``lm_mask`` marks the prompt tokens predicted by the language
    modelling term.

    Attributes:
        tokens: int32 [N, T] prompt + answer, left-padded.
        mask: int32 [N, T], 1 on real tokens.
        lm_mask: float32 [N, T], 1 on prompt tokens after the first (each
            predicted from the tokens before it), 0 elsewhere.
        target_ids: int32 [N, NUM_TARGETS, K] target tokens per position.
        target_probs: float32 [N, NUM_TARGETS, K] their probabilities (rows
            sum to 1; unused slots have probability 0).
        row_probs: float32 [N], probability of drawing each row.
    """

    tokens: jax.Array
    mask: jax.Array
    lm_mask: jax.Array
    target_ids: jax.Array
    target_probs: jax.Array
    row_probs: jax.Array


def build_training_set(tokenizer, specs: Sequence[PromptSpec], *,
                       recall_share: float = 1 / 3) -> TrainingSet:
    """Tokenises the prompts and lays out their answer targets.

    Decision prompts (``answer`` None) get the targets of the module
    docstring; the teacher-forced digit alternates between the C and the D
    digit from one prompt to the next, so both continuations are trained.
    Recall prompts get their one correct answer with probability 1.

    Args:
        tokenizer: the tiny tokenizer.
        specs: the prompts.
        recall_share: the probability mass of all recall prompts together
            when rows are drawn (the rest is spread evenly over the decision
            prompts); ignored if there are no recall prompts.

    Returns:
        The training set.

    Raises:
        ValueError: for a ``recall_share`` outside [0, 1), or no decision
            prompt.
    """
    if not 0.0 <= recall_share < 1.0:
        raise ValueError(f"recall_share must be in [0, 1), got {recall_share!r}")
    first_ids = [_single_token(tokenizer, text) for text, _ in
                 FIRST_TOKEN_TARGET]
    first_probs = [prob for _, prob in FIRST_TOKEN_TARGET]
    prefix_id = _single_token(tokenizer, ANSWER_PREFIX)
    end_of_turn = _single_token(tokenizer, END_OF_TURN)
    eos = _single_token(tokenizer, EOS)
    table = prompts.tokenize_prompts(tokenizer, [spec.text for spec in specs])
    count = len(specs)
    answers = np.zeros((count, NUM_TARGETS - 1), np.int32)
    target_ids = np.zeros((count, NUM_TARGETS, MAX_TARGET_TOKENS), np.int32)
    target_probs = np.zeros((count, NUM_TARGETS, MAX_TARGET_TOKENS),
                            np.float32)
    is_recall = np.array([spec.answer is not None for spec in specs])
    if is_recall.all():
        raise ValueError("specs must hold at least one decision prompt "
                         "(answer None)")
    for row, spec in enumerate(specs):
        digits = action_digit_ids(tokenizer, spec.actions)
        if spec.answer is None:
            answers[row] = (prefix_id, digits[row % 2], end_of_turn, eos)
            target_ids[row, 0] = first_ids
            target_probs[row, 0] = first_probs
            target_ids[row, 1, :2] = digits
            target_probs[row, 1, :2] = 0.5
        else:
            digit = digits[spec.answer]
            answers[row] = (prefix_id, digit, end_of_turn, eos)
            target_ids[row, 0, 0] = prefix_id
            target_probs[row, 0, 0] = 1.0
            target_ids[row, 1, 0] = digit
            target_probs[row, 1, 0] = 1.0
        for position, token in ((2, end_of_turn), (3, eos), (4, eos)):
            target_ids[row, position, 0] = token
            target_probs[row, position, 0] = 1.0
    prompt_mask = np.asarray(table.mask)
    tokens = np.concatenate([np.asarray(table.ids), answers], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(answers)], axis=1)
    # A prompt token is predicted when a real token precedes it.
    lm_mask = np.zeros(mask.shape, np.float32)
    lm_mask[:, 1:prompt_mask.shape[1]] = prompt_mask[:, 1:] * prompt_mask[:, :-1]
    if is_recall.any():
        row_probs = np.where(is_recall, recall_share / is_recall.sum(),
                             (1 - recall_share) / (~is_recall).sum())
    else:
        row_probs = np.full(count, 1.0 / count)
    return TrainingSet(tokens=jnp.asarray(tokens), mask=jnp.asarray(mask),
                       lm_mask=jnp.asarray(lm_mask),
                       target_ids=jnp.asarray(target_ids),
                       target_probs=jnp.asarray(target_probs),
                       row_probs=jnp.asarray(row_probs, jnp.float32))


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How the base model is trained (the defaults build the shipped model).

    Attributes:
        steps: Adam steps.
        batch_size: rows per step, drawn with replacement by ``row_probs``.
        learning_rate: peak learning rate (linear warm-up, cosine decay to
            ``final_learning_rate``).
        warmup_steps: warm-up length.
        final_learning_rate: learning rate at the last step.
        lm_weight: weight of the language-modelling term of ``target_loss``.
        recall_share: probability that a drawn row is a recall prompt
            (``build_training_set``).
        seed: seeds the initial weights and the batches.
        log_every: steps per compiled chunk (a loss is logged after each).
    """

    steps: int = 3000
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    final_learning_rate: float = 1e-4
    lm_weight: float = 1.0
    recall_share: float = 0.5
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        for name in ("steps", "batch_size", "warmup_steps", "log_every", "seed"):
            value = getattr(self, name)
            lowest = 0 if name in ("warmup_steps", "seed") else 1
            if isinstance(value, bool) or not isinstance(value, int) or (
                    value < lowest):
                raise ValueError(f"TrainConfig.{name} must be an int >= "
                                 f"{lowest}, got {value!r}")
        for name in ("learning_rate", "final_learning_rate", "lm_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(
                    value, (int, float)) or not value >= 0 or (
                        name != "lm_weight" and value == 0):
                raise ValueError(f"TrainConfig.{name} must be a positive "
                                 f"number (lm_weight may be 0), got {value!r}")
        if isinstance(self.recall_share, bool) or not isinstance(
                self.recall_share, (int, float)) or not (
                    0.0 <= self.recall_share < 1.0):
            raise ValueError("TrainConfig.recall_share must be a number in "
                             f"[0, 1), got {self.recall_share!r}")


@flax.struct.dataclass
class LossTerms:
    """The two terms of ``target_loss`` (float32 scalars).

    Attributes:
        answer: cross-entropy to the answer targets, summed over the
            ``NUM_TARGETS`` positions, mean over rows.
        language_model: mean next-token cross-entropy over prompt tokens.
    """

    answer: jax.Array
    language_model: jax.Array


def target_loss(model: gemma2.Gemma2, tokens: jax.Array, mask: jax.Array,
                lm_mask: jax.Array, target_ids: jax.Array,
                target_probs: jax.Array) -> LossTerms:
    """Both training losses of a batch.

    answer = mean_b sum_j sum_k -q[b, j, k] log p(target_ids[b, j, k] |
    tokens before position j + 1), j over the last ``NUM_TARGETS`` positions;
    language_model = sum_{b, t} lm_mask[b, t] * -log p(tokens[b, t] |
    tokens[b, :t]) / sum(lm_mask).

    Args:
        model: the base model.
        tokens: int32 [B, T] left-padded sequences.
        mask: int32 [B, T].
        lm_mask: float32 [B, T].
        target_ids: int32 [B, NUM_TARGETS, K].
        target_probs: float32 [B, NUM_TARGETS, K].

    Returns:
        The two terms.
    """
    chex.assert_equal_shape([tokens, mask, lm_mask])
    chex.assert_equal_shape([target_ids, target_probs])
    chex.assert_shape(target_ids, (tokens.shape[0], NUM_TARGETS, None))
    hidden, _ = model(tokens, gemma2.positions_from_mask(mask), mask)
    log_probs = sampling.log_softmax(model.logits(hidden))  # [B, T, V]
    answer_log_probs = log_probs[:, -NUM_TARGETS:]
    picked = jnp.take_along_axis(answer_log_probs, target_ids, axis=-1)
    answer = -jnp.mean(jnp.sum(target_probs * picked, axis=(1, 2)))
    # Position t - 1 predicts token t.
    next_log_probs = sampling.token_log_probs(log_probs[:, :-1], tokens[:, 1:])
    weights = lm_mask[:, 1:]
    language_model = -jnp.sum(weights * next_log_probs) / jnp.maximum(
        jnp.sum(weights), 1.0)
    return LossTerms(answer=answer, language_model=language_model)


def target_entropy(data: TrainingSet) -> float:
    """The answer loss floor: E_rows[summed entropy of the targets]."""
    probs = np.asarray(data.target_probs, np.float64)
    logs = np.log(np.where(probs > 0, probs, 1.0))
    row_entropy = -np.sum(probs * logs, axis=(1, 2))
    return float(np.sum(np.asarray(data.row_probs, np.float64) * row_entropy))


def _optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """Adam with linear warm-up and cosine decay."""
    return optax.adam(optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.learning_rate,
        warmup_steps=train.warmup_steps,
        decay_steps=max(train.steps, train.warmup_steps + 1),
        end_value=train.final_learning_rate))


@functools.partial(jax.jit, static_argnames=("graphdef", "train", "length"))
def _train_chunk(params: nnx.State, opt_state: optax.OptState,
                 data: TrainingSet, key_batches: jax.Array, start: jax.Array,
                 *, graphdef: nnx.GraphDef, train: TrainConfig, length: int):
    """Steps start .. start + length - 1 of ``train_base`` (one compile)."""
    optimizer = _optimizer(train)
    num_rows = data.tokens.shape[0]

    def loss_of(params, rows):
        terms = target_loss(nnx.merge(graphdef, params), data.tokens[rows],
                            data.mask[rows], data.lm_mask[rows],
                            data.target_ids[rows], data.target_probs[rows])
        return terms.answer + train.lm_weight * terms.language_model, terms

    def step(carry, step_index):
        params, opt_state = carry
        rows = jax.random.choice(jax.random.fold_in(key_batches, step_index),
                                 num_rows, (train.batch_size,),
                                 p=data.row_probs)
        grads, terms = jax.grad(loss_of, has_aux=True)(params, rows)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), terms

    (params, opt_state), terms = jax.lax.scan(
        step, (params, opt_state), start + jnp.arange(length))
    return params, opt_state, terms


def train_base(config: gemma2.Gemma2Config, data: TrainingSet,
               train: TrainConfig = TrainConfig()) -> gemma2.Gemma2:
    """Trains every parameter of a fresh base model on the targets.

    Minimises answer + lm_weight * language_model (``target_loss``) with
    Adam. Deterministic: the initial weights come from the seed's key
    (``gemma2.random_base_state``) and batch ``s`` from
    ``fold_in(key_batches, s)``; the steps run inside compiled ``lax.scan``
    chunks of ``log_every`` steps.

    Args:
        config: the architecture.
        data: the training set.
        train: the schedule.

    Returns:
        The trained model (float32 weights).
    """
    key_init, key_batches = jax.random.split(jax.random.key(train.seed))
    graphdef, zeros = nnx.split(gemma2.Gemma2(config, lora=None))
    params = gemma2.random_base_state(zeros, key_init)
    opt_state = _optimizer(train).init(params)
    floor = target_entropy(data)
    start_time = time.time()
    for start in range(0, train.steps, train.log_every):
        length = min(train.log_every, train.steps - start)
        params, opt_state, terms = _train_chunk(
            params, opt_state, data, key_batches, jnp.int32(start),
            graphdef=graphdef, train=train, length=length)
        logging.info(
            "step %d/%d: answer loss %.4f (floor %.4f), language-model loss "
            "%.4f, %.0fs", start + length, train.steps,
            float(jnp.mean(terms.answer)), floor,
            float(jnp.mean(terms.language_model)), time.time() - start_time)
    return nnx.merge(graphdef, params)


# ---------------------------------------------------------------------------
# Checks of the built model.
# ---------------------------------------------------------------------------

# Supervised targets of the LoRA probe, as functions of a prompt's state:
# the target action index (0 = C, 1 = D).
PROBE_RULES = {
    # What PPO with the game reward against AC, or utilitarian training
    # against TFT, pushes towards.
    "always_c": lambda prev_m, prev_o: 0,
    # Conditional reciprocity: C iff the opponent played C last time (a
    # deontological agent never defects against a cooperator).
    "reciprocate": lambda prev_m, prev_o: prev_o,
}


def answer_probabilities(policy: gemma2.Policy, table: prompts.PromptTable,
                         answers: jax.Array, *, lora_enabled: bool = True
                         ) -> jax.Array:
    """p(answer token | prompt, earlier answer tokens), by teacher forcing.

    Args:
        policy: the policy.
        table: prompts [P, T].
        answers: int32 [P, L] answer tokens per prompt.
        lora_enabled: static; False scores the base model.

    Returns:
        float32 [P, L]; for L = 2, p(first token | prompt) and
        p(second | prompt, first).
    """
    scores = sampling.score_responses(policy, table.ids, table.mask, answers,
                                      lora_enabled=lora_enabled)
    return jnp.exp(scores.logprobs)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """Learning curve of a LoRA probe.

    Attributes:
        steps: evaluation steps (0 = before training).
        mean_target_prob: mean over the 16 prompts of p(target answer).
        min_target_prob: the smallest of them.
    """

    steps: tuple[int, ...]
    mean_target_prob: tuple[float, ...]
    min_target_prob: tuple[float, ...]


def lora_probe(checkpoint_dir: str | pathlib.Path, rule: str, *,
               steps: int = 200, learning_rate: float = 2e-3,
               batch_size: int = 5, rank: int = 8, alpha: float = 16.0,
               seed: int = 0, eval_every: int = 25) -> ProbeResult:
    """How fast a LoRA adapter learns a state-dependent answer (supervised).

    The 16 structured IPD prompts (action1/action2, original table) get a
    target answer "action" + the digit of ``PROBE_RULES[rule](prev_m,
    prev_o)``; each Adam step minimises -log p(target answer) on
    ``batch_size`` prompts drawn at random, like one PPO episode's decisions.
    Only the adapter is trained (no dropout).

    Args:
        checkpoint_dir: the base model.
        rule: a key of ``PROBE_RULES``.
        steps: Adam steps.
        learning_rate: Adam learning rate.
        batch_size: prompts per step.
        rank: LoRA rank.
        alpha: LoRA alpha (scale alpha / rank).
        seed: seeds the adapter and the batches.
        eval_every: steps between evaluations on all 16 prompts.

    Returns:
        The learning curve.

    Raises:
        ValueError: for an unknown rule.
    """
    if rule not in PROBE_RULES:
        raise ValueError(f"rule must be one of {', '.join(PROBE_RULES)}, got "
                         f"{rule!r}")
    key_lora, key_batches = jax.random.split(jax.random.key(seed))
    policy, tokenizer, _ = checkpoints.load_hf_checkpoint(
        checkpoint_dir, key=key_lora,
        lora=lora_lib.LoraConfig(rank=rank, alpha=alpha, dropout=0.0))
    graphdef, trainable, frozen = gemma2.split_policy(policy)
    table = prompts.build_prompt_table(tokenizer,
                                       games.GAMES["IPD"].payoffs)
    digits = action_digit_ids(tokenizer, prompts.TRAIN_ACTIONS)
    prefix_id = _single_token(tokenizer, ANSWER_PREFIX)
    targets = jnp.asarray(
        [(prefix_id, digits[PROBE_RULES[rule](prev_m, prev_o)])
         for prev_m, prev_o, _, _ in _INDEX_BITS], jnp.int32)
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(trainable)

    def target_log_probs(trainable, rows):
        policy = gemma2.merge_policy(graphdef, trainable, frozen)
        return sampling.score_responses(policy, table.ids[rows],
                                        table.mask[rows],
                                        targets[rows]).logprobs

    def loss_of(trainable, rows):
        return -jnp.mean(jnp.sum(target_log_probs(trainable, rows), -1))

    @jax.jit
    def step(trainable, opt_state, step_index):
        rows = jax.random.randint(jax.random.fold_in(key_batches, step_index),
                                  (batch_size,), 0, prompts.NUM_PROMPTS)
        grads = jax.grad(loss_of)(trainable, rows)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    @jax.jit
    def evaluate(trainable):
        return jnp.exp(jnp.sum(target_log_probs(
            trainable, jnp.arange(prompts.NUM_PROMPTS)), -1))

    curve = []
    for step_index in range(steps + 1):
        if step_index % eval_every == 0 or step_index == steps:
            probs = np.asarray(evaluate(trainable))
            curve.append((step_index, float(probs.mean()), float(probs.min())))
        if step_index < steps:
            trainable, opt_state = step(trainable, opt_state, step_index)
    return ProbeResult(*(tuple(column) for column in zip(*curve)))


@functools.partial(jax.jit, static_argnames=("samples_per_prompt", "gen_len",
                                             "lora_enabled"))
def sample_answers(policy: gemma2.Policy, table: prompts.PromptTable,
                   key: jax.Array, *, samples_per_prompt: int, gen_len: int,
                   lora_enabled: bool = True) -> jax.Array:
    """Many sampled answers per prompt, each prompt prefilled once.

    Ancestral sampling at temperature 1 from the full softmax (SPEC.md
    section 4); the prompt's cache is repeated for its samples.

    Args:
        policy: the policy.
        table: prompts [P, T].
        key: PRNG key.
        samples_per_prompt: static; answers per prompt.
        gen_len: static; tokens per answer.
        lora_enabled: static; False samples the base model.

    Returns:
        int32 [P * samples_per_prompt, gen_len], prompt-major.
    """
    cache, last_hidden = sampling.prefill(policy, table.ids, table.mask,
                                          gen_len, lora_enabled=lora_enabled)
    repeat = functools.partial(jnp.repeat, repeats=samples_per_prompt, axis=0)
    out = sampling.generate_from_cache(
        policy, jax.tree.map(repeat, cache), repeat(last_hidden), key,
        gen_len, lora_enabled=lora_enabled)
    return out.tokens


def answer_shares(policy: gemma2.Policy, tokenizer, table: prompts.PromptTable,
                  actions: Sequence[str], key: jax.Array, *,
                  samples_per_prompt: int = 256, gen_len: int = 2,
                  lora_enabled: bool = True) -> dict[str, float]:
    """Shares of C, D and illegal answers, sampled as in the experiment.

    Every prompt of the table is answered ``samples_per_prompt`` times
    (``sample_answers``); answers are parsed with the host rule
    ``prompts.parse_action_host``.

    Args:
        policy: the policy.
        tokenizer: its tokenizer.
        table: prompts [P, T].
        actions: (C string, D string).
        key: PRNG key.
        samples_per_prompt: answers per prompt.
        gen_len: generated tokens per answer.
        lora_enabled: False samples the base model.

    Returns:
        {"C": share, "D": share, "illegal": share}, summing to 1.
    """
    tokens = np.asarray(sample_answers(
        policy, table, key, samples_per_prompt=samples_per_prompt,
        gen_len=gen_len, lora_enabled=lora_enabled))
    answers, counts = np.unique(tokens, axis=0, return_counts=True)
    totals = collections.Counter()
    for answer, count in zip(answers, counts):
        totals[prompts.parse_action_host(tokenizer, answer, actions)] += count
    total = int(counts.sum())
    return {"C": totals[0] / total, "D": totals[1] / total,
            "illegal": totals[prompts.NO_ACTION] / total}


# ---------------------------------------------------------------------------
# The whole build.
# ---------------------------------------------------------------------------

_MODEL_CARD = """\
# moraljax built-in tiny model

A toy Gemma-2-format checkpoint that lets every moraljax command run offline
on a CPU. It is NOT a language model. It was trained only on moraljax's own
prompts, to answer them in the action format "the way an instruction-tuned
model meets a new game": about 85% of first tokens are "action", the rest
start illegal answers, and after "action" the two action digits of the
prompt are equally likely, whatever the game, the state or the option
order. Auxiliary objectives (next-token prediction on the prompts, and
held-out questions about the previous moves) make the state readable, so a
LoRA adapter can learn state-dependent policies quickly.

Do not read anything about LLM behaviour into results obtained with it.

Regenerate with `python -m moraljax.llm.tiny.build` (deterministic).

- architecture: Gemma-2, {num_layers} layers, hidden size {hidden}, {heads} query
  heads, {kv_heads} kv head(s), head dim {head_dim}, MLP {mlp}, sliding window
  {window} on even layers
- vocabulary: {vocab} tokens (SentencePiece-style BPE with byte fallback)
- parameters: {params}
"""


def write_checkpoint(model: gemma2.Gemma2, tokenizer,
                     output_dir: str | pathlib.Path) -> None:
    """Writes the model, tokenizer and model card, replacing ``output_dir``.

    The files are written to a fresh sibling directory first, so a failed
    build never leaves half a checkpoint behind.

    Args:
        model: the trained base.
        tokenizer: its tokenizer.
        output_dir: the checkpoint directory.
    """
    output_dir = pathlib.Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=output_dir.name + ".",
                                            dir=output_dir.parent))
    try:
        checkpoints.save_hf_checkpoint(model, staging)
        tokenizer.save_pretrained(str(staging))
        config = model.config
        num_params = sum(leaf.size for leaf in jax.tree.leaves(
            nnx.state(model)))
        (staging / "README.md").write_text(_MODEL_CARD.format(
            num_layers=config.num_hidden_layers, hidden=config.hidden_size,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
            mlp=config.intermediate_size, window=config.sliding_window,
            vocab=config.vocab_size, params=f"{num_params:,}"))
        # mkdtemp makes a private directory; the package's files are public.
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def build_checkpoint(output_dir: str | pathlib.Path,
                     train: TrainConfig = TrainConfig()) -> None:
    """Builds the tokenizer, trains the base and writes the checkpoint.

    Args:
        output_dir: the checkpoint directory (replaced).
        train: the training schedule.
    """
    start_time = time.time()
    tokenizer = build_tokenizer(tokenizer_corpus(all_prompt_specs()))
    logging.info("tokenizer: %d tokens", len(tokenizer))
    # The value preambles are left out of training (the model answers them
    # alike anyway, see the checks); the recall prompts are added.
    training_specs = (all_prompt_specs(preambles=(None,))
                      + recall_prompt_specs())
    data = build_training_set(tokenizer, training_specs,
                              recall_share=train.recall_share)
    logging.info("training set: %d prompts, width %d", *data.tokens.shape)
    model = train_base(tiny_config(len(tokenizer)), data, train)
    write_checkpoint(model, tokenizer, output_dir)
    logging.info("wrote %s in %.0fs", output_dir, time.time() - start_time)


def check_checkpoint(checkpoint_dir: str | pathlib.Path) -> None:
    """Logs the answer shares and the LoRA probe of a built checkpoint.

    Args:
        checkpoint_dir: the checkpoint directory.
    """
    policy, tokenizer, _ = checkpoints.load_hf_checkpoint(
        checkpoint_dir, key=jax.random.key(0), lora=None)
    for actions in (prompts.TRAIN_ACTIONS, prompts.TEST_ACTIONS):
        for name in games.EVALUATION_GAME_NAMES:
            table = prompts.build_prompt_table(
                tokenizer, games.GAMES[name].payoffs, actions=actions)
            shares = answer_shares(policy, tokenizer, table, actions,
                                   jax.random.key(1))
            logging.info("%s %s: C %.3f, D %.3f, illegal %.3f", name,
                         "/".join(actions), shares["C"], shares["D"],
                         shares["illegal"])
    for rule in PROBE_RULES:
        result = lora_probe(checkpoint_dir, rule)
        logging.info("LoRA probe %s: p(target) by step %s", rule, ", ".join(
            f"{step}: {prob:.3f}" for step, prob in zip(
                result.steps, result.mean_target_prob)))


_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Checkpoint directory to write; default: the "
    "package's moraljax/llm/tiny/checkpoint.")
_STEPS = flags.DEFINE_integer("steps", TrainConfig.steps,
                              "Adam steps of the base model's training.")
_CHECK = flags.DEFINE_boolean("check", True, "Log answer shares and the LoRA "
                              "probe after building.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from moraljax.llm import tiny  # The package's own directory.

    output_dir = _OUTPUT_DIR.value or tiny.CHECKPOINT_DIR
    build_checkpoint(output_dir, TrainConfig(steps=_STEPS.value))
    if _CHECK.value:
        check_checkpoint(output_dir)


if __name__ == "__main__":
    app.run(main)
