"""MLflow models-from-code entry: the pyfunc that serves a registered pdl1exp model.

:func:`pdl1exp.serving.log_selected_model` logs this file as the model's code; MLflow runs
it at load time, then :meth:`SelectedPyfunc.load_context` loads the fitted estimator.
"""

from __future__ import annotations

import mlflow

from pdl1exp.serving import SelectedPyfunc

mlflow.models.set_model(SelectedPyfunc())
