"""How good is the teacher on the views the student trains on? (not a speed benchmark)

Consistent teaching (`--teaching online`) gives the student the teacher's answer on each
augmented view. That only teaches well if the teacher still recognises the class in the view:
a teacher that never saw crops (the tiny teacher was pre-trained on whole images) answers
noise on a crop that cut the object away, and cross-entropy on the true label of such a crop
(`kl+labels`) asks for the impossible. This prints the teacher's test accuracy, text head
and linear probe, on the plain images and on one seeded draw of each augmentation, with the
shapes10 suite's probe (the one its student rows use).

    python benchmarks/teacher_on_views.py [--images 2000] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="test images (shapes10 has 2,000)")
    ap.add_argument("--cache-dir", default=os.environ.get("CLIPDISTILL_CACHE",
                                                          os.path.expanduser("~/.cache/clipdistill")))
    args = ap.parse_args()
    import numpy as np
    import torch

    from clipdistill.data.pixels import to_float
    from clipdistill.distill.augment import AUGMENTATIONS, identity_views, sample_views
    from clipdistill.distill.context import RunContext
    from clipdistill.distill.student_data import Rows
    from clipdistill.distill.teaching import teacher_pixels
    from clipdistill.study.experiments import build_config

    with tempfile.TemporaryDirectory() as tmp:
        # the suite's student row builds the teacher, its caches and the probe exactly as training does
        cfg = build_config("shapes10", "recipe_online", cache_dir=args.cache_dir, out=f"{tmp}/run", progress=False)
        ctx = RunContext(cfg)
    k = ctx.data.names.index("test")
    n = min(args.images, len(ctx.data.images[k]))
    imgs, labels, _ = ctx.data.gather(Rows(np.full(n, k), np.arange(n)))
    x = to_float(imgs)
    teacher = ctx.outs.teacher
    text = ctx.outs.text_head(teacher.logit_scale)
    rows = []
    with torch.inference_mode():
        for name in ["none", *[a for a in AUGMENTATIONS if a != "none"]]:
            views = identity_views(n) if name == "none" else sample_views(n, AUGMENTATIONS.get(name),
                                                                          torch.Generator().manual_seed(0))
            emb = torch.cat([teacher.encode_images(teacher_pixels(teacher, x[i:i + 256], views[i:i + 256]))
                             for i in range(0, n, 256)]).float()
            acc = {h: float((head(emb).argmax(1) == labels).float().mean() * 100)
                   for h, head in (("text", text), ("linear", ctx.teacher_head))}
            rows.append({"view": name, "summary": AUGMENTATIONS.get(name).summary,
                         "zero-shot %": f"{acc['text']:.2f}", "linear probe %": f"{acc['linear']:.2f}"})
    print(f"teacher {teacher.slug} on {n} shapes10 test images, one seeded draw of each view")
    print(table(rows, ["view", "summary", "zero-shot %", "linear probe %"]))


if __name__ == "__main__":
    main()
