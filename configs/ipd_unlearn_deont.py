r"""Iterated prisoner's dilemma, Unlearning: Game for 500 episodes, then Deontological.

    python -m moraljax.launch --config=configs/ipd_unlearn_deont.py
    python -m moraljax.launch --config=configs/ipd_unlearn_deont.py:opponent=ad
    python -m moraljax.launch --config=configs/ipd_unlearn_deont.py:model=/path/to/gemma-2-2b-it

Variants (ARG after ':'), defaults and the tiny model's settings: see
moraljax.config_lib.experiment_config.

Paper's finding (SPEC 9): D|D first, then toward C|C after the switch, not as far as pure De training.
Measured (tiny model, this 2-core CPU, default command): 46 s; D|D 0.79 in the 50 episodes
before the switch, then C|C 0.749, D|D 0.038, D|C 0.015 over the last 100 episodes (pure De: C|C 0.793).
"""

from moraljax import config_lib


def get_config(arg=None):
    return config_lib.experiment_config(arg, reward="game", switch_to="deont", switch_episode=500)
