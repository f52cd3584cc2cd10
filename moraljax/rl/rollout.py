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

Populations (issue 13): with `population_size` members per population, the N
learners are N / population_size populations (contiguous on the learner axis); every
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

The reference log-probs of every answer (the base without adapters,
rl/reference.py) come last, from a prefix cache of the distinct prompts
prefilled once per chunk by the caller.

Each decision is `decision.decision_step`, the step evaluation plays too;
its random draws are training's own: learner n's decision key splits into
the two option orders, the sampling key and the fixed opponent's key.

Axis letters (docs/ARCHITECTURE.md): N learners, B decisions per episode, P
distinct prompts per player, T prompt tokens, A answer (generated) tokens.
"""

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from moraljax import action_matcher
from moraljax import games
from moraljax import opponents
from moraljax import prompt_tables
from moraljax import rewards
from moraljax import selection as selection_lib
from moraljax.llm import policy as policy_lib
from moraljax.llm import sampling
from moraljax.rl import decision as decision_lib
from moraljax.rl import reference as reference_lib


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
        named_specs: every named reward with the condition's settings
            (rewards.named_reward_specs, [N, R]): the recorded
            `reward_<name>` metrics.
    """

    opponent: jax.Array
    partner: jax.Array
    player: jax.Array
    reward_first: rewards.RewardSpec
    reward_second: rewards.RewardSpec
    switch_episode: jax.Array
    named_specs: rewards.RewardSpec


