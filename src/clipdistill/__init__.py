"""clipdistill: distil an OpenCLIP teacher into a small, fast timm classifier.

The package follows the road the data travels, each stage importing only from the ones
before it and from `core`:

    core     config, registry, atomic writes, locks, safe state files, errors, device, logging
    data     datasets (shapes10, STL10, folders, pools), image decoding, pixels -> tensors
    teacher  the open_clip wrapper, the tiny teacher, the embedding cache, heads, teacher-eval,
             curation
    distill  methods, students, the trainer, checkpoints, run folders, evaluation
    deploy   ONNX export, INT8, compress, bench, predict
    fit      your own classifier (`fit-prompts`): a pool and prompts through every stage above
    study    the study's experiments, reproduce, report, its original function names

`cli.py` sits on top of them all. Importing the package has no side effects; heavy modules
(torch, open_clip, timm, onnxruntime) are imported where they are used so that
`clipdistill --help` is fast."""

__version__ = "0.2.0"
