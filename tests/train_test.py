"""End-to-end training on the built-in tiny model: learning, resume, sharding, errors."""

import dataclasses
import functools
import json

import chex
import jax
import numpy as np
import pytest

from moraljax import chunk as chunk_lib
from moraljax import config_lib
from moraljax import run_setup
from moraljax import train
from moraljax.rl import rollout


def tiny_config(reward="util", arg="", **run):
    config = config_lib.experiment_config(arg, reward=reward)
    config.run.seeds = run.pop("seeds", (1,))
    for key, value in run.items():
        config.run[key] = value
    return config


def experiment(config):
    return config_lib.experiment_from_config_dict(config)


def with_paper_dropout(config, lora_dropout=0.05, value_head_dropout=0.1):
    """The paper's dropout settings (SPEC 6) on a tiny config."""
    config.lora.dropout = lora_dropout
    config.model.value_head_dropout = value_head_dropout
    return config


def shares(action_types, window):
    """C, D, D|C and illegal shares of decisions in episodes `window`."""
    types = action_types[window]
    total = types.size
    return {
        "C": np.isin(types, (0, 1)).sum() / total,
        "D": np.isin(types, (2, 3)).sum() / total,
        "C|C": (types == 0).sum() / total,
        "D|C": (types == 2).sum() / total,
        "illegal": np.isin(types, (4, 5)).sum() / total,
    }


@pytest.fixture(scope="module")
def learning_run():
    """Util, Game and De learners vs TFT trained together in one program."""
    cfg = experiment(tiny_config(seeds=(1,), num_episodes=300, episodes_per_chunk=150))
    conditions = [
        config_lib.Condition(reward=config_lib.RewardSettings(name=name), opponent="tft")
        for name in ("util", "game", "deont")
    ]
    run = run_setup.build_run(cfg, conditions=conditions)
    run.start_fresh()
    types = []
    for _ in range(2):
        metrics, _ = run.run_chunk(150)
        types.append(metrics["action_type"])
    return np.concatenate(types)  # [episodes, learners, decisions]


def test_utilitarian_learns_to_cooperate(learning_run):
    start = shares(learning_run[:, 0], slice(0, 10))
    end = shares(learning_run[:, 0], slice(-50, None))
    print("util", start, end)
    assert end["C"] > start["C"] + 0.3
    assert end["illegal"] < start["illegal"]


def test_game_reward_learns_to_defect(learning_run):
    start = shares(learning_run[:, 1], slice(0, 10))
    end = shares(learning_run[:, 1], slice(-50, None))
    print("game", start, end)
    assert end["D"] > start["D"] + 0.3
    assert end["illegal"] < start["illegal"]


def test_deontological_stops_defecting_against_cooperators(learning_run):
    start = shares(learning_run[:, 2], slice(0, 10))
    end = shares(learning_run[:, 2], slice(-50, None))
    print("deont", start, end)
    assert end["D|C"] < 0.05 < start["D|C"]


def test_llm_pair_learns_to_cooperate_under_utilitarian():
    # SPEC 3: two learners over one base play each other (3 decisions an
    # episode), each updated on its own decisions and rewards.
    cfg = experiment(tiny_config("util", "opponent=llm", seeds=(1,), num_episodes=200, episodes_per_chunk=100))
    run = run_setup.build_run(cfg)
    run.start_fresh()
    assert [(i["player"], i["condition"]) for i in run.learner_info] == [(0, "util_vs_llm"), (1, "util_vs_llm")]
    types = np.concatenate([run.run_chunk(100)[0]["action_type"] for _ in range(2)])  # [E, 2, 3]
    for player in (0, 1):
        start = shares(types[:, player], slice(0, 20))
        end = shares(types[:, player], slice(-50, None))
        print(f"player {player}", start, end)
        assert end["illegal"] < start["illegal"]
        # Both cooperating: only a random first state of C|D is left.
        assert end["C|C"] >= 0.7
        assert end["C"] >= 0.95


