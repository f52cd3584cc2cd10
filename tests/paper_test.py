"""The paper's run matrix (configs/paper.py, moraljax/paper.py): config, findings, end to end."""

import json
import pathlib

import numpy as np
import pytest

from moraljax import cli
from moraljax import games
from moraljax import paper

ROOT = pathlib.Path(__file__).resolve().parents[1]


def paper_config(arg=None):
    return cli.config_from_file(f"{ROOT / 'configs' / 'paper.py'}" + (f":{arg}" if arg else ""))


def test_config_holds_the_papers_run_matrix_in_two_programs():
    suite = paper.suite_from_config_dict(paper_config())
    assert [name for name, _ in suite.programs] == ["vs_tft", "vs_llm"]
    expected = ["game", "deont", "util", "game_deont", "game->deont", "game->util"]
    for (_, cfg), opponent, batch in zip(suite.programs, ("tft", "llm"), (5, 3)):
        assert [c.name for c in cfg.all_conditions()] == [f"{r}_vs_{opponent}" for r in expected]
        assert cfg.run.batch_size == batch
        assert cfg.run.num_episodes == 1000
        assert cfg.run.seeds == (1, 2, 3, 5, 6)
        switches = [c.reward.switch_episode for c in cfg.all_conditions() if c.reward.switch_to]
        assert switches == [500, 500]
    short = paper.suite_from_config_dict(paper_config("episodes=40"))
    assert [c.reward.switch_episode for c in short.programs[0][1].all_conditions() if c.reward.switch_to] == [20, 20]


@pytest.mark.parametrize("arg, message", [
    ("episodes=abc", "episodes='abc'.*integer >= 2"),
    ("episodes=1", "episodes='1'.*integer >= 2"),
    ("opponent=tft", "unknown config variant 'opponent=tft'"),
])
def test_bad_variants_are_refused(arg, message):
    with pytest.raises(ValueError, match=message):
        paper_config(arg)


def test_bad_suite_sections_are_refused():
    config = paper_config()
    config.extra = 1
    with pytest.raises(ValueError, match=r"unknown suite section\(s\) \['extra'\]"):
        paper.suite_from_config_dict(config)
    config = paper_config()
    config.programs.vs_tft.run.batch_size = 0
    with pytest.raises(ValueError, match="programs.vs_tft: .*run.batch_size"):
        paper.suite_from_config_dict(config)
    config = paper_config()
    config.evaluation.games = ("IPD", "XYZ")
    with pytest.raises(ValueError, match="games"):
        paper.suite_from_config_dict(config)


# ----------------------------------------------------------------------------
# Findings on made-up numbers: the criteria, not the plumbing.


def _program(final_shares, eval_types, eval_regrets, before_switch):
    """A ProgramResults of the vs_tft program with the given numbers.

    final_shares: {reward label: {action type: share}} of the final window;
    before_switch: action-type shares of both unlearning runs just before
    their switch (episodes 400-499 of 1000).
    """
    cfg = dict(paper.suite_from_config_dict(paper_config()).programs)["vs_tft"]
    groups, columns = {}, {"episode": [], "condition": [], "player": []}
    columns.update({f"n_{n}": [] for n in games.ACTION_TYPE_NAMES})
    for condition in cfg.all_conditions():
        shares = final_shares[condition.name.rsplit("_vs_", 1)[0]]
        mean = {f"share_{n}": shares.get(n, 0.0) for n in games.ACTION_TYPE_NAMES}
        mean["cooperation"] = mean["share_C|C"] + mean["share_C|D"]
        mean["defection"] = mean["share_D|C"] + mean["share_D|D"]
        mean["illegal"] = mean["share_illegal|C"] + mean["share_illegal|D"]
        groups[condition.name] = {"condition": condition.name, "mean": mean}
        for episode, window_shares in ((0, {"illegal|C": 0.2, "C|C": 0.8}), (450, before_switch),
                                       (999, shares)):
            columns["episode"].append(episode)
            columns["condition"].append(condition.name)
            columns["player"].append(0)
            for n in games.ACTION_TYPE_NAMES:
                columns[f"n_{n}"].append(round(1000 * window_shares.get(n, 0.0)))
    columns = {k: np.asarray(v) for k, v in columns.items()}
    rows = {"regrets": [], "action_types": []}
    for kind, per_game in eval_types.items():
        for game_name, shares in per_game.items():
            base = {"kind": kind, "game": game_name, "actions": "action3/action4", "table_order": "original"}
            rows["action_types"].append({**base, **{f"share_{n}_mean": shares.get(n, 0.0)
                                                    for n in games.ACTION_TYPE_NAMES}})
            deont, util = eval_regrets[kind][game_name]
            rows["regrets"].append({**base, "regret_deont_mean": deont, "regret_util_mean": util})
    evaluation = {"settings": {"actions": ["action3", "action4"], "table_orders": ["original"], "extra_actions": [],
                               "games": list(next(iter(eval_types.values())))}, **rows}
    return paper.ProgramResults("vs_tft", cfg, {"groups": groups}, columns, evaluation)


