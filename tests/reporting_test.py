"""Tests for moraljax.reporting: CSV rows, resume, summary, plots, TensorBoard.

Chunks are synthetic, with action types chosen so that every count, share
and confidence interval can be worked out by hand.
"""

import csv
import json
import math
import pathlib
import struct

import matplotlib.image
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from moraljax import reporting
from moraljax.output import figures
from moraljax.output import names
from moraljax.output import run_report
from moraljax.output import statistics

# Action type indices, typed out from SPEC.md section 8.
CC, CD, DC, DD, IC, ID = range(6)
B = 5

LEARNERS = [
    {"learner": 0, "seed": 0, "condition": "util_vs_tft", "player": 0},
    {"learner": 1, "seed": 1, "condition": "util_vs_tft", "player": 0},
    {"learner": 2, "seed": 0, "condition": "game->deont_vs_tft", "player": 0},
]


def make_chunk(episodes, action_type, reward=None, opponent_legal=None,
               updates=None):
    """Decisions/updates dicts for a chunk; action_type is [K, N, B]."""
    action_type = np.asarray(action_type, np.int32)
    shape = action_type.shape
    if reward is None:
        reward = np.zeros(shape, np.float32)
    reward = np.asarray(reward, np.float32)
    decisions = {
        "action_type": action_type,
        "opponent_legal": (np.ones(shape, bool) if opponent_legal is None
                           else np.asarray(opponent_legal, bool)),
        "reward": reward,
        "reward_game": reward + 1.0,
        "reward_deont": -reward,
        "reward_util": 2.0 * reward,
        "reward_game_deont": reward - 3.0,
        **{key: reward + 0.5 for key in names.REWARD_KEYS[5:]},
        "regret_deont": np.full(shape, 0.5, np.float32),
        "regret_util": np.full(shape, 0.25, np.float32),
    }
    k, n = shape[:2]
    if updates is None:
        updates = {
            "value_loss": np.arange(k * n, dtype=np.float32).reshape(k, n),
            "beta": np.full((k, n), 0.2, np.float32),
        }
    return np.asarray(episodes, np.int64), decisions, updates


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def uniform_chunk(episodes, num_learners, action, reward=0.0):
    k = len(episodes)
    return make_chunk(episodes, np.full((k, num_learners, B), action),
                      reward=np.full((k, num_learners, B), reward))


# ---------------------------------------------------------------------------
# metrics.csv


