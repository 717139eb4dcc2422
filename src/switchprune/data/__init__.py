"""Dataset preparation, loading and streaming.

:func:`prepare_data` turns a dataset into train/val/test splits plus ``meta.json``
(:class:`DataMeta`), in a directory it replaces whole or not at all (:mod:`.prepared`, which
also reads the splits back). The datasets: ``digits`` (:mod:`.digits`), ``idx`` (:mod:`.idx`),
those torchvision reads (:mod:`.torchvision_sets`) and ``folder`` (:mod:`.folder`);
:mod:`.split` draws the splits, :mod:`.batches` streams and augments batches.

Every failure caused by the data itself (missing files, a corrupt IDX file or image, an image
above ``data.max_image_pixels``, a class too small for the splits, a failed download) is
reported as a single :class:`DataError` with a one-line message.
"""

from switchprune.data.batches import (
    FLIP_SAFE,
    MEMORY_LOADER_MAX_BYTES,
    Augmentation,
    TrainingData,
    augment_batch,
    augmentation,
    batch_loader,
    iter_batches,
    shard,
    split_shard,
    use_streaming,
)
from switchprune.data.digits import export_digits
from switchprune.data.idx import read_idx
from switchprune.data.meta import (
    BUNDLED,
    DATASETS,
    META_FILE,
    PREPARED_FILES,
    SPLITS,
    DataError,
    DataMeta,
    load_meta,
)
from switchprune.data.prepared import (
    PreparedSplit,
    load_split,
    open_split,
    prepare_data,
    raw_images,
    source_dir,
)
from switchprune.data.split import check_class_sizes, check_labels, shuffled

__all__ = [
    "FLIP_SAFE",
    "MEMORY_LOADER_MAX_BYTES",
    "Augmentation",
    "TrainingData",
    "augment_batch",
    "augmentation",
    "batch_loader",
    "iter_batches",
    "shard",
    "split_shard",
    "use_streaming",
    "export_digits",
    "read_idx",
    "BUNDLED",
    "DATASETS",
    "META_FILE",
    "PREPARED_FILES",
    "SPLITS",
    "DataError",
    "DataMeta",
    "load_meta",
    "PreparedSplit",
    "load_split",
    "open_split",
    "prepare_data",
    "raw_images",
    "source_dir",
    "check_class_sizes",
    "check_labels",
    "shuffled",
]
