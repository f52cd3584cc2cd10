r"""Iterated prisoner's dilemma, Deontological reward (xi = 3).

    python -m moraljax.launch --config=configs/ipd_deont.py
    python -m moraljax.launch --config=configs/ipd_deont.py:opponent=ad
    python -m moraljax.launch --config=configs/ipd_deont.py:model=/path/to/gemma-2-2b-it

Variants (ARG after ':'), defaults and the tiny model's settings: see
moraljax.config_lib.experiment_config.

Paper's finding (SPEC 9): never defects against a cooperator: D|C near 0, a mix of C|C and D|D.
Measured (tiny model, this 2-core CPU, default command): 48 s; D|C 0.002 (every seed <= 0.004),
C|C 0.793, D|D 0.000, illegal 0.003 over the last 100 episodes: the tiny agent
settles on always cooperating, one of the two zero-penalty policies.
See README.md ("Results").
"""

from moraljax import config_lib


def get_config(arg=None):
    return config_lib.experiment_config(arg, reward="deont")
