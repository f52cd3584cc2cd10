"""The PPO update and step for LLM agents as pure JAX functions (TRL 0.9.x).

Reproduces what TRL 0.9.x ``PPOTrainer.step`` does with the authors'
settings (SPEC.md section 6), in the order of one step:

1. ``update_running_moments`` then ``normalise_scores`` (these, and the
   functions of steps 3, 4 and 6, live in ``rl/ppo_advantages.py``, which
   gives their TRL details): scores are normalised by running moments
   updated with the batch first;
2. (caller) old logprobs, values and reference logprobs without dropout;
3. ``kl_shaped_rewards`` with the beta from before this step's controller
   update;
4. ``gae`` (returns = advantages + values), then ``whiten`` the advantages
   over the whole batch once;
5. ``ppo_update``: epochs x minibatches of ``ppo_losses``
   (``rl/ppo_loss.py``) with gradient accumulation and Adam
   (``ppo_settings.make_optimizer``);
6. ``update_kl_controller`` with the mean per-sequence KL of the OLD
   logprobs and n = batch size.

``ppo_step`` chains all of it; every function traces under ``jax.jit``. The
hyperparameters are ``ppo_settings.PPOConfig``.

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

Axis legend (docs/ARCHITECTURE.md): B decisions in the batch (one prompt +
answer each), A answer tokens per decision, b decisions in a minibatch
(B / num_minibatches). Backward passes, optimiser steps and gradient
accumulation are written out: an update makes ppo_epochs * num_minibatches
backward passes, grouped into optimiser steps of
gradient_accumulation_steps passes each.

Every answer has the same length A (SPEC.md section 4: exactly ``gen_len``
tokens, not stopped at EOS), so no token mask is needed: every position of
the [B, A] arrays is an answer token, and TRL's masked means are plain
means here.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax

from moraljax.rl import ppo_advantages
from moraljax.rl import ppo_loss
from moraljax.rl import ppo_settings

PyTree = Any


# --------------------------------------------------------------------------
# The update driver.


@flax.struct.dataclass
class UpdateSchedule:
    """Which rows and dropout key each backward pass uses.

    Passes are numbered epoch-major (epoch e, minibatch j -> pass
    e * num_minibatches + j) and grouped into optimiser steps of
    gradient_accumulation_steps consecutive passes.

    Attributes:
        indices: int32 [optimizer_steps, gradient_accumulation_steps, b],
            batch rows of each pass's minibatch; each epoch is a fresh
            random permutation split into minibatches.
        dropout_keys: [optimizer_steps, gradient_accumulation_steps, ...]
            PRNG keys, one per pass.
    """

    indices: jax.Array
    dropout_keys: jax.Array


def make_update_schedule(key: jax.Array, batch_size: int,
                         cfg: ppo_settings.PPOConfig) -> UpdateSchedule:
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


def _passes_to_compute(schedule: UpdateSchedule,
                       cfg: ppo_settings.PPOConfig,
                       stochastic: bool) -> UpdateSchedule:
    """The schedule's passes ``ppo_update`` really computes.

    When the passes are deterministic (no dropout in the update, or
    ``stochastic=False``), the epochs of paper mode only reorder rows, so
    for a loss that is a mean over decisions (as ``ppo_losses``) the
    average over all epochs equals the average over one epoch's
    minibatches; only those num_minibatches gradients are computed (ONE
    with the paper's single minibatch: the 4 accumulated passes collapse
    exactly into one dropout-free gradient). Otherwise every pass is.
    """
    if cfg.mode == "paper" and not (cfg.dropout_in_update and stochastic):
        first_epoch = slice(0, cfg.num_minibatches)
        return UpdateSchedule(
            indices=schedule.indices[:, first_epoch],
            dropout_keys=schedule.dropout_keys[:, first_epoch])
    return schedule


def _pass_loss_fn(loss_fn: ppo_loss.LossFn,
                  dropout_in_update: bool) -> ppo_loss.LossFn:
    """loss_fn as each pass calls it: with its key, or None (no dropout)."""
    if dropout_in_update:
        return loss_fn

    # TRL's eval-mode forward. The schedule's keys are still drawn, so the
    # permutations do not depend on the switch; they go unused.
    def without_dropout(params, minibatch, unused_dropout_key):
        return loss_fn(params, minibatch, None)

    return without_dropout


def _take_rows(batch: PyTree, rows: jax.Array) -> PyTree:
    return jax.tree.map(lambda leaf: leaf[rows], batch)


def _mean_gradient(loss_fn: ppo_loss.LossFn, params: PyTree, batch: PyTree,
                   indices: jax.Array, dropout_keys: jax.Array):
    """Averages one accumulation window's gradients, all at ``params``.

    Returns (mean gradient, stats stacked over the window's passes).
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


def _optimizer_steps(loss_fn: ppo_loss.LossFn, params: PyTree,
                     opt_state: optax.OptState,
                     optimizer: optax.GradientTransformation, batch: PyTree,
                     schedule: UpdateSchedule):
    """One optimiser step per accumulation window of the schedule.

    Returns ((params, opt_state), (stats, grad_norms)), the stats and the
    averaged gradient's global norm stacked over the optimiser steps.
    """

    def optimizer_step(carry, window):
        params, opt_state = carry
        indices, dropout_keys = window
        grads, stats = _mean_gradient(loss_fn, params, batch, indices,
                                      dropout_keys)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), (stats, optax.tree.norm(grads))

    return jax.lax.scan(optimizer_step, (params, opt_state),
                        (schedule.indices, schedule.dropout_keys))


