"""Moral fine-tuning: the learner state, the jitted training chunk, the host loop.

Everything from "sample an episode" to "apply an Adam step" is one pure
function (`train_chunk`), compiled once, that scans over K episodes for every
learner at once:

    for each of K episodes (lax.scan):
        decisions = rollout_episode(...)            # B sequential decisions
        ref_logprobs from the cached reference prefix
        for each learner (vmap): ppo_step           # normaliser, KL, GAE, Adam
    -> LearnerState', per-decision records [K, N, B], update stats [K, N]

Learners (seeds x conditions) are a leading axis N over ONE frozen base,
sharded over the mesh's data axis. Python only loops over chunks, writes
metrics and saves checkpoints (`train`).

Randomness: learner n in episode e uses fold_in(key_n, e), so a resumed run
draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moraljax import action_matcher
from moraljax import config_lib
from moraljax import distributed
from moraljax import games
from moraljax import interrupts
from moraljax import opponents
from moraljax import prompt_tables
from moraljax import sharding as sharding_lib
from moraljax import workdir as workdir_lib
from moraljax.llm import decoder
from moraljax.llm import lora as lora_lib
from moraljax.llm import policy as policy_lib
from moraljax.llm import sampling
from moraljax.output import names as metric_names
from moraljax.rl import ppo
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
    moments: ppo.RunningMoments
    kl: ppo.KLController
    episode: jax.Array
    key: jax.Array
    last_move: Any = None


@dataclasses.dataclass(frozen=True)
class ChunkSettings:
    """Static settings of the compiled chunk (hashable)."""

    batch_size: int
    num_episodes: int
    sampling: rollout.SamplingSettings
    ppo: ppo.PPOConfig
    # Whether the policy has any dropout to apply when the update asks for
    # it (ppo.dropout_in_update; TRL's update runs without).
    stochastic: bool
    # Members per population (rl/rollout.py); 0 = no populations.
    population_size: int = 0
    # Learners that are population members (the first ones; inert padding after).
    population_members: int = 0
    # Candidates shown to each selector (matching "selection"); 0 = no selection.
    selection_candidates: int = 0


def init_learners(
    template: policy_lib.Policy, seed_players: list[tuple[int, int]], ppo_config: ppo.PPOConfig
) -> LearnerState:
    """Fresh learners, one per (seed, player): [N] leading axis on every leaf.

    Seed s gets PRNGKey(s) (the second player of an LLM pair
    fold_in(PRNGKey(s), 1)), split into an initialisation key (LoRA A, value
    head) and the run key of its episodes.
    """
    optimizer = ppo.make_optimizer(ppo_config)
    _, trainable_template, _ = policy_lib.split_policy(template)

    def one(seed, player):
        key = jax.random.PRNGKey(seed)
        key = jnp.where(player == 0, key, jax.random.fold_in(key, player))
        key_init, key_run = jax.random.split(key)
        trainable = lora_lib.init_trainable(trainable_template, key_init)
        return LearnerState(
            trainable=trainable,
            opt_state=optimizer.init(trainable),
            moments=ppo.init_running_moments(),
            kl=ppo.init_kl_controller(ppo_config),
            episode=jnp.zeros((), jnp.int32),
            key=key_run,
        )

    seeds, players = zip(*seed_players)
    return jax.jit(jax.vmap(one))(jnp.asarray(seeds, jnp.int32), jnp.asarray(players, jnp.int32))


def _update_one(
    graphdef: nnx.GraphDef,
    frozen: nnx.State,
    table: prompt_tables.PromptTable,
    settings: ChunkSettings,
    learner: LearnerState,
    batch: dict[str, jax.Array],
    ref_logprobs: jax.Array,
    key: jax.Array,
) -> tuple[LearnerState, dict[str, jax.Array]]:
    """One PPO step of one learner on its responses of an episode (SPEC 6).

    `batch` ("prompt_row", "tokens", "reward", "logprobs", "values") holds
    its B decisions, plus its selection answer last with partner selection
    (`_ppo_batch`). Old log-probs and values come from a dropout-free forward
    (rollout.py); `ppo_update` hands the forward a dropout key only with
    `ppo.dropout_in_update` (rl/ppo.py).
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
        ppo.make_loss_fn(forward, settings.ppo),
        learner.trainable,
        learner.opt_state,
        ppo.make_optimizer(settings.ppo),
        learner.moments,
        learner.kl,
        {"prompt_row": batch["prompt_row"], "tokens": batch["tokens"]},
        scores=batch["reward"],
        old_logprobs=batch["logprobs"],
        ref_logprobs=ref_logprobs,
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


