"""Checkpoints keyed by tree path: names on disk, abstract sharded templates, refusals, the old format.

The resume tests assert bit-identical outputs: the resumed run and the
uninterrupted one are the same compiled program on the same machine.
"""

import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moraljax import checkpointing
from moraljax import config_lib
from moraljax import run_setup
from moraljax import train
from moraljax.rl import ppo_advantages


def small_state(num_learners=2):
    """A learner-shaped state: nested dicts, a tuple, flax struct nodes, ints and keys."""
    return {
        "trainable": {"value_head": {"kernel": jnp.arange(3.0 * num_learners).reshape(num_learners, 3)}},
        "opt_state": ({"mu": jnp.full((num_learners, 3), 0.5)}, {"count": jnp.arange(num_learners, dtype=jnp.int32)}),
        "kl": ppo_advantages.KLController(
            beta=jnp.full((num_learners,), 0.2),
            target=jnp.full((num_learners,), 6.0),
            horizon=jnp.full((num_learners,), 1e4),
            adaptive=jnp.ones((num_learners,), bool),
        ),
        "key": jax.vmap(jax.random.PRNGKey)(jnp.arange(num_learners)),
    }


def write_positional(directory, step, state, meta):
    """A checkpoint in the format written before tree paths: leaves named leaf_00000... by position."""
    manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(),
                                    options=ocp.CheckpointManagerOptions(create=True),
                                    item_names=(checkpointing.STATE_ITEM, checkpointing.META_ITEM))
    leaves = {f"leaf_{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}
    manager.save(step, args=ocp.args.Composite(**{checkpointing.STATE_ITEM: ocp.args.StandardSave(leaves),
                                                  checkpointing.META_ITEM: ocp.args.JsonSave(meta)}), force=True)
    manager.wait_until_finished()
    manager.close()


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_leaves_are_saved_under_their_tree_paths(tmp_path):
    checkpointer = checkpointing.Checkpointer(tmp_path)
    checkpointer.save(3, small_state(), {"episode": 3})
    saved = checkpointer.saved_leaves(3)
    assert saved[("kl", "beta")] == ((2,), np.dtype("float32"))
    assert saved[("trainable", "value_head", "kernel")] == ((2, 3), np.dtype("float32"))
    assert saved[("opt_state", "1", "count")] == ((2,), np.dtype("int32"))
    assert len(saved) == len(jax.tree.leaves(small_state()))
    checkpointer.close()


def test_restore_into_an_abstract_sharded_template(tmp_path):
    state = small_state()
    checkpointer = checkpointing.Checkpointer(tmp_path)
    checkpointer.save(1, state, {"episode": 1})
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
    learner_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=learner_sharding),
                            jax.eval_shape(small_state))
    restored, meta = checkpointer.restore(1, template)
    assert meta == {"episode": 1}
    assert_trees_equal(restored, state)
    assert all(leaf.sharding == learner_sharding for leaf in jax.tree.leaves(restored))
    checkpointer.close()


@pytest.mark.parametrize("change, message", [
    (lambda s: s["trainable"]["value_head"].update(kernel=jnp.zeros((2, 4))),
     r"leaf trainable.value_head.kernel has shape \(2, 3\) float32 in the checkpoint, "
     r"shape \(2, 4\) float32 in this run"),
    (lambda s: s["trainable"]["value_head"].update(bias=jnp.zeros((2,))),
     r"the checkpoint has no leaf trainable.value_head.bias"),
    (lambda s: s["trainable"].pop("value_head"),
     r"the checkpoint has a leaf trainable.value_head.kernel that this run's state does not have"),
    (lambda s: s.update(key=jnp.zeros((2, 2), jnp.int32)),
     r"leaf key has shape \(2, 2\) uint32 in the checkpoint, shape \(2, 2\) int32 in this run"),
])
def test_a_checkpoint_of_another_state_is_refused_naming_the_first_difference(tmp_path, change, message):
    checkpointer = checkpointing.Checkpointer(tmp_path)
    checkpointer.save(2, small_state(), {"episode": 2})
    other = small_state()
    change(other)
    with pytest.raises(checkpointing.CheckpointMismatchError, match=message):
        checkpointer.restore(2, other)
    # A mismatch is the wrong config or code, not a damaged file: refused, not moved aside.
    with pytest.raises(checkpointing.CheckpointMismatchError, match="does not match this run's state"):
        checkpointer.restore_latest(other, say=pytest.fail)
    assert checkpointer.all_steps() == [2]
    assert not (tmp_path.parent / f"{tmp_path.name}_unreadable").exists()
    checkpointer.close()


def test_a_positional_checkpoint_is_read_and_checked_by_position(tmp_path):
    state = small_state()
    write_positional(tmp_path, 5, state, {"episode": 5})
    checkpointer = checkpointing.Checkpointer(tmp_path)
    restored, meta = checkpointer.restore(5, state)
    assert meta == {"episode": 5}
    assert_trees_equal(restored, state)
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r"leaf 4 \(stored by position; kl.adaptive in this run\) has shape \(2,\) bool"):
        checkpointer.restore(5, {**state, "kl": state["kl"].replace(adaptive=jnp.ones((3,), bool))})
    with pytest.raises(checkpointing.CheckpointMismatchError, match="holds 8 leaves .*this run's state 9"):
        checkpointer.restore(5, {**state, "extra": jnp.zeros(())})
    checkpointer.close()


# ----------------------------------------------------------------------------
# A run resumed from a checkpoint in the old positional format.

SHORT = {"num_episodes": 4, "episodes_per_chunk": 2, "checkpoint_every": 2}


def short_experiment():
    config = config_lib.experiment_config("", reward="util")
    config.run.seeds = (1,)
    config.run.update(SHORT)
    config.ppo.ppo_epochs = 1
    config.ppo.gradient_accumulation_steps = 1
    return config_lib.experiment_from_config_dict(config)


def outputs(workdir):
    return {name: (workdir / name).read_text() for name in ("metrics.csv", "summary.json")}


def test_a_run_resumes_bit_identically_from_a_positional_checkpoint(tmp_path):
    cfg = short_experiment()
    straight = tmp_path / "straight"
    train.train(cfg, straight, progress=False)
    resumed = tmp_path / "resumed"
    assert train.train(cfg, resumed, progress=False, stop_after=2) is None
    # Rewrite the episode-2 checkpoint as the old code wrote it.
    template = run_setup.build_run(cfg).learner_template()
    checkpointer = checkpointing.Checkpointer(resumed / "checkpoints")
    learners, meta = checkpointer.restore(2, template)
    checkpointer.close()
    shutil.rmtree(resumed / "checkpoints" / "2")
    write_positional(resumed / "checkpoints", 2, learners, meta)
    saved = checkpointing.Checkpointer(resumed / "checkpoints")
    assert all(name[0].startswith("leaf_") for name in saved.saved_leaves(2))
    saved.close()
    train.train(cfg, resumed, progress=False)
    # Resumed from episode 2: the old checkpoint was read, not moved aside as unreadable.
    assert not (resumed / "checkpoints_unreadable").exists()
    assert outputs(resumed) == outputs(straight)
    final = checkpointing.Checkpointer(resumed / "checkpoints")
    assert ("kl", "beta") in final.saved_leaves(4)  # Written back under names.
    straight_checkpointer = checkpointing.Checkpointer(straight / "checkpoints")
    assert_trees_equal(final.restore(4, template)[0], straight_checkpointer.restore(4, template)[0])
    final.close()
    straight_checkpointer.close()
