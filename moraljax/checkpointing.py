"""Orbax checkpoints of the learner state: save, find the latest, restore.

Only what training changes is saved (LoRA factors, value heads, Adam state,
score moments, KL controllers, episode counters, keys): the frozen base is
re-read from its own files. Leaves are stored under flat names and restored
into a template's structure and shardings, so a checkpoint restores onto any
mesh. Orbax writes to a temporary directory and renames it when complete, so
a run killed mid-save leaves the previous checkpoint intact; with several
processes every process calls save/restore and orbax coordinates them.

A newest step that cannot be read (truncated files, a missing item, an
emptied directory) does not block resumption: `restore_latest` reports it,
moves it aside into `<checkpoint dir>_unreadable/` (nothing is deleted) and
falls back to the next newest step.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

STATE_ITEM = "state"
META_ITEM = "meta"


class CheckpointError(ValueError):
    """No checkpoint of a run can be read."""


def _flat_dict(tree: Any) -> dict[str, Any]:
    return {f"leaf_{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


class Checkpointer:
    """Saves and restores pytrees of arrays in `directory`, one step each."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
        # A URL (gs://bucket/run) is kept as one: on several hosts checkpoints
        # need storage that every host sees.
        is_url = "://" in str(directory)
        self.directory = epath.Path(str(directory)) if is_url else pathlib.Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self._manager = self._open_manager()

    def _open_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self.max_to_keep, create=True, cleanup_tmp_directories=True),
            item_names=(STATE_ITEM, META_ITEM),
        )

    def all_steps(self) -> list[int]:
        """Every complete checkpoint's step, oldest first."""
        return sorted(self._manager.all_steps())

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

    def restore_latest(self, template: Any, *, is_writer: bool = True,
                       say: Callable[[str], None] = print) -> tuple[int, Any]:
        """Restores the newest step that reads, moving unreadable newer ones aside.

        Args:
            template: as for `restore`.
            is_writer: whether this process moves unreadable steps (one
                process of a multi-process run does; checkpoints are shared).
            say: where the report of an unreadable step goes.

        Returns:
            (step, state); (0, None) when there is no checkpoint at all.

        Raises:
            CheckpointError: checkpoints exist but none can be read.
        """
        moved = []
        while (step := self.latest_step()) is not None:
            try:
                state, _ = self.restore(step, template)
                return step, state
            except Exception as error:  # Any failure to read means: try the older step.
                reason = " ".join(str(error).split())[:300] or type(error).__name__
                aside = self._move_aside(step, is_writer)
                moved.append(str(aside))
                say(f"moraljax: the checkpoint at episode {step} in {self.directory} cannot be read"
                    f" ({type(error).__name__}: {reason}); moved it to {aside} and trying the one before")
        if moved:
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be read (moved aside: {', '.join(moved)});"
                " expected at least one intact step. Remove the checkpoint directory to start afresh.")
        return 0, None

    def _move_aside(self, step: int, is_writer: bool) -> Any:
        """Moves step `step` to `<directory>_unreadable/<step>_<time>` (writer); reopens the manager."""
        self._manager.close()
        aside_root = self.directory.parent / f"{self.directory.name}_unreadable"
        aside = aside_root / f"{step}_{time.strftime('%Y%m%d-%H%M%S')}"
        if is_writer:
            aside_root.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:  # The others wait until process 0 has moved it.
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"moraljax_checkpoint_aside_{step}")
        self._manager = self._open_manager()
        return aside

    def prune(self) -> None:
        """Deletes all but the newest `max_to_keep` steps, as a finished save would.

        A run killed between writing a checkpoint and deleting the oldest one
        leaves one step too many; a rerun of the finished run tidies it.
        """
        for step in self.all_steps()[:-self.max_to_keep]:
            self._manager.delete(step)

    def close(self) -> None:
        self._manager.close()