_PPO_FIELDS = ("prompt_row", "tokens", "reward", "logprobs", "values")


def _ppo_batch(decisions: rollout.Decisions) -> dict[str, jax.Array]:
    """Every learner's PPO inputs [N, B(+1), ...]: the decisions, then the selection answer if any."""
    batch = {name: getattr(decisions, name) for name in _PPO_FIELDS}
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
    settings: ChunkSettings,
    frozen: nnx.State,
    env: rollout.Environment,
    setup: rollout.LearnerSetup,
    learners: LearnerState,
) -> tuple[LearnerState, dict[str, jax.Array], dict[str, jax.Array]]:
    """K episodes of rollout + PPO update for all learners (pure; jit it).

    Returns:
        (learners after K episodes, decision metrics {name: [K, N, B]},
        update stats {name: [K, N]}).
    """
    gen_len = settings.sampling.gen_len
    trainable_one = jax.tree.map(lambda x: x[0], learners.trainable)
    prefix = rollout.reference_prefix(graphdef, frozen, trainable_one, env.prompts, gen_len)

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
        )
        batch = _ppo_batch(decisions)
        rows, tokens = rollout.flatten_learners((batch["prompt_row"], batch["tokens"]))
        ref = rollout.reference_logprobs(graphdef, frozen, trainable_one, prefix, rows, tokens)
        ref = ref.reshape(batch["logprobs"].shape)
        update = functools.partial(_update_one, graphdef, frozen, env.prompts, settings)
        learners, stats = jax.vmap(update)(learners, batch, ref, key_update)
        metrics = {name: getattr(decisions, name) for name in DECISION_METRICS} | decisions.named_rewards
        if decisions.selection is not None:
            learners = learners.replace(last_move=decisions.action[:, -1])
            metrics |= _selection_metrics(decisions.selection, settings.batch_size)
        return learners, (metrics, stats)

    learners, (metrics, stats) = jax.lax.scan(one_episode, learners, None, length=settings.num_episodes)
    return learners, metrics, stats


# ----------------------------------------------------------------------------
# The host loop.


def resolved_config(cfg: config_lib.ExperimentConfig) -> dict[str, Any]:
    """The validated config as plain JSON-able data (written to config.json).

    `conditions` is left out when empty (one condition, from reward and
    opponent), and `population` without a composition, so such workdirs read
    the same as before they existed.
    """
    resolved = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    if not resolved["conditions"]:
        del resolved["conditions"]
    if not resolved["population"]["composition"]:
        del resolved["population"]
    return resolved


def config_defaults(cfg: Any) -> dict[str, Any]:
    """The default of every config field that has one, nested like `resolved_config`."""
    defaults = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            defaults[field.name] = config_defaults(value)
        elif field.default is not dataclasses.MISSING:
            defaults[field.name] = json.loads(json.dumps(field.default, default=str))
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = json.loads(json.dumps(field.default_factory(), default=str))
    return defaults


def _with_new_defaults(existing: Any, resolved: Any, defaults: Any) -> Any:
    """`existing` plus every field it lacks that `resolved` holds at its default value.

    A field added to the config after a workdir was written (at its default,
    which is the behaviour the workdir's run had) does not make the workdir
    "another config".
    """
    if not (isinstance(existing, dict) and isinstance(resolved, dict) and isinstance(defaults, dict)):
        return existing
    filled = dict(existing)
    for key, value in resolved.items():
        if key not in existing:
            if key in defaults and defaults[key] == value:
                filled[key] = value
        else:
            filled[key] = _with_new_defaults(existing[key], value, defaults.get(key))
    return filled


