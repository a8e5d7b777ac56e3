"""The final model as an MLflow Model: MLflow's files added beside those write_final_model wrote, so one directory
loads with our loader (load_final_model), mlflow.pyfunc.load_model and mlflow.pytorch.load_model.

- pyfunc: this module is the loader (no pickle): predict(prompts) -> completions, what `wmtp generate` prints
  after the prompt, with its settings as params (greedy, 128 new tokens by default).
- pytorch: the model's forward(tokens_BT) -> logits_BTKV exported with torch.export (MLflow's "pt2" format, no
  pickle), in data/. It holds a second copy of the weights.

register_version adds it to the Model Registry (tracking.register_model in the recipe).
Loading the pyfunc needs this package installed (the loader module and the models are ours); the pytorch flavor
needs only torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.environment_variables import MLFLOW_UV_AUTO_DETECT
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

log = logging.getLogger(__name__)
INPUT_EXAMPLE = ["def add(a, b):"]
STEP_TAG = "wmtp.step"  # on a registered model version: the training step its final model is from

_UV_AUTO_DETECT = MLFLOW_UV_AUTO_DETECT.name
_GENERATION_PARAMS = [  # `wmtp generate`'s options and defaults
    ParamSpec("max_new_tokens", DataType.long, 128),
    ParamSpec("temperature", DataType.double, 0.0),
    ParamSpec("top_p", DataType.double, 1.0),
    ParamSpec("seed", DataType.long, 0),
    ParamSpec("heads", DataType.long, 1),
]


def add_mlflow_model(model_dir: Path) -> None:
    """Make the directory write_final_model filled an MLflow Model too (pyfunc and pytorch flavors)."""
    # torch loads here, not when a flow module is imported
    from wmtp_core.checkpoint.final_model import load_final_model, load_final_model_tokenizer

    model = load_final_model(model_dir)
    example_ids = load_final_model_tokenizer(model_dir).encode(INPUT_EXAMPLE[0], add_special=False)
    mlmodel = Model()
    with tempfile.TemporaryDirectory() as scratch, _quiet_environment_capture():
        _save_pytorch_flavor(model, example_ids, Path(scratch) / "pytorch", mlmodel)
        _save_pyfunc_flavor(Path(scratch) / "pyfunc", mlmodel)
        # The pyfunc save wrote MLmodel (both flavors), the example and the environment; the pytorch one, data/.
        shutil.copytree(Path(scratch) / "pyfunc", model_dir, dirs_exist_ok=True)
        shutil.copytree(Path(scratch) / "pytorch" / "data", model_dir / "data")
    mlmodel.model_size_bytes = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    mlmodel.save(model_dir / MLMODEL_FILE_NAME)


def _save_pytorch_flavor(model, example_ids: list[int], path: Path, mlmodel: Model) -> None:
    import mlflow.pytorch
    import torch

    # Two rows: torch.export makes a dimension of size 1 static, and the batch dimension must stay dynamic.
    tokens_BT = torch.tensor([example_ids, example_ids])
    with torch.no_grad():
        logits_BTKV = model(tokens_BT)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("int64"), (-1, -1), name="tokens_BT")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1, *logits_BTKV.shape[2:]), name="logits_BTKV")]),
    )
    mlflow.pytorch.save_model(
        model,
        path,
        mlflow_model=mlmodel,
        serialization_format="pt2",
        input_example=(tokens_BT,),
        signature=signature,
        pip_requirements=_requirements(),
    )


def _save_pyfunc_flavor(path: Path, mlmodel: Model) -> None:
    """pyfunc with this module as the loader: it replaces the pytorch flavor's own pyfunc (which would take token
    tensors), and its text signature and example replace the tensor ones (mlflow.pytorch reads neither)."""
    import mlflow.pyfunc

    mlflow.pyfunc.save_model(
        path,
        loader_module=__name__,
        mlflow_model=mlmodel,
        signature=ModelSignature(
            inputs=Schema([ColSpec(DataType.string)]),
            outputs=Schema([ColSpec(DataType.string)]),
            params=ParamSchema(_GENERATION_PARAMS),
        ),
        input_example=INPUT_EXAMPLE,
        pip_requirements=_requirements(),
    )


def _requirements() -> list[str]:
    """What the model needs besides this package (which is not on a package index; install it from source)."""
    names = ["torch", "mlflow", "safetensors"] + (
        ["transformers", "tokenizers"] if "transformers" in sys.modules else []
    )
    return [f"{name}=={version(name)}" for name in names]


@contextmanager
def _quiet_environment_capture():
    """MLflow's saves report each step at INFO, and warn that pip's version is unknown (uv environments have no
    pip): nothing about the model. Its uv detection would copy uv.lock and pyproject.toml from whatever
    directory the process runs in; the requirements above say what the model needs wherever it runs."""
    levels = {"mlflow": logging.WARNING, "mlflow.utils.environment": logging.ERROR}
    saved = {name: logging.getLogger(name).level for name in levels}
    uv_detect = os.environ.get(_UV_AUTO_DETECT)
    os.environ[_UV_AUTO_DETECT] = "false"
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        if uv_detect is None:
            os.environ.pop(_UV_AUTO_DETECT)
        else:
            os.environ[_UV_AUTO_DETECT] = uv_detect


def register_version(mlflow: MlflowClient, name: str, *, run_id: str, step: int) -> str:
    """The version of registered model name that holds run_id's final model of step, created (the registered
    model too) unless one exists."""
    for existing in mlflow.search_model_versions(f"run_id='{run_id}'"):
        if existing.name == name and existing.tags.get(STEP_TAG) == str(step):
            return str(existing.version)
    try:
        mlflow.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    source = f"{mlflow.get_run(run_id).info.artifact_uri}/final_model"
    version = mlflow.create_model_version(name, source, run_id=run_id, tags={STEP_TAG: str(step)})
    log.info("MLflow run %s: final model of step %d registered as %s version %s", run_id, step, name, version.version)
    return str(version.version)


class TextGenerator:
    """The pyfunc model: predict(prompts, params) -> one completion per prompt."""

    def __init__(self, model_dir: str):
        from wmtp_core.checkpoint.final_model import load_final_model, load_final_model_tokenizer

        self.model = load_final_model(Path(model_dir))
        self.tokenizer = load_final_model_tokenizer(Path(model_dir))

    def predict(self, model_input, params: dict | None = None) -> list[str]:
        from wmtp_core.generation.generate import generate
        from wmtp_core.generation.settings import SamplingSettings

        settings = {spec.name: spec.default for spec in _GENERATION_PARAMS} | (params or {})
        heads = int(settings.pop("heads"))
        sampling = SamplingSettings(**settings)
        generations, _ = generate(self.model, self.tokenizer, _prompts(model_input), sampling, heads=heads)
        return [generation.text for generation in generations]


def _prompts(model_input) -> list[str]:
    """The prompts of a pyfunc input: a list of strings, one string, or a DataFrame with a `prompt` column (what
    MLflow makes of a list under the signature)."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(prompt) for prompt in model_input[column]]
    return [str(prompt) for prompt in model_input]


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> TextGenerator:
    """MLflow's entry point for the pyfunc flavor (data_path is the model directory)."""
    return TextGenerator(data_path)
