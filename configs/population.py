r"""A population of morally diverse LLM learners with random matching (issue 13; SPEC 10).

    python -m moraljax.launch --config=configs/population.py --workdir=runs/population
    python -m moraljax.launch --config=configs/population.py:population=UT --workdir=runs/population_ut
    python -m moraljax.launch --config=configs/population.py:population=ut_s,model=/path/to/gemma-2-2b-it

Every member is a learner (own LoRA, value head, optimiser, score normaliser)
over the one frozen base; each seed is one population; every episode the
members are paired by a fresh random perfect matching (drawn in jit) and
each pair plays 3 decisions of the IPD, each member seeing the prompt from
its own side as in LLM vs LLM. Types are reward names (moraljax/rewards.py).

Variants (ARG after ':'):
    population=S|UT|aUT|DE|mDE|VEe|VIe|VEk|Vagg  the AIES 2024 compositions:
        16 members, 8 of that type + 1 of each of the other 8 (default S);
    population=ut_s    4 Utilitarian + 4 Selfish;
    population=small   1 each of UT, S, VEk, Vagg (4 members);
    model=tiny|<local Gemma2 directory>  (default: the built-in tiny model,
        with config_lib.tiny_model_overrides);
    matching=random|selection  (default random). With selection every member
        names its partner among 2 candidates shown with their last moves
        (docs/POPULATIONS.md). On the tiny model the members are called
        action0, action1, ... (its answers are "action" + one digit, so at
        most 10 members: the default population is then `small`); on a real
        model agent0, agent1, ...
Defaults: 2 seeds, 1000 episodes of 3 decisions.

Outputs (besides the ordinary run's): action_types.png has one panel per
type (Figure 2 style), population.csv, who_played_whom.csv/png,
social_outcomes.csv/png, population_summary.json/md (95% CI over seeds).

Measured (tiny model, this 2-core CPU shared with other engineers' jobs, default
command: 16 members x 2 seeds = 32 learners, 1000 episodes): 3 min 42 s wall,
compilation included. Final 100 episodes, cooperation share per type (mean over
the 2 seeds): S 0.003, UT 0.998, aUT 0.000, DE 0.495 (one seed cooperates, the
other collapsed to always-illegal, the tiny model's failure mode described in
config_lib.tiny_model_overrides), mDE 0.387, VEe 0.103, VIe 0.990, VEk 0.997,
Vagg 0.002; collective payoff 70.9 +- 8.7 per episode, Gini 0.46, minimum
payoff 0.005. See README.md ("Populations").
"""

from moraljax import config_lib

# The AIES paper's nine types, by its short labels.
AIES_TYPES = {
    "S": "game", "UT": "util", "aUT": "anti_util", "DE": "deont", "mDE": "malicious_deont",
    "VEe": "virtue_equality", "VIe": "virtue_inequality", "VEk": "virtue_kindness",
    "Vagg": "virtue_aggressiveness",
}
SMALL_POPULATIONS = {
    "ut_s": "util:4,game:4",
    "small": "util:1,game:1,virtue_kindness:1,virtue_aggressiveness:1",
}


def composition(name: str) -> str:
    """The composition string of a variant (AIES majority type or a small one)."""
    if name in SMALL_POPULATIONS:
        return SMALL_POPULATIONS[name]
    majority = AIES_TYPES[name]
    return ",".join(f"{reward}:{8 if reward == majority else 1}" for reward in AIES_TYPES.values())


def get_config(arg=None):
    variant = config_lib.parse_variant(
        arg, defaults={"population": "", "model": config_lib.TINY_MODEL, "matching": "random"},
        allowed={"population": tuple(AIES_TYPES) + tuple(SMALL_POPULATIONS), "model": None,
                 "matching": config_lib.MATCHING_RULES})
    config = config_lib.experiment_config(f"model={variant['model']}", reward="game")
    config.opponent.name = "llm"
    tiny_selection = variant["matching"] == "selection" and variant["model"] == config_lib.TINY_MODEL
    population = variant["population"] or ("small" if tiny_selection else "S")
    config.population = {"composition": composition(population), "matching": variant["matching"]}
    if tiny_selection:
        config.population.name_prefix = "action"
    config.run.batch_size = 3
    config.run.seeds = (1, 2)
    config.run.num_episodes = 1000
    return config
