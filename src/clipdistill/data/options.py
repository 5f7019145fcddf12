"""The data flags shared by every job that reads a dataset (embed, teacher-eval, train)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..core.config import check, option
from .datasets import DATASETS, create_dataset, default_data_root
from .protocol import ImageDataset
from .prompts import read_prompt_file, read_templates


@dataclasses.dataclass
class DataOptions:
    """Which dataset and where its files are."""

    dataset: str = option("shapes10", "stl10, shapes10 (offline synthetic) or folder", metavar="NAME")
    data_root: Optional[str] = option(None, "dataset files (stl10: the folder holding stl10_binary/; folder: the "
                                            "image folder); default: CACHE_DIR/data", metavar="DIR")
    image_size: int = option(32, "shapes10 only: side of the generated images in pixels (STL10 is 96)")
    max_images: int = option(0, "use only the first N images of each split (0 = all): quick trials")
    pool: list[str] = option(default_factory=list, help="folder dataset: unlabeled pools, comma-separated: any trees of "
                                                        "images (sub-folders never mean classes) or tar shards "
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
        check(self.image_size >= 8, "image_size", "must be >= 8 pixels")
        check(self.max_images >= 0, "max_images", "must be >= 0 (0 = all)")
        if self.prompts is not None:
            read_prompt_file(self.prompts)
        read_templates(self.templates)

    def open_split(self, split: str, cache_dir: str) -> ImageDataset:
        """One split of the configured dataset. A folder dataset given only --pool has no
        data root (its test split is then missing, not read from the cache folder)."""
        root = self.data_root or ("" if self.pool else default_data_root(cache_dir))
        return create_dataset(self.dataset, split, root, self.image_size, self.max_images, tuple(self.pool),
                              cache_dir)
