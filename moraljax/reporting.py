"""Writing a training run's outputs as it runs: metrics.csv, TensorBoard, config.json.

Everything here runs in plain Python/numpy on the host, after a jitted
training chunk has returned its per-decision records (SPEC.md section 8).
Nothing is traced. On a multi-host run every process calls the same code and
only the writer process (``is_writer``, process 0) touches the disk.

Files in the workdir:

    metrics.csv     one row per (episode, learner): action-type counts,
                    mean rewards and regrets of the episode, PPO diagnostics
    tb/             TensorBoard event files, scalars per condition averaged
                    over seeds, step = episode (``output.tensorboard``)
    config.json     the resolved config of the run

and, when the run finishes, the figures and summary of
``output.run_report`` (action_types.png, rewards.png, summary.json/md).

Axis letters of the chunk records (docs/ARCHITECTURE.md): K episodes of the
chunk, N learners (seeds x conditions x players), B decisions per episode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import csv
import json
import os
import pathlib
from typing import Any

import numpy as np
import tensorboardX

from moraljax import workdir as workdir_lib
from moraljax.output import csv_files
from moraljax.output import names
from moraljax.output import run_report
from moraljax.output import tensorboard

METRICS_FILENAME = "metrics.csv"
TENSORBOARD_DIRNAME = "tb"


# ---------------------------------------------------------------------------
# Metrics CSV.


def truncate_to_episode(path: pathlib.Path, start_episode: int) -> None:
    """Keeps only header and rows with episode < start_episode, atomically.

    A run killed while writing can leave a torn last line; it belongs to an
    episode at or after the checkpoint, so it is dropped like the other rows
    being rewritten. A malformed line anywhere else is an error.
    """
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if not lines:
        path.unlink()
        return
    header = next(csv.reader([lines[0]]))
    episode_field = header.index("episode") if "episode" in header else None
    if episode_field is None:
        raise ValueError(f"{path}: header {header!r} has no 'episode' column; "
                         "expected a metrics.csv written by RunWriter.")
    kept = []
    for line_number, line in enumerate(lines[1:], start=2):
        is_last = line_number == len(lines)
        fields = next(csv.reader([line]), [])
        complete = line.endswith("\n") and len(fields) == len(header)
        if not complete:
            if is_last:
                continue
            raise ValueError(f"{path}: line {line_number} is malformed "
                             f"({line!r}); cannot resume safely.")
        if int(fields[episode_field]) < start_episode:
            kept.append(line)
    if not kept:
        # Nothing survives: the next run writes its own header (its update
        # diagnostics may differ from the old run's).
        path.unlink()
        return
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(lines[0] + "".join(kept))
    os.replace(temporary, path)


def _check_learners(learners: Sequence[Mapping[str, Any]]) -> None:
    if not learners:
        raise ValueError("learners=[] is not allowed; expected one metadata "
                         "dict per learner.")
    for index, learner in enumerate(learners):
        for key, kind in (("learner", int), ("seed", int), ("condition", str),
                          ("player", int)):
            if key not in learner:
                raise ValueError(f"learners[{index}] has no {key!r}; expected "
                                 "keys learner, seed, condition, player.")
            value = learner[key]
            if kind is int and (isinstance(value, bool)
                                or not isinstance(value, (int, np.integer))):
                raise ValueError(f"learners[{index}][{key!r}]={value!r} is "
                                 "not allowed; expected an int.")
            if kind is str and not isinstance(value, str):
                raise ValueError(f"learners[{index}][{key!r}]={value!r} is "
                                 "not allowed; expected a str.")
        if learner["player"] not in (0, 1):
            raise ValueError(f"learners[{index}]['player']="
                             f"{learner['player']!r} is not allowed; expected "
                             "0 or 1.")
    ids = [int(learner["learner"]) for learner in learners]
    if len(set(ids)) != len(ids):
        raise ValueError(f"learner ids {ids} are not unique; expected one id "
                         "per learner.")
    # Members of a population (train.py) share condition and seed.
    runs = [(l["condition"], int(l["player"]), int(l["seed"]), l.get("member"))
            for l in learners]
    if len(set(runs)) != len(runs):
        raise ValueError(f"(condition, player, seed, member) of {runs} are not "
                         "unique; expected each run once.")


def _check_chunk(episodes: np.ndarray, decisions: Mapping[str, np.ndarray],
                 updates: Mapping[str, np.ndarray], num_learners: int
                 ) -> tuple[int, int]:
    """Validates one chunk's records; returns (K, B)."""
    episodes = np.asarray(episodes)
    if episodes.ndim != 1 or not np.issubdtype(episodes.dtype, np.integer):
        raise ValueError(f"episodes has shape {episodes.shape} and dtype "
                         f"{episodes.dtype}; expected an int array [K].")
    if episodes.size and np.any(np.diff(episodes) <= 0):
        raise ValueError(f"episodes={episodes.tolist()} is not strictly "
                         "increasing; expected consecutive episode numbers.")
    num_episodes = episodes.shape[0]
    missing = [key for key in names.DECISION_KEYS if key not in decisions]
    if missing:
        raise ValueError(f"decisions lacks {missing}; expected keys "
                         f"{list(names.DECISION_KEYS)}.")
    shape = np.shape(decisions["action_type"])
    if len(shape) != 3 or shape[:2] != (num_episodes, num_learners):
        raise ValueError(
            f"decisions['action_type'].shape={shape}; expected [K, N, B] = "
            f"[{num_episodes}, {num_learners}, B].")
    for key in names.DECISION_KEYS:
        value = np.asarray(decisions[key])
        if value.shape != shape:
            raise ValueError(f"decisions[{key!r}].shape={value.shape}; "
                             f"expected {shape} like action_type.")
    action_type = np.asarray(decisions["action_type"])
    if not np.issubdtype(action_type.dtype, np.integer):
        raise ValueError(f"decisions['action_type'].dtype={action_type.dtype}"
                         "; expected an integer dtype.")
    if action_type.size and (action_type.min() < 0
                             or action_type.max() >= names.NUM_ACTION_TYPES):
        raise ValueError(
            f"decisions['action_type'] has values in [{action_type.min()}, "
            f"{action_type.max()}]; expected indices into {names.ACTION_TYPE_NAMES}.")
    if np.asarray(decisions["opponent_legal"]).dtype != np.bool_:
        raise ValueError("decisions['opponent_legal'].dtype="
                         f"{np.asarray(decisions['opponent_legal']).dtype}; "
                         "expected bool.")
    for key in names.REWARD_KEYS + names.REGRET_KEYS:
        dtype = np.asarray(decisions[key]).dtype
        if not np.issubdtype(dtype, np.floating):
            raise ValueError(f"decisions[{key!r}].dtype={dtype}; expected a "
                             "float dtype.")
    for key, value in updates.items():
        value = np.asarray(value)
        if value.shape != (num_episodes, num_learners):
            raise ValueError(f"updates[{key!r}].shape={value.shape}; expected "
                             f"[K, N] = [{num_episodes}, {num_learners}].")
        if not (np.issubdtype(value.dtype, np.number)
                or value.dtype == np.bool_):
            raise ValueError(f"updates[{key!r}].dtype={value.dtype}; expected "
                             "a numeric dtype.")
    return num_episodes, shape[2]


