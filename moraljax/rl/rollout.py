"""One episode for a batch of learners, fully on device (SPEC.md section 2).

An episode is `batch_size` sequential one-shot decisions against the same
opponent. Decision t of learner n:

    state (prev_m, prev_o) -> random option orders -> prompt index
    -> sample gen_len tokens from learner n's policy (LoRA on, with LoRA
       dropout when `SamplingSettings.dropout`, as TRL samples in train
       mode; rl/ppo.py)
    -> parse the tokens into C, D or illegal (the exact host rule, in jit)
    -> the opponent moves -> every reward type and both regrets
    -> next state (M's move only if legal, O's always for fixed opponents)

Populations (issue 13): with `population_size` P, the N learners are N / P
populations of P members each (contiguous on the learner axis); every
episode each population is split into pairs by a random perfect matching
drawn in jit (`population_pairing`), and the two members of a pair play
exactly as an LLM-vs-LLM pair does, one of them as player 0 and the other as
player 1 (each seeing the game from its own side). With partner selection
(`selection_candidates` k > 0) the pairs come instead from every member's
choice among k candidates (moraljax/selection.py, `_select_partners`): one
more sampled response per member and episode, recorded in
`Decisions.selection` and trained by the same PPO step (train.py).

Learners are a leading axis N over one shared frozen base. The decision loop
is a `lax.scan` over t with every learner advanced together inside, so a
learner whose opponent is another learner (LLM vs LLM, SPEC 3) reads its
partner's parsed answer in the same step; each sees the prompt and payoffs
from its own side and updates its state of the other's move only when that
move was legal.

The PPO update needs the old log-probs and values of a forward WITHOUT
dropout (TRL's eval-mode `batched_forward_pass`). Without sampling dropout
the sampler's own log-probs and values are that; with it, the episode ends
with one dropout-free forward of every learner's B answers (`rescore`).

The reference model (the base with the adapter off) never changes during a
run, so its prefill of the distinct prompts is computed once per chunk
(`reference_prefix`) and each decision's reference log-probs come from
`gen_len - 1` cached decode steps instead of a full forward.

Axis legend: N learners, B decisions per episode, P distinct prompts per player,
T prompt tokens, L generated tokens, D model dim.
"""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moraljax import action_matcher
from moraljax import games
from moraljax import opponents
from moraljax import prompt_tables
from moraljax import prompts
from moraljax import rewards
from moraljax import selection as selection_lib
from moraljax.llm import decoder
from moraljax.llm import policy as policy_lib
from moraljax.llm import sampling


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Static sampling settings (paper: gen_len 2, temperature 1, full softmax).

    Attributes:
        gen_len: tokens per answer.
        temperature, top_k, top_p: the sampling distribution.
        dropout: sample with the policy's LoRA dropout (training: the
            paper's runs sampled in train mode); off for evaluation.
    """

    gen_len: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    dropout: bool = False


@flax.struct.dataclass
class Environment:
    """What every episode reads: shared by all learners, constant in a run.

    Row player p (0 = the agent M, 1 = a learning opponent, SPEC 3) sees the
    game and its prompts from its own side.

    Attributes:
        game: the matrix game from each player's side, payoffs [2, 2, 2, 2]
            (player 1's is games.opponent_view of player 0's).
        prompts: every distinct prompt, [2 * P, T]; row p * P + prompt_index
            is player p's prompt (left-padded).
        matcher: the in-jit action parser for the action strings.
        selection_matcher: with partner selection, the in-jit parser of a
            member's name (moraljax/selection.py); None otherwise.
        selection_first_row: static; with partner selection the selection
            prompts follow the game prompts in `prompts` from this row on
            (0: no selection prompts).
    """

    game: games.MatrixGame
    prompts: prompt_tables.PromptTable
    matcher: action_matcher.ActionMatcher
    selection_matcher: action_matcher.ActionMatcher | None = None
    selection_first_row: int = flax.struct.field(pytree_node=False, default=0)


@flax.struct.dataclass
class LearnerSetup:
    """Per-learner experiment condition (leading axis N), constant in a run.

    Attributes:
        opponent: int32 opponent id (opponents.OPPONENT_NAMES).
        partner: int32 index of the learner this one plays when the opponent
            is "llm" (the two sit next to each other), -1 otherwise.
        player: int32, 0 for M, 1 for the second LLM of an LLM-vs-LLM pair.
        reward_first: reward used before `switch_episode`.
        reward_second: reward from `switch_episode` on (unlearning, SPEC 2).
        switch_episode: int32; a value >= the run length means no switch.
    """

    opponent: jax.Array
    partner: jax.Array
    player: jax.Array
    reward_first: rewards.RewardSpec
    reward_second: rewards.RewardSpec
    switch_episode: jax.Array


@flax.struct.dataclass
class Decisions:
    """Per-decision records of one episode, leading axes [N, B].

    Attributes:
        prompt_row: int32, row of `Environment.prompts` the learner saw.
        tokens: int32 [N, B, L] generated ids.
        logprobs: float32 [N, B, L] old log-probs for the PPO update: the
            policy's, without dropout, of the sampled tokens.
        values: float32 [N, B, L] values from the same dropout-free forward.
        sampling_logprobs: float32 [N, B, L] log-probs under the
            distribution the tokens were drawn from (with LoRA dropout when
            sampling had it; then they differ from `logprobs`).
        action: int32 parsed action, 0 = C, 1 = D, -1 = illegal.
        partner: int32 learner index of the opponent in this episode (a
            learning one), -1 against a fixed strategy.
        opponent_action: int32 O's move (0/1).
        opponent_legal: bool, False only when an LLM opponent was illegal.
        prev_m, prev_o: int32, the state shown in the prompt.
        reward: float32 training reward (the current reward type).
        named_rewards: {"reward_<name>": float32} every named reward
            (rewards.REWARD_NAMES) of the same decision, for the metrics.
        regret_deont, regret_util: float32 moral regrets (SPEC 8).
        action_type: int32 index into games.ACTION_TYPE_NAMES.
        selection: `Selections` [N] of the episode with partner selection, else None.
    """

    prompt_row: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    values: jax.Array
    sampling_logprobs: jax.Array
    action: jax.Array
    partner: jax.Array
    opponent_action: jax.Array
    opponent_legal: jax.Array
    prev_m: jax.Array
    prev_o: jax.Array
    reward: jax.Array
    named_rewards: dict[str, jax.Array]
    regret_deont: jax.Array
    regret_util: jax.Array
    action_type: jax.Array
    selection: Any = None


@flax.struct.dataclass
class Selections:
    """Every member's partner selection of one episode, leading axis N.

    Attributes:
        prompt_row: int32 row of `Environment.prompts` (a selection prompt).
        tokens, logprobs, values: [N, L] the answer, as in `Decisions`.
        choice: int32 learner index of the chosen member, -1 for an illegal
            answer (not the name of a shown candidate).
        choice_move: int32 the chosen candidate's last move as shown (-1
            none or an illegal choice, 0 C, 1 D).
        offered_c: int32 how many of the shown candidates last played C.
        honoured: bool, the member plays the partner it chose.
        reward: float32 training reward of the answer: the mean training
            reward of the member's B decisions that follow, or the member's
            illegal penalty for an illegal choice.
    """

    prompt_row: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    values: jax.Array
    choice: jax.Array
    choice_move: jax.Array
    offered_c: jax.Array
    honoured: jax.Array
    reward: jax.Array


def current_reward(setup: LearnerSetup, episode: jax.Array) -> rewards.RewardSpec:
    """The reward spec in force at `episode` (one learner, unbatched)."""
    use_second = episode >= setup.switch_episode
    return jax.tree.map(
        lambda first, second: jnp.where(use_second, second, first),
        setup.reward_first,
        setup.reward_second,
    )


def _sample_one(
    graphdef: nnx.GraphDef,
    frozen: nnx.State,
    trainable: nnx.State,
    ids: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    dropout_key: jax.Array | None,
    settings: SamplingSettings,
) -> sampling.GenerateOutput:
    """One learner samples an answer to one prompt: [T] -> [L] arrays."""
    policy = policy_lib.merge_policy(graphdef, trainable, frozen)
    out = sampling.generate(
        policy,
        ids[None],
        mask[None],
        key,
        settings.gen_len,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        dropout_key=dropout_key,
    )
    return jax.tree.map(lambda x: x[0], out)


def _decision_outcome(
    game: games.MatrixGame,
    spec: rewards.RewardSpec,
    state: games.GameState,
    action: jax.Array,
    a_o: jax.Array,
    legal_o: jax.Array,
) -> dict[str, jax.Array]:
    """Training reward plus the recorded metrics of one decision (one learner, own-side game)."""
    legal = action >= 0
    reward = rewards.moral_reward(spec, game, jnp.maximum(action, 0), a_o, state.prev_o, legal, legal_o)
    return dict(reward=reward, **rewards.decision_metrics(game, action, a_o, state.prev_o, legal_o))


# fold_in constant of the matching stream: independent of every other draw.
_MATCHING_STREAM = 0x6D617463  # "matc"


def population_pairing(keys: jax.Array, population_size: int) -> tuple[jax.Array, jax.Array]:
    """A fresh random perfect matching inside each population.

    Population g holds learners [g * P, (g + 1) * P). Its matching is drawn
    from its first member's episode key (folded with a constant, so no other
    stream moves): a uniform permutation `order` of its members, paired as
    (order[0], order[1]), (order[2], order[3]), ...; the first of each pair
    is player 0 (M), the second player 1.

    Args:
        keys: [N] PRNG keys of this episode, N a multiple of P.
        population_size: static P, even.

    Returns:
        (partner int32 [N] global learner index, player int32 [N] 0/1).
    """
    num_learners = keys.shape[0]
    num_populations = num_learners // population_size
    first_keys = keys.reshape((num_populations, population_size) + keys.shape[1:])[:, 0]
    match_keys = jax.vmap(lambda k: jax.random.fold_in(k, _MATCHING_STREAM))(first_keys)
    order = jax.vmap(lambda k: jax.random.permutation(k, population_size))(match_keys)  # [G, P]
    # Slot j of `order` is paired with slot j ^ 1 and plays side j % 2.
    slots = jnp.arange(population_size)
    partner_of_slot = order[:, slots ^ 1]
    rows = jnp.arange(num_populations)[:, None]
    partner = jnp.zeros_like(order).at[rows, order].set(partner_of_slot)
    player = jnp.zeros_like(order).at[rows, order].set(jnp.broadcast_to(slots % 2, order.shape))
    partner = partner + rows * population_size
    return partner.reshape(num_learners).astype(jnp.int32), player.reshape(num_learners).astype(jnp.int32)


# fold_in constants of the selection streams (candidates and answer; turn order).
_SELECTION_STREAM = 0x73656C65  # "sele"
_TURN_STREAM = 0x7475726E  # "turn"


def _select_partners(
    graphdef: nnx.GraphDef,
    frozen: nnx.State,
    trainable: nnx.State,
    env: Environment,
    keys: jax.Array,
    last_move: jax.Array,
    *,
    population_size: int,
    members: int,
    num_candidates: int,
    settings: SamplingSettings,
) -> tuple[jax.Array, jax.Array, Selections]:
    """Every learner's selection step; the pairs of the members (moraljax/selection.py).

    Args:
        keys: [N] PRNG keys of this episode.
        last_move: int32 [N] each learner's last parsed move.
        population_size: static P.
        members: static; learners [0, members) are population members.
        num_candidates: static k.

    Returns:
        (partner int32 [members] global index, player int32 [members],
        `Selections` [N] with `reward` zero: the game sets it).
    """
    num_learners = keys.shape[0]
    size = population_size
    learner = jnp.arange(num_learners)
    base = (learner // size) * size
    split = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, _SELECTION_STREAM), 3))(keys)
    key_candidates, key_sample, key_dropout = jnp.moveaxis(split, 1, 0)
    candidates = jax.vmap(selection_lib.draw_candidates, in_axes=(0, 0, None, None))(
        key_candidates, learner % size, size, num_candidates)  # [N, k] local numbers
    # Inert padding may index past the axis; its selection is never used.
    shown = jnp.minimum(candidates + base[:, None], num_learners - 1)
    shown_moves = last_move[shown]
    row = env.selection_first_row + selection_lib.selection_row(candidates, shown_moves, size)
    sample = jax.vmap(_sample_one, in_axes=(None, None, 0, 0, 0, 0, 0, None))(
        graphdef, frozen, trainable, env.prompts.ids[row], env.prompts.mask[row], key_sample,
        key_dropout if settings.dropout else None, settings)
    named = action_matcher.match_actions(env.selection_matcher, sample.tokens)  # local number or -1
    legal = jnp.any(candidates == named[:, None], axis=1)
    choice_local = jnp.where(legal, named, -1)
    choice_move = jnp.where(legal, jnp.sum(jnp.where(candidates == named[:, None], shown_moves, 0), axis=1), -1)

    num_populations = members // size
    first_keys = keys[:members].reshape((num_populations, size) + keys.shape[1:])[:, 0]
    orders = jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, _TURN_STREAM), size))(first_keys)
    partner, player, honoured = jax.vmap(selection_lib.resolve_pairs)(
        orders, choice_local[:members].reshape(num_populations, size))
    partner = (partner + base[:members].reshape(num_populations, size)).reshape(members)
    honoured = jnp.concatenate([honoured.reshape(members), jnp.zeros((num_learners - members,), bool)])
    record = Selections(
        prompt_row=row,
        tokens=sample.tokens,
        logprobs=sample.logprobs,
        values=sample.values,
        choice=jnp.where(legal, named + base, -1).astype(jnp.int32),
        choice_move=choice_move.astype(jnp.int32),
        offered_c=jnp.sum(shown_moves == 0, axis=1).astype(jnp.int32),
        honoured=honoured,
        reward=jnp.zeros((num_learners,), jnp.float32),
    )
    return partner, player.reshape(members), record


def rollout_episode(
    graphdef: nnx.GraphDef,
    frozen: nnx.State,
    trainable: nnx.State,
    env: Environment,
    setup: LearnerSetup,
    episode: jax.Array,
    keys: jax.Array,
    *,
    batch_size: int,
    settings: SamplingSettings,
    population_size: int = 0,
    population_members: int = 0,
    selection_candidates: int = 0,
    last_move: jax.Array | None = None,
) -> Decisions:
    """Plays one episode of `batch_size` decisions for every learner.

    Args:
        graphdef: the policy's graph definition.
        frozen: the frozen base state (shared).
        trainable: [N, ...] LoRA factors and value heads.
        env: the shared environment.
        setup: [N] learner conditions.
        episode: int32 [N], the episode number of each learner.
        keys: [N] PRNG keys of this episode.
        batch_size: static B.
        settings: static sampling settings.
        population_size: static P; 0 = no populations (partners and sides
            from `setup`), else every learner is a member of a population of
            P, paired anew each episode (`population_pairing`).
        population_members: static; the first this many learners are the
            populations' members (0: all); any after them are inert padding
            (sharding.padded_count) that plays its fixed opponent alone.
        selection_candidates: static k; > 0 with populations: partners come
            from every member's selection among k candidates (`_select_partners`).
        last_move: int32 [N] every learner's last parsed move (with selection).

    Returns:
        `Decisions` with leading axes [N, B].
    """
    num_prompts = (env.selection_first_row or env.prompts.ids.shape[0]) // 2
    key_init, key_steps = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    state = jax.vmap(opponents.initial_state)(setup.opponent, key_init)
    chosen = None
    if population_size:
        members = population_members or keys.shape[0]
        if selection_candidates:
            partner, player, chosen = _select_partners(
                graphdef, frozen, trainable, env, keys, last_move, population_size=population_size,
                members=members, num_candidates=selection_candidates, settings=settings)
        else:
            partner, player = population_pairing(keys[:members], population_size)
        padding = jnp.zeros((keys.shape[0] - members,), jnp.int32)
        partner, player = jnp.concatenate([partner, padding]), jnp.concatenate([player, padding])
        has_partner = jnp.arange(keys.shape[0]) < members
    else:
        has_partner = setup.partner >= 0
        partner = jnp.maximum(setup.partner, 0)
        player = setup.player
    # The second LLM of a pair starts from its partner's state, seen from its side.
    mirrored = games.swap_players(jax.tree.map(lambda x: x[partner], state))
    second = has_partner & (player == 1)
    state = jax.tree.map(lambda own, other: jnp.where(second, other, own), state, mirrored)
    game = jax.tree.map(lambda x: x[player], env.game)  # [N] own-side games
    spec = jax.vmap(current_reward)(setup, episode)
    step_keys = jax.vmap(lambda k: jax.random.split(k, batch_size))(key_steps)
    step_keys = jnp.moveaxis(step_keys, 1, 0)  # [B, N, ...]

    def decide(state: games.GameState, keys_t: jax.Array):
        split = jax.vmap(lambda k: jax.random.split(k, 4))(keys_t)
        key_option, key_answer, key_sample, key_opponent = jnp.moveaxis(split, 1, 0)
        key_dropout = None
        if settings.dropout:
            # Split only here, so runs without dropout keep their streams.
            key_sample, key_dropout = jnp.moveaxis(jax.vmap(jax.random.split)(key_sample), 1, 0)
        # SPEC 4: both option orders drawn independently at every prompt.
        first_option = jax.vmap(jax.random.bernoulli)(key_option).astype(jnp.int32)
        first_answer = jax.vmap(jax.random.bernoulli)(key_answer).astype(jnp.int32)
        index = prompts.prompt_index(state.prev_m, state.prev_o, first_option, first_answer)
        row = player * num_prompts + index
        sample = jax.vmap(_sample_one, in_axes=(None, None, 0, 0, 0, 0, 0, None))(
            graphdef,
            frozen,
            trainable,
            env.prompts.ids[row],
            env.prompts.mask[row],
            key_sample,
            key_dropout,
            settings,
        )
        action = action_matcher.match_actions(env.matcher, sample.tokens)
        fixed_move = jax.vmap(opponents.fixed_opponent_move)(setup.opponent, state, key_opponent)
        # A learning opponent's move is its own parsed answer in this step.
        partner_action = action[partner]
        a_o = jnp.where(has_partner, jnp.maximum(partner_action, 0), fixed_move)
        legal_o = jnp.where(has_partner, partner_action >= 0, True)
        outcome = jax.vmap(_decision_outcome, in_axes=(0, 0, 0, 0, 0, 0))(
            game, spec, state, action, a_o, legal_o
        )
        next_state = jax.vmap(games.step)(state, jnp.maximum(action, 0), a_o, action >= 0, legal_o)
        record = Decisions(
            prompt_row=row,
            tokens=sample.tokens,
            logprobs=sample.logprobs,
            values=sample.values,
            sampling_logprobs=sample.logprobs,
            action=action,
            partner=jnp.where(has_partner, partner, -1),
            opponent_action=a_o,
            opponent_legal=legal_o,
            prev_m=state.prev_m,
            prev_o=state.prev_o,
            **outcome,
        )
        return next_state, record

    _, records = jax.lax.scan(decide, state, step_keys)
    records = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), records)  # [B, N] -> [N, B]
    if settings.dropout:
        records = rescore(graphdef, frozen, trainable, env.prompts, records)
    if chosen is not None:
        if settings.dropout:
            scored = _score_rows(graphdef, frozen, trainable, env.prompts, chosen.prompt_row[:, None],
                                 chosen.tokens[:, None])
            chosen = chosen.replace(logprobs=scored.logprobs[:, 0], values=scored.values[:, 0])
        # The selection earns the game that follows it (docs/POPULATIONS.md).
        illegal_penalty = spec.illegal_penalty
        reward = jnp.where(chosen.choice >= 0, jnp.mean(records.reward, axis=1), illegal_penalty)
        records = records.replace(selection=chosen.replace(reward=reward.astype(jnp.float32)))
    return records


def rescore(
    graphdef: nnx.GraphDef,
    frozen: nnx.State,
    trainable: nnx.State,
    table: prompt_tables.PromptTable,
    decisions: Decisions,
) -> Decisions:
    """Old log-probs and values of the sampled answers, without dropout.

    TRL's `batched_forward_pass` in eval mode: one forward of each learner's
    B prompt + answer sequences at the parameters that sampled them.

    Args:
        graphdef: the policy's graph definition.
        frozen: the frozen base state (shared).
        trainable: [N, ...] LoRA factors and value heads.
        table: the prompt table `decisions.prompt_row` indexes.
        decisions: [N, B] records of an episode.

    Returns:
        `decisions` with `logprobs` and `values` from the dropout-free forward.
    """

    scored = _score_rows(graphdef, frozen, trainable, table, decisions.prompt_row, decisions.tokens)
    return decisions.replace(logprobs=scored.logprobs, values=scored.values)


def _score_rows(graphdef: nnx.GraphDef, frozen: nnx.State, trainable: nnx.State, table: prompt_tables.PromptTable,
                rows: jax.Array, tokens: jax.Array) -> sampling.ScoreOutput:
    """Dropout-free scores of every learner's responses: rows [N, M], tokens [N, M, L]."""

    def one_learner(trainable, rows, tokens):
        policy = policy_lib.merge_policy(graphdef, trainable, frozen)
        return sampling.score_responses(policy, table.ids[rows], table.mask[rows], tokens)

    return jax.vmap(one_learner)(trainable, rows, tokens)


