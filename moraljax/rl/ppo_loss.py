"""The PPO objective for LLM agents: TRL 0.9.x's clipped losses.

``ppo_losses`` is the clipped policy loss plus the clipped value loss of TRL
0.9.x ``PPOTrainer.loss``; ``make_loss_fn`` wraps a model forward pass into
the ``loss_fn`` that ``rl/ppo.py``'s update differentiates, reading the
targets ``ppo_step`` adds to the batch (the reserved keys below).

Axis legend (docs/ARCHITECTURE.md): b decisions in a minibatch (B /
num_minibatches of the B decisions in the batch), A answer tokens per
decision. Every answer has exactly A tokens, so TRL's masked means over
answer tokens are plain means here.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from moraljax.rl import ppo_settings

PyTree = Any
# loss_fn(params, minibatch, dropout_key) -> (scalar loss, {name: scalar});
# dropout_key None means no dropout (``PPOConfig.dropout_in_update`` False).
LossFn = Callable[[PyTree, PyTree, jax.Array | None],
                  tuple[jax.Array, Mapping[str, jax.Array]]]
# forward_fn(params, minibatch, dropout_key or None)
#   -> (logprobs [b, A], values [b, A], {name: scalar} extra stats).
ForwardFn = Callable[[PyTree, PyTree, jax.Array | None],
                     tuple[jax.Array, jax.Array, Mapping[str, jax.Array]]]

# Keys ``ppo_step`` adds to the caller's batch before ``ppo_update``; the
# caller's ``loss_fn`` reads them (``make_loss_fn`` does).
OLD_LOGPROBS = "old_logprobs"
OLD_VALUES = "old_values"
ADVANTAGES = "advantages"
RETURNS = "returns"
RESERVED_BATCH_KEYS = (OLD_LOGPROBS, OLD_VALUES, ADVANTAGES, RETURNS)


# --------------------------------------------------------------------------
# Losses.


class _ClippedTerms(NamedTuple):
    """A clipped loss and the per-token terms it took the maximum of."""

    loss: jax.Array
    unclipped: jax.Array
    clipped: jax.Array


def _clipped_policy_loss(advantages: jax.Array, ratio: jax.Array,
                         cliprange: float) -> _ClippedTerms:
    """mean(max(-adv * ratio, -adv * clip(ratio, 1 - c, 1 + c)))."""
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * jnp.clip(ratio, 1.0 - cliprange,
                                        1.0 + cliprange)
    policy_loss = jnp.mean(jnp.maximum(pg_unclipped, pg_clipped))
    return _ClippedTerms(policy_loss, pg_unclipped, pg_clipped)


def _clipped_value_loss(values_pred: jax.Array, old_values: jax.Array,
                        returns: jax.Array,
                        cliprange_value: float) -> _ClippedTerms:
    """0.5 * mean(max((V - R)^2, (clip(V, V_old -+ cv) - R)^2))."""
    values_clipped = jnp.clip(values_pred, old_values - cliprange_value,
                              old_values + cliprange_value)
    vf_unclipped = (values_pred - returns) ** 2
    vf_clipped = (values_clipped - returns) ** 2
    value_loss = 0.5 * jnp.mean(jnp.maximum(vf_unclipped, vf_clipped))
    return _ClippedTerms(value_loss, vf_unclipped, vf_clipped)


def _loss_stats(policy_loss: jax.Array, value_loss: jax.Array,
                loss: jax.Array, log_ratio: jax.Array, policy: _ClippedTerms,
                value: _ClippedTerms, ratio_mean: jax.Array,
                threshold_hit: jax.Array) -> dict[str, jax.Array]:
    """The scalar stats ``ppo_losses`` reports (listed in its docstring)."""
    stop = jax.lax.stop_gradient
    return {
        "policy_loss": stop(policy_loss),
        "value_loss": stop(value_loss),
        "total_loss": stop(loss),
        "approx_kl": stop(0.5 * jnp.mean(log_ratio ** 2)),
        "policy_kl": stop(jnp.mean(-log_ratio)),
        "clipfrac": jnp.mean(
            (policy.clipped > policy.unclipped).astype(jnp.float32)),
        "value_clipfrac": jnp.mean(
            (value.clipped > value.unclipped).astype(jnp.float32)),
        "value_error": stop(jnp.mean(value.unclipped)),
        "ratio_mean": stop(ratio_mean),
        "ratio_threshold_hit": threshold_hit.astype(jnp.float32),
    }


def ppo_losses(logprobs: jax.Array, values_pred: jax.Array,
               old_logprobs: jax.Array, old_values: jax.Array,
               advantages: jax.Array, returns: jax.Array, *,
               cliprange: float = 0.2, cliprange_value: float = 0.2,
               vf_coef: float = 0.1, ratio_threshold: float = 10.0
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped PPO policy loss plus clipped value loss (TRL 0.9.x).

        ratio = exp(logp - old_logp)
        pg    = mean(max(-adv * ratio, -adv * clip(ratio, 1 - c, 1 + c)))
        Vclip = clip(V, V_old - cv, V_old + cv)
        vf    = 0.5 * mean(max((V - R)^2, (Vclip - R)^2))
        loss  = pg + vf_coef * vf
    and pg, vf and loss are all 0 when mean(ratio) > ratio_threshold.
    Means run over every token of the minibatch.

    Args:
        logprobs: float [b, A], current policy logprobs (differentiated).
        values_pred: float [b, A], current value predictions
            (differentiated).
        old_logprobs: float [b, A], behaviour logprobs.
        old_values: float [b, A], behaviour values.
        advantages: float [b, A], whitened advantages (adv).
        returns: float [b, A], value targets (R).
        cliprange: c.
        cliprange_value: cv.
        vf_coef: value loss weight.
        ratio_threshold: mean ratio above which the loss is zeroed.

    Returns:
        (loss, stats) with float32 scalar stats: policy_loss, value_loss,
        total_loss, approx_kl = 0.5 mean((logp - old)^2), policy_kl =
        mean(old - logp), clipfrac (fraction where the clipped policy term
        binds), value_clipfrac, value_error = mean((V - R)^2), ratio_mean,
        ratio_threshold_hit (0 or 1).
    """
    chex.assert_rank(logprobs, 2)
    chex.assert_equal_shape([logprobs, values_pred, old_logprobs, old_values,
                             advantages, returns])
    # float32 so that exp() of a bf16 log-ratio stays accurate near 1.
    as_f32 = lambda x: x.astype(jnp.float32)
    logprobs, values_pred = as_f32(logprobs), as_f32(values_pred)
    old_logprobs, old_values = as_f32(old_logprobs), as_f32(old_values)
    advantages, returns = as_f32(advantages), as_f32(returns)

    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    policy = _clipped_policy_loss(advantages, ratio, cliprange)
    value = _clipped_value_loss(values_pred, old_values, returns,
                                cliprange_value)

    ratio_mean = jnp.mean(ratio)
    # TRL multiplies by 0.0; `where` also keeps the gradient exactly zero.
    threshold_hit = ratio_mean > ratio_threshold
    zero_if_hit = lambda x: jnp.where(threshold_hit, 0.0, x)
    policy_loss = zero_if_hit(policy.loss)
    value_loss = zero_if_hit(value.loss)
    loss = zero_if_hit(policy_loss + vf_coef * value_loss)
    return loss, _loss_stats(policy_loss, value_loss, loss, log_ratio,
                             policy, value, ratio_mean, threshold_hit)


