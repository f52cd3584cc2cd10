r"""moraljax entry point: train (and evaluate) one experiment config.

    python -m moraljax.launch --config=configs/ipd_util.py
    python -m moraljax.launch --config=configs/ipd_game.py:opponent=ad \
        --workdir=runs/game_ad --config.run.num_episodes=200

Flags: --config (an ml_collections config file, with an optional ':ARG'
variant and --config.x.y=... overrides), --workdir (default runs/<config
name>[_<variant>]), --distributed (initialise jax.distributed first, for
multi-host Cloud TPU / GPU clusters). Everything else lives in the library.
"""

import pathlib
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config>[_<variant>]).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (coordinator from the environment)."
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
    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    from moraljax import config_lib
    from moraljax import train

    # Orbax logs every checkpoint step at INFO; keep the console readable.
    logging.set_verbosity(logging.WARNING)
    try:
        cfg = config_lib.experiment_from_config_dict(_CONFIG.value)
    except (ValueError, NotImplementedError) as error:
        sys.exit(f"moraljax: bad config: {error}")
    workdir = pathlib.Path(_WORKDIR.value or default_workdir(_config_argument()))
    if jax.process_index() == 0:
        print(f"process {jax.process_index()}/{jax.process_count()}, {jax.device_count()} devices"
              f" ({jax.devices()[0].platform}); workdir {workdir}")
    try:
        summary = train.train(cfg, workdir, progress=_PROGRESS.value)
    except (ValueError, FileNotFoundError) as error:  # Refused before any work.
        sys.exit(f"moraljax: {error}")
    if summary is not None:
        print((workdir / "summary.md").read_text())
        print(f"outputs in {workdir}")


def run():
    flags.mark_flag_as_required("config")
    app.run(main)


if __name__ == "__main__":
    run()
