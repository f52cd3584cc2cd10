"""Host-side outputs of a training run: metrics CSV, TensorBoard, plots, summary.

Everything here runs in plain Python/numpy on the host, after a jitted
training chunk has returned its per-decision records (SPEC.md section 8).
Nothing is traced. On a multi-host run every process calls the same code and
only the writer process (``is_writer``, process 0) touches the disk.

Files in the workdir:

    metrics.csv     one row per (episode, learner): action-type counts,
                    mean rewards and regrets of the episode, PPO diagnostics
    tb/             TensorBoard event files, scalars per condition averaged
                    over seeds, step = episode
    action_types.png, rewards.png   the paper's Figure 2 style plots
    summary.json, summary.md        final-window shares with 95% CIs
    config.json     the resolved config of the run

Axis legend of the chunk records: K episodes of the chunk, N learners
(seeds x conditions x players), B decisions per episode.

A "group" is one (condition, player) pair: the runs (seeds) that are
averaged together. Its label is the condition name, with "/player{p}"
appended only when the condition has several players (LLM vs LLM).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import csv
import json
import math
import os
import pathlib
from typing import Any

import numpy as np
import tensorboardX

from moraljax import workdir as workdir_lib
from moraljax.output import csv_files
from moraljax.output import figures
from moraljax.output import markdown
from moraljax.output import names
from moraljax.output import statistics
from moraljax.output import tensorboard

# Metric and column names: moraljax.output.names.
ACTION_TYPE_NAMES = names.ACTION_TYPE_NAMES
NUM_ACTION_TYPES = names.NUM_ACTION_TYPES
COUNT_COLUMNS = names.COUNT_COLUMNS
OPPONENT_ILLEGAL_COLUMN = names.OPPONENT_ILLEGAL_COLUMN
REWARD_KEYS = names.REWARD_KEYS
REGRET_KEYS = names.REGRET_KEYS
DECISION_KEYS = names.DECISION_KEYS

_INT_COLUMNS = frozenset(("episode", "learner", "seed", "player")
                         + COUNT_COLUMNS + (OPPONENT_ILLEGAL_COLUMN,))
_STRING_COLUMNS = frozenset(("condition",))

METRICS_FILENAME = "metrics.csv"
TENSORBOARD_DIRNAME = "tb"


# ---------------------------------------------------------------------------
# Small shared helpers.


def _unique_in_order(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


def _moving_average(values: np.ndarray, window: int | None) -> np.ndarray:
    """Trailing mean over the last `window` entries of axis -1.

    out[..., i] = mean(values[..., max(0, i - window + 1) : i + 1]); the first
    entries average over what exists, so no episode is dropped.
    """
    if window is None or window == 1:
        return values
    values = np.asarray(values, dtype=np.float64)
    cumulative = np.cumsum(values, axis=-1)
    padded = np.concatenate(
        [np.zeros(values.shape[:-1] + (1,)), cumulative], axis=-1)
    index = np.arange(values.shape[-1])
    start = np.maximum(index - window + 1, 0)
    return (padded[..., index + 1] - padded[..., start]) / (index + 1 - start)


def _check_window(smoothing_window: int | None) -> None:
    if smoothing_window is None:
        return
    if (isinstance(smoothing_window, bool)
            or not isinstance(smoothing_window, int) or smoothing_window < 1):
        raise ValueError(f"smoothing_window={smoothing_window!r} is not "
                         "allowed; expected None or an int >= 1.")


# ---------------------------------------------------------------------------
# Metrics CSV.


def read_metrics(metrics_csv_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads metrics.csv into one numpy column per header field.

    Args:
        metrics_csv_path: path of a metrics.csv written by ``RunWriter``.

    Returns:
        {column: array [rows]}: int64 for episode, learner, seed, player and
        the counts; str for condition; float64 otherwise.

    Raises:
        ValueError: the file is empty, has no rows or a malformed row.
    """
    path = pathlib.Path(metrics_csv_path)
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise ValueError(f"metrics_csv_path={str(path)!r} is empty; expected "
                         "a header and at least one row.")
    header, body = rows[0], rows[1:]
    if not body:
        raise ValueError(f"metrics_csv_path={str(path)!r} has no rows; "
                         "expected at least one episode.")
    for line_number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ValueError(
                f"{path}: line {line_number} has {len(row)} fields; expected "
                f"{len(header)} as in the header.")
    columns = {}
    for index, name in enumerate(header):
        raw = [row[index] for row in body]
        if name in _STRING_COLUMNS:
            columns[name] = np.asarray(raw, dtype=str)
        elif name in _INT_COLUMNS:
            columns[name] = np.asarray([int(v) for v in raw], dtype=np.int64)
        else:
            columns[name] = np.asarray([float(v) for v in raw],
                                       dtype=np.float64)
    return columns


