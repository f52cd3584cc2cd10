r"""Generalisation tests of a finished training run (SPEC.md section 8).

    python -m moraljax.evaluate --workdir=runs/ipd_util
    python -m moraljax.evaluate --config=configs/eval.py:runs/ipd_util
    python -m moraljax.evaluate --config=configs/eval.py:runs/ipd_util \
        --config.beyond_samples=100 --config.out_dir=runs/ipd_util/eval100

ARG (after ':') is the training run's workdir; without --config the same
defaults apply. Every fine-tuned model of the run (one per seed) and the base
model play IPD, ISH, ICN, BOS and ICD against a Random opponent on the
authors' fixed protocol (SeedSequence(100) streams 2 and 5): 10 episodes x 5
decisions per game, with action3/action4, each table order, and
action1/action2; the base model also with the utilitarian and deontological
preambles; plus the beyond-matrix prompt families (50 samples of 5 tokens
each). Outputs go to <workdir>/evaluation: decisions.csv, regrets.csv,
regrets.md, action_types.csv, beyond.csv, evaluation.json and PNG figures.

Hardware/runtime: with the built-in tiny model, about a minute on a CPU
(two compilations of ~15 s, then ~2 s per game and variant). With
Gemma-2-2b-it the suite is 5 x 5 tests x 5 decisions of (seeds + 3) x 10
prompts, minutes on one GPU.

Paper's finding (SPEC 9): De-trained models keep low deontological regret
on all five games; the Ut model keeps cooperating on defective coordination
(its highest utilitarian regret); the untrained base is almost always
illegal.
"""

import dataclasses

import ml_collections

from moraljax.evaluation import protocol


def get_config(arg=None):
    config = ml_collections.ConfigDict(dataclasses.asdict(protocol.EvalSettings()))
    config.workdir = arg or ""
    config.out_dir = ""
    return config
