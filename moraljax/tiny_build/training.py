"""The tiny model's architecture, training targets and training loop.

See ``build.py`` (steps 2 and 3) for what the targets are and why.
"""

import dataclasses
import functools
import time
from collections.abc import Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from moraljax import prompt_tables
from moraljax.llm import decoder
from moraljax.llm import decoder_config
from moraljax.llm import policy as policy_lib
from moraljax.llm import sampling
from moraljax.tiny_build import corpus
from moraljax.tiny_build import tokenizer as tokenizer_lib

# ---------------------------------------------------------------------------
# Model config.
# ---------------------------------------------------------------------------


def tiny_config(vocab_size: int) -> decoder.DecoderConfig:
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
    return decoder.DecoderConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        layer_types=(decoder_config.SLIDING, decoder_config.FULL),
        sliding_window=24,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=32,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        max_position_embeddings=8192,
        pad_token_id=tokenizer_lib.SPECIAL_TOKENS.index(tokenizer_lib.PAD),
        bos_token_id=tokenizer_lib.SPECIAL_TOKENS.index(tokenizer_lib.BOS),
        eos_token_id=tokenizer_lib.SPECIAL_TOKENS.index(tokenizer_lib.EOS),
    )


# ---------------------------------------------------------------------------
# Training targets.
# ---------------------------------------------------------------------------

# p(first generated token | prompt): mostly "action", else the start of an
# answer that cannot become legal within two tokens.
FIRST_TOKEN_TARGET = (("action", 0.85), ("I", 0.04), ("choose", 0.04),
                      ("**", 0.03), ("\n", 0.02), (tokenizer_lib.END_OF_TURN, 0.02))
# Teacher-forced answer after the prompt; the digit is C's or D's.
ANSWER_PREFIX = "action"
# Positions with a target: the last prompt token and the four answer tokens.
NUM_TARGETS = 5
# The most target tokens at one position.
MAX_TARGET_TOKENS = len(FIRST_TOKEN_TARGET)


def single_token(tokenizer, text: str) -> int:
    """Id of a text that must be exactly one token."""
    special = tokenizer.convert_tokens_to_ids(text)
    if text in tokenizer_lib.SPECIAL_TOKENS:
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


def build_training_set(tokenizer, specs: Sequence[corpus.PromptSpec], *,
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
    first_ids = [single_token(tokenizer, text) for text, _ in
                 FIRST_TOKEN_TARGET]
    first_probs = [prob for _, prob in FIRST_TOKEN_TARGET]
    prefix_id = single_token(tokenizer, ANSWER_PREFIX)
    end_of_turn = single_token(tokenizer, tokenizer_lib.END_OF_TURN)
    eos = single_token(tokenizer, tokenizer_lib.EOS)
    table = prompt_tables.tokenize_prompts(tokenizer, [spec.text for spec in specs])
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


def target_loss(model: decoder.Decoder, tokens: jax.Array, mask: jax.Array,
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
    hidden, _ = model(tokens, decoder.positions_from_mask(mask), mask)
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


def train_base(config: decoder.DecoderConfig, data: TrainingSet,
               train: TrainConfig = TrainConfig()) -> decoder.Decoder:
    """Trains every parameter of a fresh base model on the targets.

    Minimises answer + lm_weight * language_model (``target_loss``) with
    Adam. Deterministic: the initial weights come from the seed's key
    (``policy_lib.random_base_state``) and batch ``s`` from
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
    graphdef, zeros = nnx.split(decoder.Decoder(config, lora=None))
    params = policy_lib.random_base_state(zeros, key_init)
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


