"""What a run's metrics.csv becomes: the figures and the summary (summary.json, summary.md).

Read by a finished run (``reporting.RunWriter.write_report``), a merged sweep
(launch/sweep.py) and the paper's report (``paper.py``); plain numpy on the
host.

    action_types.png, rewards.png   the paper's Figure 2 style plots
    summary.json, summary.md        final-window shares with 95% CIs

A "group" is one (condition, player) pair: the runs (seeds) that are
averaged together (``names.group_labels``).
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

from moraljax import validation
from moraljax import workdir as workdir_lib
from moraljax.output import figures
from moraljax.output import markdown
from moraljax.output import names
from moraljax.output import statistics

_INT_COLUMNS = frozenset(("episode", "learner", "seed", "player")
                         + names.COUNT_COLUMNS + (names.OPPONENT_ILLEGAL_COLUMN,))
_STRING_COLUMNS = frozenset(("condition",))


def _unique_in_order(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


def moving_average(values: np.ndarray, window: int | None) -> np.ndarray:
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
# Reading metrics.csv.


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
    """[runs, episodes] values of `key` (NaN where missing)."""
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
    ``names.ACTION_TYPE_NAMES`` order with fixed colours. With LLM opponents the
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
        counts = np.zeros((names.NUM_ACTION_TYPES, len(episodes)))
        for t, column in enumerate(names.COUNT_COLUMNS):
            np.add.at(counts[t], position, columns[column][rows])
        axis.stackplot(episodes, moving_average(counts, smoothing_window),
                       labels=names.ACTION_TYPE_NAMES,
                       colors=figures.action_type_colors(),
                       linewidth=0)
        if (names.OPPONENT_ILLEGAL_COLUMN in columns
                and columns[names.OPPONENT_ILLEGAL_COLUMN][rows].any()):
            opponent = np.zeros(len(episodes))
            np.add.at(opponent, position,
                      columns[names.OPPONENT_ILLEGAL_COLUMN][rows])
            axis.plot(episodes, moving_average(opponent, smoothing_window),
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
            mean, ci = statistics.mean_and_ci95(moving_average(grid, smoothing_window))
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
    counts = np.asarray([columns[c][rows].sum() for c in names.COUNT_COLUMNS],
                        dtype=np.float64)
    shares = counts / max(counts.sum(), 1.0)
    out = {f"share_{name}": float(share)
           for name, share in zip(names.ACTION_TYPE_NAMES, shares)}
    return {**out, **names.group_shares(shares)}


def _run_window(columns: Mapping[str, np.ndarray], rows: np.ndarray, in_window: np.ndarray, learner: int,
                label: str, window: np.ndarray, mean_keys: Sequence[str]) -> dict[str, Any]:
    """One run's final-window metrics (see `summarise`).

    Raises:
        ValueError: the run has no episode in the window.
    """
    own = in_window & (columns["learner"] == learner)
    seed = int(columns["seed"][rows & (columns["learner"] == learner)][0])
    if not own.any():
        raise ValueError(
            f"run seed={seed} (learner {learner}) of {label!r} has no "
            f"episode in the final window {window.tolist()}.")
    run = {"seed": seed, "learner": int(learner), **action_shares(columns, own)}
    if names.OPPONENT_ILLEGAL_COLUMN in columns:
        total = sum(columns[c][own].sum() for c in names.COUNT_COLUMNS)
        run["opponent_illegal"] = float(
            columns[names.OPPONENT_ILLEGAL_COLUMN][own].sum() / total)
    for key in mean_keys:
        run[key] = float(columns[key][own].mean())
    return run


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
        validation.fail("final_fraction", final_fraction, "a number in (0, 1]")
    columns = read_metrics(metrics_csv_path)
    labels = np.asarray(names.group_labels(columns["condition"], columns["player"]))
    has_opponent = names.OPPONENT_ILLEGAL_COLUMN in columns
    mean_keys = [c for c in columns
                 if c in names.REWARD_KEYS or c in names.REGRET_KEYS]
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
        runs = [_run_window(columns, rows, in_window, learner, label, window, mean_keys)
                for learner in _unique_in_order(columns["learner"][rows].tolist())]
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
