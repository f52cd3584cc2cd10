r"""Iterated prisoner's dilemma, Game (selfish) reward.

    python -m moraljax.launch --config=configs/ipd_game.py
    python -m moraljax.launch --config=configs/ipd_game.py:opponent=ad
    python -m moraljax.launch --config=configs/ipd_game.py:model=/path/to/gemma-2-2b-it

Variants (ARG after ':'): opponent=tft|ac|ad|random (default tft),
model=tiny|<local Gemma2 directory> (default: the built-in tiny model).
Defaults are the paper's: 1000 episodes of 5 decisions, seeds 1, 2, 3, 5, 6,
LoRA r64/alpha 32, PPO lr 1.41e-5, adaptive KL from beta 0.2. With the tiny
model, moraljax.config_lib.tiny_model_overrides applies (LoRA r8, lr 2e-3,
beta 0.02, no dropout) and explains why.

Paper's finding (SPEC 9): converges to almost pure D|D vs TFT (defection >= 95% of decisions).
Measured (tiny model, this 2-core CPU, default command): 104 s; defection 0.973, illegal 0.012 over the last 100 episodes.
See README.md ("Results").
"""

from moraljax import config_lib


def get_config(arg=None):
    return config_lib.experiment_config(arg, reward="game")
