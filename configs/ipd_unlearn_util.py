r"""Iterated prisoner's dilemma, Unlearning: Game for 500 episodes, then Utilitarian.

    python -m moraljax.launch --config=configs/ipd_unlearn_util.py
    python -m moraljax.launch --config=configs/ipd_unlearn_util.py:opponent=ad
    python -m moraljax.launch --config=configs/ipd_unlearn_util.py:model=/path/to/gemma-2-2b-it

Variants (ARG after ':'): opponent=tft|ac|ad|random|llm (default tft; llm: a second
learner of the same condition, 3 decisions per episode),
model=tiny|<local Gemma2 directory> (default: the built-in tiny model).
Defaults are the paper's: 1000 episodes of 5 decisions, seeds 1, 2, 3, 5, 6,
LoRA r64/alpha 32, PPO lr 1.41e-5, adaptive KL from beta 0.2. With the tiny
model, moraljax.config_lib.tiny_model_overrides applies (LoRA r8, lr 1e-3,
beta 0.05, no dropout) and explains why.

Paper's finding (SPEC 9): D|D first, then toward C|C after the switch, not as far as pure Ut training.
Measured (tiny model, this 2-core CPU, default command): 47 s; D|D 0.79 in the 50 episodes
before the switch, then C|C 0.794, cooperation 0.995 over the last 100 episodes: the tiny agent
unlearns fully, as far as pure Ut training (C|C 0.794).
"""

from moraljax import config_lib


def get_config(arg=None):
    return config_lib.experiment_config(arg, reward="game", switch_to="util", switch_episode=500)
