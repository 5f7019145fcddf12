"""The data flags shared by every job that reads a dataset (embed, teacher-eval, train)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..core.config import Options, at_least, check, check_fields, option
from .datasets import DATASETS, create_dataset, default_data_root
from .prompts import read_prompt_file, read_templates
from .protocol import ImageDataset

# shapes10 renders a whole split in memory (n x size x size x 3 bytes) before caching it: its
# 10,000 unlabeled images take 7.9 GB at 512 px. STL10 is 96 px; teachers read 224 to 512.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 512


@dataclasses.dataclass
class DataOptions(Options, title="dataset"):
    """Which dataset and where its files are."""

    dataset: str = option("shapes10", "stl10, shapes10 (offline synthetic) or folder", metavar="NAME")
    data_root: Optional[str] = option(None, "dataset files (stl10: the folder holding stl10_binary/; folder: the "
                                            "image folder); default: CACHE_DIR/data", metavar="DIR", runtime=True)
    image_size: int = option(32, f"shapes10 only: side of the generated images in pixels, {MIN_IMAGE_SIZE}.."
                                 f"{MAX_IMAGE_SIZE} (STL10 is 96)")
    max_images: int = option(0, "use only the first N images of each split (0 = all): quick trials",
                             valid=at_least(0, "0 = all"))
    pool: list[str] = option(default_factory=list, help="folder dataset: unlabeled pools, comma-separated: any trees "
                                                        "of images (sub-folders never mean classes) or tar shards "
                                                        "('shards/pool-{000..099}.tar', WebDataset's form), indexed "
                                                        "and deduplicated; joined to DATA_ROOT/unlabeled/",
                             metavar="DIR|SHARDS[,...]")
    prompts: Optional[str] = option(None, "text file with one prompt per class, in class order; default: the "
                                          "dataset's own prompts", metavar="FILE")
    templates: Optional[str] = option(None, "text file of prompt templates, one per line with {} where the prompt "
                                            "goes (averaged as in open_clip's zero-shot classifier); default: the "
                                            "dataset's own, or none", metavar="FILE")

    def _check_data(self) -> None:
        DATASETS.get(self.dataset)  # unknown names fail before any teacher is loaded
        check(not self.pool or self.dataset == "folder", "pool", "only applies with --dataset folder")
        self._check_image_size()
        check_fields(self, DataOptions)
        if self.prompts is not None:
            read_prompt_file(self.prompts)
        read_templates(self.templates)

    def _check_image_size(self) -> None:
        """Before anything is rendered: a split at 20000 px would need 1.2 GB an image."""
        size, valid = self.image_size, f"must be {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels"
        check(size >= MIN_IMAGE_SIZE, "image_size", f"{size}: {valid} (smaller, the shapes cannot be told apart)")
        if size > MAX_IMAGE_SIZE:
            from .shapes10 import SPLITS

            n = SPLITS["unlabeled"].n
            check(False, "image_size", f"{size}: {valid}. shapes10 renders each split whole in memory, and its "
                                       f"{n:,} unlabeled images would take {n * size * size * 3 / 1e9:,.0f} GB at "
                                       f"{size} px ({n * MAX_IMAGE_SIZE ** 2 * 3 / 1e9:.1f} GB at {MAX_IMAGE_SIZE}); "
                                       f"teachers resize to their own side (224 to 512) anyway")

    def open_split(self, split: str, cache_dir: str) -> ImageDataset:
        """One split of the configured dataset. A folder dataset given only --pool has no
        data root (its test split is then missing, not read from the cache folder)."""
        root = self.data_root or ("" if self.pool else default_data_root(cache_dir))
        return create_dataset(self.dataset, split, root, self.image_size, self.max_images, tuple(self.pool),
                              cache_dir)
