"""Multi-process runs: two jax.distributed processes on this machine equal one.

The processes talk through a loopback coordinator and CPU collectives (gloo);
each has its own fake CPU devices (XLA_FLAGS). Error paths: settings, a
coordinator that never answers, a mesh larger than the processes' devices.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from moraljax import checkpointing
from moraljax import config_lib
from moraljax import distributed
from moraljax.output import run_report
from moraljax import run_setup
from moraljax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHORT_RUN = dict(seeds=(1, 2), num_episodes=2, episodes_per_chunk=2, checkpoint_every=2)
# One PPO epoch: a valid paper-mode update that compiles in half the time.
ONE_EPOCH = dict(ppo_epochs=1, gradient_accumulation_steps=1)

# One process of the two-process run: train, train again (finds the run
# finished, so restores the last checkpoint collectively and re-exports),
# then restore the checkpoint by hand and save every leaf from process 0.
WORKER = """
import json, sys
from moraljax import distributed
address, pid, workdir, checkpoints, out = sys.argv[1:]
distributed.initialize(distributed.settings_from(address, 2, int(pid), timeout_s=120))
import jax, numpy as np
from moraljax import checkpointing, config_lib, run_setup, train
config = config_lib.experiment_config("", reward="util")
config.run.update(json.loads(%r))
config.ppo.update(json.loads(%r))
cfg = config_lib.experiment_from_config_dict(config)
train.train(cfg, workdir, progress=False, checkpoint_dir=checkpoints)
train.train(cfg, workdir, progress=False, checkpoint_dir=checkpoints)
run = run_setup.build_run(cfg)
learners, meta = checkpointing.Checkpointer(checkpoints).restore(2, run.learner_template())
leaves = jax.tree.leaves(run_setup.to_host(learners))
if distributed.is_writer():
    np.savez(out, *leaves)
print("RESULT", json.dumps({"mesh_processes": [d.process_index for d in run.mesh.devices.flat],
                           "topology": distributed.topology(), "episode": meta["episode"]}))
""" % (json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in SHORT_RUN.items()}), json.dumps(ONE_EPOCH))  # noqa: UP031 (the template's braces)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env_with_devices(count: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={count}",
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "moraljax_test_jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return env


def start(args, devices: int) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env=env_with_devices(devices), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(processes, timeout: float) -> list[str]:
    """Waits for every process (killing all on a timeout); returns their output."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=max(1, deadline - time.monotonic()))[0])
    finally:
        for process in processes:
            process.kill()
    return outputs


def experiment() -> config_lib.ExperimentConfig:
    config = config_lib.experiment_config("", reward="util")
    config.run.update(SHORT_RUN)
    config.ppo.update(ONE_EPOCH)
    return config_lib.experiment_from_config_dict(config)


def test_two_processes_equal_one_process(tmp_path, assert_close_to_scale):
    address = f"127.0.0.1:{free_port()}"
    shared = tmp_path / "checkpoints"
    workers = [
        start([sys.executable, "-c", WORKER, address, str(pid), str(tmp_path / f"workdir{pid}"), str(shared),
               str(tmp_path / "leaves.npz")], devices=2)
        for pid in (0, 1)
    ]
    try:
        # The reference meanwhile: one process, the same two learners on two devices.
        cfg = experiment()
        devices = jax.devices()[:2]
        reference = tmp_path / "reference"
        train.train(cfg, reference, progress=False, devices=devices)
        run = run_setup.build_run(cfg, devices=devices)
        learners, _ = checkpointing.Checkpointer(reference / "checkpoints").restore(2, run.learner_template())
        expected_leaves = jax.tree.leaves(run_setup.to_host(learners))
    finally:
        outputs = finish(workers, timeout=240)
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    results = [json.loads(line.split(" ", 1)[1]) for out in outputs for line in out.splitlines()
               if line.startswith("RESULT ")]
    assert [r["topology"] for r in results] == [
        "process 0/2, 4 devices (2 local, cpu)", "process 1/2, 4 devices (2 local, cpu)"]
    # Two learners on 2 x 2 devices: one device of each process, learner p on process p.
    assert results[0]["mesh_processes"] == [0, 1] and results[0]["episode"] == 2

    # Only process 0 wrote the run's outputs.
    assert not (tmp_path / "workdir1").exists()
    written = tmp_path / "workdir0"
    assert {"metrics.csv", "summary.json", "action_types.png", "adapters"} <= {p.name for p in written.iterdir()}

    ours, theirs = run_report.read_metrics(written / "metrics.csv"), run_report.read_metrics(reference / "metrics.csv")
    assert sorted(ours) == sorted(theirs) and len(ours["episode"]) == 4
    for name, values in theirs.items():
        if values.dtype.kind in "iU":
            np.testing.assert_array_equal(ours[name], values, err_msg=name)
        else:
            assert_close_to_scale(ours[name], values, err_msg=name)

    # Every leaf of the learner state (LoRA, value head, Adam, moments, KL,
    # episode, key) as checkpointed collectively and restored across processes.
    # As in train_test's eight-devices test: Adam's first steps divide by tiny
    # second moments, so float reordering shows as ~1e-5 differences; a wrong
    # learner-to-process mapping would differ by orders of magnitude more.
    with np.load(tmp_path / "leaves.npz") as saved:
        got = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    assert len(got) == len(expected_leaves)
    for i, (a, b) in enumerate(zip(got, expected_leaves)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=f"leaf {i}")


def _launch(*flags):
    return [sys.executable, "-m", "moraljax.launch", "--config=configs/ipd_util.py", *flags]


