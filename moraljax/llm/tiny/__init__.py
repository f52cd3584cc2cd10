"""The built-in tiny base model: a toy that makes every command run offline.

``CHECKPOINT_DIR`` is a Hugging Face Gemma-2 checkpoint directory
(config.json, model.safetensors, tokenizer files with a chat template),
loaded through the same code as google/gemma-2-2b-it
(``moraljax.llm.checkpoints.load_hf_checkpoint``) and also by transformers.

It is NOT a language model. It is a 2-layer, 64-wide Gemma-2 trained only
on moraljax's own prompts to answer them like an instruction-tuned model
meeting a new game: mostly in the action format ("action" then a digit),
with both actions equally likely whatever the game and the state, and
sometimes illegally. It exists so that the pipeline (prompt tables,
sampling, parsing, rewards, PPO) runs end to end on a CPU in minutes and its
tests can assert learning; no finding about LLMs can be drawn from it.

The builder lives outside the model package (it needs the games and the
prompts) and regenerates it deterministically:
``python -m moraljax.tiny_build.build``.
"""

import pathlib

CHECKPOINT_DIR = pathlib.Path(__file__).resolve().parent / "checkpoint"
