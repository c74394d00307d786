"""Data: bundled stand-ins (no download), SFEW loaders, splits, augmentation.

The TFDS builder for SFEW lives in `jaxprune.data.sfew_tfds`; importing that
module registers it (it is not imported here, to keep TFDS optional at import
time).

Example:
  >>> from jaxprune import data
  >>> ds = data.load("features")
  >>> train, test = data.train_test_split(ds, test_fraction=0.2, seed=0)
  >>> train, test, scaler = data.standardize_split(train, test)
  >>> train.x.shape, test.x.shape
  ((353, 10), (89, 10))
"""

from jaxprune.data import features
from jaxprune.data.augmentation import augment
from jaxprune.data.augmentation import augment_image
from jaxprune.data.bundled import load_features
from jaxprune.data.bundled import load_images
from jaxprune.data.bundled import resize_images
from jaxprune.data.catalog import NAMES
from jaxprune.data.catalog import load
from jaxprune.data.dataset import PER_ROW_INFO
from jaxprune.data.dataset import SFEW_CLASS_NAMES
from jaxprune.data.dataset import Dataset
from jaxprune.data.dataset import split
from jaxprune.data.scaling import Standardizer
from jaxprune.data.scaling import fit_standardizer
from jaxprune.data.scaling import standardize
from jaxprune.data.scaling import standardize_split
from jaxprune.data.sfew import FEATURE_BLOCKS
from jaxprune.data.sfew import load_sfew_features
from jaxprune.data.sfew import load_sfew_images
from jaxprune.data.sfew import parse_label
from jaxprune.data.sfew import person_id
from jaxprune.data.splits import CrossValidation
from jaxprune.data.splits import cross_validate
from jaxprune.data.splits import kfold
from jaxprune.data.splits import person_test_fraction
from jaxprune.data.splits import train_test_split

__all__ = [
    "FEATURE_BLOCKS",
    "NAMES",
    "PER_ROW_INFO",
    "SFEW_CLASS_NAMES",
    "CrossValidation",
    "Dataset",
    "Standardizer",
    "augment",
    "augment_image",
    "cross_validate",
    "features",
    "fit_standardizer",
    "kfold",
    "load",
    "load_features",
    "load_images",
    "load_sfew_features",
    "load_sfew_images",
    "parse_label",
    "person_id",
    "person_test_fraction",
    "resize_images",
    "split",
    "standardize",
    "standardize_split",
    "train_test_split",
]
