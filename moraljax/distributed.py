"""Multi-process start-up: jax.distributed with a deadline and clear errors.

Every process of a multi-host run (a Cloud TPU slice with several workers, a
GPU cluster, or several processes on one machine) runs the same program. It
calls `initialize` once, before anything else touches JAX; afterwards
`jax.devices()` lists every process's devices, the mesh spans all of them
(sharding.make_mesh), the learner axis is split across processes, only
process 0 writes logs and reports, and orbax writes checkpoints collectively.

Where the coordinator comes from, in order:
  1. explicit arguments (launch flags --coordinator_address, --num_processes,
     --process_id);
  2. the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
     JAX_PROCESS_ID (e.g. set by a job script on a GPU cluster);
  3. none of the three: JAX's own cluster detection (Cloud TPU VM metadata,
     SLURM, Open MPI, Kubernetes).

`jax.distributed.initialize` waits for every process to register and, when
one never does, aborts the whole process from C++ with a bare
DEADLINE_EXCEEDED and no address. Here it runs in a helper thread under our
own deadline, and a late start raises `TimeoutError` naming the coordinator
address and what was (not) reachable; JAX's own deadline is set a little
later so that ours fires first.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from collections.abc import Mapping

import jax
import numpy as np

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

# JAX's own initialisation deadline is ours plus this, so that our clear
# TimeoutError is raised before JAX aborts the process.
_JAX_DEADLINE_MARGIN_S = 30


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """How this process joins a multi-process run.

    Attributes:
        coordinator_address: 'host:port' of process 0's coordinator, or None
            to let JAX detect the cluster (Cloud TPU, SLURM, ...).
        num_processes: processes in the run, or None (detected).
        process_id: this process's index in [0, num_processes), or None.
        timeout_s: seconds to wait for every process to join.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 300

    def __post_init__(self):
        given = [self.coordinator_address, self.num_processes, self.process_id]
        if any(v is not None for v in given) and any(v is None for v in given):
            raise ValueError(
                f"coordinator_address={self.coordinator_address!r},"
                f" num_processes={self.num_processes!r}, process_id={self.process_id!r}"
                " is not allowed; expected all three (explicit coordinator) or none"
                " (detected from the cluster environment)."
            )
        if self.coordinator_address is not None:
            parse_address(self.coordinator_address)
        if self.num_processes is not None and (
            isinstance(self.num_processes, bool) or not isinstance(self.num_processes, int)
            or self.num_processes < 1
        ):
            raise ValueError(f"num_processes={self.num_processes!r} is not allowed; expected an integer >= 1.")
        if self.process_id is not None and (
            isinstance(self.process_id, bool) or not isinstance(self.process_id, int)
            or not 0 <= self.process_id < self.num_processes
        ):
            raise ValueError(
                f"process_id={self.process_id!r} is not allowed; expected an integer in"
                f" [0, num_processes={self.num_processes})."
            )
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, int) or self.timeout_s < 1:
            raise ValueError(f"timeout_s={self.timeout_s!r} is not allowed; expected an integer >= 1 (seconds).")

    @property
    def detected(self) -> bool:
        """Whether the coordinator is left to JAX's cluster detection."""
        return self.coordinator_address is None


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port); IPv6 hosts in brackets ('[::1]:1234').

    Raises:
        ValueError: naming the address when it has no host or no valid port.
    """
    host, sep, port = str(address).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"coordinator_address={address!r} is not allowed; expected 'host:port' with a port"
            " in 1..65535 (e.g. '10.0.0.2:8476')."
        )
    return host, int(port)


def settings_from(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
    environ: Mapping[str, str] | None = None,
) -> DistributedSettings:
    """Explicit values, else JAX_COORDINATOR_ADDRESS/NUM_PROCESSES/PROCESS_ID.

    Args:
        coordinator_address, num_processes, process_id: explicit values (None
            = take it from the environment, or leave it to detection).
        timeout_s: seconds to wait for all processes.
        environ: the environment (default os.environ).

    Returns:
        Validated settings.

    Raises:
        ValueError: a malformed value (named) or an incomplete set.
    """
    environ = os.environ if environ is None else environ

    def number(name: str, value: int | None) -> int | None:
        if value is not None or name not in environ:
            return value
        text = environ[name]
        if not text.strip().isdigit():
            raise ValueError(f"{name}={text!r} is not allowed; expected a non-negative integer.")
        return int(text)

    return DistributedSettings(
        coordinator_address=coordinator_address or environ.get(ENV_COORDINATOR) or None,
        num_processes=number(ENV_NUM_PROCESSES, num_processes),
        process_id=number(ENV_PROCESS_ID, process_id),
        timeout_s=timeout_s,
    )


def _reachable(address: str, timeout_s: float = 2.0) -> bool:
    """Whether a TCP connection to `address` opens (the coordinator listens)."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _timeout_message(settings: DistributedSettings, address: str | None) -> str:
    where = address or "(detected from the cluster environment)"
    who = (
        f"process {settings.process_id} of {settings.num_processes}"
        if not settings.detected else "this process"
    )
    if settings.process_id == 0:
        why = (
            f"it started the coordinator at {where}, but not all {settings.num_processes}"
            " processes joined: start every process with the same coordinator address"
            " and process count, and make the port reachable from the other hosts"
        )
    elif address is not None and not _reachable(address):
        why = (
            f"the coordinator at {where} is not reachable: is process 0 running there,"
            " and is the port open from this host?"
        )
    else:
        why = (
            f"the coordinator at {where} did not admit every process in time: check"
            " that all processes use the same address and process count"
        )
    return (
        f"jax.distributed did not start within timeout_s={settings.timeout_s}: {who} timed"
        f" out; {why}. Raise --distributed_timeout if processes start slowly."
    )


