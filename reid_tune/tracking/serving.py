"""The code of a registered reid-tune model (MLflow "models from code"): a pyfunc that embeds image files
with the model's checkpoint, preprocessed as it was trained. MLflow runs this file when it loads the
model, so nothing is pickled; :func:`reid_tune.tracking.registry.log_champion` names it."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel, PythonModelContext


class ReidEmbedder(PythonModel):
    """``predict`` takes image paths and returns one L2-comparable embedding per image."""

    def load_context(self, context: PythonModelContext) -> None:
        from reid_tune.checkpoints import load_model

        self.model, self.cfg = load_model(Path(context.artifacts["checkpoint"]))

    def predict(self, model_input: list[str], params: dict | None = None) -> list[list[float]]:
        """One embedding per image path."""
        from reid_tune.augmentation import Preprocessing
        from reid_tune.embed import embed_images

        paths = [Path(p) for p in model_input]
        return embed_images(self.model, paths, Preprocessing.of(self.cfg), num_workers=0)[0].tolist()


mlflow.models.set_model(ReidEmbedder())
