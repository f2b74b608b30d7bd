"""snapjax: online training of recurrent networks with RTRL, SnAp-n, UORO and TBPTT in JAX.

One direction of flow: cell (:mod:`snapjax.cells`, :mod:`snapjax.recurrent`) → compressed
per-step Jacobians (:mod:`snapjax.jacobians`) → an online method behind one interface
(:mod:`snapjax.methods`: :class:`OnlineMethod`, built by name with :func:`online_method`) →
gradient (:mod:`snapjax.scan`) → optax (:mod:`snapjax.transforms`) → the whole-model learner
(:mod:`snapjax.model`, :mod:`snapjax.learner`).
"""

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
    mgu_spec,
    vanilla_spec,
    verify_spec,
)
from snapjax.activity import ActivityInfluence, ActivitySparseRTRL, step_cost
from snapjax.checkpoint import restore_state, save_state, state_from_bytes, state_to_bytes
from snapjax.sharded_checkpoint import restore_sharded, save_sharded
from snapjax.egru import PSEUDO_DERIVATIVES, EGRUCell, egru_spec, heaviside
from snapjax.learner import OnlineLearner, OnlineState
from snapjax.lru import LRUCell, lru_lambda, lru_spec
from snapjax.nnx import from_nnx, to_nnx
from snapjax.losses import Loss, get_loss, mse_loss, softmax_xent_loss
from snapjax.methods import OnlineMethod, StepResult, online_method
from snapjax.methods.compressed import InfluenceState
from snapjax.methods.generic import DenseInfluence, GenericInfluence, dense_method
from snapjax.methods.tbptt import TBPTTState
from snapjax.model import OnlineModel
from snapjax.recurrent import Recurrent, as_recurrent
from snapjax.scan import SequenceGradient, bptt_gradient, online_gradient
from snapjax.sharding import method_specs, put_sharded, shard_state, state_specs
from snapjax.sparsity import apply_masks, density_report, mask_updates, random_masks, snap_pattern_size
from snapjax.uoro import UORO, UOROState, uoro_method
from snapjax.transforms import (
    AccumulateOnlineState,
    SkipNonFiniteState,
    accumulate_online,
    masked_updates,
    skip_nonfinite,
    skipped_count,
)

__version__ = "0.2.0"

__all__ = [
    # cells
    "CellSpec", "Projection", "VanillaCell", "GRUCell", "LSTMCell", "EGRUCell",
    "vanilla_spec", "gru_spec", "lstm_spec", "mgu_spec", "egru_spec", "heaviside", "PSEUDO_DERIVATIVES",
    "LRUCell", "lru_spec", "lru_lambda", "from_nnx", "to_nnx",
    "as_cell_spec", "cell_step", "verify_spec", "Recurrent", "as_recurrent",
    # online methods (one interface)
    "OnlineMethod", "StepResult", "online_method", "InfluenceState", "TBPTTState",
    "ActivitySparseRTRL", "ActivityInfluence", "step_cost",
    "UORO", "UOROState", "uoro_method", "DenseInfluence", "GenericInfluence", "dense_method",
    # sequence drivers
    "SequenceGradient", "online_gradient", "bptt_gradient",
    # models and training
    "OnlineModel", "OnlineLearner", "OnlineState", "Loss", "get_loss", "softmax_xent_loss", "mse_loss",
    "shard_state", "state_specs", "method_specs", "put_sharded",
    "skip_nonfinite", "masked_updates", "accumulate_online", "skipped_count",
    "SkipNonFiniteState", "AccumulateOnlineState",
    "save_state", "restore_state", "state_to_bytes", "state_from_bytes", "save_sharded", "restore_sharded",
    # sparsity
    "random_masks", "apply_masks", "mask_updates", "density_report", "snap_pattern_size",
]
