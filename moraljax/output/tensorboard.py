"""TensorBoard scalars of a run: the same tags and values for a run and a merged sweep.

Per group (condition[/player], `names.group_labels`) and episode, the mean
over the group's learners of: action_share/<type>, action_share/illegal,
action_share/opponent_illegal (LLM opponents), reward/<key>, regret/<key>
and ppo/<diagnostic>. A run writes them chunk by chunk (`reporting.RunWriter`);
a merged sweep rebuilds them from metrics.csv (launch/sweep.py); both call
`write_group_means` on metrics.csv-shaped columns.
"""

from __future__ import annotations

from collections.abc import Mapping
import re

import numpy as np

from moraljax.output import names


def tag(*parts: str) -> str:
    """A TensorBoard tag from readable parts, legal characters only.

    TensorBoard allows ``[-/\\w.]``; tensorboardX would otherwise replace
    other characters by "_" silently, so the mapping is made explicit:
    "->" (unlearning) becomes "_to_", "|" (action types) "_given_".

    Args:
        *parts: tag components, joined by "/".

    Returns:
        The tag, e.g. ("game->deont_vs_tft", "action_share", "D|C") ->
        "game_to_deont_vs_tft/action_share/D_given_C".
    """
    cleaned = []
    for part in parts:
        part = part.replace("->", "_to_").replace("|", "_given_")
        cleaned.append(re.sub(r"[^-\w.]", "_", part))
    return "/".join(cleaned)


def scalars_per_row(columns: Mapping[str, np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
    """The scalars of every metrics.csv row, by (section, name).

    Args:
        columns: metrics.csv columns [rows] (``run_report.read_metrics``, or a
            chunk's rows before they are written); every column that is not a
            known metric is a PPO diagnostic.

    Returns:
        {(section, name): float64 [rows]}.
    """
    counts = np.stack([columns[c] for c in names.COUNT_COLUMNS], axis=-1).astype(np.float64)
    decisions = counts.sum(-1)
    values = {("action_share", name): counts[:, t] / decisions for t, name in enumerate(names.ACTION_TYPE_NAMES)}
    values[("action_share", "illegal")] = columns[names.ILLEGAL_SHARE_COLUMN]
    if names.OPPONENT_ILLEGAL_COLUMN in columns:
        values[("action_share", "opponent_illegal")] = columns[names.OPPONENT_ILLEGAL_COLUMN] / decisions
    for key in names.REWARD_KEYS:
        values[("reward", key)] = columns[key]
    for key in names.REGRET_KEYS:
        values[("regret", key)] = columns[key]
    known = set(names.METADATA_COLUMNS) | set(names.COUNT_COLUMNS) | {
        names.OPPONENT_ILLEGAL_COLUMN, names.ILLEGAL_SHARE_COLUMN, *names.REWARD_KEYS, *names.REGRET_KEYS}
    for key in sorted(set(columns) - known):
        values[("ppo", key)] = columns[key]
    return {key: np.asarray(value, np.float64) for key, value in values.items()}


def write_group_means(writer, columns: Mapping[str, np.ndarray]) -> None:
    """Adds every group's per-episode mean of every scalar to a tensorboardX writer.

    Args:
        writer: a ``tensorboardX.SummaryWriter``.
        columns: metrics.csv-shaped columns [rows], with "episode",
            "condition" and "player".
    """
    values = scalars_per_row(columns)
    labels = np.asarray(names.group_labels(columns["condition"], columns["player"]))
    for label in dict.fromkeys(labels.tolist()):
        # Row indices of each episode of the group, found once (in row
        # order, so each mean sums the same values as a mask would).
        members = np.flatnonzero(labels == label)
        member_episodes = np.asarray(columns["episode"])[members]
        order = np.argsort(member_episodes, kind="stable")
        episodes, starts = np.unique(member_episodes[order], return_index=True)
        episode_rows = np.split(members[order], starts[1:])
        for (section, name), value in values.items():
            name_tag = tag(label, section, name)
            for episode, rows in zip(episodes, episode_rows):
                writer.add_scalar(name_tag, float(np.mean(value[rows])), global_step=int(episode))
