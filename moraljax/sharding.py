"""Device mesh from the config, and the shardings of learners and weights.

Two mesh axes:
  data:  the learner axis N (seeds x conditions x players) is split over it;
  model: the frozen base weights can be split over it for large models.

Default: every device on `data`. The same program runs on one CPU, 8 fake
CPU devices (tests), a GPU or a TPU slice; with several processes
(jax.distributed) `jax.devices()` lists every process's devices.
"""

from __future__ import annotations

import math
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
        settings: axis sizes. data = -1 takes as many of the devices not used
            by `model` as split the learners evenly (all of them when the
            learner count is a multiple of the device count).
        devices: defaults to `jax.devices()` (all processes).
        num_learners: the learner count, for data = -1.

    Raises:
        ValueError: when the mesh needs more devices than there are, or the
            device count is not a multiple of the model axis.
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
            data = math.gcd(data, num_learners)
    else:
        data = settings.data
    if data * model > len(devices):
        raise ValueError(
            f"mesh data={data} x model={model} needs {data * model} devices but"
            f" only {len(devices)} are available ({jax.process_count()} process(es));"
            " allowed: data * model <= the device count."
        )
    grid = np.asarray(devices[: data * model]).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


def check_learners_fit(num_learners: int, mesh: Mesh) -> None:
    """The learner axis must split evenly over the data axis."""
    data = mesh.shape[DATA]
    if num_learners % data:
        raise ValueError(
            f"{num_learners} learners do not divide over mesh.data={data} devices;"
            f" allowed: a learner count that is a multiple of {data} (change the"
            " seeds or set mesh.data to a divisor of the learner count)."
        )


def learner_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (learner) axis over `data`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


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


def frozen_shardings(frozen: Any, mesh: Mesh) -> Any:
    """`weight_sharding` for every leaf of the frozen state."""
    return jax.tree.map(lambda x: weight_sharding(x.shape, mesh), frozen)


def put(tree: Any, sharding: Any) -> Any:
    """device_put a tree with one sharding or a matching tree of shardings."""
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)
    return jax.tree.map(jax.device_put, tree, sharding)
