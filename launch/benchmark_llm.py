r"""Prefill and decode throughput of the moraljax policy (built-in tiny model, Gemma-2-2b shapes).

    python launch/benchmark_llm.py                          # tiny model only
    python launch/benchmark_llm.py --big                    # + Gemma-2-2b shapes (GPU/TPU)
    python launch/benchmark_llm.py --big --batch=64 --prompt_len=215 --gen_len=2

Models:
  tiny  the built-in tiny checkpoint (moraljax/llm/tiny/checkpoint), a
        64-wide, 2-layer Gemma-2;
  big   (--big) a randomly initialised model with google/gemma-2-2b-it's
        shapes (26 layers, D 2304, V 256000), bfloat16 weights, LoRA rank 64
        on all linear layers as in the paper. About 5.2 GB of weights; meant
        for accelerators (on a CPU it runs, slowly).

For each model: prefill of --batch left-padded prompts of --prompt_len
tokens (``sampling.prefill``), then ``sampling.generate_from_cache`` of
--gen_len tokens (the decode loop). Each is jitted, warmed up once and timed
over --repeats calls (best time reported). Prints tokens/s and the achieved
model TFLOP/s estimated as 2 x (non-embedding parameters + LM head) per token
(attention score FLOPs excluded). Nothing is asserted.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from flax import nnx

from moraljax.llm import decoder
from moraljax.llm import lora as lora_lib
from moraljax.llm import policy as policy_lib
from moraljax.llm import sampling
from moraljax.llm import tiny

_BIG = flags.DEFINE_bool("big", False, "Also benchmark a random model with Gemma-2-2b's shapes (bf16).")
_SKIP_TINY = flags.DEFINE_bool("skip_tiny", False, "Skip the tiny model.")
_BATCH = flags.DEFINE_integer("batch", 16, "Prompts per call.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 215, "Prompt length in tokens (the paper's prompts: ~215).")
_PAD = flags.DEFINE_integer("pad", 8, "Left padding tokens in every other row.")
_GEN_LEN = flags.DEFINE_integer("gen_len", 16, "Tokens generated per prompt in the decode benchmark.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (the best is reported).")
_LORA_ENABLED = flags.DEFINE_bool("lora_enabled", True, "Run with the adapter on (policy) or off (reference).")

def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def benchmark(name: str, policy: policy_lib.Policy) -> None:
    """Times prefill and decode of one policy and prints the figures."""
    config = policy.config
    batch, length, gen_len = _BATCH.value, _PROMPT_LEN.value, _GEN_LEN.value
    lora_enabled = _LORA_ENABLED.value
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, (batch, length))
    pads = np.where(np.arange(batch) % 2 == 1, _PAD.value, 0)
    mask = (np.arange(length)[None, :] >= pads[:, None]).astype(np.int32)
    ids, mask = jnp.asarray(ids * mask, jnp.int32), jnp.asarray(mask)
    key = jax.random.key(0)

    graphdef, state = nnx.split(policy)

    @jax.jit
    def prefill(state, ids, mask):
        return sampling.prefill(nnx.merge(graphdef, state), ids, mask, gen_len, lora_enabled=lora_enabled)

    @jax.jit
    def decode(state, cache, last_hidden, key):
        return sampling.generate_from_cache(
            nnx.merge(graphdef, state), cache, last_hidden, key, gen_len, lora_enabled=lora_enabled
        )

    start = time.perf_counter()
    cache, last_hidden = jax.block_until_ready(prefill(state, ids, mask))
    prefill_compile = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(decode(state, cache, last_hidden, key))
    decode_compile = time.perf_counter() - start

    prefill_s = _best_time(lambda: prefill(state, ids, mask), _REPEATS.value)
    decode_s = _best_time(lambda: decode(state, cache, last_hidden, key), _REPEATS.value)
    flops_per_token = 2 * sum(config.matmul_parameters())  # Layers + the LM head.
    prefill_tokens, decode_tokens = batch * length, batch * gen_len
    frozen = sum(x.size for x in jax.tree.leaves(policy_lib.split_policy(policy)[2]))
    print(f"[{name}] {frozen:,} frozen params ({policy.model.dtype}), batch {batch}, prompt {length}, "
          f"gen {gen_len}, lora_enabled={lora_enabled}, device {jax.devices()[0].device_kind}")
    print(f"[{name}]   compile: prefill {prefill_compile:.1f} s, decode {decode_compile:.1f} s")
    print(f"[{name}]   prefill: {prefill_s * 1e3:9.2f} ms  {prefill_tokens / prefill_s:12,.0f} tokens/s  "
          f"~{flops_per_token * prefill_tokens / prefill_s / 1e12:.2f} TFLOP/s")
    print(f"[{name}]   decode:  {decode_s * 1e3:9.2f} ms  {decode_tokens / decode_s:12,.0f} tokens/s  "
          f"{decode_s / gen_len * 1e3:.2f} ms/step  ~{flops_per_token * decode_tokens / decode_s / 1e12:.3f} TFLOP/s")


def tiny_policy() -> tuple[str, policy_lib.Policy]:
    """The built-in tiny checkpoint."""
    from moraljax.llm import checkpoints  # Imports transformers: keep it late.

    policy, _ = checkpoints.load_hf_model(tiny.CHECKPOINT_DIR, key=jax.random.key(0))
    return "tiny (built-in)", policy


def main(argv):
    del argv
    if not _SKIP_TINY.value:
        name, policy = tiny_policy()
        benchmark(name, policy)
    if _BIG.value:
        start = time.perf_counter()
        policy = policy_lib.init_policy(
            decoder.DecoderConfig.gemma2_2b(), lora=lora_lib.LoraConfig(), param_dtype=jnp.bfloat16,
            key=jax.random.key(0),
        )
        print(f"[gemma-2-2b shapes] random init: {time.perf_counter() - start:.1f} s")
        benchmark("gemma-2-2b shapes", policy)


if __name__ == "__main__":
    app.run(main)