@pytest.mark.parametrize("dropout", [(0.0, 0.0), (0.05, 0.1)], ids=["no_dropout", "paper_dropout"])
def test_resumed_run_equals_uninterrupted(tmp_path, dropout):
    # With dropout, sampling draws LoRA dropout masks every episode from the
    # episode's key, so the resumed episodes must redraw the same ones.
    config = tiny_config(seeds=(1, 2), num_episodes=6, episodes_per_chunk=2, checkpoint_every=2)
    cfg = experiment(with_paper_dropout(config, *dropout))
    train.train(cfg, tmp_path / "straight", progress=False)
    assert train.train(cfg, tmp_path / "resumed", progress=False, stop_after=4) is None
    train.train(cfg, tmp_path / "resumed", progress=False)
    straight = (tmp_path / "straight" / "metrics.csv").read_text()
    resumed = (tmp_path / "resumed" / "metrics.csv").read_text()
    assert straight == resumed
    assert json.loads((tmp_path / "straight" / "summary.json").read_text()) == json.loads(
        (tmp_path / "resumed" / "summary.json").read_text()
    )
    from moraljax import checkpointing

    run = run_setup.build_run(cfg)
    states = []
    for name in ("straight", "resumed"):
        checkpointer = checkpointing.Checkpointer(tmp_path / name / "checkpoints")
        assert checkpointer.latest_step() == 6
        states.append(checkpointer.restore(6, run.learner_template())[0])
        checkpointer.close()
    jax.tree.map(np.testing.assert_array_equal, *states)


def test_resume_with_inert_padding_equals_uninterrupted(tmp_path):
    # Three seeds on two devices: one inert learner pads the axis. A resumed
    # run restores the three real learners into their abstract template and
    # puts fresh padding after them; its outputs equal an uninterrupted run's.
    cfg = experiment(tiny_config(seeds=(1, 2, 3), num_episodes=4, episodes_per_chunk=2, checkpoint_every=2))
    devices = jax.devices()[:2]
    train.train(cfg, tmp_path / "straight", progress=False, devices=devices)
    assert train.train(cfg, tmp_path / "resumed", progress=False, stop_after=2, devices=devices) is None
    train.train(cfg, tmp_path / "resumed", progress=False, devices=devices)
    assert (tmp_path / "straight" / "metrics.csv").read_text() == (tmp_path / "resumed" / "metrics.csv").read_text()
    run = run_setup.build_run(cfg, devices=devices)
    assert run.num_padding == 1 and run.learner_template().episode.shape == (3,)


def _update_program(run, settings):
    """The jitted PPO update of every learner on one episode's decisions."""

    def update(frozen, table, learners, batch, keys):
        one = functools.partial(chunk_lib.update_learner, run.graphdef, frozen, table, settings)
        return jax.vmap(one)(learners, batch, keys)

    return jax.jit(update)


def test_paper_update_with_dropout_is_one_dropout_free_gradient():
    # TRL 0.9.x computes the update's forward in eval mode (rl/ppo.py): with
    # the paper's LoRA dropout 0.05 and value-head dropout 0.1 an episode's
    # update is ONE dropout-free gradient step.
    free = run_setup.build_run(experiment(tiny_config(seeds=(1, 2))))
    free.start_fresh()
    paper = run_setup.build_run(experiment(with_paper_dropout(tiny_config(seeds=(1, 2)))))
    paper.start_fresh()
    free.run_chunk(1)  # Non-zero LoRA B factors, so dropout would matter.
    learners = free.learners
    keys = jax.vmap(jax.random.fold_in)(learners.key, learners.episode)
    decisions = jax.jit(
        lambda learners, keys: rollout.rollout_episode(
            paper.graphdef, paper.frozen, learners.trainable, paper.env, paper.setup, learners.episode, keys,
            batch_size=5, settings=paper.sampling_settings,
        )
    )(learners, keys)
    decisions = decisions.replace(ref_logprobs=decisions.logprobs - 0.25)  # Any reference: a KL of 0.25 per token.
    args = (free.frozen, free.env.prompts, learners, chunk_lib.ppo_batch(decisions), keys)

    # No dropout enters the program: it is the dropout-free one, so the
    # results agree bit for bit.
    paper_update = _update_program(paper, paper.chunk_settings(1))
    free_update = _update_program(free, free.chunk_settings(1))
    assert paper_update.lower(*args).as_text() == free_update.lower(*args).as_text()
    with_dropout, stats = paper_update(*args)
    without_dropout, free_stats = free_update(*args)
    jax.tree.map(np.testing.assert_array_equal, (with_dropout, stats), (without_dropout, free_stats))
    assert (np.asarray(with_dropout.opt_state[0].count) == 2).all()  # One Adam step this episode.

    # The 4 accumulated passes of the paper collapse into that one gradient:
    # all 4 computed (dropout rates 0, new row orders) give the same step up
    # to float summation order.
    settings = free.chunk_settings(1)
    four_passes = dataclasses.replace(
        settings, ppo=dataclasses.replace(settings.ppo, dropout_in_update=True), stochastic=True)
    averaged, _ = _update_program(free, four_passes)(*args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 with_dropout.trainable, averaged.trainable)

    # With ppo.dropout_in_update=True the paper's dropout does act.
    settings = paper.chunk_settings(1)
    keyed = dataclasses.replace(settings, ppo=dataclasses.replace(settings.ppo, dropout_in_update=True))
    dropped, _ = _update_program(paper, keyed)(*args)
    difference = jax.tree.map(lambda a, b: np.abs(np.asarray(a - b)).max(), dropped.trainable, with_dropout.trainable)
    assert max(jax.tree.leaves(difference)) > 1e-4