def _batch_size(batch: PyTree) -> int:
    """B, the leading axis every leaf of batch shares.

    Raises:
        ValueError: if the leaves disagree on it, or one is a scalar.
    """
    leading = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None
               for leaf in jax.tree.leaves(batch)}
    if len(leading) != 1 or None in leading:
        raise ValueError(
            "every leaf of batch must have the same leading axis B, got "
            f"leading sizes {sorted(leading, key=str)}; allowed: one B")
    (batch_size,) = leading
    return batch_size


class PPOUpdateResult(NamedTuple):
    """What ``ppo_update`` returns (unpacks as a 3-tuple).

    Attributes:
        params: the updated parameters.
        opt_state: the updated optimiser state.
        stats: the loss_fn stats averaged over the backward passes
            computed, plus grad_norm (mean global norm of the averaged
            gradient over the optimiser steps).
    """

    params: PyTree
    opt_state: optax.OptState
    stats: dict[str, jax.Array]


def ppo_update(loss_fn: ppo_loss.LossFn, params: PyTree,
               opt_state: optax.OptState,
               optimizer: optax.GradientTransformation, batch: PyTree,
               key: jax.Array, cfg: ppo_settings.PPOConfig, *,
               stochastic: bool = True) -> PPOUpdateResult:
    """The optimisation part of TRL's step: epochs, minibatches, Adam.

    The ppo_epochs * num_minibatches backward passes (each epoch a new
    random permutation of the B decisions, split into minibatches) are
    grouped into windows of gradient_accumulation_steps passes; within a
    window every gradient is taken at the same parameters and their average
    makes one optimiser step, exactly as torch with accelerate's
    ``accumulate`` (loss / gradient_accumulation_steps, summed). PPOConfig
    requires the window to divide the passes, so no accumulated gradient is
    left over between calls.

    "standard" mode: one optimiser step per window; after the first the
    ratio moves away from 1 and clipping can act.
    "paper" mode: one window of all the passes, so exactly ONE optimiser
    step on the average of all the gradients at the current parameters:
    the authors' effective update (4 epochs, 1 minibatch, 4 accumulation
    steps), where the ratio is 1 and clipping never acts.

    Dropout: with ``cfg.dropout_in_update`` False (TRL's behaviour, module
    docstring) loss_fn gets ``None`` as its dropout key in every pass; with
    True each pass gets its own key from the schedule. When the passes are
    deterministic, paper mode computes one epoch's passes only
    (``_passes_to_compute``): one dropout-free gradient with the paper's
    settings.

    Args:
        loss_fn: (params, minibatch, dropout_key or None) -> (scalar loss,
            dict of scalar stats); differentiated w.r.t. params.
        params: trainable parameters (a pytree).
        opt_state: state of ``optimizer`` for params.
        optimizer: e.g. ``ppo_settings.make_optimizer(cfg)``.
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
        PPOUpdateResult(params, opt_state, stats).

    Raises:
        ValueError: if the leaves of batch disagree on B, or
            num_minibatches does not divide B.
    """
    schedule = make_update_schedule(key, _batch_size(batch), cfg)
    schedule = _passes_to_compute(schedule, cfg, stochastic)
    (params, opt_state), (stats, grad_norms) = _optimizer_steps(
        _pass_loss_fn(loss_fn, cfg.dropout_in_update), params, opt_state,
        optimizer, batch, schedule)
    stats = {name: jnp.mean(value) for name, value in stats.items()}
    stats["grad_norm"] = jnp.mean(grad_norms)
    return PPOUpdateResult(params=params, opt_state=opt_state, stats=stats)


