"""From a batch's scores to the advantages PPO learns from (TRL 0.9.x).

The parts of TRL 0.9.x ``PPOTrainer.step`` before and after the
optimisation (steps 1, 3, 4 and 6 of the order of one step in
``rl/ppo.py``):

- ``update_running_moments`` then ``normalise_scores``: scores pass through
  a running mean/std over every score seen so far, updated with the batch
  FIRST and then used;
- ``kl_shaped_rewards``: -beta * (logp - ref_logp) per answer token plus
  the normalised score on the last token, with the beta from BEFORE this
  step's controller update;
- ``gae`` (gamma 1, lambda 0.95, bootstrap 0), returns = advantages +
  values, then ``whiten`` the advantages over the whole batch once;
- after the update, ``update_kl_controller`` with the mean per-sequence KL
  of the OLD logprobs (``kl_estimates``) and n = batch size.

Every function is pure and traces under ``jax.jit``.

Axis legend (docs/ARCHITECTURE.md): B decisions in the batch (one prompt +
answer each), A answer tokens per decision.

Every answer has the same length A (SPEC.md section 4: exactly ``gen_len``
tokens, not stopped at EOS), so no token mask is needed: every position of
the [B, A] arrays is an answer token, and TRL's masked means are plain
means here.
"""

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from moraljax.rl import ppo_settings

# TRL scales scores by (std + eps) with eps the machine epsilon of the score
# dtype (torch.finfo(float32).eps), and whitens with var + 1e-8.
SCORE_EPS = float(np.finfo(np.float32).eps)
WHITEN_EPS = 1e-8


# --------------------------------------------------------------------------
# Running score moments.


@flax.struct.dataclass
class RunningMoments:
    """Running mean and variance of every score seen so far (TRL).

    Attributes:
        mean: float32 scalar, running mean.
        var: float32 scalar, running population variance (ddof 0).
        std: float32 scalar, running unbiased std, sqrt(var * n / (n - 1)).
        count: float32 scalar, number of scores seen (starts at 1e-24, so
            the first update returns the first batch's statistics).
    """

    mean: jax.Array
    var: jax.Array
    std: jax.Array
    count: jax.Array


def init_running_moments() -> RunningMoments:
    """Returns mean 0, var 1, std 1, count 1e-24 (TRL's initial state)."""
    return RunningMoments(mean=jnp.float32(0.0), var=jnp.float32(1.0),
                          std=jnp.float32(1.0), count=jnp.float32(1e-24))


def update_running_moments(
        moments: RunningMoments, scores: jax.Array
) -> tuple[RunningMoments, jax.Array, jax.Array]:
    """Merges a batch of scores into the running moments (Chan et al.).

    With batch mean m_b and population variance v_b over the B scores:
        delta = m_b - mean;  n = count + B
        mean' = mean + delta * B / n
        var'  = (var * count + delta^2 * count * B / n + v_b * B) / n
        std'  = sqrt(var' * n / (n - 1));  count' = n

    Args:
        moments: the running moments before this batch.
        scores: float [B], B >= 2.

    Returns:
        (moments', batch mean, batch unbiased std (ddof 1)), float32.

    Raises:
        ValueError: if scores is not one-dimensional with at least 2 entries
            (the unbiased batch std needs two).
    """
    chex.assert_rank(scores, 1)
    count_new = scores.shape[0]
    if count_new < 2:
        raise ValueError(
            f"scores must hold at least 2 values, got shape {scores.shape}; "
            "allowed: [B] with B >= 2")
    scores = scores.astype(jnp.float32)
    batch_mean = jnp.mean(scores)
    batch_var = jnp.var(scores)  # ddof 0
    delta = batch_mean - moments.mean
    total = moments.count + count_new
    old_sum = moments.var * moments.count + (
        delta ** 2 * moments.count * count_new / total)
    new_sum = batch_var * count_new
    var = (old_sum + new_sum) / total
    updated = RunningMoments(
        mean=moments.mean + delta * count_new / total,
        var=var,
        std=jnp.sqrt(var * total / (total - 1)),
        count=total)
    batch_std = jnp.sqrt(batch_var * count_new / (count_new - 1))
    return updated, batch_mean, batch_std


