"""The jitted training chunk: K episodes of rollout + one PPO step per learner.

Everything from "sample an episode" to "apply an Adam step" is one pure
function (`train_chunk`), compiled once, that scans over K episodes for every
learner at once:

    for each of K episodes (lax.scan):
        decisions = rollout_episode(...)   # B sequential decisions, with the
                                           # reference log-probs of every answer
        for each learner (vmap): ppo_step  # normaliser, KL, GAE, Adam
    -> LearnerState', per-decision records [K, N, B], update stats [K, N]

Learners (seeds x conditions) are a leading axis N over ONE frozen base,
sharded over the mesh's data axis; `init_learners` creates them there.

Randomness: learner n in episode e uses fold_in(key_n, e), so a resumed run
draws exactly what an uninterrupted one would.

Axis letters (docs/ARCHITECTURE.md): N learners, K episodes of a chunk, B
decisions per episode, A answer tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moraljax import prompt_tables
from moraljax.llm import lora as lora_lib
from moraljax.llm import policy as policy_lib
from moraljax.llm import sampling
from moraljax.output import names as metric_names
from moraljax.rl import ppo
from moraljax.rl import ppo_advantages
from moraljax.rl import ppo_loss
from moraljax.rl import ppo_settings
from moraljax.rl import reference as reference_lib
from moraljax.rl import rollout

# Metrics of `rollout.Decisions` that go to the host, with its `named_rewards`
# (the rest stay on device).
DECISION_METRICS = ("action_type", "opponent_legal", "partner", "reward") + metric_names.REGRET_KEYS


@flax.struct.dataclass
class LearnerState:
    """Everything that changes during a run, for one learner (or [N] learners).

    Attributes:
        trainable: LoRA factors and value head (float32), the only
            differentiated and optimised parameters.
        opt_state: Adam state of `trainable`.
        moments: running score moments (persist across the reward switch).
        kl: the KL controller (beta).
        episode: int32, episodes completed.
        key: the learner's base PRNG key (constant; episode keys fold it).
        last_move: with partner selection only, int32 the learner's parsed
            answer in the last decision of its last episode (-1 none or
            illegal, 0 C, 1 D), shown to selectors; None otherwise, so runs
            without selection keep their checkpoint tree.
    """

    trainable: Any
    opt_state: Any
    moments: ppo_advantages.RunningMoments
    kl: ppo_advantages.KLController
    episode: jax.Array
    key: jax.Array
    last_move: Any = None


@dataclasses.dataclass(frozen=True)
class ChunkSettings:
    """Static settings of the compiled chunk (hashable)."""

    batch_size: int
    num_episodes: int
    sampling: rollout.SamplingSettings
    ppo: ppo_settings.PPOConfig
    # Whether the policy has any dropout to apply when the update asks for
    # it (ppo.dropout_in_update; TRL's update runs without).
    stochastic: bool
    # Members per population (rl/rollout.py); 0 = no populations.
    population_size: int = 0
    # Learners that are population members (the first ones; inert padding after).
    population_members: int = 0
    # Candidates shown to each selector (matching "selection"); 0 = no selection.
    selection_candidates: int = 0


def _fresh_learner(trainable_template: nnx.State, ppo_config: ppo_settings.PPOConfig, seed: jax.Array,
                   player: jax.Array) -> LearnerState:
    """One fresh learner (unbatched): see `init_learners`."""
    key = jax.random.PRNGKey(seed)
    key = jnp.where(player == 0, key, jax.random.fold_in(key, player))
    key_init, key_run = jax.random.split(key)
    trainable = lora_lib.init_trainable(trainable_template, key_init)
    return LearnerState(
        trainable=trainable,
        opt_state=ppo_settings.make_optimizer(ppo_config).init(trainable),
        moments=ppo_advantages.init_running_moments(),
        kl=ppo_advantages.init_kl_controller(ppo_config),
        episode=jnp.zeros((), jnp.int32),
        key=key_run,
    )


def init_learners(trainable_template: nnx.State, seed_players: list[tuple[int, int]],
                  ppo_config: ppo_settings.PPOConfig, sharding: jax.sharding.Sharding | None = None, *,
                  selecting: bool = False) -> LearnerState:
    """Fresh learners, one per (seed, player): [N] leading axis on every leaf, created on `sharding`.

    Seed s gets PRNGKey(s) (the second player of an LLM pair, or member m of
    a population, fold_in(PRNGKey(s), m)), split into an initialisation key
    (LoRA A, value head) and the run key of its episodes.

    Args:
        trainable_template: the policy's trainable state (arrays or abstract).
        seed_players: (seed, player) of every learner.
        ppo_config: the optimiser and KL controller settings.
        sharding: where the [N] state is created (None: the default device).
        selecting: with partner selection, `last_move` starts at -1 (nobody
            has played yet); else it is None.
    """
    seeds, players = (jnp.asarray(column, jnp.int32) for column in zip(*seed_players))

    def fresh(seeds, players):
        learners = jax.vmap(functools.partial(_fresh_learner, trainable_template, ppo_config))(seeds, players)
        if selecting:
            learners = learners.replace(last_move=jnp.full(seeds.shape, -1, jnp.int32))
        return learners

    return jax.jit(fresh, out_shardings=sharding)(seeds, players)


def learner_template(trainable_template: nnx.State, count: int, ppo_config: ppo_settings.PPOConfig,
                     sharding: jax.sharding.Sharding, *, selecting: bool = False) -> LearnerState:
    """The abstract state of `count` learners on `sharding` (what checkpoints restore into)."""
    abstract = jax.eval_shape(lambda: init_learners(trainable_template, [(0, 0)] * count, ppo_config,
                                                    selecting=selecting))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)


def update_learner(
    graphdef: nnx.GraphDef,
    frozen: nnx.State,
    table: prompt_tables.PromptTable,
    settings: ChunkSettings,
    learner: LearnerState,
    batch: dict[str, jax.Array],
    key: jax.Array,
) -> tuple[LearnerState, dict[str, jax.Array]]:
    """One PPO step of one learner on its answers of an episode (SPEC 6).

    `batch` (`PPO_FIELDS`) holds its B decisions, plus its selection answer
    last with partner selection (`ppo_batch`). Old log-probs and values come
    from a dropout-free forward (rollout.py); `ppo_update` hands the forward
    a dropout key only with `ppo.dropout_in_update` (rl/ppo.py).
    """

    def forward(trainable, minibatch, dropout_key):
        policy = policy_lib.merge_policy(graphdef, trainable, frozen)
        row = minibatch["prompt_row"]
        out = sampling.score_responses(
            policy,
            table.ids[row],
            table.mask[row],
            minibatch["tokens"],
            dropout_key=dropout_key if settings.stochastic else None,
        )
        return out.logprobs, out.values, {"entropy": jnp.mean(out.entropy)}

    result = ppo.ppo_step(
        ppo_loss.make_loss_fn(forward, settings.ppo),
        learner.trainable,
        learner.opt_state,
        ppo_settings.make_optimizer(settings.ppo),
        learner.moments,
        learner.kl,
        {"prompt_row": batch["prompt_row"], "tokens": batch["tokens"]},
        scores=batch["reward"],
        old_logprobs=batch["logprobs"],
        ref_logprobs=batch["ref_logprobs"],
        old_values=batch["values"],
        key=key,
        cfg=settings.ppo,
        stochastic=settings.stochastic,
    )
    learner = learner.replace(
        trainable=result.params,
        opt_state=result.opt_state,
        moments=result.moments,
        kl=result.kl_controller,
        episode=learner.episode + 1,
    )
    return learner, result.stats


# What the PPO step reads of every answer (rollout.Decisions / rollout.Selections).
PPO_FIELDS = ("prompt_row", "tokens", "reward", "logprobs", "values", "ref_logprobs")


def ppo_batch(decisions: rollout.Decisions) -> dict[str, jax.Array]:
    """Every learner's PPO inputs [N, B(+1), ...]: the decisions, then the selection answer if any."""
    batch = {name: getattr(decisions, name) for name in PPO_FIELDS}
    if decisions.selection is not None:
        batch = {name: jnp.concatenate([value, getattr(decisions.selection, name)[:, None]], axis=1)
                 for name, value in batch.items()}
    return batch


