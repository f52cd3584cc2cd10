r"""Seed and condition sweeps larger than one program: split, run, merge.

    python launch/sweep.py --workdir=runs/sweep_ipd \
        --config=configs/ipd_util.py --config=configs/ipd_game.py:opponent=ad \
        --seeds=1,2,3,5,6 --learners_per_program=4
    python launch/sweep.py --workdir=runs/sweep_ipd ... --part=3     # one part only
    python launch/sweep.py --workdir=runs/sweep_ipd ... --merge_only # after all parts

The run matrix is every --config (one condition each: a config file with an
optional ':variant') times every seed (times two players against an LLM
opponent). One program trains all of its learners on one device mesh; when
the matrix has more learners than one program should hold
(--learners_per_program), it is split into parts, each an ordinary
`python -m moraljax.launch` run of one config on a slice of the seeds, in
<workdir>/parts/NNN (so every part resumes on its own). Parts run one after
another here, --jobs at a time, or one per machine with --part=i.

Merging writes into <workdir> exactly what one program with the whole
matrix writes: metrics.csv (every learner's rows, learners numbered
condition-major then seed then player, rows sorted by episode then learner),
tb/, action_types.png, rewards.png, summary.json, summary.md, config.json and
adapters/. A learner's trajectory depends only on its seed and condition, so
the merged report equals the single program's (up to float rounding in
batched matmuls). --override=run.num_episodes=200 and the like go to every
part as --config.run.num_episodes=200. --dry_run prints the plan and the
commands, runs nothing.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import importlib.util
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # Run as a script from a source checkout.
    sys.path.insert(0, str(ROOT))

from moraljax import config_lib  # noqa: E402
from moraljax import config_record  # noqa: E402
from moraljax import reporting  # noqa: E402
from moraljax import validation  # noqa: E402
from moraljax.output import csv_files  # noqa: E402
from moraljax.output import names  # noqa: E402
from moraljax.output import run_report  # noqa: E402
from moraljax.output import tensorboard  # noqa: E402
from moraljax import workdir as workdir_lib  # noqa: E402

PLAN_FILENAME = "sweep.json"
PARTS_DIRNAME = "parts"


@dataclasses.dataclass(frozen=True)
class Part:
    """One program of the sweep.

    Attributes:
        index: position in the plan (parts/NNN).
        config: the config argument, 'file.py[:variant]'.
        condition: the condition's name (config_lib.Condition.name).
        seeds: the seeds this program trains.
        players: learners per seed (2 against an LLM opponent, else 1).
        first_learner: index of this part's first learner in the merged run.
    """

    index: int
    config: str
    condition: str
    seeds: tuple[int, ...]
    players: int
    first_learner: int

    @property
    def name(self) -> str:
        return f"{self.index:03d}"

    @property
    def num_learners(self) -> int:
        return len(self.seeds) * self.players


# ----------------------------------------------------------------------------
# Configs and the plan.


def parse_override(text: str) -> tuple[str, str]:
    """'run.num_episodes=200' -> ('run.num_episodes', '200').

    Raises:
        ValueError: without '=' or with an empty field path.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ValueError(f"override={text!r} is not allowed; expected 'section.field=value'.")
    return key.strip(), value


def _set_override(config, key: str, value: str) -> None:
    """Sets a dotted field as config_flags would parse --config.<key>=<value>."""
    *path, field = key.split(".")
    node = config
    for name in path:
        if name not in node:
            raise ValueError(f"override {key}={value!r} names no config field ({name!r} is unknown).")
        node = node[name]
    if field not in node:
        raise ValueError(f"override {key}={value!r} names no config field ({field!r} is unknown).")
    if isinstance(node[field], str):
        node[field] = value
        return
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"override {key}={value!r} is not a Python literal ({error}).") from None
    node[field] = parsed