@flax.struct.dataclass
class Decisions:
    """Per-decision records of one episode, leading axes [N, B].

    Attributes:
        prompt_row: int32, row of `Environment.prompts` the learner saw.
        tokens: int32 [N, B, A] generated ids.
        logprobs: float32 [N, B, A] old log-probs for the PPO update: the
            policy's, without dropout, of the sampled tokens.
        values: float32 [N, B, A] values from the same dropout-free forward.
        sampling_logprobs: float32 [N, B, A] log-probs under the
            distribution the tokens were drawn from (with LoRA dropout when
            sampling had it; then they differ from `logprobs`).
        ref_logprobs: float32 [N, B, A] log-probs of the reference model
            (rl/reference.py), or None when the episode was played without it.
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
    ref_logprobs: jax.Array | None
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
        tokens, logprobs, values, ref_logprobs: [N, A] the answer, as in `Decisions`.
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
    ref_logprobs: jax.Array | None
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
    """One learner samples an answer to one prompt: [T] -> [A] arrays."""
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


# fold_in constant of the matching stream: independent of every other draw.
_MATCHING_STREAM = 0x6D617463  # "matc"


def population_pairing(keys: jax.Array, population_size: int) -> tuple[jax.Array, jax.Array]:
    """A fresh random perfect matching inside each population.

    Population g holds learners [g * size, (g + 1) * size), size = population_size. Its matching is drawn
    from its first member's episode key (folded with a constant, so no other
    stream moves): a uniform permutation `order` of its members, paired as
    (order[0], order[1]), (order[2], order[3]), ...; the first of each pair
    is player 0 (M), the second player 1.

    Args:
        keys: [N] PRNG keys of this episode, N a multiple of population_size.
        population_size: static, even: members per population.

    Returns:
        (partner int32 [N] global learner index, player int32 [N] 0/1).
    """
    num_learners = keys.shape[0]
    num_populations = num_learners // population_size
    first_keys = keys.reshape((num_populations, population_size) + keys.shape[1:])[:, 0]
    match_keys = jax.vmap(lambda k: jax.random.fold_in(k, _MATCHING_STREAM))(first_keys)
    order = jax.vmap(lambda k: jax.random.permutation(k, population_size))(match_keys)  # [populations, members]
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
        population_size: static, members per population.
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
        ref_logprobs=None,
        choice=jnp.where(legal, named + base, -1).astype(jnp.int32),
        choice_move=choice_move.astype(jnp.int32),
        offered_c=jnp.sum(shown_moves == 0, axis=1).astype(jnp.int32),
        honoured=honoured,
        reward=jnp.zeros((num_learners,), jnp.float32),
    )
    return partner, player.reshape(members), record


@flax.struct.dataclass
class Pairs:
    """Who plays whom in one episode (leading axis N).

    Attributes:
        partner: int32 learner index of the learning opponent (0 when none).
        player: int32, 0 for M, 1 for the second LLM of a pair.
        has_partner: bool, the opponent is a learner (else a fixed strategy).
    """

    partner: jax.Array
    player: jax.Array
    has_partner: jax.Array


def _episode_pairs(
    graphdef: nnx.GraphDef,
    frozen: nnx.State,
    trainable: nnx.State,
    env: Environment,
    setup: LearnerSetup,
    keys: jax.Array,
    last_move: jax.Array | None,
    *,
    settings: SamplingSettings,
    population_size: int,
    population_members: int,
    selection_candidates: int,
) -> tuple[Pairs, Selections | None]:
    """The episode's pairs: from `setup`, a random matching, or the members' selections."""
    if not population_size:
        return Pairs(partner=jnp.maximum(setup.partner, 0), player=setup.player, has_partner=setup.partner >= 0), None
    num_learners = keys.shape[0]
    members = population_members or num_learners
    chosen = None
    if selection_candidates:
        partner, player, chosen = _select_partners(
            graphdef, frozen, trainable, env, keys, last_move, population_size=population_size,
            members=members, num_candidates=selection_candidates, settings=settings)
    else:
        partner, player = population_pairing(keys[:members], population_size)
    padding = jnp.zeros((num_learners - members,), jnp.int32)
    pairs = Pairs(partner=jnp.concatenate([partner, padding]), player=jnp.concatenate([player, padding]),
                  has_partner=jnp.arange(num_learners) < members)
    return pairs, chosen


def _initial_states(setup: LearnerSetup, pairs: Pairs, keys: jax.Array) -> games.GameState:
    """Every learner's first state; the second LLM of a pair starts from its partner's, seen from its side."""
    state = jax.vmap(opponents.initial_state)(setup.opponent, keys)
    mirrored = games.swap_players(jax.tree.map(lambda x: x[pairs.partner], state))
    second = pairs.has_partner & (pairs.player == 1)
    return jax.tree.map(lambda own, other: jnp.where(second, other, own), state, mirrored)


def _learner_decision(
    graphdef: nnx.GraphDef,
    frozen: nnx.State,
    trainable: nnx.State,
    env: Environment,
    setup: LearnerSetup,
    pairs: Pairs,
    game: games.MatrixGame,
    spec: rewards.RewardSpec,
    settings: SamplingSettings,
    state: games.GameState,
    keys: jax.Array,
) -> tuple[games.GameState, Decisions]:
    """Decision t of every learner (`decision.decision_step` with training's draws): [N] records.

    `game` [N] is each learner's own-side game and `spec` [N] its reward in
    force, both fixed for the episode.
    """
    num_prompts = (env.selection_first_row or env.prompts.ids.shape[0]) // 2
    split = jax.vmap(lambda k: jax.random.split(k, 4))(keys)
    key_option, key_answer, key_sample, key_opponent = jnp.moveaxis(split, 1, 0)
    key_dropout = None
    if settings.dropout:
        # Split only here, so runs without dropout keep their streams.
        key_sample, key_dropout = jnp.moveaxis(jax.vmap(jax.random.split)(key_sample), 1, 0)
    # SPEC 4: both option orders drawn independently at every prompt.
    first_option = jax.vmap(jax.random.bernoulli)(key_option).astype(jnp.int32)
    first_answer = jax.vmap(jax.random.bernoulli)(key_answer).astype(jnp.int32)
    row_offset = pairs.player * num_prompts

    def sample(index):
        row = row_offset + index
        return jax.vmap(_sample_one, in_axes=(None, None, 0, 0, 0, 0, 0, None))(
            graphdef, frozen, trainable, env.prompts.ids[row], env.prompts.mask[row], key_sample, key_dropout,
            settings)

    def opponent(state, action):
        fixed_move = jax.vmap(opponents.fixed_opponent_move)(setup.opponent, state, key_opponent)
        # A learning opponent's move is its own parsed answer in this step.
        partner_action = action[pairs.partner]
        a_o = jnp.where(pairs.has_partner, jnp.maximum(partner_action, 0), fixed_move)
        return a_o, jnp.where(pairs.has_partner, partner_action >= 0, True)

    answer = lambda state: decision_lib.answer_prompts(state, first_option, first_answer, sample, env.matcher)
    next_state, outcome = decision_lib.decision_step(
        state, answer, opponent, game=game,
        named_specs=setup.named_specs, reward_spec=spec)
    answers = outcome.answers
    record = Decisions(
        prompt_row=row_offset + answers.prompt_index,
        tokens=answers.tokens,
        logprobs=answers.logprobs,
        values=answers.values,
        sampling_logprobs=answers.logprobs,
        ref_logprobs=None,
        action=answers.action,
        partner=jnp.where(pairs.has_partner, pairs.partner, -1),
        opponent_action=outcome.opponent_action,
        opponent_legal=outcome.opponent_legal,
        reward=outcome.reward,
        **outcome.recorded(),
    )
    return next_state, record


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
    reference: reference_lib.ReferencePrefix | None = None,
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
        population_size: static members per population; 0 = no populations (partners and sides
            from `setup`), else every learner is a member of a population of
            that size, paired anew each episode (`population_pairing`).
        population_members: static; the first this many learners are the
            populations' members (0: all); any after them are inert padding
            (sharding.padded_count) that plays its fixed opponent alone.
        selection_candidates: static k; > 0 with populations: partners come
            from every member's selection among k candidates (`_select_partners`).
        last_move: int32 [N] every learner's last parsed move (with selection).
        reference: the chunk's reference prefill; with it the records carry
            `ref_logprobs`, without it they are None.

    Returns:
        `Decisions` with leading axes [N, B].
    """
    key_init, key_steps = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    pairs, chosen = _episode_pairs(
        graphdef, frozen, trainable, env, setup, keys, last_move, settings=settings,
        population_size=population_size, population_members=population_members,
        selection_candidates=selection_candidates)
    state = _initial_states(setup, pairs, key_init)
    spec = jax.vmap(current_reward)(setup, episode)
    step_keys = jax.vmap(lambda k: jax.random.split(k, batch_size))(key_steps)
    step_keys = jnp.moveaxis(step_keys, 1, 0)  # [B, N, ...]
    game = jax.tree.map(lambda x: x[pairs.player], env.game)  # [N] own-side games
    decide = functools.partial(_learner_decision, graphdef, frozen, trainable, env, setup, pairs, game, spec, settings)
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
        reward = jnp.where(chosen.choice >= 0, jnp.mean(records.reward, axis=1), spec.illegal_penalty)
        records = records.replace(selection=chosen.replace(reward=reward.astype(jnp.float32)))
    if reference is not None:
        records = _with_reference(records, reference, frozen)
    return records


def _with_reference(records: Decisions, reference: reference_lib.ReferencePrefix, frozen: nnx.State) -> Decisions:
    """`records` with the reference log-probs of every answer (the selection's too), in one batch."""
    rows, tokens = records.prompt_row, records.tokens  # [N, B], [N, B, A]
    chosen = records.selection
    if chosen is not None:
        rows = jnp.concatenate([rows, chosen.prompt_row[:, None]], axis=1)
        tokens = jnp.concatenate([tokens, chosen.tokens[:, None]], axis=1)
    flat = reference_lib.reference_logprobs(reference, frozen, rows.reshape(-1),
                                            tokens.reshape((-1,) + tokens.shape[2:]))
    ref = flat.reshape(tokens.shape)
    batch_size = records.prompt_row.shape[1]
    records = records.replace(ref_logprobs=ref[:, :batch_size])
    if chosen is not None:
        records = records.replace(selection=chosen.replace(ref_logprobs=ref[:, batch_size]))
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
    """Dropout-free scores of every learner's answers: rows [N, B], tokens [N, B, A]."""

    def one_learner(trainable, rows, tokens):
        policy = policy_lib.merge_policy(graphdef, trainable, frozen)
        return sampling.score_responses(policy, table.ids[rows], table.mask[rows], tokens)

    return jax.vmap(one_learner)(trainable, rows, tokens)


def flatten_learners(tree: Any) -> Any:
    """Merges the two leading axes of every leaf: [N, B, ...] -> [N * B, ...]."""
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), tree)
