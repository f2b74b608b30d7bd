"""Online learning driver: a pure, jittable learner for a recurrent core plus a readout.

Typical use (one ``lax.scan`` per chunk of the stream; ``xs`` time-major ``(T, B, n_in)``)::

    learner = OnlineLearner(nn.GRUCell(16), readout_size=2, method="snap1",
                            optimizer=optax.adam(1e-2))
    state = learner.init(jax.random.key(0), None, batch_size=8, input_size=1)
    for chunk in stream:                      # chunk.xs (T, B, 1), chunk.ys (T, B) int
        state, logits, metrics = learner.run_jit(state, chunk.xs, chunk.ys)

At every time step ``t`` (see :meth:`OnlineLearner.step`):

1. the cell advances with the online method (``s_t``, influence ``J_t``; parameters held in
   the state);
2. the readout (``flax.linen.Dense(readout_size)`` on ``h_t``) gives logits and the per-step
   loss ``L_t`` = masked mean over the batch of the per-example loss;
3. the gradient of ``L_t`` is the direct readout gradient plus ``(∂L_t/∂s_t) J_t`` for the cell
   (``tracker.gradient``), added to ``grad_acc``;
4. every ``update_every`` steps ``grad_acc`` (the *sum* of the per-step gradients) goes through
   the optimizer, wrapped as ``skip_nonfinite(chain(optimizer, masked_updates(masks)))``, and
   is reset.  The influence is *not* reset at updates (the standard RTRL online
   approximation) unless ``reset_influence=True``.  With ``skip_unscored_updates=True`` (needs
   ``update_every=1``) a step whose loss mask is all zero (no scored example, e.g. the
   presentation phase of a copy task) makes no optimizer call at all: parameters and
   optimizer state stay bit-identical and only the hidden state and influence advance.  By
   default such a step still applies the optimizer to a zero gradient, which moves the
   parameters for stateful optimizers (Adam's momentum) and advances their step counts.

Online state stays finite: an example whose new hidden state or influence is non-finite
(NaN/Inf input, overflow) is reset to the zero state/influence for the following steps; the
non-finite gradient of that step makes the update be skipped (``metrics['skipped']``).

TBPTT (``method="tbptt"``, ``tbptt_window=W``): the cell runs forward; the window's inputs,
targets, masks and the state at the window start are kept in fixed-size buffers
(:class:`TBPTTState`), and every ``W`` steps the exact BPTT gradient of the window's summed
loss (cell and readout) is computed and applied (every ``update_every`` windows; with
``skip_unscored_updates=True`` only if some example of the window is scored).  The window
clock is ``step``: windows are aligned with the start of the stream, and
:meth:`OnlineLearner.reset_carry` does not restart them (pad sequences to a multiple of ``W``
with zero-mask steps to align windows with sequence starts).

Supported cells: snapjax's ``VanillaCell``/``GRUCell``/``LSTMCell`` (and any cell with a
``.spec``), ``flax.linen.GRUCell``, ``flax.linen.LSTMCell``, ``flax.linen.SimpleCell``
(``residual=False``), or a :class:`snapjax.CellSpec` (then pass parameters to ``init``).
Other flax cells (``OptimizedLSTMCell``, ``MGUCell``, ``ConvLSTMCell`` …) raise ``ValueError``.
Parameters from ``cell.init(key, carry, x)['params']`` are used unchanged (same names).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from snapjax.cells import CellSpec, as_cell_spec, cell_step
from snapjax.influence import influence_tracker, parse_method
from snapjax.uoro import _is_key, _typed_key, uoro_tracker
from snapjax.transforms import masked_updates, skip_nonfinite, skipped_count, tree_all_finite

Array = jax.Array
PyTree = Any

__all__ = [
    "OnlineState",
    "TBPTTState",
    "OnlineLearner",
    "shard_batch",
    "softmax_xent_loss",
    "mse_loss",
]


class OnlineState(NamedTuple):
    """Everything needed to continue (or resume) an online run; a pytree.

    Shapes (``B`` batch, ``U`` units, ``m`` state components per unit):

    Attributes:
      params: ``{'cell': cell_params, 'readout': {'kernel': (U, out), 'bias': (out,)}}``.
      opt_state: state of ``skip_nonfinite(chain(optimizer, masked_updates(...)))``.
      carry: internal hidden state ``(B, U, m)`` (``spec.from_internal`` gives the flax carry).
      method_state: influence ``J`` (RTRL/SnAp: leaves ``(B, ...)``), UORO state, or
        :class:`TBPTTState` for TBPTT.
      grad_acc: gradients accumulated since the last update (``params``-shaped).
      step: int32 scalar, time steps seen.
      key: PRNG key (split when the influence is re-initialised, e.g. for UORO).
      skipped: int32 scalar, optimizer updates skipped because of non-finite gradients.
      resets: int32 scalar, example-steps whose hidden state/influence were reset because
        they became non-finite.
    """

    params: dict
    opt_state: Any
    carry: Any
    method_state: Any
    grad_acc: Any
    step: Array
    key: Array
    skipped: Array
    resets: Array


class TBPTTState(NamedTuple):
    """Method state of truncated BPTT with window ``W``.

    Attributes:
      start: internal state at the window start ``(B, U, m)``.
      xs: inputs of the window ``(W, B, n_in)``.
      ys: targets ``(W, B)`` (int labels) or ``(W, B, out)``.
      masks: loss masks ``(W, B)``.
      pos: int32 scalar, position in the window.
    """

    start: Array
    xs: Array
    ys: Array
    masks: Array
    pos: Array


# ---------------------------------------------------------------------------
# Losses: per-example, ``loss(logits (B, out), y) -> (B,)``.


def softmax_xent_loss(logits: Array, labels: Array) -> Array:
    """Softmax cross-entropy with integer labels ``(B,)``; returns ``(B,)`` (nats)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))


