"""The models-from-code script of an mlipops pyfunc (:mod:`mlipops.models.pyfunc`): MLflow stores this file
with the model and runs it to build the Python model; no object is pickled."""

import mlflow
from mlflow.pyfunc import PythonModel

from mlipops.models.pyfunc import MlipopsModel


class _Model(MlipopsModel, PythonModel):
    pass


mlflow.models.set_model(_Model())