class RunWriter:
    """Writes metrics.csv and TensorBoard scalars of one training run.

    Only the writer process (process 0) writes; on other processes every
    method is a no-op, so the training loop calls it unconditionally.

    Resuming: ``start_episode`` is the first episode this process will write
    (the checkpoint's episode). On construction, rows of metrics.csv with
    episode >= start_episode are removed, so a resumed run rewrites them
    instead of duplicating them; TensorBoard is told to hide older events
    from that step on (``purge_step``). No other file is touched.

    Attributes:
        workdir: the run directory.
        is_writer: whether this process writes.
    """

    def __init__(self, workdir: str | os.PathLike,
                 learners: Sequence[Mapping[str, Any]], *, is_writer: bool,
                 start_episode: int = 0,
                 opponent_is_llm: Sequence[bool] | None = None):
        """Opens the run's outputs.

        Args:
            workdir: directory of the run; created if missing.
            learners: N dicts with at least "learner" (int), "seed" (int),
                "condition" (str) and "player" (0 or 1), in learner-axis
                order.
            is_writer: True on the process that writes (process 0).
            start_episode: first episode to be written (0 for a fresh run).
            opponent_is_llm: per learner, whether its opponent is an LLM;
                if any is, the CSV gets an "n_opp_illegal" column. Default:
                no LLM opponents.

        Raises:
            ValueError: bad metadata, start_episode or opponent_is_llm.
        """
        _check_learners(learners)
        if (isinstance(start_episode, bool)
                or not isinstance(start_episode, (int, np.integer))
                or start_episode < 0):
            raise ValueError(f"start_episode={start_episode!r} is not "
                             "allowed; expected an int >= 0.")
        if opponent_is_llm is None:
            opponent_is_llm = [False] * len(learners)
        if len(opponent_is_llm) != len(learners):
            raise ValueError(
                f"opponent_is_llm has {len(opponent_is_llm)} entries; expected "
                f"one per learner ({len(learners)}).")
        self.workdir = pathlib.Path(workdir)
        self.is_writer = bool(is_writer)
        self._learners = [dict(learner) for learner in learners]
        self._has_llm_opponent = any(bool(x) for x in opponent_is_llm)
        self._last_episode = int(start_episode) - 1
        self._metrics_path = self.workdir / METRICS_FILENAME
        self._tensorboard = None
        if not self.is_writer:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._metrics_path.exists():
            truncate_to_episode(self._metrics_path, int(start_episode))
        self._tensorboard = tensorboardX.SummaryWriter(
            logdir=str(self.workdir / TENSORBOARD_DIRNAME),
            purge_step=int(start_episode) if start_episode > 0 else None,
            # Flushed explicitly per chunk; no timer thread.
            flush_secs=10**6, max_queue=10**6)

    def _header(self, update_keys: Sequence[str]) -> list[str]:
        header = list(names.METADATA_COLUMNS) + list(names.COUNT_COLUMNS)
        if self._has_llm_opponent:
            header.append(names.OPPONENT_ILLEGAL_COLUMN)
        header += [names.ILLEGAL_SHARE_COLUMN] + list(names.REWARD_KEYS) + list(names.REGRET_KEYS)
        clashes = sorted(set(update_keys) & set(header))
        if clashes:
            raise ValueError(f"updates keys {clashes} clash with metrics "
                             "columns; expected distinct diagnostic names.")
        return header + sorted(update_keys)

    def write_chunk(self, episodes: np.ndarray,
                    decisions: Mapping[str, np.ndarray],
                    updates: Mapping[str, np.ndarray]) -> None:
        """Appends one chunk's rows to metrics.csv and its TensorBoard scalars.

        Per (episode k, learner n) row: counts of every action type over the
        B decisions, n_opp_illegal (LLM opponents), illegal_share =
        (n_illegal|C + n_illegal|D) / B, the mean over decisions of every
        reward and regret, then every update diagnostic (sorted by name).
        Decision keys beyond ``names.DECISION_KEYS`` are ignored.

        Args:
            episodes: int [K], global 0-based episode numbers, increasing,
                after every episode already written.
            decisions: {key: [K, N, B]} for every key in ``names.DECISION_KEYS``.
            updates: {key: [K, N]} PPO diagnostics (any keys).

        Raises:
            ValueError: wrong keys, shapes, dtypes, episode numbers, or
                columns that differ from an existing metrics.csv.
        """
        num_episodes, num_decisions = _check_chunk(
            episodes, decisions, updates, len(self._learners))
        episodes = np.asarray(episodes)
        if num_episodes and episodes[0] <= self._last_episode:
            raise ValueError(
                f"episodes start at {int(episodes[0])}; expected > "
                f"{self._last_episode} (already written or before "
                "start_episode): rows would be duplicated.")
        if num_episodes == 0:
            return
        # Every process tracks the episode, so all of them refuse the same
        # bad input, not only the writer.
        self._last_episode = int(episodes[-1])
        if not self.is_writer:
            return

        action_type = np.asarray(decisions["action_type"])
        # counts[k, n, t]: decisions of type t in episode k of learner n.
        counts = np.stack([(action_type == t).sum(axis=-1)
                           for t in range(names.NUM_ACTION_TYPES)], axis=-1)
        opponent_illegal = (~np.asarray(decisions["opponent_legal"])).sum(-1)
        illegal_share = counts[..., 4:].sum(-1) / num_decisions
        means = {key: np.asarray(decisions[key], np.float64).mean(axis=-1)
                 for key in names.REWARD_KEYS + names.REGRET_KEYS}
        update_values = {key: np.asarray(value)
                         for key, value in updates.items()}
        header = self._header(list(update_values))

        rows = []
        for k in range(num_episodes):
            for n, learner in enumerate(self._learners):
                row = [int(episodes[k]), int(learner["learner"]),
                       int(learner["seed"]), learner["condition"],
                       int(learner["player"])]
                row += [int(c) for c in counts[k, n]]
                if self._has_llm_opponent:
                    row.append(int(opponent_illegal[k, n]))
                row.append(float(illegal_share[k, n]))
                row += [float(means[key][k, n])
                        for key in names.REWARD_KEYS + names.REGRET_KEYS]
                row += [update_values[key][k, n] for key in sorted(update_values)]
                rows.append([v if isinstance(v, str) else csv_files.format_value(v)
                             for v in row])
        self._append_rows(header, rows)
        self._write_tensorboard(episodes, counts, opponent_illegal,
                                illegal_share, means, update_values)

    def _append_rows(self, header: list[str], rows: list[list[str]]) -> None:
        if self._metrics_path.exists():
            with self._metrics_path.open(newline="") as handle:
                existing = next(csv.reader(handle), None)
            if existing != header:
                raise ValueError(
                    f"{self._metrics_path} has columns {existing}; this run "
                    f"writes {header}. Use a fresh workdir or start_episode=0.")
        csv_files.write_rows(self._metrics_path, header, rows, append=True)

    def _write_tensorboard(self, episodes: np.ndarray, counts: np.ndarray,
                           opponent_illegal: np.ndarray,
                           illegal_share: np.ndarray,
                           means: Mapping[str, np.ndarray],
                           updates: Mapping[str, np.ndarray]) -> None:
        """Scalars per group, each the mean over the group's seeds.

        The chunk's [K, N] values are laid out as its metrics.csv rows
        (episode-major), so a run and a merged sweep write the same scalars
        through ``tensorboard.write_group_means``.
        """
        num_learners = len(self._learners)
        columns = {
            "episode": np.repeat(episodes, num_learners),
            "condition": np.tile([l["condition"] for l in self._learners], len(episodes)),
            "player": np.tile([int(l["player"]) for l in self._learners], len(episodes)),
            names.ILLEGAL_SHARE_COLUMN: illegal_share.reshape(-1),
        }
        for t, column in enumerate(names.COUNT_COLUMNS):
            columns[column] = counts[..., t].reshape(-1)
        if self._has_llm_opponent:
            columns[names.OPPONENT_ILLEGAL_COLUMN] = opponent_illegal.reshape(-1)
        for key, value in {**means, **updates}.items():
            columns[key] = np.asarray(value, np.float64).reshape(-1)
        tensorboard.write_group_means(self._tensorboard, columns)
        self._tensorboard.flush()

    def save_config(self, config: Mapping[str, Any]) -> None:
        """``save_resolved_config`` on the writer process only."""
        if self.is_writer:
            save_resolved_config(self.workdir, config)

    def write_report(self, *, final_fraction: float = 0.1,
                     smoothing_window: int | None = None
                     ) -> dict[str, Any] | None:
        """Writes the plots and the summary from metrics.csv (writer only).

        Args:
            final_fraction: fraction of final episodes summarised.
            smoothing_window: trailing window (episodes) for the plots.

        Returns:
            The summary dict on the writer process, else None.
        """
        if not self.is_writer:
            return None
        self._tensorboard.flush()
        return run_report.write_report(self.workdir, self._metrics_path,
                            final_fraction=final_fraction,
                            smoothing_window=smoothing_window)

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer (idempotent)."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def save_resolved_config(workdir: str | os.PathLike,
                         config: Mapping[str, Any]) -> None:
    """Writes config.json (sorted keys, indented) into workdir, atomically.

    An identical existing file is left untouched (a resumed run does not
    rewrite it).

    Args:
        workdir: the run directory (created if missing).
        config: plain nested dict of JSON-serialisable values (e.g.
            ``ConfigDict.to_dict()``).

    Raises:
        TypeError: a value is not JSON-serialisable (never stringified
            silently).
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    path = workdir / "config.json"
    if path.exists() and path.read_text() == text:
        return
    workdir_lib.write_text_atomic(path, text)