def mse_loss(pred: Array, target: Array) -> Array:
    """Mean squared error over the feature axis: ``(B, out), (B, out) -> (B,)``."""
    return jnp.mean((pred - target) ** 2, axis=-1)


_LOSSES = {"softmax_xent": softmax_xent_loss, "xent": softmax_xent_loss, "mse": mse_loss}


def _masked_mean(per_example: Array, mask: Array) -> Array:
    mask = mask.astype(per_example.dtype)
    total = jnp.sum(jnp.where(mask > 0, per_example * mask, 0))
    return total / jnp.maximum(jnp.sum(mask), 1)



def _tree_where(pred, a, b):
    """``a`` where ``pred`` else ``b``; PRNG-key leaves always come from ``a`` (a running key
    must not be rewound)."""
    return jax.tree.map(lambda u, v: u if _is_key(u) else jnp.where(pred, u, v), a, b)


def _batch_where(keep: Array, new: PyTree, old: PyTree, batch: int) -> PyTree:
    """Per example: ``new`` where ``keep[b]`` else ``old``, for leaves with leading axis ``batch``;
    other leaves: ``new`` if all examples are kept, else ``old``."""

    def sel(n, o):
        if _is_key(n):  # running PRNG keys (e.g. UORO's) are kept, never rewound
            return n
        if jnp.ndim(n) >= 1 and jnp.shape(n)[0] == batch:
            k = keep.reshape((batch,) + (1,) * (jnp.ndim(n) - 1))
            return jnp.where(k, n, o)
        return jnp.where(jnp.all(keep), n, o)

    return jax.tree.map(sel, new, old)


def _finite_per_example(tree: PyTree, batch: int) -> Array:
    """``(B,)`` bool: all batch-leading inexact leaves finite for that example (non-batch leaves
    count for every example)."""
    ok = jnp.ones((batch,), bool)
    for leaf in jax.tree.leaves(tree):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        if jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] == batch:
            ok = ok & jnp.all(jnp.isfinite(leaf).reshape(batch, -1), axis=1)
        else:
            ok = ok & jnp.all(jnp.isfinite(leaf))
    return ok