def _pair(tmp, *flags, per_process=lambda pid: ()):
    """Two launcher processes of one run (1 device each) on a fresh loopback port."""
    address = f"127.0.0.1:{free_port()}"
    return [
        start(_launch("--distributed", f"--coordinator_address={address}", "--num_processes=2",
                      f"--process_id={pid}", "--distributed_timeout=60", *flags, *per_process(pid)), devices=1)
        for pid in (0, 1)
    ]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Every refused multi-process start, run at the same time (they only wait and load)."""
    tmp = tmp_path_factory.mktemp("refusals")
    lonely_peer = f"127.0.0.1:{free_port()}"  # Nobody listens here.
    lonely_chief = f"127.0.0.1:{free_port()}"  # Process 0 listens, nobody joins.
    # Unshared checkpoints: process 0 sees one at episode 1 on its "local
    # disk", process 1 none on its own.
    own_disks = [tmp / "disk0", tmp / "disk1"]
    checkpointer = checkpointing.Checkpointer(own_disks[0])
    checkpointer.save(1, {"x": np.zeros(2, np.float32)}, {"episode": 1})
    checkpointer.close()
    groups = {
        "timeouts": [
            start(_launch("--distributed", f"--coordinator_address={lonely_peer}", "--num_processes=2",
                          "--process_id=1", "--distributed_timeout=3", f"--workdir={tmp / 'peer'}"), devices=1),
            start(_launch("--distributed", f"--coordinator_address={lonely_chief}", "--num_processes=2",
                          "--process_id=0", "--distributed_timeout=3", f"--workdir={tmp / 'chief'}"), devices=1),
        ],
        "mesh": _pair(tmp, "--config.mesh.data=4", "--config.run.seeds=(1,2,3,4)", f"--workdir={tmp / 'mesh'}"),
        "unshared": _pair(tmp, "--config.run.seeds=(1,2)", per_process=lambda pid: (
            f"--checkpoint_dir={own_disks[pid]}", f"--workdir={tmp / f'unshared{pid}'}")),
    }
    outputs = {name: finish(processes, timeout=150) for name, processes in groups.items()}
    codes = {name: [p.returncode for p in processes] for name, processes in groups.items()}
    return {"tmp": tmp, "outputs": outputs, "codes": codes, "addresses": (lonely_peer, lonely_chief)}


def test_unreachable_coordinator_and_missing_peers_time_out_naming_the_address(refusals):
    peer_address, chief_address = refusals["addresses"]
    peer, chief = refusals["outputs"]["timeouts"]
    assert all(code != 0 for code in refusals["codes"]["timeouts"])
    assert f"the coordinator at {peer_address} is not reachable" in peer, peer[-2000:]
    assert "timeout_s=3" in peer
    assert f"started the coordinator at {chief_address}, but not all 2 processes joined" in chief, chief[-2000:]
    assert not (refusals["tmp"] / "peer").exists() and not (refusals["tmp"] / "chief").exists()


def test_mesh_larger_than_the_processes_devices_is_refused_on_every_process(refusals):
    assert all(code != 0 for code in refusals["codes"]["mesh"])
    for output in refusals["outputs"]["mesh"]:
        assert ("mesh data=4 x model=1 needs 4 devices but only 2 are available"
                " (2 process(es) with 1, 1 device(s))") in output, output[-2000:]
    assert not (refusals["tmp"] / "mesh" / "metrics.csv").exists()


def test_checkpoints_not_shared_by_the_processes_are_refused(refusals):
    # Resuming from different episodes would deadlock; both processes refuse.
    assert all(code != 0 for code in refusals["codes"]["unshared"])
    for output in refusals["outputs"]["unshared"]:
        assert "processes disagree on the episode to resume from" in output, output[-2000:]
        assert "(process 0: 1, process 1: 0)" in output and "must be shared by every host" in output
    assert not (refusals["tmp"] / "unshared0" / "metrics.csv").exists()


def test_launch_refuses_coordinator_flags_without_distributed_and_a_missing_cluster(tmp_path):
    result = subprocess.run(_launch("--coordinator_address=127.0.0.1:1", f"--workdir={tmp_path}"),
                            cwd=ROOT, env=env_with_devices(1), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "need --distributed" in result.stderr
    env = {k: v for k, v in env_with_devices(1).items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC",
                                                                             "JAX_PROCESS_ID", "SLURM", "OMPI"))}
    result = subprocess.run(_launch("--distributed", f"--workdir={tmp_path / 'run'}"),
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "jax.distributed found no cluster to join" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_settings_take_flags_then_environment():
    environ = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.settings_from(environ=environ) == distributed.DistributedSettings("10.0.0.2:8476", 4, 3)
    assert distributed.settings_from("h:1", 2, 0, timeout_s=9, environ=environ) == (
        distributed.DistributedSettings("h:1", 2, 0, timeout_s=9))
    detected = distributed.settings_from(environ={})
    assert detected.detected and detected.num_processes is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"coordinator_address": "h:1"}, "expected all three"),
        ({"coordinator_address": "nohost", "num_processes": 2, "process_id": 0}, "coordinator_address='nohost'"),
        ({"coordinator_address": "h:99999", "num_processes": 2, "process_id": 0}, "port"),
        ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, "num_processes=0"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, r"process_id=2.*\[0, num_processes=2\)"),
        ({"timeout_s": 0}, "timeout_s=0"),
        ({"environ": {"JAX_NUM_PROCESSES": "two"}}, "JAX_NUM_PROCESSES='two'"),
    ],
)
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distributed.settings_from(**({"environ": {}} | kwargs))


def test_ipv6_and_host_addresses_parse():
    assert distributed.parse_address("[::1]:8476") == ("::1", 8476)
    assert distributed.parse_address("worker-0.internal:1234") == ("worker-0.internal", 1234)
