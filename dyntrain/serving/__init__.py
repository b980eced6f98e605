"""The trained model as an MLflow Model: logged into its run, registered, loaded and served by MLflow.

- ``contract``: the input/output tables (base64 PNG/JPEG in a column ``image``) and the inference
  parameters (variant, tiling, Gray-World);
- ``limits``: the serving limits (pixels, rows, parameter ranges, tiles, memory), from the environment;
- ``pyfunc``: ``DyNetModel``, the ``pyfunc`` python model that restores images (imports mlflow);
- ``publish``: log a checkpoint as the run's model, register it;
- ``hook``: ``ModelLogging``, the end hook a job hands to ``run_training``;
- ``source``: ``--model models:/NAME@ALIAS`` for ``launch/restore.py`` and ``launch/evaluate.py``.

Nothing is imported here: mlflow stays unloaded until a model is logged or loaded.
"""
