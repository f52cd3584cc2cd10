r"""Training speed: seconds per seed-episode, with a breakdown.

    python launch/benchmark_train.py                       # built-in tiny model
    python launch/benchmark_train.py --seeds=5 --episodes=20
    python launch/benchmark_train.py --model=/path/to/gemma-2-2b-it

Builds the run of configs/ipd_util.py (tiny-model hyperparameters unless
--model is given), compiles the training chunk, then times:
  chunk      the whole jitted chunk of --episodes episodes (what `train` runs),
  rollout    one episode's decisions alone (prefill + decode + parse + rewards),
  reference  the reference log-probs of one episode from the cached prompt
             prefixes (their prefill, once per chunk, is timed apart),
  update     one PPO step of every learner on one episode's decisions, with
             the learners vmapped (as train_chunk does) and in sequence.
Each part is its own jitted function timed after a warm-up call; the parts
add up to about the chunk's time per episode. Compilation is excluded and
reported separately. Prints figures only; nothing is asserted.
"""

import functools
import time

from absl import app
from absl import flags
import jax

from moraljax import chunk as chunk_lib
from moraljax import config_lib
from moraljax import run_setup
from moraljax.rl import reference as reference_lib
from moraljax.rl import rollout

_MODEL = flags.DEFINE_string("model", "tiny", "'tiny' or a local model directory of a supported family.")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Learners (seeds) in the chunk.")
_EPISODES = flags.DEFINE_integer("episodes", 20, "Episodes per timed chunk.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (the best is reported).")


def _best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def main(argv):
    del argv
    cd = config_lib.experiment_config(f"model={_MODEL.value}", reward="util")
    cd.run.seeds = tuple(range(1, _SEEDS.value + 1))
    cfg = config_lib.experiment_from_config_dict(cd)
    run = run_setup.build_run(cfg)
    run.start_fresh()
    seeds, episodes = _SEEDS.value, _EPISODES.value
    policy_params = sum(x.size for x in jax.tree.leaves(run.frozen))
    print(f"model: {cfg.model.path or 'built-in tiny'}, {policy_params:,} frozen parameters, "
          f"prompt {run.env.prompts.ids.shape[1]} tokens, gen_len {run.sampling_settings.gen_len}")
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"{seeds} seeds, batch {cfg.run.batch_size}, {episodes} episodes per chunk")

    start = time.perf_counter()
    jax.block_until_ready(run.run_chunk(episodes))
    compile_s = time.perf_counter() - start

    def chunk():
        return run.run_chunk(episodes)

    chunk_s = _best_time(chunk, _REPEATS.value)

    chunk_settings = run.chunk_settings(1)
    learners = run.learners
    keys = jax.vmap(jax.random.fold_in)(learners.key, learners.episode)

    rollout_fn = jax.jit(functools.partial(
        rollout.rollout_episode, run.graphdef, batch_size=cfg.run.batch_size, settings=run.sampling_settings))
    decisions = rollout_fn(run.frozen, learners.trainable, run.env, run.setup, learners.episode, keys)
    rollout_s = _best_time(
        lambda: rollout_fn(run.frozen, learners.trainable, run.env, run.setup, learners.episode, keys),
        _REPEATS.value)

    gen_len = run.sampling_settings.gen_len

    @jax.jit
    def reference_prefix(frozen, env):
        return reference_lib.reference_prefix(run.reference_graphdef, frozen, env.prompts, gen_len)

    @jax.jit
    def reference(frozen, prefix, decisions):
        return reference_lib.reference_logprobs(prefix, frozen, decisions.prompt_row.reshape(-1),
                                                decisions.tokens.reshape(-1, gen_len))

    prefix = reference_prefix(run.frozen, run.env)
    prefix_s = _best_time(lambda: reference_prefix(run.frozen, run.env), _REPEATS.value)
    ref = reference(run.frozen, prefix, decisions)
    reference_s = _best_time(lambda: reference(run.frozen, prefix, decisions), _REPEATS.value)
    decisions = decisions.replace(ref_logprobs=ref.reshape(decisions.logprobs.shape))

    def update_fn(map_learners):
        @jax.jit
        def update(frozen, env, learners, decisions):
            step = functools.partial(chunk_lib.update_learner, run.graphdef, frozen, env.prompts, chunk_settings)
            return map_learners(step, (learners, chunk_lib.ppo_batch(decisions), keys))
        return update

    # What train_chunk does (vmap over learners), and the same update with the
    # learners in sequence (lax.map), for comparison: with the 181-token
    # prompt of an earlier tiny tokenizer lax.map was faster on CPU (one
    # learner's activations stayed in cache); at 47 tokens vmap wins.
    update_times = {}
    for name, map_learners in [("vmap", lambda step, args: jax.vmap(step)(*args)),
                               ("lax.map", lambda step, args: jax.lax.map(lambda xs: step(*xs), args))]:
        update = update_fn(map_learners)
        jax.block_until_ready(update(run.frozen, run.env, learners, decisions))
        update_times[name] = _best_time(lambda: update(run.frozen, run.env, learners, decisions), _REPEATS.value)

    per = lambda seconds, n_episodes: 1000 * seconds / (n_episodes * seeds)
    print(f"compile (first chunk, incl. its run): {compile_s:.1f} s")
    print(f"chunk:     {per(chunk_s, episodes):8.2f} ms per seed-episode "
          f"({episodes * seeds * cfg.run.batch_size / chunk_s:,.0f} decisions/s)")
    print(f"rollout:   {per(rollout_s, 1):8.2f} ms per seed-episode")
    print(f"reference: {per(reference_s, 1):8.2f} ms per seed-episode "
          f"(+ its prompt prefill once per chunk: {1000 * prefix_s:.1f} ms)")
    print(f"update:    {per(update_times['vmap'], 1):8.2f} ms per seed-episode "
          f"(learners vmapped, as in train_chunk)")
    print(f"           {per(update_times['lax.map'], 1):8.2f} ms per seed-episode (learners in sequence, lax.map)")

if __name__ == "__main__":
    app.run(main)