def test_workdir_with_another_config_is_refused(tmp_path):
    cfg = experiment(tiny_config(num_episodes=2, episodes_per_chunk=2))
    train.train(cfg, tmp_path, progress=False)
    before = (tmp_path / "metrics.csv").read_text()
    other = experiment(tiny_config(num_episodes=4, episodes_per_chunk=2))
    with pytest.raises(ValueError, match="different config.*run.num_episodes"):
        train.train(other, tmp_path, progress=False)
    assert (tmp_path / "metrics.csv").read_text() == before


def test_eight_devices_match_one(tmp_path):
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py sets 8 fake CPU devices"
    config = tiny_config(seeds=tuple(range(8)), num_episodes=2, episodes_per_chunk=2)
    cfg = experiment(config)
    results = []
    for mesh_devices in (devices[:1], devices):
        run = run_setup.build_run(cfg, devices=mesh_devices)
        run.start_fresh()
        metrics, stats = run.run_chunk(2)
        results.append((metrics, stats, run.learners))
    (m1, s1, l1), (m8, s8, l8) = results
    np.testing.assert_array_equal(m1["action_type"], m8["action_type"])
    for key in m1:
        np.testing.assert_allclose(m1[key], m8[key], rtol=1e-5, atol=1e-5)
    # Adam's first steps divide by tiny second moments, so float reordering
    # across devices shows up as ~1e-5 parameter differences; a wrong learner
    # mapping would differ by orders of magnitude more.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), l1.trainable, l8.trainable)


def test_padding_learners_change_no_real_learner_bit_for_bit():
    # Five learners on four devices become eight (two per device, three inert);
    # eight real learners on four devices hold the same five first.
    results = []
    for seeds in (range(1, 6), range(1, 9)):
        cfg = experiment(tiny_config(seeds=tuple(seeds), num_episodes=2, episodes_per_chunk=2))
        run = run_setup.build_run(cfg, devices=jax.devices()[:4])
        run.start_fresh()
        metrics, stats = run.run_chunk(2)
        results.append((run, metrics, stats, jax.device_get(run.real_learners())))
    (padded, m5, s5, l5), (full, m8, s8, l8) = results
    assert (padded.num_padding, full.num_padding) == (3, 0)
    assert padded.mesh.shape["data"] == 4 and len(padded.learners.episode.sharding.device_set) == 4
    assert m5["action_type"].shape[1] == 5 and sorted(s5) == sorted(s8)
    first_five = lambda tree: jax.tree.map(lambda x: x[:, :5] if x.ndim > 1 and x.shape[1] == 8 else x, tree)
    jax.tree.map(np.testing.assert_array_equal, (m5, s5), first_five((m8, s8)))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b[:5]), l5, l8)


def test_thirty_learners_use_all_eight_devices():
    cfg = experiment(tiny_config(seeds=tuple(range(30)), num_episodes=2))
    run = run_setup.build_run(cfg)
    run.start_fresh()
    assert run.mesh.shape["data"] == 8 and (run.num_real, run.num_padding) == (30, 2)
    assert len(run.learners.episode.sharding.device_set) == 8
    assert run.plan() == ("30 learners (+2 inert, for an even split) on a {'data': 8, 'model': 1} mesh"
                          " of 8 device(s), 4 per data shard")
    assert run.real_learners().episode.shape == (30,)


