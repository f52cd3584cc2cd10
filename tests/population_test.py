"""Populations of morally diverse learners (issue 13): matching, learning, sharding, resume, outputs."""

import csv
import json
import pathlib

import jax
import numpy as np
import pytest

from moraljax import cli
from moraljax import config_lib
from moraljax import population_report
from moraljax import run_setup
from moraljax import train
from moraljax.rl import rollout
from moraljax.evaluation import protocol

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def population_config(composition, **run):
    config = cli.config_from_file(f"{CONFIGS / 'population.py'}:population=small")
    config.population.composition = composition
    config.run.seeds = run.pop("seeds", (1,))
    for key, value in run.items():
        config.run[key] = value
    return config_lib.experiment_from_config_dict(config)


def test_pairing_is_a_fresh_perfect_matching_inside_each_population():
    keys = jax.vmap(jax.random.PRNGKey)(np.arange(12))
    pairing = jax.jit(rollout.population_pairing, static_argnums=1)
    seen = set()
    for episode in range(20):
        episode_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, episode)
        partner, player = (np.asarray(x) for x in pairing(episode_keys, 6))
        for n in range(12):
            assert partner[n] != n and partner[partner[n]] == n
            assert partner[n] // 6 == n // 6  # Inside its own population.
            assert {player[n], player[partner[n]]} == {0, 1}
        seen.add(tuple(partner[:6]))
    assert len(seen) > 5  # Redrawn every episode (15 matchings of 6).


@pytest.mark.parametrize("composition, fragment", [
    ("util:3", "even total"), ("util:1,utility:1", "types from"), ("util:1,util:1", "each once"),
    ("util:0,game:2", "counts >= 1"), ("util", "type:count")])
def test_bad_composition_is_one_line(composition, fragment):
    with pytest.raises(ValueError, match=f"population.composition='{composition}' is not allowed") as error:
        population_config(composition)
    assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.fixture(scope="module")
def population_run(tmp_path_factory):
    """UT, S, VEk and Vagg members (2 each), random matching, one seed, through train.train."""
    workdir = tmp_path_factory.mktemp("population")
    cfg = population_config("util:2,game:2,virtue_kindness:2,virtue_aggressiveness:2",
                            num_episodes=80, episodes_per_chunk=40, checkpoint_every=40)
    summary = train.train(cfg, workdir, progress=False)
    return workdir, summary


def test_moral_types_learn_their_behaviour(population_run):
    workdir, summary = population_run
    # Final 10% of 80 episodes: 8 episodes x 3 decisions x 2 members per type.
    types = summary["population"]["types"]
    cooperation = {name: entry["mean"]["cooperation"] for name, entry in types.items()}
    defection = {name: entry["mean"]["defection"] for name, entry in types.items()}
    assert cooperation["util"] >= cooperation["game"] + 0.6, cooperation
    assert cooperation["virtue_kindness"] >= 0.9, cooperation
    assert defection["virtue_aggressiveness"] >= 0.9, defection
    assert defection["game"] >= 0.8, defection
    # The ordinary summary groups members by type too (one panel per type in action_types.png).
    assert set(summary["groups"]) == set(types)
    assert summary["groups"]["util"]["num_runs"] == 2


