"""launch/tpu_vm.sh: the command sequence for a Cloud TPU v5e-8 slice.

The script prints every command before running it; --dry_run only prints.
These tests read the printed commands as a shell would (shlex), check them
against what gcloud, pip and moraljax.launch accept, run the code-packing
step for real, and run the whole script against a stub gcloud to check that
it executes exactly what the dry run prints.
"""

import json
import os
import pathlib
import re
import shlex
import subprocess
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu_vm.sh"
GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]
BASE = ["--name=moraljax-v5e", "--zone=us-west4-a", "--project=my-project", "--config=configs/ipd_util.py"]


def jax_pin() -> str:
    return re.search(r'"jax==([0-9.]+)"', (ROOT / "setup.py").read_text()).group(1)


def tpu_vm(*args, env=None, tmp_path=None):
    environment = dict(os.environ, **(env or {}))
    if tmp_path is not None:
        environment["TMPDIR"] = str(tmp_path)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=60)


def commands(result) -> list[list[str]]:
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def option(command: list[str], name: str) -> str:
    values = [word.split("=", 1)[1] for word in command if word.startswith(f"--{name}=")]
    assert len(values) == 1, (name, command)
    return values[0]


def assert_valid_bash(script: str) -> None:
    check = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert check.returncode == 0, (script, check.stderr)


def test_dry_run_prints_the_v5e_8_sequence(tmp_path):
    steps = commands(tpu_vm(*BASE, "--delete", "--dry_run", "--", "--config.run.num_episodes=200",
                            tmp_path=tmp_path))
    kinds = [step[:5] if step[0] == "gcloud" else step[:1] for step in steps]
    assert kinds == [
        GCLOUD + ["create"], ["tar"], GCLOUD + ["scp"], GCLOUD + ["ssh"], GCLOUD + ["ssh"],
        ["mkdir"], GCLOUD + ["scp"], GCLOUD + ["delete"],
    ]
    create, pack, copy, setup, train, mkdir, fetch, delete = steps
    for step in (create, copy, setup, train, fetch, delete):
        assert option(step, "zone") == "us-west4-a" and option(step, "project") == "my-project"
    # A v5e slice with 8 chips, on the v5e TPU runtime.
    assert create[5] == "moraljax-v5e"
    assert option(create, "accelerator-type") == "v5litepod-8"
    assert option(create, "version") == "v2-alpha-tpuv5-lite"

    # This checkout, packed and copied to every worker.
    tarball = pack[pack.index("-czf") + 1]
    assert pack[pack.index("-C") + 1] == str(ROOT)
    assert copy[5:7] == [tarball, "moraljax-v5e:moraljax-src.tar.gz"] and option(copy, "worker") == "all"

    # Install on every worker: Python 3.11, then the README's pip install -e . with TPU jax.
    assert setup[5] == "moraljax-v5e" and option(setup, "worker") == "all"
    remote = option(setup, "command")
    assert_valid_bash(remote)
    assert "tar -xzf ~/moraljax-src.tar.gz -C ~/moraljax" in remote
    assert "python3.11 -m venv" in remote
    install = remote.split("; ")[-1]
    assert install.startswith("cd ~/moraljax && ")
    assert shlex.split(install.split(" && ", 1)[1])[1:] == ["install", "-e", ".", f"jax[tpu]=={jax_pin()}"]

    # Train on every worker at once, one JAX process each.
    assert train[5] == "moraljax-v5e" and option(train, "worker") == "all"
    remote = option(train, "command")
    assert_valid_bash(remote)
    words = shlex.split(remote.split(" && ")[-1])
    assert words[0].endswith("/moraljax-venv/bin/python") and words[1:3] == ["-m", "moraljax.launch"]
    assert "--config=configs/ipd_util.py" in words and "--distributed" in words
    assert "--workdir=$HOME/moraljax_runs/ipd_util" in words
    assert words[-1] == "--config.run.num_episodes=200"
    from absl import flags

    from moraljax import launch  # noqa: F401  (defines the launcher's flags)

    for word in words[3:]:
        name = word[2:].split("=", 1)[0]
        assert name.startswith("config.") or name.removeprefix("no") in flags.FLAGS, word

    # The run back from worker 0, then the VM deleted.
    assert mkdir == ["mkdir", "-p", "runs"]
    assert "--recurse" in fetch and "moraljax-v5e:moraljax_runs/ipd_util" in fetch
    assert fetch[fetch.index("moraljax-v5e:moraljax_runs/ipd_util") + 1] == "runs"
    assert option(fetch, "worker") == "0"
    assert delete[5] == "moraljax-v5e" and "--quiet" in delete


