"""Orbax checkpoints of the learner state: save, find the latest, restore.

Only what training changes is saved (LoRA factors, value heads, Adam state,
score moments, KL controllers, episode counters, keys): the frozen base is
re-read from its own files. Leaves are stored under flat names and restored
into a template's structure and shardings, so a checkpoint restores onto any
mesh. Orbax writes to a temporary directory and renames it when complete, so
a run killed mid-save leaves the previous checkpoint intact; with several
processes every process calls save/restore and orbax coordinates them.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

STATE_ITEM = "state"
META_ITEM = "meta"


def _flat_dict(tree: Any) -> dict[str, Any]:
    return {f"leaf_{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


class Checkpointer:
    """Saves and restores pytrees of arrays in `directory`, one step each."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
        # A URL (gs://bucket/run) is kept as one: on several hosts checkpoints
        # need storage that every host sees.
        is_url = "://" in str(directory)
        self.directory = epath.Path(str(directory)) if is_url else pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=(STATE_ITEM, META_ITEM),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (episode), or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Writes `state` (any pytree of arrays) and JSON metadata at `step`."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardSave(_flat_dict(state)),
                    META_ITEM: ocp.args.JsonSave(meta),
                }
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, template: Any) -> tuple[Any, dict[str, Any]]:
        """Reads the checkpoint at `step` into the structure of `template`.

        Args:
            step: a saved step.
            template: a pytree of arrays (or ShapeDtypeStructs with shardings)
                with the saved structure; leaves are placed on its shardings.

        Returns:
            (state, meta).
        """
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            template,
        )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardRestore(_flat_dict(abstract)),
                    META_ITEM: ocp.args.JsonRestore(),
                }
            ),
        )
        flat = restored[STATE_ITEM]
        leaves = [flat[f"leaf_{i:05d}"] for i in range(len(flat))]
        return jax.tree.unflatten(jax.tree.structure(template), leaves), restored[META_ITEM]

    def close(self) -> None:
        self._manager.close()
