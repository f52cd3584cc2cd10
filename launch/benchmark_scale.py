r"""Cost of moral fine-tuning at real scale: FLOPs, saved activations, memory, predicted time.

    python launch/benchmark_scale.py                                # Gemma-2-2b, paper settings
    python launch/benchmark_scale.py --model=gemma-2-9b --remat=full
    python launch/benchmark_scale.py --model=llama-3.2-1b           # any preset, or a config.json path
    python launch/benchmark_scale.py --measure --learners=1,5 --episodes=20   # on a GPU/TPU as well

Needs no weights: the model is abstract (``jax.eval_shape``) at full depth,
and every count comes from the project's own training functions with the
paper's settings (LoRA r64 on all linear layers with dropout 0.05, value-head
dropout 0.1, bf16 base, batch of 5 decisions, gen_len 2, the TRL 0.9 paper
update: one dropout-free gradient per episode):

- FLOPs per learner-episode from XLA's cost analysis of the lowered
  programs with every loop unrolled (XLA counts a loop body once whatever
  its trip count): rollout (the B decisions sampled with LoRA dropout, and
  the dropout-free re-score of their old log-probs), reference (adapter-off
  log-probs of the answers) and the PPO update; the prefill of the 32
  distinct prompts (both players' sides) for the reference, done once per
  chunk of episodes for all learners, is shown apart. The ratio is to the
  minimum ``2 x parameters x tokens``: each token through the layers costs 2
  x (layer matmul parameters) per forward and again per backward (only
  activation gradients: the base is frozen), each logit row 2 x V x D;
  attention's score FLOPs come on top.
- Saved activations per learner: what the VJP of the update's forward keeps
  (``jax.ad_checkpoint`` saved residuals), parameters excluded;
  backend-independent.
- LoRA + value head, Adam and gradient bytes (float32) and the bf16 base.
- Predicted peak memory for 1, 5 and 30 learners on one device and 30 on 8,
  and minutes per seed (--run_episodes episodes) and per 5-seed program on
  H100, A100 and TPU v5e at --mfu of their dense bf16 peak.

With --measure it also trains --episodes episodes of random-weight learners
(--learners of them, one program each) on the default device and prints
seconds per episode, achieved MFU and peak device memory next to the
predictions. Nothing is asserted; launch/device_check.sh runs it on a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import functools
import json
import pathlib
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from flax import nnx

from moraljax import action_matcher
from moraljax import chunk as chunk_lib
from moraljax import games
from moraljax import opponents
from moraljax import prompt_tables
from moraljax import rewards
from moraljax.llm import decoder as decoder_lib
from moraljax.llm import decoder_config
from moraljax.llm import families
from moraljax.llm import lora as lora_lib
from moraljax.llm import policy as policy_lib
from moraljax.llm import sampling
from moraljax.rl import ppo_settings
from moraljax.rl import reference as reference_lib
from moraljax.rl import rollout

# config.json fields of the presets (the public model cards' configs).
_GEMMA2 = {"model_type": "gemma2", "vocab_size": 256000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
           "rope_theta": 10000.0, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
           "sliding_window": 4096, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}
_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "hidden_act": "silu", "rope_scaling": {
               "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}}
_QWEN = {"rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu", "max_position_embeddings": 32768}
PRESETS = {
    "gemma-2-2b": {**_GEMMA2, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                   "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                   "query_pre_attn_scalar": 256},
    "gemma-2-9b": {**_GEMMA2, "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
                   "query_pre_attn_scalar": 256},
    "gemma-2-27b": {**_GEMMA2, "hidden_size": 4608, "intermediate_size": 36864, "num_hidden_layers": 46,
                    "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
                    "query_pre_attn_scalar": 144},
    "gemma-3-1b": {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152,
                   "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
                   "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
                   "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rms_norm_eps": 1e-6,
                   "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768},
    "llama-3.2-1b": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "tie_word_embeddings": True},
    "llama-3.1-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                     "tie_word_embeddings": False},
    "qwen2.5-1.5b": {**_QWEN, "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536,
                     "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen3-1.7b": {**_QWEN, "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2048,
                   "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True},
}
# Dense bf16 peak FLOP/s and memory per chip (vendor data sheets).
HARDWARE = {"H100": (989e12, 80e9), "H200": (989e12, 141e9), "A100": (312e12, 80e9), "TPU v5e": (197e12, 16e9)}
PAPER_LORA = lora_lib.LoraConfig(rank=64, alpha=32, dropout=0.05)
PAPER_VALUE_HEAD_DROPOUT = 0.1
DISTINCT_PROMPTS = 16  # Per player side (SPEC 4: 4 states x 4 option orders).
EPISODES_PER_CHUNK = 50

_MODEL = flags.DEFINE_string("model", "gemma-2-2b", f"A preset ({', '.join(PRESETS)}) or a config.json path.")
_REMAT = flags.DEFINE_enum("remat", "auto", list(decoder_config.REMAT_CHOICES), "Layer rematerialisation.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 215, "Prompt tokens (the IPD prompt is 215 Gemma-2 tokens).")
_GEN_LEN = flags.DEFINE_integer("gen_len", 2, "Generated tokens per answer (paper: 2).")
_BATCH = flags.DEFINE_integer("batch_size", 5, "Decisions per episode (paper: 5 vs fixed opponents).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOP utilisation assumed for the predictions.")
_RUN_EPISODES = flags.DEFINE_integer("run_episodes", 1000, "Episodes per seed in the predictions (paper: 1000).")
_MEASURE = flags.DEFINE_bool("measure", False, "Also train random-weight learners and time them.")
_LEARNERS = flags.DEFINE_list("learners", ["1", "5"], "Learner counts timed with --measure.")
_EPISODES = flags.DEFINE_integer("episodes", 20, "Episodes timed per learner count with --measure.")


def hf_config(name: str) -> dict:
    """A preset's config.json fields, or those of a config.json file (or its directory)."""
    if name in PRESETS:
        return dict(PRESETS[name])
    path = pathlib.Path(name)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise app.UsageError(f"--model={name!r} is not allowed; expected one of {', '.join(PRESETS)} or a"
                             " config.json path.")
    return json.loads(path.read_text())