# --------------------------------------------------------------------------
# The whole step.


class PPOStepResult(NamedTuple):
    """What ``ppo_step`` returns.

    Attributes:
        params, opt_state: as ``ppo_update`` returns them.
        moments: the running score moments after this batch (unchanged
            without use_score_scaling: TRL only updates them when scaling).
        kl_controller: the controller after this step's update.
        stats: the ``ppo_update`` stats (loss_fn stats averaged over the
            passes, e.g. entropy when the loss_fn reports it) plus kl (mean
            per-sequence k1, the controller's input), kl_k1 and kl_k3 (per
            token), beta (used for the rewards), entropy_sampled (mean
            per-sequence -sum old_logprobs), mean_non_score_reward (TRL's
            ``ppo/mean_non_score_reward``: the token mean of the KL penalty
            -beta * (old_logp - ref_logp), ``masked_mean`` over answer
            tokens), score_raw_mean / score_raw_std (batch, std ddof 1),
            score_norm_mean / score_norm_std, moments_mean / moments_std
            (after the update), advantages_mean (before whitening),
            returns_mean, values_mean.
    """

    params: PyTree
    opt_state: optax.OptState
    moments: ppo_advantages.RunningMoments
    kl_controller: ppo_advantages.KLController
    stats: dict[str, jax.Array]


def _check_step_inputs(batch: Mapping[str, PyTree], scores: jax.Array,
                       old_logprobs: jax.Array, ref_logprobs: jax.Array,
                       old_values: jax.Array) -> None:
    """Refuses a batch that is not a dict free of the reserved keys, and
    arrays not shaped scores [B], the rest [B, A]."""
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"batch must be a dict of per-decision arrays, got "
            f"{type(batch).__name__}; allowed: a Mapping")
    reserved = ppo_loss.RESERVED_BATCH_KEYS
    clashes = sorted(set(batch) & set(reserved))
    if clashes:
        raise ValueError(
            f"batch keys {clashes} are reserved for what ppo_step adds; "
            f"allowed: keys other than {', '.join(reserved)}")
    chex.assert_rank([scores, old_logprobs], [1, 2])
    chex.assert_equal_shape([old_logprobs, ref_logprobs, old_values])
    chex.assert_equal_shape_prefix([scores, old_logprobs], 1)


class _NormalisedScores(NamedTuple):
    """A batch's scores as the rewards use them, with the moments after."""

    moments: ppo_advantages.RunningMoments
    normalised: jax.Array  # float32 [B]
    raw_mean: jax.Array  # batch mean of the raw scores
    raw_std: jax.Array  # batch std (ddof 1) of the raw scores


def _normalise_batch_scores(moments: ppo_advantages.RunningMoments,
                            scores: jax.Array,
                            cfg: ppo_settings.PPOConfig) -> _NormalisedScores:
    """Step 1 of the module docstring, or only the clip without scaling."""
    raw_scores = scores.astype(jnp.float32)
    if cfg.use_score_scaling:
        moments, raw_mean, raw_std = ppo_advantages.update_running_moments(
            moments, raw_scores)
        normalised = ppo_advantages.normalise_scores(
            moments, raw_scores, use_norm=cfg.use_score_norm,
            clip=cfg.score_clip)
    else:
        raw_mean = jnp.mean(raw_scores)
        raw_std = jnp.std(raw_scores, ddof=1)
        normalised = raw_scores if cfg.score_clip is None else jnp.clip(
            raw_scores, -cfg.score_clip, cfg.score_clip)
    return _NormalisedScores(moments=moments, normalised=normalised,
                            raw_mean=raw_mean, raw_std=raw_std)


def _with_ppo_targets(batch: Mapping[str, PyTree], old_logprobs: jax.Array,
                      old_values: jax.Array, advantages: jax.Array,
                      returns: jax.Array) -> dict[str, PyTree]:
    """The caller's batch plus the reserved keys ``loss_fn`` reads."""
    return {
        **batch,
        ppo_loss.OLD_LOGPROBS: jax.lax.stop_gradient(old_logprobs),
        ppo_loss.OLD_VALUES: jax.lax.stop_gradient(old_values),
        ppo_loss.ADVANTAGES: advantages,
        ppo_loss.RETURNS: returns,
    }