def test_rows_and_counts_by_hand(tmp_path):
    action_type = np.array([
        # episode 10: learner 0, 1, 2
        [[CC, CC, CD, DD, ID], [DC, DC, DC, DC, DC], [IC, IC, ID, CC, DD]],
        # episode 11
        [[CC, CC, CC, CC, CC], [DD, CD, DC, IC, ID], [ID, ID, ID, ID, ID]],
    ])
    reward = np.zeros(action_type.shape)
    reward[0, 0] = [1, 2, 3, 4, 5]
    chunk = make_chunk([10, 11], action_type, reward=reward)
    with reporting.RunWriter(tmp_path, LEARNERS, is_writer=True,
                             start_episode=10) as writer:
        writer.write_chunk(*chunk)
    path = tmp_path / "metrics.csv"
    header = next(csv.reader(path.open()))
    assert header == [
        "episode", "learner", "seed", "condition", "player",
        "n_C|C", "n_C|D", "n_D|C", "n_D|D", "n_illegal|C", "n_illegal|D",
        "illegal_share", "reward", "reward_game", "reward_deont",
        "reward_util", "reward_game_deont", "reward_virtue_equality",
        "reward_virtue_kindness", "reward_virtue_mixed", "reward_altruist",
        "reward_anti_util", "reward_malicious_deont", "reward_virtue_inequality",
        "reward_virtue_aggressiveness", "reward_anti_altruist",
        "regret_deont", "regret_util", "beta", "value_loss"]
    rows = read_rows(path)
    assert [(r["episode"], r["learner"]) for r in rows] == [
        ("10", "0"), ("10", "1"), ("10", "2"),
        ("11", "0"), ("11", "1"), ("11", "2")]
    expected_counts = [
        (2, 1, 0, 1, 0, 1), (0, 0, 5, 0, 0, 0), (1, 0, 0, 1, 2, 1),
        (5, 0, 0, 0, 0, 0), (0, 1, 1, 1, 1, 1), (0, 0, 0, 0, 0, 5)]
    expected_illegal = [0.2, 0.0, 0.6, 0.0, 0.4, 1.0]
    for row, counts, illegal in zip(rows, expected_counts, expected_illegal):
        assert tuple(int(row[c]) for c in names.COUNT_COLUMNS) == counts
        assert float(row["illegal_share"]) == pytest.approx(illegal)
    first = rows[0]
    assert (first["seed"], first["condition"], first["player"]) == (
        "0", "util_vs_tft", "0")
    assert rows[2]["condition"] == "game->deont_vs_tft"
    assert float(first["reward"]) == pytest.approx(3.0)
    assert float(first["reward_game"]) == pytest.approx(4.0)
    assert float(first["reward_deont"]) == pytest.approx(-3.0)
    assert float(first["reward_util"]) == pytest.approx(6.0)
    assert float(first["reward_game_deont"]) == pytest.approx(0.0)
    assert float(first["regret_deont"]) == pytest.approx(0.5)
    assert float(first["regret_util"]) == pytest.approx(0.25)
    # value_loss = arange(6).reshape(2, 3): row (episode 11, learner 1) -> 4.
    assert [float(r["value_loss"]) for r in rows] == [0, 1, 2, 3, 4, 5]
    assert float(rows[4]["beta"]) == pytest.approx(0.2)


def test_opponent_illegal_column_for_llm_opponents(tmp_path):
    learners = [
        {"learner": 0, "seed": 3, "condition": "util_vs_llm", "player": 0},
        {"learner": 1, "seed": 3, "condition": "util_vs_llm", "player": 1},
    ]
    action_type = np.full((1, 2, 3), CC)
    opponent_legal = np.array([[[True, False, False], [True, True, False]]])
    chunk = make_chunk([0], action_type, opponent_legal=opponent_legal)
    with reporting.RunWriter(tmp_path, learners, is_writer=True,
                             opponent_is_llm=[True, True]) as writer:
        writer.write_chunk(*chunk)
    rows = read_rows(tmp_path / "metrics.csv")
    assert [int(r["n_opp_illegal"]) for r in rows] == [2, 1]
    assert [r["player"] for r in rows] == ["0", "1"]
    summary = run_report.summarise(tmp_path / "metrics.csv")
    assert list(summary["groups"]) == ["util_vs_llm/player0",
                                       "util_vs_llm/player1"]
    player0 = summary["groups"]["util_vs_llm/player0"]
    assert player0["mean"]["opponent_illegal"] == pytest.approx(2 / 3)


def test_fixed_opponents_have_no_opponent_illegal_column(tmp_path):
    with reporting.RunWriter(tmp_path, LEARNERS, is_writer=True) as writer:
        writer.write_chunk(*uniform_chunk([0], 3, CC))
    assert "n_opp_illegal" not in read_rows(tmp_path / "metrics.csv")[0]


def test_resume_truncates_and_never_duplicates(tmp_path):
    path = tmp_path / "metrics.csv"
    with reporting.RunWriter(tmp_path, LEARNERS, is_writer=True) as writer:
        writer.write_chunk(*uniform_chunk(range(0, 5), 3, CC, reward=1.0))
        writer.write_chunk(*uniform_chunk(range(5, 10), 3, CC, reward=1.0))
    original = path.read_text().splitlines(keepends=True)
    assert len(original) == 1 + 10 * 3
    (tmp_path / "other.txt").write_text("untouched")

    writer = reporting.RunWriter(tmp_path, LEARNERS, is_writer=True,
                                 start_episode=5)
    # Construction alone keeps the header and episodes 0-4, byte for byte.
    assert path.read_text().splitlines(keepends=True) == original[:1 + 5 * 3]
    writer.write_chunk(*uniform_chunk(range(5, 10), 3, DD, reward=2.0))
    writer.close()

    lines = path.read_text().splitlines(keepends=True)
    assert lines[:1 + 5 * 3] == original[:1 + 5 * 3]
    rows = read_rows(path)
    keys = [(int(r["episode"]), int(r["learner"])) for r in rows]
    assert len(keys) == len(set(keys)) == 30
    assert sorted({e for e, _ in keys}) == list(range(10))
    for row in rows:
        resumed = int(row["episode"]) >= 5
        assert int(row["n_D|D"]) == (B if resumed else 0)
        assert float(row["reward"]) == (2.0 if resumed else 1.0)
    assert (tmp_path / "other.txt").read_text() == "untouched"