def _truncate_metrics(path: pathlib.Path, start_episode: int) -> None:
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
    runs = [(l["condition"], int(l["player"]), int(l["seed"]))
            for l in learners]
    if len(set(runs)) != len(runs):
        raise ValueError(f"(condition, player, seed) triples {runs} are not "
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
    missing = [key for key in DECISION_KEYS if key not in decisions]
    if missing:
        raise ValueError(f"decisions lacks {missing}; expected keys "
                         f"{list(DECISION_KEYS)}.")
    shape = np.shape(decisions["action_type"])
    if len(shape) != 3 or shape[:2] != (num_episodes, num_learners):
        raise ValueError(
            f"decisions['action_type'].shape={shape}; expected [K, N, B] = "
            f"[{num_episodes}, {num_learners}, B].")
    for key in DECISION_KEYS:
        value = np.asarray(decisions[key])
        if value.shape != shape:
            raise ValueError(f"decisions[{key!r}].shape={value.shape}; "
                             f"expected {shape} like action_type.")
    action_type = np.asarray(decisions["action_type"])
    if not np.issubdtype(action_type.dtype, np.integer):
        raise ValueError(f"decisions['action_type'].dtype={action_type.dtype}"
                         "; expected an integer dtype.")
    if action_type.size and (action_type.min() < 0
                             or action_type.max() >= NUM_ACTION_TYPES):
        raise ValueError(
            f"decisions['action_type'] has values in [{action_type.min()}, "
            f"{action_type.max()}]; expected indices into {ACTION_TYPE_NAMES}.")
    if np.asarray(decisions["opponent_legal"]).dtype != np.bool_:
        raise ValueError("decisions['opponent_legal'].dtype="
                         f"{np.asarray(decisions['opponent_legal']).dtype}; "
                         "expected bool.")
    for key in REWARD_KEYS + REGRET_KEYS:
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
            _truncate_metrics(self._metrics_path, int(start_episode))
        self._tensorboard = tensorboardX.SummaryWriter(
            logdir=str(self.workdir / TENSORBOARD_DIRNAME),
            purge_step=int(start_episode) if start_episode > 0 else None,
            # Flushed explicitly per chunk; no timer thread.
            flush_secs=10**6, max_queue=10**6)

    def _header(self, update_keys: Sequence[str]) -> list[str]:
        header = list(names.METADATA_COLUMNS) + list(COUNT_COLUMNS)
        if self._has_llm_opponent:
            header.append(OPPONENT_ILLEGAL_COLUMN)
        header += [names.ILLEGAL_SHARE_COLUMN] + list(REWARD_KEYS) + list(REGRET_KEYS)
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
        Decision keys beyond ``DECISION_KEYS`` are ignored.

        Args:
            episodes: int [K], global 0-based episode numbers, increasing,
                after every episode already written.
            decisions: {key: [K, N, B]} for every key in ``DECISION_KEYS``.
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
                           for t in range(NUM_ACTION_TYPES)], axis=-1)
        opponent_illegal = (~np.asarray(decisions["opponent_legal"])).sum(-1)
        illegal_share = counts[..., 4:].sum(-1) / num_decisions
        means = {key: np.asarray(decisions[key], np.float64).mean(axis=-1)
                 for key in REWARD_KEYS + REGRET_KEYS}
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
                        for key in REWARD_KEYS + REGRET_KEYS]
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
        for t, column in enumerate(COUNT_COLUMNS):
            columns[column] = counts[..., t].reshape(-1)
        if self._has_llm_opponent:
            columns[OPPONENT_ILLEGAL_COLUMN] = opponent_illegal.reshape(-1)
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
        return write_report(self.workdir, self._metrics_path,
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


# ---------------------------------------------------------------------------
# Plots.


def _select_groups(columns: Mapping[str, np.ndarray],
                   condition: str | Sequence[str] | None
                   ) -> tuple[np.ndarray, list[str]]:
    """Row labels and the labels to plot, filtered by condition name."""
    labels = np.asarray(names.group_labels(columns["condition"], columns["player"]))
    if condition is None:
        return labels, _unique_in_order(labels.tolist())
    wanted = [condition] if isinstance(condition, str) else list(condition)
    available = _unique_in_order(columns["condition"].tolist())
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise ValueError(f"condition={condition!r} is not allowed; expected "
                         f"one of {available}.")
    keep = np.isin(columns["condition"], wanted)
    return labels, _unique_in_order(labels[keep].tolist())


def _per_run_grid(columns: Mapping[str, np.ndarray], rows: np.ndarray,
                  key: str) -> tuple[np.ndarray, np.ndarray]:
    """[R, E] values of `key` per run and episode (NaN where missing)."""
    episodes = np.unique(columns["episode"][rows])
    learners = _unique_in_order(columns["learner"][rows].tolist())
    grid = np.full((len(learners), len(episodes)), np.nan)
    run_index = {learner: r for r, learner in enumerate(learners)}
    runs = np.asarray([run_index[l] for l in columns["learner"][rows]])
    grid[runs, np.searchsorted(episodes, columns["episode"][rows])] = (
        columns[key][rows])
    return episodes, grid


def plot_action_types(metrics_csv_path: str | os.PathLike,
                      out_png: str | os.PathLike, *,
                      condition: str | Sequence[str] | None = None,
                      smoothing_window: int | None = None) -> None:
    """Stacked areas of action-type counts summed over runs (paper Figure 2).

    For every group (one subplot each), at every episode e:
    count_t(e) = sum over runs r of n_t(e, r), stacked over the six types in
    ``ACTION_TYPE_NAMES`` order with fixed colours. With LLM opponents the
    summed count of opponent-illegal decisions is drawn as a dashed line.

    Args:
        metrics_csv_path: metrics.csv of a run.
        out_png: output PNG path.
        condition: a condition name (or several) to plot; default all.
        smoothing_window: trailing moving-average window in episodes;
            default none.

    Raises:
        ValueError: unknown condition or bad smoothing_window.
    """
    _check_window(smoothing_window)
    columns = read_metrics(metrics_csv_path)
    labels, selected = _select_groups(columns, condition)
    figure, axes = figures.panels(len(selected))
    for axis, label in zip(axes, selected):
        rows = labels == label
        num_runs = len(np.unique(columns["learner"][rows]))
        episodes = np.unique(columns["episode"][rows])
        position = np.searchsorted(episodes, columns["episode"][rows])
        counts = np.zeros((NUM_ACTION_TYPES, len(episodes)))
        for t, column in enumerate(COUNT_COLUMNS):
            np.add.at(counts[t], position, columns[column][rows])
        axis.stackplot(episodes, _moving_average(counts, smoothing_window),
                       labels=ACTION_TYPE_NAMES,
                       colors=figures.action_type_colors(),
                       linewidth=0)
        if (OPPONENT_ILLEGAL_COLUMN in columns
                and columns[OPPONENT_ILLEGAL_COLUMN][rows].any()):
            opponent = np.zeros(len(episodes))
            np.add.at(opponent, position,
                      columns[OPPONENT_ILLEGAL_COLUMN][rows])
            axis.plot(episodes, _moving_average(opponent, smoothing_window),
                      "k--", linewidth=1, label="opponent illegal")
        axis.set_title(f"{label} ({num_runs} runs)")
        axis.set_xlabel("episode")
        axis.set_ylabel("decisions (sum over runs)")
        axis.set_xlim(episodes[0], max(episodes[-1], episodes[0] + 1))
        axis.margins(x=0)
    figures.legend_right(figure, axes[0], 0.88)
    figure.savefig(out_png)


def plot_rewards(metrics_csv_path: str | os.PathLike,
                 out_png: str | os.PathLike,
                 reward_keys: Sequence[str] = ("reward",), *,
                 condition: str | Sequence[str] | None = None,
                 smoothing_window: int | None = None) -> None:
    """Mean reward curves per group with 95% CI bands over runs.

    For each group (one subplot) and reward column, the per-episode mean
    over runs and the band mean +- 1.96 * sd(ddof=1) / sqrt(runs)
    (``mean_and_ci95``); smoothing is applied to each run's curve first.

    Args:
        metrics_csv_path: metrics.csv of a run.
        out_png: output PNG path.
        reward_keys: CSV columns to draw, e.g. ("reward", "reward_game").
        condition: a condition name (or several) to plot; default all.
        smoothing_window: trailing moving-average window in episodes.

    Raises:
        ValueError: unknown reward key or condition, bad smoothing_window.
    """
    _check_window(smoothing_window)
    columns = read_metrics(metrics_csv_path)
    if isinstance(reward_keys, str):
        reward_keys = (reward_keys,)
    allowed = [c for c in columns
               if c.startswith("reward") or c.startswith("regret")]
    unknown = [key for key in reward_keys if key not in allowed]
    if unknown or not reward_keys:
        raise ValueError(f"reward_keys={list(reward_keys)!r} is not allowed; "
                         f"expected a non-empty subset of {allowed}.")
    labels, selected = _select_groups(columns, condition)
    figure, axes = figures.panels(len(selected))
    for axis, label in zip(axes, selected):
        rows = labels == label
        for key in reward_keys:
            episodes, grid = _per_run_grid(columns, rows, key)
            mean, ci = statistics.mean_and_ci95(_moving_average(grid, smoothing_window))
            line, = axis.plot(episodes, mean, label=key)
            axis.fill_between(episodes, mean - ci, mean + ci, alpha=0.25,
                              color=line.get_color(), linewidth=0)
        num_runs = len(np.unique(columns["learner"][rows]))
        axis.set_title(f"{label} ({num_runs} runs, 95% CI)")
        axis.set_xlabel("episode")
        axis.set_ylabel("mean reward per decision")
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out_png)


