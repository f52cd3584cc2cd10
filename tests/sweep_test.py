"""launch/sweep.py: plans, the metrics merge, and two programs equal to one."""

import csv
import importlib.util
import json
import os
import pathlib
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import safetensors.numpy
from tensorboardX.proto import event_pb2

from moraljax.output import names
from moraljax.output import run_report

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("moraljax_launch_sweep", ROOT / "launch" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sweep  # dataclasses look their module up there.
_spec.loader.exec_module(sweep)

# Two episodes of one PPO epoch (a valid paper-mode update that compiles in half the time).
SHORT = ["run.num_episodes=2", "run.episodes_per_chunk=2", "ppo.ppo_epochs=1", "ppo.gradient_accumulation_steps=1"]


def subprocess_env():
    """Children share the tests' compilation cache, so a part compiled once is reused."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "moraljax_test_jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def test_plan_splits_seeds_and_keeps_llm_pairs_in_one_program():
    parts = sweep.plan_sweep(
        ["configs/ipd_util.py", "configs/ipd_game.py:opponent=llm"], seeds=[1, 2, 3], learners_per_program=2
    )
    got = [(p.condition, p.seeds, p.players, p.first_learner) for p in parts]
    assert got == [
        ("util_vs_tft", (1, 2), 1, 0),
        ("util_vs_tft", (3,), 1, 2),
        ("game_vs_llm", (1,), 2, 3),
        ("game_vs_llm", (2,), 2, 5),
        ("game_vs_llm", (3,), 2, 7),
    ]
    command = sweep.part_command(parts[0], pathlib.Path("runs/s"), ["run.num_episodes=20"], ["--distributed"])
    assert command[1:] == [
        "-m", "moraljax.launch", "--config=configs/ipd_util.py", "--workdir=runs/s/parts/000",
        "--config.run.num_episodes=20", "--config.run.seeds=(1,2)", "--noprogress", "--distributed",
    ]


def test_plan_uses_each_configs_seeds_and_overrides():
    parts = sweep.plan_sweep(["configs/ipd_deont.py"], seeds=None, learners_per_program=3,
                             overrides=["run.seeds=(4,5,6,7)"])
    assert [p.seeds for p in parts] == [(4, 5, 6), (7,)]


@pytest.mark.parametrize(
    "configs, kwargs, message",
    [
        (["configs/ipd_game.py:opponent=llm"], {"learners_per_program": 1}, "learners_per_program=1.*at least 2"),
        (["configs/ipd_util.py", "configs/ipd_util.py"], {}, "trains 'util_vs_tft'"),
        (["configs/ipd_util.py"], {"overrides": ["run.num_episode=3"]}, "'num_episode' is unknown"),
        (["configs/ipd_util.py"], {"overrides": ["run.batch_size=0"]}, "run.batch_size=0"),
        (["configs/ipd_util.py"], {"seeds": [1, 1]}, "run.seeds"),
        (["configs/ipd_util.py"], {"learners_per_program": 0}, "learners_per_program=0"),
        ([], {}, "configs=\\[\\]"),
    ],
)
def test_bad_plans_are_refused_before_running(configs, kwargs, message):
    kwargs = {"seeds": None, "learners_per_program": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        sweep.plan_sweep(configs, **kwargs)


def _write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows([header] + rows)


def test_merge_renumbers_learners_sorts_rows_and_fills_the_opponent_column(tmp_path):
    counts = list(names.COUNT_COLUMNS)
    tail = ["illegal_share", "kl"]
    fixed = sweep.Part(0, "a.py", "util_vs_tft", (1,), 1, 0)
    pair = sweep.Part(1, "b.py", "game_vs_llm", (1,), 2, 1)
    _write_csv(sweep.part_workdir(tmp_path, fixed) / "metrics.csv",
               ["episode", "learner", "seed", "condition", "player"] + counts + tail,
               [["0", "0", "1", "util_vs_tft", "0", "5", "0", "0", "0", "0", "0", "0.0", "0.1"],
                ["1", "0", "1", "util_vs_tft", "0", "4", "1", "0", "0", "0", "0", "0.0", "0.2"]])
    _write_csv(sweep.part_workdir(tmp_path, pair) / "metrics.csv",
               ["episode", "learner", "seed", "condition", "player"] + counts + ["n_opp_illegal"] + tail,
               [["0", "0", "1", "game_vs_llm", "0", "0", "0", "3", "0", "0", "0", "1", "0.0", "0.3"],
                ["0", "1", "1", "game_vs_llm", "1", "0", "3", "0", "0", "0", "0", "0", "0.0", "0.4"],
                ["1", "0", "1", "game_vs_llm", "0", "0", "0", "0", "3", "0", "0", "2", "0.0", "0.5"],
                ["1", "1", "1", "game_vs_llm", "1", "0", "0", "0", "3", "0", "0", "0", "0.0", "0.6"]])
    path = sweep.merge_metrics([fixed, pair], tmp_path)
    with path.open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0][11] == "n_opp_illegal"
    # (episode, learner, condition, n_opp_illegal, kl): learners 1, 2 are the pair.
    assert [(r[0], r[1], r[3], r[11], r[-1]) for r in rows[1:]] == [
        ("0", "0", "util_vs_tft", "0", "0.1"),
        ("0", "1", "game_vs_llm", "1", "0.3"),
        ("0", "2", "game_vs_llm", "0", "0.4"),
        ("1", "0", "util_vs_tft", "0", "0.2"),
        ("1", "1", "game_vs_llm", "2", "0.5"),
        ("1", "2", "game_vs_llm", "0", "0.6"),
    ]


def test_merge_refuses_unfinished_parts(tmp_path):
    part = sweep.Part(0, "configs/ipd_util.py", "util_vs_tft", (1,), 1, 0)
    with pytest.raises(ValueError, match=r"parts \['000'\].*have not finished"):
        sweep.merge([part], tmp_path)


def _tensorboard_scalars(directory):
    """{(tag, step): value} from TFRecord event files (length, crc, data, crc)."""
    scalars = {}
    for path in sorted(pathlib.Path(directory).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
    return scalars


def _assert_same_json(a, b, close, path="summary"):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), path
        for key in a:
            _assert_same_json(a[key], b[key], close, f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_json(x, y, close, f"{path}[{i}]")
    elif isinstance(a, float):
        close(b, a, err_msg=path)
    else:
        assert a == b, path


def test_sweep_in_two_programs_merges_into_the_single_program_report(tmp_path, assert_close_to_scale):
    # One program of 2 learners against two programs of 1: different compiled
    # programs, so floats agree to the scale of their terms, not bit for bit.
    single, merged = tmp_path / "single", tmp_path / "sweep"
    env = subprocess_env()
    one_program = subprocess.Popen(
        [sys.executable, "-m", "moraljax.launch", "--config=configs/ipd_util.py", f"--workdir={single}",
         *(f"--config.{o}" for o in SHORT), "--config.run.seeds=(1,2)", "--noprogress"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        two_programs = subprocess.run(
            [sys.executable, "launch/sweep.py", f"--workdir={merged}", "--config=configs/ipd_util.py",
             "--seeds=1,2", "--learners_per_program=1", *(f"--override={o}" for o in SHORT)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
        )
        output, _ = one_program.communicate(timeout=240)
    finally:
        one_program.kill()
    assert two_programs.returncode == 0, two_programs.stdout + two_programs.stderr
    assert one_program.returncode == 0, output
    assert "2 learners in 2 program(s)" in two_programs.stdout
    assert sorted(p.name for p in (merged / "parts").iterdir() if p.is_dir()) == ["000", "001"]

    # The same files, apart from each one's own bookkeeping.
    single_files = {p.name for p in single.iterdir()} - {"checkpoints"}
    assert single_files == {p.name for p in merged.iterdir()} - {"parts", "sweep.json"}
    assert json.loads((single / "config.json").read_text()) == json.loads((merged / "config.json").read_text())

    with (single / "metrics.csv").open() as a, (merged / "metrics.csv").open() as b:
        rows_single, rows_merged = list(csv.reader(a)), list(csv.reader(b))
    assert rows_single[0] == rows_merged[0]
    assert len(rows_single) == len(rows_merged) == 1 + 2 * 2  # Header, 2 episodes x 2 learners.
    columns_single = run_report.read_metrics(single / "metrics.csv")
    columns_merged = run_report.read_metrics(merged / "metrics.csv")
    for name, values in columns_single.items():
        if values.dtype.kind in "iU":
            np.testing.assert_array_equal(values, columns_merged[name], err_msg=name)
        else:
            assert_close_to_scale(columns_merged[name], values, err_msg=name)

    _assert_same_json(json.loads((single / "summary.json").read_text()),
                      json.loads((merged / "summary.json").read_text()), assert_close_to_scale)
    assert (single / "summary.md").read_text() == (merged / "summary.md").read_text()

    tb_single, tb_merged = _tensorboard_scalars(single / "tb"), _tensorboard_scalars(merged / "tb")
    assert sorted(tb_single) == sorted(tb_merged)
    assert any("action_share" in tag for tag, _ in tb_single)
    for key, value in tb_single.items():
        assert_close_to_scale(tb_merged[key], value, err_msg=str(key))

    adapters = sorted(p.name for p in (single / "adapters").iterdir())
    assert adapters == sorted(p.name for p in (merged / "adapters").iterdir()) and len(adapters) == 2
    for name in adapters:
        files = sorted(p.name for p in (single / "adapters" / name).iterdir())
        assert files == sorted(p.name for p in (merged / "adapters" / name).iterdir())
        for file in files:
            if not file.endswith(".safetensors"):
                continue
            a = safetensors.numpy.load_file(single / "adapters" / name / file)
            b = safetensors.numpy.load_file(merged / "adapters" / name / file)
            assert sorted(a) == sorted(b)
            for key in a:  # LoRA factors and value head of the same learner.
                np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-5, err_msg=f"{name}/{file}/{key}")