def check_workdir(workdir: pathlib.Path, resolved: dict[str, Any], *, filename: str = "config.json",
                  holder: str = "a run", defaults: dict[str, Any] | None = None) -> None:
    """Refuses a workdir whose `filename` records another config.

    Fields missing from the recorded config count as equal when the new
    config holds them at their `defaults` (fields added since the workdir was
    written); the file is then rewritten with them by the run.

    Used for a run's config.json, a suite's suite.json and a sweep's plan.

    Raises:
        ValueError: naming the first differing fields, before anything is
            loaded, compiled or written.
    """
    existing_path = workdir / filename
    if not existing_path.is_file():
        return
    try:
        existing = json.loads(existing_path.read_text())
    except (ValueError, OSError) as error:
        raise ValueError(
            f"{existing_path} cannot be read ({error}); expected the JSON that {holder} writes there."
            f" Nothing was changed: if this workdir is yours and {holder} of this config, delete"
            f" {existing_path.name} to resume it, or use another --workdir.") from None
    existing = _with_new_defaults(existing, resolved, defaults or {})
    if existing == resolved:
        return

    def diff(a, b, prefix=""):
        keys = sorted(set(a) | set(b)) if isinstance(a, dict) and isinstance(b, dict) else None
        if keys is None:
            return [] if a == b else [f"{prefix[:-1]}: {a!r} there, {b!r} now"]
        return [d for k in keys for d in diff(a.get(k), b.get(k), f"{prefix}{k}.")]

    changes = diff(existing, resolved)
    raise ValueError(
        f"workdir {workdir} holds {holder} with a different config ({'; '.join(changes[:5])});"
        " nothing was changed. Use another --workdir, or the same config to resume."
    )


def model_directory(path: str) -> pathlib.Path:
    """The base model directory: `path`, or the built-in tiny model for ''."""
    if not path:
        from moraljax.llm import tiny

        return pathlib.Path(tiny.CHECKPOINT_DIR)
    directory = pathlib.Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"model.path={path!r} is not a directory; allowed: a local Hugging Face"
            " checkpoint directory (config.json, *.safetensors, tokenizer files) or ''"
            " for the built-in tiny model."
        )
    return directory


def _to_host(tree: Any) -> Any:
    """Arrays to numpy on every process (gathered across processes if needed)."""
    from jax.experimental import multihost_utils

    def get(x):
        if getattr(x, "is_fully_addressable", True):
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