def normalise_scores(moments: RunningMoments, scores: jax.Array, *,
                     use_norm: bool = True,
                     clip: float | None = None) -> jax.Array:
    """Scales scores by the running moments (already updated with them).

        use_norm:      s' = (s - mean) / (std + eps)
        not use_norm:  s' = s / (std + eps)
        clip:          s' = clip(s', -clip, clip)   (None: no clipping)

    eps = float32 machine epsilon, as TRL.

    Args:
        moments: running moments AFTER ``update_running_moments`` with this
            batch (TRL updates first, then normalises).
        scores: float [B].
        use_norm: subtract the running mean.
        clip: optional symmetric clip of the result; the paper uses None.

    Returns:
        float32 [B].
    """
    chex.assert_rank(scores, 1)
    scores = scores.astype(jnp.float32)
    scale = moments.std + SCORE_EPS
    normalised = (scores - moments.mean) / scale if use_norm else (
        scores / scale)
    if clip is not None:
        normalised = jnp.clip(normalised, -clip, clip)
    return normalised


# --------------------------------------------------------------------------
# KL controller.


@flax.struct.dataclass
class KLController:
    """KL coefficient beta and the rule that moves it (Ziegler et al. 2019).

    Attributes:
        beta: float32 scalar, the current KL coefficient.
        target: float32 scalar, target per-sequence KL (adaptive only).
        horizon: float32 scalar, adaptation horizon (adaptive only).
        adaptive: bool scalar array; False keeps beta fixed.
    """

    beta: jax.Array
    target: jax.Array
    horizon: jax.Array
    adaptive: jax.Array


def init_kl_controller(cfg: ppo_settings.PPOConfig) -> KLController:
    """The controller of ``cfg`` (init_kl_coef, kl_target, kl_horizon)."""
    return KLController(beta=jnp.float32(cfg.init_kl_coef),
                        target=jnp.float32(cfg.kl_target),
                        horizon=jnp.float32(cfg.kl_horizon),
                        adaptive=jnp.asarray(cfg.adaptive_kl))


def update_kl_controller(controller: KLController, mean_kl: jax.Array,
                         n_steps: int | jax.Array) -> KLController:
    """One controller update after the optimisation step.

    Adaptive:
        err   = clip(mean_kl / target - 1, -0.2, 0.2)
        beta' = beta * (1 + err * n_steps / horizon)
    Fixed: beta' = beta.

    Args:
        controller: the controller whose beta shaped this step's rewards.
        mean_kl: scalar, mean over the batch of the per-sequence sum of
            (old_logprob - ref_logprob).
        n_steps: the number of decisions in the update (batch size).

    Returns:
        The updated controller.
    """
    chex.assert_rank(mean_kl, 0)
    error = jnp.clip(mean_kl / controller.target - 1.0, -0.2, 0.2)
    adapted = controller.beta * (1.0 + error * n_steps / controller.horizon)
    return controller.replace(
        beta=jnp.where(controller.adaptive, adapted,
                       controller.beta).astype(jnp.float32))


# --------------------------------------------------------------------------
# Rewards, advantages and KL diagnostics.


def kl_shaped_rewards(scores: jax.Array, logprobs: jax.Array,
                      ref_logprobs: jax.Array, beta: jax.Array) -> jax.Array:
    """Per-token rewards: KL penalty on every token, score on the last.

        r[i, t] = -beta * (logprobs[i, t] - ref_logprobs[i, t])
                  + scores[i] * [t == A - 1]

    Args:
        scores: float [B], the normalised scores.
        logprobs: float [B, A], old (behaviour) logprobs of the answer.
        ref_logprobs: float [B, A], reference-model logprobs.
        beta: scalar KL coefficient (from before this step's update).

    Returns:
        float32 [B, A].
    """
    chex.assert_rank([scores, logprobs], [1, 2])
    chex.assert_equal_shape([logprobs, ref_logprobs])
    chex.assert_equal_shape_prefix([scores, logprobs], 1)
    kl_penalty = -beta * (logprobs.astype(jnp.float32)
                          - ref_logprobs.astype(jnp.float32))
    return kl_penalty.at[:, -1].add(scores.astype(jnp.float32))