def test_population_outputs(population_run):
    workdir, summary = population_run
    for name in ("who_played_whom.png", "social_outcomes.png", "action_types.png", "population_summary.md"):
        assert (workdir / name).stat().st_size > 0, name
    with (workdir / "population.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 80 * 8
    by_episode_learner = {(int(r["episode"]), int(r["learner"])): r for r in rows}
    for (episode, learner), row in by_episode_learner.items():
        partner = by_episode_learner[(episode, int(row["partner"]))]
        assert int(partner["partner"]) == learner and row["partner_type"] == partner["type"]
    matrix = np.asarray(summary["population"]["who_played_whom"]["counts"])
    assert matrix.sum() == 80 * 8 and (matrix == matrix.T).all()
    with (workdir / "who_played_whom.csv").open() as handle:
        assert next(csv.reader(handle)) == ["type", "util", "game", "virtue_kindness", "virtue_aggressiveness"]
    # Social outcomes of episode 0, recomputed from population.csv.
    payoffs = np.asarray([float(by_episode_learner[(0, n)]["payoff"]) for n in range(8)])
    with (workdir / "social_outcomes.csv").open() as handle:
        first = next(csv.DictReader(handle))
    assert float(first["collective_payoff"]) == pytest.approx(payoffs.sum(), rel=1e-5)
    assert float(first["min_payoff"]) == pytest.approx(payoffs.min(), rel=1e-5)
    mean_difference = np.abs(payoffs[:, None] - payoffs[None, :]).mean()
    assert float(first["gini"]) == pytest.approx(mean_difference / (2 * payoffs.mean()), rel=1e-4)
    assert json.loads((workdir / "population_summary.json").read_text())["seeds"] == [1]


def test_gini_by_hand():
    np.testing.assert_allclose(population_report.gini(np.array([[0.0, 0, 0, 4], [1, 1, 1, 1], [0, 0, 0, 0]])),
                               [0.75, 0.0, 0.0])


def test_eight_devices_match_one(assert_close_to_scale):
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py sets 8 fake CPU devices"
    # Three populations of four: 12 learners, padded to 16 on 8 devices (the inert four pair with no one).
    cfg = population_config("util:2,game:2", seeds=(1, 2, 3), num_episodes=2, episodes_per_chunk=2)

    def two_episodes(mesh_devices):
        run = run_setup.build_run(cfg, devices=mesh_devices)
        run.start_fresh()
        assert run.num_padding == (4 if len(mesh_devices) == 8 else 0)
        return (*run.run_chunk(2), run.real_learners())

    (m1, s1, l1), (m8, s8, l8) = two_episodes(devices[:1]), two_episodes(devices)
    np.testing.assert_array_equal(m1["partner"], m8["partner"])
    np.testing.assert_array_equal(m1["action_type"], m8["action_type"])
    for key in m1:
        assert_close_to_scale(m8[key], m1[key], err_msg=key)
    for key in s1:
        assert_close_to_scale(s8[key], s1[key], err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), l1.trainable, l8.trainable)


def test_resumed_population_equals_uninterrupted(tmp_path):
    cfg = population_config("util:2,game:2", num_episodes=6, episodes_per_chunk=2, checkpoint_every=2)
    train.train(cfg, tmp_path / "straight", progress=False)
    assert train.train(cfg, tmp_path / "resumed", progress=False, stop_after=4) is None
    train.train(cfg, tmp_path / "resumed", progress=False)
    for name in ("metrics.csv", "population.csv", "social_outcomes.csv", "who_played_whom.csv",
                 "population_summary.json"):
        assert (tmp_path / "straight" / name).read_text() == (tmp_path / "resumed" / name).read_text(), name


def test_evaluation_labels_members_by_type(population_run):
    from moraljax import evaluate

    workdir, _ = population_run
    settings = protocol.EvalSettings(games=("IPD",), table_orders=("original",), episodes=2, decisions=2,
                                     value_preambles=(), beyond_families=("action_only",), beyond_samples=2)
    summary = evaluate.evaluate_workdir(workdir, settings, progress=False)
    ipd = [r for r in summary["regrets"] if r["actions"] == "action3/action4"]
    runs = {r["kind"]: r["runs"] for r in ipd}
    assert runs == {"util": 2, "game": 2, "virtue_kindness": 2, "virtue_aggressiveness": 2, "base": 1}
    with (workdir / "evaluation" / "decisions.csv").open(newline="") as handle:
        models = {row["model"] for row in csv.DictReader(handle)}
    assert "util/seed1/member0" in models and "virtue_aggressiveness/seed1/member7" in models