@contextlib.contextmanager
def unrolled_loops() -> Iterator[None]:
    """Every lax.scan unrolled and the layer stack run as a Python loop, so XLA counts each pass."""
    scan, max_unrolled = jax.lax.scan, decoder_lib._MAX_UNROLLED_LAYERS
    jax.lax.scan = functools.partial(scan, unroll=True)
    decoder_lib._MAX_UNROLLED_LAYERS = 10**6
    try:
        yield
    finally:
        jax.lax.scan, decoder_lib._MAX_UNROLLED_LAYERS = scan, max_unrolled


@dataclasses.dataclass
class Workload:
    """One learner's training step, abstract: the pieces `chunk_lib.train_chunk` is built from."""

    config: decoder_lib.DecoderConfig
    graphdef: nnx.GraphDef
    reference_graphdef: nnx.GraphDef
    frozen: nnx.State
    env: rollout.Environment
    setup: rollout.LearnerSetup
    learners: chunk_lib.LearnerState
    chunk: chunk_lib.ChunkSettings
    prompt_len: int


def build_workload(config: decoder_lib.DecoderConfig, *, remat: str, prompt_len: int, gen_len: int,
                   batch_size: int, num_learners: int = 1, concrete: bool = False) -> Workload:
    """The paper's settings on `config`: abstract weights (or random ones with `concrete`)."""
    make = functools.partial(policy_lib.Policy, config, lora=PAPER_LORA, value_head_dropout=PAPER_VALUE_HEAD_DROPOUT,
                             param_dtype=jnp.bfloat16, key=jax.random.key(0))
    if concrete:
        policy = policy_lib.init_policy(config, lora=PAPER_LORA, value_head_dropout=PAPER_VALUE_HEAD_DROPOUT,
                                        param_dtype=jnp.bfloat16, key=jax.random.key(0))
    else:
        policy = nnx.eval_shape(make)
    policy.model.remat = decoder_lib.remat_for(remat, config.num_hidden_layers)
    graphdef, trainable, frozen = policy_lib.split_policy(policy)
    ppo_config = ppo_settings.PPOConfig()
    seeds = [(seed, 0) for seed in range(1, num_learners + 1)]
    init = functools.partial(chunk_lib.init_learners, jax.eval_shape(lambda: trainable), seeds, ppo_config)
    learners = init() if concrete else jax.eval_shape(init)
    rows = 2 * DISTINCT_PROMPTS
    vocab = config.vocab_size
    if concrete:
        rng = np.random.default_rng(0)
        table = prompt_tables.PromptTable(ids=jnp.asarray(rng.integers(3, vocab, (rows, prompt_len)), jnp.int32),
                                          mask=jnp.ones((rows, prompt_len), jnp.int32))
        # Every answer parses as illegal: the timing does not depend on the parse.
        matcher = action_matcher.ActionMatcher(token_class=jnp.zeros((vocab + 1,), jnp.int32),
                                               transitions=jnp.zeros((2, 1), jnp.int32),
                                               accept_action=jnp.full((2,), -1, jnp.int32))
    else:
        table = prompt_tables.PromptTable(ids=jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32),
                                          mask=jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32))
        matcher = action_matcher.ActionMatcher(token_class=jax.ShapeDtypeStruct((vocab + 1,), jnp.int32),
                                               transitions=jax.ShapeDtypeStruct((8, 8), jnp.int32),
                                               accept_action=jax.ShapeDtypeStruct((8,), jnp.int32))
    game = games.get_game("IPD")
    env = rollout.Environment(game=games.stack_games([game, games.opponent_view(game)]), prompts=table,
                              matcher=matcher)
    spec = rewards.reward_spec("util")
    one = rollout.LearnerSetup(
        opponent=jnp.asarray(opponents.opponent_id("tft"), jnp.int32), partner=jnp.asarray(-1, jnp.int32),
        player=jnp.asarray(0, jnp.int32), reward_first=spec, reward_second=spec,
        switch_episode=jnp.asarray(np.iinfo(np.int32).max, jnp.int32), named_specs=rewards.named_reward_specs())
    setup = jax.tree.map(lambda x: jnp.stack([jnp.asarray(x)] * num_learners), one)
    settings = chunk_lib.ChunkSettings(
        batch_size=batch_size, num_episodes=EPISODES_PER_CHUNK,
        sampling=rollout.SamplingSettings(gen_len=gen_len, dropout=PAPER_LORA.dropout > 0),
        ppo=ppo_config, stochastic=True)
    return Workload(config, graphdef, policy_lib.reference_graphdef(policy), frozen, env, setup, learners, settings,
                    prompt_len)


