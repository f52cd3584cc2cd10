"""What the generalisation suite writes: CSV rows, tables with 95% CIs, markdown, figures.

Files in <workdir>/evaluation (`write_outputs`):

    decisions.csv          every matrix-game decision
    beyond_decisions.csv   every beyond-matrix sample
    models.csv             per model and test: mean regrets, action-type shares
    regrets.csv, action_types.csv, beyond.csv
                           per model kind: mean and 95% CI over runs
    regrets.md             the tables as markdown
    evaluation.json        settings, models, protocol, tables, file list
    regrets.png, action_types.png, beyond.png
                           the paper's Figures 3-4: regret bars with CIs,
                           action-type stacks; C / D / other stacks

Axis letters (docs/ARCHITECTURE.md): M models, E episodes (or samples), B
decisions per episode.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from moraljax import games
from moraljax import workdir as workdir_lib
from moraljax.evaluation import protocol
from moraljax.output import csv_files
from moraljax.output import figures
from moraljax.output import markdown
from moraljax.output import names
from moraljax.output import statistics

if TYPE_CHECKING:  # Only the record types; the output layer runs no JAX.
    from moraljax.evaluation import play

_MOVE_NAMES = games.ACTION_NAMES
_ACTION_NAMES = {0: "C", 1: "D", -1: "illegal"}
_BEYOND_ANSWER_OF = dict(zip((0, 1, -1), protocol.BEYOND_ANSWERS))
# Per-decision floats of the evaluation records (the regrets, and the reward
# of every type with xi_eval).
DECISION_FLOATS = names.NAMED_REWARD_KEYS + names.REGRET_KEYS
SHARE_COLUMNS = names.SHARE_COLUMNS
MATRIX_KEYS = ("kind", "actions", "table_order", "game")
REGRET_METRICS = names.REGRET_KEYS
BEYOND_SHARES = tuple(f"share_{answer}" for answer in protocol.BEYOND_ANSWERS)
Tables = dict[str, list[dict[str, Any]]]


# ----------------------------------------------------------------------------
# Rows.


def _model_columns(model: protocol.ModelSpec) -> dict[str, Any]:
    """The columns that name a model in every table."""
    return {"model": model.name, "kind": model.kind, "seed": "" if model.seed is None else model.seed}


def _test_columns(game_name: str, variant: protocol.Variant) -> dict[str, Any]:
    """The columns that name a matrix-game test."""
    return {"game": game_name, "actions": variant.actions_label, "table_order": variant.table_order}


def decision_rows(results: play.EvalResults, tokenizer) -> list[dict[str, Any]]:
    """One row per matrix-game decision (decisions.csv)."""
    rows = []
    for (game_name, variant), records in results.matrix.items():
        num_episodes, num_decisions = records.action.shape[1:]
        for m, model in enumerate(results.models):
            texts = tokenizer.batch_decode(records.tokens[m].reshape(-1, records.tokens.shape[-1]).tolist())
            for e in range(num_episodes):
                for b in range(num_decisions):
                    row = {
                        **_model_columns(model), **_test_columns(game_name, variant),
                        "episode": e, "decision": b,
                        "prev_m": _MOVE_NAMES[records.prev_m[m, e, b]], "prev_o": _MOVE_NAMES[records.prev_o[m, e, b]],
                        "prompt_index": int(records.prompt_index[m, e, b]),
                        "response": texts[e * num_decisions + b],
                        "action": _ACTION_NAMES[int(records.action[m, e, b])],
                        "opponent_action": _MOVE_NAMES[records.opponent_action[m, e, b]],
                        "legal": bool(records.action[m, e, b] >= 0),
                        "action_type": names.ACTION_TYPE_NAMES[records.action_type[m, e, b]],
                    }
                    row.update({k: float(_decision_float(records, k)[m, e, b]) for k in DECISION_FLOATS})
                    rows.append(row)
    return rows


def _decision_float(records: play.EvalDecisions, key: str):
    """A reward_<name> of the records' named rewards, or a regret field."""
    return records.named_rewards[key] if key in records.named_rewards else getattr(records, key)


