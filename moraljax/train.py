"""Moral fine-tuning: the host loop around the jitted chunk (chunk.py).

`train` checks the workdir against the config (config_record.py), locks it,
builds the run (run_setup.py), resumes from the newest readable checkpoint
or starts fresh, then loops over chunks: run the chunk, check it is finite,
write its metrics, checkpoint, and stop cleanly on Ctrl-C or SIGTERM. A
finished run exports every learner's adapter and writes its report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from moraljax import chunk as chunk_lib
from moraljax import config_lib
from moraljax import config_record
from moraljax import distributed
from moraljax import interrupts
from moraljax import run_setup
from moraljax import workdir as workdir_lib
from moraljax.output import names as metric_names


def export_adapters(run: run_setup.Run, directory: pathlib.Path, *, is_writer: bool) -> None:
    """Writes every learner's adapter in PEFT's format (llm/adapter_export.py).

    One directory per learner, `<condition>_seed<seed>[_player<p>]`, loadable
    with transformers + peft on the same base model.
    """
    from moraljax.llm import adapter_export

    trainable = run_setup.to_host(run.learners.trainable)
    if not is_writer:
        return
    base_name = run.cfg.model.path or "moraljax/llm/tiny/checkpoint"
    for n, info in enumerate(run.learner_info):
        name = f"{info['condition']}_seed{info['seed']}".replace(">", "")
        if "member" in info:
            name += f"_member{info['member']}"
        elif info["opponent_is_llm"]:
            name += f"_player{info['player']}"
        adapter_export.export_peft_adapter(
            jax.tree.map(lambda x: x[n], trainable),
            run.cfg.lora,
            directory / name,
            base_model_name_or_path=base_name,
            base_config=run.base_config,
        )


def _shares_text(metrics: dict[str, np.ndarray]) -> str:
    """'C 52% D 40% illegal 8%' over a chunk's decisions (for the progress bar)."""
    types = np.asarray(metrics["action_type"]).ravel()
    shares = metric_names.group_shares(np.bincount(types, minlength=metric_names.NUM_ACTION_TYPES) / types.size)
    return f"C {shares['cooperation']:.0%} D {shares['defection']:.0%} illegal {shares['illegal']:.0%}"


class NonFiniteError(ValueError):
    """Training produced NaN or infinite losses, advantages or parameters."""


def check_finite(episodes: np.ndarray, stats: dict[str, np.ndarray], params_finite: np.ndarray,
                 learner_info: list[dict[str, Any]]) -> None:
    """Raises NonFiniteError naming the first bad episode and its learners.

    Args:
        episodes: [K] episode numbers of the chunk.
        stats: update statistics {name: [K, N]} (losses, advantages, KL, ...).
        params_finite: [N] whether each learner's parameters are finite after
            the chunk.
        learner_info: per learner, its seed and condition (for the message).
    """
    bad = np.zeros(np.shape(next(iter(stats.values()))), bool) if stats else None
    names = []
    for name, values in sorted(stats.items()):
        nonfinite = ~np.isfinite(np.asarray(values, np.float64))
        if nonfinite.any():
            names.append(name)
            bad |= nonfinite
    if names:
        k = int(np.argmax(bad.any(axis=1)))
        learners, where = np.flatnonzero(bad[k]), f"episode {int(episodes[k])}"
        what = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    elif not np.all(params_finite):
        learners, where = np.flatnonzero(~np.asarray(params_finite)), (
            f"episodes {int(episodes[0])}-{int(episodes[-1])}")
        what = "parameters"
    else:
        return
    who = ", ".join(f"{n} ({learner_info[n]['condition']} seed {learner_info[n]['seed']})"
                    for n in learners[:4]) + (", ..." if len(learners) > 4 else "")
    raise NonFiniteError(
        f"training diverged at {where}: non-finite {what} for learner(s) {who}; no checkpoint or"
        " adapter was written from it (the newest checkpoint is the last good one). Lower"
        " ppo.learning_rate or check the reward scale.")


