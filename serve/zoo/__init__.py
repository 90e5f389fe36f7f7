"""The model zoo: named models (SVD family checkpoints, fine-tunes, LoRA adapters) served side by side.

* :mod:`~serve.zoo.entry`: :class:`ModelEntry`, one model's weights, defaults, limits and visibility;
* :mod:`~serve.zoo.store`: the registry in the job store's database (``svd-serve models``);
* :mod:`~serve.zoo.catalog`: :class:`ModelCatalog`, the declared and registered models as every
  process sees them, and where a model's weights come from.
"""

from .catalog import (ModelCatalog, ModelNotAllowedError, ModelUnavailableError, ModelVersionChangedError, NotAVideoModelError,
                      UnknownModelError, Weights, allows, model_id_for)
from .entry import ModelEntry, ModelLimits
from .store import ModelStore, make_model_store

__all__ = ["ModelCatalog", "ModelEntry", "ModelLimits", "ModelNotAllowedError", "ModelStore", "ModelUnavailableError", "ModelVersionChangedError",
           "NotAVideoModelError", "UnknownModelError",
           "Weights", "allows", "make_model_store", "model_id_for"]
