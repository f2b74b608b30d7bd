"""snapjax: online training of recurrent networks with RTRL and SnAp-n in JAX."""

from snapjax.cells import (
    CellSpec,
    GRUCell,
    LSTMCell,
    Projection,
    VanillaCell,
    as_cell_spec,
    cell_step,
    gru_spec,
    lstm_spec,
    vanilla_spec,
)
from snapjax.influence import InfluenceTracker, influence_tracker, parse_method
from snapjax.jacobians import StepJacobians, dense_dynamics, step_jacobians
from snapjax.patterns import NeighbourTable, kernel_layout, neighbour_table
from snapjax.scan import SequenceGradient, bptt_gradient, online_gradient

__version__ = "0.1.0"

__all__ = [
    "CellSpec",
    "GRUCell",
    "InfluenceTracker",
    "LSTMCell",
    "NeighbourTable",
    "Projection",
    "SequenceGradient",
    "StepJacobians",
    "VanillaCell",
    "as_cell_spec",
    "bptt_gradient",
    "cell_step",
    "dense_dynamics",
    "gru_spec",
    "influence_tracker",
    "kernel_layout",
    "lstm_spec",
    "neighbour_table",
    "online_gradient",
    "parse_method",
    "step_jacobians",
    "vanilla_spec",
]