@dataclasses.dataclass
class Run:
    """A built training run: what `train` needs between chunks.

    Built by `build_run` (loads the model, renders prompts, places state on
    the mesh); `run_chunks` advances it; tests use the pieces directly.
    """

    cfg: config_lib.ExperimentConfig
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    frozen: Any
    env: rollout.Environment
    setup: rollout.LearnerSetup
    learners: LearnerState
    sampling: rollout.SamplingSettings
    learner_info: list[dict[str, Any]]
    tokenizer: Any
    base_config: decoder.DecoderConfig
    _compiled: dict[int | str, Callable] = dataclasses.field(default_factory=dict)

    @property
    def num_real(self) -> int:
        """Learners of the experiment; the learner axis may hold inert padding after them."""
        return len(self.learner_info)

    @property
    def num_padding(self) -> int:
        """Inert learners appended so the learner axis fills every device of the data axis."""
        return int(self.setup.player.shape[0]) - self.num_real

    def real_learners(self) -> LearnerState:
        """The learner state without the inert padding (what checkpoints hold)."""
        if not self.num_padding:
            return self.learners
        if "real" not in self._compiled:  # Built once: a new jit per call would compile per checkpoint.
            # An uneven slice of the learner axis: replicated (only with padding).
            self._compiled["real"] = jax.jit(lambda tree: jax.tree.map(lambda x: x[:self.num_real], tree),
                                             out_shardings=sharding_lib.replicated(self.mesh))
        return self._compiled["real"](self.learners)

    def set_real_learners(self, real: LearnerState) -> None:
        """Puts restored real learners back in front of the current inert padding."""
        if not self.num_padding:
            self.learners = real
            return
        if "join" not in self._compiled:
            self._compiled["join"] = jax.jit(
                lambda a, b: jax.tree.map(lambda x, y: jnp.concatenate([x, y[self.num_real:]]), a, b),
                out_shardings=sharding_lib.learner_sharding(self.mesh))
        self.learners = self._compiled["join"](real, self.learners)

    def plan(self) -> str:
        """'5 learners (+3 inert) on 8 devices, 1 per device' for the start of a run."""
        data = self.mesh.shape[sharding_lib.DATA]
        total = self.num_real + self.num_padding
        padding = f" (+{self.num_padding} inert, for an even split)" if self.num_padding else ""
        return (f"{self.num_real} learners{padding} on a {dict(self.mesh.shape)} mesh of {self.mesh.size}"
                f" device(s), {total // data} per data shard")

    def chunk_settings(self, num_episodes: int) -> ChunkSettings:
        """Static settings of a chunk of `num_episodes` episodes."""
        return ChunkSettings(
            batch_size=self.cfg.run.batch_size,
            num_episodes=num_episodes,
            sampling=self.sampling,
            ppo=self.cfg.ppo,
            stochastic=self.cfg.lora.dropout > 0 or self.cfg.model.value_head_dropout > 0,
            population_size=len(self.cfg.population.members()),
            population_members=self.num_real if self.cfg.population.composition else 0,
            selection_candidates=self.cfg.population.candidates if self.cfg.population.selecting() else 0,
        )

    def chunk_fn(self, num_episodes: int) -> Callable:
        """The jitted chunk for `num_episodes` episodes (compiled once per K)."""
        if num_episodes not in self._compiled:
            settings = self.chunk_settings(num_episodes)
            learner_sh = sharding_lib.learner_sharding(self.mesh)
            output_sh = sharding_lib.chunk_output_sharding(self.mesh)
            self._compiled[num_episodes] = jax.jit(
                functools.partial(train_chunk, self.graphdef, settings),
                out_shardings=(learner_sh, output_sh, output_sh),
                donate_argnums=(3,),
            )
        return self._compiled[num_episodes]

    def advance(self, num_episodes: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Runs `num_episodes` episodes; returns host metrics [K, N, B] / [K, N] of the real learners."""
        fn = self.chunk_fn(num_episodes)
        self.learners, metrics, stats = fn(self.frozen, self.env, self.setup, self.learners)
        real = lambda tree: jax.tree.map(lambda x: x[:, :self.num_real], _to_host(tree))
        return real(metrics), real(stats)


def _learner_setups(condition: config_lib.Condition, num_episodes: int, first: int) -> list[rollout.LearnerSetup]:
    """The learners of one condition and seed: one, or an LLM-vs-LLM pair.

    Args:
        condition: reward (schedule) and opponent.
        num_episodes: run length, to check the switch episode.
        first: learner index of the first learner returned (pairs are
            adjacent: the partner of `first` is `first + 1`).
    """
    first_spec, second_spec = condition.reward.specs()
    switch = condition.reward.switch_episode if condition.reward.switch_to else np.iinfo(np.int32).max
    if condition.reward.switch_to and switch >= num_episodes:
        raise ValueError(
            f"reward.switch_episode={switch} is not below run.num_episodes={num_episodes};"
            " allowed: an episode inside the run."
        )
    players = condition.players
    return [
        rollout.LearnerSetup(
            opponent=jnp.asarray(opponents.opponent_id(condition.opponent), jnp.int32),
            partner=jnp.asarray(first + 1 - player if players == 2 else -1, jnp.int32),
            player=jnp.asarray(player, jnp.int32),
            reward_first=first_spec,
            reward_second=second_spec,
            switch_episode=jnp.asarray(switch, jnp.int32),
        )
        for player in range(players)
    ]


def _inert_setup(setup: rollout.LearnerSetup) -> rollout.LearnerSetup:
    """A padding learner: plays TFT alone with `setup`'s reward; nobody reads its results."""
    return setup.replace(opponent=jnp.asarray(opponents.opponent_id("tft"), jnp.int32),
                         partner=jnp.asarray(-1, jnp.int32), player=jnp.asarray(0, jnp.int32))


def _population_setups(cfg: config_lib.ExperimentConfig) -> tuple[list[rollout.LearnerSetup], list[dict[str, Any]]]:
    """Every member of every seed's population: seed-major, members in composition order.

    A member's reward is `cfg.reward` (xi, beta, illegal penalty, schedule)
    with its type as the name; its condition label is the type, so reports
    group members by type. Member m of seed s starts from the key an LLM
    pair's player m would (fold_in(PRNGKey(s), m) for m > 0).
    """
    setups, info = [], []
    for seed in cfg.run.seeds:
        for member, type_name in enumerate(cfg.population.members()):
            condition = config_lib.Condition(
                reward=dataclasses.replace(cfg.reward, name=type_name), opponent="llm")
            setup = _learner_setups(condition, cfg.run.num_episodes, len(setups))[0]
            setups.append(setup.replace(partner=jnp.asarray(-1, jnp.int32)))
            info.append({"learner": len(info), "seed": seed, "condition": type_name, "player": 0,
                         "opponent_is_llm": True, "member": member})
    return setups, info


def _with_selection_prompts(env: rollout.Environment, cfg: config_lib.ExperimentConfig, tokenizer,
                            gen_len: int) -> rollout.Environment:
    """`env` with the selection prompts after the game prompts, and the matcher of the members' names."""
    from moraljax import selection

    names = selection.member_names(cfg.population.name_prefix, len(cfg.population.members()))
    table, matcher = selection.build_selection_table(tokenizer, names, cfg.population.candidates,
                                                     cfg.prompt.actions, gen_len)
    game_rows = env.prompts.ids.shape[0]
    width = max(env.prompts.ids.shape[1], table.ids.shape[1])

    def left_pad(array, value):  # Every prompt still ends in the last column.
        return jnp.pad(array, ((0, 0), (width - array.shape[1], 0)), constant_values=value)

    ids = jnp.concatenate([left_pad(env.prompts.ids, tokenizer.pad_token_id),
                           left_pad(table.ids, tokenizer.pad_token_id)])
    mask = jnp.concatenate([left_pad(env.prompts.mask, 0), left_pad(table.mask, 0)])
    return env.replace(prompts=prompt_tables.PromptTable(ids=ids, mask=mask), selection_matcher=matcher,
                       selection_first_row=game_rows)


def build_run(
    cfg: config_lib.ExperimentConfig,
    *,
    devices=None,
    conditions: list[config_lib.Condition] | None = None,
) -> Run:
    """Loads the base model, renders the prompts and builds fresh learners.

    Learners are conditions x seeds (x 2 players against an LLM opponent),
    condition-major: by default `cfg.all_conditions()`; `conditions`
    overrides them (rewards, schedules and opponents are data on the learner
    axis, so any mix trains in one program). All validation that does not
    need the model happens before it is loaded.
    """
    if conditions is None:
        conditions = list(cfg.all_conditions())
    setups, info = [], []
    if cfg.population.composition:
        conditions = []  # A population's learners are its members.
        setups, info = _population_setups(cfg)
    for condition in conditions:
        for seed in cfg.run.seeds:
            for setup in _learner_setups(condition, cfg.run.num_episodes, len(setups)):
                info.append({"learner": len(setups), "seed": seed, "condition": condition.name,
                             "player": int(setup.player), "opponent_is_llm": condition.players == 2})
                setups.append(setup)
    mesh = sharding_lib.make_mesh(cfg.mesh, devices, len(setups))
    inert = _inert_setup(setups[0])
    setups += [inert] * (sharding_lib.padded_count(len(setups), mesh) - len(setups))
    directory = model_directory(cfg.model.path)
    from moraljax.llm import checkpoints  # Imports transformers: keep it late.

    policy, tokenizer, base_config = checkpoints.load_hf_checkpoint(
        directory,
        param_dtype=jnp.dtype(cfg.model.param_dtype),
        lora=cfg.lora,
        value_head_dropout=cfg.model.value_head_dropout,
        key=jax.random.PRNGKey(0),
        shardings=lambda name, shape: sharding_lib.weight_sharding(shape, mesh),
    )
    game = games.get_game(cfg.game.name)
    actions = cfg.prompt.actions
    gen_len = cfg.model.gen_len or action_matcher.action_token_length(tokenizer, actions)
    sides = [game, games.opponent_view(game)]  # Player 0 (M) and player 1.
    tables = [
        prompt_tables.build_prompt_table(
            tokenizer, np.asarray(side.payoffs), actions=actions, table_order=cfg.prompt.table_order
        )
        for side in sides
    ]
    stacked = prompt_tables.stack_prompt_tables(tables, tokenizer.pad_token_id)
    env = rollout.Environment(
        game=games.stack_games(sides),
        prompts=rollout.flatten_learners(stacked),  # [2, P, T] -> [2 * P, T]
        matcher=action_matcher.build_action_matcher(tokenizer, actions, gen_len),
    )
    if cfg.population.selecting():
        env = _with_selection_prompts(env, cfg, tokenizer, gen_len)
    setup = jax.tree.map(lambda *xs: jnp.stack(xs), *setups)
    policy.model.remat = decoder.remat_for(cfg.model.remat, policy.config.num_hidden_layers)
    graphdef, _, frozen = policy_lib.split_policy(policy)
    seed_players = [(i["seed"], i.get("member", i["player"])) for i in info]
    learners = init_learners(policy, seed_players + [(0, 0)] * (len(setups) - len(info)), cfg.ppo)
    if cfg.population.selecting():  # Nobody has played yet.
        learners = learners.replace(last_move=jnp.full((len(setups),), -1, jnp.int32))
    learner_sh = sharding_lib.learner_sharding(mesh)
    return Run(
        cfg=cfg,
        mesh=mesh,
        graphdef=graphdef,
        frozen=frozen,
        env=sharding_lib.put(env, sharding_lib.replicated(mesh)),
        setup=sharding_lib.put(setup, learner_sh),
        learners=sharding_lib.put(learners, learner_sh),
        sampling=rollout.SamplingSettings(
            gen_len=gen_len, temperature=cfg.model.temperature, top_k=cfg.model.top_k, top_p=cfg.model.top_p,
            dropout=cfg.lora.dropout > 0,  # TRL samples in train mode (rl/ppo.py).
        ),
        learner_info=info,
        tokenizer=tokenizer,
        base_config=base_config,
    )


def export_adapters(run: Run, directory: pathlib.Path, *, is_writer: bool) -> None:
    """Writes every learner's adapter in PEFT's format (llm/adapter_export.py).

    One directory per learner, `<condition>_seed<seed>[_player<p>]`, loadable
    with transformers + peft on the same base model.
    """
    from moraljax.llm import adapter_export

    trainable = _to_host(run.learners.trainable)
    if not is_writer:
        return
    base_name = run.cfg.model.path or "moraljax/llm/tiny/checkpoint"
    for n, info in enumerate(run.learner_info):
        name = f"{info['condition']}_seed{info['seed']}".replace(">", "")
        if "member" in info:
            name += f"_member{info['member']}"
        elif info["opponent_is_llm"]:
            name += f"_player{info['player']}"
        adapter_export.export_peft_adapter(
            jax.tree.map(lambda x: x[n], trainable),
            run.cfg.lora,
            directory / name,
            base_model_name_or_path=base_name,
            base_config=run.base_config,
        )


def _shares_text(metrics: dict[str, np.ndarray]) -> str:
    """'C 52% D 40% illegal 8%' over a chunk's decisions (for the progress bar)."""
    types = np.asarray(metrics["action_type"]).ravel()
    shares = metric_names.group_shares(np.bincount(types, minlength=metric_names.NUM_ACTION_TYPES) / types.size)
    return f"C {shares['cooperation']:.0%} D {shares['defection']:.0%} illegal {shares['illegal']:.0%}"


class NonFiniteError(ValueError):
    """Training produced NaN or infinite losses, advantages or parameters."""


@jax.jit
def _finite_per_learner(learners: LearnerState) -> jax.Array:
    """[N] bool: whether every trainable parameter and Adam moment of learner n is finite."""
    leaves = jax.tree.leaves((learners.trainable, learners.opt_state))
    checks = [jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
              for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)]
    return jnp.all(jnp.stack(checks), axis=0)