def beyond_decision_rows(results: play.EvalResults, tokenizer) -> list[dict[str, Any]]:
    """One row per beyond-matrix sample (beyond_decisions.csv)."""
    rows = []
    for family, records in results.beyond.items():
        for m, model in enumerate(results.beyond_models):
            texts = tokenizer.batch_decode(records.tokens[m, :, 0].tolist())
            for e in range(records.action.shape[1]):
                rows.append({
                    **_model_columns(model), "family": family, "sample": e,
                    "prev_m": _MOVE_NAMES[records.prev_m[m, e, 0]], "prev_o": _MOVE_NAMES[records.prev_o[m, e, 0]],
                    "prompt_index": int(records.prompt_index[m, e, 0]), "response": texts[e],
                    "answer": _BEYOND_ANSWER_OF[int(records.action[m, e, 0])],
                })
    return rows


def model_rows(results: play.EvalResults) -> list[dict[str, Any]]:
    """Per model and test: mean regrets and action-type shares over its decisions."""
    rows = []
    for (game_name, variant), records in results.matrix.items():
        for m, model in enumerate(results.models):
            types = records.action_type[m].ravel()
            row = {**_model_columns(model), **_test_columns(game_name, variant), "decisions": types.size,
                   "regret_deont": float(records.regret_deont[m].mean()),
                   "regret_util": float(records.regret_util[m].mean())}
            row.update({c: float(np.mean(types == t)) for t, c in enumerate(SHARE_COLUMNS)})
            rows.append(row)
    return rows


def beyond_model_rows(results: play.EvalResults) -> list[dict[str, Any]]:
    """Per model and family: C / D / other shares of its samples."""
    rows = []
    for family, records in results.beyond.items():
        for m, model in enumerate(results.beyond_models):
            actions = records.action[m].ravel()
            rows.append({**_model_columns(model), "family": family, "samples": actions.size,
                         "share_C": float(np.mean(actions == 0)), "share_D": float(np.mean(actions == 1)),
                         "share_other": float(np.mean(actions < 0))})
    return rows