def _flops(fn, *args) -> float:
    with unrolled_loops():
        analysis = jax.jit(fn).lower(*args).cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def count_flops(w: Workload) -> dict[str, float]:
    """FLOPs of one learner-episode by part (N = 1), and of the per-chunk reference prefill."""
    batch, gen_len = w.chunk.batch_size, w.chunk.sampling.gen_len
    key = jax.random.key(0)

    def sample(frozen, env, setup, learners):
        return rollout.rollout_episode(w.graphdef, frozen, learners.trainable, env, setup, learners.episode,
                                       jax.random.split(key, 1), batch_size=batch, settings=w.chunk.sampling)

    def prefix(frozen, env):
        return reference_lib.reference_prefix(w.reference_graphdef, frozen, env.prompts, gen_len)

    def reference(frozen, prefix_state, rows, tokens):
        return reference_lib.reference_logprobs(prefix_state, frozen, rows, tokens)

    def update(frozen, env, learners, decisions, ref):
        decisions = decisions.replace(ref_logprobs=ref[None])
        batch_of = jax.tree.map(lambda x: x[0], chunk_lib.ppo_batch(decisions))
        learner = jax.tree.map(lambda x: x[0], learners)
        return chunk_lib.update_learner(w.graphdef, frozen, env.prompts, w.chunk, learner, batch_of, key)

    # Traced unrolled here too: jax caches a function's trace, and lowering
    # would otherwise reuse one with rolled loops.
    with unrolled_loops():
        decisions = jax.eval_shape(sample, w.frozen, w.env, w.setup, w.learners)
        prefix_state = jax.eval_shape(prefix, w.frozen, w.env)
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    tokens = jax.ShapeDtypeStruct((batch, gen_len), jnp.int32)
    ref = jax.ShapeDtypeStruct((batch, gen_len), jnp.float32)
    return {
        "rollout": _flops(sample, w.frozen, w.env, w.setup, w.learners),
        "reference": _flops(reference, w.frozen, prefix_state, rows, tokens),
        "update": _flops(update, w.frozen, w.env, w.learners, decisions, ref),
        "prefill": _flops(prefix, w.frozen, w.env),
    }


