"""Experiment settings: ConfigDict at the boundary, frozen dataclasses inside.

A config file (configs/*.py) returns an `ml_collections.ConfigDict`; the
launcher turns it into an `ExperimentConfig` once, with every field validated
in `__post_init__` so that bad input fails with a message naming the field,
the value and what is allowed, before any model is loaded or compiled.
Library functions take these dataclasses (or plain arguments), never the
ConfigDict itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections

from moraljax import games
from moraljax import opponents
from moraljax import prompts
from moraljax import rewards
from moraljax import validation
from moraljax.llm import decoder_config


@dataclasses.dataclass(frozen=True)
class GameSettings:
    """Which matrix game is played (a name from games.GAME_NAMES)."""

    name: str = "IPD"

    def __post_init__(self):
        validation.check_choice("game", self.name, games.GAME_NAMES)


@dataclasses.dataclass(frozen=True)
class OpponentSettings:
    """Who the agent plays: a fixed strategy or another learning LLM."""

    name: str = "tft"

    def __post_init__(self):
        validation.check_choice("opponent", self.name, opponents.OPPONENT_NAMES)


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    """The intrinsic reward and its optional unlearning switch (SPEC 2, 5).

    Attributes:
        name: reward for episodes [0, switch_episode).
        switch_to: reward from `switch_episode` on ('' = no switch).
        switch_episode: episode at which `switch_to` takes over.
        xi: deontological penalty in training (paper: 3).
        illegal_penalty: reward for an illegal answer (paper: -6).
        paper_opponent_illegal: the authors' rewards when an LLM opponent answers
            illegally (SPEC 5); False uses the opponent's last legal move always.
        beta: virtue_mixed's weight on equality (SPEC 10); unused by other rewards.
    """

    name: str = "util"
    switch_to: str = ""
    switch_episode: int = 0
    xi: float = rewards.TRAINING_XI
    illegal_penalty: float = rewards.ILLEGAL_PENALTY
    paper_opponent_illegal: bool = True
    beta: float = rewards.VIRTUE_MIXED_BETA

    def __post_init__(self):
        validation.check_choice("reward.name", self.name, rewards.REWARD_NAMES)
        if self.switch_to:
            validation.check_choice("reward.switch_to", self.switch_to, rewards.REWARD_NAMES)
            validation.check_positive_int("reward.switch_episode", self.switch_episode)
        validation.check_finite("reward.xi", self.xi)
        validation.check_finite("reward.illegal_penalty", self.illegal_penalty)
        validation.check_finite("reward.beta", self.beta)
        if self.xi == 0 and "virtue_mixed" in (self.name, self.switch_to):
            validation.fail("reward.xi", self.xi, "a nonzero number with virtue_mixed (it divides kindness)")

    def specs(self) -> tuple[rewards.RewardSpec, rewards.RewardSpec]:
        """The reward before and after the switch (the same when no switch)."""
        make = lambda name: rewards.reward_spec(
                name,
                xi=self.xi,
                illegal_penalty=self.illegal_penalty,
                paper_opponent_illegal=self.paper_opponent_illegal,
                beta=self.beta,
        )
        first = make(self.name)
        return first, make(self.switch_to) if self.switch_to else first

    def named_specs(self) -> rewards.RewardSpec:
        """Every named reward with these settings (xi, illegal penalty, beta), for the metrics."""
        return rewards.named_reward_specs(xi=self.xi, illegal_penalty=self.illegal_penalty,
                                          paper_opponent_illegal=self.paper_opponent_illegal, beta=self.beta)


@dataclasses.dataclass(frozen=True)
class Condition:
    """One experimental condition: a reward (schedule) against an opponent."""

    reward: RewardSettings
    opponent: str

    def __post_init__(self):
        validation.check_choice("opponent", self.opponent, opponents.OPPONENT_NAMES)

    @property
    def players(self) -> int:
        """Learners per seed: 2 against a learning LLM (a pair), else 1."""
        return 2 if self.opponent == "llm" else 1

    @property
    def name(self) -> str:
        """A readable label, e.g. 'util_vs_tft' or 'game->deont_vs_tft'."""
        reward = self.reward
        label = f"{reward.name}->{reward.switch_to}" if reward.switch_to else reward.name
        return f"{label}_vs_{self.opponent}"


MATCHING_RULES = ("random", "selection")
# Most selection prompts a population may need (population.candidates, SPEC 10).
MAX_SELECTION_PROMPTS = 4096


def parse_composition(text: str) -> tuple[tuple[str, int], ...]:
    """"util:4,game:4" -> (("util", 4), ("game", 4)), or a one-line error."""
    allowed = ("'type:count,...' with types from " + ", ".join(rewards.REWARD_NAMES)
               + ", each once, counts >= 1 and an even total >= 2")
    if not isinstance(text, str):
        validation.fail("population.composition", text, allowed)
    parts = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, count = (piece.strip() for piece in item.partition(":"))
        if not sep or name not in rewards.REWARD_NAMES or not count.isdigit() or int(count) < 1:
            validation.fail("population.composition", text, allowed)
        parts.append((name, int(count)))
    names = [name for name, _ in parts]
    total = sum(count for _, count in parts)
    if len(set(names)) != len(names) or total < 2 or total % 2:
        validation.fail("population.composition", text, allowed)
    return tuple(parts)


@dataclasses.dataclass(frozen=True)
class PopulationSettings:
    """A population of learners with moral types (issue 13; SPEC 10).

    Attributes:
        composition: "type:count,..." (types are reward names), e.g.
            "util:4,game:4"; '' = no population (the paper's experiments).
            Every member is a learner (own LoRA, value head, optimiser, score
            normaliser) over the one frozen base; each seed is one population.
        matching: how members are paired each episode: "random" (a fresh
            random perfect matching drawn in jit) or "selection" (every
            member names a partner among `candidates` shown to it, docs/
            POPULATIONS.md).
        candidates: with "selection", how many other members (k) each
            selector is shown, each with its last move.
        name_prefix: with "selection", member m is called f"{prefix}{m}" in
            the selection prompt and answers with such a name; every name
            must fit in the answer's gen_len tokens.
    """

    composition: str = ""
    matching: str = "random"
    candidates: int = 2
    name_prefix: str = "agent"

    def __post_init__(self):
        if self.composition:
            parse_composition(self.composition)
        validation.check_choice("population.matching", self.matching, MATCHING_RULES)
        validation.check_positive_int("population.candidates", self.candidates)
        if not isinstance(self.name_prefix, str) or self.name_prefix != self.name_prefix.strip():
            validation.fail("population.name_prefix", self.name_prefix, "a string without leading or trailing blanks")
        size = len(self.members())
        if self.selecting() and not 1 <= self.candidates <= size - 1:
            validation.fail("population.candidates", self.candidates, f"1 .. {size - 1} (the other members)")
        if self.selecting() and (3 * size) ** self.candidates > MAX_SELECTION_PROMPTS:
            validation.fail("population.candidates", self.candidates,
                 f"(3 x members)^candidates <= {MAX_SELECTION_PROMPTS} selection prompts")

    def selecting(self) -> bool:
        """Whether members choose their partners (matching "selection")."""
        return bool(self.composition) and self.matching == "selection"

    def members(self) -> tuple[str, ...]:
        """The type (reward name) of every member, in composition order."""
        if not self.composition:
            return ()
        return tuple(name for name, count in parse_composition(self.composition) for _ in range(count))


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    """The structured prompt's action strings and table order (SPEC 4, 8)."""

    actions: tuple[str, str] = prompts.TRAIN_ACTIONS
    table_order: str = "original"

    def __post_init__(self):
        object.__setattr__(self, "actions", validation.check_action_pair("prompt.actions", self.actions))
        validation.check_choice("prompt.table_order", self.table_order, prompts.TABLE_ORDERS)


def to_plain(config: ml_collections.ConfigDict | dict) -> dict:
    """ConfigDict (nested) -> plain dict of Python values."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    return {
            k: to_plain(v) if isinstance(v, (dict, ml_collections.ConfigDict)) else v
            for k, v in config.items()
    }


PARAM_DTYPES = ("float32", "bfloat16")


def check_sampling(prefix: str, temperature: Any, top_k: Any, top_p: Any) -> None:
    """Refuses sampling settings the sampler cannot use (training and evaluation alike).

    Args:
        prefix: written before the field names, e.g. "model.".
        temperature: must be a finite number > 0.
        top_k: an integer >= 0 (0 = off).
        top_p: a number in (0, 1] (1 = off).
    """
    validation.check_positive(prefix + "temperature", temperature)
    validation.check_int(prefix + "top_k", top_k, 0)
    validation.check_number(prefix + "top_p", top_p, low=0, high=1, low_open=True)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The base LLM and how it samples (SPEC 4, 6).

    Attributes:
        path: a local Hugging Face directory of a supported family (Gemma 2,
            Gemma 3 text, Llama 3.x, Qwen2.5, Qwen3); '' = the built-in tiny
            model (moraljax/llm/tiny), which needs no download.
        param_dtype: dtype of the frozen base weights.
        temperature, top_k, top_p: sampling (paper: 1, 0 = off, 1 = off).
        gen_len: tokens generated per decision; 0 = the token length of the
            action strings (paper: exactly that, 2 for Gemma-2).
        value_head_dropout: dropout on the value head input (TRL's
            ValueHead default 0.1). As in TRL 0.9.x it acts only in an update
            forward with ppo.dropout_in_update=True (docs/PPO_SEMANTICS.md).
        remat: how each decoder layer is rematerialised in the update's
            backward pass: none, dots (keep matmul outputs), full (keep the
            layer input only), or auto (none for models of <= 4 layers, such
            as the built-in one; dots for deeper ones). See README "Real scale".
    """

    path: str = ""
    param_dtype: str = "float32"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    gen_len: int = 0
    value_head_dropout: float = 0.1
    remat: str = "auto"

    def __post_init__(self):
        validation.check_choice("model.param_dtype", self.param_dtype, PARAM_DTYPES)
        validation.check_choice("model.remat", self.remat, decoder_config.REMAT_CHOICES)
        check_sampling("model.", self.temperature, self.top_k, self.top_p)
        validation.check_int("model.gen_len", self.gen_len, 0)
        validation.check_number("model.value_head_dropout", self.value_head_dropout, low=0, high=1, high_open=True)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How long, how many seeds, and how the host loop is chunked.

    Attributes:
        batch_size: decisions per episode = samples per PPO update (paper: 5
            against fixed opponents, 3 LLM vs LLM).
        num_episodes: episodes per run (paper: 1000).
        seeds: one learner (run) per seed (paper: 1, 2, 3, 5, 6).
        episodes_per_chunk: episodes per compiled call; metrics are written
            after each chunk.
        checkpoint_every: save a checkpoint at the first chunk end at or
            past each multiple of this many episodes (and at the end).
    """

    batch_size: int = 5
    num_episodes: int = 1000
    seeds: tuple[int, ...] = (1, 2, 3, 5, 6)
    episodes_per_chunk: int = 50
    checkpoint_every: int = 100

    def __post_init__(self):
        validation.check_positive_int("run.batch_size", self.batch_size)
        validation.check_positive_int("run.num_episodes", self.num_episodes)
        validation.check_positive_int("run.episodes_per_chunk", self.episodes_per_chunk)
        validation.check_positive_int("run.checkpoint_every", self.checkpoint_every)
        seeds = tuple(self.seeds) if isinstance(self.seeds, (list, tuple)) else self.seeds
        if not isinstance(seeds, tuple) or not seeds:
            validation.fail("run.seeds", self.seeds, "a non-empty list of integers")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
            validation.fail("run.seeds", self.seeds, "integers >= 0")
        if len(set(seeds)) != len(seeds):
            validation.fail("run.seeds", self.seeds, "distinct integers")
        object.__setattr__(self, "seeds", seeds)


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """Device mesh: `data` shards learners, `model` shards base weights.

    -1 for `data` means every device not used by `model`, or the largest
    part of them that splits the learners evenly.
    """

    data: int = -1
    model: int = 1

    def __post_init__(self):
        if isinstance(self.data, bool) or not isinstance(self.data, int) or (
            self.data < 1 and self.data != -1
        ):
            validation.fail("mesh.data", self.data, "a positive integer or -1 (all devices)")
        validation.check_positive_int("mesh.model", self.model)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run needs, validated.

    `conditions` trains several conditions (rewards, schedules, opponents) in
    one program, each with every seed. Empty means one condition, made of
    `reward` and `opponent`; when `conditions` is given those two are unused.
    """

    game: GameSettings
    opponent: OpponentSettings
    reward: RewardSettings
    prompt: PromptSettings
    model: ModelSettings
    lora: Any  # moraljax.llm.lora.LoraConfig
    ppo: Any  # moraljax.rl.ppo_settings.PPOConfig
    run: RunSettings
    mesh: MeshSettings
    conditions: tuple[Condition, ...] = ()
    population: PopulationSettings = PopulationSettings()

    def __post_init__(self):
        self.ppo.mini_batch_size(self.run.batch_size)  # raises if it does not divide
        if self.population.selecting() and (self.run.batch_size + 1) % self.ppo.num_minibatches:
            validation.fail("ppo.num_minibatches", self.ppo.num_minibatches,
                 f"a divisor of run.batch_size + 1 = {self.run.batch_size + 1} with matching=selection"
                 " (the selection is one more response per episode)")
        if self.population.composition and self.conditions:
            validation.fail("conditions", [c.name for c in self.conditions],
                 "none with population.composition (a population's conditions are its types)")
        names = [condition.name for condition in self.all_conditions()]
        if len(set(names)) != len(names):
            validation.fail("conditions", names, "distinct conditions (reward schedule and opponent)")

    def all_conditions(self) -> tuple[Condition, ...]:
        """The conditions trained: `conditions`, or the one of reward/opponent."""
        return self.conditions or (Condition(reward=self.reward, opponent=self.opponent.name),)


def _conditions_from(values: Any) -> tuple[Condition, ...]:
    """Parses the `conditions` section: [{"reward": {...} | name, "opponent": name}, ...]."""
    if not isinstance(values, (list, tuple)):
        validation.fail("conditions", values, "a list of {reward: ..., opponent: ...} entries")
    conditions = []
    for index, item in enumerate(values):
        prefix = f"conditions[{index}]."
        if not isinstance(item, dict) or set(item) != {"reward", "opponent"}:
            validation.fail(f"conditions[{index}]", item, "a dict with exactly the keys reward and opponent")
        reward = item["reward"]
        if isinstance(reward, str):
            reward = {"name": reward}
        conditions.append(Condition(
            reward=validation.settings_from_dict(RewardSettings, reward, prefix=prefix + "reward.",
                                                 what="a field of reward"),
            opponent=item["opponent"]))
    return tuple(conditions)


def experiment_from_config_dict(config: ml_collections.ConfigDict | dict) -> ExperimentConfig:
    """Validates a ConfigDict and turns it into an `ExperimentConfig`.

    Raises:
        ValueError: naming the first field that is missing, unknown or wrong.
    """
    from moraljax.llm import lora as lora_lib  # Heavy imports kept local.
    from moraljax.rl import ppo_settings

    values = to_plain(config)
    sections = {
        "game": GameSettings,
        "opponent": OpponentSettings,
        "reward": RewardSettings,
        "prompt": PromptSettings,
        "model": ModelSettings,
        "lora": lora_lib.LoraConfig,
        "ppo": ppo_settings.PPOConfig,
        "run": RunSettings,
        "mesh": MeshSettings,
        "population": PopulationSettings,
    }
    unknown = sorted(set(values) - set(sections) - {"conditions"})
    if unknown:
        allowed = ", ".join(sorted(sections) + ["conditions"])
        validation.fail(unknown[0], values[unknown[0]], f"a config section: {allowed}")
    built = {}
    for name, cls in sections.items():
        section = values.get(name, {})
        if isinstance(section, str):  # `config.game = "IPD"` shorthand.
            section = {"name": section}
        built[name] = validation.settings_from_dict(cls, section, prefix=f"{name}.", what=f"a field of {name}")
    return ExperimentConfig(**built, conditions=_conditions_from(values.get("conditions", ())))


def parse_variant(arg: str | None, defaults: dict[str, str],
                  allowed: dict[str, Sequence[str] | None]) -> dict[str, str]:
    """Parses a config argument like "opponent=ad,model=/path/to/gemma".

    Args:
        arg: the text after ':' in --config=file.py:ARG (None or '' = defaults).
        defaults: value of every key when not given.
        allowed: for each key, its allowed values, or None for free text.

    Returns:
        A dict with every key of `defaults`.

    Raises:
        ValueError: for an unknown key, a malformed item or a value not allowed.
    """
    result = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in allowed:
            raise ValueError(
                f"unknown config variant {item!r}; allowed: "
                + ", ".join(f"{k}=" + ("|".join(v) if v else "...") for k, v in allowed.items())
            )
        if allowed[key] is not None and value not in allowed[key]:
            validation.fail(f"config variant {key}", value, "one of " + ", ".join(allowed[key]))
        result[key] = value
    return result


# ----------------------------------------------------------------------------
# Shared config builders for configs/*.py.

TINY_MODEL = "tiny"


def tiny_model_overrides(config: ml_collections.ConfigDict) -> None:
    """Sets the built-in tiny model's hyperparameters on an experiment config, in place.

    LoRA rank 8 (alpha 16), no LoRA or value-head dropout, PPO learning rate
    1e-3 and an initial KL coefficient of 0.05 instead of the paper's values,
    which suit a 2B model; docs/ARCHITECTURE.md ("The tiny model's
    hyperparameters") records why these values and what the others did.

    Args:
        config: a ConfigDict with the sections of `ExperimentConfig`.
    """
    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.lora.dropout = 0.0
    config.model.value_head_dropout = 0.0
    config.ppo.learning_rate = 1e-3
    config.ppo.init_kl_coef = 0.05


def experiment_config(
    arg: str | None,
    *,
    reward: str,
    switch_to: str = "",
    switch_episode: int = 0,
) -> ml_collections.ConfigDict:
    """The paper's experiment (SPEC 6, 7) as a ConfigDict, with variants.

    What every configs/ipd_*.py builds. Variants (the config's ARG after
    ':'): opponent=tft|ac|ad|random|llm (default tft; llm: a second learner
    of the same condition, 3 decisions per episode), model=tiny|<local
    model directory> (default: the built-in tiny model). Defaults are the
    paper's: 1000 episodes of 5 decisions, seeds 1, 2, 3, 5, 6, LoRA
    r64/alpha 32, PPO lr 1.41e-5, adaptive KL from beta 0.2, bf16 base
    weights. With the tiny model `tiny_model_overrides` applies (LoRA r8,
    lr 1e-3, beta 0.05, no dropout) and explains why.

    Args:
        arg: "opponent=tft|ac|ad|random|llm,model=tiny|/path/to/model" (any
            supported family, e.g. gemma-2-2b-it, Llama-3.2-1B-Instruct).
            Against "llm" (a second learner, SPEC 3) an episode has 3
            decisions, as in the paper.
        reward: training reward name (rewards.REWARD_NAMES).
        switch_to: second reward for unlearning ('' = none).
        switch_episode: episode of the switch.

    Returns:
        A ConfigDict whose fields mirror `ExperimentConfig`.
    """
    from moraljax.llm import lora as lora_lib
    from moraljax.rl import ppo_settings

    variant = parse_variant(
        arg,
        defaults={"opponent": "tft", "model": TINY_MODEL},
        allowed={"opponent": opponents.OPPONENT_NAMES, "model": None},
    )
    config = ml_collections.ConfigDict()
    config.game = dataclasses.asdict(GameSettings())
    config.opponent = {"name": variant["opponent"]}
    config.reward = dataclasses.asdict(
        RewardSettings(name=reward, switch_to=switch_to, switch_episode=switch_episode)
    )
    config.prompt = dataclasses.asdict(PromptSettings())
    config.model = dataclasses.asdict(ModelSettings())
    config.lora = dataclasses.asdict(lora_lib.LoraConfig())
    config.ppo = ml_collections.ConfigDict(
        {f.name: getattr(ppo_settings.PPOConfig(), f.name) for f in dataclasses.fields(ppo_settings.PPOConfig)},
        type_safe=False,
    )
    config.run = dataclasses.asdict(RunSettings())
    config.mesh = dataclasses.asdict(MeshSettings())
    if variant["opponent"] == "llm":
        config.run.batch_size = 3
    config = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    if variant["model"] == TINY_MODEL:
        tiny_model_overrides(config)
    else:
        config.model.path = variant["model"]
        config.model.param_dtype = "bfloat16"
    return config
