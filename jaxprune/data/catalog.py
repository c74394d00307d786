"""`load`: one entry point from a dataset name (an experiment's ``--data`` flag)."""

from __future__ import annotations

import os
from typing import Any

from jaxprune.data.bundled import load_features, load_images
from jaxprune.data.dataset import Dataset
from jaxprune.data.sfew import load_sfew_features, load_sfew_images

__all__ = ["NAMES", "load"]

#: Names accepted by `load`.
NAMES: tuple[str, ...] = (
    "features",
    "digits_features",
    "images",
    "sfew_features",
    "sfew_images",
)

_NEEDS_PATH = ("sfew_features", "sfew_images")


def load(name: str, *, path: str | os.PathLike | None = None, **kwargs: Any) -> Dataset:
  """Loads a dataset by name.

  * ``'features'``: the bundled diabetes features (`load_features`).
  * ``'digits_features'``: the bundled digits features (`load_features`).
  * ``'images'``: the bundled digits images (`load_images`; pass ``size`` and
    ``channels``).
  * ``'sfew_features'``: `load_sfew_features` on ``path`` (SFEW.xlsx/.csv or
    its folder).
  * ``'sfew_images'``: `load_sfew_images` on ``path`` (the class-folder tree;
    pass ``size`` and ``channels``).

  Args:
    name: one of `NAMES`.
    path: where the user's SFEW copy is; required for the ``sfew_*`` names
      (experiments pass their ``--data_path`` flag), ignored otherwise.
    **kwargs: passed on to the loader.

  Returns:
    The `Dataset`.

  Example:
    >>> from jaxprune import data
    >>> data.load("images", size=(16, 16), channels=3).x.shape
    (1264, 16, 16, 3)
  """
  if name not in NAMES:
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(NAMES)}")
  if name in _NEEDS_PATH:
    if path is None:
      raise ValueError(
          f"dataset {name!r} is the user's own SFEW copy: pass its location with"
          " --data_path (path=...): "
          + ("SFEW.xlsx, SFEW.csv or their folder" if name == "sfew_features"
             else "the folder holding Angry/, Disgust/, ... Surprise/")
      )
    if name == "sfew_features":
      return load_sfew_features(path, **kwargs)
    return load_sfew_images(path, **kwargs)
  if name == "features":
    return load_features("diabetes", **kwargs)
  if name == "digits_features":
    return load_features("digits", **kwargs)
  return load_images("digits", **kwargs)
