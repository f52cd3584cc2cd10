"""Faults a run must survive: concurrent processes, divergence, corrupt checkpoints, bad input, signals.

Every test asserts the outcome a user sees: the refusal line, the files left
behind, and that a run resumed after the fault ends identical (bit for bit,
the same program on the same machine) to one that never met it.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from moraljax import checkpointing
from moraljax import cli
from moraljax import config_lib
from moraljax import interrupts
from moraljax import run_setup
from moraljax import train
from moraljax import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Four episodes of a one-pass update, checkpoints at 2 and 4: compiles fast.
SHORT = {"run.num_episodes": 4, "run.episodes_per_chunk": 2, "run.checkpoint_every": 2,
         "ppo.ppo_epochs": 1, "ppo.gradient_accumulation_steps": 1}


def short_config(**overrides):
    config = config_lib.experiment_config("", reward="util")
    config.run.seeds = (1,)
    for key, value in {**SHORT, **overrides}.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def experiment(config):
    return config_lib.experiment_from_config_dict(config)


def child_env():
    """A child process that shares the tests' compilation cache and sees one device."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "moraljax_test_jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def launch_args(workdir, **overrides):
    flags = [f"--config.{key}={value}" for key, value in {**SHORT, **overrides}.items()]
    return [sys.executable, "-m", "moraljax.launch", "--config=configs/ipd_util.py", f"--workdir={workdir}",
            "--config.run.seeds=(1,)", "--noprogress", *flags]


def outputs(workdir):
    """What a finished run leaves that must not depend on faults along the way."""
    workdir = pathlib.Path(workdir)
    return {name: (workdir / name).read_text() for name in ("metrics.csv", "summary.json", "config.json")}


def checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The short run, uninterrupted: what every recovered run must equal."""
    workdir = tmp_path_factory.mktemp("straight")
    train.train(experiment(short_config()), workdir, progress=False)
    return workdir


# ----------------------------------------------------------------------------
# The workdir lock.


HOLDER = """
import sys, time
from moraljax import workdir
with workdir.hold(sys.argv[1], purpose="a test holder"):
    print("held", flush=True)
    time.sleep(120)
