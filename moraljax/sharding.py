"""Device mesh from the config, and the shardings of learners and weights.

Two mesh axes:
  data:  the learner axis N (seeds x conditions x players) is split over it;
  model: the frozen base weights can be split over it for large models.

Default: every device on `data`. The same program runs on one CPU, 8 fake
CPU devices (tests), a GPU or a TPU slice; with several processes
(jax.distributed) `jax.devices()` lists every process's devices.

Any learner count uses every device of the mesh: with mesh.data = -1 the
data axis takes min(devices, learners) devices (one learner each when there
are fewer learners than devices), and the learner axis is padded with inert
learners up to a multiple of its size (`padded_count`: 30 learners on 8
devices become 32, 4 per device); train.py keeps the inert ones out of
metrics, checkpoints and adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moraljax import config_lib

DATA = "data"
MODEL = "model"


def make_mesh(
    settings: config_lib.MeshSettings,
    devices: Sequence[jax.Device] | None = None,
    num_learners: int | None = None,
) -> Mesh:
    """Builds the (data, model) mesh.

    Args:
        settings: axis sizes. data = -1 takes every device not used by
            `model`, or (fewer learners than that) one device per learner,
            rounded up to a multiple of the process count.
        devices: defaults to `jax.devices()` (all processes).
        num_learners: the learner count, for data = -1.

    Raises:
        ValueError: when the mesh needs more devices than there are, the
            device count is not a multiple of the model axis, or (several
            processes) the mesh cannot take as many devices from each process.
    """
    devices = list(jax.devices() if devices is None else devices)
    model = settings.model
    if settings.data == -1:
        if len(devices) % model:
            raise ValueError(
                f"mesh.model={model} does not divide the {len(devices)} available"
                " devices; allowed: a divisor of the device count."
            )
        data = len(devices) // model
        if num_learners is not None:
            processes = jax.process_count()
            data = min(data, -(-num_learners // processes) * processes)
    else:
        data = settings.data
    if data * model > len(devices):
        raise ValueError(
            f"mesh data={data} x model={model} needs {data * model} devices but"
            f" only {len(devices)} are available ({_devices_per_process(devices)});"
            " allowed: data * model <= the device count."
        )
    grid = np.asarray(_take_from_every_process(devices, data * model)).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


def _devices_per_process(devices: Sequence[jax.Device]) -> str:
    """'2 process(es) with 1, 1 device(s)' for error messages."""
    counts = [sum(d.process_index == p for d in devices) for p in range(jax.process_count())]
    return f"{jax.process_count()} process(es) with {', '.join(map(str, counts))} device(s)"


def _take_from_every_process(devices: Sequence[jax.Device], count: int) -> list[jax.Device]:
    """The first `count` devices, the same number from every process.

    With one process this is `devices[:count]`. With several, every process
    runs the same program and must hold its part of the learner axis, so the
    mesh takes count / P devices of each process, in process order (process
    p then holds learners [p N / P, (p + 1) N / P)).

    Raises:
        ValueError: `count` does not split evenly over the processes, or a
            process has too few of `devices`.
    """
    num_processes = jax.process_count()
    if num_processes == 1:
        return list(devices[:count])
    if count % num_processes:
        raise ValueError(
            f"a mesh of {count} device(s) does not split over {num_processes} processes;"
            f" allowed: data * model a multiple of {num_processes} (with mesh.data=-1: a learner"
            f" count that is a multiple of {num_processes})."
        )
    per_process = count // num_processes
    chosen = []
    for process in range(num_processes):
        own = [d for d in devices if d.process_index == process]
        if len(own) < per_process:
            raise ValueError(
                f"the mesh needs {per_process} device(s) on each of {num_processes} processes but"
                f" process {process} has {len(own)} ({_devices_per_process(devices)})."
            )
        chosen += own[:per_process]
    return chosen


def padded_count(num_learners: int, mesh: Mesh) -> int:
    """The learner count rounded up to a multiple of the data axis."""
    data = mesh.shape[DATA]
    return -(-num_learners // data) * data


def learner_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (learner) axis over `data`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def learners_sharding(num_learners: int, mesh: Mesh) -> NamedSharding:
    """Where `num_learners` learners live on their own: over `data` when they split evenly, else replicated.

    (A run pads its axis with inert learners to split evenly; the real ones
    alone, as checkpoints hold them, are an uneven slice.)
    """
    return learner_sharding(mesh) if padded_count(num_learners, mesh) == num_learners else replicated(mesh)


def chunk_output_sharding(mesh: Mesh) -> NamedSharding:
    """Records [K, N, ...]: the learner axis (second) over `data`."""
    return NamedSharding(mesh, PartitionSpec(None, DATA))


def weight_sharding(shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """A frozen weight: its last axis that divides over `model`, if any.

    With model = 1 (the default) everything is replicated. For a 2B model on
    a TPU slice, sharding the hidden/MLP/vocab dimensions of each matrix over
    `model` cuts per-device memory by that factor.
    """
    size = mesh.shape[MODEL]
    spec = [None] * len(shape)
    if size > 1 and len(shape) >= 2:
        for axis in reversed(range(len(shape))):
            if shape[axis] % size == 0:
                spec[axis] = MODEL
                break
    return NamedSharding(mesh, PartitionSpec(*spec))


def put(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Every leaf of a tree of host-known values (the same on every process) placed with one sharding.

    Each process fills its own devices' shards from its copy. Unlike
    `jax.device_put`, this does not compare the copies across processes,
    which would refuse NaN entries (NaN != NaN), e.g. the "use O's last legal
    move" marker of `rewards.RewardSpec.opponent_illegal_value`.
    """

    def place(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)
