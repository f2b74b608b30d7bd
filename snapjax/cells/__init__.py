"""Cells: what a recurrent layer computes, before any learning rule looks at it.

* :mod:`~snapjax.cells.spec`: :class:`CellSpec` (gate projections ``a_p = v_p @ (W_p ⊙ M_p) + b_p``
  plus a unit-wise update ``s'_i = φ(a_{·,i}, θᵘ_i, s_i)``) and :func:`cell_step`;
* :mod:`~snapjax.cells.builtin`: the built-in specs (vanilla, GRU, MGU, LSTM) and
  :func:`as_cell_spec` for flax.linen's own cells;
* :mod:`~snapjax.cells.modules`: the flax.linen modules ``VanillaCell``/``GRUCell``/``LSTMCell``;
* :mod:`~snapjax.cells.egru`, :mod:`~snapjax.cells.lru`: the activity-sparse EGRU and the LRU;
* :mod:`~snapjax.cells.spiking`, :mod:`~snapjax.cells.leaky`: LIF/ALIF spiking neurons (e-prop) and
  the leaky rate RNN (RFLO);
* :mod:`~snapjax.cells.nnx`: flax.nnx cells to and from specs, nnx feed-forward modules and
  whole models; :mod:`~snapjax.cells.equinox`: the same for equinox (optional dependency);
* :mod:`~snapjax.cells.feedforward`: :class:`FeedForward`, a module holding its own parameters
  as a pure function;
* :mod:`~snapjax.cells.recurrent`: :class:`Recurrent`, the one view of any cell the methods
  use, and the rule of what counts as recurrent.

Nothing here imports the engine, the methods or the training code.

Example::

    >>> import snapjax.cells as cells
    >>> cells.gru_spec(4).state_size, cells.as_recurrent(cells.LSTMCell(3)).spec is cells.lstm_spec(3)
    (4, True)
"""

from snapjax.cells.builtin import as_cell_spec, gru_spec, lstm_spec, mgu_spec, vanilla_spec
from snapjax.cells.egru import PSEUDO_DERIVATIVES, EGRUCell, egru_spec, heaviside
from snapjax.cells.equinox import from_equinox, to_equinox
from snapjax.cells.feedforward import FeedForward
from snapjax.cells.leaky import LeakyRNNCell, leaky_spec
from snapjax.cells.lru import LRUCell, lru_lambda, lru_spec
from snapjax.cells.modules import GRUCell, LSTMCell, VanillaCell
from snapjax.cells.nnx import from_nnx, nnx_layers, to_nnx
from snapjax.cells.recurrent import Recurrent, as_recurrent
from snapjax.cells.spec import CellSpec, Projection, cell_step, masked_kernel, preactivations, projection_names
from snapjax.cells.spiking import ALIFCell, LIFCell, alif_spec, lif_spec

__all__ = [
    "CellSpec", "Projection", "cell_step", "masked_kernel", "preactivations", "projection_names",
    "vanilla_spec", "gru_spec", "lstm_spec", "mgu_spec", "as_cell_spec",
    "VanillaCell", "GRUCell", "LSTMCell", "EGRUCell", "egru_spec", "heaviside", "PSEUDO_DERIVATIVES",
    "LRUCell", "lru_spec", "lru_lambda", "from_nnx", "to_nnx", "Recurrent", "as_recurrent",
    "nnx_layers", "from_equinox", "to_equinox", "FeedForward",
    "LIFCell", "ALIFCell", "lif_spec", "alif_spec", "LeakyRNNCell", "leaky_spec",
]
