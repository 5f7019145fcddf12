"""Deprecated home of the study's function names (clipdistill 0.1); removed in 0.3.

    from clipdistill.study.stl10 import precompute_clip_stl10_train_image_embeddings, ...
"""

import warnings

from .study.stl10 import *  # noqa: F401,F403 - the study's names, unchanged
from .study.stl10 import __all__  # noqa: F401

warnings.warn("clipdistill.stl10 moved to clipdistill.study.stl10 (the old path is removed in 0.3)",
              DeprecationWarning, stacklevel=2)