"""


def start_holder(directory):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], env=child_env(),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_live_holder_refuses_others_and_a_killed_one_is_taken_over(tmp_path, capsys):
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(workdir_lib.WorkdirError) as refused:
            with workdir_lib.hold(tmp_path, purpose="training"):
                pass
        message = str(refused.value)
        assert f"PID {holder.pid} on host {socket.gethostname()} (a test holder" in message
        assert "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL runs no cleanup: the lock file still names the dead holder, yet it is free.
    assert str(holder.pid) in (tmp_path / workdir_lib.LOCK_FILENAME).read_text()
    with workdir_lib.hold(tmp_path, purpose="training"):
        assert f"left by PID {holder.pid}" in capsys.readouterr().out
        with workdir_lib.hold(tmp_path, purpose="evaluation"):  # Re-entrant in one process.
            pass
    # A clean release leaves no record to be mistaken for a dead holder.
    assert (tmp_path / workdir_lib.LOCK_FILENAME).read_text() == ""


def test_second_process_on_a_workdir_is_refused_and_the_first_is_unaffected(tmp_path, straight_run):
    first = subprocess.Popen(launch_args(tmp_path / "run"), cwd=ROOT, env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lock = tmp_path / "run" / workdir_lib.LOCK_FILENAME
        deadline = time.time() + 120
        while not (lock.exists() and str(first.pid) in lock.read_text()):
            assert first.poll() is None and time.time() < deadline, first.stdout.read()
            time.sleep(0.1)
        second = subprocess.run(launch_args(tmp_path / "run"), cwd=ROOT, env=child_env(),
                                capture_output=True, text=True, timeout=120)
        output, _ = first.communicate(timeout=240)
    finally:
        first.kill()
    assert first.returncode == 0, output[-3000:]
    assert second.returncode == 1
    last_line = second.stderr.strip().splitlines()[-1]
    assert last_line.startswith("moraljax: workdir=") and f"in use by PID {first.pid}" in last_line
    assert "Traceback" not in second.stderr
    assert outputs(tmp_path / "run") == outputs(straight_run)


# ----------------------------------------------------------------------------
# Divergence.


def test_nonfinite_training_stops_before_saving_anything_from_it(tmp_path):
    config = short_config(**{"ppo.learning_rate": 1e6})  # Diverges in the second chunk (episode 2).
    with pytest.raises(train.NonFiniteError, match=r"diverged at episode 2: non-finite .*learner\(s\) 0 "
                                                   r"\(util_vs_tft seed 1\)"):
        train.train(experiment(config), tmp_path, progress=False)
    assert checkpoint_steps(tmp_path) == [2]  # The last good one; the diverged chunk saved nothing.
    cfg = experiment(config)
    run = run_setup.build_run(cfg)
    checkpointer = checkpointing.Checkpointer(tmp_path / "checkpoints")
    state, _ = checkpointer.restore(2, run.learner_template())
    checkpointer.close()
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state) if leaf.dtype.kind == "f")
    assert not (tmp_path / "adapters").exists() and not (tmp_path / "summary.json").exists()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 and "nan" not in "".join(rows[1:]).lower()


def test_check_finite_names_parameters_when_only_they_diverged():
    stats = {"loss_total": np.zeros((2, 3))}
    info = [{"condition": "util_vs_tft", "seed": s} for s in (1, 2, 3)]
    train.check_finite(np.arange(4, 6), stats, np.array([True, True, True]), info)  # Fine: no error.
    with pytest.raises(train.NonFiniteError, match=r"episodes 4-5: non-finite parameters .*2 \(util_vs_tft seed 3\)"):
        train.check_finite(np.arange(4, 6), stats, np.array([True, True, False]), info)


# ----------------------------------------------------------------------------
# Corrupt checkpoints.


def truncate_arrays(step_dir):
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 64 and "state" in p.parts]
    assert files
    for path in files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def delete_state(step_dir):
    shutil.rmtree(step_dir / checkpointing.STATE_ITEM)


def empty_step(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


@pytest.mark.parametrize("corrupt", [truncate_arrays, delete_state, empty_step])
def test_unreadable_newest_checkpoint_falls_back_to_the_older_one(tmp_path, straight_run, corrupt, capsys):
    shutil.copytree(straight_run, tmp_path, dirs_exist_ok=True)
    assert checkpoint_steps(tmp_path) == [2, 4]
    corrupt(tmp_path / "checkpoints" / "4")
    capsys.readouterr()
    train.train(experiment(short_config()), tmp_path, progress=False)  # Resumes from 2, trains 2-3 again.
    said = capsys.readouterr().out
    assert "the checkpoint at episode 4" in said and "cannot be read" in said and "trying the one before" in said
    aside = list((tmp_path / "checkpoints_unreadable").iterdir())
    assert [p.name.split("_")[0] for p in aside] == ["4"]  # Moved, not deleted.
    assert outputs(tmp_path) == outputs(straight_run)
    assert checkpoint_steps(tmp_path) == [2, 4]


def test_no_readable_checkpoint_says_so_and_stops(tmp_path):
    cfg = experiment(short_config())
    assert train.train(cfg, tmp_path, progress=False, stop_after=2) is None
    delete_state(tmp_path / "checkpoints" / "2")
    metrics = (tmp_path / "metrics.csv").read_text()
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint in .* can be read"):
        train.train(cfg, tmp_path, progress=False)
    # Retrying does not start afresh (which would cut metrics.csv) while the step is kept aside.
    with pytest.raises(checkpointing.CheckpointError, match="Move .*checkpoints_unreadable away"):
        train.train(cfg, tmp_path, progress=False)
    assert (tmp_path / "metrics.csv").read_text() == metrics


def test_a_restore_failing_for_memory_moves_nothing_aside(tmp_path, straight_run, monkeypatch):
    shutil.copytree(straight_run, tmp_path, dirs_exist_ok=True)

    def out_of_memory(self, step, template):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.2GiB")

    monkeypatch.setattr(checkpointing.Checkpointer, "restore", out_of_memory)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        train.train(experiment(short_config()), tmp_path, progress=False)
    assert checkpoint_steps(tmp_path) == [2, 4] and not (tmp_path / "checkpoints_unreadable").exists()


def test_rerunning_a_finished_run_leaves_the_checkpoints_of_a_normal_finish(tmp_path, straight_run):
    shutil.copytree(straight_run, tmp_path, dirs_exist_ok=True)
    # A kill between the final save and orbax's deletion of the oldest step.
    shutil.copytree(tmp_path / "checkpoints" / "2", tmp_path / "checkpoints" / "1")
    assert checkpoint_steps(tmp_path) == [1, 2, 4]
    config_before = (tmp_path / "config.json").stat().st_mtime_ns
    train.train(experiment(short_config()), tmp_path, progress=False)
    assert checkpoint_steps(tmp_path) == checkpoint_steps(straight_run) == [2, 4]
    assert (tmp_path / "config.json").stat().st_mtime_ns == config_before  # Not rewritten on resume.
    assert outputs(tmp_path) == outputs(straight_run)


# ----------------------------------------------------------------------------
# Bad input: one line, before anything is loaded or written.


@pytest.mark.parametrize("arguments, message", [
    (["--config=configs/ipd_util.py", "--config.run.num_episodez=5"],
     "moraljax: --config.run.num_episodez is not allowed; expected a field of run: batch_size,"),
    (["--config", "configs/ipd_util.py", "--config.run.num_episodez=5"],  # --config given apart from its value.
     "moraljax: --config.run.num_episodez is not allowed; expected a field of run: batch_size,"),
    (["--config=configs/ipd_util.py:opponent=xyz"],
     "moraljax: config variant opponent='xyz' is not allowed; expected one of tft, ac, ad, random, llm."),
    (["--config=configs/no_such_config.py"],
     "moraljax: --config=configs/no_such_config.py is not allowed; expected an existing config file"),
    (["--config=configs/ipd_util.py", "--config.run.num_episodes=many"],
     "moraljax: flag --config.run.num_episodes=many: invalid literal for int()"),
    (["--config=configs/ipd_util.py", "--config.model.path=/no/such/model"],
     "moraljax: model.path='/no/such/model' is not a directory"),
])
def test_bad_command_lines_give_one_line_and_touch_nothing(tmp_path, arguments, message):
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "moraljax.launch", *arguments, f"--workdir={workdir}"],
                            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
    assert not workdir.exists()


def test_unknown_override_names_the_nearest_existing_section():
    line = cli.flag_error_line(AttributeError("x"), ["launch", "--config=configs/ipd_util.py",
                                                     "--config.runn.seeds=1"], "configs/ipd_util.py")
    assert line.startswith("--config.runn is not allowed; expected a field of the config: game, lora,")


def test_workdir_that_is_a_file_or_unwritable_is_refused_before_loading(tmp_path):
    cfg = experiment(short_config())
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    with pytest.raises(workdir_lib.WorkdirError, match=r"workdir='.*file' is a file, not a directory"):
        train.train(cfg, a_file, progress=False)
    assert a_file.read_text() == "mine"
    with pytest.raises(workdir_lib.WorkdirError, match=r"workdir='/proc/moraljax_run' cannot be written"):
        train.train(cfg, "/proc/moraljax_run", progress=False)


def test_truncated_config_json_is_named_and_refused(tmp_path, straight_run):
    shutil.copytree(straight_run, tmp_path, dirs_exist_ok=True)
    (tmp_path / "config.json").write_text('{"game": {"na')
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(ValueError) as refused:
        train.train(experiment(short_config()), tmp_path, progress=False)
    message = str(refused.value)
    assert f"{tmp_path / 'config.json'} cannot be read" in message and "\n" not in message
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_workdir_written_before_a_config_field_existed_still_resumes(tmp_path, straight_run):
    shutil.copytree(straight_run, tmp_path, dirs_exist_ok=True)
    recorded = json.loads((tmp_path / "config.json").read_text())
    del recorded["ppo"]["dropout_in_update"]  # Added later, with the behaviour older runs had as default.
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    train.train(experiment(short_config()), tmp_path, progress=False)
    assert outputs(tmp_path) == outputs(straight_run)  # config.json rewritten with the field.
    changed = short_config(**{"ppo.dropout_in_update": True})
    with pytest.raises(ValueError, match="different config.*ppo.dropout_in_update: False there, True now"):
        train.train(experiment(changed), tmp_path, progress=False)


def test_atomic_write_replaces_whole_and_keeps_the_mode(tmp_path):
    path = tmp_path / "summary.json"
    workdir_lib.write_text_atomic(path, "first")
    workdir_lib.write_text_atomic(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # No temporary left.
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------
# Ctrl-C and SIGTERM: a clean stop at the next safe point, then an identical resume.


# Runs the launcher with a hook that sends this process a signal at one point.
SIGNALLER = """
import os, signal, sys
from moraljax import checkpointing, launch, run_setup

