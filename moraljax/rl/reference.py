"""The reference model's log-probs of sampled answers (the KL term of SPEC 6).

The reference is the base model without adapters (`policy.reference_graphdef`:
a graph of its own over the policy's frozen state, so no learner's trainable
state is needed). It never changes during a run, so its prefill of the
distinct prompts is computed once per chunk (`reference_prefix`), and each
answer's log-probs then take `gen_len - 1` cached decode steps instead of a
full forward.

Axis letters (docs/ARCHITECTURE.md): P prompts of the table (every row),
T prompt tokens, A answer tokens, D model width; M answers scored together.
"""

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moraljax import prompt_tables
from moraljax.llm import decoder
from moraljax.llm import policy as policy_lib
from moraljax.llm import sampling


@flax.struct.dataclass
class ReferencePrefix:
    """The reference model's prefill of every distinct prompt.

    Attributes:
        cache: KV cache rows [P, ...] with room for gen_len - 1 more tokens.
        last_hidden: float32 [P, D], hidden state of each prompt's last token.
        graphdef: static, the reference model's graph (policy.reference_graphdef).
    """

    cache: decoder.KVCache
    last_hidden: jax.Array
    graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)


def reference_prefix(graphdef: nnx.GraphDef, frozen: nnx.State, table: prompt_tables.PromptTable,
                     gen_len: int) -> ReferencePrefix:
    """Prefills the reference model on every prompt of the table.

    Args:
        graphdef: `policy.reference_graphdef` of the run's policy.
        frozen: the policy's frozen state.
        table: the prompts [P, T].
        gen_len: A, the answer length.
    """
    model = policy_lib.merge_reference(graphdef, frozen)
    cache, last_hidden = sampling.prefill(model, table.ids, table.mask, gen_len - 1, lora_enabled=False)
    return ReferencePrefix(cache=cache, last_hidden=last_hidden, graphdef=graphdef)


def reference_logprobs(prefix: ReferencePrefix, frozen: nnx.State, prompt_row: jax.Array,
                       tokens: jax.Array) -> jax.Array:
    """Reference log-probs of answers, from the cached prompt prefixes.

    Args:
        prefix: the chunk's `reference_prefix`.
        frozen: the policy's frozen state.
        prompt_row: int32 [M] rows of the prompt table.
        tokens: int32 [M, A] answers.

    Returns:
        float32 [M, A]: log pi_ref(token_a | prompt, tokens_<a).
    """
    model = policy_lib.merge_reference(prefix.graphdef, frozen)
    cache = jax.tree.map(lambda x: x[prompt_row], prefix.cache)
    hidden = prefix.last_hidden[prompt_row]
    logprobs = []
    for step in range(tokens.shape[1]):  # A is 2 in the paper: unrolled.
        logprobs.append(sampling.token_log_probs(model.logits(hidden), tokens[:, step]))
        if step + 1 < tokens.shape[1]:
            cache, hidden = sampling.decode_step(model, cache, tokens[:, step], lora_enabled=False)
    return jnp.stack(logprobs, axis=1)