def test_packed_code_installs_from_the_archive(tmp_path):
    pack = commands(tpu_vm(*BASE, "--dry_run", tmp_path=tmp_path))[1]
    assert subprocess.run(pack, capture_output=True).returncode == 0
    with tarfile.open(pack[pack.index("-czf") + 1]) as archive:
        names = {name.removeprefix("./") for name in archive.getnames()}
    assert {"setup.py", "README.md", "moraljax/launch.py", "configs/ipd_util.py",
            "moraljax/llm/tiny/checkpoint/config.json"} <= names
    assert not any(name.startswith((".git/", "runs/")) or "__pycache__" in name for name in names)


def test_script_runs_exactly_the_printed_commands(tmp_path):
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    log = tmp_path / "gcloud.log"
    (stub_dir / "gcloud").write_text(
        "#!/usr/bin/env python3\nimport json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    (stub_dir / "gcloud").chmod(0o755)
    args = [*BASE, f"--local_dir={tmp_path / 'fetched'}", "--delete"]
    env = {"PATH": f"{stub_dir}{os.pathsep}{os.environ['PATH']}"}
    printed = commands(tpu_vm(*args, "--dry_run", env=env, tmp_path=tmp_path))
    result = tpu_vm(*args, env=env, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert commands(result) == printed
    executed = [json.loads(line) for line in log.read_text().splitlines()]
    assert [["gcloud", *words] for words in executed] == [c for c in printed if c[0] == "gcloud"]
    assert (tmp_path / "fetched").is_dir()


def test_options_change_the_sequence(tmp_path):
    steps = commands(tpu_vm(*BASE, "--reuse", "--git_url=https://example.com/moraljax.git", "--git_ref=v1",
                            "--checkpoint_dir=gs://bucket/run", "--workdir=util_v5e",
                            "--accelerator_type=v5litepod-16", "--dry_run", tmp_path=tmp_path))
    assert [s[4] for s in steps if s[0] == "gcloud"] == ["ssh", "ssh", "scp"]  # No create, copy or delete.
    setup, train = (option(s, "command") for s in steps if s[:5] == GCLOUD + ["ssh"])
    assert "git clone https://example.com/moraljax.git ~/moraljax && git -C ~/moraljax checkout v1" in setup
    assert setup.endswith(" gcsfs")  # gs:// checkpoints need it.
    assert "--checkpoint_dir=gs://bucket/run" in shlex.split(train)
    assert "--workdir=$HOME/moraljax_runs/util_v5e" in shlex.split(train)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config=configs/ipd_util.py"], "--name is required"),
        (["--name=x"], "--config is required"),
        (["--name=Bad_Name", "--config=configs/ipd_util.py"], "--name='Bad_Name' is not allowed"),
        (["--name=x", "--config=configs/nope.py"], "configs/nope.py is not a file"),
        (["--name=x", "--config=configs/ipd_util.py", "--checkpoint_dir=/local"], "expected gs://"),
        (["--name=x", "--config=configs/ipd_util.py", "--git_ref=v1"], "--git_ref needs --git_url"),
        (["--name=x", "--config=configs/ipd_util.py", "--colour=blue"], "unknown option '--colour=blue'"),
    ],
)
def test_bad_options_are_refused(args, message):
    result = tpu_vm(*args, "--dry_run")
    assert result.returncode == 2 and message in result.stderr and not result.stdout