def _step_stats(update_stats: Mapping[str, jax.Array], mean_kl: jax.Array,
                kl: ppo_advantages.KLEstimates, beta: jax.Array,
                old_logprobs: jax.Array, scores: _NormalisedScores,
                advantages: jax.Array, returns: jax.Array,
                old_values: jax.Array) -> dict[str, jax.Array]:
    """The stats of ``ppo_step`` (listed in ``PPOStepResult``)."""
    stats = dict(update_stats)
    stats.update(
        kl=mean_kl,
        kl_k1=kl.k1,
        kl_k3=kl.k3,
        beta=beta,
        entropy_sampled=jnp.mean(
            -jnp.sum(old_logprobs.astype(jnp.float32), axis=-1)),
        mean_non_score_reward=-beta * kl.k1,
        score_raw_mean=scores.raw_mean,
        score_raw_std=scores.raw_std,
        score_norm_mean=jnp.mean(scores.normalised),
        score_norm_std=jnp.std(scores.normalised, ddof=1),
        moments_mean=scores.moments.mean,
        moments_std=scores.moments.std,
        advantages_mean=jnp.mean(advantages),
        returns_mean=jnp.mean(returns),
        values_mean=jnp.mean(old_values.astype(jnp.float32)),
    )
    return stats


def ppo_step(loss_fn: ppo_loss.LossFn, params: PyTree,
             opt_state: optax.OptState,
             optimizer: optax.GradientTransformation,
             moments: ppo_advantages.RunningMoments,
             kl_controller: ppo_advantages.KLController,
             batch: Mapping[str, PyTree], *, scores: jax.Array,
             old_logprobs: jax.Array, ref_logprobs: jax.Array,
             old_values: jax.Array, key: jax.Array,
             cfg: ppo_settings.PPOConfig,
             stochastic: bool = True) -> PPOStepResult:
    """One TRL ``PPOTrainer.step`` on a batch of B decisions.

    moments <- update(moments, scores); s = normalise(scores)   (if scaling)
    rewards = kl_shaped_rewards(s, old_logprobs, ref_logprobs, beta)
    adv, returns = gae(rewards, old_values); adv = whiten(adv)
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
        old_logprobs: float [B, A], log-probs of the sampled tokens from a
            forward WITHOUT dropout (TRL's eval-mode
            ``batched_forward_pass``); when sampling had dropout these are
            not the sampling log-probs.
        ref_logprobs: float [B, A], reference logprobs.
        old_values: float [B, A], values from the same dropout-free
            forward.
        key: PRNG key of this step.
        cfg: the PPO configuration.
        stochastic: see ``ppo_update``.

    Returns:
        PPOStepResult(params, opt_state, moments, kl_controller, stats); its
        docstring lists the stats.

    Raises:
        ValueError: if batch is not a dict-like of the caller's inputs or
            uses a reserved key.
    """
    _check_step_inputs(batch, scores, old_logprobs, ref_logprobs, old_values)
    batch_size = scores.shape[0]
    scored = _normalise_batch_scores(moments, scores, cfg)

    beta = kl_controller.beta
    rewards = ppo_advantages.kl_shaped_rewards(
        scored.normalised, old_logprobs, ref_logprobs, beta)
    advantages, returns = ppo_advantages.gae(rewards, old_values,
                                             gamma=cfg.gamma, lam=cfg.lam)
    train_batch = _with_ppo_targets(batch, old_logprobs, old_values,
                                    ppo_advantages.whiten(advantages),
                                    returns)
    params, opt_state, update_stats = ppo_update(
        loss_fn, params, opt_state, optimizer, train_batch, key, cfg,
        stochastic=stochastic)

    kl = ppo_advantages.kl_estimates(old_logprobs, ref_logprobs)
    mean_kl = jnp.mean(kl.k1_per_sequence)
    kl_controller = ppo_advantages.update_kl_controller(
        kl_controller, mean_kl, batch_size)
    stats = _step_stats(update_stats, mean_kl, kl, beta, old_logprobs,
                        scored, advantages, returns, old_values)
    return PPOStepResult(params=params, opt_state=opt_state,
                         moments=scored.moments, kl_controller=kl_controller,
                         stats=stats)
