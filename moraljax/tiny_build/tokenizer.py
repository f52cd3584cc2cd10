"""The tiny model's tokenizer: a Gemma-like BPE with byte fallback, trained by a small BPE learner.

See ``build.py`` (step 1) for its design: ids 0..5 are Gemma's special
tokens, then the 256 byte-fallback tokens, the corpus's characters and the
learnt merges; blanks become "\u2581"; a digit always starts a token; merges
cross blanks, so the prompts' fixed phrases are single tokens.
"""

import collections
import re
import string
from collections.abc import Sequence

from moraljax import prompt_tables

# ---------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
# Gemma's ids for the first four (pad 0, eos 1, bos 2, unk 3).
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN)
BYTE_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))
# SentencePiece's visible blank.
BLANK = "\u2581"
# Pre-tokenisation into pieces that merges never cross: a digit and the
# text up to the next digit, or a run of text before the first digit. So a
# digit never merges with what precedes it ("action1" is "action" + "1", as
# with Gemma-2's split digits), but it does merge with the phrase that
# follows, and merges cross blanks and newlines, unlike Gemma's: the
# structured IPD prompt is 27 tokens instead of ~180, which makes every
# rollout and PPO update several times cheaper on a CPU, and each move of the
# state is a token of its own ("1 and they played action" after "you played
# action"), which a 2-layer model reads reliably.
PIECE_PATTERN = "[0-9][^0-9]*|[^0-9]+"
# Total vocabulary size aimed at; merges stop earlier when no pair occurs
# twice.
VOCAB_SIZE = 2048



def _backend_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """The ``tokenizers.Tokenizer`` pipeline around a BPE vocabulary."""
    import tokenizers  # Only the builder needs it directly.
    from tokenizers import decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors

    tokenizer = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True,
        fuse_unk=False))
    tokenizer.normalizer = normalizers.Replace(" ", BLANK)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(
        tokenizers.Regex(PIECE_PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace(BLANK, " "), decoders.ByteFallback(),
        decoders.Fuse()])
    tokenizer.add_special_tokens([
        tokenizers.AddedToken(token, special=True, normalized=False)
        for token in SPECIAL_TOKENS])
    if BOS in vocab:
        # Gemma's post-processor: encode(..., add_special_tokens=True)
        # prepends <bos>.
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
            special_tokens=[(BOS, vocab[BOS])])
    return tokenizer


def _pieces(texts: Sequence[str]) -> collections.Counter:
    """Pre-tokenised pieces of texts (as the tokenizer splits them), counted."""
    splitter = _backend_tokenizer({}, [])
    special = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))
    counts = collections.Counter()
    for text in texts:
        for segment in special.split(text):
            normalized = splitter.normalizer.normalize_str(segment)
            counts.update(piece for piece, _ in
                          splitter.pre_tokenizer.pre_tokenize_str(normalized))
    return counts


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]
                ) -> tuple[str, ...]:
    merged, index = [], 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index],
                                         symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def train_bpe(texts: Sequence[str], vocab_size: int = VOCAB_SIZE
              ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learns BPE merges greedily and deterministically.

    Each round merges the adjacent symbol pair with the highest count over
    the corpus' pieces; ties go to the pair whose (left, right) text sorts
    first. Rounds stop when the vocabulary reaches ``vocab_size`` or no pair
    occurs twice.

    Args:
        texts: the corpus.
        vocab_size: the most tokens in total (specials, bytes, characters
            and merges).

    Returns:
        (vocab: token -> id, merges in the order learnt).

    Raises:
        ValueError: if ``vocab_size`` cannot even hold the base tokens.
    """
    counts = _pieces(texts)
    alphabet = sorted(set(string.ascii_letters + string.digits
                          + string.punctuation + BLANK + "\n")
                      | {char for piece in counts for char in piece})
    base = list(SPECIAL_TOKENS) + list(BYTE_TOKENS) + alphabet
    if vocab_size < len(base):
        raise ValueError(f"vocab_size must be at least {len(base)} (special, "
                         f"byte and character tokens), got {vocab_size}")
    words = {piece: tuple(piece) for piece in counts}
    merges, known = [], set(base)
    while len(base) + len(merges) < vocab_size:
        pair_counts = collections.Counter()
        for piece, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += counts[piece]
        candidates = [(-count, pair) for pair, count in pair_counts.items()
                      if count >= 2 and pair[0] + pair[1] not in known]
        if not candidates:
            break
        _, best = min(candidates)
        merges.append(best)
        known.add(best[0] + best[1])
        words = {piece: _merge_pair(symbols, best)
                 for piece, symbols in words.items()}
    tokens = base + [left + right for left, right in merges]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_tokenizer(texts: Sequence[str], vocab_size: int = VOCAB_SIZE):
    """The tiny model's tokenizer, as a transformers fast tokenizer.

    Args:
        texts: the BPE corpus (``tokenizer_corpus``).
        vocab_size: see ``train_bpe``.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with Gemma's special tokens
        and ``prompt_tables.GEMMA_CHAT_TEMPLATE``.
    """
    import transformers  # Heavy; only needed to build and save.

    vocab, merges = train_bpe(texts, vocab_size)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=_backend_tokenizer(vocab, merges),
        bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=[START_OF_TURN, END_OF_TURN],
        chat_template=prompt_tables.GEMMA_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=8192)