def initialize(settings: DistributedSettings) -> None:
    """Joins the multi-process run (jax.distributed.initialize) with a deadline.

    Call it once, before any JAX computation (importing moraljax modules
    that build arrays counts); a single-process run does not need it.

    Args:
        settings: coordinator, process count and id (or detection), timeout.

    Raises:
        TimeoutError: not every process joined within `settings.timeout_s`;
            the message names the coordinator address and whether it was
            reachable. JAX cannot be used in this process afterwards.
        ValueError: no coordinator given and no cluster detected.
        RuntimeError: from JAX (e.g. called twice, or after a computation).
    """
    outcome: dict[str, BaseException] = {}

    def join():
        try:
            jax.distributed.initialize(
                coordinator_address=settings.coordinator_address,
                num_processes=settings.num_processes,
                process_id=settings.process_id,
                initialization_timeout=settings.timeout_s + _JAX_DEADLINE_MARGIN_S,
            )
        except BaseException as error:  # Re-raised in the caller's thread.
            outcome["error"] = error

    # A daemon thread: if the deadline passes, the process may still exit
    # while the blocked C++ call waits.
    thread = threading.Thread(target=join, name="jax-distributed-initialize", daemon=True)
    thread.start()
    thread.join(settings.timeout_s)
    if thread.is_alive():
        from jax._src import distributed as jax_distributed  # The detected address, if any.

        address = settings.coordinator_address or getattr(jax_distributed.global_state, "coordinator_address", None)
        raise TimeoutError(_timeout_message(settings, address))
    error = outcome.get("error")
    if isinstance(error, ValueError) and settings.detected:
        raise ValueError(
            f"jax.distributed found no cluster to join ({error}); give coordinator_address,"
            " num_processes and process_id (flags or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,"
            " JAX_PROCESS_ID), or run on Cloud TPU / SLURM / Open MPI / Kubernetes."
        ) from error
    if error is not None:
        raise error


def is_writer() -> bool:
    """Whether this process writes logs, reports and plots (process 0)."""
    return jax.process_index() == 0


def topology() -> str:
    """'process i/P, D devices (L local, platform)' for the start-up log."""
    return (
        f"process {jax.process_index()}/{jax.process_count()}, {jax.device_count()} devices"
        f" ({jax.local_device_count()} local, {jax.devices()[0].platform})"
    )


def check_same_on_all_processes(value: int, what: str, hint: str) -> None:
    """Raises on every process unless all processes hold the same integer.

    A host loop whose processes disagree (e.g. on the checkpoint to resume
    from, when each host sees its own local disk) would deadlock in the next
    collective; this turns that into an error.

    Args:
        value: this process's value.
        what: what the value is, for the message.
        hint: how to fix a disagreement.

    Raises:
        ValueError: listing every process's value.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    values = np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int64))).reshape(-1)
    if np.any(values != values[0]):
        listed = ", ".join(f"process {i}: {int(v)}" for i, v in enumerate(values))
        raise ValueError(f"processes disagree on {what} ({listed}); {hint}")

