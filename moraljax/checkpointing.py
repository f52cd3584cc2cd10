"""Orbax checkpoints of the learner state: save, find the latest, restore.

Only what training changes is saved (LoRA factors, value heads, Adam state,
score moments, KL controllers, episode counters, keys): the frozen base is
re-read from its own files. Every leaf is stored under the name of its tree
path (e.g. ``kl.beta``, ``opt_state.0.mu.value_head.kernel.value``) and
restored into a template of the run's state: arrays, or abstract
``jax.ShapeDtypeStruct`` leaves with shardings (``jax.eval_shape``), so a
checkpoint restores onto any mesh, already sharded. A checkpoint whose names,
shapes or dtypes differ from the template was written by another config or
another version of the code: it is refused with `CheckpointMismatchError`,
naming the first difference, and left where it is. Checkpoints written before
names were used (leaves ``leaf_00000``, ``leaf_00001``, ... in the order of
``jax.tree.leaves``) are read by position, checked the same way, and written
back under names at the next save.

Orbax writes to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact; with several
processes every process calls save/restore and orbax coordinates them.

A newest step that cannot be read (truncated files, a missing item, an
emptied directory) does not block resumption: `restore_latest` reports it,
moves it aside into `<checkpoint dir>_unreadable/` (nothing is deleted) and
falls back to the next newest step.
"""

from __future__ import annotations

import pathlib
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

STATE_ITEM = "state"
META_ITEM = "meta"
# Leaf names of the positional format (checkpoints written before tree paths).
_POSITIONAL_NAME = re.compile(r"leaf_\d{5}")

Path = tuple[str, ...]


def _is_transient(error: BaseException) -> bool:
    """Whether a restore failed for a reason other than the files (memory, permissions, the network)."""
    if isinstance(error, (MemoryError, PermissionError, ConnectionError, TimeoutError)):
        return True
    text = str(error)
    return any(mark in text for mark in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "DEADLINE_EXCEEDED",
                                          "UNAVAILABLE", "PERMISSION_DENIED"))


class CheckpointError(ValueError):
    """No checkpoint of a run can be read."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's leaves differ from the run's state (names, shapes or dtypes)."""


