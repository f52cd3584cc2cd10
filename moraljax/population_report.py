"""Host-side outputs of a population run (issue 13): who played whom, social outcomes.

A population run (`config_lib.PopulationSettings`) labels every member's
metrics.csv rows with its moral type as the condition, so the ordinary
report already draws the per-type action shares over time (action_types.png,
one panel per type, summed over the type's members and seeds) and
summarises them per type. This module adds what only a population has:

    population.csv          one row per (episode, learner): seed, member, type,
                            the partner's learner index and type, and the
                            member's payoff of the episode
    who_played_whom.csv/png episodes in which a member of the row type played
                            a member of the column type (summed over seeds)
    social_outcomes.csv     one row per (episode, seed): collective payoff (sum
                            over members), Gini coefficient and minimum of the
                            members' payoffs
    social_outcomes.png     the three over episodes, mean and 95% CI over seeds
    selection.csv           with partner selection: one row per (episode,
                            learner): the chosen member's learner index and
                            type (-1 and "illegal" for an illegal answer), its
                            last move as shown (C, D, none), the number of
                            shown candidates that last played C, and whether
                            the choice was honoured
    who_selected_whom.csv/png  legal choices of a member of the row type
                            naming a member of the column type (all seeds)
    population_summary.json / .md   the final window: per type cooperation,
                            defection and illegal shares, and the social
                            outcomes, each a mean with a 95% CI over seeds

A payoff is the game's points of the member's own side, summed over the
episode's decisions; an illegal answer earns no points (0), the cell of an
illegal partner is taken at its last legal move (the reward_game rule).

Axis legend: K episodes of a chunk, N learners, B decisions per episode.
"""

from __future__ import annotations

import csv
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moraljax import reporting
from moraljax import rewards
from moraljax import workdir as workdir_lib
from moraljax.output import csv_files
from moraljax.output import figures
from moraljax.output import run_report
from moraljax.output import statistics

POPULATION_FILENAME = "population.csv"
SELECTION_FILENAME = "selection.csv"
_SELECTION_COLUMNS = ("episode", "learner", "type", "choice", "choice_type", "choice_move", "offered_c",
                      "honoured")
_POPULATION_COLUMNS = ("episode", "learner", "seed", "member", "type", "partner", "partner_type", "payoff")
_NUM_LEGAL_TYPES = 4  # C|C, C|D, D|C, D|D come before the illegal action types.


def gini(values: np.ndarray) -> np.ndarray:
    """Gini coefficient over the last axis: sum_ij |x_i - x_j| / (2 n^2 mean).

    0 when everyone has the same (all zero included); for non-negative
    payoffs it lies in [0, 1 - 1/n].

    Args:
        values: float [..., n].

    Returns:
        float [...].
    """
    values = np.asarray(values, np.float64)
    count = values.shape[-1]
    differences = np.abs(values[..., :, None] - values[..., None, :]).sum(axis=(-1, -2))
    total = values.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total == 0, 0.0, differences / (2.0 * count * np.where(total == 0, 1.0, total)))


def episode_payoffs(decisions: Mapping[str, np.ndarray]) -> np.ndarray:
    """Each learner's points of each episode: float [K, N] from [K, N, B] records."""
    legal = np.asarray(decisions["action_type"]) < _NUM_LEGAL_TYPES
    return np.where(legal, np.asarray(decisions["reward_game"], np.float64), 0.0).sum(axis=-1)


