"""Training: the whole model, the learner and what drives a sequence through a method.

* :mod:`~snapjax.training.model`: :class:`snapjax.OnlineModel` (encoder, recurrent stages, head);
* :mod:`~snapjax.training.learner`: :class:`snapjax.OnlineLearner` (init / step / run);
* :mod:`~snapjax.training.online_state`: :class:`snapjax.OnlineState`;
* :mod:`~snapjax.training.losses`, :mod:`~snapjax.training.transforms` (optax);
* :mod:`~snapjax.training.sequence`: :func:`snapjax.online_gradient`, :func:`snapjax.bptt_gradient`.

Imports the layers below it (cells, engine, methods, parallel), never the other way.
"""