# ---------------------------------------------------------------------------
# Summary.


def _final_window_size(num_episodes: int, final_fraction: float) -> int:
    """ceil(fraction * episodes), at least 1 (1e-9 absorbs float error)."""
    return max(1, math.ceil(final_fraction * num_episodes - 1e-9))


def action_shares(columns: Mapping[str, np.ndarray],
                  rows: np.ndarray) -> dict[str, float]:
    """Action-type shares of the decisions counted in the selected rows.

    Args:
        columns: metrics.csv columns (``read_metrics``).
        rows: bool [rows] selection (one run's window, or several runs').

    Returns:
        {"share_<type>": ..., "cooperation", "defection", "illegal"}; all 0
        when the rows hold no decision.
    """
    counts = np.asarray([columns[c][rows].sum() for c in COUNT_COLUMNS],
                        dtype=np.float64)
    shares = counts / max(counts.sum(), 1.0)
    out = {f"share_{name}": float(share)
           for name, share in zip(ACTION_TYPE_NAMES, shares)}
    return {**out, **names.group_shares(shares)}


def summarise(metrics_csv_path: str | os.PathLike, *,
              final_fraction: float = 0.1) -> dict[str, Any]:
    """Final-window action shares and rewards per run and per group.

    Per group, the window is the last max(1, ceil(final_fraction * E))
    episodes, E being the group's number of distinct episodes. Per run:

        share_t     = sum_window n_t / sum_window sum_t' n_t'
        cooperation = share_C|C + share_C|D
        defection   = share_D|C + share_D|D
        illegal     = share_illegal|C + share_illegal|D
        opponent_illegal = sum_window n_opp_illegal / decisions (if present)
        reward_*, regret_* = mean over the window's episodes

    Per group: mean over runs and 95% CI half-width 1.96 * sd(ddof=1) /
    sqrt(runs), 0 for one run (SPEC.md section 8).

    Args:
        metrics_csv_path: metrics.csv of a run.
        final_fraction: fraction of final episodes, in (0, 1].

    Returns:
        {"final_fraction", "metrics": [names], "groups": {label: {
        "condition", "player", "num_runs", "num_episodes" (last episode + 1),
        "final_window": [first, last], "num_final_episodes",
        "runs": [{"seed", "learner", metric: value, ...}],
        "mean": {metric: value}, "ci95": {metric: value}}}}.

    Raises:
        ValueError: bad final_fraction, or a run with no episode in its
            group's final window.
    """
    if (isinstance(final_fraction, bool)
            or not isinstance(final_fraction, (int, float))
            or not 0.0 < final_fraction <= 1.0):
        raise ValueError(f"final_fraction={final_fraction!r} is not allowed; "
                         "expected a number in (0, 1].")
    columns = read_metrics(metrics_csv_path)
    labels = np.asarray(names.group_labels(columns["condition"], columns["player"]))
    has_opponent = OPPONENT_ILLEGAL_COLUMN in columns
    mean_keys = [c for c in columns
                 if c in REWARD_KEYS or c in REGRET_KEYS]
    metric_names = (list(names.SHARE_COLUMNS) + list(names.ACTION_GROUPS)
                    + (["opponent_illegal"] if has_opponent else [])
                    + mean_keys)

    groups = {}
    for label in _unique_in_order(labels.tolist()):
        rows = labels == label
        episodes = np.unique(columns["episode"][rows])
        window_size = _final_window_size(len(episodes), final_fraction)
        window = episodes[-window_size:]
        in_window = rows & np.isin(columns["episode"], window)
        runs = []
        for learner in _unique_in_order(columns["learner"][rows].tolist()):
            mine = in_window & (columns["learner"] == learner)
            seed = int(columns["seed"][rows & (columns["learner"] == learner)][0])
            if not mine.any():
                raise ValueError(
                    f"run seed={seed} (learner {learner}) of {label!r} has no "
                    f"episode in the final window {window.tolist()}.")
            run = {"seed": seed, "learner": int(learner),
                   **action_shares(columns, mine)}
            if has_opponent:
                total = sum(columns[c][mine].sum() for c in COUNT_COLUMNS)
                run["opponent_illegal"] = float(
                    columns[OPPONENT_ILLEGAL_COLUMN][mine].sum() / total)
            for key in mean_keys:
                run[key] = float(columns[key][mine].mean())
            runs.append(run)
        table = np.asarray([[run[m] for m in metric_names] for run in runs])
        mean, ci = statistics.mean_and_ci95(table)
        first = rows.nonzero()[0][0]
        groups[label] = {
            "condition": str(columns["condition"][first]),
            "player": int(columns["player"][first]),
            "num_runs": len(runs),
            "num_episodes": int(episodes[-1]) + 1,
            "final_window": [int(window[0]), int(window[-1])],
            "num_final_episodes": int(window_size),
            "runs": runs,
            "mean": {m: float(v) for m, v in zip(metric_names, mean)},
            "ci95": {m: float(v) for m, v in zip(metric_names, ci)},
        }
    return {"final_fraction": float(final_fraction), "metrics": metric_names,
            "groups": groups}


