"""Image data sets: the built-in digits, the benchmark formats, .npz files and image folders, each
loaded into one uint8 (N, C, H, W) ImageDataset (scan.data.datasets), plus the splits and summary
a run records (scan.data.splits)."""
# importing the loaders registers them in DATASETS (formats: digits, IDX, CIFAR, STL-10, npz; folders)
from scan.data import folders, formats  # noqa: F401
from scan.data.datasets import (
                                DATASETS,
                                DataError,
                                FolderOptions,
                                ImageDataset,
                                LoadRequest,
                                content_hash,
                                detect_format,
                                existing_path,
                                has_splits,
                                list_datasets,
                                load_dataset,
                                read_uint8,
                                register_dataset,
                                require_dir,
                                split_parts,
)
from scan.data.folders import DEFAULT_IMAGE_SIZE, LazyImages, imagenet_subsets, read_class_list
from scan.data.formats import FASHION_MNIST_PATH, MNIST_PATH, idx_file
from scan.data.splits import channel_stats, describe_data, load_data, load_split

__all__ = ["DATASETS", "DEFAULT_IMAGE_SIZE", "DataError", "FASHION_MNIST_PATH", "FolderOptions", "ImageDataset",
           "LazyImages", "LoadRequest", "MNIST_PATH", "channel_stats", "content_hash", "describe_data", "detect_format",
           "existing_path", "has_splits", "idx_file", "imagenet_subsets", "list_datasets", "load_data", "load_dataset",
           "load_split", "read_class_list", "read_uint8", "register_dataset", "require_dir", "split_parts"]
