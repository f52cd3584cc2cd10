r"""Iterated prisoner's dilemma, Game (selfish) reward.

    python -m moraljax.launch --config=configs/ipd_game.py
    python -m moraljax.launch --config=configs/ipd_game.py:opponent=ad
    python -m moraljax.launch --config=configs/ipd_game.py:model=/path/to/gemma-2-2b-it

Variants (ARG after ':'), defaults and the tiny model's settings: see
moraljax.config_lib.experiment_config.

Paper's finding (SPEC 9): converges to almost pure D|D vs TFT (defection >= 95% of decisions).
Measured (tiny model, this 2-core CPU, default command): 51 s; defection 0.995 (every seed
>= 0.988), D|D 0.794, illegal 0.003 over the last 100 episodes.
See README.md ("Results").
"""

from moraljax import config_lib


def get_config(arg=None):
    return config_lib.experiment_config(arg, reward="game")
