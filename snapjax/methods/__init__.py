"""Online gradient methods behind one interface (:class:`OnlineMethod`), built by name.

Each method is one file that registers itself (:func:`register_method`); :func:`online_method`
looks the name up.  The built-in methods:

==================  ========================================================================
name                method (file)
==================  ========================================================================
``"rtrl"``          exact RTRL (:mod:`~snapjax.methods.rtrl`: compressed Jacobians,
                    :mod:`~snapjax.methods.compressed`; dense per-example Jacobians for
                    generic cells, :mod:`~snapjax.methods.dense`); with ``chunk=K`` the exact
                    forward-backward hybrid (:mod:`~snapjax.methods.chunked`)
``"snap1"`` ...     SnAp-n (``"snapN"``, or ``"snap"`` with ``n=N``); ``n >= k`` is RTRL;
                    ``"snap1"`` with ``chunk=K`` is chunked SnAp-1
``"uoro"``          UORO, rank-one unbiased estimate (any cell; :mod:`~snapjax.methods.uoro`)
``"tbptt"``         truncated BPTT over windows of ``window`` steps (any cell;
                    :mod:`~snapjax.methods.tbptt`)
``"activity"``      exact RTRL that skips silent units (activity-sparse cells such as EGRU;
                    :mod:`~snapjax.methods.activity`)
``"drtrl"``         D-RTRL: SnAp-1 under braintrace's name (:mod:`~snapjax.methods.rtrl`)
``"ostl"``          OSTL: exact RTRL per layer of a stack, i.e. ``"rtrl"``
                    (:mod:`~snapjax.methods.rtrl`)
``"immediate"``     SnAp-0 (alias ``"snap0"``): the immediate Jacobian only, the gradient of
                    ``L_t`` with ``s_{t-1}`` held fixed (any cell; :mod:`~snapjax.methods.immediate`)
``"sliding_tbptt"`` sliding-window truncated BPTT: every step, the gradient of ``L_t``
                    through the last ``window`` steps (any cell;
                    :mod:`~snapjax.methods.sliding_tbptt`)
``"esdrtrl"``       ES-D-RTRL (braintrace's ``pp_prop``): D-RTRL's trace factorised per weight
                    matrix (cells with one state per unit; :mod:`~snapjax.methods.esdrtrl`)
``"eprop"``         e-prop: eligibility traces through each unit's own state, optionally
                    filtered (compressed cells, e.g. LIF/ALIF; :mod:`~snapjax.methods.eprop`)
``"rflo"``          RFLO: SnAp-1 with ``D`` replaced by its leak (one-state cells, e.g. the
                    leaky RNN; :mod:`~snapjax.methods.rflo`)
==================  ========================================================================

:func:`registered_methods` lists what is registered now (user methods included).

Example::

    >>> import flax.linen as nn, jax, jax.numpy as jnp, snapjax as sj
    >>> cell = nn.LSTMCell(3)
    >>> params = cell.init(jax.random.key(0), cell.initialize_carry(jax.random.key(1), (1, 2)),
    ...                    jnp.zeros((1, 2)))["params"]
    >>> options = {"tbptt": {"window": 4}}
    >>> [sj.online_method(m, cell, params, **options.get(m, {})).period for m in ("rtrl", "snap2", "uoro", "tbptt")]
    [1, 1, 1, 4]
"""

from snapjax.methods.base import OnlineMethod, StepResult, select_examples
from snapjax.methods.registry import (
    MethodEntry,
    check_options,
    online_method,
    parse_method_name,
    register_method,
    registered_methods,
    unregister_method,
    uses_window,
)

# The built-in methods register themselves when imported; this order is the listing order.
# isort: off
from snapjax.methods import rtrl, uoro, tbptt, activity, immediate, sliding_tbptt, esdrtrl, kfrtrl, ok, eprop, rflo  # noqa: E402, F401, E501
# isort: on

__all__ = ["OnlineMethod", "StepResult", "online_method", "register_method", "unregister_method",
           "registered_methods", "MethodEntry", "parse_method_name", "check_options", "uses_window",
           "select_examples"]
