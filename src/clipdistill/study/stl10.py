"""Deprecated name of `clipdistill.study.original_functions` (it holds the original study's
function names, not STL10 code); removed in 0.3."""

import warnings

from .original_functions import *  # noqa: F401,F403 - the study's names, unchanged
from .original_functions import STUDY_FUNCTIONS, __all__  # noqa: F401

warnings.warn("clipdistill.study.stl10 is now clipdistill.study.original_functions (the old path is removed in 0.3)",
              DeprecationWarning, stacklevel=2)