def test_resume_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.csv"
    with reporting.RunWriter(tmp_path, LEARNERS, is_writer=True) as writer:
        writer.write_chunk(*uniform_chunk(range(0, 3), 3, CC))
    with path.open("a") as handle:
        handle.write("3,0,0,util_vs")  # Killed mid-row.
    reporting.RunWriter(tmp_path, LEARNERS, is_writer=True,
                        start_episode=3).close()
    assert len(read_rows(path)) == 9


def test_refuses_episodes_already_written(tmp_path):
    with reporting.RunWriter(tmp_path, LEARNERS, is_writer=True,
                             start_episode=5) as writer:
        with pytest.raises(ValueError, match="episodes start at 4"):
            writer.write_chunk(*uniform_chunk([4], 3, CC))
        writer.write_chunk(*uniform_chunk([5, 6], 3, CC))
        with pytest.raises(ValueError, match="duplicated"):
            writer.write_chunk(*uniform_chunk([6], 3, CC))


def test_resume_refuses_different_columns(tmp_path):
    with reporting.RunWriter(tmp_path, LEARNERS, is_writer=True) as writer:
        writer.write_chunk(*uniform_chunk([0, 1], 3, CC))
    episodes, decisions, _ = uniform_chunk([1], 3, CC)
    with reporting.RunWriter(tmp_path, LEARNERS, is_writer=True,
                             start_episode=1) as writer:
        with pytest.raises(ValueError, match="has columns"):
            writer.write_chunk(episodes, decisions,
                               {"kl_k3": np.zeros((1, 3), np.float32)})


def test_not_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    writer = reporting.RunWriter(workdir, LEARNERS, is_writer=False)
    writer.write_chunk(*uniform_chunk(range(3), 3, CC))
    writer.save_config({"a": 1})
    assert writer.write_report() is None
    writer.close()
    assert not workdir.exists()

    # Nor does it truncate an existing run's metrics on resume.
    with reporting.RunWriter(workdir, LEARNERS, is_writer=True) as owner:
        owner.write_chunk(*uniform_chunk(range(4), 3, CC))
    before = (workdir / "metrics.csv").read_bytes()
    listing = sorted(p.name for p in workdir.rglob("*"))
    other = reporting.RunWriter(workdir, LEARNERS, is_writer=False,
                                start_episode=1)
    other.write_chunk(*uniform_chunk([1, 2], 3, DD))
    other.close()
    assert (workdir / "metrics.csv").read_bytes() == before
    assert sorted(p.name for p in workdir.rglob("*")) == listing


def test_same_inputs_give_identical_csv(tmp_path):
    rng = np.random.default_rng(0)
    action_type = rng.integers(0, 6, size=(4, 3, B))
    reward = rng.normal(size=(4, 3, B))
    for name in ("a", "b"):
        with reporting.RunWriter(tmp_path / name, LEARNERS,
                                 is_writer=True) as writer:
            writer.write_chunk(*make_chunk(range(4), action_type, reward))
    assert ((tmp_path / "a" / "metrics.csv").read_bytes()
            == (tmp_path / "b" / "metrics.csv").read_bytes())


