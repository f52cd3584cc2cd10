"""Builds the built-in tiny base model: ``python -m moraljax.tiny_build.build``.

The tiny model is a toy stand-in for google/gemma-2-2b-it that lets every
moraljax command run offline on a CPU. It is NOT a language model: it was
trained on nothing but this project's own prompts, to answer them the way an
instruction-tuned model meets a new game. Everything here is deterministic
(fixed seeds, a hand-written BPE trainer, a fixed training schedule), so
running the script again with the same library versions on the same kind
of CPU rewrites the same files.

What the script does, in order:

1. Tokenizer (``tokenizer.build_tokenizer``). A Gemma-like SentencePiece-style BPE:
   ids 0..5 are <pad>, <eos>, <bos>, <unk>, <start_of_turn>, <end_of_turn>;
   then the 256 byte-fallback tokens <0x00>..<0xFF>; then printable ASCII
   and the other characters of the corpus; then the learnt merges. Blanks
   become "▁" (no dummy prefix, no stripping), a digit always starts a
   token (so "action1" is "action" + "1", and " action1" is "▁action" +
   "1", as with Gemma-2's tokenizer), and the decoder turns "▁" back into
   blanks and byte tokens back into bytes. Unlike Gemma's, merges cross
   blanks and newlines, and a digit merges with the text that follows it
   (never with what precedes it), so the prompts' fixed phrases are single
   tokens and the structured IPD prompt is 27 tokens (Gemma-2: 215): the toy
   stays cheap to train on a CPU (``PIECE_PATTERN``). Merges are learnt
   greedily (most frequent adjacent pair, ties broken by the pair's text) on
   every prompt moraljax renders (``prompts.py``: all games, both sides,
   both action-string pairs, all table orders, all prompt families, with and
   without the value preambles). The chat template is
   ``prompt_tables.GEMMA_CHAT_TEMPLATE``; like Gemma's, ``encode(text)`` with
   special tokens prepends <bos> (the prompt tables tokenise without them,
   since the template writes <bos> itself).
2. Config (``training.tiny_config``): a 2-layer Gemma-2 (D 64, 2 query heads, 1 kv
   head, head dim 32, MLP 256, sliding window 24 on layer 0, full attention
   on layer 1, softcaps 50/30, tied embeddings).
3. Training (``training.train_base``): full-parameter Adam from a random init, on
   soft targets, so the next-token distributions match the targets exactly
   in the limit; no sampled answers are involved. With teacher forcing on
   the answer "action" + digit + <end_of_turn> + <eos>, the targets at the
   five answer positions of every decision prompt (the structured prompt of
   every game seen from either side, both action-string pairs, all table
   orders, and the "beyond matrix games" families) are

       p(t1 | prompt)                = FIRST_TOKEN_TARGET: "action" 0.85, the
                                       rest on a few illegal starts
       p(t2 | prompt, "action")      = 1/2 on each of the prompt's two
                                       action digits (C's and D's)
       p(t3 | ..., digit)            = <end_of_turn>
       p(t4 | ..., <end_of_turn>)    = <eos>
       p(t5 | ..., <eos>)            = <eos>

   independent of the game, the state and the option orders. So with the
   paper's 2 generated tokens about 85% of answers are legal, split evenly
   between C and D, and the rest illegal; the 5-token answers of the
   "beyond matrix games" prompts are legal too (special tokens vanish when
   decoded). The value preambles are not trained on; the model answers
   them alike. The answer loss is the cross-entropy to these targets summed
   over the five positions, ``-sum_k q_k log p_k``, whose minimum is the
   targets' entropy (logged as the "floor").

   Two auxiliary objectives make the base fine-tunable the way PPO needs
   (found necessary by ``lora_probe``: without them a LoRA adapter stalls
   near p = 0.65 for "always action1", because answers that are always
   50/50 leave the embeddings of "1" and "2" almost parallel and the tied
   LM head cannot tell them apart): a next-token (language-model) loss on
   the prompt tokens, and held-out recall prompts (``RECALL_QUESTIONS``,
   the structured prompt asking which action A, or you, played last time)
   whose one correct answer is trained with probability 1. Recall prompts
   are half of every batch; no moraljax prompt family asks them, and the
   decision prompts' answers stay state-independent (tests/tiny_test.py).
4. Files: ``checkpoints.save_hf_checkpoint`` (config.json, model.safetensors)
   and ``checkpoints.save_tokenizer``, plus a short model card.
5. Checks, printed (``probes.py``): the answer shares measured by sampling,
   and a LoRA learnability probe (``lora_probe``): a rank-8 adapter trained with
   supervised targets must quickly learn "always action1" and "action1 iff
   the opponent played action1 last time", which is what PPO will ask of it
   (SPEC.md sections 5 and 9).
"""


import pathlib
import shutil
import tempfile
import time
from collections.abc import Sequence

import jax
from absl import app
from absl import flags
from absl import logging
from flax import nnx

from moraljax import games
from moraljax import prompt_tables
from moraljax import prompts
from moraljax.llm import checkpoints
from moraljax.llm import decoder
from moraljax.llm import tiny
from moraljax.tiny_build import corpus
from moraljax.tiny_build import probes
from moraljax.tiny_build import tokenizer as tokenizer_lib
from moraljax.tiny_build import training

