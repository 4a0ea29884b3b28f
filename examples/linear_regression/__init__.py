"""Linear regression, y = 2x + noise: ``torch.nn.Linear(1, 1)`` learns w ≈ 2, b ≈ 0 under ``torch.nn.MSELoss``.

From the repository root::

    python -m launcher --gpus 2 model._target_=torch.nn.Linear model.in_features=1 model.out_features=1 data._target_=examples.linear_regression.task.make_data loss._target_=torch.nn.MSELoss '~metrics.accuracy' metrics.mae._target_=examples.linear_regression.task.mae optimizer=sgd optimizer.lr=0.1 trainer.max_steps=200

- the model is a class from torch itself (any importable class or function is a target)
- ``task.py``: the data function ``make_data`` (in-memory TensorDatasets: the loader's fast path)
  and a metric of the user's own, ``mae``
- a class as the loss (``torch.nn.MSELoss``) is constructed once with the ``loss.*`` keys, e.g.
  ``loss.reduction=mean``; a function is called per batch with them
- ``'~metrics.accuracy'`` removes the default accuracy (it would return None on float targets and be
  left out anyway); ``metrics.mae._target_=…`` adds a metric
- the weights: ``torch.load("RUN_DIR/checkpoints/step-00000200.pt", weights_only=True)["model"]``
"""  # noqa: E501 - the command is one line, to copy