def minimum_flops(w: Workload) -> dict[str, float]:
    """2 x parameters x tokens for each part (see the module docstring)."""
    layers, head = w.config.matmul_parameters()
    T, L, B = w.prompt_len, w.chunk.sampling.gen_len, w.chunk.batch_size

    def forward(tokens, logit_rows):
        return 2 * (layers * tokens + head * logit_rows)

    if w.chunk.sampling.dropout:  # Each answer token from a full forward, then a dropout-free re-score.
        sample = sum(forward(T + t, 1) for t in range(L)) + forward(T + L, L)
    else:
        sample = forward(T + L - 1, L)
    update = 2 * forward(T + L, L)  # Forward and activation backward, one gradient per episode (paper mode).
    return {"rollout": B * sample, "reference": B * forward(L - 1, L), "update": B * update,
            "prefill": forward(2 * DISTINCT_PROMPTS * T, 0)}


def saved_activation_bytes(w: Workload) -> int:
    """Bytes the VJP of the update's forward keeps for one learner, parameters excluded."""
    from jax._src import ad_checkpoint

    batch, gen_len = w.chunk.batch_size, w.chunk.sampling.gen_len
    table = w.env.prompts
    trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), w.learners.trainable)
    rows = jnp.zeros((batch,), jnp.int32)
    tokens = jnp.zeros((batch, gen_len), jnp.int32)

    def loss(trainable, frozen, ids, mask):
        policy = policy_lib.merge_policy(w.graphdef, trainable, frozen)
        out = sampling.score_responses(policy, ids[rows], mask[rows], tokens)
        return jnp.sum(out.logprobs) + jnp.sum(out.values)

    residuals = ad_checkpoint.saved_residuals(loss, trainable, w.frozen, table.ids, table.mask)
    return sum(int(np.prod(aval.shape)) * aval.dtype.itemsize for aval, source in residuals
               if "from the argument" not in source)


