r"""Iterated prisoner's dilemma, Game+Deontological reward.

    python -m moraljax.launch --config=configs/ipd_game_deont.py
    python -m moraljax.launch --config=configs/ipd_game_deont.py:opponent=ad
    python -m moraljax.launch --config=configs/ipd_game_deont.py:model=/path/to/gemma-2-2b-it

Variants (ARG after ':'): opponent=tft|ac|ad|random|llm (default tft; llm: a second
learner of the same condition, 3 decisions per episode),
model=tiny|<local Gemma2 directory> (default: the built-in tiny model).
Defaults are the paper's: 1000 episodes of 5 decisions, seeds 1, 2, 3, 5, 6,
LoRA r64/alpha 32, PPO lr 1.41e-5, adaptive KL from beta 0.2. With the tiny
model, moraljax.config_lib.tiny_model_overrides applies (LoRA r8, lr 1e-3,
beta 0.05, no dropout) and explains why.

Paper's finding (SPEC 9): a mixture of C|C and D|D, little D|C.
Measured (tiny model, this 2-core CPU, default command): 50 s; C|C 0.669, D|D 0.211,
D|C 0.001, illegal 0.002 over the last 100 episodes (seeds differ: D|D 0.0 to 0.54).
"""

from moraljax import config_lib


def get_config(arg=None):
    return config_lib.experiment_config(arg, reward="game_deont")