def make_loss_fn(forward_fn: ForwardFn,
                 cfg: ppo_settings.PPOConfig) -> LossFn:
    """Wraps a model forward pass into the ``loss_fn`` of ``ppo_update``.

    Args:
        forward_fn: (params, minibatch, dropout_key) -> (logprobs [b, A],
            values [b, A], extra scalar stats such as entropy). It reads its
            own inputs (tokens, ...) from the minibatch, and applies no
            dropout when dropout_key is None.
        cfg: cliprange, cliprange_value, vf_coef, ratio_threshold.

    Returns:
        loss_fn(params, minibatch, dropout_key) -> (loss, stats) that reads
        old_logprobs, old_values, advantages and returns from the minibatch
        (the keys ``ppo_step`` adds) and merges the forward's extra stats.
    """

    def loss_fn(params, minibatch, dropout_key):
        logprobs, values, extra_stats = forward_fn(params, minibatch,
                                                   dropout_key)
        loss, stats = ppo_losses(
            logprobs, values, minibatch[OLD_LOGPROBS], minibatch[OLD_VALUES],
            minibatch[ADVANTAGES], minibatch[RETURNS],
            cliprange=cfg.cliprange, cliprange_value=cfg.cliprange_value,
            vf_coef=cfg.vf_coef, ratio_threshold=cfg.ratio_threshold)
        return loss, {**stats, **jax.lax.stop_gradient(dict(extra_stats))}

    return loss_fn