class PopulationWriter:
    """Appends population.csv per chunk (writer process only); truncates it on resume.

    Args:
        workdir: the run directory.
        learners: the run's learner metadata (with "member"; train.py).
        is_writer: whether this process writes.
        start_episode: first episode to be written (rows from it are removed).
    """

    def __init__(self, workdir: str | pathlib.Path, learners: Sequence[Mapping[str, Any]], *, is_writer: bool,
                 start_episode: int = 0):
        self.path = pathlib.Path(workdir) / POPULATION_FILENAME
        self.selection_path = pathlib.Path(workdir) / SELECTION_FILENAME
        self.is_writer = is_writer
        self._learners = [dict(learner) for learner in learners]
        for path in (self.path, self.selection_path):
            if is_writer and path.exists():
                reporting.truncate_to_episode(path, int(start_episode))

    def write_chunk(self, episodes: np.ndarray, decisions: Mapping[str, np.ndarray]) -> None:
        """Appends one row per (episode, learner) of a chunk.

        Args:
            episodes: int [K] episode numbers.
            decisions: {"partner", "action_type", "reward_game": [K, N, B]}.
        """
        if not self.is_writer:
            return
        partner = np.asarray(decisions["partner"])[..., 0]
        payoff = episode_payoffs(decisions)
        types = [learner["condition"] for learner in self._learners]
        csv_files.write_rows(self.path, _POPULATION_COLUMNS, append=True, rows=(
            [int(episode), n, learner["seed"], learner["member"], types[n],
             int(partner[k, n]), types[int(partner[k, n])], f"{payoff[k, n]:.6g}"]
            for k, episode in enumerate(episodes) for n, learner in enumerate(self._learners)))
        if "selection_choice" in decisions:
            self._write_selections(episodes, decisions, types)

    def _write_selections(self, episodes: np.ndarray, decisions: Mapping[str, np.ndarray],
                          types: Sequence[str]) -> None:
        """Appends selection.csv rows from the "selection_*" records ([K, N, B], equal over B)."""
        first = {name: np.asarray(decisions[f"selection_{name}"])[..., 0]
                 for name in ("choice", "choice_move", "offered_c", "honoured")}
        choice = first["choice"].astype(int)
        csv_files.write_rows(self.selection_path, _SELECTION_COLUMNS, append=True, rows=(
            [int(episode), n, types[n], choice[k, n], types[choice[k, n]] if choice[k, n] >= 0 else "illegal",
             ("none", "C", "D")[int(first["choice_move"][k, n]) + 1],
             int(first["offered_c"][k, n]), int(first["honoured"][k, n])]
            for k, episode in enumerate(episodes) for n in range(len(self._learners))))


def who_selected_whom(workdir: str | pathlib.Path, types: Sequence[str]) -> np.ndarray:
    """int [types, types]: legal choices of a row-type member naming a column-type member (selection.csv)."""
    with (pathlib.Path(workdir) / SELECTION_FILENAME).open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["choice"]) >= 0]
    index = {name: i for i, name in enumerate(types)}
    matrix = np.zeros((len(types), len(types)), np.int64)
    np.add.at(matrix, ([index[row["type"]] for row in rows], [index[row["choice_type"]] for row in rows]), 1)
    return matrix


def _read_population(path: pathlib.Path) -> dict[str, np.ndarray]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = {name: np.asarray([row[name] for row in rows]) for name in _POPULATION_COLUMNS}
    for name in ("episode", "learner", "seed", "member", "partner"):
        columns[name] = columns[name].astype(np.int64)
    columns["payoff"] = columns["payoff"].astype(np.float64)
    return columns


def _type_order(columns: Mapping[str, np.ndarray]) -> list[str]:
    """Types in member order (the composition's order)."""
    order = np.argsort(columns["member"], kind="stable")
    return list(dict.fromkeys(columns["type"][order].tolist()))


def _label(type_name: str) -> str:
    return rewards.SHORT_NAMES.get(type_name, type_name)


def who_played_whom(columns: Mapping[str, np.ndarray], types: Sequence[str]) -> np.ndarray:
    """int [types, types]: episodes in which a row-type member played a column-type member."""
    index = {name: i for i, name in enumerate(types)}
    matrix = np.zeros((len(types), len(types)), np.int64)
    np.add.at(matrix, ([index[t] for t in columns["type"]], [index[t] for t in columns["partner_type"]]), 1)
    return matrix


