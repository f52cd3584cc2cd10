"""Metric and column names shared by training, evaluation, reports and sweeps.

One list of what a decision records and how runs are grouped, so that the
training chunk, metrics.csv, TensorBoard, the summaries and the evaluation
tables cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

from moraljax import games
from moraljax import rewards

ACTION_TYPE_NAMES = games.ACTION_TYPE_NAMES
NUM_ACTION_TYPES = len(ACTION_TYPE_NAMES)

# Action types pooled into the three shares every report prints (indices
# into ACTION_TYPE_NAMES: C|C, C|D / D|C, D|D / illegal|C, illegal|D).
ACTION_GROUPS = {
    "cooperation": (0, 1),
    "defection": (2, 3),
    "illegal": (4, 5),
}

# The reward of every type for one decision, and the two moral regrets
# (rewards.decision_metrics); "reward" is the training reward actually used.
NAMED_REWARD_KEYS = tuple(f"reward_{name}" for name in rewards.REWARD_NAMES)
REWARD_KEYS = ("reward",) + NAMED_REWARD_KEYS
REGRET_KEYS = ("regret_deont", "regret_util")
# Per-decision records of a training chunk that go to the host.
DECISION_KEYS = ("action_type", "opponent_legal") + REWARD_KEYS + REGRET_KEYS

# metrics.csv columns.
COUNT_COLUMNS = tuple(f"n_{name}" for name in ACTION_TYPE_NAMES)
OPPONENT_ILLEGAL_COLUMN = "n_opp_illegal"
ILLEGAL_SHARE_COLUMN = "illegal_share"
METADATA_COLUMNS = ("episode", "learner", "seed", "condition", "player")
SHARE_COLUMNS = tuple(f"share_{name}" for name in ACTION_TYPE_NAMES)


def group_shares(shares: Sequence[float]) -> dict[str, float]:
    """Cooperation, defection and illegal shares from the six action-type shares.

    Args:
        shares: the share of each type, in ACTION_TYPE_NAMES order.

    Returns:
        {"cooperation", "defection", "illegal"}: the sum of each group's shares.
    """
    return {group: float(sum(shares[t] for t in types)) for group, types in ACTION_GROUPS.items()}


def group_labels(conditions: Sequence[str], players: Sequence[int]) -> list[str]:
    """Label of the (condition, player) group of every learner or row.

    A group is the runs (seeds) averaged together: its label is the
    condition name, with "/player{p}" appended only when the condition has
    several players (LLM vs LLM).

    Args:
        conditions: condition name per learner (or CSV row).
        players: player index per learner (or CSV row).

    Returns:
        One label per entry.
    """
    players_of: dict[str, set[int]] = {}
    for condition, player in zip(conditions, players):
        players_of.setdefault(str(condition), set()).add(int(player))
    return [str(c) if len(players_of[str(c)]) == 1 else f"{c}/player{int(p)}"
            for c, p in zip(conditions, players)]