def check_finite(episodes: np.ndarray, stats: dict[str, np.ndarray], params_finite: np.ndarray,
                 learner_info: list[dict[str, Any]]) -> None:
    """Raises NonFiniteError naming the first bad episode and its learners.

    Args:
        episodes: [K] episode numbers of the chunk.
        stats: update statistics {name: [K, N]} (losses, advantages, KL, ...).
        params_finite: [N] whether each learner's parameters are finite after
            the chunk.
        learner_info: per learner, its seed and condition (for the message).
    """
    bad = np.zeros(np.shape(next(iter(stats.values()))), bool) if stats else None
    names = []
    for name, values in sorted(stats.items()):
        nonfinite = ~np.isfinite(np.asarray(values, np.float64))
        if nonfinite.any():
            names.append(name)
            bad |= nonfinite
    if names:
        k = int(np.argmax(bad.any(axis=1)))
        learners, where = np.flatnonzero(bad[k]), f"episode {int(episodes[k])}"
        what = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    elif not np.all(params_finite):
        learners, where = np.flatnonzero(~np.asarray(params_finite)), (
            f"episodes {int(episodes[0])}-{int(episodes[-1])}")
        what = "parameters"
    else:
        return
    who = ", ".join(f"{n} ({learner_info[n]['condition']} seed {learner_info[n]['seed']})"
                    for n in learners[:4]) + (", ..." if len(learners) > 4 else "")
    raise NonFiniteError(
        f"training diverged at {where}: non-finite {what} for learner(s) {who}; no checkpoint or"
        " adapter was written from it (the newest checkpoint is the last good one). Lower"
        " ppo.learning_rate or check the reward scale.")


