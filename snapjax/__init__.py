"""snapjax: online training of recurrent networks with RTRL, SnAp-n, UORO and TBPTT in JAX.

The public API.  The package is layered, and imports flow one way (a test enforces it)::

    cells/     what a recurrent layer computes: CellSpec, built-in specs, flax modules, EGRU,
               LRU, nnx adapters, the Recurrent view
    engine/    compressed per-step Jacobians, their check against autodiff, SnAp-n patterns,
               parameter sparsity, influence propagation
    methods/   the OnlineMethod interface, the registry (online_method, register_method), one
               file per method
    parallel/  sharded layouts of method states, sharded checkpoints
    training/  the model, the learner, losses, optax transforms, sequence drivers

``checkpoint`` and ``data`` stand apart (they import nothing of the layers).
"""

from snapjax.cells.builtin import as_cell_spec, gru_spec, lstm_spec, mgu_spec, vanilla_spec
from snapjax.cells.egru import PSEUDO_DERIVATIVES, EGRUCell, egru_spec, heaviside
from snapjax.cells.equinox import from_equinox, to_equinox
from snapjax.cells.leaky import LeakyRNNCell, leaky_spec
from snapjax.cells.lru import LRUCell, lru_lambda, lru_spec
from snapjax.cells.modules import GRUCell, LSTMCell, VanillaCell
from snapjax.cells.nnx import from_nnx, nnx_layers, to_nnx
from snapjax.cells.recurrent import Recurrent, as_recurrent
from snapjax.cells.spec import CellSpec, Projection, cell_step
from snapjax.cells.spiking import ALIFCell, LIFCell, alif_spec, lif_spec
from snapjax.checkpoint import restore_state, save_state, state_from_bytes, state_to_bytes
from snapjax.engine.sparsity import apply_masks, density_report, mask_updates, random_masks, snap_pattern_size
from snapjax.engine.verify import verify_spec
from snapjax.methods import (
    MethodEntry,
    OnlineMethod,
    StepResult,
    online_method,
    register_method,
    registered_methods,
    unregister_method,
)
from snapjax.methods.activity import ActivityInfluence, ActivitySparseRTRL
from snapjax.methods.activity_cost import step_cost
from snapjax.methods.compressed import InfluenceState
from snapjax.methods.dense import DenseInfluence, GenericInfluence, dense_method
from snapjax.methods.tbptt import TBPTTState
from snapjax.methods.uoro import UORO, UOROState, uoro_method
from snapjax.parallel.sharded_checkpoint import restore_sharded, save_sharded
from snapjax.parallel.sharding import method_specs, put_sharded, shard_state, state_specs
from snapjax.training.cost_model import LayerCost
from snapjax.training.describe import CompiledMemory, LearnerCost
from snapjax.training.fit import FitResult, fit
from snapjax.training.init_checks import MemoryLimitError, SlowPathWarning
from snapjax.training.learner import OnlineLearner, OnlineState
from snapjax.training.losses import Loss, get_loss, mse_loss, softmax_xent_loss
from snapjax.training.model import OnlineModel
from snapjax.training.sequence import SequenceGradient, bptt_gradient, online_gradient
from snapjax.training.transforms import (
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
    "LRUCell", "lru_spec", "lru_lambda", "from_nnx", "to_nnx", "nnx_layers", "from_equinox", "to_equinox",
    "LIFCell", "ALIFCell", "lif_spec", "alif_spec", "LeakyRNNCell", "leaky_spec",
    "as_cell_spec", "cell_step", "verify_spec", "Recurrent", "as_recurrent",
    # online methods (one interface)
    "OnlineMethod", "StepResult", "online_method", "InfluenceState", "TBPTTState",
    "register_method", "unregister_method", "registered_methods", "MethodEntry",
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
    # cost preview and streaming driver
    "LearnerCost", "LayerCost", "CompiledMemory", "SlowPathWarning", "MemoryLimitError", "fit", "FitResult",
    # sparsity
    "random_masks", "apply_masks", "mask_updates", "density_report", "snap_pattern_size",
]
