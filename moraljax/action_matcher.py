"""Parsing generated answers into actions, on the host and inside jit.

The host rule of SPEC.md section 4 is
``tokenizer.decode(ids, skip_special_tokens=True).strip() == action``
(``parse_action_host``). ``match_actions`` evaluates exactly that rule inside
jit with a deterministic finite automaton (DFA) over tokens, built on the
host by ``build_action_matcher``; see its docstring for why it is exact.

Axis letters (docs/ARCHITECTURE.md): V tokenizer vocabulary, A answer
(generated) tokens; the automaton's states and token classes are written out.
"""

from collections.abc import Sequence
import functools
import json
import re

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from moraljax import validation

# DFA conventions of ``ActionMatcher``.
DEAD_STATE = 0
START_STATE = 1
NO_ACTION = -1


# ---------------------------------------------------------------------------
# Action parsing: the host rule.
# ---------------------------------------------------------------------------

def action_token_length(tokenizer, actions: Sequence[str]) -> int:
    """Tokens per action string (SPEC 4: gen_len), the longest of them."""
    return max(len(tokenizer.encode(a, add_special_tokens=False)) for a in actions)


def parse_action_host(tokenizer, ids, actions: Sequence[str]) -> int:
    """The parsing rule of SPEC.md section 4, on the host.

    i such that decode(ids, skip_special_tokens=True).strip() == actions[i].

    Args:
        tokenizer: a transformers tokenizer.
        ids: the generated token ids (sequence or 1-d array).
        actions: the legal action strings.

    Returns:
        The action index, or -1 (``NO_ACTION``) for an illegal output.
    """
    text = tokenizer.decode([int(token) for token in np.asarray(ids).ravel()],
                            skip_special_tokens=True).strip()
    actions = tuple(actions)
    return actions.index(text) if text in actions else NO_ACTION


# ---------------------------------------------------------------------------
# Action parsing in jit: a DFA over tokens.
# ---------------------------------------------------------------------------

@flax.struct.dataclass
class ActionMatcher:
    """Token automaton deciding the host parsing rule inside jit.

    A token id moves a DFA state through two gathers:
    ``state' = transitions[state, token_class[id]]``.

    Attributes:
        token_class: int32 [V + 1]; the class of each token id. Entry V is
            the class of ids the tokenizer does not know (its decode skips
            them); larger ids clip to it.
        transitions: int32 [states, classes], next state per state and token class.
        accept_action: int32 [states], the action a final state stands for, or
            -1 (``NO_ACTION``).
    """

    token_class: jax.Array
    transitions: jax.Array
    accept_action: jax.Array


def match_actions(matcher: ActionMatcher, ids: jax.Array) -> jax.Array:
    """Parses generated tokens inside jit, exactly as ``parse_action_host``.

    Args:
        matcher: from ``build_action_matcher`` for the same tokenizer and
            actions.
        ids: integer [..., A] generated token ids in [0, model vocab);
            ids the tokenizer does not know are skipped as its decode skips
            them (negative ids are outside the contract).

    Returns:
        int32 [...]: the action index, or -1 for an illegal output.
    """
    ids = jnp.asarray(ids)
    if ids.ndim < 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        validation.fail("ids", f"<{ids.dtype} array of shape {ids.shape}>", "an integer array [..., A]")
    token_classes = jnp.take(matcher.token_class, ids, axis=0, mode="clip")

    def advance(states, classes_now):
        return matcher.transitions[states, classes_now], None

    start = jnp.full(ids.shape[:-1], START_STATE, jnp.int32)
    final, _ = jax.lax.scan(advance, start,
                            jnp.moveaxis(token_classes, -1, 0))
    return matcher.accept_action[final]


@functools.cache
def _whitespace_utf8() -> tuple[bytes, ...]:
    """UTF-8 of every code point Python's str.strip() removes (isspace)."""
    return tuple(
        chr(code).encode("utf-8") for code in range(0x110000)
        if not 0xD800 <= code < 0xE000 and chr(code).isspace())


