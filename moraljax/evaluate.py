r"""Evaluates a finished training run: the generalisation suite's command line.

    python -m moraljax.evaluate --workdir=runs/ipd_util
    python -m moraljax.evaluate --config=configs/eval.py:runs/ipd_util

Every fine-tuned model of the run (one per seed; the agent M, player 0, of
LLM-vs-LLM pairs) and the base model play the suite of SPEC.md section 8
(`evaluation.protocol`: settings and the authors' fixed protocol;
`evaluation.play`: the compiled play), and the outputs go to
<workdir>/evaluation (`output.evaluation_report`).
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from moraljax import config_lib
from moraljax import workdir as workdir_lib
from moraljax.evaluation import play
from moraljax.evaluation import protocol
from moraljax.output import evaluation_report

EVALUATION_DIRNAME = "evaluation"


def _finished_step(workdir: pathlib.Path, cfg: config_lib.ExperimentConfig):
    """The checkpointer and step of a finished run's final checkpoint.

    Raises:
        ValueError: no checkpoint, or only checkpoints of an unfinished run.
    """
    from moraljax import checkpointing

    checkpoint_dir = workdir / "checkpoints"
    # Checkpointer creates its directory, so look before constructing it.
    checkpointer = checkpointing.Checkpointer(checkpoint_dir) if checkpoint_dir.is_dir() else None
    step = None if checkpointer is None else checkpointer.latest_step()
    if step is None:
        if checkpointer is not None:
            checkpointer.close()
        raise ValueError(
            f"workdir={str(workdir)!r} has no checkpoint; expected a finished training run"
            f" ({cfg.run.num_episodes} episodes)."
        )
    if step < cfg.run.num_episodes:
        checkpointer.close()
        raise ValueError(
            f"workdir={str(workdir)!r} holds an unfinished run: its latest checkpoint is at episode {step}"
            f" of run.num_episodes={cfg.run.num_episodes}; expected a finished run (resume the training"
            " with the same --config and --workdir first)."
        )
    return checkpointer, step


def _read_config(workdir: pathlib.Path) -> config_lib.ExperimentConfig:
    """The run's validated config.json.

    Raises:
        ValueError: no config.json, or one that is not JSON.
    """
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"workdir={str(workdir)!r} has no config.json; expected the directory of a training run"
            " (python -m moraljax.launch --config=... --workdir=...)."
        )
    try:
        return config_lib.experiment_from_config_dict(json.loads(config_path.read_text()))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} cannot be read ({error}); expected the JSON a training run"
                         " writes there.") from None


def _restore_learners(cfg: config_lib.ExperimentConfig, checkpointer, step: int,
                      devices: Sequence[jax.Device] | None) -> tuple[Any, Any, Any, list[dict[str, Any]], Any]:
    """The run's base model and its learners at `step`, restored straight into their abstract template.

    The run's mesh is replaced by one device (or `mesh.model` devices when
    the base is sharded over a model axis).

    Returns:
        (graphdef, frozen state, tokenizer, learner info, LearnerState [N]).
    """
    from moraljax import run_setup
    from moraljax import sharding as sharding_lib
    from moraljax.llm import policy as policy_lib

    _, learner_info = run_setup.learner_plan(cfg)
    count = len(learner_info)
    model_axis = cfg.mesh.model
    mesh = sharding_lib.make_mesh(config_lib.MeshSettings(data=-1, model=model_axis),
                                  devices or jax.devices()[:model_axis], count)
    policy, tokenizer, _ = run_setup.load_model(cfg, mesh)
    graphdef, trainable, frozen = policy_lib.split_policy(policy)
    template = run_setup.learner_template(cfg, jax.eval_shape(lambda: trainable), count, mesh)
    learners, _ = checkpointer.restore(step, template)
    return graphdef, frozen, tokenizer, learner_info, learners


def evaluate_workdir(
    workdir: str | pathlib.Path,
    settings: protocol.EvalSettings = protocol.EvalSettings(),
    *,
    out_dir: str | pathlib.Path | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluates every fine-tuned model of a finished training run, and the base.

    Reads the run's learners from its config.json (run_setup.learner_plan),
    loads the same base model, restores the learners' final checkpoint
    straight into their abstract, sharded template and runs
    `play.evaluate_policies` on the player-0 learners (the agent M; for
    LLM-vs-LLM runs the second player is not M). The run's mesh is replaced
    by one device (or `mesh.model` devices when the base is sharded over a
    model axis): evaluation is small. Single process only.

    Args:
        workdir: a training run's local directory (config.json, checkpoints/).
        settings: the suite.
        out_dir: where outputs go; default <workdir>/evaluation.
        devices: devices of the evaluation mesh (default above).
        progress: print a line per test.

    Returns:
        The summary (also written to evaluation.json).

    Raises:
        ValueError: when the workdir has no config.json, no checkpoint, or
            only checkpoints of an unfinished run; before the model is
            loaded.
    """
    workdir = pathlib.Path(workdir)
    cfg = _read_config(workdir)
    checkpointer, step = _finished_step(workdir, cfg)
    say = print if progress else (lambda *_: None)
    try:
        graphdef, frozen, tokenizer, learner_info, learners = _restore_learners(cfg, checkpointer, step, devices)
    finally:
        checkpointer.close()
    agents = [info for info in learner_info if info["player"] == 0]
    index = np.asarray([info["learner"] for info in agents])
    trainable = jax.tree.map(lambda x: x[index], learners.trainable)
    conditions = list(dict.fromkeys(info["condition"] for info in agents))
    # One condition: its models are "fine_tuned"; several (one program of a
    # run matrix): each model is labelled with its condition.
    kinds = [protocol.FINE_TUNED if len(conditions) == 1 else info["condition"] for info in agents]
    # Population members are labelled by their moral type (their condition).
    members = [info["member"] for info in agents] if cfg.population.composition else None
    if members is not None:
        kinds = [info["condition"] for info in agents]
    say(f"evaluating {len(agents)} fine-tuned model(s) of {', '.join(conditions)} (episode {step})"
        " and the base model")
    results = play.evaluate_policies(
        graphdef, frozen, trainable, tokenizer, settings,
        seeds=[info["seed"] for info in agents], kinds=kinds, members=members, progress=say,
    )
    out_dir = pathlib.Path(out_dir) if out_dir is not None else workdir / EVALUATION_DIRNAME
    meta = {"workdir": str(workdir), "condition": ", ".join(conditions), "checkpoint_episode": int(step),
            "model_path": cfg.model.path or "built-in tiny model"}
    summary = evaluation_report.write_outputs(results, tokenizer, settings, out_dir, meta=meta)
    say(f"outputs in {out_dir}")
    return summary


