r"""Iterated prisoner's dilemma, Utilitarian reward (sum of both payoffs).

    python -m moraljax.launch --config=configs/ipd_util.py
    python -m moraljax.launch --config=configs/ipd_util.py:opponent=ad
    python -m moraljax.launch --config=configs/ipd_util.py:model=/path/to/gemma-2-2b-it

Variants (ARG after ':'), defaults and the tiny model's settings: see
moraljax.config_lib.experiment_config.

Paper's finding (SPEC 9): mostly cooperates (C|C about 80% vs TFT, capped by the random initial state).
Measured (tiny model, this 2-core CPU, default command): 49 s; cooperation 0.996 (every seed
>= 0.990), C|C 0.794, illegal 0.002 over the last 100 episodes.
See README.md ("Results").
"""

from moraljax import config_lib


def get_config(arg=None):
    return config_lib.experiment_config(arg, reward="util")