@pytest.mark.parametrize("mutate, message", [
    (lambda d, u: d.pop("regret_util"), "lacks"),
    (lambda d, u: d.__setitem__("action_type", d["action_type"] + 6),
     "indices into"),
    (lambda d, u: d.__setitem__("action_type", d["action_type"][:, :2]),
     r"\[K, N, B\]"),
    (lambda d, u: d.__setitem__("reward", d["reward"][..., :2]), "reward"),
    (lambda d, u: d.__setitem__("opponent_legal",
                                d["opponent_legal"].astype(int)), "bool"),
    (lambda d, u: u.__setitem__("beta", np.zeros(3)), "beta"),
])
def test_bad_chunks_are_refused(tmp_path, mutate, message):
    episodes, decisions, updates = uniform_chunk([0], 3, CC)
    mutate(decisions, updates)
    with reporting.RunWriter(tmp_path, LEARNERS, is_writer=True) as writer:
        with pytest.raises(ValueError, match=message):
            writer.write_chunk(episodes, decisions, updates)


@pytest.mark.parametrize("learners, message", [
    ([], "learners"),
    ([{"learner": 0, "seed": 0, "condition": "c"}], "player"),
    ([{"learner": 0, "seed": 0, "condition": "c", "player": 2}], "player"),
    ([{"learner": 0, "seed": 0, "condition": "c", "player": 0},
      {"learner": 1, "seed": 0, "condition": "c", "player": 0}], "unique"),
])
def test_bad_learners_are_refused(tmp_path, learners, message):
    with pytest.raises(ValueError, match=message):
        reporting.RunWriter(tmp_path, learners, is_writer=False)


# ---------------------------------------------------------------------------
# Summary


def write_two_seed_run(workdir, num_episodes=10):
    """util_vs_tft with 2 seeds + game->deont_vs_tft with 1 seed.

    Episodes before the last two are all illegal (to prove they are left
    out). Episode 8: seed 0 all C|C, seed 1 all D|D. Episode 9 (the final
    10%): seed 0 has 4 C|C + 1 D|D and reward 2, seed 1 has 3 C|C + 2 D|D
    and reward 4. The third learner plays D|C throughout with reward 1.
    """
    action_type = np.full((num_episodes, 3, B), ID)
    reward = np.full((num_episodes, 3, B), -6.0)
    action_type[-2, 0], action_type[-2, 1] = CC, DD
    reward[-2, :2] = 0.0
    action_type[-1, 0] = [CC, CC, CC, CC, DD]
    action_type[-1, 1] = [CC, DD, CC, DD, CC]
    reward[-1, 0], reward[-1, 1] = 2.0, 4.0
    action_type[:, 2], reward[:, 2] = DC, 1.0
    with reporting.RunWriter(workdir, LEARNERS, is_writer=True) as writer:
        writer.write_chunk(*make_chunk(range(num_episodes), action_type,
                                       reward))
    return workdir / "metrics.csv"


def test_summary_shares_and_ci_by_hand(tmp_path):
    summary = run_report.summarise(write_two_seed_run(tmp_path))
    util = summary["groups"]["util_vs_tft"]
    assert (util["num_runs"], util["num_episodes"]) == (2, 10)
    assert util["final_window"] == [9, 9]
    assert util["num_final_episodes"] == 1
    seed0, seed1 = util["runs"]
    assert (seed0["seed"], seed1["seed"]) == (0, 1)
    assert seed0["share_C|C"] == pytest.approx(0.8)
    assert seed0["share_D|D"] == pytest.approx(0.2)
    assert seed1["share_C|C"] == pytest.approx(0.6)
    assert seed1["cooperation"] == pytest.approx(0.6)
    assert seed1["defection"] == pytest.approx(0.4)
    assert seed1["illegal"] == 0.0
    # mean(0.8, 0.6) = 0.7; sd = 0.1 * sqrt(2); ci = 1.96 * sd / sqrt(2).
    assert util["mean"]["cooperation"] == pytest.approx(0.7)
    assert util["ci95"]["cooperation"] == pytest.approx(0.196)
    assert util["mean"]["defection"] == pytest.approx(0.3)
    assert util["ci95"]["defection"] == pytest.approx(0.196)
    assert util["mean"]["reward"] == pytest.approx(3.0)
    assert util["ci95"]["reward"] == pytest.approx(1.96)
    assert util["mean"]["reward_util"] == pytest.approx(6.0)
    assert util["mean"]["regret_util"] == pytest.approx(0.25)
    unlearning = summary["groups"]["game->deont_vs_tft"]
    assert unlearning["num_runs"] == 1
    assert unlearning["mean"]["share_D|C"] == 1.0
    assert unlearning["ci95"]["share_D|C"] == 0.0
    assert unlearning["ci95"]["reward"] == 0.0


