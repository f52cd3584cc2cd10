"""A training run built from its config: model, prompts, learner plan, mesh and learner state.

`build_run` loads the base model, renders the prompts, lays the learners
(conditions x seeds x players, or population members) on the mesh and
returns a `Run`: what the host loop (train.py) needs between chunks. The
learner state is created last, sharded, either fresh (`Run.start_fresh`) or
from a checkpoint restored into `Run.learner_template` (`Run.resume`); it
is never initialised only to be overwritten.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moraljax import action_matcher
from moraljax import chunk as chunk_lib
from moraljax import config_lib
from moraljax import games
from moraljax import opponents
from moraljax import prompt_tables
from moraljax import sharding as sharding_lib
from moraljax.llm import decoder
from moraljax.llm import policy as policy_lib
from moraljax.rl import rollout


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


def to_host(tree: Any) -> Any:
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

    Built by `build_run` (loads the model, renders prompts, places the
    conditions on the mesh); `start_fresh` or `resume` creates the learner
    state; `run_chunk` advances it; tests use the pieces directly.
    """

    cfg: config_lib.ExperimentConfig
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    reference_graphdef: nnx.GraphDef
    frozen: Any
    trainable_template: Any
    env: rollout.Environment
    setup: rollout.LearnerSetup
    sampling_settings: rollout.SamplingSettings
    learner_info: list[dict[str, Any]]
    tokenizer: Any
    base_config: decoder.DecoderConfig
    learners: chunk_lib.LearnerState | None = None
    _compiled: dict[int | str, Callable] = dataclasses.field(default_factory=dict)

    @property
    def num_real(self) -> int:
        """Learners of the experiment; the learner axis may hold inert padding after them."""
        return len(self.learner_info)

    @property
    def num_padding(self) -> int:
        """Inert learners appended so the learner axis fills every device of the data axis."""
        return int(self.setup.player.shape[0]) - self.num_real

    def _seed_players(self) -> list[tuple[int, int]]:
        """(seed, player or member) of every learner of the axis; the inert padding's are (0, 0)."""
        real = [(info["seed"], info.get("member", info["player"])) for info in self.learner_info]
        return real + [(0, 0)] * self.num_padding

    def learner_template(self) -> chunk_lib.LearnerState:
        """The abstract state of the real learners, with shardings: what a checkpoint restores into."""
        return learner_template(self.cfg, self.trainable_template, self.num_real, self.mesh)

    def _init(self, seed_players: list[tuple[int, int]], sharding) -> chunk_lib.LearnerState:
        return chunk_lib.init_learners(self.trainable_template, seed_players, self.cfg.ppo, sharding,
                                       selecting=self.cfg.population.selecting())

    def start_fresh(self) -> None:
        """Creates every learner fresh, sharded over the data axis."""
        self.learners = self._init(self._seed_players(), sharding_lib.learner_sharding(self.mesh))

    def resume(self, real: chunk_lib.LearnerState) -> None:
        """Takes restored real learners, with fresh inert padding after them."""
        if not self.num_padding:
            self.learners = real
            return
        padding = self._init(self._seed_players()[self.num_real:], sharding_lib.replicated(self.mesh))
        if "join" not in self._compiled:
            self._compiled["join"] = jax.jit(
                lambda a, b: jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b),
                out_shardings=sharding_lib.learner_sharding(self.mesh))
        self.learners = self._compiled["join"](real, padding)

    def real_learners(self) -> chunk_lib.LearnerState:
        """The learner state without the inert padding (what checkpoints hold)."""
        if not self.num_padding:
            return self.learners
        if "real" not in self._compiled:  # Built once: a new jit per call would compile per checkpoint.
            self._compiled["real"] = jax.jit(lambda tree: jax.tree.map(lambda x: x[:self.num_real], tree),
                                             out_shardings=sharding_lib.learners_sharding(self.num_real, self.mesh))
        return self._compiled["real"](self.learners)

    def plan(self) -> str:
        """'5 learners (+3 inert) on 8 devices, 1 per device' for the start of a run."""
        data = self.mesh.shape[sharding_lib.DATA]
        total = self.num_real + self.num_padding
        padding = f" (+{self.num_padding} inert, for an even split)" if self.num_padding else ""
        return (f"{self.num_real} learners{padding} on a {dict(self.mesh.shape)} mesh of {self.mesh.size}"
                f" device(s), {total // data} per data shard")

    def chunk_settings(self, num_episodes: int) -> chunk_lib.ChunkSettings:
        """Static settings of a chunk of `num_episodes` episodes."""
        return chunk_lib.ChunkSettings(
            batch_size=self.cfg.run.batch_size,
            num_episodes=num_episodes,
            sampling=self.sampling_settings,
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
                functools.partial(chunk_lib.train_chunk, self.graphdef, self.reference_graphdef, settings),
                out_shardings=(learner_sh, output_sh, output_sh),
                donate_argnums=(3,),
            )
        return self._compiled[num_episodes]

    def run_chunk(self, num_episodes: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Runs `num_episodes` episodes; returns host metrics [K, N, B] / [K, N] of the real learners."""
        fn = self.chunk_fn(num_episodes)
        self.learners, metrics, stats = fn(self.frozen, self.env, self.setup, self.learners)
        real = lambda tree: jax.tree.map(lambda x: x[:, :self.num_real], to_host(tree))
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
            named_specs=condition.reward.named_specs(),
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


def learner_template(cfg: config_lib.ExperimentConfig, trainable_template: Any, count: int,
                     mesh: jax.sharding.Mesh) -> chunk_lib.LearnerState:
    """The abstract state of `count` learners of `cfg` on `mesh` (`sharding.learners_sharding`)."""
    return chunk_lib.learner_template(trainable_template, count, cfg.ppo, sharding_lib.learners_sharding(count, mesh),
                                      selecting=cfg.population.selecting())


def learner_plan(cfg: config_lib.ExperimentConfig, conditions: list[config_lib.Condition] | None = None
                 ) -> tuple[list[rollout.LearnerSetup], list[dict[str, Any]]]:
    """Every learner's condition and its description, without the model.

    Learners are conditions x seeds (x 2 players against an LLM opponent),
    condition-major: by default `cfg.all_conditions()`; `conditions`
    overrides them. With a population composition the learners are its
    members instead.

    Returns:
        (setups, info): a `rollout.LearnerSetup` per learner, and per learner
        {"learner", "seed", "condition", "player", "opponent_is_llm"
        (, "member")}.
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
    return setups, info


def load_model(cfg: config_lib.ExperimentConfig, mesh: jax.sharding.Mesh
               ) -> tuple[policy_lib.Policy, Any, decoder.DecoderConfig]:
    """The base model of `cfg.model` with the run's adapters, its weights placed on `mesh`.

    Returns:
        (policy with `cfg.model.remat` set, tokenizer, the checkpoint's config).
    """
    from moraljax.llm import checkpoints  # Imports transformers: keep it late.

    policy, tokenizer, base_config = checkpoints.load_hf_checkpoint(
        model_directory(cfg.model.path),
        param_dtype=jnp.dtype(cfg.model.param_dtype),
        lora=cfg.lora,
        value_head_dropout=cfg.model.value_head_dropout,
        key=jax.random.PRNGKey(0),
        shardings=lambda name, shape: sharding_lib.weight_sharding(shape, mesh),
    )
    policy.model.remat = decoder.remat_for(cfg.model.remat, policy.config.num_hidden_layers)
    return policy, tokenizer, base_config


def build_environment(cfg: config_lib.ExperimentConfig, tokenizer, gen_len: int) -> rollout.Environment:
    """The game from both sides, every prompt of both players and the action parser."""
    game = games.get_game(cfg.game.name)
    actions = cfg.prompt.actions
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
    return env


def build_run(
    cfg: config_lib.ExperimentConfig,
    *,
    devices=None,
    conditions: list[config_lib.Condition] | None = None,
) -> Run:
    """Loads the base model, renders the prompts and lays the learners on the mesh.

    The learners are `learner_plan(cfg, conditions)` (rewards, schedules and
    opponents are data on the learner axis, so any mix trains in one
    program), padded with inert learners to fill the data axis. Their state
    is created by `Run.start_fresh` or `Run.resume`. All validation that
    does not need the model happens before it is loaded.
    """
    setups, info = learner_plan(cfg, conditions)
    mesh = sharding_lib.make_mesh(cfg.mesh, devices, len(setups))
    setups += [_inert_setup(setups[0])] * (sharding_lib.padded_count(len(setups), mesh) - len(setups))
    policy, tokenizer, base_config = load_model(cfg, mesh)
    gen_len = cfg.model.gen_len or action_matcher.action_token_length(tokenizer, cfg.prompt.actions)
    env = build_environment(cfg, tokenizer, gen_len)
    graphdef, trainable, frozen = policy_lib.split_policy(policy)
    return Run(
        cfg=cfg,
        mesh=mesh,
        graphdef=graphdef,
        reference_graphdef=policy_lib.reference_graphdef(policy),
        frozen=frozen,
        trainable_template=jax.eval_shape(lambda: trainable),
        env=sharding_lib.put(env, sharding_lib.replicated(mesh)),
        setup=sharding_lib.put(jax.tree.map(lambda *xs: jnp.stack(xs), *setups), sharding_lib.learner_sharding(mesh)),
        sampling_settings=rollout.SamplingSettings(
            gen_len=gen_len, temperature=cfg.model.temperature, top_k=cfg.model.top_k, top_p=cfg.model.top_p,
            dropout=cfg.lora.dropout > 0,  # TRL samples in train mode (rl/ppo.py).
        ),
        learner_info=info,
        tokenizer=tokenizer,
        base_config=base_config,
    )