def _bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def report(name: str, w: Workload) -> dict[str, float]:
    """Counts, prints and returns the figures of one model."""
    started = time.time()
    flops = count_flops(w)
    minimum = minimum_flops(w)
    saved = saved_activation_bytes(w)
    per_learner = {k: flops[k] for k in ("rollout", "reference", "update")}
    episode = sum(per_learner.values())
    episode_minimum = sum(minimum[k] for k in per_learner)
    base = _bytes(w.frozen)
    trainable = _bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), w.learners.trainable))
    state = trainable * 4  # Parameters, Adam's two moments, one gradient (float32).
    layers, head = w.config.matmul_parameters()
    print(f"== {name}: {w.config.num_hidden_layers} layers, D {w.config.hidden_size}, V {w.config.vocab_size},"
          f" {(layers + head) / 1e9:.2f}B matmul parameters; prompt {w.prompt_len}, gen {w.chunk.sampling.gen_len},"
          f" batch {w.chunk.batch_size}; remat {decoder_lib.remat_for(_REMAT.value, w.config.num_hidden_layers)}")
    print("FLOPs per learner-episode (loops unrolled):")
    for part in ("rollout", "reference", "update"):
        print(f"  {part:<10} {flops[part]:10.3e}   minimum {minimum[part]:10.3e}   x{flops[part] / minimum[part]:.2f}")
    print(f"  {'total':<10} {episode:10.3e}   minimum {episode_minimum:10.3e}   x{episode / episode_minimum:.2f}")
    print(f"  reference prefill of the {2 * DISTINCT_PROMPTS} prompts, once per chunk: {flops['prefill']:.3e}"
          f" (x{flops['prefill'] / minimum['prefill']:.2f} of its minimum)")
    print(f"Saved activations per learner (update VJP): {_gb(saved)}")
    print(f"Base weights (bf16, shared): {_gb(base)}; per learner: LoRA + value head {_gb(trainable)},"
          f" + Adam + gradient = {_gb(state)}")
    # Peak: the shared base, and per learner its state, saved activations and a
    # working margin of one more copy of the saved activations (transients).
    for learners, devices in ((1, 1), (5, 1), (30, 1), (30, 8)):
        per_device = -(-learners // devices)
        peak = base + per_device * (state + 2 * saved)
        print(f"Predicted peak memory, {learners} learner(s) on {devices} device(s): {_gb(peak)} per device")
    print(f"Predicted time at {_MFU.value:.0%} MFU ({_RUN_EPISODES.value} episodes per seed):")
    for hardware, (peak_flops, _) in HARDWARE.items():
        seconds = _RUN_EPISODES.value * (episode + flops["prefill"] / EPISODES_PER_CHUNK) / (peak_flops * _MFU.value)
        print(f"  {hardware:<8} {seconds / 60:6.2f} min per seed, {5 * seconds / 60:6.2f} min per 5-seed program,"
              f" {30 * seconds / 8 / 60:6.2f} min for 30 learners on 8 chips")
    print(f"(counted in {time.time() - started:.0f} s)")
    return {"episode_flops": episode, "prefill": flops["prefill"], "saved": saved, "base": base, "state": state}


def measure(config: decoder_lib.DecoderConfig, figures: dict[str, float]) -> None:
    """Trains random-weight learners on the default device and prints what it took."""
    device = jax.devices()[0]
    peak_flops = next((flops for name, (flops, _) in HARDWARE.items() if name.split()[-1] in device.device_kind),
                      None)
    for count in map(int, _LEARNERS.value):
        w = build_workload(config, remat=_REMAT.value, prompt_len=_PROMPT_LEN.value, gen_len=_GEN_LEN.value,
                           batch_size=_BATCH.value, num_learners=count, concrete=True)
        settings = dataclasses.replace(w.chunk, num_episodes=_EPISODES.value)
        step = jax.jit(functools.partial(chunk_lib.train_chunk, w.graphdef, w.reference_graphdef, settings),
                       donate_argnums=(3,))
        started = time.time()
        learners, _, _ = jax.block_until_ready(step(w.frozen, w.env, w.setup, w.learners))
        compile_and_first = time.time() - started
        started = time.time()
        jax.block_until_ready(step(w.frozen, w.env, w.setup, learners))
        seconds = (time.time() - started) / _EPISODES.value
        # Per episode: every learner's episode and a share of the chunk's reference prefill.
        achieved = (figures["episode_flops"] * count + figures["prefill"] / _EPISODES.value) / seconds
        # Process-wide peak: the base and every learner count built so far (each is freed after it).
        stats = device.memory_stats() or {}
        mfu = f"{achieved / peak_flops:.1%}" if peak_flops else "n/a (unknown chip)"
        predicted = figures["base"] + count * (figures["state"] + 2 * figures["saved"])
        print(f"MEASURED {count} learner(s) on {device.device_kind}: {seconds:.3f} s per episode"
              f" ({seconds * _RUN_EPISODES.value / 60:.1f} min per {_RUN_EPISODES.value} episodes),"
              f" {achieved / 1e12:.1f} TFLOP/s, MFU {mfu}; peak memory"
              f" {_gb(stats.get('peak_bytes_in_use', 0))} (predicted {_gb(predicted)});"
              f" first call {compile_and_first:.0f} s")
        del w, learners, step  # One learner count's base and state on the device at a time.
        gc.collect()


def main(argv):
    del argv
    config = families.config_from_hf(hf_config(_MODEL.value))
    w = build_workload(config, remat=_REMAT.value, prompt_len=_PROMPT_LEN.value, gen_len=_GEN_LEN.value,
                       batch_size=_BATCH.value)
    figures = report(_MODEL.value, w)
    if _MEASURE.value:
        measure(config, figures)


if __name__ == "__main__":
    app.run(main)