@flax.struct.dataclass
class ReferencePrefix:
    """The reference model's prefill of every distinct prompt.

    Attributes:
        cache: KV cache rows [P, ...] with room for gen_len - 1 more tokens.
        last_hidden: float32 [P, D], hidden state of each prompt's last token.
    """

    cache: decoder.KVCache
    last_hidden: jax.Array


def reference_prefix(
    graphdef: nnx.GraphDef, frozen: nnx.State, trainable_one: nnx.State, table: prompt_tables.PromptTable, gen_len: int
) -> ReferencePrefix:
    """Prefills the base model (adapter off) on all prompts of the table.

    `trainable_one` is any one learner's trainable state: with the adapter
    off it does not enter the computation, but the policy needs it to exist.
    """
    policy = policy_lib.merge_policy(graphdef, trainable_one, frozen)
    cache, last_hidden = sampling.prefill(policy, table.ids, table.mask, gen_len - 1, lora_enabled=False)
    return ReferencePrefix(cache=cache, last_hidden=last_hidden)


def reference_logprobs(
    graphdef: nnx.GraphDef,
    frozen: nnx.State,
    trainable_one: nnx.State,
    prefix: ReferencePrefix,
    prompt_row: jax.Array,
    tokens: jax.Array,
) -> jax.Array:
    """Reference log-probs of responses, from the cached prompt prefixes.

    Args:
        prompt_row: int32 [M] rows of the prompt table.
        tokens: int32 [M, L] responses.

    Returns:
        float32 [M, L]: log pi_ref(token_l | prompt, tokens_<l).
    """
    policy = policy_lib.merge_policy(graphdef, trainable_one, frozen)
    cache = jax.tree.map(lambda x: x[prompt_row], prefix.cache)
    hidden = prefix.last_hidden[prompt_row]
    logprobs = []
    for step in range(tokens.shape[1]):  # L is 2 in the paper: unrolled.
        logprobs.append(sampling.token_log_probs(policy.logits(hidden), tokens[:, step]))
        if step + 1 < tokens.shape[1]:
            cache, hidden = sampling.decode_step(policy, cache, tokens[:, step], lora_enabled=False)
    return jnp.stack(logprobs, axis=1)


def flatten_learners(tree: Any) -> Any:
    """Merges the two leading axes of every leaf: [N, B, ...] -> [N * B, ...]."""
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), tree)