def _findings(program):
    found = paper.training_findings(program) + paper.generalisation_findings(program)
    verdicts = {f.finding: f.verdict for f in found}
    assert len(verdicts) == len(found) == 12
    return verdicts


def _verdict(verdicts, prefix):
    (verdict,) = [v for finding, v in verdicts.items() if finding.startswith(prefix)]
    return verdict


GOOD_FINAL = {
    "game": {"D|D": 0.8, "D|C": 0.2},
    "deont": {"C|C": 0.5, "D|D": 0.3, "C|D": 0.2},
    "util": {"C|C": 0.8, "C|D": 0.2},
    "game_deont": {"C|C": 0.4, "D|D": 0.4, "C|D": 0.15, "D|C": 0.05},
    "game->deont": {"C|C": 0.3, "D|D": 0.5, "C|D": 0.2},
    "game->util": {"C|C": 0.5, "D|D": 0.3, "C|D": 0.2},
}
GOOD_TYPES = {
    "util_vs_tft": {"IPD": {"C|C": 0.5, "C|D": 0.5}, "ICD": {"C|C": 0.6, "C|D": 0.4}},
    "game_vs_tft": {"IPD": {"D|C": 0.5, "D|D": 0.5}, "ICD": {"D|C": 0.5, "D|D": 0.5}},
    "deont_vs_tft": {"IPD": {"C|C": 0.5, "D|D": 0.5}, "ICD": {"C|C": 0.5, "D|D": 0.5}},
    "base": {"IPD": {"illegal|C": 0.5, "illegal|D": 0.45}, "ICD": {"illegal|C": 0.5, "illegal|D": 0.45}},
}
GOOD_REGRETS = {
    "util_vs_tft": {"IPD": (1.0, 0.2), "ICD": (1.0, 0.6)},
    "game_vs_tft": {"IPD": (2.0, 0.5), "ICD": (2.0, 0.1)},
    "deont_vs_tft": {"IPD": (0.1, 0.3), "ICD": (0.1, 0.3)},
    "base": {"IPD": (5.0, 0.9), "ICD": (5.0, 0.9)},
}


def test_findings_are_reproduced_by_paper_like_numbers():
    verdicts = _findings(_program(GOOD_FINAL, GOOD_TYPES, GOOD_REGRETS, before_switch={"D|D": 0.8, "D|C": 0.2}))
    # The illegal share of episodes 0-9 is 0.2 here, not dominant: partly.
    assert verdicts.pop("Illegal outputs dominate the first tens of episodes, then vanish.") == paper.PARTLY
    assert set(verdicts.values()) == {paper.REPRODUCED}, verdicts


