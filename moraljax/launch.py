r"""moraljax entry point: train (and evaluate) one experiment config.

    python -m moraljax.launch --config=configs/ipd_util.py
    python -m moraljax.launch --config=configs/ipd_game.py:opponent=ad \
        --workdir=runs/game_ad --config.run.num_episodes=200

Flags: --config (an ml_collections config file, with an optional ':ARG'
variant and --config.x.y=... overrides), --workdir (default runs/<config
name>[_<variant>]), --distributed (initialise jax.distributed first, for
multi-host Cloud TPU / GPU clusters; the coordinator is detected on Cloud TPU,
SLURM, ..., or given by --coordinator_address, --num_processes, --process_id
or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
variables), --checkpoint_dir (default <workdir>/checkpoints; on several hosts
a directory all of them share, e.g. gs://bucket/run). A suite config
(configs/paper.py: several training programs, their evaluation and a report,
moraljax/paper.py) runs on one process. Everything else lives in the library.
"""

import pathlib
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from moraljax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config>[_<variant>]).")


def _define_distributed_flags(flag_values: flags.FlagValues) -> tuple[flags.FlagHolder, ...]:
    """--distributed and its coordinator flags, on `flag_values`."""
    return (
        flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (coordinator from flags,"
                          " environment or cluster).", flag_values=flag_values),
        flags.DEFINE_string("coordinator_address", None, "With --distributed: 'host:port' of process 0"
                            " (default: detected).", flag_values=flag_values),
        flags.DEFINE_integer("num_processes", None, "With --distributed: processes in the run.",
                             flag_values=flag_values),
        flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.",
                             flag_values=flag_values),
        flags.DEFINE_integer("distributed_timeout", 300, "With --distributed: seconds to wait for every"
                             " process to join.", flag_values=flag_values),
    )


_define_distributed_flags(flags.FLAGS)  # For --help and validation; read early by _parse_flags.
_CHECKPOINT_DIR = flags.DEFINE_string(
    "checkpoint_dir", None, "Checkpoint directory (default <workdir>/checkpoints; shared by all hosts)."
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def default_workdir(config_arg: str) -> pathlib.Path:
    """runs/<config file stem>[_<variant with unsafe characters replaced>]."""
    path, _, variant = config_arg.partition(":")
    name = pathlib.Path(path).stem
    if variant:
        name += "_" + re.sub(r"[^A-Za-z0-9.=-]+", "_", variant)
    return pathlib.Path("runs") / name


def _config_argument() -> str:
    """The --config value as given on the command line ('file.py[:ARG]')."""
    for arg in sys.argv[1:]:
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return config_flags.get_config_filename(flags.FLAGS["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from moraljax import config_lib
    from moraljax import distributed
    from moraljax import paper
    from moraljax import train

    # Orbax logs every checkpoint step at INFO; keep the console readable.
    logging.set_verbosity(logging.WARNING)
    workdir = pathlib.Path(_WORKDIR.value or default_workdir(_config_argument()))
    if paper.is_suite_config(_CONFIG.value):  # configs/paper.py: several programs, evaluation, report.
        try:
            suite = paper.suite_from_config_dict(_CONFIG.value)
        except (ValueError, NotImplementedError) as error:
            sys.exit(f"moraljax: bad config: {error}")
        with cli.stops_cleanly():
            paper.run_suite(suite, workdir, progress=_PROGRESS.value)
        print((workdir / paper.REPORT_FILENAME).read_text())
        return
    try:
        cfg = config_lib.experiment_from_config_dict(_CONFIG.value)
    except (ValueError, NotImplementedError) as error:
        sys.exit(f"moraljax: bad config: {error}")
    if distributed.is_writer():
        print(f"{distributed.topology()}; workdir {workdir}")
    with cli.stops_cleanly():
        summary = train.train(cfg, workdir, progress=_PROGRESS.value, checkpoint_dir=_CHECKPOINT_DIR.value)
    if summary is not None:
        print((workdir / "summary.md").read_text())
        print(f"outputs in {workdir}")


def _parse_flags(argv: list[str]) -> list[str]:
    """Joins jax.distributed, then parses every flag.

    jax.distributed.initialize must come before any JAX computation, and
    loading the --config file imports modules that build arrays; so the
    distribution flags are read first, on their own.
    """
    early = flags.FlagValues()
    distributed_flag, *explicit_flags, timeout_flag = _define_distributed_flags(early)
    try:
        early(argv, known_only=True)
    except flags.Error as error:
        sys.exit(f"moraljax: {cli.flag_error_line(error, argv, None)}")
    explicit = [holder.value for holder in explicit_flags]
    if not distributed_flag.value and any(v is not None for v in explicit):
        sys.exit("moraljax: --coordinator_address/--num_processes/--process_id need --distributed")
    if distributed_flag.value:
        from moraljax import distributed  # Imports jax; starts no backend.

        try:
            distributed.initialize(distributed.settings_from(*explicit, timeout_s=timeout_flag.value))
        except (ValueError, TimeoutError) as error:
            sys.exit(f"moraljax: {error}")
    return cli.parse_flags(argv, config_required=True)


def run():
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