def _any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (every process must stop together)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def train(cfg: config_lib.ExperimentConfig, workdir: str | pathlib.Path, *, progress: bool = True,
          stop_after: int | None = None, devices=None,
          checkpoint_dir: str | pathlib.Path | None = None) -> dict[str, Any] | None:
    """Trains (or resumes) a run in `workdir` and writes its outputs.

    The workdir is locked for the whole run (`moraljax.workdir`). Ctrl-C or
    SIGTERM stops it after the current chunk with a checkpoint
    (`interrupts.Stopped`); a chunk with non-finite losses or parameters stops
    it before anything is saved from that chunk (`NonFiniteError`).

    Args:
        cfg: the validated experiment.
        workdir: run directory: config.json, checkpoints/, metrics.csv, tb/,
            action_types.png, rewards.png, summary.json, summary.md.
        progress: show a progress bar with live action shares.
        stop_after: stop (with a checkpoint) once this many episodes are done,
            as if killed there; for tests of resumption.
        devices: devices of the mesh (default all, of every process).
        checkpoint_dir: where orbax keeps checkpoints (default
            workdir/checkpoints). With several hosts every process must see
            the same directory (a shared file system, or gs://...).

    Returns:
        The summary (process 0), or None (other processes, or stopped early).

    Raises:
        ValueError / FileNotFoundError: bad settings or a workdir holding a
            different run or in use by another process, before anything is
            loaded or written.
        NonFiniteError: training diverged.
        interrupts.Stopped: a stop was requested (after a checkpoint).
    """
    workdir = pathlib.Path(workdir)
    resolved = config_record.resolved_config(cfg)
    config_record.check_workdir(workdir, resolved, defaults=config_record.config_defaults(cfg))
    run_setup.model_directory(cfg.model.path)
    is_writer = distributed.is_writer()
    with interrupts.stop_requests() as stop, contextlib.ExitStack() as held:
        # One process (the writer) holds the lock for the whole multi-process
        # job; the others learn whether it got it, so none waits for a peer
        # that was refused.
        refusal = None
        if is_writer:
            try:
                held.enter_context(workdir_lib.hold(workdir, purpose="training"))
            except workdir_lib.WorkdirError as error:
                refusal = error
        if _any_process(refusal is not None):
            raise refusal or workdir_lib.WorkdirError(
                f"workdir={str(workdir)!r} could not be locked by process 0; see its message.")
        return _train_locked(cfg, workdir, resolved, stop, progress=progress, stop_after=stop_after,
                             devices=devices, checkpoint_dir=checkpoint_dir)


def _start(run: run_setup.Run, checkpointer, workdir: pathlib.Path, *, is_writer: bool,
           say: Callable[[str], None]) -> int:
    """Creates the learner state: restored from the newest readable checkpoint, or fresh. Returns its episode."""
    # Hosts that each see their own local disk would resume from different
    # episodes and deadlock in the first collective; refuse instead.
    distributed.check_same_on_all_processes(
        checkpointer.latest_step() or 0, f"the episode to resume from in {checkpointer.directory}",
        "the checkpoint directory must be shared by every host (e.g. --checkpoint_dir=gs://bucket/run).")
    report = print if is_writer else (lambda *_: None)
    start, restored = checkpointer.restore_latest(run.learner_template(), is_writer=is_writer, say=report)
    if start:
        run.resume(restored)
        say(f"resumed from the checkpoint at episode {start} in {workdir}")
    else:
        run.start_fresh()
    checkpointer.prune()
    return start


@dataclasses.dataclass
class _Outputs:
    """Where a run's chunks go: metrics.csv and TensorBoard, population tables, the progress bar."""

    writer: Any
    population_writer: Any
    bar: Any

    def write(self, episodes: np.ndarray, metrics: dict[str, np.ndarray], stats: dict[str, np.ndarray]) -> None:
        self.writer.write_chunk(episodes, metrics, stats)
        if self.population_writer is not None:
            self.population_writer.write_chunk(episodes, metrics)
        if self.bar is not None:
            self.bar.update(len(episodes))
            self.bar.set_postfix_str(_shares_text(metrics))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()