def _markdown_table(group: Mapping[str, Any], metrics: Sequence[str],
                    decimals: int) -> list[str]:
    header = ["seed"] + [markdown.escape(m.removeprefix("share_"))
                         for m in metrics]
    rows = [[str(run["seed"])] + [f"{run[m]:.{decimals}f}" for m in metrics]
            for run in group["runs"]]
    rows.append(["mean ± 95% CI"] + [
        markdown.mean_ci(group["mean"][m], group["ci95"][m], decimals)
        for m in metrics])
    return markdown.table(header, rows)


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as markdown: per group a shares table and a rewards table.

    Args:
        summary: the dict returned by ``summarise``.

    Returns:
        Markdown text.
    """
    share_metrics = [m for m in summary["metrics"]
                     if m.startswith("share_") or m in (
                         "cooperation", "defection", "illegal",
                         "opponent_illegal")]
    reward_metrics = [m for m in summary["metrics"] if m not in share_metrics]
    lines = ["# Run summary", "",
             f"Final window: the last {summary['final_fraction']:.0%} of each "
             "condition's episodes. Shares are fractions of decisions; "
             "95% CI = 1.96 * sd / sqrt(runs) over runs (0 for one run).", ""]
    for label, group in summary["groups"].items():
        first, last = group["final_window"]
        lines += [f"## {markdown.escape(label)}", "",
                  f"{group['num_episodes']} episodes, {group['num_runs']} "
                  f"runs; final window episodes {first}-{last} "
                  f"({group['num_final_episodes']} episodes).", "",
                  "Action shares:", ""]
        lines += _markdown_table(group, share_metrics, decimals=3)
        if reward_metrics:
            lines += ["", "Mean rewards and regrets per decision:", ""]
            lines += _markdown_table(group, reward_metrics, decimals=3)
        lines.append("")
    return "\n".join(lines)


def write_summary(workdir: str | os.PathLike,
                  summary: Mapping[str, Any]) -> None:
    """Writes summary.json and summary.md into workdir.

    Args:
        workdir: the run directory (created if missing).
        summary: the dict returned by ``summarise``.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_text_atomic(workdir / "summary.json",
                                  json.dumps(summary, indent=2) + "\n")
    workdir_lib.write_text_atomic(workdir / "summary.md",
                                  summary_markdown(summary))


def write_report(workdir: str | os.PathLike,
                 metrics_csv_path: str | os.PathLike, *,
                 final_fraction: float = 0.1,
                 smoothing_window: int | None = None) -> dict[str, Any]:
    """action_types.png, rewards.png, summary.json and summary.md of a run.

    What a finished run (``RunWriter.write_report``) and a merged sweep
    (launch/sweep.py) write from their metrics.csv.

    Returns:
        The summary (``summarise``).
    """
    workdir = pathlib.Path(workdir)
    plot_action_types(metrics_csv_path, workdir / "action_types.png",
                      smoothing_window=smoothing_window)
    plot_rewards(metrics_csv_path, workdir / "rewards.png",
                 smoothing_window=smoothing_window)
    summary = summarise(metrics_csv_path, final_fraction=final_fraction)
    write_summary(workdir, summary)
    return summary


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
