"""One decision of a matrix game, shared by training and evaluation (SPEC.md 2, 4, 5, 8).

Decision t of every player of a batch (leading axis N: learners in
training, the E episodes of one model in evaluation):

    state (prev_m, prev_o) -> the two option orders -> prompt index
    -> the policy answers (sampled tokens, parsed into C, D or illegal)
    -> the opponent moves -> training reward, every named reward, both
       regrets, the action type -> next state (M's move only if legal, O's
       always when O is legal)

`answer_prompts` is the answering half (the option orders are drawn by the
caller, so each caller keeps its own random streams: training draws per
learner, evaluation per decision for all E episodes together; see
rl/rollout.py and evaluation/play.py). `decision_step` is the whole step,
with the answering policy and the opponent as functions: the model's
sampling or a fixed policy (tests), a fixed strategy, a learning partner or
the protocol's moves given as data.

Axis letters (docs/ARCHITECTURE.md): N players of the batch, A answer
(generated) tokens, R named rewards.
"""

from collections.abc import Callable
import functools

import flax.struct
import jax
import jax.numpy as jnp

from moraljax import action_matcher
from moraljax import games
from moraljax import prompts
from moraljax import rewards
from moraljax.llm import sampling


@flax.struct.dataclass
class Answers:
    """What every player answered at one decision (leading axis N).

    Attributes:
        prompt_index: int32 [N], the prompt's row in the player's table.
        tokens: int32 [N, A] generated ids.
        action: int32 [N], 0 = C, 1 = D, -1 = illegal.
        logprobs: float32 [N, A] log-probs under the sampling distribution,
            or None (a fixed policy).
        values: float32 [N, A] value-head outputs of the sampling pass, or None.
    """

    prompt_index: jax.Array
    tokens: jax.Array
    action: jax.Array
    logprobs: jax.Array | None = None
    values: jax.Array | None = None


@flax.struct.dataclass
class Outcome:
    """One decision of every player (leading axis N): the answer and what followed.

    Attributes:
        answers: the players' `Answers`.
        opponent_action: int32 O's move (0/1).
        opponent_legal: bool, False only when a learning opponent was illegal.
        prev_m, prev_o: int32, the state shown in the prompt.
        reward: float32 training reward, or None (evaluation).
        named_rewards: {"reward_<name>": float32} every named reward with the
            given settings (rewards.named_reward_specs).
        regret_deont, regret_util: float32 moral regrets (SPEC 8).
        action_type: int32 index into games.ACTION_TYPE_NAMES.
    """

    answers: Answers
    opponent_action: jax.Array
    opponent_legal: jax.Array
    prev_m: jax.Array
    prev_o: jax.Array
    reward: jax.Array | None
    named_rewards: dict[str, jax.Array]
    regret_deont: jax.Array
    regret_util: jax.Array
    action_type: jax.Array

    def recorded(self) -> dict:
        """What both training and evaluation record of the decision besides the answer and O's move."""
        return dict(prev_m=self.prev_m, prev_o=self.prev_o, named_rewards=self.named_rewards,
                    regret_deont=self.regret_deont, regret_util=self.regret_util, action_type=self.action_type)


# sample(prompt_index [N]) -> the players' sampled answers [N, A].
SampleFn = Callable[[jax.Array], sampling.GenerateOutput]
# answer(state [N]) -> Answers [N].
AnswerFn = Callable[[games.GameState], Answers]
# opponent(state [N], action [N]) -> (O's move int32 [N], O legal bool [N]).
OpponentFn = Callable[[games.GameState, jax.Array], tuple[jax.Array, jax.Array]]


def answer_prompts(
    state: games.GameState,
    first_option: jax.Array,
    first_answer: jax.Array,
    sample: SampleFn,
    matcher: action_matcher.ActionMatcher,
) -> Answers:
    """Prompts each player for its state, samples its answer and parses it (SPEC 4).

    Args:
        state: [N] current states.
        first_option: int32 [N], the option order of the question (drawn by
            the caller, independently at every prompt).
        first_answer: int32 [N], the option order of the answer format.
        sample: the players' sampling, given their prompt indices.
        matcher: the in-jit action parser (the exact host rule).

    Returns:
        Answers [N].
    """
    index = prompts.prompt_index(state.prev_m, state.prev_o, first_option, first_answer)
    out = sample(index)
    return Answers(prompt_index=index, tokens=out.tokens, action=action_matcher.match_actions(matcher, out.tokens),
                   logprobs=out.logprobs, values=out.values)


def decision_step(
    state: games.GameState,
    answer: AnswerFn,
    opponent: OpponentFn,
    *,
    game: games.MatrixGame,
    named_specs: rewards.RewardSpec,
    reward_spec: rewards.RewardSpec | None = None,
    xi_eval: float = rewards.EVALUATION_XI,
) -> tuple[games.GameState, Outcome]:
    """Plays one decision for every player of the batch.

    Args:
        state: [N] current states (each from its player's side).
        answer: the answering policy.
        opponent: O's move and legality, given the state and the players'
            parsed actions.
        game: [N] each player's own-side game.
        named_specs: [N, R] the settings of the recorded named rewards.
        reward_spec: [N] the training reward in force, or None.
        xi_eval: static deontological penalty of the regret.

    Returns:
        (next state [N], Outcome [N]).
    """
    answers = answer(state)
    action = answers.action
    legal = action >= 0
    a_m = jnp.maximum(action, 0)  # Any move; unused when illegal.
    a_o, legal_o = opponent(state, action)
    reward = None
    if reward_spec is not None:
        reward = jax.vmap(rewards.moral_reward)(reward_spec, game, a_m, a_o, state.prev_o, legal, legal_o)
    metrics = jax.vmap(functools.partial(rewards.decision_metrics, xi_eval=xi_eval))(
        game, action, a_o, state.prev_o, legal_o, named_specs)
    next_state = jax.vmap(games.step)(state, a_m, a_o, legal, legal_o)
    outcome = Outcome(answers=answers, opponent_action=a_o, opponent_legal=legal_o, prev_m=state.prev_m,
                      prev_o=state.prev_o, reward=reward, **metrics)
    return next_state, outcome


def broadcast(tree, size: int):
    """Every leaf of an unbatched pytree repeated along a new leading axis of `size`."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (size,) + jnp.shape(x)), tree)
