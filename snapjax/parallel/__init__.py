"""Many devices: batch- and parameter-sharded layouts of method states, and sharded checkpoints.

* :mod:`~snapjax.parallel.sharding`: partition specs from each method's declared batch and
  parameter axes, placement, and the sharded runs the learner and
  :func:`snapjax.online_gradient` call;
* :mod:`~snapjax.parallel.sharded_checkpoint`: orbax checkpoints of sharded state.

Sits below :mod:`snapjax.training` (the learner and the sequence drivers call it) and imports
only :mod:`snapjax.methods` and :mod:`snapjax.checkpoint`; it sees learners by duck typing.
"""
