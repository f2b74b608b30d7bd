"""The online learner: trains a whole model while the stream comes in.

Typical use (``xs`` time-major ``(T, B, n_in)``; one jitted ``lax.scan`` per chunk)::

    learner = OnlineLearner([nn.Dense(16), nn.GRUCell(32), nn.GRUCell(32), nn.Dense(2)],
                            method="snap1", optimizer=optax.adam(1e-3))
    state = learner.init(jax.random.key(0), batch_size=8, input_size=1)
    state, outputs, metrics = learner.run_jit(state, xs, ys)

At every step ``t`` (:meth:`OnlineLearner.step`): each recurrent stage advances with its online
method (:mod:`snapjax.methods`); the model's outputs give the per-example loss ``ℓ_b`` and
``L_t = Σ_b w_b ℓ_b / max(Σ_b w_b, 1)`` with ``w_b`` the loss mask times the target's validity;
the cotangents flow back within the step (see :mod:`snapjax.training.model`) and each method turns its
stage's cotangent into a gradient.  Every ``update_every`` steps the summed gradient goes
through ``chain(optimizer, masked_updates(masks))`` (the optimizer alone without masks); it receives
``value=`` the mean loss of the period (so ``optax.contrib.reduce_on_plateau`` works) and any
extra arguments given to ``step``/``run``.

Reliability (on by default, ``guard=True``; cheap: one finiteness test of the carries and of
the gradient per step): an example whose carry, method state or loss becomes non-finite is
reset to the zero carry and a fresh method state, and excluded from that step's gradient, which
is recomputed without it (``metrics['resets']`` counts example-steps).  Invalid targets (a label
outside ``[0, classes)``, a non-finite regression target) are excluded and counted
(``metrics['excluded']``).  Shapes and dtypes of every input are checked at trace time.

Batch parallelism (``batch_axis="batch"``): :meth:`OnlineLearner.run` splits the examples over
that mesh axis with ``jax.shard_map``; each device steps its own examples and the step sums
``Σ_b w_b``, the loss, the gradient and the guard's flags and counts over devices
(``lax.psum``), so the result equals the single-device run (see :mod:`snapjax.parallel.sharding`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from snapjax.methods.base import OnlineMethod, check_batch_size, typed_key
from snapjax.parallel.sharding import run_sharded
from snapjax.training.config import (
    build_stage_methods,
    check_chunk,
    check_finite_params,
    check_input_size,
    check_positive_int,
    check_step_inputs,
    resolve_learner,
)
from snapjax.training.describe import LearnerCost, describe
from snapjax.training.donation import DonatingJit
from snapjax.training.fit import FitResult, fit
from snapjax.training.forward_only import evaluate, predict
from snapjax.training.guard import contain_faults
from snapjax.training.init_checks import check_init
from snapjax.training.losses import Loss, get_loss
from snapjax.training.model import OnlineModel, Stage, param_masks
from snapjax.training.online_state import OnlineState, initial_params
from snapjax.training.scan_steps import reset_carry, scan_steps
from snapjax.training.stage_passes import backward, forward, random_feedback
from snapjax.training.transforms import masked_updates
from snapjax.training.update import across_devices, any_device, period_update

Array = jax.Array
PyTree = Any

__all__ = ["OnlineLearner", "OnlineState"]


@dataclasses.dataclass(frozen=True, eq=False)
class OnlineLearner:
    """Static configuration of an online learner (hash by identity; close over it under jit).

    Args:
      model: an :class:`snapjax.OnlineModel`, a sequence of layers, or a single recurrent cell.
      readout_size: if given, a ``nn.Dense(readout_size)`` head is appended.
      method: a method name (``"rtrl"``, ``"snap1"``, ``"snapN"``, ``"uoro"``, ``"tbptt"``,
        ``"activity"``), one name per recurrent stage, or an :class:`OnlineMethod` (single stage).
      optimizer: any optax transformation.
      loss: ``"softmax_xent"`` (integer labels), ``"mse"``, a :class:`snapjax.Loss` or a callable
        ``loss(outputs (B, out), targets) -> (B,)``.
      update_every: optimizer period ``K`` (steps); default: the methods' period (1, or the
        TBPTT window).  Must be a multiple of every method's period.
      masks: static 0/1 masks per projection (one recurrent layer), or ``{"layers_i": {...}}``.
      n: SnAp order, passed to :func:`snapjax.online_method`.
      precision: matmul precision, passed to :func:`snapjax.online_method`.
      tbptt_window: the truncated BPTT window, passed to :func:`snapjax.online_method` as its
        ``window``.
      method_options: further options of :func:`snapjax.online_method` for the stages' methods
        (e.g. ``{"decay": 0.5}`` for ``"esdrtrl"``, ``{"eps": 1e-6}`` for ``"uoro"``); each
        reaches the methods that declare it.
      chunked: when ``update_every = K > 1``, run the methods that have a chunked form (exact
        RTRL, SnAp-1) chunk-wise over each K-step period: the same gradients, much cheaper
        (:mod:`snapjax.methods.chunked`).  ``chunk``: force a chunk length.
      stack: ``"layerwise"`` (one method per recurrent layer) or ``"combined"`` (one stage).
      encoder: ``"step"`` or ``"exact"`` (see :mod:`snapjax.training.model`).
      guard: per-example fault containment (module docstring).
      skip_unscored_updates: no optimizer call for a period with no scored example.
      reset_influence: re-initialise the method states after every update.
      batch_axis: a mesh axis name: :meth:`run` runs batch-parallel over it (``jax.shard_map``,
        :mod:`snapjax.parallel.sharding`) and :meth:`step` reduces over it (call ``step`` itself only
        inside a ``shard_map`` binding that axis).  ``None``: one device, no collectives.
      param_axis: a mesh axis name: :meth:`run` keeps every method state split along its
        parameter axis over it (model-parallel influence, :mod:`snapjax.parallel.sharding`); combine
        with ``batch_axis`` for a 2-D mesh.  Place the state with :func:`snapjax.shard_state`.
      feedback: ``"symmetric"`` (backpropagation through the head) or ``"random"``: the last
        recurrent layer gets ``ε B`` with ``B`` fixed random ``(out, h)``, drawn from the state's
        key (RFLO, e-prop; :func:`~snapjax.training.stage_passes.random_feedback`).

    Example (a GRU with a 3-class head, SnAp-1, 6 steps of 2 examples; every step updates)::

        >>> import flax.linen as nn, jax, jax.numpy as jnp, optax, snapjax as sj
        >>> learner = sj.OnlineLearner(nn.GRUCell(8), readout_size=3, method="snap1", optimizer=optax.sgd(0.1))
        >>> state = learner.init(jax.random.key(0), batch_size=2, input_size=4)
        >>> xs = jax.random.normal(jax.random.key(1), (6, 2, 4))            # (T, B, n_in)
        >>> ys = jnp.zeros((6, 2), jnp.int32)                               # (T, B) labels
        >>> before = state.params["layers_0"]["hn"]["kernel"].copy()      # run_jit donates `state`
        >>> state, outputs, metrics = learner.run_jit(state, xs, ys)
        >>> outputs.shape, int(state.step), bool(jnp.any(state.params["layers_0"]["hn"]["kernel"] != before))
        ((6, 2, 3), 6, True)
    """

    model: Any
    readout_size: int | None = None
    method: Any = "snap1"
    optimizer: optax.GradientTransformation = dataclasses.field(default_factory=lambda: optax.adam(1e-3))
    loss: Any = "softmax_xent"
    update_every: int | None = None
    masks: Any = None
    n: int | None = None
    precision: Any = None
    tbptt_window: int | None = None
    method_options: Any = None
    chunk: int | None = None
    chunked: bool = True
    stack: Literal["layerwise", "combined"] = "layerwise"
    encoder: Literal["step", "exact"] = "step"
    guard: bool = True
    skip_unscored_updates: bool = False
    reset_influence: bool = False
    batch_axis: str | None = None
    param_axis: str | None = None
    feedback: Literal["symmetric", "random"] = "symmetric"
    if TYPE_CHECKING:  # set in __post_init__ (frozen dataclass); at run time not dataclass fields
        _model: OnlineModel = dataclasses.field(init=False)
        _stages: list[Stage] = dataclasses.field(init=False)
        _method_specs: tuple = dataclasses.field(init=False)
        _loss: Loss = dataclasses.field(init=False)
        _cache: dict = dataclasses.field(init=False)

    def __post_init__(self):
        model, stages, methods = resolve_learner(self)
        object.__setattr__(self, "_model", model), object.__setattr__(self, "_stages", stages)
        object.__setattr__(self, "_method_specs", methods)
        object.__setattr__(self, "_loss", get_loss(self.loss))
        object.__setattr__(self, "_cache", {})

    # ----------------------------------------------------------- static parts
    @property
    def online_model(self) -> OnlineModel:
        return self._model

    @property
    def stages(self) -> list[Stage]:
        return self._stages

    def methods(self, params: PyTree, input_size: int | None = None) -> tuple[OnlineMethod, ...]:
        """The online method of each recurrent stage, for parameters shaped like ``params``."""
        sig = jax.tree.map(lambda a: (tuple(jnp.shape(a)), jnp.result_type(a).name), params)
        key = (str(jax.tree.structure(params)), tuple(jax.tree.leaves(sig, is_leaf=lambda x: isinstance(x, tuple))))
        if key not in self._cache:
            with jax.ensure_compile_time_eval():
                self._cache[key] = build_stage_methods(
                    self._stages, self._method_specs, params, input_size, n=self.n, masks=self.masks,
                    precision=self.precision, window=self.tbptt_window, batch_axis=self.batch_axis, chunk=self.chunk,
                    chunked=self.chunked, update_every=self.update_every, options=self.method_options)
        return self._cache[key]

    def period(self, params: PyTree) -> int:
        """The optimizer period ``K`` in steps."""
        if self.update_every is not None:
            return int(self.update_every)
        return int(np.lcm.reduce([m.period for m in self.methods(params)]))

    def transform(self, params: PyTree) -> optax.GradientTransformationExtraArgs:
        """``chain(optimizer, masked_updates(masks))`` (just the optimizer without masks)."""
        if not self._has_masks(params):
            return optax.with_extra_args_support(self.optimizer)
        return optax.chain(self.optimizer, masked_updates(param_masks(self._stages, self.masks, params)))

    def _has_masks(self, params: PyTree) -> bool:
        masks = param_masks(self._stages, self.masks, params)
        return any(m is not None for m in jax.tree.leaves(masks, is_leaf=lambda x: x is None))

    def optimizer_state(self, state: OnlineState) -> PyTree:
        """The state of the user's ``optimizer`` as they built it."""
        return state.opt_state[0] if self._has_masks(state.params) else state.opt_state

    @property
    def loss_fn(self) -> Loss:
        return self._loss

    # ------------------------------------------------------------------- init
    def init(self, key: Array, params: PyTree | None = None, *, batch_size: int, input_size: int) -> OnlineState:
        """Initial state: ``params`` (``None``: initialise every layer; a dict ``{"layers_i": ...}``
        may give some of them; for a single recurrent cell its own parameters are accepted), zero
        carries and method states, optimizer state."""
        batch = check_batch_size(batch_size)
        check_positive_int("input_size", input_size)
        key = typed_key(key)
        k_init, k_state = jax.random.split(key)
        params = initial_params(self._model, params, k_init, input_size)
        check_finite_params(params)
        masks = param_masks(self._stages, self.masks, params)
        params = jax.tree.map(lambda p, m: p if m is None else p * jnp.asarray(m, p.dtype), params, masks,
                              is_leaf=lambda x: x is None)
        methods = self.methods(params, input_size)
        dtype = jnp.result_type(*jax.tree.leaves(params))
        check_init(self, params, methods, batch, input_size, dtype)  # SlowPathWarning, MemoryLimitError
        K = self.period(params)
        keys = jax.random.split(k_state, len(methods))
        zero = jnp.zeros((), jnp.int32)
        state = OnlineState(
            params=params,
            opt_state=self.transform(params).init(params),
            carry=tuple(m.init_carry(batch, dtype) for m in methods),
            method_state=tuple(m.init(batch, dtype, key=k) for m, k in zip(methods, keys)),
            grad_acc=None if K == 1 else jax.tree.map(jnp.zeros_like, params),
            loss_acc=jnp.zeros((), dtype),
            scored=jnp.zeros((), bool),
            step=zero, key=key, skipped=zero, resets=zero, excluded=zero,
        )
        # distinct buffers for every leaf (run_jit donates the state; a shared buffer cannot be
        # donated twice)
        return jax.tree.map(lambda a: a.copy(), state)

    # ------------------------------------------------------------ the step
    def _across(self, tree):
        """Summed over the devices of ``batch_axis`` (unchanged on one device)."""
        return across_devices(tree, self.batch_axis)

    def _any(self, flag):
        """``flag`` (bool scalar) true on some device of ``batch_axis``."""
        return any_device(flag, self.batch_axis)

    def _loss_and_cot(self, outputs, y, weight):
        """Masked mean loss and its cotangent w.r.t. the outputs (with ``batch_axis``: this
        device's share, over the denominator of the whole batch)."""
        den = jnp.maximum(self._across(jnp.sum(weight)), 1)

        def total(o):
            per = self._loss(o, y)
            per = jnp.where(weight > 0, per, 0) * weight
            return jnp.sum(per) / den

        return jax.value_and_grad(total)(outputs)

    def step(
        self, state: OnlineState, x_t: Array, y_t: Any, mask_t: Array | None = None, **opt_args: Any
    ) -> tuple[OnlineState, Array, dict]:
        """One time step of online learning (see the module docstring).

        Args:
          state: :class:`OnlineState`.
          x_t: ``(B, n_in)``.
          y_t: ``(B,)`` int labels (softmax_xent) or ``(B, out)`` (mse), or what a custom loss
            takes.
          mask_t: ``(B,)`` loss weights (0 = no target); ``None`` = all ones.
          opt_args: extra arguments forwarded to the optimizer's ``update``.
        Returns:
          ``(state, outputs (B, out), metrics)``: ``loss``, ``updated``, ``skipped``, ``resets``,
          ``excluded`` (cumulative counts) and ``aux`` (per-stage method statistics).
        """
        x_t = jnp.asarray(x_t)
        batch = check_step_inputs(state, x_t, mask_t)
        check_input_size(self._stages, state.params, jnp.shape(x_t)[-1])
        params = state.params
        methods = self.methods(params)
        dtype = jnp.result_type(*jax.tree.leaves(params))
        x_t = x_t.astype(dtype)
        mask = jnp.ones((batch,), dtype) if mask_t is None else jnp.asarray(mask_t).astype(dtype)

        outputs, recs = forward(self._stages, params, state.carry, state.method_state, x_t, methods)
        self._loss.check(jax.ShapeDtypeStruct(outputs.shape, outputs.dtype), y_t)
        valid = jnp.isfinite(self._loss(outputs, y_t))  # a non-finite loss (e.g. overflow) is never trained on
        if self._loss.valid is not None:
            valid = valid & self._loss.valid(outputs, y_t)
        # loss masks are weights >= 0 (concrete ones are checked on entry); a negative or
        # non-finite weight seen under jit counts as an excluded example, never as a weight
        scored = mask != 0
        valid = valid & (mask >= 0) & jnp.isfinite(mask)
        weight = jnp.where(valid, mask, 0)

        fb = (random_feedback(self._stages, recs, state.key, outputs.shape[-1], dtype)
              if self.feedback == "random" else None)
        def loss_and_grads(weight, recs, outputs):
            loss, cot = self._loss_and_cot(outputs, y_t, weight)
            stepped = tuple(r[2].state for r in recs if r[2] is not None)
            grads, states = backward(self._stages, params, recs, cot, methods, stepped, fb)
            carries = tuple(r[2].carry for r in recs if r[2] is not None)
            loss, grads = self._across((loss, grads))
            return loss, grads, states, carries

        loss, grads, new_states, carries = loss_and_grads(weight, recs, outputs)
        resets = jnp.zeros((), jnp.int32)
        if self.guard:
            loss, grads, new_states, carries, resets, skip, good = contain_faults(
                loss_and_grads, self._stages, params, methods, recs, weight, (loss, grads, new_states, carries),
                self.batch_axis)
        else:
            skip, good = None, jnp.ones((batch,), bool)
        # scored example-steps left out of the loss for a reason other than a reset
        excluded = self._across(jnp.sum(scored & ~valid & good).astype(jnp.int32))
        return period_update(self, state, methods, loss, grads, new_states, carries, scored, resets, excluded,
                             recs, opt_args, outputs, skip)

    # -------------------------------------------------------------------- run
    def run(
        self, state: OnlineState, xs: Array, ys: Any, masks: Array | None = None, **opt_args: Any
    ) -> tuple[OnlineState, Array, dict]:
        """``lax.scan`` of :meth:`step` over a time-major chunk ``xs (T, B, n_in)``, ``ys (T, B)``
        or ``(T, B, out)``, ``masks (T, B)``.  Returns ``(state, outputs (T, B, out), metrics)``.

        With ``batch_axis`` or ``param_axis`` set: :meth:`run_sharded` over the mesh set with
        ``jax.set_mesh``."""
        if self.batch_axis is not None or self.param_axis is not None:
            return self.run_sharded(state, xs, ys, masks, **opt_args)
        xs = check_chunk(state, xs, ys, masks)
        return self._scan(state, xs, ys, masks, opt_args)

    def run_sharded(self, state: OnlineState, xs: Array, ys: Any, masks: Array | None = None, *,
                    mesh: Any = None, **opt_args):
        """:meth:`run` on a mesh (see :mod:`snapjax.parallel.sharding`): batch-parallel over ``batch_axis``
        (``jax.shard_map``), method states split over ``param_axis``, or both; the same results
        as one device.  Place the state with :func:`snapjax.shard_state`.  With a batch axis,
        ``metrics['aux']`` leaves are ``(T, D, ...)``.

        Args:
          mesh: a ``jax.sharding.Mesh`` with the learner's axes; ``None``: the mesh set with
            ``jax.set_mesh``.  Jit it, e.g. ``jax.jit(learner.run_sharded, static_argnames="mesh")``.
        Raises:
          ValueError: neither axis set, no mesh, or ``B`` (a parameter axis) not divisible by
            the axis size.
        """
        if self.batch_axis is None and self.param_axis is None:
            raise ValueError("run_sharded needs a mesh axis: OnlineLearner(..., batch_axis='batch') "
                             "and/or param_axis='model'")
        xs = check_chunk(state, xs, ys, masks)
        return run_sharded(self, state, xs, ys, masks, opt_args, mesh)

    def _scan(self, state, xs, ys, masks, opt_args, device_aux=False, hold=None):
        return scan_steps(self, state, xs, ys, masks, opt_args, device_aux, hold)

    @functools.cached_property
    def run_jit(self) -> Callable:
        """``jax.jit(self.run, donate_argnums=0)`` (the passed-in state's buffers are donated)."""
        return DonatingJit(self.run, "run_jit")

    # ----------------------------------------------------------- forward only
    def predict(self, state_or_params: Any, xs: Array, carry: tuple | None = None):
        """Forward only: ``(outputs (T, B, out), final carry)``; parameters unchanged.

        Args:
          state_or_params: an :class:`OnlineState` or the parameter dict.
          xs: ``(T, B, n_in)``.  carry: initial carries (default: zeros).
        """
        return predict(self, state_or_params, xs, carry)

    def evaluate(self, state_or_params: Any, xs: Array, ys: Any, masks: Array | None = None, carry=None) -> dict:
        """Forward-only loss: ``{"loss": mean over scored valid example-steps, "per_step": (T,),
        "excluded": invalid scored targets, "carry": final carries}``."""
        return evaluate(self, state_or_params, xs, ys, masks, carry)

    def reset_carry(self, state: OnlineState, batch_mask: Array | None = None) -> OnlineState:
        """Zero the carries and re-initialise the method states of the examples in
        ``batch_mask`` (``(B,)`` bool; ``None`` = all), e.g. between sequences."""
        return reset_carry(self, state, batch_mask)

    def describe(self, *, batch_size: int, input_size: int, params: PyTree | None = None, **options) -> LearnerCost:
        """Cost preview per layer (path, state bytes, FLOPs) and of the compiled run, allocating
        nothing (:func:`snapjax.training.describe.describe`; ``compiled=False`` skips XLA)."""
        return describe(self, batch_size=batch_size, input_size=input_size, params=params, **options)

    def fit(self, state: OnlineState, stream: Any, **options) -> FitResult:
        """Drive a stream of chunks through :attr:`run_jit` (:func:`snapjax.fit`)."""
        return fit(self, state, stream, **options)