def gae(rewards: jax.Array, values: jax.Array, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the answer tokens.

        delta_t = r_t + gamma * V_{t+1} - V_t,   V_A = 0 (bootstrap 0)
        adv_t   = delta_t + gamma * lam * adv_{t+1},   adv_A = 0
        returns = adv + V   (before any whitening)
    for the answer tokens t = 0 .. A - 1.

    Args:
        rewards: float [B, A], per-token rewards.
        values: float [B, A], old value predictions.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        (advantages, returns), float32 [B, A], gradients stopped.
    """
    chex.assert_rank(rewards, 2)
    chex.assert_equal_shape([rewards, values])
    rewards = jax.lax.stop_gradient(rewards.astype(jnp.float32))
    values = jax.lax.stop_gradient(values.astype(jnp.float32))
    next_values = jnp.concatenate(
        [values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def backward(advantage_next, delta):
        advantage = delta + gamma * lam * advantage_next
        return advantage, advantage

    # Scan over tokens from the last to the first; time on the leading axis.
    _, advantages_t = jax.lax.scan(
        backward, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    advantages = advantages_t.T
    return advantages, advantages + values


def whiten(x: jax.Array, *, shift_mean: bool = True) -> jax.Array:
    """Whitens over ALL elements: (x - mean) / sqrt(var + 1e-8).

    var is unbiased, mean((x - mean)^2) * n / (n - 1), as TRL's
    ``masked_whiten``. With shift_mean=False the mean is added back.

    Args:
        x: float array of any shape with at least 2 elements.
        shift_mean: whether the result is centred.

    Returns:
        float32 array shaped like x, gradients stopped.

    Raises:
        ValueError: if x has fewer than 2 elements.
    """
    if x.size < 2:
        raise ValueError(
            f"whiten needs at least 2 elements, got shape {x.shape}; "
            "allowed: arrays with size >= 2")
    x = jax.lax.stop_gradient(x.astype(jnp.float32))
    mean = jnp.mean(x)
    var = jnp.mean((x - mean) ** 2) * x.size / (x.size - 1)
    whitened = (x - mean) * jax.lax.rsqrt(var + WHITEN_EPS)
    return whitened if shift_mean else whitened + mean


@flax.struct.dataclass
class KLEstimates:
    """Estimates of KL(policy || reference) from sampled tokens.

    Attributes:
        k1: scalar, mean over tokens of (logp - ref_logp).
        k1_per_sequence: [B], sum over tokens of (logp - ref_logp); its batch
            mean is the KL the controller and TRL's objective/kl use.
        k3: scalar, mean over tokens of exp(ref - logp) - 1 - (ref - logp),
            the non-negative low-variance estimator (Schulman 2020).
    """

    k1: jax.Array
    k1_per_sequence: jax.Array
    k3: jax.Array


def kl_estimates(logprobs: jax.Array,
                 ref_logprobs: jax.Array) -> KLEstimates:
    """KL diagnostics of the sampled answer tokens.

        k1 = mean(logp - ref),  k1_per_sequence = sum_t (logp - ref)
        k3 = mean(exp(ref - logp) - 1 - (ref - logp))

    Args:
        logprobs: float [B, A], policy logprobs of the sampled tokens.
        ref_logprobs: float [B, A], reference logprobs of the same tokens.

    Returns:
        The estimates, float32.
    """
    chex.assert_rank(logprobs, 2)
    chex.assert_equal_shape([logprobs, ref_logprobs])
    log_ratio = (logprobs.astype(jnp.float32)
                 - ref_logprobs.astype(jnp.float32))
    return KLEstimates(
        k1=jnp.mean(log_ratio),
        k1_per_sequence=jnp.sum(log_ratio, axis=-1),
        k3=jnp.mean(jnp.expm1(-log_ratio) + log_ratio))