# ---------------------------------------------------------------------------
# The learner.

@dataclasses.dataclass(frozen=True, eq=False)
class OnlineLearner:
    """Static configuration of an online learner (hash by identity; close over it under jit).

    Args:
      cell: a supported cell (see module docstring) or a prebuilt tracker's cell; ignored
        except for initialisation when ``method`` is a tracker object.
      readout_size: output size of the ``Dense`` readout on ``h_t``.
      method: ``"rtrl"``, ``"snap1"``, ``"snap2"``, ``"snapN"`` (or ``"snap"`` with ``n``),
        ``"uoro"``, ``"tbptt"`` (with ``tbptt_window``), or a tracker object implementing the
        protocol (``spec``, ``init``, ``step``, ``gradient``).
      optimizer: any optax transformation; applied to the summed gradient every
        ``update_every`` steps (TBPTT: every ``update_every`` windows).
      loss: ``"softmax_xent"`` (targets ``(B,)`` int), ``"mse"`` (targets ``(B, out)``) or a
        callable ``loss(logits (B, out), y) -> (B,)`` per-example losses.
      update_every: optimizer update period ``K`` (steps).
      masks: static 0/1 NumPy masks per projection name (``(n_in, units)``); applied to the
        initial parameters, the forward pass, the influence and the optimizer updates.
      n: SnAp order (with ``method="snap"``).  precision: matmul precision of the engine.
      tbptt_window: TBPTT window ``W``.
      reset_influence: re-initialise the influence after every update (truncated online
        gradient) instead of carrying it on.
      skip_unscored_updates: if ``True``, an update whose steps carry no scored example
        (loss mask all zero: the step itself, or for TBPTT the whole window) is not applied:
        no optimizer call, parameters and optimizer state stay bit-identical, the (zero)
        accumulated gradient is dropped and ``metrics['updated']`` is ``False``; the hidden
        state and influence still advance.  If ``False`` (default), every ``update_every``-th
        step calls the optimizer even with an all-zero gradient, which still moves the
        parameters of optimizers with momentum (Adam) and advances their step counts.
        Requires ``update_every=1``.
      target_shape, target_dtype: per-example target shape/dtype for TBPTT buffers with a
        custom loss (defaults: ``()``/int32 for softmax_xent, ``(readout_size,)``/param dtype
        for mse).
    """

    cell: Any
    readout_size: int
    method: Any = "snap1"
    optimizer: optax.GradientTransformation = dataclasses.field(default_factory=lambda: optax.adam(1e-3))
    loss: Any = "softmax_xent"
    update_every: int = 1
    masks: Any = None
    n: int | None = None
    precision: Any = None
    tbptt_window: int | None = None
    reset_influence: bool = False
    target_shape: tuple | None = None
    target_dtype: Any = None
    skip_unscored_updates: bool = False

    def __post_init__(self):
        if not isinstance(self.readout_size, (int, np.integer)) or self.readout_size < 1:
            raise ValueError(f"readout_size must be a positive int, got {self.readout_size!r}")
        if not isinstance(self.update_every, (int, np.integer)) or self.update_every < 1:
            raise ValueError(f"update_every must be a positive int, got {self.update_every!r}")
        if self.skip_unscored_updates and self.update_every != 1:
            raise ValueError("skip_unscored_updates=True needs update_every=1")
        if isinstance(self.loss, str) and self.loss not in _LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: expected one of {sorted(_LOSSES)} or a callable")
        if not isinstance(self.loss, str) and not callable(self.loss):
            raise ValueError("loss must be a string or a callable")
        kind = self._kind
        if kind == "tbptt":
            if not isinstance(self.tbptt_window, (int, np.integer)) or self.tbptt_window < 1:
                raise ValueError("method 'tbptt' needs tbptt_window >= 1")
        elif self.tbptt_window is not None:
            raise ValueError("tbptt_window is only used with method='tbptt'")
        if kind == "engine":
            parse_method(self.method, self.n)  # validate early
        if self._tracker_obj is None:
            self.spec  # raises ValueError for unsupported cells
        object.__setattr__(self, "_cache", {})

    # ------------------------------------------------------------ static parts
    @property
    def _tracker_obj(self):
        m = self.method
        return None if isinstance(m, str) else m

    @property
    def _kind(self) -> str:
        if not isinstance(self.method, str):
            for attr in ("spec", "init", "step", "gradient"):
                if not hasattr(self.method, attr):
                    raise ValueError(f"method object lacks {attr!r}: it must implement the tracker protocol")
            return "object"
        name = self.method.lower().replace("-", "").replace("_", "")
        if name in ("uoro", "tbptt"):
            return name
        return "engine"

    @property
    def spec(self) -> CellSpec:
        """The cell's :class:`CellSpec`."""
        if self._tracker_obj is not None:
            return self._tracker_obj.spec
        return as_cell_spec(self.cell)

    @property
    def readout(self) -> nn.Dense:
        return nn.Dense(self.readout_size, name=None)

    def loss_fn(self, logits: Array, y: Any) -> Array:
        """Per-example loss ``(B,)``."""
        fn = _LOSSES[self.loss] if isinstance(self.loss, str) else self.loss
        return fn(logits, y)

    def tracker(self, cell_params: PyTree):
        """The online-gradient tracker for these cell parameters' shapes (cached by input size);
        ``None`` for TBPTT."""
        kind = self._kind
        if kind == "object":
            return self._tracker_obj
        if kind == "tbptt":
            return None
        n_in = self.spec.input_size(cell_params)
        key = (n_in, jnp.result_type(jax.tree.leaves(cell_params)[0]).name)
        cache = self._cache
        if key not in cache:
            # The engine probes derivative patterns with concrete (eager) computations, which
            # must not be staged into an enclosing jit trace.
            cache[key] = self._build_tracker(cell_params)
        return cache[key]

    def _build_tracker(self, cell_params):
        with jax.ensure_compile_time_eval():
            shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), cell_params)
            if self._kind == "uoro":
                return uoro_tracker(self.spec, shapes, masks=self.masks, precision=self.precision)
            return influence_tracker(self.spec, shapes, self.method, self.n, masks=self.masks, precision=self.precision)

    def _np_masks(self, cell_params: PyTree) -> dict:
        out = {}
        if self.masks is None:
            return out
        for name, m in self.masks.items():
            if m is None:
                continue
            m = np.asarray(m)
            kshape = tuple(np.shape(cell_params[name]["kernel"]))
            if m.shape != kshape:
                raise ValueError(f"mask {name!r} has shape {m.shape}, kernel has shape {kshape}")
            out[name] = m.astype(bool)
        return out

    def update_masks(self, params: PyTree) -> PyTree:
        """Params-shaped tree of static masks for :func:`masked_updates` (``None`` = unmasked)."""
        masks = self._np_masks(params["cell"])

        def cell_leaf(path, _):
            names = [getattr(k, "key", None) for k in path]
            if len(names) == 2 and names[1] == "kernel" and names[0] in masks:
                return masks[names[0]]
            return None

        return {
            "cell": jax.tree_util.tree_map_with_path(cell_leaf, params["cell"]),
            "readout": jax.tree.map(lambda _: None, params["readout"]),
        }

    def transform(self, params: PyTree) -> optax.GradientTransformationExtraArgs:
        """The full update transformation: ``skip_nonfinite(chain(optimizer, masked_updates))``."""
        return skip_nonfinite(optax.chain(self.optimizer, masked_updates(self.update_masks(params))))

    # ------------------------------------------------------------------- init
    def init(self, key: Array, params: PyTree | None, batch_size: int, input_size: int) -> OnlineState:
        """Initial online state.

        Args:
          key: PRNG key.
          params: ``None`` (initialise the cell with ``cell.init`` and a ``Dense`` readout),
            a dict ``{'cell': ..., 'readout': ...}``, the cell parameters alone (the readout is
            initialised), or a flax variables dict ``{'params': ...}`` of the cell.
          batch_size: ``B``.  input_size: ``n_in``.
        Returns:
          :class:`OnlineState` with zero hidden state, zero influence and zero accumulator.
        """
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        key = _typed_key(key)
        spec = self.spec
        if isinstance(params, Mapping) and set(params) == {"params"}:
            params = params["params"]
        if isinstance(params, Mapping) and set(params) == {"cell", "readout"}:
            cell_params, ro_params = params["cell"], params["readout"]
        else:
            cell_params, ro_params = params, None
        if cell_params is None and not isinstance(self.cell, nn.Module):
            raise ValueError("params=None needs a flax.linen cell module; pass parameters for a CellSpec")
        if cell_params is not None:
            cell_params = jax.tree.map(jnp.asarray, dict(cell_params))
            spec.check_params(cell_params)
            if spec.input_size(cell_params) != input_size:
                raise ValueError(
                    f"input_size {input_size} != the cell's input size {spec.input_size(cell_params)}"
                )
        if ro_params is not None:
            ro_params = jax.tree.map(jnp.asarray, dict(ro_params))
        # One jitted program instead of dozens of eager dispatches (each a compile on CPU).
        return self._init_jit(key, cell_params, ro_params, int(batch_size), int(input_size))

    @functools.cached_property
    def _init_jit(self):
        return jax.jit(self._init_impl, static_argnums=(3, 4))

    def _init_impl(self, key, cell_params, ro_params, batch_size, input_size):
        spec = self.spec
        k_cell, k_ro, k_state = jax.random.split(key, 3)
        if cell_params is None:
            cell = self.cell
            x0 = jnp.zeros((batch_size, input_size), getattr(cell, "param_dtype", jnp.float32))
            carry0 = cell.initialize_carry(k_cell, x0.shape)
            cell_params = cell.init(k_cell, carry0, x0)["params"]
            spec.check_params(cell_params)
        cell_params = dict(cell_params)
        dtype = jnp.result_type(*jax.tree.leaves(cell_params))
        for name, m in self._np_masks(cell_params).items():
            leaf = dict(cell_params[name])
            leaf["kernel"] = leaf["kernel"] * jnp.asarray(m, leaf["kernel"].dtype)
            cell_params[name] = leaf
        if ro_params is None:
            ro_params = nn.Dense(self.readout_size, param_dtype=dtype).init(
                k_ro, jnp.zeros((1, spec.units), dtype)
            )["params"]
        params = {"cell": cell_params, "readout": dict(ro_params)}
        opt_state = self.transform(params).init(params)
        carry = spec.zero_state(batch_size, dtype)
        method_state = self._init_method_state(params, batch_size, dtype, k_state)

        def zero():
            return jnp.zeros((), jnp.int32)

        return OnlineState(
            params=params,
            opt_state=opt_state,
            carry=carry,
            method_state=method_state,
            grad_acc=jax.tree.map(jnp.zeros_like, params),
            step=zero(),
            key=key,
            skipped=zero(),
            resets=zero(),
        )

    def _target_spec(self, dtype) -> tuple[tuple, Any]:
        if self.target_shape is not None:
            return tuple(self.target_shape), self.target_dtype or dtype
        if self.loss in ("softmax_xent", "xent"):
            return (), jnp.int32
        if self.loss == "mse":
            return (self.readout_size,), dtype
        raise ValueError("TBPTT with a custom loss needs target_shape (and target_dtype)")

    def _init_method_state(self, params, batch_size, dtype, key):
        if self._kind == "tbptt":
            W, spec = int(self.tbptt_window), self.spec
            n_in = spec.input_size(params["cell"])
            tshape, tdtype = self._target_spec(dtype)
            return TBPTTState(
                start=spec.zero_state(batch_size, dtype),
                xs=jnp.zeros((W, batch_size, n_in), dtype),
                ys=jnp.zeros((W, batch_size) + tshape, tdtype),
                masks=jnp.zeros((W, batch_size), dtype),
                pos=jnp.zeros((), jnp.int32),
            )
        return self.tracker(params["cell"]).init(batch_size, dtype, key=key)

    # ------------------------------------------------------------------- step
    def _readout_loss(self, ro_params, s, y, mask):
        logits = self.readout.apply({"params": ro_params}, self.spec.output(s))
        return _masked_mean(self.loss_fn(logits, y), mask), logits

    def step(self, state: OnlineState, x_t: Array, y_t: Any, mask_t: Array | None = None):
        """One time step of online learning.

        Args:
          state: :class:`OnlineState`.
          x_t: input ``(B, n_in)``.
          y_t: target ``(B,)`` int labels (softmax_xent) or ``(B, out)`` (mse).
          mask_t: ``(B,)`` loss weights (0 = no target at this step); ``None`` = all ones.
        Returns:
          ``(new_state, logits (B, readout_size), metrics)``; metrics: ``loss`` (masked mean
          over the batch), ``updated`` (bool: an optimizer update was applied, or attempted
          and skipped as non-finite; ``False`` for an update left out by
          ``skip_unscored_updates``), ``skipped`` (cumulative non-finite skips), ``resets``
          (cumulative example resets).
        """
        spec = self.spec
        x_t = jnp.asarray(x_t)
        batch = state.carry.shape[0]
        dtype = state.carry.dtype
        if jnp.ndim(x_t) != 2 or jnp.shape(x_t)[0] != batch:
            raise ValueError(f"x_t must have shape ({batch}, n_in), got {jnp.shape(x_t)}")
        x_t = x_t.astype(dtype)
        mask_t = jnp.ones((batch,), dtype) if mask_t is None else jnp.asarray(mask_t).astype(dtype)
        params = state.params
        if self._kind == "tbptt":
            s_new, method_state, loss, logits, grads = self._tbptt_step(state, x_t, y_t, mask_t)
        else:
            tracker = self.tracker(params["cell"])
            s_new, method_state = tracker.step(params["cell"], state.carry, state.method_state, x_t)
            (loss, logits), (g_ro, dlds) = jax.value_and_grad(self._readout_loss, argnums=(0, 1), has_aux=True)(
                params["readout"], s_new, y_t, mask_t
            )
            grads = {"cell": tracker.gradient(method_state, dlds), "readout": g_ro}
        grad_acc = jax.tree.map(jnp.add, state.grad_acc, grads)

        # Keep the online state finite: reset examples whose state/influence blew up.
        ok = _finite_per_example((s_new, method_state), batch)
        key = state.key
        fresh_ms = self._fresh_method_state(params, batch, dtype, key, method_state)
        s_next = _batch_where(ok, s_new, jnp.zeros_like(s_new), batch)
        ms_next = _batch_where(ok, method_state, fresh_ms, batch)
        resets = state.resets + jnp.sum(~ok).astype(jnp.int32)

        count = state.step + 1
        period = self.update_every * (int(self.tbptt_window) if self._kind == "tbptt" else 1)
        do_update = (count % period) == 0
        tx = self.transform(params)

        def apply(_):
            updates, opt_state = tx.update(grad_acc, state.opt_state, params)
            return optax.apply_updates(params, updates), opt_state, jax.tree.map(jnp.zeros_like, grad_acc)

        def keep(_):
            return params, state.opt_state, grad_acc

        if self.skip_unscored_updates:
            # update_every == 1: the update covers this step (TBPTT: the window just completed,
            # whose masks are all in the buffer at its last step).
            covered = method_state.masks if self._kind == "tbptt" else mask_t
            period_end = do_update
            do_update = jnp.logical_and(period_end, jnp.any(covered > 0))

            def drop(_):  # no optimizer call; the (zero) gradient of an unscored period is dropped
                acc = jax.tree.map(lambda g: jnp.where(period_end, jnp.zeros_like(g), g), grad_acc)
                return params, state.opt_state, acc

            new_params, opt_state, grad_acc = lax.cond(do_update, apply, drop, None)
        elif period == 1:  # static: no cond (smaller program, faster compile)
            new_params, opt_state, grad_acc = apply(None)
            do_update = jnp.asarray(True)
        else:
            new_params, opt_state, grad_acc = lax.cond(do_update, apply, keep, None)
        if self.reset_influence and self._kind != "tbptt":
            ms_next = _tree_where(do_update, fresh_ms, ms_next)
        skipped = skipped_count(opt_state)
        new_state = OnlineState(
            params=new_params,
            opt_state=opt_state,
            carry=s_next,
            method_state=ms_next,
            grad_acc=grad_acc,
            step=count,
            key=key,
            skipped=skipped,
            resets=resets,
        )
        metrics = {"loss": loss, "updated": do_update, "skipped": skipped, "resets": resets}
        return new_state, logits, metrics

    def _fresh_method_state(self, params, batch, dtype, key, like):
        if self._kind == "tbptt":
            return like  # buffers need no reset; the window start is reset with the carry
        return self._init_method_state(params, batch, dtype, key)

    def _tbptt_step(self, state, x_t, y_t, mask_t):
        spec, params, ms = self.spec, state.params, state.method_state
        W = int(self.tbptt_window)
        masks = self.tracker_masks
        s_new = cell_step(spec, params["cell"], state.carry, x_t, masks, self.precision)
        loss, logits = self._readout_loss(params["readout"], s_new, y_t, mask_t)
        pos = ms.pos
        xs = lax.dynamic_update_index_in_dim(ms.xs, x_t.astype(ms.xs.dtype), pos, 0)
        ys = lax.dynamic_update_index_in_dim(ms.ys, jnp.asarray(y_t).astype(ms.ys.dtype), pos, 0)
        mk = lax.dynamic_update_index_in_dim(ms.masks, mask_t.astype(ms.masks.dtype), pos, 0)
        end = pos == W - 1

        def window_loss(p, start):
            def body(s, inp):
                x, y, m = inp
                s = cell_step(spec, p["cell"], s, x, masks, self.precision)
                return s, self._readout_loss(p["readout"], s, y, m)[0]

            _, losses = lax.scan(body, start, (xs, ys, mk))
            return jnp.sum(losses)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads = lax.cond(end, lambda _: jax.grad(window_loss)(params, ms.start), lambda _: zeros, None)
        ok = _finite_per_example(s_new, s_new.shape[0])
        s_safe = _batch_where(ok, s_new, jnp.zeros_like(s_new), s_new.shape[0])
        start = jnp.where(end, s_safe, ms.start)
        new_ms = TBPTTState(start=start, xs=xs, ys=ys, masks=mk, pos=jnp.where(end, 0, pos + 1).astype(jnp.int32))
        return s_new, new_ms, loss, logits, grads

    @property
    def tracker_masks(self):
        return None if self.masks is None else {k: (None if v is None else np.asarray(v).astype(bool)) for k, v in self.masks.items()}

    # -------------------------------------------------------------------- run
    def run(self, state: OnlineState, xs: Array, ys: Any, masks: Array | None = None):
        """``lax.scan`` of :meth:`step` over a time-major chunk.

        Args:
          xs: ``(T, B, n_in)``; ys: ``(T, B)`` int labels or ``(T, B, out)``;
          masks: ``(T, B)`` loss weights or ``None``.
        Returns:
          ``(state, logits (T, B, readout_size), metrics)`` with metrics of leading axis ``T``.
        """
        xs = jnp.asarray(xs)
        if jnp.ndim(xs) != 3:
            raise ValueError(f"xs must be time-major (T, B, n_in), got shape {jnp.shape(xs)}")
        if masks is None:
            masks = jnp.ones(xs.shape[:2], state.carry.dtype)

        def body(st, inp):
            x, y, m = inp
            st, logits, metrics = self.step(st, x, y, m)
            return st, (logits, metrics)

        state, (logits, metrics) = lax.scan(body, state, (xs, ys, masks))
        return state, logits, metrics

    @functools.cached_property
    def run_jit(self) -> Callable:
        """``jax.jit(self.run, donate_argnums=0)``: the input state's buffers are donated
        (reused in place on GPU/TPU); do not use the passed-in state afterwards."""
        return jax.jit(self.run, donate_argnums=0)

    def reset_carry(self, state: OnlineState, batch_mask: Array | None = None) -> OnlineState:
        """Zero the hidden state and re-initialise the influence (e.g. between sequences).

        Args:
          batch_mask: ``(B,)`` bool, examples to reset (``None`` = all).  Method-state leaves
            without a batch axis are reset when any example is.
        """
        batch = state.carry.shape[0]
        dtype = state.carry.dtype
        fresh_ms = self._init_method_state(state.params, batch, dtype, state.key)
        if self._kind == "tbptt":
            fresh_ms = state.method_state._replace(start=jnp.zeros_like(state.carry))
        if batch_mask is None:
            keep = jnp.zeros((batch,), bool)
        else:
            keep = ~jnp.asarray(batch_mask, bool)
        carry = _batch_where(keep, state.carry, jnp.zeros_like(state.carry), batch)
        if self._kind == "tbptt":
            ms = state.method_state._replace(
                start=_batch_where(keep, state.method_state.start, fresh_ms.start, batch)
            )
        else:
            ms = _batch_where(keep, state.method_state, fresh_ms, batch)
        return state._replace(carry=carry, method_state=ms)