def social_outcomes(columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per (episode, seed): collective payoff, Gini and minimum of the members' payoffs.

    Returns:
        {"episode": [E], "seed": [S], "collective_payoff", "gini", "min_payoff": float [E, S]}.
    """
    episodes = np.unique(columns["episode"])
    seeds = np.unique(columns["seed"])
    members = np.unique(columns["member"])
    payoffs = np.full((len(episodes), len(seeds), len(members)), np.nan)
    payoffs[np.searchsorted(episodes, columns["episode"]), np.searchsorted(seeds, columns["seed"]),
            np.searchsorted(members, columns["member"])] = columns["payoff"]
    return {"episode": episodes, "seed": seeds, "collective_payoff": payoffs.sum(-1),
            "gini": gini(payoffs), "min_payoff": payoffs.min(-1)}


_OUTCOMES = ("collective_payoff", "gini", "min_payoff")


def summarise_population(workdir: str | pathlib.Path, *, final_fraction: float = 0.1) -> dict[str, Any]:
    """The final window's per-type shares and social outcomes, mean and 95% CI over seeds.

    Per seed, a type's share is its members' decisions of that kind over all
    their decisions in the window; a social outcome is its mean over the
    window's episodes. Then mean and 1.96 * sd / sqrt(seeds) over seeds.
    """
    workdir = pathlib.Path(workdir)
    population = _read_population(workdir / POPULATION_FILENAME)
    metrics = run_report.read_metrics(workdir / reporting.METRICS_FILENAME)
    episodes = np.unique(metrics["episode"])
    window = episodes[-max(1, int(np.ceil(final_fraction * len(episodes) - 1e-9))):]
    in_window = np.isin(metrics["episode"], window)
    seeds = np.unique(metrics["seed"])
    types = _type_order(population)
    per_type = {}
    for type_name in types:
        runs = [run_report.action_shares(metrics, in_window & (metrics["condition"] == type_name)
                                        & (metrics["seed"] == seed)) for seed in seeds]
        names = ("cooperation", "defection", "illegal")
        mean, ci = statistics.mean_and_ci95(np.asarray([[run[n] for n in names] for run in runs]))
        per_type[type_name] = {"label": _label(type_name),
                               "members": int(np.sum((population["type"] == type_name)
                                                     & (population["episode"] == episodes[0])
                                                     & (population["seed"] == seeds[0]))),
                               "mean": dict(zip(names, mean.tolist())), "ci95": dict(zip(names, ci.tolist())),
                               "per_seed": {n: [run[n] for run in runs] for n in names}}
    outcomes = social_outcomes(population)
    last = np.isin(outcomes["episode"], window)
    social = {}
    for name in _OUTCOMES:
        per_seed = outcomes[name][last].mean(axis=0)
        mean, ci = statistics.mean_and_ci95(per_seed)
        social[name] = {"mean": float(mean), "ci95": float(ci), "per_seed": per_seed.tolist()}
    return {"final_window": [int(window[0]), int(window[-1])], "seeds": seeds.tolist(), "types": per_type,
            "social": social, "who_played_whom": {"types": types,
                                                  "counts": who_played_whom(population, types).tolist()}}


def _summary_markdown(summary: Mapping[str, Any]) -> str:
    first, last = summary["final_window"]
    lines = ["# Population summary", "",
             f"Final window: episodes {first}-{last}; mean ± 95% CI over {len(summary['seeds'])} seed(s).", "",
             "| type | members | cooperation | defection | illegal |", "|---|---|---|---|---|"]
    for name, entry in summary["types"].items():
        cells = [f"{entry['mean'][m]:.3f} ± {entry['ci95'][m]:.3f}" for m in ("cooperation", "defection", "illegal")]
        lines.append(f"| {entry['label']} ({name}) | {entry['members']} | " + " | ".join(cells) + " |")
    lines += ["", "| social outcome per episode | mean ± 95% CI |", "|---|---|"]
    for name, entry in summary["social"].items():
        lines.append(f"| {name} | {entry['mean']:.3f} ± {entry['ci95']:.3f} |")
    return "\n".join(lines) + "\n"


def _plot_matrix(matrix: np.ndarray, types: Sequence[str], title: str, out_png: pathlib.Path, *,
                 column_label: str = "partner's type") -> None:
    figure, axes = figures.figure(1, 1, (1.2 + 0.55 * len(types), 1.0 + 0.5 * len(types)))
    axis = axes[0][0]
    image = axis.imshow(matrix, cmap="Blues")
    labels = [_label(t) for t in types]
    axis.set_xticks(range(len(types)), labels, rotation=45, ha="right")
    axis.set_yticks(range(len(types)), labels)
    for i in range(len(types)):
        for j in range(len(types)):
            axis.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize="x-small")
    axis.set_xlabel(column_label)
    axis.set_ylabel("member's type")
    axis.set_title(title, fontsize="small")
    figure.colorbar(image, ax=axis, shrink=0.8)
    figure.tight_layout()
    figure.savefig(out_png, dpi=80)


def _write_matrix_csv(matrix: np.ndarray, types: Sequence[str], path: pathlib.Path) -> None:
    rows = [["type"] + list(types)] + [[t] + [str(int(v)) for v in row] for t, row in zip(types, matrix)]
    workdir_lib.write_text_atomic(path, "".join(",".join(row) + "\n" for row in rows))


def _plot_social(outcomes: Mapping[str, np.ndarray], out_png: pathlib.Path) -> None:
    figure, axes = figures.figure(1, len(_OUTCOMES), (4.0, 3.2))
    window = max(1, len(outcomes["episode"]) // 50)
    for axis, name in zip(axes[0], _OUTCOMES):
        smoothed = np.stack([run_report.moving_average(column, window) for column in outcomes[name].T], axis=0)
        mean, ci = statistics.mean_and_ci95(smoothed)
        axis.plot(outcomes["episode"], mean)
        axis.fill_between(outcomes["episode"], mean - ci, mean + ci, alpha=0.3)
        axis.set_title(name.replace("_", " "))
        axis.set_xlabel("episode")
    figure.tight_layout()
    figure.savefig(out_png, dpi=80)


def write_population_report(workdir: str | pathlib.Path, *, final_fraction: float = 0.1) -> dict[str, Any]:
    """who_played_whom.csv/png, social_outcomes.csv/png, population_summary.json/md.

    Returns:
        The summary (`summarise_population`).
    """
    workdir = pathlib.Path(workdir)
    summary = summarise_population(workdir, final_fraction=final_fraction)
    types = summary["who_played_whom"]["types"]
    matrix = np.asarray(summary["who_played_whom"]["counts"])
    _write_matrix_csv(matrix, types, workdir / "who_played_whom.csv")
    _plot_matrix(matrix, types, "who played whom (episodes, all seeds)", workdir / "who_played_whom.png")
    if (workdir / SELECTION_FILENAME).exists():
        selected = who_selected_whom(workdir, types)
        _write_matrix_csv(selected, types, workdir / "who_selected_whom.csv")
        _plot_matrix(selected, types, "who selected whom (legal choices, all seeds)", workdir / "who_selected_whom.png",
                     column_label="chosen member's type")
    outcomes = social_outcomes(_read_population(workdir / POPULATION_FILENAME))
    lines = ["episode,seed," + ",".join(_OUTCOMES)]
    for e, episode in enumerate(outcomes["episode"]):
        for s, seed in enumerate(outcomes["seed"]):
            lines.append(f"{episode},{seed}," + ",".join(f"{outcomes[n][e, s]:.6g}" for n in _OUTCOMES))
    workdir_lib.write_text_atomic(workdir / "social_outcomes.csv", "\n".join(lines) + "\n")
    _plot_social(outcomes, workdir / "social_outcomes.png")
    workdir_lib.write_text_atomic(workdir / "population_summary.json", json.dumps(summary, indent=2) + "\n")
    workdir_lib.write_text_atomic(workdir / "population_summary.md", _summary_markdown(summary))
    return summary