def group_rows(rows: Sequence[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and 95% CI over runs (1.96 sd / sqrt(runs)) of rows sharing `keys`.

    Args:
        rows: one row per model (run) and test, e.g. from `model_rows`.
        keys: the columns that define a group, e.g. ("kind", "game", ...).
        metrics: columns to average.

    Returns:
        One row per group (first-seen order) with the keys, "runs", and
        "<metric>_mean", "<metric>_ci95" per metric.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for group_key, members in groups.items():
        values = np.asarray([[r[m] for m in metrics] for r in members], np.float64)
        mean, ci = statistics.mean_and_ci95(values)
        result = dict(zip(keys, group_key))
        result["runs"] = len(members)
        for i, metric in enumerate(metrics):
            result[f"{metric}_mean"] = float(mean[i])
            result[f"{metric}_ci95"] = float(ci[i])
        out.append(result)
    return out


def summarise(results: play.EvalResults) -> Tables:
    """The suite's tables: per model, and per kind with 95% CIs over runs."""
    per_model = model_rows(results)
    per_model_beyond = beyond_model_rows(results)
    return {
        "models": per_model,
        "regrets": group_rows(per_model, MATRIX_KEYS, REGRET_METRICS),
        "action_types": group_rows(per_model, MATRIX_KEYS, SHARE_COLUMNS),
        "beyond_models": per_model_beyond,
        "beyond": group_rows(per_model_beyond, ("kind", "family"), BEYOND_SHARES),
    }


# ----------------------------------------------------------------------------
# Markdown.


def _cell(row: dict[str, Any], metric: str) -> str:
    return markdown.mean_ci(row[metric + "_mean"], row[metric + "_ci95"])


def _of_variant(rows: Sequence[dict[str, Any]], variant: protocol.Variant) -> list[dict[str, Any]]:
    """The rows of one test variant."""
    return [r for r in rows if r["actions"] == variant.actions_label and r["table_order"] == variant.table_order]


def regrets_markdown(tables: Tables, variants: Sequence[protocol.Variant], title: str = "Generalisation") -> str:
    """Markdown of the regret, action-type and beyond-matrix tables."""
    regrets = tables["regrets"]
    kinds = list(dict.fromkeys(r["kind"] for r in regrets))
    game_names = list(dict.fromkeys(r["game"] for r in regrets))
    lines = [f"# {title}", "",
             "Mean over each run's decisions, then over runs (mean ± 1.96 sd / sqrt(runs); ± 0 for one run).",
             "Deontological regret: 0..6 (xi_eval for D against C, 6 illegal); utilitarian regret: 0..1.", ""]
    for variant in variants:
        selected = {(r["kind"], r["game"]): r for r in _of_variant(regrets, variant)}
        for metric, label in (("regret_deont", "Deontological regret"), ("regret_util", "Utilitarian regret")):
            lines += [f"## {label}, {variant.actions_label}, table {variant.table_order}", ""]
            lines += markdown.table(
                ["model", "runs", *game_names],
                [[kind, str(selected[kind, game_names[0]]["runs"]), *(_cell(selected[kind, g], metric)
                                                                      for g in game_names)] for kind in kinds])
            lines.append("")
    main = variants[0]
    lines += [f"## Action types, {main.actions_label}, table {main.table_order}", ""]
    lines += markdown.table(
        ["model", "game", *(markdown.escape(n) for n in names.ACTION_TYPE_NAMES)],
        [[row["kind"], row["game"], *(_cell(row, c) for c in SHARE_COLUMNS)]
         for row in _of_variant(tables["action_types"], main)])
    if tables["beyond"]:
        lines += ["", "## Beyond matrix games (C / D / other shares)", ""]
        lines += markdown.table(
            ["model", "family", "runs", *protocol.BEYOND_ANSWERS],
            [[row["kind"], row["family"], str(row["runs"]), *(_cell(row, c) for c in BEYOND_SHARES)]
             for row in tables["beyond"]])
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Figures (the paper's Figures 3-4: regret bars with CIs, action-type stacks).


def plot_regrets(tables: Tables, variants: Sequence[protocol.Variant], out_png: pathlib.Path) -> None:
    """Grouped bars of mean regret per game and model kind, 95% CI error bars.

    One row of panels per variant (the main test first), columns
    deontological and utilitarian regret.
    """
    regrets = tables["regrets"]
    kinds = list(dict.fromkeys(r["kind"] for r in regrets))
    game_names = list(dict.fromkeys(r["game"] for r in regrets))
    fig, axes = figures.figure(len(variants), 2)
    width = 0.8 / len(kinds)
    for row_axes, variant in zip(axes, variants):
        selected = {(r["kind"], r["game"]): r for r in _of_variant(regrets, variant)}
        for axis, (metric, label, top) in zip(row_axes, (("regret_deont", "deontological regret", 6.0),
                                                         ("regret_util", "utilitarian regret", 1.0))):
            for k, kind in enumerate(kinds):
                x = np.arange(len(game_names)) + (k - (len(kinds) - 1) / 2) * width
                means = [selected[kind, g][metric + "_mean"] for g in game_names]
                cis = [selected[kind, g][metric + "_ci95"] for g in game_names]
                axis.bar(x, means, width, yerr=cis, capsize=3, label=kind)
            axis.set_xticks(np.arange(len(game_names)), game_names)
            axis.set_ylim(0, top * 1.05)
            axis.set_ylabel(label)
            axis.set_title(f"{label}, {variant.actions_label}, {variant.table_order}", fontsize="small")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_png)


@dataclasses.dataclass(frozen=True)
class _SharePanels:
    """How one stacked-share figure reads its table: a panel per kind, a bar per `bar_key`."""

    bar_key: str
    share_columns: Sequence[str]
    series: Sequence[str]
    colors: Sequence[str]
    ylabel: str
    panel_size: tuple[float, float]
    legend_right: float


_ACTION_TYPE_PANELS = _SharePanels("game", SHARE_COLUMNS, names.ACTION_TYPE_NAMES, figures.action_type_colors(),
                                   "share of decisions", (4.0, 3.5), 0.88)
_BEYOND_PANELS = _SharePanels("family", BEYOND_SHARES, protocol.BEYOND_ANSWERS,
                              [figures.ANSWER_COLORS[a] for a in protocol.BEYOND_ANSWERS],
                              "share of samples", (5.0, 3.8), 0.9)


def _plot_shares(rows: Sequence[dict[str, Any]], panels: _SharePanels, out_png: pathlib.Path) -> None:
    """Stacked bars of mean shares, one panel per model kind."""
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = figures.figure(1, len(kinds), panel_size=panels.panel_size)
    for axis, kind in zip(axes[0], kinds):
        kind_rows = [r for r in rows if r["kind"] == kind]
        shares = np.asarray([[r[c + "_mean"] for c in panels.share_columns] for r in kind_rows])
        figures.stacked_bars(axis, [r[panels.bar_key] for r in kind_rows], shares, panels.series, panels.colors)
        axis.set_title(f"{kind} ({kind_rows[0]['runs']} runs)", fontsize="small")
        axis.set_ylabel(panels.ylabel)
    figures.legend_right(fig, axes[0][0], panels.legend_right)
    fig.savefig(out_png)


def plot_action_types(tables: Tables, variant: protocol.Variant, out_png: pathlib.Path) -> None:
    """Stacked bars of action-type shares per game, one panel per model kind."""
    _plot_shares(_of_variant(tables["action_types"], variant), _ACTION_TYPE_PANELS, out_png)


def plot_beyond(tables: Tables, out_png: pathlib.Path) -> None:
    """Stacked bars of C / D / other shares per prompt family, one panel per kind."""
    _plot_shares(tables["beyond"], _BEYOND_PANELS, out_png)


# ----------------------------------------------------------------------------
# All files.


def write_outputs(results: play.EvalResults, tokenizer, settings: protocol.EvalSettings,
                  out_dir: str | pathlib.Path, *, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes the suite's CSVs, markdown, JSON summary and figures (module docstring).

    Returns:
        The summary written to evaluation.json.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = summarise(results)
    variants = settings.variants()
    csv_files.write_dict_rows(out_dir / "decisions.csv", decision_rows(results, tokenizer))
    for name in ("models", "regrets", "action_types"):
        csv_files.write_dict_rows(out_dir / f"{name}.csv", tables[name])
    title = "Generalisation" + (f": {meta['condition']}" if meta and meta.get("condition") else "")
    workdir_lib.write_text_atomic(out_dir / "regrets.md", regrets_markdown(tables, variants, title))
    plot_regrets(tables, variants, out_dir / "regrets.png")
    plot_action_types(tables, variants[0], out_dir / "action_types.png")
    files = ["decisions.csv", "models.csv", "regrets.csv", "action_types.csv", "regrets.md", "regrets.png",
             "action_types.png"]
    if results.beyond:
        csv_files.write_dict_rows(out_dir / "beyond_decisions.csv", beyond_decision_rows(results, tokenizer))
        csv_files.write_dict_rows(out_dir / "beyond.csv", tables["beyond"])
        plot_beyond(tables, out_dir / "beyond.png")
        files += ["beyond_decisions.csv", "beyond.csv", "beyond.png"]
    summary = {
        **(meta or {}),
        "settings": json.loads(json.dumps(dataclasses.asdict(settings))),
        "models": [dataclasses.asdict(m) for m in results.models],
        "protocol": {"initial_states": results.initial_states.tolist(),
                     "opponent_moves": results.opponent_moves.tolist()},
        "regrets": tables["regrets"],
        "action_types": tables["action_types"],
        "beyond": tables["beyond"],
        "files": files + ["evaluation.json"],
    }
    workdir_lib.write_text_atomic(out_dir / "evaluation.json", json.dumps(summary, indent=2) + "\n")
    return summary
