"""clipdistill: distil an OpenCLIP teacher into a small, fast timm classifier.

The library is importable without side effects; heavy modules (open_clip, timm,
onnxruntime) are imported where they are used so that `clipdistill --help` is fast.
"""

__version__ = "0.1.0"