def test_summary_window_fraction(tmp_path):
    path = write_two_seed_run(tmp_path)
    # 20% of 10 episodes = episodes 8 and 9: seed 0 has 9/10 C|C, seed 1 3/10.
    util = run_report.summarise(path, final_fraction=0.2)["groups"][
        "util_vs_tft"]
    assert util["final_window"] == [8, 9]
    assert [r["share_C|C"] for r in util["runs"]] == pytest.approx([0.9, 0.3])
    assert util["mean"]["share_C|C"] == pytest.approx(0.6)
    assert util["ci95"]["share_C|C"] == pytest.approx(
        1.96 * np.std([0.9, 0.3], ddof=1) / math.sqrt(2))
    # The window never falls below one episode, and rounds up.
    assert run_report.summarise(path, final_fraction=0.01)["groups"][
        "util_vs_tft"]["num_final_episodes"] == 1
    path15 = write_two_seed_run(tmp_path / "fifteen", num_episodes=15)
    assert run_report.summarise(path15)["groups"]["util_vs_tft"][
        "num_final_episodes"] == 2
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="final_fraction"):
            run_report.summarise(path, final_fraction=bad)


def test_write_summary_json_and_markdown(tmp_path):
    summary = run_report.summarise(write_two_seed_run(tmp_path))
    run_report.write_summary(tmp_path, summary)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    markdown = (tmp_path / "summary.md").read_text()
    assert "## util_vs_tft" in markdown
    assert "## game->deont_vs_tft" in markdown
    assert "| seed | C\\|C | C\\|D |" in markdown
    assert "mean ± 95% CI" in markdown
    assert "0.700 ± 0.196" in markdown
    assert "10 episodes, 2 runs" in markdown


def test_mean_and_ci95_by_hand():
    mean, ci = statistics.mean_and_ci95(
        np.array([[1.0, 5.0, np.nan], [3.0, np.nan, np.nan]]))
    np.testing.assert_allclose(mean[:2], [2.0, 5.0])
    np.testing.assert_allclose(ci[:2], [1.96, 0.0])
    assert np.isnan(mean[2]) and np.isnan(ci[2])


def test_group_labels():
    assert names.group_labels(["a", "b", "b"], [0, 0, 1]) == [
        "a", "b/player0", "b/player1"]


def test_save_resolved_config(tmp_path):
    config = {"ppo": {"learning_rate": 1e-5, "batch_size": 5}, "game": "IPD"}
    reporting.save_resolved_config(tmp_path / "run", config)
    text = (tmp_path / "run" / "config.json").read_text()
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert text.index('"game"') < text.index('"ppo"')
    with pytest.raises(TypeError):
        reporting.save_resolved_config(tmp_path, {"bad": object()})


# ---------------------------------------------------------------------------
# Plots


def _hex_rgb(colour):
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255.0


def _has_colour(image, colour):
    return np.any(np.all(np.abs(image[..., :3] - _hex_rgb(colour)) < 2e-3,
                         axis=-1))


