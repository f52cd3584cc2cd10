"""PPO hyperparameters, validated, and the optimiser they define.

``PPOConfig`` holds every PPO setting with the paper's defaults (SPEC.md
section 6) and refuses a bad one where it is built, in the project's one
format (``moraljax.validation``): ``ppo.<field>=<value> is not allowed;
expected <what>``. ``make_optimizer`` builds Adam as TRL 0.9.x does.

How the settings act is documented where they act: score scaling, the KL
controller, GAE and whitening in ``rl/ppo_advantages.py``; the losses,
epochs, minibatches, gradient accumulation, modes and dropout in
``rl/ppo.py``.
"""

import dataclasses

import optax

from moraljax import validation

MODES = ("paper", "standard")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters; defaults are the paper's (SPEC.md section 6).

    Attributes:
        learning_rate: Adam step size (TRL default 1.41e-5).
        adam_b1, adam_b2, adam_eps: Adam moments and epsilon (torch
            defaults 0.9, 0.999, 1e-8).
        gamma: GAE discount over answer tokens.
        lam: GAE lambda.
        cliprange: policy ratio clip c, ratio kept in [1 - c, 1 + c].
        cliprange_value: value clip around the old values.
        vf_coef: weight of the value loss in the total loss.
        ppo_epochs: passes over the batch per update.
        num_minibatches: minibatches per epoch; the minibatch size is
            batch size / num_minibatches.
        gradient_accumulation_steps: backward passes whose gradients are
            averaged into one optimiser step.
        init_kl_coef: initial KL coefficient beta.
        adaptive_kl: adaptive (True) or fixed (False) KL controller.
        kl_target: target KL of the adaptive controller (per sequence).
        kl_horizon: horizon of the adaptive controller.
        use_score_scaling: divide scores by the running std.
        use_score_norm: also subtract the running mean (only with
            use_score_scaling, as in TRL).
        score_clip: clip normalised scores to [-score_clip, score_clip];
            None (paper) applies no clipping.
        ratio_threshold: a minibatch whose mean ratio exceeds this has its
            loss set to zero (TRL's guard against unstable steps).
        max_grad_norm: global-norm gradient clipping; None (paper) = none.
        dropout_in_update: False (paper, TRL 0.9.x): the update's forward
            passes run without dropout, as TRL's ``batched_forward_pass``
            in eval mode (``rl/ppo.py`` module docstring). True: each
            backward pass gets its own dropout key, so the model's LoRA and
            value-head dropout act in the gradient (and in paper mode the
            backward passes differ).
        mode: "paper": the authors' effective update, ONE Adam step per call
            on the average of all ppo_epochs x num_minibatches gradients,
            all taken at the same parameters, so it requires
            ppo_epochs * num_minibatches == gradient_accumulation_steps.
            "standard": real PPO epochs, an Adam step every
            gradient_accumulation_steps backward passes, which must divide
            ppo_epochs * num_minibatches (no remainder is carried between
            calls, so a pure function matches torch/accelerate exactly).
    """

    learning_rate: float = 1.41e-5
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 4
    num_minibatches: int = 1
    gradient_accumulation_steps: int = 4
    init_kl_coef: float = 0.2
    adaptive_kl: bool = True
    kl_target: float = 6.0
    kl_horizon: float = 10000
    use_score_scaling: bool = True
    use_score_norm: bool = True
    score_clip: float | None = None
    ratio_threshold: float = 10.0
    max_grad_norm: float | None = None
    dropout_in_update: bool = False
    mode: str = "paper"

    def __post_init__(self):
        def number(name, **allowed):
            validation.check_number(f"ppo.{name}", getattr(self, name),
                                    **allowed)

        def boolean(name):
            validation.check_bool(f"ppo.{name}", getattr(self, name))

        positive = dict(low=0, low_open=True)
        number("learning_rate", **positive)
        number("adam_b1", low=0, high=1, high_open=True)
        number("adam_b2", low=0, high=1, high_open=True)
        number("adam_eps", **positive)
        number("gamma", low=0, high=1)
        number("lam", low=0, high=1)
        number("cliprange", **positive)
        number("cliprange_value", **positive)
        number("vf_coef", low=0)
        number("ppo_epochs", low=1, integer=True)
        number("num_minibatches", low=1, integer=True)
        number("gradient_accumulation_steps", low=1, integer=True)
        number("init_kl_coef", low=0)
        boolean("adaptive_kl")
        number("kl_target", **positive)
        number("kl_horizon", **positive)
        boolean("use_score_scaling")
        boolean("use_score_norm")
        number("score_clip", **positive, allow_none=True)
        number("ratio_threshold", **positive)
        number("max_grad_norm", **positive, allow_none=True)
        boolean("dropout_in_update")
        validation.check_choice("ppo.mode", self.mode, MODES)
        self._check_accumulation()

    def _check_accumulation(self):
        """gradient_accumulation_steps against the mode's grouping."""
        passes = self.backward_passes
        accumulation = self.gradient_accumulation_steps
        product = (f"ppo_epochs * num_minibatches = {self.ppo_epochs} * "
                   f"{self.num_minibatches} = {passes}")
        if self.mode == "paper" and passes != accumulation:
            validation.fail(
                "ppo.gradient_accumulation_steps", accumulation,
                f"{product} in mode 'paper' (one optimiser step per "
                "update), or mode 'standard'")
        if self.mode == "standard" and passes % accumulation:
            validation.fail(
                "ppo.gradient_accumulation_steps", accumulation,
                f"a divisor of {product} in mode 'standard'")

    @property
    def backward_passes(self) -> int:
        """ppo_epochs * num_minibatches backward passes per update."""
        return self.ppo_epochs * self.num_minibatches

    @property
    def optimizer_steps(self) -> int:
        """backward_passes / gradient_accumulation_steps steps per update."""
        return self.backward_passes // self.gradient_accumulation_steps

    def mini_batch_size(self, batch_size: int) -> int:
        """b = batch_size / num_minibatches decisions per minibatch.

        Raises:
            ValueError: if num_minibatches does not divide batch_size.
        """
        if batch_size % self.num_minibatches:
            validation.fail("ppo.num_minibatches", self.num_minibatches,
                            f"a divisor of the batch size {batch_size}")
        return batch_size // self.num_minibatches


def make_optimizer(cfg: PPOConfig) -> optax.GradientTransformation:
    """Adam as TRL builds it: no weight decay, no schedule.

    torch.optim.Adam and optax.adam agree: eps is added to sqrt(v_hat).

    Args:
        cfg: learning_rate, adam_b1, adam_b2, adam_eps and max_grad_norm
            (global-norm clipping before Adam when not None).

    Returns:
        The optimiser.
    """
    adam = optax.adam(cfg.learning_rate, b1=cfg.adam_b1, b2=cfg.adam_b2,
                      eps=cfg.adam_eps)
    if cfg.max_grad_norm is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adam)
