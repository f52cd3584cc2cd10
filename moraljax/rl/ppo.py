"""PPO for LLM agents as small pure JAX functions (TRL 0.9.x semantics).

Reproduces what TRL 0.9.x ``PPOTrainer.step`` does with the authors'
settings (SPEC.md section 6), in the order of one step:

1. ``update_running_moments`` then ``normalise_scores``: scores pass through
   a running mean/std over every score seen so far, updated with the batch
   FIRST and then used;
2. (caller) old logprobs, values and reference logprobs without dropout;
3. ``kl_shaped_rewards``: -beta * (logp - ref_logp) per response token plus
   the normalised score on the last token, with the beta from BEFORE this
   step's controller update;
4. ``gae`` (gamma 1, lambda 0.95, bootstrap 0), returns = advantages +
   values, then ``whiten`` the advantages over the whole batch once;
5. ``ppo_update``: epochs x minibatches of ``ppo_losses`` with gradient
   accumulation and Adam (``make_optimizer``);
6. ``update_kl_controller`` with the mean per-sequence KL of the OLD
   logprobs and n = batch size.

``ppo_step`` chains all of it; every function traces under ``jax.jit``.

Dropout (LoRA dropout 0.05 and value-head dropout 0.1 in the paper) acts
where it acted in the authors' TRL 0.9.6 runs, and nowhere else. Lines of
trl/trainer/ppo_trainer.py (0.9.6; 0.11.4 is the same):

- Sampling sees LoRA dropout. ``AutoModelForCausalLMWithValueHead
  .from_pretrained(..., peft_config=...)`` returns the model in train mode
  (trl/models/modeling_base.py wraps it with ``get_peft_model``; checked
  with TRL 0.11.4 and peft 0.21.2: every LoRA dropout module reports
  training=True), and neither ``PPOTrainer.generate`` nor ``step`` switches
  it to eval before the next episode's generation. Generation never runs
  the value head (modeling_value_head.py, ``generate`` delegates to the
  wrapped model), so value-head dropout plays no part there.
- Old log-probs, values and reference log-probs come from
  ``batched_forward_pass``, which calls ``model.eval()`` first (line 1005):
  no dropout. They are NOT the sampling distribution's log-probs.
- The update's own forward is ``batched_forward_pass`` too (line 817, in
  eval mode); ``train_minibatch`` calls ``self.model.train()`` (line 1088)
  only after that forward, just before ``accelerator.backward`` (line 1093).
  So no gradient of the authors' runs saw dropout, and with 4 epochs of one
  minibatch accumulated into one step, the 4 passes are the same gradient
  at the same parameters: ``ppo_update`` computes it once.

``PPOConfig.dropout_in_update`` (default False, as above) is the switch for
users who want dropout in the gradient: each backward pass then gets its own
dropout key. It means the same in both modes; "standard" differs from
"paper" only in how passes are grouped into optimiser steps. Callers
(``rollout.py``, ``train.py``) do the sampling side: dropout on the LoRA
input while sampling, then a dropout-free forward of the sampled tokens for
the old log-probs and values (skipped when LoRA dropout is 0, where the
sampling log-probs already are the dropout-free ones).

Axis legend: B decisions in the batch (one prompt + response each), L
response tokens per decision, b decisions in a minibatch, P backward passes
per update (epochs x minibatches), S optimiser steps per update, K backward
passes per optimiser step (gradient accumulation), N scores in a batch.

Every response has the same length L (SPEC.md section 4: exactly
``gen_len`` tokens, not stopped at EOS), so no token mask is needed: every
position of the [B, L] arrays is a response token, and TRL's masked means
are plain means here.
"""

from collections.abc import Callable, Mapping
import dataclasses
import math
from typing import Any, NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
# loss_fn(params, minibatch, dropout_key) -> (scalar loss, {name: scalar});
# dropout_key None means no dropout (``PPOConfig.dropout_in_update`` False).
LossFn = Callable[[PyTree, PyTree, jax.Array | None],
                  tuple[jax.Array, Mapping[str, jax.Array]]]
