"""Optional integrations, each a hook in the ``cachehub.hooks`` entry-point group.

They import their library only when enabled, so cachehub works without them:

* ``openlineage`` -- OpenLineage run events for ``cachehub run``; enabled when
  ``openlineage-python`` is installed and ``OPENLINEAGE_URL`` or ``OPENLINEAGE_CONFIG`` is set
  (or ``CACHEHUB_OPENLINEAGE=1``, using the client's own configuration);
* ``mlflow`` -- ``mlflow.log_input`` for every commit a process resolves while an MLflow run
  is active.
"""
