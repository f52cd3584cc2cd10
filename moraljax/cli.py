"""What the command-line programs share: flag parsing and exits that are one line.

A user's mistake on the command line (a missing or unknown config file, a
bad variant, an override of a field that does not exist, a value of the
wrong type) ends the program with one line naming what is wrong and what is
allowed, before anything is loaded or compiled. A refusal of the library (a
bad setting, a workdir in use), a diverged run and a requested stop end it
the same way (`stops_cleanly`).

Exit statuses: 1 for a bad command line, a refusal or a diverged run; 130
after Ctrl-C and 143 after SIGTERM, once the command has stopped at a safe
point (`moraljax.interrupts`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import pathlib
import re
import sys
from collections.abc import Iterator

import ml_collections
from absl import flags


def parse_flags(argv: list[str], *, config_required: bool) -> list[str]:
    """Parses every flag (and loads --config), or exits with one line.

    Args:
        argv: the command line.
        config_required: whether --config must be given.

    Returns:
        The arguments left after the flags.
    """
    config_arg = _config_argument(argv)
    asks_help = any(arg.startswith("--help") for arg in argv[1:])
    if config_required and config_arg is None and not asks_help:
        sys.exit("moraljax: --config is missing; expected a config file, e.g. --config=configs/ipd_util.py")
    if config_arg is not None and not pathlib.Path(config_arg.partition(":")[0]).is_file():
        sys.exit(f"moraljax: --config={config_arg} is not allowed; expected an existing config file"
                 " (e.g. configs/ipd_util.py), optionally with ':variant'")
    try:
        remaining = flags.FLAGS(argv)
        _ = flags.FLAGS["config"].value  # Loads the file now, so its errors are flag errors too.
    except Exception as error:  # A user's flags: one line, never a traceback.
        sys.exit(f"moraljax: {flag_error_line(error, argv, config_arg)}")
    return remaining


def _config_argument(argv: list[str]) -> str | None:
    """The value of --config, given as '--config=x' or '--config x', or None."""
    for index, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
    return None


def config_from_file(config_arg: str) -> ml_collections.ConfigDict:
    """The ConfigDict that 'file.py[:variant]' builds, as `--config=file.py[:variant]` reads it."""
    path, _, variant = config_arg.partition(":")
    spec = importlib.util.spec_from_file_location("moraljax_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def _load_config(config_arg: str) -> ml_collections.ConfigDict | None:
    """The ConfigDict of 'file.py[:variant]', or None if the file fails to build it."""
    try:
        return config_from_file(config_arg)
    except Exception:  # The file's own error is reported instead.
        return None


def _unknown_override(argv: list[str], config_arg: str | None) -> str | None:
    """'--config.a.b is not allowed; ...' for the first override naming no field, or None."""
    config = _load_config(config_arg) if config_arg is not None else None
    if config is None:
        return None
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        node, walked = config, []
        for part in arg[len("--config."):].split("=", 1)[0].split("."):
            keys = list(node.keys()) if isinstance(node, (dict, ml_collections.ConfigDict)) else []
            if part not in keys:
                where = ".".join(walked) or "the config"
                return (f"--config.{'.'.join(walked + [part])} is not allowed; expected a field of {where}:"
                        f" {', '.join(sorted(keys)) or 'none (it is a value)'}")
            node, walked = node[part], walked + [part]
    return None


def flag_error_line(error: BaseException, argv: list[str], config_arg: str | None) -> str:
    """One line saying what is wrong with the command line, from a parsing error."""
    unknown = _unknown_override(argv, config_arg)
    if unknown:
        return unknown
    text = str(error)
    # config_flags wraps the config file's own error (e.g. a bad variant) with
    # its traceback; the traceback's last line is that error.
    if "Traceback (most recent call last)" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
        text = text.split(": ", 1)[1] if re.match(r"^\s*\w+(Error|Exception): ", text) else text
    return " ".join(text.split()).rstrip(":")


@contextlib.contextmanager
def stops_cleanly() -> Iterator[None]:
    """Turns a refusal, a divergence or a requested stop into one line and an exit status."""
    from moraljax import interrupts

    try:
        yield
    except interrupts.Stopped as stopped:
        print(f"moraljax: {stopped}", file=sys.stderr)
        sys.exit(stopped.exit_status)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"moraljax: {error}")