def test_findings_fail_on_contrary_numbers():
    final = dict(GOOD_FINAL, util={"C|C": 0.3, "D|D": 0.7}, game={"C|C": 0.8, "C|D": 0.2},
                 deont={"C|C": 0.8, "D|C": 0.2}, **{"game->util": {"C|C": 0.9, "C|D": 0.1}})
    types = dict(GOOD_TYPES, util_vs_tft={"IPD": {"D|D": 1.0}, "ICD": {"D|D": 1.0}},
                 game_vs_tft={"IPD": {"C|C": 1.0}, "ICD": {"C|C": 1.0}},
                 base={"IPD": {"C|C": 1.0}, "ICD": {"C|C": 1.0}})
    regrets = dict(GOOD_REGRETS, deont_vs_tft={"IPD": (3.0, 0.3), "ICD": (3.0, 0.3)},
                   util_vs_tft={"IPD": (1.0, 0.7), "ICD": (1.0, 0.2)})
    verdicts = _findings(_program(final, types, regrets, before_switch={"C|C": 0.9, "C|D": 0.1}))
    assert _verdict(verdicts, "Game reward") == paper.NOT_REPRODUCED
    assert _verdict(verdicts, "Utilitarian") == paper.NOT_REPRODUCED
    assert _verdict(verdicts, "Deontological: D|C") == paper.NOT_REPRODUCED
    assert _verdict(verdicts, "Unlearning (Game->util)") == paper.NOT_REPRODUCED
    assert _verdict(verdicts, "Generalisation: De-trained") == paper.NOT_REPRODUCED
    assert _verdict(verdicts, "Generalisation: the Ut model") == paper.NOT_REPRODUCED
    assert _verdict(verdicts, "Generalisation: models carry") == paper.NOT_REPRODUCED
    assert _verdict(verdicts, "Generalisation: the untrained base") == paper.NOT_REPRODUCED


# ----------------------------------------------------------------------------
# End to end, tiny: both programs, the evaluation and the report.


def small_suite(episodes=6):
    config = paper_config(f"episodes={episodes}")
    for name in config.programs:
        config.programs[name].run.seeds = (1,)
        config.programs[name].run.episodes_per_chunk = 3
        config.programs[name].run.checkpoint_every = 3
    config.evaluation.update(games=("IPD", "ICD"), table_orders=("original",), extra_actions=(),
                             value_preambles=(), beyond_families=(), episodes=2)
    return paper.suite_from_config_dict(config)


def test_suite_trains_evaluates_and_reports(tmp_path):
    workdir = tmp_path / "paper"
    report = paper.run_suite(small_suite(), workdir, progress=False)
    for program, learners in (("vs_tft", 6), ("vs_llm", 12)):
        summary = json.loads((workdir / program / "summary.json").read_text())
        assert sum(g["num_runs"] for g in summary["groups"].values()) == learners
        evaluation = json.loads((workdir / program / "evaluation" / "evaluation.json").read_text())
        kinds = {row["kind"] for row in evaluation["regrets"]}
        assert kinds == {f"{r}_vs_{program[3:]}" for r in ("game", "deont", "util", "game_deont", "game->deont",
                                                           "game->util")} | {"base"}
        assert (workdir / program / "adapters").is_dir()
    findings = report["findings"]
    assert {f["program"] for f in findings} == {"vs_tft", "vs_llm"}
    assert len(findings) == 24
    assert {f["verdict"] for f in findings} <= {paper.REPRODUCED, paper.PARTLY, paper.NOT_REPRODUCED}
    text = (workdir / paper.REPORT_FILENAME).read_text()
    assert "## vs_tft: training" in text and "## vs_llm: generalisation" in text
    assert "game->util_vs_llm/player1" in text
    assert json.loads((workdir / paper.REPORT_JSON).read_text())["findings"] == findings

    # Another config in the same workdir is refused before anything changes.
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="different config"):
        paper.run_suite(small_suite(episodes=8), workdir, progress=False)
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == before
