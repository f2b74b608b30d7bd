"""snapjax: online training of recurrent networks with RTRL, SnAp-n and UORO in JAX.

Layers, one direction of flow: cell (:mod:`snapjax.cells`) → compressed per-step Jacobians
(:mod:`snapjax.jacobians`) → influence (:mod:`snapjax.influence`, :mod:`snapjax.uoro`,
:mod:`snapjax.activity`) → gradient (:mod:`snapjax.scan`) → optax (:mod:`snapjax.transforms`,
:mod:`snapjax.online`).
"""

from snapjax.activity import ActivityInfluence, ActivitySparseTracker, activity_sparse_tracker, step_cost
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
from snapjax.checkpoint import restore_state, save_state, state_from_bytes, state_to_bytes
from snapjax.egru import PSEUDO_DERIVATIVES, EGRUCell, egru_spec, heaviside
from snapjax.influence import InfluenceTracker, influence_tracker, parse_method
from snapjax.jacobians import StepJacobians, dense_dynamics, step_jacobians
from snapjax.online import OnlineLearner, OnlineState, TBPTTState, mse_loss, shard_batch, softmax_xent_loss
from snapjax.patterns import NeighbourTable, kernel_layout, neighbour_table
from snapjax.scan import SequenceGradient, bptt_gradient, online_gradient
from snapjax.sparsity import apply_masks, density_report, mask_updates, random_masks, snap_pattern_size
from snapjax.transforms import (
    AccumulateOnlineState,
    SkipNonFiniteState,
    accumulate_online,
    masked_updates,
    skip_nonfinite,
    skipped_count,
)
from snapjax.uoro import UOROState, UOROTracker, uoro_tracker

__version__ = "0.1.0"

__all__ = [
    # cells
    "CellSpec", "Projection", "VanillaCell", "GRUCell", "LSTMCell", "EGRUCell",
    "vanilla_spec", "gru_spec", "lstm_spec", "egru_spec", "heaviside", "PSEUDO_DERIVATIVES",
    "as_cell_spec", "cell_step",
    # Jacobians and patterns
    "StepJacobians", "step_jacobians", "dense_dynamics", "NeighbourTable", "neighbour_table", "kernel_layout",
    # online gradient methods
    "InfluenceTracker", "influence_tracker", "parse_method",
    "UOROState", "UOROTracker", "uoro_tracker",
    "ActivityInfluence", "ActivitySparseTracker", "activity_sparse_tracker", "step_cost",
    # sequence drivers
    "SequenceGradient", "online_gradient", "bptt_gradient",
    # training
    "OnlineLearner", "OnlineState", "TBPTTState", "shard_batch", "softmax_xent_loss", "mse_loss",
    "skip_nonfinite", "masked_updates", "accumulate_online", "skipped_count",
    "SkipNonFiniteState", "AccumulateOnlineState",
    "save_state", "restore_state", "state_to_bytes", "state_from_bytes",
    # sparsity
    "random_masks", "apply_masks", "mask_updates", "density_report", "snap_pattern_size",
]