# forward_fn(params, minibatch, dropout_key or None)
#   -> (logprobs [b, L], values [b, L], {name: scalar} extra stats).
ForwardFn = Callable[[PyTree, PyTree, jax.Array | None],
                     tuple[jax.Array, jax.Array, Mapping[str, jax.Array]]]

# Keys ``ppo_step`` adds to the caller's batch before ``ppo_update``; the
# caller's ``loss_fn`` reads them (``make_loss_fn`` does).
OLD_LOGPROBS = "old_logprobs"
OLD_VALUES = "old_values"
ADVANTAGES = "advantages"
RETURNS = "returns"
RESERVED_BATCH_KEYS = (OLD_LOGPROBS, OLD_VALUES, ADVANTAGES, RETURNS)

# TRL scales scores by (std + eps) with eps the machine epsilon of the score
# dtype (torch.finfo(float32).eps), and whitens with var + 1e-8.
SCORE_EPS = float(np.finfo(np.float32).eps)
WHITEN_EPS = 1e-8

MODES = ("paper", "standard")


# --------------------------------------------------------------------------
# Configuration.


def _check_number(name, value, *, low=None, high=None, low_open=False,
                  high_open=False, integer=False, allow_none=False):
    """Raises ValueError unless ``value`` is a number in the given range."""
    if value is None and allow_none:
        return
    kind = "an int" if integer else "a number"
    types_ok = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, types_ok) or (
            not integer and not math.isfinite(value)):
        raise ValueError(
            f"PPOConfig.{name} must be {kind}"
            f"{' or None' if allow_none else ''}, got {value!r}")
    low_ok = low is None or (value > low if low_open else value >= low)
    high_ok = high is None or (value < high if high_open else value <= high)
    if not (low_ok and high_ok):
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        low_text = "-inf" if low is None else low
        high_text = "inf" if high is None else high
        raise ValueError(
            f"PPOConfig.{name} = {value!r} is out of range; allowed: "
            f"{kind} in {left}{low_text}, {high_text}{right}"
            f"{' or None' if allow_none else ''}")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(
            f"PPOConfig.{name} must be a bool (True or False), got {value!r}")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters; defaults are the paper's (SPEC.md section 6).

    Attributes:
        learning_rate: Adam step size (TRL default 1.41e-5).
        adam_b1, adam_b2, adam_eps: Adam moments and epsilon (torch
            defaults 0.9, 0.999, 1e-8).
        gamma: GAE discount over response tokens.
        lam: GAE lambda.
        cliprange: policy ratio clip c, ratio kept in [1 - c, 1 + c].
        cliprange_value: value clip around the old values.
        vf_coef: weight of the value loss in the total loss.
        ppo_epochs: passes over the batch per update.
        num_minibatches: minibatches per epoch; the minibatch size is
            batch size / num_minibatches.
        gradient_accumulation_steps: backward passes whose gradients are
            averaged into one optimiser step.
        init_kl_coef: initial KL coefficient beta.
        adaptive_kl: adaptive (True) or fixed (False) KL controller.
        kl_target: target KL of the adaptive controller (per sequence).
        kl_horizon: horizon of the adaptive controller.
        use_score_scaling: divide scores by the running std.
        use_score_norm: also subtract the running mean (only with
            use_score_scaling, as in TRL).
        score_clip: clip normalised scores to [-score_clip, score_clip];
            None (paper) applies no clipping.
        ratio_threshold: a minibatch whose mean ratio exceeds this has its
            loss set to zero (TRL's guard against unstable steps).
        max_grad_norm: global-norm gradient clipping; None (paper) = none.
        dropout_in_update: False (paper, TRL 0.9.x): the update's forward
            passes run without dropout, as TRL's ``batched_forward_pass``
            in eval mode (module docstring). True: each backward pass gets
            its own dropout key, so the model's LoRA and value-head dropout
            act in the gradient (and in paper mode the P passes differ).
        mode: "paper": the authors' effective update, ONE Adam step per call
            on the average of all ppo_epochs x num_minibatches gradients,
            all taken at the same parameters, so it requires
            ppo_epochs * num_minibatches == gradient_accumulation_steps.
            "standard": real PPO epochs, an Adam step every
            gradient_accumulation_steps backward passes, which must divide
            ppo_epochs * num_minibatches (no remainder is carried between
            calls, so a pure function matches torch/accelerate exactly).
    """

    learning_rate: float = 1.41e-5
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 4
    num_minibatches: int = 1
    gradient_accumulation_steps: int = 4
    init_kl_coef: float = 0.2
    adaptive_kl: bool = True
    kl_target: float = 6.0
    kl_horizon: float = 10000
    use_score_scaling: bool = True
    use_score_norm: bool = True
    score_clip: float | None = None
    ratio_threshold: float = 10.0
    max_grad_norm: float | None = None
    dropout_in_update: bool = False
    mode: str = "paper"

    def __post_init__(self):
        _check_number("learning_rate", self.learning_rate, low=0,
                      low_open=True)
        _check_number("adam_b1", self.adam_b1, low=0, high=1, high_open=True)
        _check_number("adam_b2", self.adam_b2, low=0, high=1, high_open=True)
        _check_number("adam_eps", self.adam_eps, low=0, low_open=True)
        _check_number("gamma", self.gamma, low=0, high=1)
        _check_number("lam", self.lam, low=0, high=1)
        _check_number("cliprange", self.cliprange, low=0, low_open=True)
        _check_number("cliprange_value", self.cliprange_value, low=0,
                      low_open=True)
        _check_number("vf_coef", self.vf_coef, low=0)
        _check_number("ppo_epochs", self.ppo_epochs, low=1, integer=True)
        _check_number("num_minibatches", self.num_minibatches, low=1,
                      integer=True)
        _check_number("gradient_accumulation_steps",
                      self.gradient_accumulation_steps, low=1, integer=True)
        _check_number("init_kl_coef", self.init_kl_coef, low=0)
        _check_bool("adaptive_kl", self.adaptive_kl)
        _check_number("kl_target", self.kl_target, low=0, low_open=True)
        _check_number("kl_horizon", self.kl_horizon, low=0, low_open=True)
        _check_bool("use_score_scaling", self.use_score_scaling)
        _check_bool("use_score_norm", self.use_score_norm)
        _check_number("score_clip", self.score_clip, low=0, low_open=True,
                      allow_none=True)
        _check_number("ratio_threshold", self.ratio_threshold, low=0,
                      low_open=True)
        _check_number("max_grad_norm", self.max_grad_norm, low=0,
                      low_open=True, allow_none=True)
        _check_bool("dropout_in_update", self.dropout_in_update)
        if self.mode not in MODES:
            raise ValueError(
                f"PPOConfig.mode = {self.mode!r} is not a known mode; "
                f"allowed: {', '.join(repr(m) for m in MODES)}")
        passes = self.backward_passes
        accumulation = self.gradient_accumulation_steps
        if self.mode == "paper" and passes != accumulation:
            raise ValueError(
                "PPOConfig.gradient_accumulation_steps = "
                f"{accumulation} must equal ppo_epochs * num_minibatches = "
                f"{self.ppo_epochs} * {self.num_minibatches} = {passes} in "
                "mode 'paper' (one optimiser step per update); allowed: "
                f"gradient_accumulation_steps = {passes}, or mode 'standard'")
        if self.mode == "standard" and passes % accumulation:
            raise ValueError(
                "PPOConfig.gradient_accumulation_steps = "
                f"{accumulation} must divide ppo_epochs * num_minibatches = "
                f"{self.ppo_epochs} * {self.num_minibatches} = {passes} in "
                "mode 'standard'; allowed: a divisor of "
                f"{passes}")

    @property
    def backward_passes(self) -> int:
        """P = ppo_epochs * num_minibatches backward passes per update."""
        return self.ppo_epochs * self.num_minibatches

    @property
    def optimizer_steps(self) -> int:
        """S = P / gradient_accumulation_steps optimiser steps per update."""
        return self.backward_passes // self.gradient_accumulation_steps

    def mini_batch_size(self, batch_size: int) -> int:
        """b = batch_size / num_minibatches.

        Raises:
            ValueError: if num_minibatches does not divide batch_size.
        """
        if batch_size % self.num_minibatches:
            raise ValueError(
                f"batch size {batch_size} is not divisible by "
                f"PPOConfig.num_minibatches = {self.num_minibatches}; "
                f"allowed: num_minibatches dividing {batch_size}")
        return batch_size // self.num_minibatches


def make_optimizer(cfg: PPOConfig) -> optax.GradientTransformation:
    """Adam as TRL builds it: no weight decay, no schedule.

    torch.optim.Adam and optax.adam agree: eps is added to sqrt(v_hat).

    Args:
        cfg: learning_rate, adam_b1, adam_b2, adam_eps and max_grad_norm
            (global-norm clipping before Adam when not None).

    Returns:
        The optimiser.
    """
    adam = optax.adam(cfg.learning_rate, b1=cfg.adam_b1, b2=cfg.adam_b2,
                      eps=cfg.adam_eps)
    if cfg.max_grad_norm is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adam)


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

    With batch mean m_b and population variance v_b over N scores:
        delta = m_b - mean;  n = count + N
        mean' = mean + delta * N / n
        var'  = (var * count + delta^2 * count * N / n + v_b * N) / n
        std'  = sqrt(var' * n / (n - 1));  count' = n

    Args:
        moments: the running moments before this batch.
        scores: float [N], N >= 2.

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
            "allowed: [N] with N >= 2")
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
        scores: float [N].
        use_norm: subtract the running mean.
        clip: optional symmetric clip of the result; the paper uses None.

    Returns:
        float32 [N].
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


def init_kl_controller(cfg: PPOConfig) -> KLController:
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
                  + scores[i] * [t == L - 1]

    Args:
        scores: float [B], the normalised scores.
        logprobs: float [B, L], old (behaviour) logprobs of the response.
        ref_logprobs: float [B, L], reference-model logprobs.
        beta: scalar KL coefficient (from before this step's update).

    Returns:
        float32 [B, L].
    """
    chex.assert_rank([scores, logprobs], [1, 2])
    chex.assert_equal_shape([logprobs, ref_logprobs])
    chex.assert_equal_shape_prefix([scores, logprobs], 1)
    kl_penalty = -beta * (logprobs.astype(jnp.float32)
                          - ref_logprobs.astype(jnp.float32))
    return kl_penalty.at[:, -1].add(scores.astype(jnp.float32))


def gae(rewards: jax.Array, values: jax.Array, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the response tokens.

        delta_t = r_t + gamma * V_{t+1} - V_t,   V_L = 0 (bootstrap 0)
        A_t     = delta_t + gamma * lam * A_{t+1},   A_L = 0
        returns = A + V   (before any whitening)

    Args:
        rewards: float [B, L], per-token rewards.
        values: float [B, L], old value predictions.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        (advantages, returns), float32 [B, L], gradients stopped.
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
    """KL diagnostics of the sampled response tokens.

        k1 = mean(logp - ref),  k1_per_sequence = sum_t (logp - ref)
        k3 = mean(exp(ref - logp) - 1 - (ref - logp))

    Args:
        logprobs: float [B, L], policy logprobs of the sampled tokens.
        ref_logprobs: float [B, L], reference logprobs of the same tokens.

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


# --------------------------------------------------------------------------
# Losses.


def ppo_losses(logprobs: jax.Array, values_pred: jax.Array,
               old_logprobs: jax.Array, old_values: jax.Array,
               advantages: jax.Array, returns: jax.Array, *,
               cliprange: float = 0.2, cliprange_value: float = 0.2,
               vf_coef: float = 0.1, ratio_threshold: float = 10.0
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped PPO policy loss plus clipped value loss (TRL 0.9.x).

        ratio = exp(logp - old_logp)
        pg    = mean(max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)))
        Vclip = clip(V, V_old - cv, V_old + cv)
        vf    = 0.5 * mean(max((V - R)^2, (Vclip - R)^2))
        loss  = pg + vf_coef * vf
    and pg, vf and loss are all 0 when mean(ratio) > ratio_threshold.
    Means run over every token of the minibatch.

    Args:
        logprobs: float [b, L], current policy logprobs (differentiated).
        values_pred: float [b, L], current value predictions
            (differentiated).
        old_logprobs: float [b, L], behaviour logprobs.
        old_values: float [b, L], behaviour values.
        advantages: float [b, L], whitened advantages.
        returns: float [b, L], value targets.
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
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * jnp.clip(ratio, 1.0 - cliprange,
                                        1.0 + cliprange)
    policy_loss = jnp.mean(jnp.maximum(pg_unclipped, pg_clipped))

    values_clipped = jnp.clip(values_pred, old_values - cliprange_value,
                              old_values + cliprange_value)
    vf_unclipped = (values_pred - returns) ** 2
    vf_clipped = (values_clipped - returns) ** 2
    value_loss = 0.5 * jnp.mean(jnp.maximum(vf_unclipped, vf_clipped))

    ratio_mean = jnp.mean(ratio)
    # TRL multiplies by 0.0; `where` also keeps the gradient exactly zero.
    threshold_hit = ratio_mean > ratio_threshold
    zero_if_hit = lambda x: jnp.where(threshold_hit, 0.0, x)
    policy_loss = zero_if_hit(policy_loss)
    value_loss = zero_if_hit(value_loss)
    loss = zero_if_hit(policy_loss + vf_coef * value_loss)

    stop = jax.lax.stop_gradient
    stats = {
        "policy_loss": stop(policy_loss),
        "value_loss": stop(value_loss),
        "total_loss": stop(loss),
        "approx_kl": stop(0.5 * jnp.mean(log_ratio ** 2)),
        "policy_kl": stop(jnp.mean(-log_ratio)),
        "clipfrac": jnp.mean((pg_clipped > pg_unclipped).astype(jnp.float32)),
        "value_clipfrac": jnp.mean(
            (vf_clipped > vf_unclipped).astype(jnp.float32)),
        "value_error": stop(jnp.mean(vf_unclipped)),
        "ratio_mean": stop(ratio_mean),
        "ratio_threshold_hit": threshold_hit.astype(jnp.float32),
    }
    return loss, stats


def make_loss_fn(forward_fn: ForwardFn, cfg: PPOConfig) -> LossFn:
    """Wraps a model forward pass into the ``loss_fn`` of ``ppo_update``.

    Args:
        forward_fn: (params, minibatch, dropout_key) -> (logprobs [b, L],
            values [b, L], extra scalar stats such as entropy). It reads its
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


# --------------------------------------------------------------------------
# The update driver.


@flax.struct.dataclass
class UpdateSchedule:
    """Which rows and dropout key each backward pass uses.

    Passes are numbered epoch-major (epoch e, minibatch j -> pass
    e * num_minibatches + j) and grouped into optimiser steps of K =
    gradient_accumulation_steps consecutive passes.

    Attributes:
        indices: int32 [S, K, b], batch rows of each pass's minibatch; each
            epoch is a fresh random permutation split into minibatches.
        dropout_keys: [S, K, ...] PRNG keys, one per pass.
    """

    indices: jax.Array
    dropout_keys: jax.Array


def make_update_schedule(key: jax.Array, batch_size: int,
                         cfg: PPOConfig) -> UpdateSchedule:
    """Draws the minibatch permutations and per-pass dropout keys.

    Args:
        key: PRNG key of this update.
        batch_size: B, the number of decisions.
        cfg: ppo_epochs, num_minibatches, gradient_accumulation_steps.

    Returns:
        The schedule.

    Raises:
        ValueError: if num_minibatches does not divide batch_size.
    """
    mini_batch_size = cfg.mini_batch_size(batch_size)
    steps, per_step = cfg.optimizer_steps, cfg.gradient_accumulation_steps
    key_permute, key_dropout = jax.random.split(key)
    epoch_keys = jax.random.split(key_permute, cfg.ppo_epochs)
    permutations = jax.vmap(
        lambda k: jax.random.permutation(k, batch_size))(epoch_keys)
    indices = permutations.reshape(steps, per_step, mini_batch_size)
    dropout_keys = jax.random.split(key_dropout, cfg.backward_passes)
    dropout_keys = dropout_keys.reshape(
        (steps, per_step) + dropout_keys.shape[1:])
    return UpdateSchedule(indices=indices.astype(jnp.int32),
                          dropout_keys=dropout_keys)


class PPOUpdateResult(NamedTuple):
    """What ``ppo_update`` returns (unpacks as a 3-tuple)."""

    params: PyTree
    opt_state: optax.OptState
    stats: dict[str, jax.Array]


def _take_rows(batch: PyTree, rows: jax.Array) -> PyTree:
    return jax.tree.map(lambda leaf: leaf[rows], batch)


def _mean_gradient(loss_fn: LossFn, params: PyTree, batch: PyTree,
                   indices: jax.Array, dropout_keys: jax.Array):
    """Averages K gradients, all at ``params`` (one accumulation window).

    Returns (mean gradient, stats stacked over the K passes).
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def one_pass(grad_sum, pass_inputs):
        rows, dropout_key = pass_inputs
        grads, stats = grad_fn(params, _take_rows(batch, rows), dropout_key)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return grad_sum, stats

    # A scan, not a vmap: only one pass's activations are alive at a time.
    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, stats = jax.lax.scan(one_pass, zeros, (indices, dropout_keys))
    num_passes = indices.shape[0]
    return jax.tree.map(lambda g: g / num_passes, grad_sum), stats


def ppo_update(loss_fn: LossFn, params: PyTree, opt_state: optax.OptState,
               optimizer: optax.GradientTransformation, batch: PyTree,
               key: jax.Array, cfg: PPOConfig, *,
               stochastic: bool = True) -> PPOUpdateResult:
    """The optimisation part of TRL's step: epochs, minibatches, Adam.

    The P = ppo_epochs * num_minibatches backward passes (each epoch a new
    random permutation of the B decisions, split into minibatches) are
    grouped into S = P / K windows of K = gradient_accumulation_steps
    passes; within a window every gradient is taken at the same parameters
    and their average makes one optimiser step, exactly as torch with
    accelerate's ``accumulate`` (loss / K, summed). PPOConfig requires K to
    divide P, so no accumulated gradient is left over between calls.

    "standard" mode: S optimiser steps; after the first the ratio moves away
    from 1 and clipping can act.
    "paper" mode: K = P, so exactly ONE optimiser step on the average of all
    P gradients at the current parameters: the authors' effective update
    (4 epochs, 1 minibatch, 4 accumulation steps), where the ratio is 1 and
    clipping never acts.

    Dropout: with ``cfg.dropout_in_update`` False (TRL's behaviour, module
    docstring) loss_fn gets ``None`` as its dropout key in every pass; with
    True each pass gets its own key from the schedule. When the passes are
    deterministic (no dropout in the update, or ``stochastic=False``), the
    epochs of paper mode only reorder rows, so for a loss that is a mean
    over decisions (as ``ppo_losses``) the average over all epochs equals
    the average over one epoch's minibatches; only those num_minibatches
    gradients are computed (ONE with the paper's single minibatch: the 4
    accumulated passes collapse exactly into one dropout-free gradient).

    Args:
        loss_fn: (params, minibatch, dropout_key or None) -> (scalar loss,
            dict of scalar stats); differentiated w.r.t. params.
        params: trainable parameters (a pytree).
        opt_state: state of ``optimizer`` for params.
        optimizer: e.g. ``make_optimizer(cfg)``.
        batch: pytree whose leaves all have leading axis B; minibatches are
            gathered rows of every leaf.
        key: PRNG key of this update (permutations and dropout keys; the
            schedule is drawn the same way whether or not keys are used).
        cfg: ppo_epochs, num_minibatches, gradient_accumulation_steps, mode,
            dropout_in_update.
        stochastic: False promises that loss_fn gives the same result for
            every dropout key (e.g. every dropout rate is 0); only matters
            with ``cfg.dropout_in_update``, where it enables the single-epoch
            shortcut in paper mode.

    Returns:
        PPOUpdateResult(params, opt_state, stats): stats are the loss_fn
        stats averaged over the backward passes computed, plus grad_norm
        (mean global norm of the averaged gradient over the optimiser
        steps).

    Raises:
        ValueError: if the leaves of batch disagree on B, or
            num_minibatches does not divide B.
    """
    leading = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None
               for leaf in jax.tree.leaves(batch)}
    if len(leading) != 1 or None in leading:
        raise ValueError(
            "every leaf of batch must have the same leading axis B, got "
            f"leading sizes {sorted(leading, key=str)}; allowed: one B")
    (batch_size,) = leading
    schedule = make_update_schedule(key, batch_size, cfg)
    if cfg.dropout_in_update:
        pass_loss_fn = loss_fn
    else:
        # TRL's eval-mode forward. The schedule's keys are still drawn, so
        # the permutations do not depend on the switch; they go unused.
        def pass_loss_fn(params, minibatch, unused_dropout_key):
            return loss_fn(params, minibatch, None)

    if cfg.mode == "paper" and not (cfg.dropout_in_update and stochastic):
        # One epoch's minibatches only (see docstring).
        first_epoch = slice(0, cfg.num_minibatches)
        schedule = UpdateSchedule(
            indices=schedule.indices[:, first_epoch],
            dropout_keys=schedule.dropout_keys[:, first_epoch])

    def optimizer_step(carry, window):
        params, opt_state = carry
        indices, dropout_keys = window
        grads, stats = _mean_gradient(pass_loss_fn, params, batch, indices,
                                      dropout_keys)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), (stats, optax.tree.norm(grads))

    (params, opt_state), (stats, grad_norms) = jax.lax.scan(
        optimizer_step, (params, opt_state),
        (schedule.indices, schedule.dropout_keys))
    stats = {name: jnp.mean(value) for name, value in stats.items()}
    stats["grad_norm"] = jnp.mean(grad_norms)
    return PPOUpdateResult(params=params, opt_state=opt_state, stats=stats)


# --------------------------------------------------------------------------
# The whole step.


class PPOStepResult(NamedTuple):
    """What ``ppo_step`` returns."""

    params: PyTree
    opt_state: optax.OptState
    moments: RunningMoments
    kl_controller: KLController
    stats: dict[str, jax.Array]


def ppo_step(loss_fn: LossFn, params: PyTree, opt_state: optax.OptState,
             optimizer: optax.GradientTransformation,
             moments: RunningMoments, kl_controller: KLController,
             batch: Mapping[str, PyTree], *, scores: jax.Array,
             old_logprobs: jax.Array, ref_logprobs: jax.Array,
             old_values: jax.Array, key: jax.Array, cfg: PPOConfig,
             stochastic: bool = True) -> PPOStepResult:
    """One TRL ``PPOTrainer.step`` on a batch of B decisions.

    moments <- update(moments, scores); s = normalise(scores)   (if scaling)
    rewards = kl_shaped_rewards(s, old_logprobs, ref_logprobs, beta)
    A, R = gae(rewards, old_values); A = whiten(A)
    params, opt_state = ppo_update(...)
    beta <- update_kl_controller(mean_i sum_t (old_logp - ref_logp), n = B)

    Args:
        loss_fn: see ``ppo_update``; it reads the caller's own inputs from
            the minibatch plus old_logprobs, old_values, advantages and
            returns (``make_loss_fn`` builds one from a forward pass).
        params: trainable parameters.
        opt_state: optimiser state.
        optimizer: the optimiser.
        moments: running score moments (continue across the run).
        kl_controller: KL controller; its beta shapes this step's rewards.
        batch: dict of the caller's per-decision inputs, leading axis B
            (tokens, ...), without the reserved keys.
        scores: float [B], raw scores (rewards of the decisions).
        old_logprobs: float [B, L], log-probs of the sampled tokens from a
            forward WITHOUT dropout (TRL's eval-mode
            ``batched_forward_pass``); when sampling had dropout these are
            not the sampling log-probs.
        ref_logprobs: float [B, L], reference logprobs.
        old_values: float [B, L], values from the same dropout-free
            forward.
        key: PRNG key of this step.
        cfg: the PPO configuration.
        stochastic: see ``ppo_update``.

    Without use_score_scaling the moments are returned unchanged (TRL only
    updates them when scaling).

    Returns:
        PPOStepResult(params, opt_state, moments, kl_controller, stats):
        stats hold the ``ppo_update`` stats (loss_fn stats averaged over the
        passes, e.g. entropy when the loss_fn reports it) plus kl (mean
        per-sequence k1, the controller's input), kl_k1 and kl_k3 (per
        token), beta (used for the rewards), entropy_sampled (mean
        per-sequence -sum old_logprobs), mean_non_score_reward (TRL's
        ``ppo/mean_non_score_reward``: the token mean of the KL penalty
        -beta * (old_logp - ref_logp), ``masked_mean`` over response
        tokens), score_raw_mean / score_raw_std (batch,
        std ddof 1), score_norm_mean / score_norm_std, moments_mean /
        moments_std (after the update), advantages_mean (before whitening),
        returns_mean, values_mean.

    Raises:
        ValueError: if batch is not a dict-like of the caller's inputs or
            uses a reserved key.
    """
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"batch must be a dict of per-decision arrays, got "
            f"{type(batch).__name__}; allowed: a Mapping")
    clashes = sorted(set(batch) & set(RESERVED_BATCH_KEYS))
    if clashes:
        raise ValueError(
            f"batch keys {clashes} are reserved for what ppo_step adds; "
            f"allowed: keys other than {', '.join(RESERVED_BATCH_KEYS)}")
    chex.assert_rank([scores, old_logprobs], [1, 2])
    chex.assert_equal_shape([old_logprobs, ref_logprobs, old_values])
    chex.assert_equal_shape_prefix([scores, old_logprobs], 1)
    batch_size = scores.shape[0]

    raw_scores = scores.astype(jnp.float32)
    if cfg.use_score_scaling:
        moments, score_raw_mean, score_raw_std = update_running_moments(
            moments, raw_scores)
        normalised = normalise_scores(moments, raw_scores,
                                      use_norm=cfg.use_score_norm,
                                      clip=cfg.score_clip)
    else:
        score_raw_mean = jnp.mean(raw_scores)
        score_raw_std = jnp.std(raw_scores, ddof=1)
        normalised = raw_scores if cfg.score_clip is None else jnp.clip(
            raw_scores, -cfg.score_clip, cfg.score_clip)

    beta = kl_controller.beta
    rewards = kl_shaped_rewards(normalised, old_logprobs, ref_logprobs, beta)
    advantages, returns = gae(rewards, old_values, gamma=cfg.gamma,
                              lam=cfg.lam)
    whitened = whiten(advantages)

    train_batch = {
        **batch,
        OLD_LOGPROBS: jax.lax.stop_gradient(old_logprobs),
        OLD_VALUES: jax.lax.stop_gradient(old_values),
        ADVANTAGES: whitened,
        RETURNS: returns,
    }
    params, opt_state, update_stats = ppo_update(
        loss_fn, params, opt_state, optimizer, train_batch, key, cfg,
        stochastic=stochastic)

    kl = kl_estimates(old_logprobs, ref_logprobs)
    mean_kl = jnp.mean(kl.k1_per_sequence)
    kl_controller = update_kl_controller(kl_controller, mean_kl, batch_size)

    stats = dict(update_stats)
    stats.update(
        kl=mean_kl,
        kl_k1=kl.k1,
        kl_k3=kl.k3,
        beta=beta,
        entropy_sampled=jnp.mean(
            -jnp.sum(old_logprobs.astype(jnp.float32), axis=-1)),
        mean_non_score_reward=-beta * kl.k1,
        score_raw_mean=score_raw_mean,
        score_raw_std=score_raw_std,
        score_norm_mean=jnp.mean(normalised),
        score_norm_std=jnp.std(normalised, ddof=1),
        moments_mean=moments.mean,
        moments_std=moments.std,
        advantages_mean=jnp.mean(advantages),
        returns_mean=jnp.mean(returns),
        values_mean=jnp.mean(old_values.astype(jnp.float32)),
    )
    return PPOStepResult(params=params, opt_state=opt_state, moments=moments,
                         kl_controller=kl_controller, stats=stats)
