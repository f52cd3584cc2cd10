"""Checks of a built tiny model: sampled answer shares and a LoRA learnability probe.

See ``build.py`` (step 5).
"""

import collections
import dataclasses
import functools
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moraljax import games
from moraljax import action_matcher
from moraljax import prompt_tables
from moraljax import prompts
from moraljax.llm import checkpoints
from moraljax.llm import lora as lora_lib
from moraljax.llm import policy as policy_lib
from moraljax.llm import sampling
from moraljax.tiny_build import corpus
from moraljax.tiny_build import training

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


def answer_probabilities(policy: policy_lib.Policy, table: prompt_tables.PromptTable,
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
    graphdef, trainable, frozen = policy_lib.split_policy(policy)
    table = prompt_tables.build_prompt_table(tokenizer,
                                       games.GAMES["IPD"].payoffs)
    digits = training.action_digit_ids(tokenizer, prompts.TRAIN_ACTIONS)
    prefix_id = training.single_token(tokenizer, training.ANSWER_PREFIX)
    targets = jnp.asarray(
        [(prefix_id, digits[PROBE_RULES[rule](prev_m, prev_o)])
         for prev_m, prev_o, _, _ in corpus.INDEX_BITS], jnp.int32)
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(trainable)

    def target_log_probs(trainable, rows):
        policy = policy_lib.merge_policy(graphdef, trainable, frozen)
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
def sample_answers(policy: policy_lib.Policy, table: prompt_tables.PromptTable,
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


def answer_shares(policy: policy_lib.Policy, tokenizer, table: prompt_tables.PromptTable,
                  actions: Sequence[str], key: jax.Array, *,
                  samples_per_prompt: int = 256, gen_len: int = 2,
                  lora_enabled: bool = True) -> dict[str, float]:
    """Shares of C, D and illegal answers, sampled as in the experiment.

    Every prompt of the table is answered ``samples_per_prompt`` times
    (``sample_answers``); answers are parsed with the host rule
    ``action_matcher.parse_action_host``.

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
        totals[action_matcher.parse_action_host(tokenizer, answer, actions)] += count
    total = int(counts.sum())
    return {"C": totals[0] / total, "D": totals[1] / total,
            "illegal": totals[action_matcher.NO_ACTION] / total}


