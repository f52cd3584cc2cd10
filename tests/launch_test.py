"""The command-line entry point: workdir naming and clean refusals."""

import pathlib
import subprocess
import sys

from moraljax import launch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_default_workdir_names_config_and_variant():
    assert launch.default_workdir("configs/ipd_util.py") == pathlib.Path("runs/ipd_util")
    assert launch.default_workdir("configs/ipd_game.py:opponent=ad,model=/m/g") == pathlib.Path(
        "runs/ipd_game_opponent=ad_model=_m_g"
    )


def _launch(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "moraljax.launch", *args, f"--workdir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def test_bad_config_values_exit_with_the_field_named(tmp_path):
    result = _launch(tmp_path, "--config=configs/ipd_util.py", "--config.run.batch_size=0")
    assert result.returncode != 0
    assert "run.batch_size=0 is not allowed; expected a positive integer" in result.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_variant_exits_before_any_work(tmp_path):
    result = _launch(tmp_path, "--config=configs/ipd_util.py:oponent=ad")
    assert result.returncode != 0
    assert "unknown config variant 'oponent=ad'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_model_directory_is_named(tmp_path):
    result = _launch(tmp_path, "--config=configs/ipd_util.py:model=/no/such/gemma")
    assert result.returncode != 0
    assert "model.path='/no/such/gemma' is not a directory" in result.stderr
    assert not (tmp_path / "run").exists()


def test_paper_suite_refuses_bad_settings_before_any_work(tmp_path):
    result = _launch(tmp_path, "--config=configs/paper.py", "--config.programs.vs_llm.run.batch_size=0")
    assert result.returncode != 0
    assert "programs.vs_llm: run.batch_size=0 is not allowed" in result.stderr
    result = _launch(tmp_path, "--config=configs/paper.py:model=/no/such/gemma")
    assert result.returncode != 0
    assert "model.path='/no/such/gemma' is not a directory" in result.stderr
    assert not (tmp_path / "run").exists()