def _entry_name(entry: Any) -> str:
    """The name of one step of a tree path (attribute, dict key or sequence index)."""
    for attribute in ("name", "key", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    raise TypeError(f"tree path entry {entry!r} has no name, key or index")


def leaf_paths(tree: Any) -> list[tuple[Path, Any]]:
    """(path, leaf) of every leaf, in ``jax.tree.leaves`` order; a path is its names.

    Raises:
        ValueError: two leaves with the same names (a tree orbax could not
            store by name).
    """
    leaves = [(tuple(_entry_name(e) for e in path), leaf)
              for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
    paths = [path for path, _ in leaves]
    if len(set(paths)) != len(paths):
        raise ValueError(f"tree leaves share names: {sorted(p for p in paths if paths.count(p) > 1)[:3]}")
    return leaves


def _nested(leaves: list[tuple[Path, Any]]) -> dict[str, Any]:
    """Nested dicts keyed by path names: what orbax stores (one array per path)."""
    root: dict[str, Any] = {}
    for path, leaf in leaves:
        node = root
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return root


def _from_nested(tree: Any, paths: list[Path]) -> list[Any]:
    """The leaves of `tree` (nested dicts) at `paths`, in that order."""
    leaves = []
    for path in paths:
        node = tree
        for name in path:
            node = node[name]
        leaves.append(node)
    return leaves


def _dotted(path: Path) -> str:
    return ".".join(path)


def _describe(shape, dtype) -> str:
    return f"shape {tuple(shape)} {jax.numpy.dtype(dtype).name}"


def _first_difference(saved: dict[Path, tuple[Any, Any]], wanted: list[tuple[Path, Any]]) -> str | None:
    """The first leaf that differs between a checkpoint and the run's state, in words; None if none."""
    for path, leaf in wanted:
        if path not in saved:
            return f"the checkpoint has no leaf {_dotted(path)} ({_describe(leaf.shape, leaf.dtype)} in this run)"
        shape, dtype = saved[path]
        if tuple(shape) != tuple(leaf.shape) or jax.numpy.dtype(dtype) != jax.numpy.dtype(leaf.dtype):
            return (f"leaf {_dotted(path)} has {_describe(shape, dtype)} in the checkpoint, "
                    f"{_describe(leaf.shape, leaf.dtype)} in this run")
    extra = [path for path in saved if path not in dict(wanted)]
    if extra:
        return f"the checkpoint has a leaf {_dotted(extra[0])} that this run's state does not have"
    return None


def _positional_difference(saved: dict[Path, tuple[Any, Any]], wanted: list[tuple[Path, Any]]) -> str | None:
    """As `_first_difference`, for a checkpoint of leaves stored by position."""
    if len(saved) != len(wanted):
        return (f"the checkpoint holds {len(saved)} leaves (stored by position), this run's state "
                f"{len(wanted)}")
    for index, (path, leaf) in enumerate(wanted):
        shape, dtype = saved[(f"leaf_{index:05d}",)]
        if tuple(shape) != tuple(leaf.shape) or jax.numpy.dtype(dtype) != jax.numpy.dtype(leaf.dtype):
            return (f"leaf {index} (stored by position; {_dotted(path)} in this run) has "
                    f"{_describe(shape, dtype)} in the checkpoint, {_describe(leaf.shape, leaf.dtype)} in this run")
    return None


def abstract_state(template: Any) -> Any:
    """ShapeDtypeStructs (with the shardings the leaves have) of a state or of `jax.eval_shape`'s output."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), template)


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
            # Handlers named up front, so a step's metadata (its leaves'
            # names and shapes) reads before anything is restored.
            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(), META_ITEM: ocp.JsonCheckpointHandler()},
        )

    def all_steps(self) -> list[int]:
        """Every complete checkpoint's step, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (episode), or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Writes `state` (any pytree of arrays), leaves named by tree path, and JSON metadata at `step`."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardSave(_nested(leaf_paths(state))),
                    META_ITEM: ocp.args.JsonSave(meta),
                }
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def saved_leaves(self, step: int) -> dict[Path, tuple[tuple[int, ...], Any]]:
        """{path: (shape, dtype)} of every leaf the checkpoint at `step` holds.

        Raises:
            FileNotFoundError: the step has no readable state item.
        """
        metadata = self._manager.item_metadata(step)
        state = None if metadata is None or STATE_ITEM not in metadata.keys() else metadata[STATE_ITEM]
        if state is None:
            raise FileNotFoundError(f"step {step} in {self.directory} has no readable '{STATE_ITEM}' item")
        return {path: (tuple(leaf.shape), leaf.dtype) for path, leaf in leaf_paths(state)}

    def restore(self, step: int, template: Any) -> tuple[Any, dict[str, Any]]:
        """Reads the checkpoint at `step` into the structure of `template`.

        Args:
            step: a saved step.
            template: the run's state: arrays, or ShapeDtypeStructs with
                shardings (e.g. from ``jax.eval_shape``); leaves are placed on
                its shardings.

        Returns:
            (state, meta).

        Raises:
            CheckpointMismatchError: the checkpoint's leaf names, shapes or
                dtypes differ from the template's (the first difference is
                named).
            Exception: whatever orbax raises for a checkpoint it cannot read.
        """
        wanted = leaf_paths(abstract_state(template))
        saved = self.saved_leaves(step)
        positional = bool(saved) and all(len(p) == 1 and _POSITIONAL_NAME.fullmatch(p[0]) for p in saved)
        if positional:
            difference = _positional_difference(saved, wanted)
            target = {f"leaf_{index:05d}": leaf for index, (_, leaf) in enumerate(wanted)}
        else:
            difference = _first_difference(saved, wanted)
            target = _nested(wanted)
        if difference is not None:
            raise CheckpointMismatchError(
                f"the checkpoint at episode {step} in {self.directory} does not match this run's state: "
                f"{difference}. It was written by another config or another version of the code; nothing was"
                " changed. Use another --workdir, or the config and code that wrote it.")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardRestore(target),
                    META_ITEM: ocp.args.JsonRestore(),
                }
            ),
        )
        flat = restored[STATE_ITEM]
        if positional:
            leaves = [flat[f"leaf_{index:05d}"] for index in range(len(wanted))]
        else:
            leaves = _from_nested(flat, [path for path, _ in wanted])
        return jax.tree.unflatten(jax.tree.structure(template), leaves), restored[META_ITEM]

    def restore_latest(self, template: Any, *, is_writer: bool = True,
                       say: Callable[[str], None] = print) -> tuple[int, Any]:
        """Restores the newest step that reads, moving unreadable newer ones aside.

        A step that reads but does not match the template is not unreadable:
        it is refused (`CheckpointMismatchError`) and nothing is moved.

        Args:
            template: as for `restore`.
            is_writer: whether this process moves unreadable steps (one
                process of a multi-process run does; checkpoints are shared).
            say: where the report of an unreadable step goes.

        Returns:
            (step, state); (0, None) when there is no checkpoint at all.

        Raises:
            CheckpointError: checkpoints exist but none can be read.
            CheckpointMismatchError: the newest readable step does not match
                the template.
        """
        moved = []
        while (step := self.latest_step()) is not None:
            try:
                state, _ = self.restore(step, template)
                return step, state
            except CheckpointMismatchError:
                raise
            except Exception as error:  # A failure to read the files means: try the older step.
                if _is_transient(error):
                    raise
                reason = " ".join(str(error).split())[:300] or type(error).__name__
                aside = self._move_aside(step, is_writer)
                moved.append(str(aside))
                say(f"moraljax: the checkpoint at episode {step} in {self.directory} cannot be read"
                    f" ({type(error).__name__}: {reason}); moved it to {aside} and trying the one before")
        aside_root = self.directory.parent / f"{self.directory.name}_unreadable"
        if moved or (aside_root.is_dir() and any(aside_root.iterdir())):
            # A fresh start would cut metrics.csv back to nothing: refuse it
            # while unreadable steps of this run are kept aside.
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be read (set aside: {', '.join(moved) or str(aside_root)});"
                f" expected at least one intact step. Move {aside_root} away (and remove the checkpoint"
                " directory) to start the run afresh.")
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