# ----------------------------------------------------------------------------
# Command line.


def main(argv):
    from absl import app
    from absl import flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = flags.FLAGS["config"].value
    values = {} if config is None else dict(config.to_dict())
    workdir = flags.FLAGS["workdir"].value or values.pop("workdir", "")
    out_dir = flags.FLAGS["out_dir"].value or values.pop("out_dir", "") or None
    values.pop("workdir", None)
    values.pop("out_dir", None)
    if not workdir:
        sys.exit("moraljax: give --workdir=<training run> (or --config=configs/eval.py:<training run>)")
    out_dir = pathlib.Path(out_dir) if out_dir else pathlib.Path(workdir) / EVALUATION_DIRNAME
    from moraljax import cli

    with cli.stops_cleanly():
        settings = protocol.settings_from_dict(values)
        if not pathlib.Path(workdir).is_dir():
            raise ValueError(f"workdir={workdir!r} is not a directory; expected the directory of a finished"
                             " training run.")
        with workdir_lib.hold(workdir, purpose="evaluation"):
            evaluate_workdir(workdir, settings, out_dir=out_dir, progress=True)
    print((out_dir / "regrets.md").read_text())


def run():
    from absl import app
    from absl import flags
    from absl import logging
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Evaluation config (configs/eval.py:<workdir>).")
    flags.DEFINE_string("workdir", None, "The finished training run to evaluate.")
    flags.DEFINE_string("out_dir", None, "Output directory (default <workdir>/evaluation).")
    from moraljax import cli

    logging.set_verbosity(logging.WARNING)
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, config_required=False))


if __name__ == "__main__":
    run()
