"""Partner selection in populations (issue 13; docs/POPULATIONS.md): prompts, pairing rule, learning."""

import pathlib

import jax
import numpy as np
import pytest

from moraljax import cli
from moraljax import config_lib
from moraljax import population_report
from moraljax import prompts
from moraljax import run_setup
from moraljax import selection
from moraljax import train

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def selection_config(composition, **population):
    config = cli.config_from_file(f"{CONFIGS / 'population.py'}:matching=selection")
    config.population.composition = composition
    for key, value in population.items():
        config.population[key] = value
    config.run.seeds = (1,)
    return config


def test_selection_row_indexes_the_rendered_prompt():
    names = selection.member_names("agent", 4)
    texts = selection.selection_texts(names, 2, prompts.TRAIN_ACTIONS)
    assert len(texts) == (3 * 4) ** 2
    for candidates, moves in [((3, 1), (0, -1)), ((0, 2), (1, 1)), ((2, 3), (-1, 0))]:
        row = int(selection.selection_row(np.asarray(candidates), np.asarray(moves), 4))
        expected = selection.render_selection_prompt(
            [(names[c], m + 1) for c, m in zip(candidates, moves)], prompts.TRAIN_ACTIONS)
        assert texts[row] == expected
    assert "agent3: last played action1\nagent1: no valid move yet\n" in texts[
        int(selection.selection_row(np.asarray([3, 1]), np.asarray([0, -1]), 4))]


def test_candidates_are_distinct_others():
    keys = jax.random.split(jax.random.PRNGKey(0), 50)
    for member in range(6):
        drawn = np.asarray(jax.vmap(selection.draw_candidates, in_axes=(0, None, None, None))(keys, member, 6, 3))
        assert (drawn != member).all() and (drawn >= 0).all() and (drawn < 6).all()
        assert all(len(set(row)) == 3 for row in drawn.tolist())
        assert len({tuple(row) for row in drawn.tolist()}) > 10


def test_collisions_follow_the_turn_order():
    resolve = jax.jit(selection.resolve_pairs)
    # Turn order 2, 0, 1, 3, 4, 5: 2 takes 1; 0 also wanted 1 (taken); 3 takes 5; 4 wanted 2 (taken).
    order = np.asarray([2, 0, 1, 3, 4, 5])
    choice = np.asarray([1, 3, 1, 5, 2, -1])
    partner, player, honoured = (np.asarray(x) for x in resolve(order, choice))
    assert partner[2] == 1 and player[2] == 0 and player[1] == 1
    assert partner[3] == 5 and player[3] == 0
    # Left unpaired in turn order: 0 then 4, the earlier as player 0.
    assert partner[0] == 4 and player[0] == 0 and player[4] == 1
    assert honoured.tolist() == [False, False, True, True, False, False]
    rng = np.random.default_rng(0)
    for _ in range(50):
        order = rng.permutation(8)
        choice = np.where(rng.random(8) < 0.2, -1, rng.integers(0, 8, 8))
        choice = np.where(choice == np.arange(8), -1, choice)
        partner, player, honoured = (np.asarray(x) for x in resolve(order, choice))
        assert (partner[partner] == np.arange(8)).all() and (partner != np.arange(8)).all()
        assert (player + player[partner] == 1).all()
        assert (partner[honoured] == choice[honoured]).all()
        first = order[np.argmax(choice[order] >= 0)]  # The first legal chooser is always served.
        assert honoured[first] or (choice[order] < 0).all()


@pytest.mark.parametrize("field, value, fragment", [
    ("candidates", 4, "1 .. 3"), ("candidates", 0, "population.candidates=0"),
    ("name_prefix", " agent", "without leading")])
def test_bad_selection_settings_are_one_line(field, value, fragment):
    with pytest.raises(ValueError, match=f"population.{field}=") as error:
        config_lib.experiment_from_config_dict(selection_config("util:2,game:2", **{field: value}))
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_names_longer_than_an_answer_are_refused():
    cfg = config_lib.experiment_from_config_dict(selection_config("util:2,game:2", name_prefix="agent"))
    with pytest.raises(ValueError, match="population.name_prefix='agent' is not allowed") as error:
        run_setup.build_run(cfg)
    assert "\n" not in str(error.value)


def test_utilitarian_selectors_learn_to_prefer_cooperators(tmp_path):
    """Vagg, 2 UT, S (members 0..3), each shown the 3 others: UT selectors come to name a member who last played C.

    On the tiny model the members are action0..action3 and its answers are
    mostly action1 / action2 (the two UT members): what is learnt here is
    which of the names it can produce to give, not reading arbitrary names.
    """
    config = selection_config("virtue_aggressiveness:1,util:2,game:1", candidates=3)
    config.run.num_episodes = 100
    config.run.episodes_per_chunk = 50
    config.run.checkpoint_every = 50
    cfg = config_lib.experiment_from_config_dict(config)
    train.train(cfg, tmp_path, progress=False)
    rows = np.genfromtxt(tmp_path / population_report.SELECTION_FILENAME, delimiter=",", names=True, dtype=None,
                         encoding="utf-8")
    utilitarian = rows[rows["type"] == "util"]
    chose_c = utilitarian["choice_move"] == "C"
    early = chose_c[utilitarian["episode"] < 20].mean()
    late = chose_c[utilitarian["episode"] >= 80].mean()
    assert late >= 0.8 and late >= early + 0.25, (early, late)
    matrix = np.loadtxt(tmp_path / "who_selected_whom.csv", delimiter=",", skiprows=1,
                        usecols=range(1, 4), dtype=int)  # Three types.
    assert matrix.sum() == (rows["choice"] >= 0).sum()
    assert (tmp_path / "who_selected_whom.png").exists()


def test_resumed_selection_run_equals_uninterrupted(tmp_path):
    # The members' last moves (shown to selectors) live in the checkpointed learner state.
    config = selection_config("util:2,game:2", candidates=2)
    config.run.update(num_episodes=6, episodes_per_chunk=2, checkpoint_every=2)
    cfg = config_lib.experiment_from_config_dict(config)
    train.train(cfg, tmp_path / "straight", progress=False)
    assert train.train(cfg, tmp_path / "resumed", progress=False, stop_after=4) is None
    train.train(cfg, tmp_path / "resumed", progress=False)
    for name in ("metrics.csv", "population.csv", population_report.SELECTION_FILENAME, "who_selected_whom.csv"):
        assert (tmp_path / "straight" / name).read_text() == (tmp_path / "resumed" / name).read_text(), name