def test_named_reward_metrics_follow_the_run_reward_settings():
    # reward.xi = 5 and an illegal penalty of -2: the recorded reward_deont
    # is the training reward of a deont learner, decision by decision.
    config = tiny_config(reward="deont", seeds=(1, 2), num_episodes=3, episodes_per_chunk=3)
    config.reward.xi = 5.0
    config.reward.illegal_penalty = -2.0
    run = run_setup.build_run(experiment(config))
    run.start_fresh()
    metrics, _ = run.run_chunk(3)
    np.testing.assert_array_equal(metrics["reward_deont"], metrics["reward"])
    assert set(np.unique(metrics["reward_deont"])) <= {0.0, -5.0, -2.0}
    assert (metrics["reward_deont"] == -5.0).any() and (metrics["reward_deont"] == -2.0).any()
    defected_on_c = metrics["action_type"] == 2  # D|C
    np.testing.assert_array_equal(metrics["reward_malicious_deont"][defected_on_c], 5.0)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.run.update(batch_size=0), "run.batch_size=0"),
        (lambda c: c.run.update(num_episodes=-5), "run.num_episodes=-5"),
        (lambda c: c.run.update(seeds=()), "run.seeds=()"),
        (lambda c: c.model.update(path="/no/such/model"), "model.path='/no/such/model'"),
        (lambda c: c.mesh.update(data=16), "needs 16 devices"),
        (lambda c: c.reward.update(switch_to="deont", switch_episode=2), "reward.switch_episode=2"),
        (lambda c: setattr(c, "conditions", [{"reward": "util", "opponent": "tft"}] * 2),
         "distinct conditions"),
        (lambda c: setattr(c, "conditions", [{"reward": "util"}]), "conditions.0.=.*keys reward and opponent"),
        (lambda c: setattr(c, "conditions", [{"reward": "utility", "opponent": "tft"}]), "'utility'"),
        (lambda c: setattr(c, "conditions", [{"reward": {"name": "game", "switch_to": "util", "switch_episode": 9},
                                              "opponent": "tft"}]), "reward.switch_episode=9"),
    ],
)
def test_bad_settings_fail_before_compiling(tmp_path, mutate, message):
    config = tiny_config(num_episodes=2)
    mutate(config)
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(")", r"\)")):
        train.train(experiment(config), tmp_path, progress=False)
    assert not (tmp_path / "metrics.csv").exists()


def test_unknown_config_variant_is_refused():
    with pytest.raises(ValueError, match="unknown config variant 'oponent=ad'"):
        config_lib.experiment_config("oponent=ad", reward="util")
    with pytest.raises(ValueError, match="opponent.*'llm2'"):
        config_lib.experiment_config("opponent=llm2", reward="util")


def test_chunks_make_no_implicit_transfer_and_compile_once(monkeypatch):
    # The chunk is traced once for a chunk length and reused by every later
    # chunk; inside it nothing moves between host and device implicitly (a
    # Python or numpy value reaching a device op, an array read back by
    # float() or np.asarray): only the explicit jax.device_get of the
    # chunk's metrics after it.
    chex.clear_trace_counter()
    monkeypatch.setattr(chunk_lib, "train_chunk", chex.assert_max_traces(chunk_lib.train_chunk, n=1))
    cfg = experiment(tiny_config(seeds=(1, 2), num_episodes=6, episodes_per_chunk=2))
    run = run_setup.build_run(cfg, devices=jax.devices()[:2])
    run.start_fresh()
    episodes = []
    with jax.transfer_guard("disallow"):
        for _ in range(3):
            metrics, stats = run.run_chunk(2)
            episodes.append(np.asarray(jax.device_get(run.learners.episode)))
    assert [e.tolist() for e in episodes] == [[2, 2], [4, 4], [6, 6]]
    assert metrics["action_type"].shape == (2, 2, cfg.run.batch_size)
    assert run.chunk_fn(2)._cache_size() == 1
    # The guard bites: an implicit transfer in the same setting is refused.
    with jax.transfer_guard("disallow"), pytest.raises(Exception, match="[Dd]isallowed"):
        jax.jit(lambda x: x + 1)(np.ones(2, np.float32))