def _byte_dfa(actions: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """DFA over bytes for "valid UTF-8 whose text .strip() is an action".

    The language is W* a_i W* with W the whitespace code points' encodings
    and a_i an action's encoding. Concatenations of valid encodings are valid
    UTF-8, and any invalid byte sequence decodes to U+FFFD, which is neither
    whitespace nor part of an action, so no other byte string qualifies.
    Built as an NFA (a whitespace loop before, each action's bytes, a
    whitespace loop after) and determinised by subset construction.

    Returns:
        delta: int32 [states, 256] byte transitions, state 0 dead, state 1 start.
        accept: int32 [states] action index of final states, -1 elsewhere.
    """
    edges: list[dict[int, set[int]]] = []

    def new_node() -> int:
        edges.append({})
        return len(edges) - 1

    def add_edge(source: int, byte: int, target: int) -> None:
        edges[source].setdefault(byte, set()).add(target)

    def add_whitespace_loop(node: int) -> None:
        for encoding in _whitespace_utf8():
            current = node
            for byte in encoding[:-1]:
                following = new_node()
                add_edge(current, byte, following)
                current = following
            add_edge(current, encoding[-1], node)

    lead = new_node()
    add_whitespace_loop(lead)
    final_nodes = {}
    for index, action in enumerate(actions):
        current = lead
        for byte in action.encode("utf-8"):
            following = new_node()
            add_edge(current, byte, following)
            current = following
        final_nodes[current] = index
        add_whitespace_loop(current)

    dead, start = frozenset(), frozenset({lead})
    state_ids = {dead: DEAD_STATE, start: START_STATE}
    pending = [start]
    rows = {DEAD_STATE: [DEAD_STATE] * 256}
    while pending:
        subset = pending.pop()
        row = []
        for byte in range(256):
            target = frozenset(
                node for source in subset
                for node in edges[source].get(byte, ()))
            if target not in state_ids:
                state_ids[target] = len(state_ids)
                pending.append(target)
            row.append(state_ids[target])
        rows[state_ids[subset]] = row
    delta = np.array([rows[state] for state in range(len(state_ids))],
                     np.int32)
    accept = np.full(len(state_ids), NO_ACTION, np.int32)
    for subset, state in state_ids.items():
        matched = {final_nodes[node] for node in subset if node in final_nodes}
        # Distinct actions cannot both equal one stripped text.
        assert len(matched) <= 1, (subset, matched)
        if matched:
            accept[state] = matched.pop()
    return delta, accept


def _gpt2_byte_alphabet() -> dict[str, int]:
    """Character -> byte of byte-level BPE vocabularies (GPT-2 convention).

    Printable Latin-1 bytes stand for themselves; the others (control
    bytes, blank, soft hyphen ...) are shifted to code points 256, 257, ...
    in byte order.
    """
    printable = (list(range(ord("!"), ord("~") + 1))
                 + list(range(ord("\u00a1"), ord("\u00ac") + 1))
                 + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    mapping = {chr(byte): byte for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            mapping[chr(256 + shifted)] = byte
            shifted += 1
    return mapping


def _decoder_types(backend) -> set[str]:
    """Types of the tokenizers decoder pipeline (flattening Sequence)."""
    if backend.decoder is None:
        return set()
    # The decoder's own JSON; serialising the whole tokenizer would copy the
    # vocabulary.
    found, stack = set(), [json.loads(backend.decoder.__getstate__())]
    while stack:
        node = stack.pop()
        found.add(node.get("type"))
        stack.extend(node.get("decoders", []) or [])
    return found


def _collapse_replacements(text: str) -> str:
    # Decoders differ in how many U+FFFD an invalid byte run becomes (one per
    # byte token, or one per maximal invalid subpart); only presence matters.
    return re.sub("\ufffd+", "\ufffd", text)


def _verdict_text(text: str) -> str:
    """All the parsing rule reads of a decoded text.

    A text holding U+FFFD can never strip to an action (actions may not hold
    it), so every such text is one verdict. This also covers byte-fallback
    decoders, which turn a whole run of byte tokens into U+FFFD when the run
    is not valid UTF-8, valid bytes inside it included, where a plain UTF-8
    decode keeps those bytes.
    """
    return "\ufffd" if "\ufffd" in text else text.strip()


def _backend(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            "tokenizer must be a tokenizers-backed (fast) transformers "
            "tokenizer with .backend_tokenizer, got "
            f"{type(tokenizer).__name__}")
    return backend


def decoded_token_bytes(tokenizer) -> list[bytes]:
    """What each token id contributes to a decode, as bytes.

    The matcher models ``decode(ids, skip_special_tokens=True)`` as the
    UTF-8 decoding (invalid bytes replaced) of the concatenation of these
    byte strings. Each token's contribution is measured in context, after a
    fixed one-letter anchor token: decode([anchor, t]) minus decode([anchor]),
    so decoders that treat the first token specially (a leading blank
    dropped, Metaspace/Strip) are seen in their mid-sequence form. A blank
    dropped only at the very start is harmless to the rule, which strips.
    Tokens whose text is a lone byte, where decode would print U+FFFD, get
    their raw byte: byte-fallback tokens "<0xHH>" and byte-level BPE pieces.
    Special tokens and ids without a token contribute nothing.

    Args:
        tokenizer: a tokenizers-backed transformers tokenizer.

    Returns:
        One byte string per id in [0, len(tokenizer)).

    Raises:
        ValueError: if the decode is not the concatenation this assumes
            (checked token by token against the raw-byte forms).
    """
    backend = _backend(tokenizer)
    num_ids = max(len(tokenizer),
                  backend.get_vocab_size(with_added_tokens=True))
    model_vocab = backend.get_vocab(with_added_tokens=False)
    anchor, anchor_text = _anchor_token(tokenizer, model_vocab)
    in_context = backend.decode_batch([[anchor, token] for token in
                                       range(num_ids)],
                                      skip_special_tokens=True)
    token_bytes = []
    for token, text in enumerate(in_context):
        if not text.startswith(anchor_text):
            raise ValueError(
                f"tokenizer decode is context dependent: decode([{anchor}, "
                f"{token}]) = {text!r} does not start with decode([{anchor}]) "
                f"= {anchor_text!r}; the in-jit matcher cannot represent it")
        token_bytes.append(text[len(anchor_text):].encode("utf-8"))

    decoders = _decoder_types(backend)
    # Added tokens (special ones included) are decoded as whole strings, not
    # through the byte alphabets.
    added_ids = set(tokenizer.added_tokens_decoder)
    raw_forms = {}
    if "ByteLevel" in decoders:
        alphabet = _gpt2_byte_alphabet()
        for piece, token in model_vocab.items():
            if piece and all(char in alphabet for char in piece):
                raw_forms[token] = bytes(alphabet[char] for char in piece)
    if "ByteFallback" in decoders:
        byte_piece = re.compile(r"<0x([0-9A-Fa-f]{2})>")
        for piece, token in model_vocab.items():
            match = len(piece) == 6 and byte_piece.fullmatch(piece)
            if match:
                raw_forms[token] = bytes([int(match.group(1), 16)])
    for token, raw in raw_forms.items():
        if token >= num_ids or token in added_ids:
            continue
        measured = token_bytes[token].decode("utf-8")
        if _collapse_replacements(raw.decode("utf-8", "replace")) != (
                _collapse_replacements(measured)):
            raise ValueError(
                f"tokenizer decodes token {token} as {measured!r}, not as its "
                f"raw bytes {raw!r}; the in-jit matcher cannot represent this "
                "decoder")
        token_bytes[token] = raw
    return token_bytes


def _anchor_token(tokenizer, model_vocab: dict[str, int]) -> tuple[int, str]:
    """A non-special token decoding to one ASCII letter or digit."""
    backend = _backend(tokenizer)
    special = set(tokenizer.all_special_ids)
    candidates = sorted(
        token for piece, token in model_vocab.items()
        if len(piece) == 1 and piece.isascii() and piece.isalnum()
        and token not in special)
    for token in candidates:
        text = backend.decode([token], skip_special_tokens=True)
        if len(text) == 1 and text.isascii() and text.isalnum():
            return token, text
    raise ValueError(
        "tokenizer must have a token that decodes to a single ASCII letter or "
        "digit (used to measure tokens in context); found none")


def _alphabet_filter(token_bytes: list[bytes], alphabet: bytes) -> np.ndarray:
    """Ids of tokens made only of bytes in ``alphabet`` (empty ones too)."""
    return np.array([token for token, raw in enumerate(token_bytes)
                     if not raw.translate(None, alphabet)], np.int64)


def _verify_concatenation(tokenizer, token_bytes: list[bytes],
                          focus_ids: np.ndarray, max_length: int,
                          num_samples: int = 2000) -> None:
    """Checks decode == concatenation on sample sequences (seed fixed).

    The comparison is of ``_verdict_text``, which is all the rule reads;
    ``clean_up_tokenization_spaces`` is checked separately in
    ``build_action_matcher``.
    """
    rng = np.random.default_rng(0)
    num_ids = len(token_bytes)
    for _ in range(num_samples):
        length = int(rng.integers(1, max_length + 1))
        from_focus = rng.random(length) < 0.8
        sequence = [
            int(rng.choice(focus_ids)) if use_focus and len(focus_ids) else
            int(rng.integers(num_ids)) for use_focus in from_focus]
        decoded = tokenizer.decode(sequence, skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)
        modelled = b"".join(token_bytes[token] for token in sequence).decode(
            "utf-8", "replace")
        if _verdict_text(decoded) != _verdict_text(modelled):
            raise ValueError(
                f"tokenizer decode is not a concatenation of per-token bytes: "
                f"decode({sequence}) = {decoded!r} but the tokens' bytes give "
                f"{modelled!r}; the in-jit matcher cannot represent it")


# Text transformations of transformers' clean_up_tokenization: each deletes a
# blank before one of these characters.
_CLEANUP_CHARACTERS = ".?!,'"


def _token_classes(token_bytes: Sequence[bytes], candidates: np.ndarray, delta: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Token classes of equal transition columns, and each class's column over the byte DFA's states.

    Every candidate token's bytes are run from every state at once; column
    256 of the extended table is "no byte left" and keeps the state. Tokens
    that are not candidates go to the dead state from every state; ids past
    the vocabulary (decode skips them) keep the state.

    Returns:
        (token_class int32 [V + 1], classes [num classes, num states]).
    """
    num_states = delta.shape[0]
    longest = max([len(token_bytes[token]) for token in candidates],
                  default=0)
    padded = np.full((len(candidates), longest), 256, np.int32)
    for row, token in enumerate(candidates):
        raw = token_bytes[token]
        padded[row, :len(raw)] = np.frombuffer(raw, np.uint8)
    states = np.arange(num_states, dtype=np.int32)
    delta_extended = np.concatenate([delta, states[:, None]], axis=1)
    reached = np.repeat(states[:, None], len(candidates), axis=1)
    for position in range(longest):
        reached = delta_extended[reached, padded[None, :, position]]

    dead_column = np.full(num_states, DEAD_STATE, np.int32)
    columns = np.concatenate([dead_column[None], states[None], reached.T])
    classes, class_of = np.unique(columns, axis=0, return_inverse=True)
    class_of = class_of.reshape(-1)
    token_class = np.full(len(token_bytes) + 1, class_of[0], np.int32)
    token_class[candidates] = class_of[2:]
    token_class[len(token_bytes)] = class_of[1]
    return token_class, classes


def build_action_matcher(tokenizer, actions: Sequence[str], gen_len: int
                         ) -> ActionMatcher:
    """Compiles the host parsing rule into a token automaton.

    Why it is exact: ``decode(ids, skip_special_tokens=True)`` equals the
    UTF-8 decoding (with replacement) of the concatenated per-token bytes of
    ``decoded_token_bytes`` (verified on a sample of sequences here, and the
    tests check thousands more). The rule "decoded text .strip() equals an
    action" is then a regular language over bytes (``_byte_dfa``). Running
    each token's bytes through the byte DFA from every state gives a token
    DFA with the same verdict on every id sequence of any length A, without
    enumerating V^A sequences. Tokens are grouped into classes with equal
    transition columns: every token holding a byte outside the language's
    alphabet goes to the dead state from every state, so only the few tokens
    made of whitespace and action bytes are run through the DFA.

    ``clean_up_tokenization_spaces`` only deletes blanks before . ? ! , and
    ', so it cannot change the verdict for actions without those characters;
    actions with them are refused when the tokenizer cleans up.

    Args:
        tokenizer: a tokenizers-backed transformers tokenizer.
        actions: the legal action strings (index i is action i).
        gen_len: number of generated tokens; sets the length of the sample
            sequences checked at build time (the matcher itself accepts any
            A).

    Returns:
        The matcher.

    Raises:
        ValueError: for empty, duplicate or unstrippable actions, a bad
            gen_len, or a tokenizer whose decode the automaton cannot
            represent.
    """
    actions = validation.check_actions("actions", actions)
    validation.check_int("gen_len", gen_len, 1)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        for action in actions:
            if any(char in action for char in _CLEANUP_CHARACTERS):
                validation.fail("actions", action, f"strings without any of {_CLEANUP_CHARACTERS!r} while the"
                                " tokenizer's clean_up_tokenization_spaces is True (set it False, or choose"
                                " other action strings)")
    token_bytes = decoded_token_bytes(tokenizer)
    delta, accept = _byte_dfa(actions)
    alphabet = bytes(sorted(
        {byte for encoding in _whitespace_utf8() for byte in encoding}
        | {byte for action in actions for byte in action.encode("utf-8")}))
    candidates = _alphabet_filter(token_bytes, alphabet)
    _verify_concatenation(tokenizer, token_bytes, candidates,
                          max_length=max(gen_len, 3))
    token_class, classes = _token_classes(token_bytes, candidates, delta)
    return ActionMatcher(
        token_class=jnp.asarray(token_class),
        transitions=jnp.asarray(classes.T.astype(np.int32)),
        accept_action=jnp.asarray(accept))