def _any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (every process must stop together)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def train(cfg: config_lib.ExperimentConfig, workdir: str | pathlib.Path, *, progress: bool = True,
          stop_after: int | None = None, devices=None,
          checkpoint_dir: str | pathlib.Path | None = None) -> dict[str, Any] | None:
    """Trains (or resumes) a run in `workdir` and writes its outputs.

    The workdir is locked for the whole run (`moraljax.workdir`). Ctrl-C or
    SIGTERM stops it after the current chunk with a checkpoint
    (`interrupts.Stopped`); a chunk with non-finite losses or parameters stops
    it before anything is saved from that chunk (`NonFiniteError`).

    Args:
        cfg: the validated experiment.
        workdir: run directory: config.json, checkpoints/, metrics.csv, tb/,
            action_types.png, rewards.png, summary.json, summary.md.
        progress: show a progress bar with live action shares.
        stop_after: stop (with a checkpoint) once this many episodes are done,
            as if killed there; for tests of resumption.
        devices: devices of the mesh (default all, of every process).
        checkpoint_dir: where orbax keeps checkpoints (default
            workdir/checkpoints). With several hosts every process must see
            the same directory (a shared file system, or gs://...).

    Returns:
        The summary (process 0), or None (other processes, or stopped early).

    Raises:
        ValueError / FileNotFoundError: bad settings or a workdir holding a
            different run or in use by another process, before anything is
            loaded or written.
        NonFiniteError: training diverged.
        interrupts.Stopped: a stop was requested (after a checkpoint).
    """
    workdir = pathlib.Path(workdir)
    resolved = resolved_config(cfg)
    check_workdir(workdir, resolved, defaults=config_defaults(cfg))
    model_directory(cfg.model.path)
    is_writer = distributed.is_writer()
    with interrupts.stop_requests() as stop, contextlib.ExitStack() as held:
        # One process (the writer) holds the lock for the whole multi-process
        # job; the others learn whether it got it, so none waits for a peer
        # that was refused.
        refusal = None
        if is_writer:
            try:
                held.enter_context(workdir_lib.hold(workdir, purpose="training"))
            except workdir_lib.WorkdirError as error:
                refusal = error
        if _any_process(refusal is not None):
            raise refusal or workdir_lib.WorkdirError(
                f"workdir={str(workdir)!r} could not be locked by process 0; see its message.")
        return _train_locked(cfg, workdir, resolved, stop, progress=progress, stop_after=stop_after,
                             devices=devices, checkpoint_dir=checkpoint_dir)