def _selection_metrics(selection: rollout.Selections, batch_size: int) -> dict[str, jax.Array]:
    """The selection records as per-decision metrics [N, B] (repeated over the episode's decisions)."""
    names = ("choice", "choice_move", "offered_c", "honoured")
    return {f"selection_{name}": jnp.repeat(getattr(selection, name)[:, None], batch_size, axis=1)
            for name in names}


def train_chunk(
    graphdef: nnx.GraphDef,
    reference_graphdef: nnx.GraphDef,
    settings: ChunkSettings,
    frozen: nnx.State,
    env: rollout.Environment,
    setup: rollout.LearnerSetup,
    learners: LearnerState,
) -> tuple[LearnerState, dict[str, jax.Array], dict[str, jax.Array]]:
    """K episodes of rollout + PPO update for all learners (pure; jit it).

    Args:
        graphdef: the policy's graph.
        reference_graphdef: the reference model's (policy.reference_graphdef).
        settings: static chunk settings.
        frozen: the frozen base state.
        env, setup: the environment and the learner conditions [N].
        learners: LearnerState [N].

    Returns:
        (learners after K episodes, decision metrics {name: [K, N, B]},
        update stats {name: [K, N]}).
    """
    prefix = reference_lib.reference_prefix(reference_graphdef, frozen, env.prompts, settings.sampling.gen_len)

    def one_episode(learners: LearnerState, _):
        keys = jax.vmap(jax.random.fold_in)(learners.key, learners.episode)
        key_rollout, key_update = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
        decisions = rollout.rollout_episode(
            graphdef,
            frozen,
            learners.trainable,
            env,
            setup,
            learners.episode,
            key_rollout,
            batch_size=settings.batch_size,
            settings=settings.sampling,
            population_size=settings.population_size,
            population_members=settings.population_members,
            selection_candidates=settings.selection_candidates,
            last_move=learners.last_move,
            reference=prefix,
        )
        update = functools.partial(update_learner, graphdef, frozen, env.prompts, settings)
        learners, stats = jax.vmap(update)(learners, ppo_batch(decisions), key_update)
        metrics = {name: getattr(decisions, name) for name in DECISION_METRICS} | decisions.named_rewards
        if decisions.selection is not None:
            learners = learners.replace(last_move=decisions.action[:, -1])
            metrics |= _selection_metrics(decisions.selection, settings.batch_size)
        return learners, (metrics, stats)

    learners, (metrics, stats) = jax.lax.scan(one_episode, learners, None, length=settings.num_episodes)
    return learners, metrics, stats


@jax.jit
def finite_per_learner(learners: LearnerState) -> jax.Array:
    """[N] bool: whether every trainable parameter and Adam moment of learner n is finite."""
    leaves = jax.tree.leaves((learners.trainable, learners.opt_state))
    checks = [jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
              for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)]
    return jnp.all(jnp.stack(checks), axis=0)