# ---------------------------------------------------------------------------
# Multi-device.


def shard_batch(state: OnlineState, mesh: Mesh, axis_name: str) -> OnlineState:
    """Place ``state`` on ``mesh``: batch axes of ``carry``/``method_state`` sharded over
    ``axis_name``, everything else (params, optimizer state, accumulators) replicated.

    Batch-leading leaves (``(B, ...)``) shard axis 0; :class:`TBPTTState` buffers
    (``(W, B, ...)``) shard axis 1.  ``B`` must be divisible by the mesh axis size.  Shard
    the data the same way (``xs (T, B, n_in)``: ``PartitionSpec(None, axis_name)``) and call
    ``jax.jit(learner.run)``: the per-example influence never leaves its device; only the
    gradients (summed over the batch) are all-reduced.
    """
    batch = state.carry.shape[0]
    rep = NamedSharding(mesh, P())

    def place(leaf, axis):
        if jnp.ndim(leaf) > axis and jnp.shape(leaf)[axis] == batch:
            spec = P(*([None] * axis + [axis_name]))
            return jax.device_put(leaf, NamedSharding(mesh, spec))
        return jax.device_put(leaf, rep)

    carry = jax.tree.map(lambda a: place(a, 0), state.carry)
    ms = state.method_state
    if isinstance(ms, TBPTTState):
        ms = TBPTTState(
            start=place(ms.start, 0),
            xs=place(ms.xs, 1),
            ys=place(ms.ys, 1),
            masks=place(ms.masks, 1),
            pos=jax.device_put(ms.pos, rep),
        )
    else:
        ms = jax.tree.map(lambda a: place(a, 0), ms)
    rest = jax.device_put(
        (state.params, state.opt_state, state.grad_acc, state.step, state.key, state.skipped, state.resets), rep
    )
    params, opt_state, grad_acc, step, key, skipped, resets = rest
    return OnlineState(params, opt_state, carry, ms, grad_acc, step, key, skipped, resets)
