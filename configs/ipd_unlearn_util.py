r"""Iterated prisoner's dilemma, Unlearning: Game for 500 episodes, then Utilitarian.

    python -m moraljax.launch --config=configs/ipd_unlearn_util.py
    python -m moraljax.launch --config=configs/ipd_unlearn_util.py:opponent=ad
    python -m moraljax.launch --config=configs/ipd_unlearn_util.py:model=/path/to/gemma-2-2b-it

Variants (ARG after ':'), defaults and the tiny model's settings: see
moraljax.config_lib.experiment_config.

Paper's finding (SPEC 9): D|D first, then toward C|C after the switch, not as far as pure Ut training.
Measured (tiny model, this 2-core CPU, default command): 47 s; D|D 0.79 in the 50 episodes
before the switch, then C|C 0.794, cooperation 0.995 over the last 100 episodes: the tiny agent
unlearns fully, as far as pure Ut training (C|C 0.794).
"""

from moraljax import config_lib


def get_config(arg=None):
    return config_lib.experiment_config(arg, reward="game", switch_to="util", switch_episode=500)