def test_plot_action_types(tmp_path):
    path = write_two_seed_run(tmp_path)
    out = tmp_path / "types.png"
    run_report.plot_action_types(path, out)
    assert out.stat().st_size > 10_000
    image = matplotlib.image.imread(out)
    # Two conditions -> two 5 x 3.5 inch panels side by side at 100 dpi.
    assert image.shape[:2] == (350, 1000)
    for name in ("D|C", "illegal|D", "C|C", "D|D"):
        assert _has_colour(image, figures.ACTION_TYPE_COLORS[name]), name

    one = tmp_path / "one.png"
    run_report.plot_action_types(path, one, condition="game->deont_vs_tft",
                                smoothing_window=3)
    image = matplotlib.image.imread(one)
    assert image.shape[:2] == (350, 500)
    # The legend names all six types, but only D|C fills area here: the
    # large C|C area of the other condition is absent.
    assert (np.sum(np.all(np.abs(image[..., :3] - _hex_rgb(
        figures.ACTION_TYPE_COLORS["D|C"])) < 2e-3, axis=-1)) > 10_000)
    assert (np.sum(np.all(np.abs(image[..., :3] - _hex_rgb(
        figures.ACTION_TYPE_COLORS["C|C"])) < 2e-3, axis=-1)) < 1_000)

    with pytest.raises(ValueError, match="condition"):
        run_report.plot_action_types(path, one, condition="ut_vs_tft")
    with pytest.raises(ValueError, match="smoothing_window"):
        run_report.plot_action_types(path, one, smoothing_window=0)


def test_plot_rewards(tmp_path):
    path = write_two_seed_run(tmp_path)
    out = tmp_path / "rewards.png"
    run_report.plot_rewards(path, out, reward_keys=("reward", "reward_util"))
    assert out.stat().st_size > 10_000
    assert matplotlib.image.imread(out).shape[:2] == (350, 1000)
    with pytest.raises(ValueError, match="reward_keys"):
        run_report.plot_rewards(path, out, reward_keys=("reward_selfish",))


def test_moving_average_is_trailing():
    np.testing.assert_allclose(
        run_report.moving_average(np.array([[0.0, 3.0, 6.0, 9.0]]), 2),
        [[0.0, 1.5, 4.5, 7.5]])


def test_write_report_makes_every_file(tmp_path):
    write_two_seed_run(tmp_path)
    writer = reporting.RunWriter(tmp_path, LEARNERS, is_writer=True,
                                 start_episode=10)
    writer.save_config({"seed": 0})
    summary = writer.write_report()
    writer.close()
    assert summary["groups"]["util_vs_tft"]["mean"]["cooperation"] == (
        pytest.approx(0.7))
    for name in ("action_types.png", "rewards.png", "summary.json",
                 "summary.md", "config.json", "metrics.csv"):
        assert (tmp_path / name).stat().st_size > 0, name


# ---------------------------------------------------------------------------
# TensorBoard


def read_scalars(tb_dir):
    """{(tag, step): value} from every event file (TFRecord framing)."""
    scalars = {}
    for path in sorted(pathlib.Path(tb_dir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            record = data[offset + 12:offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
    return scalars


def test_tensorboard_scalars_averaged_over_seeds(tmp_path):
    write_two_seed_run(tmp_path)
    event_files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(event_files) == 1 and event_files[0].stat().st_size > 0
    scalars = read_scalars(tmp_path / "tb")
    # Episode 9: C|C shares 0.8 and 0.6 -> 0.7; rewards 2 and 4 -> 3.
    assert scalars[("util_vs_tft/action_share/C_given_C", 9)] == (
        pytest.approx(0.7))
    assert scalars[("util_vs_tft/reward/reward", 9)] == pytest.approx(3.0)
    assert scalars[("util_vs_tft/action_share/illegal", 0)] == 1.0
    assert scalars[("game_to_deont_vs_tft/action_share/D_given_C", 4)] == 1.0
    assert scalars[("util_vs_tft/regret/regret_deont", 3)] == (
        pytest.approx(0.5))
    assert scalars[("util_vs_tft/ppo/beta", 9)] == pytest.approx(0.2)
    # value_loss[k, n] = 3k + n: seeds 0 and 1 at episode 2 -> 6.5.
    assert scalars[("util_vs_tft/ppo/value_loss", 2)] == pytest.approx(6.5)
    assert len({step for _, step in scalars}) == 10
