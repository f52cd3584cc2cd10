r"""Iterated prisoner's dilemma, Game+Deontological reward.

    python -m moraljax.launch --config=configs/ipd_game_deont.py
    python -m moraljax.launch --config=configs/ipd_game_deont.py:opponent=ad
    python -m moraljax.launch --config=configs/ipd_game_deont.py:model=/path/to/gemma-2-2b-it

Variants (ARG after ':'), defaults and the tiny model's settings: see
moraljax.config_lib.experiment_config.

Paper's finding (SPEC 9): a mixture of C|C and D|D, little D|C.
Measured (tiny model, this 2-core CPU, default command): 50 s; C|C 0.669, D|D 0.211,
D|C 0.001, illegal 0.002 over the last 100 episodes (seeds differ: D|D 0.0 to 0.54).
"""

from moraljax import config_lib


def get_config(arg=None):
    return config_lib.experiment_config(arg, reward="game_deont")
