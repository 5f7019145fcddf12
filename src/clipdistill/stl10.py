"""Deprecated home of the study's function names (clipdistill 0.1); removed in 0.3.

    from clipdistill.study.original_functions import precompute_clip_stl10_train_image_embeddings, ...
"""

import warnings

from .study.original_functions import *  # noqa: F401,F403 - the study's names, unchanged
from .study.original_functions import __all__  # noqa: F401

warnings.warn("clipdistill.stl10 moved to clipdistill.study.original_functions (the old path is removed in 0.3)",
              DeprecationWarning, stacklevel=2)
