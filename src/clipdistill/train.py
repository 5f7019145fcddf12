"""Deprecated home of `TrainConfig` and `train` (clipdistill 0.1); removed in 0.3.

    from clipdistill.distill.config import TrainConfig
    from clipdistill.distill.train import train
"""

import warnings

from .distill.config import TrainConfig
from .distill.train import finished_result, train

warnings.warn("clipdistill.train moved: import TrainConfig from clipdistill.distill.config and train from "
              "clipdistill.distill.train (the old path is removed in 0.3)", DeprecationWarning, stacklevel=2)

__all__ = ["TrainConfig", "train", "finished_result"]