def load_config(config_arg: str, overrides: Sequence[str] = ()):
    """Loads 'file.py[:variant]' through its get_config and applies overrides.

    Returns:
        The ConfigDict, as `python -m moraljax.launch` would build it.

    Raises:
        ValueError / FileNotFoundError: a missing file or a bad override.
    """
    path, _, variant = config_arg.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config={config_arg!r}: {path} is not a file; expected a config .py file.")
    spec = importlib.util.spec_from_file_location(f"moraljax_sweep_config_{abs(hash(str(file)))}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
    for text in overrides:
        _set_override(config, *parse_override(text))
    return config


def plan_sweep(
    configs: Sequence[str],
    *,
    seeds: Sequence[int] | None,
    learners_per_program: int,
    overrides: Sequence[str] = (),
) -> list[Part]:
    """Splits configs x seeds into programs of at most `learners_per_program`.

    Every config is validated (as the launcher would) before anything runs.

    Args:
        configs: config arguments, one condition each, in report order.
        seeds: seeds of every condition (None: each config's own seeds).
        learners_per_program: most learners one program may hold.
        overrides: 'section.field=value' applied to every config.

    Returns:
        The parts, config-major then seed order.

    Raises:
        ValueError: no configs, a bad value, a repeated condition, or an LLM
            pair that does not fit one program.
    """
    if not configs:
        raise ValueError("configs=[] is not allowed; expected at least one --config.")
    validation.check_positive_int("learners_per_program", learners_per_program)
    if seeds is not None:
        seeds = tuple(seeds)
        config_lib.RunSettings(seeds=seeds)  # Validates them like run.seeds.
    parts, conditions = [], {}
    first_learner = 0
    for config_arg in configs:
        config = load_config(config_arg, overrides)
        cfg = config_lib.experiment_from_config_dict(config)
        if len(cfg.all_conditions()) != 1:
            raise ValueError(
                f"config={config_arg!r} trains {len(cfg.all_conditions())} conditions; allowed: configs of one"
                " condition each (pass one --config per condition)."
            )
        condition = cfg.all_conditions()[0].name
        if condition in conditions:
            raise ValueError(
                f"config={config_arg!r} trains {condition!r}, as config={conditions[condition]!r}"
                " does; allowed: one config per condition (their rows would be merged)."
            )
        conditions[condition] = config_arg
        players = cfg.all_conditions()[0].players
        if learners_per_program < players:
            raise ValueError(
                f"learners_per_program={learners_per_program} is not allowed for {config_arg!r};"
                f" expected at least {players} (an LLM pair trains in one program)."
            )
        config_seeds = seeds if seeds is not None else cfg.run.seeds
        per_part = learners_per_program // players
        for start in range(0, len(config_seeds), per_part):
            part_seeds = tuple(config_seeds[start:start + per_part])
            parts.append(Part(len(parts), config_arg, condition, part_seeds, players, first_learner))
            first_learner += len(part_seeds) * players
    return parts


def part_workdir(workdir: pathlib.Path, part: Part) -> pathlib.Path:
    return workdir / PARTS_DIRNAME / part.name


def part_command(
    part: Part, workdir: pathlib.Path, overrides: Sequence[str], launch_flags: Sequence[str] = ()
) -> list[str]:
    """The `python -m moraljax.launch` command line of one part."""
    seeds = str(tuple(part.seeds)).replace(" ", "")  # '(1,2)', '(3,)'
    return [
        sys.executable, "-m", "moraljax.launch",
        f"--config={part.config}",
        f"--workdir={part_workdir(workdir, part)}",
        *(f"--config.{key}={value}" for key, value in map(parse_override, overrides)),
        f"--config.run.seeds={seeds}",
        "--noprogress",
        *launch_flags,
    ]


def check_plan(workdir: pathlib.Path, plan: dict[str, Any]) -> None:
    """Writes sweep.json, or refuses a workdir that holds another sweep.

    Raises:
        ValueError: the existing sweep.json differs (nothing is changed).
    """

    path = workdir / PLAN_FILENAME
    config_record.check_workdir(workdir, plan, filename=PLAN_FILENAME, holder="a sweep")
    # Held only while writing: parts may run on other machines at once (--part),
    # each holding its own part's workdir.
    with workdir_lib.hold(workdir, purpose="a sweep's plan"):
        if not path.exists():
            workdir_lib.write_text_atomic(path, json.dumps(plan, indent=2) + "\n")


def is_finished(workdir: pathlib.Path, part: Part) -> bool:
    """A part is done when its run has written its summary."""
    return (part_workdir(workdir, part) / "summary.json").exists()


# ----------------------------------------------------------------------------
# Running the parts.


def run_parts(
    parts: Sequence[Part],
    workdir: pathlib.Path,
    overrides: Sequence[str],
    *,
    jobs: int = 1,
    launch_flags: Sequence[str] = (),
    say=print,
) -> None:
    """Runs the unfinished parts, `jobs` at a time; logs in parts/NNN.log.

    Raises:
        RuntimeError: naming every part that failed, with its log's tail.
    """
    validation.check_positive_int("jobs", jobs)
    pending = [p for p in parts if not is_finished(workdir, p)]
    for part in parts:
        if part not in pending:
            say(f"part {part.name}: finished already")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    running: list[tuple[Part, subprocess.Popen, Any, float]] = []
    failed = []
    while pending or running:
        while pending and len(running) < jobs:
            part = pending.pop(0)
            log_path = workdir / PARTS_DIRNAME / f"{part.name}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = log_path.open("w")
            command = part_command(part, workdir, overrides, launch_flags)
            say(f"part {part.name}: {part.condition} seeds {list(part.seeds)} -> {part_workdir(workdir, part)}")
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((part, process, log, time.time()))
        time.sleep(0.2)
        for entry in list(running):
            part, process, log, started = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            log.close()
            if process.returncode == 0 and is_finished(workdir, part):
                say(f"part {part.name}: done in {time.time() - started:.0f}s")
            else:
                tail = (workdir / PARTS_DIRNAME / f"{part.name}.log").read_text().splitlines()[-15:]
                failed.append(f"part {part.name} ({part.config}, seeds {list(part.seeds)}) exited with"
                              f" {process.returncode}:\n  " + "\n  ".join(tail))
    if failed:
        raise RuntimeError("sweep parts failed:\n" + "\n".join(failed))


# ----------------------------------------------------------------------------
# Merging.


def merge_metrics(parts: Sequence[Part], workdir: pathlib.Path) -> pathlib.Path:
    """Writes <workdir>/metrics.csv: every part's rows, learners renumbered.

    A part's learner n becomes `first_learner + n`; rows are sorted by
    (episode, learner) as one program writes them. When any condition has an
    LLM opponent the n_opp_illegal column is kept, 0 for fixed opponents
    (which never answer illegally), as in a single program.

    Raises:
        ValueError: a part without metrics, or parts with other columns.
    """
    tables = []
    for part in parts:
        path = part_workdir(workdir, part) / reporting.METRICS_FILENAME
        if not path.exists():
            raise ValueError(f"part {part.name} ({part.config}) has no {path}; run it first.")
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        tables.append((part, rows[0], rows[1:]))
    with_opponent = any(names.OPPONENT_ILLEGAL_COLUMN in header for _, header, _ in tables)
    merged_header = None
    merged = []
    for part, header, rows in tables:
        if with_opponent and names.OPPONENT_ILLEGAL_COLUMN not in header:
            at = header.index(names.COUNT_COLUMNS[-1]) + 1
            header = header[:at] + [names.OPPONENT_ILLEGAL_COLUMN] + header[at:]
            rows = [row[:at] + ["0"] + row[at:] for row in rows]
        if merged_header is None:
            merged_header = header
        elif header != merged_header:
            raise ValueError(
                f"part {part.name} ({part.config}) has columns {header}; expected {merged_header}"
                " as in the other parts."
            )
        learner = header.index("learner")
        for row in rows:
            row = list(row)
            row[learner] = str(int(row[learner]) + part.first_learner)
            merged.append(row)
    episode, learner = merged_header.index("episode"), merged_header.index("learner")
    merged.sort(key=lambda row: (int(row[episode]), int(row[learner])))
    path = workdir / reporting.METRICS_FILENAME
    csv_files.write_rows(path, merged_header, merged)
    return path


def write_tensorboard(metrics_path: pathlib.Path, directory: pathlib.Path) -> None:
    """The TensorBoard scalars RunWriter writes, rebuilt from metrics.csv.

    Per group (condition[/player]) and episode, the mean over the group's
    learners of every scalar of ``moraljax.output.tensorboard``.
    """
    import tensorboardX

    writer = tensorboardX.SummaryWriter(logdir=str(directory), flush_secs=10**6, max_queue=10**6)
    try:
        tensorboard.write_group_means(writer, run_report.read_metrics(metrics_path))
    finally:
        writer.close()


def merged_config(parts: Sequence[Part], workdir: pathlib.Path) -> dict[str, Any]:
    """config.json of the merged run: the resolved config with every seed.

    One condition: its part's config.json with run.seeds = all seeds, i.e.
    what one program of the whole matrix writes. Several: {"configs": [...]}
    with one such config per condition.
    """
    resolved = {}
    for part in parts:
        if part.config not in resolved:
            resolved[part.config] = json.loads((part_workdir(workdir, part) / "config.json").read_text())
            resolved[part.config]["run"]["seeds"] = []
        resolved[part.config]["run"]["seeds"] += list(part.seeds)
    if len(resolved) == 1:
        return next(iter(resolved.values()))
    return {"configs": [{"config": arg, **config} for arg, config in resolved.items()]}


def merge(parts: Sequence[Part], workdir: pathlib.Path) -> dict[str, Any]:
    """Writes the merged report of finished parts into `workdir`.

    Returns:
        The summary (run_report.summarise of the merged metrics).

    Raises:
        ValueError: naming the parts that have not finished.
    """
    unfinished = [p.name for p in parts if not is_finished(workdir, p)]
    if unfinished:
        raise ValueError(f"parts {unfinished} of the sweep in {workdir} have not finished; run them first.")
    with workdir_lib.hold(workdir, purpose="a sweep's merge"):
        return _merge_locked(parts, workdir)


def _merge_locked(parts: list[Part], workdir: pathlib.Path) -> dict[str, Any]:
    """`merge`'s writing, while the sweep's workdir is held."""
    metrics_path = merge_metrics(parts, workdir)
    tensorboard_dir = workdir / reporting.TENSORBOARD_DIRNAME
    shutil.rmtree(tensorboard_dir, ignore_errors=True)  # Rebuilt whole, not appended.
    write_tensorboard(metrics_path, tensorboard_dir)
    summary = run_report.write_report(workdir, metrics_path)
    reporting.save_resolved_config(workdir, merged_config(parts, workdir))
    adapters = workdir / "adapters"
    for part in parts:
        source = part_workdir(workdir, part) / "adapters"
        if source.is_dir():
            shutil.copytree(source, adapters, dirs_exist_ok=True)
    return summary


# ----------------------------------------------------------------------------
# Command line.

def _define_flags() -> None:
    """Command-line flags (defined only when run as a script, so importing this
    module next to moraljax.launch does not define --config twice)."""
    global _WORKDIR, _CONFIGS, _SEEDS, _LEARNERS, _OVERRIDES, _JOBS, _PART, _MERGE_ONLY, _LAUNCH_FLAGS, _DRY_RUN
    _WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: parts/, sweep.json and the merged report.")
    _CONFIGS = flags.DEFINE_multi_string("config", [], "A config 'file.py[:variant]' (one condition); repeat it.")
    _SEEDS = flags.DEFINE_list("seeds", None, "Seeds of every condition (default: each config's run.seeds).")
    _LEARNERS = flags.DEFINE_integer("learners_per_program", 8, "Most learners one program holds.")
    _OVERRIDES = flags.DEFINE_multi_string(
        "override", [], "'section.field=value' for every part, e.g. run.num_episodes=200.")
    _JOBS = flags.DEFINE_integer("jobs", 1, "Parts run at the same time on this machine.")
    _PART = flags.DEFINE_integer("part", None, "Run only this part (e.g. one per machine); merge later.")
    _MERGE_ONLY = flags.DEFINE_bool("merge_only", False, "Only merge the finished parts.")
    _LAUNCH_FLAGS = flags.DEFINE_multi_string(
        "launch_flag", [], "Extra flag for every part's launcher, e.g. --distributed.")
    _DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the plan and the commands; run nothing.")


def _plan_record(parts: Sequence[Part], overrides: Sequence[str]) -> dict[str, Any]:
    return {"overrides": list(overrides), "parts": [dataclasses.asdict(p) | {"seeds": list(p.seeds)} for p in parts]}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    workdir = pathlib.Path(_WORKDIR.value)
    try:
        seeds = None if _SEEDS.value is None else [int(s) for s in _SEEDS.value]
    except ValueError:
        sys.exit(f"sweep: --seeds={','.join(_SEEDS.value)} is not allowed; expected integers, e.g. 1,2,3.")
    try:
        parts = plan_sweep(_CONFIGS.value, seeds=seeds, learners_per_program=_LEARNERS.value,
                           overrides=_OVERRIDES.value)
        if _PART.value is not None and not 0 <= _PART.value < len(parts):
            raise ValueError(f"part={_PART.value} is not allowed; expected 0..{len(parts) - 1}.")
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"sweep: {error}")
    learners = sum(p.num_learners for p in parts)
    print(f"sweep: {len(_CONFIGS.value)} condition(s), {learners} learners in {len(parts)} program(s)")
    if _DRY_RUN.value:
        for part in parts:
            command = part_command(part, workdir, _OVERRIDES.value, _LAUNCH_FLAGS.value)
            print(f"part {part.name}: " + shlex.join(command))
        return
    try:
        check_plan(workdir, _plan_record(parts, _OVERRIDES.value))
        if not _MERGE_ONLY.value:
            chosen = parts if _PART.value is None else [parts[_PART.value]]
            run_parts(chosen, workdir, _OVERRIDES.value, jobs=_JOBS.value, launch_flags=_LAUNCH_FLAGS.value)
            if _PART.value is not None:
                print(f"part {_PART.value} finished; merge with --merge_only once every part has.")
                return
        merge(parts, workdir)
    except (ValueError, RuntimeError) as error:
        sys.exit(f"sweep: {error}")
    print((workdir / "summary.md").read_text())
    print(f"merged report in {workdir}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
