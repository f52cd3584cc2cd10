r"""The paper's whole run matrix (SPEC.md section 7), evaluated and reported.

    python -m moraljax.launch --config=configs/paper.py
    python -m moraljax.launch --config=configs/paper.py:episodes=200
    python -m moraljax.launch --config=configs/paper.py:model=/path/to/gemma-2-2b-it

Trains Game, De, Ut, Game+De, Game->De and Game->Ut (switch half way)
against TFT (program vs_tft: 30 learners, 5 decisions per episode) and
against a second learning LLM (program vs_llm: 60 learners in 30 pairs, 3
decisions per episode), five seeds each; each program is one compiled
training chunk. Then runs the generalisation suite (SPEC 8) on every
fine-tuned agent and the base model, and writes <workdir>/report.md
comparing every number with the paper's findings (SPEC 9). See
moraljax/paper.py.

Variants (ARG after ':'): model=tiny|<local model directory> (default: the
built-in tiny model, with config_lib.tiny_model_overrides), episodes=N
(default the paper's 1000; the unlearning switch is at N/2). Other settings:
--config.programs.vs_tft.run.seeds=..., --config.evaluation.games=... etc.

Measured (built-in tiny model, this 2-core CPU, default command): see
README.md ("The paper's run matrix") for the wall time and the findings.
"""

import dataclasses

import ml_collections

from moraljax import config_lib

PAPER_REWARDS = (
    ("game", ""),
    ("deont", ""),
    ("util", ""),
    ("game_deont", ""),
    ("game", "deont"),
    ("game", "util"),
)
OPPONENTS = {"vs_tft": "tft", "vs_llm": "llm"}


def get_config(arg=None):
    from moraljax.evaluation import protocol

    variant = config_lib.parse_variant(
        arg, defaults={"model": config_lib.TINY_MODEL, "episodes": "1000"}, allowed={"model": None, "episodes": None})
    episodes = variant["episodes"]
    if not episodes.isdigit() or int(episodes) < 2:
        raise ValueError(f"config variant episodes={episodes!r} is not allowed; expected an integer >= 2.")
    episodes = int(episodes)
    programs = {}
    for program, opponent in OPPONENTS.items():
        config = config_lib.experiment_config(f"opponent={opponent},model={variant['model']}", reward="game")
        config.run.num_episodes = episodes
        config.conditions = [
            {"reward": {"name": name, "switch_to": switch_to, "switch_episode": episodes // 2 if switch_to else 0},
             "opponent": opponent}
            for name, switch_to in PAPER_REWARDS
        ]
        programs[program] = config.to_dict()
    return ml_collections.ConfigDict(
        {"programs": programs, "evaluation": dataclasses.asdict(protocol.EvalSettings())}, type_safe=False)