where, number = sys.argv[1], getattr(signal, sys.argv[2])
sys.argv = [sys.argv[0]] + sys.argv[3:]
run_chunk, save = run_setup.Run.run_chunk, checkpointing.Checkpointer.save
calls = []

def signalling_run_chunk(self, count):
    calls.append(count)
    # "compile": before the first chunk is compiled; "chunk": while the first runs.
    if where == "compile" and len(calls) == 1:
        os.kill(os.getpid(), number)
    result = run_chunk(self, count)
    if where == "chunk" and len(calls) == 1:
        os.kill(os.getpid(), number)
    return result

def signalling_save(self, step, state, meta):
    if where == "checkpoint" and step == 2:  # The first save, due at episode 2.
        os.kill(os.getpid(), number)
    return save(self, step, state, meta)

run_setup.Run.run_chunk, checkpointing.Checkpointer.save = signalling_run_chunk, signalling_save
launch.run()
"""


@pytest.mark.parametrize("where, signal_name", [("compile", "SIGINT"), ("chunk", "SIGINT"),
                                                ("checkpoint", "SIGINT"), ("chunk", "SIGTERM")])
def test_signal_stops_cleanly_and_the_resumed_run_is_identical(tmp_path, straight_run, where, signal_name):
    workdir = tmp_path / "run"
    stopped = subprocess.run([sys.executable, "-c", SIGNALLER, where, signal_name, *launch_args(workdir)[3:]],
                             cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=240)
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == interrupts.EXIT_STATUS[getattr(signal, signal_name)], output[-3000:]
    assert "Traceback" not in output and "Fatal Python error" not in output and "Exception ignored" not in output
    assert "moraljax: stopped at episode 2 of 4 (checkpoint at episode 2 in" in output
    assert checkpoint_steps(workdir) == [2] and not (workdir / "summary.json").exists()
    train.train(experiment(short_config()), workdir, progress=False)
    assert outputs(workdir) == outputs(straight_run)


def test_real_ctrl_c_while_the_launcher_works_exits_130_and_resumes(tmp_path, straight_run):
    workdir = tmp_path / "run"
    process = subprocess.Popen(launch_args(workdir), cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        lock = workdir / workdir_lib.LOCK_FILENAME
        deadline = time.time() + 120
        while not (lock.exists() and str(process.pid) in lock.read_text()):
            assert process.poll() is None and time.time() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)  # While the model loads or the first chunk compiles.
        output, _ = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "Fatal Python error" not in output
    assert "moraljax: stopped at episode 2 of 4" in output
    train.train(experiment(short_config()), workdir, progress=False)
    assert outputs(workdir) == outputs(straight_run)


def test_second_signal_ends_at_once():
    child = subprocess.run(
        [sys.executable, "-c",
         "import os, signal, time\n"
         "from moraljax import interrupts\n"
         "with interrupts.stop_requests() as stop:\n"
         "    os.kill(os.getpid(), signal.SIGINT)\n"
         "    assert stop.requested and stop.exit_status == 130\n"
         "    os.kill(os.getpid(), signal.SIGINT)\n"
         "    time.sleep(30)\n"
         "print('not reached')\n"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
    assert child.returncode == 130 and "not reached" not in child.stdout
    assert "stopped at once by SIGINT" in child.stderr