def _open_outputs(run: run_setup.Run, workdir: pathlib.Path, resolved: dict[str, Any], start: int, *,
                  is_writer: bool, progress: bool) -> _Outputs:
    from moraljax import reporting

    writer = reporting.RunWriter(workdir, run.learner_info, is_writer=is_writer, start_episode=start,
                                 opponent_is_llm=[info["opponent_is_llm"] for info in run.learner_info])
    writer.save_config(resolved)
    population_writer = None
    if run.cfg.population.composition:
        from moraljax import population_report

        population_writer = population_report.PopulationWriter(workdir, run.learner_info, is_writer=is_writer,
                                                                start_episode=start)
    bar = None
    if progress and is_writer:
        import tqdm

        bar = tqdm.tqdm(total=run.cfg.run.num_episodes, initial=start, unit="episode", dynamic_ncols=True)
    return _Outputs(writer=writer, population_writer=population_writer, bar=bar)


def _run_chunks(run: run_setup.Run, checkpointer, outputs: _Outputs, stop: interrupts.StopRequests, start: int,
                total: int) -> tuple[int, int, bool]:
    """Chunks from episode `start` to `total`, checkpointing on schedule and on a stop.

    Returns:
        (episodes done, episode of the newest checkpoint, whether a stop was requested).
    """
    every = run.cfg.run.checkpoint_every
    episode = saved = start
    while episode < total:
        count = min(run.cfg.run.episodes_per_chunk, total - episode)
        metrics, stats = run.run_chunk(count)
        episodes = np.arange(episode, episode + count)
        # Before anything is written from the chunk: a diverged chunk leaves
        # no rows, no checkpoint and no adapters behind.
        check_finite(episodes, stats, run_setup.to_host(chunk_lib.finite_per_learner(run.learners))[:run.num_real],
                     run.learner_info)
        outputs.write(episodes, metrics, stats)
        crossed = (episode + count) // every > episode // every
        episode += count
        if crossed or episode == total:
            checkpointer.save(episode, run.real_learners(), {"episode": episode})
            saved = episode
        if _any_process(stop.requested):  # After the save: a Ctrl-C during it counts.
            if saved != episode:
                checkpointer.save(episode, run.real_learners(), {"episode": episode})
                saved = episode
            return episode, saved, True
    return episode, saved, False


def _train_locked(cfg: config_lib.ExperimentConfig, workdir: pathlib.Path, resolved: dict[str, Any],
                  stop: interrupts.StopRequests, *, progress: bool, stop_after: int | None, devices,
                  checkpoint_dir: str | pathlib.Path | None) -> dict[str, Any] | None:
    """`train`'s body, run while the workdir is held and stop requests are recorded."""
    from moraljax import checkpointing

    is_writer = distributed.is_writer()
    started = time.time()
    run = run_setup.build_run(cfg, devices=devices)
    say = print if (progress and is_writer) else (lambda *_: None)
    say(f"loaded {cfg.model.path or 'the built-in tiny model'} in {time.time() - started:.1f}s;"
        f" {run.plan()},"
        f" prompts of {run.env.prompts.ids.shape[1]} tokens, {run.sampling_settings.gen_len} generated tokens")
    checkpointer = checkpointing.Checkpointer(checkpoint_dir or workdir / "checkpoints")
    start = _start(run, checkpointer, workdir, is_writer=is_writer, say=say)
    outputs = _open_outputs(run, workdir, resolved, start, is_writer=is_writer, progress=progress)
    total = cfg.run.num_episodes if stop_after is None else min(stop_after, cfg.run.num_episodes)
    try:
        episode, saved, stopping = _run_chunks(run, checkpointer, outputs, stop, start, total)
        if stopping and episode < cfg.run.num_episodes:
            raise interrupts.Stopped(
                stop.exit_status or interrupts.EXIT_STATUS[signal.SIGINT],
                f"stopped at episode {episode} of {cfg.run.num_episodes} (checkpoint at episode {saved} in"
                f" {checkpointer.directory}); run the same command again to resume.")
        summary = None
        if episode >= cfg.run.num_episodes:
            export_adapters(run, workdir / "adapters", is_writer=is_writer)
            summary = outputs.writer.write_report()
            if outputs.population_writer is not None and is_writer:
                from moraljax import population_report

                summary["population"] = population_report.write_population_report(workdir)
    finally:
        checkpointer.close()
        outputs.close()
    say(f"ran {episode - start} episodes in {time.time() - started:.1f}s (compilation included)")
    return summary