def _train_locked(cfg: config_lib.ExperimentConfig, workdir: pathlib.Path, resolved: dict[str, Any],
                  stop: interrupts.StopRequests, *, progress: bool, stop_after: int | None, devices,
                  checkpoint_dir: str | pathlib.Path | None) -> dict[str, Any] | None:
    """`train`'s body, run while the workdir is held and stop requests are recorded."""
    from moraljax import checkpointing
    from moraljax import reporting

    is_writer = distributed.is_writer()
    started = time.time()
    run = build_run(cfg, devices=devices)
    say = print if (progress and is_writer) else (lambda *_: None)
    say(f"loaded {cfg.model.path or 'the built-in tiny model'} in {time.time() - started:.1f}s;"
        f" {run.plan()},"
        f" prompts of {run.env.prompts.ids.shape[1]} tokens, {run.sampling.gen_len} generated tokens")

    checkpointer = checkpointing.Checkpointer(checkpoint_dir or workdir / "checkpoints")
    report = print if is_writer else (lambda *_: None)
    # Hosts that each see their own local disk would resume from different
    # episodes and deadlock in the first collective; refuse instead.
    distributed.check_same_on_all_processes(
        checkpointer.latest_step() or 0, f"the episode to resume from in {checkpointer.directory}",
        "the checkpoint directory must be shared by every host (e.g. --checkpoint_dir=gs://bucket/run).")
    start, restored = checkpointer.restore_latest(run.real_learners(), is_writer=is_writer, say=report)
    if start:
        run.set_real_learners(restored)
        say(f"resumed from the checkpoint at episode {start} in {workdir}")
    checkpointer.prune()
    writer = reporting.RunWriter(
        workdir,
        run.learner_info,
        is_writer=is_writer,
        start_episode=start,
        opponent_is_llm=[info["opponent_is_llm"] for info in run.learner_info],
    )
    writer.save_config(resolved)
    population_writer = None
    if cfg.population.composition:
        from moraljax import population_report

        population_writer = population_report.PopulationWriter(workdir, run.learner_info, is_writer=is_writer,
                                                                start_episode=start)

    total = cfg.run.num_episodes if stop_after is None else min(stop_after, cfg.run.num_episodes)
    chunk = cfg.run.episodes_per_chunk
    every = cfg.run.checkpoint_every
    bar = None
    if progress and is_writer:
        import tqdm

        bar = tqdm.tqdm(total=cfg.run.num_episodes, initial=start, unit="episode", dynamic_ncols=True)
    episode = saved = start
    stopping = False
    try:
        while episode < total:
            count = min(chunk, total - episode)
            metrics, stats = run.advance(count)
            episodes = np.arange(episode, episode + count)
            # Before anything is written from the chunk: a diverged chunk leaves
            # no rows, no checkpoint and no adapters behind.
            check_finite(episodes, stats, _to_host(_finite_per_learner(run.learners))[:run.num_real],
                         run.learner_info)
            writer.write_chunk(episodes, metrics, stats)
            if population_writer is not None:
                population_writer.write_chunk(episodes, metrics)
            crossed = (episode + count) // every > episode // every
            episode += count
            if crossed or episode == total:
                checkpointer.save(episode, run.real_learners(), {"episode": episode})
                saved = episode
            if bar is not None:
                bar.update(count)
                bar.set_postfix_str(_shares_text(metrics))
            stopping = _any_process(stop.requested)  # After the save: a Ctrl-C during it counts.
            if stopping:
                if saved != episode:
                    checkpointer.save(episode, run.real_learners(), {"episode": episode})
                    saved = episode
                break
        if stopping and episode < cfg.run.num_episodes:
            raise interrupts.Stopped(
                stop.exit_status or interrupts.EXIT_STATUS[signal.SIGINT],
                f"stopped at episode {episode} of {cfg.run.num_episodes} (checkpoint at episode {saved} in"
                f" {checkpointer.directory}); run the same command again to resume.")
        finished = episode >= cfg.run.num_episodes
        if finished:
            export_adapters(run, workdir / "adapters", is_writer=is_writer)
        summary = writer.write_report() if finished else None
        if finished and population_writer is not None and is_writer:
            summary["population"] = population_report.write_population_report(workdir)
    finally:
        if bar is not None:
            bar.close()
        checkpointer.close()
        writer.close()
    say(f"ran {episode - start} episodes in {time.time() - started:.1f}s (compilation included)")
    return summary