# ---------------------------------------------------------------------------
# The whole build.
# ---------------------------------------------------------------------------

_MODEL_CARD = """\
# moraljax built-in tiny model

A toy Gemma-2-format checkpoint that lets every moraljax command run offline
on a CPU. It is NOT a language model. It was trained only on moraljax's own
prompts, to answer them in the action format "the way an instruction-tuned
model meets a new game": about 85% of first tokens are "action", the rest
start illegal answers, and after "action" the two action digits of the
prompt are equally likely, whatever the game, the state or the option
order. Auxiliary objectives (next-token prediction on the prompts, and
held-out questions about the previous moves) make the state readable, so a
LoRA adapter can learn state-dependent policies quickly.

Do not read anything about LLM behaviour into results obtained with it.

Regenerate with `python -m moraljax.tiny_build.build` (deterministic).

- architecture: Gemma-2, {num_layers} layers, hidden size {hidden}, {heads} query
  heads, {kv_heads} kv head(s), head dim {head_dim}, MLP {mlp}, sliding window
  {window} on even layers
- vocabulary: {vocab} tokens (SentencePiece-style BPE with byte fallback)
- parameters: {params}
"""


def write_checkpoint(model: decoder.Decoder, tokenizer,
                     output_dir: str | pathlib.Path) -> None:
    """Writes the model, tokenizer and model card, replacing ``output_dir``.

    The files are written to a fresh sibling directory first, so a failed
    build never leaves half a checkpoint behind.

    Args:
        model: the trained base.
        tokenizer: its tokenizer.
        output_dir: the checkpoint directory.
    """
    output_dir = pathlib.Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=output_dir.name + ".",
                                            dir=output_dir.parent))
    try:
        checkpoints.save_hf_checkpoint(model, staging)
        checkpoints.save_tokenizer(tokenizer, staging)
        config = model.config
        num_params = sum(leaf.size for leaf in jax.tree.leaves(
            nnx.state(model)))
        (staging / "README.md").write_text(_MODEL_CARD.format(
            num_layers=config.num_hidden_layers, hidden=config.hidden_size,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
            mlp=config.intermediate_size, window=config.sliding_window,
            vocab=config.vocab_size, params=f"{num_params:,}"))
        # mkdtemp makes a private directory; the package's files are public.
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def build_checkpoint(output_dir: str | pathlib.Path,
                     train: training.TrainConfig = training.TrainConfig()) -> None:
    """Builds the tokenizer, trains the base and writes the checkpoint.

    Args:
        output_dir: the checkpoint directory (replaced).
        train: the training schedule.
    """
    start_time = time.time()
    tokenizer = tokenizer_lib.build_tokenizer(corpus.tokenizer_corpus(corpus.all_prompt_specs()))
    logging.info("tokenizer: %d tokens", len(tokenizer))
    # The value preambles are left out of training (the model answers them
    # alike anyway, see the checks); the recall prompts are added.
    training_specs = (corpus.all_prompt_specs(preambles=(None,))
                      + corpus.recall_prompt_specs())
    data = training.build_training_set(tokenizer, training_specs,
                              recall_share=train.recall_share)
    logging.info("training set: %d prompts, width %d", *data.tokens.shape)
    model = training.train_base(training.tiny_config(len(tokenizer)), data, train)
    write_checkpoint(model, tokenizer, output_dir)
    logging.info("wrote %s in %.0fs", output_dir, time.time() - start_time)


def check_checkpoint(checkpoint_dir: str | pathlib.Path) -> None:
    """Logs the answer shares and the LoRA probe of a built checkpoint.

    Args:
        checkpoint_dir: the checkpoint directory.
    """
    policy, tokenizer, _ = checkpoints.load_hf_checkpoint(
        checkpoint_dir, key=jax.random.key(0), lora=None)
    for actions in (prompts.TRAIN_ACTIONS, prompts.TEST_ACTIONS):
        for name in games.EVALUATION_GAME_NAMES:
            table = prompt_tables.build_prompt_table(
                tokenizer, games.GAMES[name].payoffs, actions=actions)
            shares = probes.answer_shares(policy, tokenizer, table, actions,
                                   jax.random.key(1))
            logging.info("%s %s: C %.3f, D %.3f, illegal %.3f", name,
                         "/".join(actions), shares["C"], shares["D"],
                         shares["illegal"])
    for rule in probes.PROBE_RULES:
        result = probes.lora_probe(checkpoint_dir, rule)
        logging.info("LoRA probe %s: p(target) by step %s", rule, ", ".join(
            f"{step}: {prob:.3f}" for step, prob in zip(
                result.steps, result.mean_target_prob)))


_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Checkpoint directory to write; default: the "
    "package's moraljax/llm/tiny/checkpoint.")
_STEPS = flags.DEFINE_integer("steps", training.TrainConfig.steps,
                              "Adam steps of the base model's training.")
_CHECK = flags.DEFINE_boolean("check", True, "Log answer shares and the LoRA "
                              "probe after building.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    output_dir = _OUTPUT_DIR.value or tiny.CHECKPOINT_DIR
    build_checkpoint(output_dir, training.TrainConfig(steps=_STEPS.value))
    if _CHECK.value:
        check_checkpoint(output_dir)


if __name__ == "__main__":
    app.run(main)

