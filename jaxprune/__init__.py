"""jaxprune: functional pruning of neural networks in JAX.

Models are pure functions over parameter pytrees whose prunable *unit groups* are declared (the
built-in models) or traced from the computation (:func:`trace`, for any JAX function); masks are
pytrees; pruners are jit-compiled transforms.
"""

from jaxprune import ga
from jaxprune import pruners
from jaxprune import units
from jaxprune import validate
from jaxprune.checkpoint import load_checkpoint
from jaxprune.checkpoint import save_checkpoint
from jaxprune.flops import flops_report
from jaxprune.flops import format_flops
from jaxprune.masks import apply_masks
from jaxprune.masks import check_unit_masks
from jaxprune.masks import check_weight_masks
from jaxprune.masks import count_units
from jaxprune.masks import count_weights
from jaxprune.masks import expand
from jaxprune.masks import ones_like
from jaxprune.masks import print_summary
from jaxprune.masks import sparsity
from jaxprune.masks import summary
from jaxprune.masks import unit_masks_ones
from jaxprune.models import CNN4
from jaxprune.models import LeNet
from jaxprune.models import MLP
from jaxprune.models import Autoencoder
from jaxprune.models import Model
from jaxprune.models import ResNet18
from jaxprune.models import load_resnet18
from jaxprune.models import save_resnet18
from jaxprune.optax_pruning import MaskedState
from jaxprune.optax_pruning import PruningState
from jaxprune.optax_pruning import StepPruner
from jaxprune.optax_pruning import block_prune
from jaxprune.optax_pruning import distinctiveness_pruner
from jaxprune.optax_pruning import erk_sparsity
from jaxprune.optax_pruning import gradual
from jaxprune.optax_pruning import importance_pruner
from jaxprune.optax_pruning import keep_masked
from jaxprune.optax_pruning import magnitude_scores
from jaxprune.optax_pruning import masked_optimizer
from jaxprune.optax_pruning import masks_of
from jaxprune.optax_pruning import nm_prune
from jaxprune.optax_pruning import polynomial_sparsity
from jaxprune.optax_pruning import prune_to_sparsity
from jaxprune.optax_pruning import replace_masks
from jaxprune.optax_pruning import saliency_scores
from jaxprune.optax_pruning import scheduled
from jaxprune.optax_pruning import snip_scores
from jaxprune.optax_pruning import uniform_sparsity
from jaxprune.optax_pruning import unit_masks_of
from jaxprune.optax_pruning import unstructured_pruner
from jaxprune.pruners import distinctiveness
from jaxprune.pruners import group_redundancy
from jaxprune.pruners import importance_prune
from jaxprune.pruners import importance_scores
from jaxprune.pruners import iterative_importance
from jaxprune.pruners import magnitude_prune
from jaxprune.pruners import progressive_distinctiveness
from jaxprune.pruners import random_prune
from jaxprune.pruners import until_stable
from jaxprune.pruners import weight_distinctiveness
from jaxprune.tracing import TracedTarget
from jaxprune.tracing import TraceError
from jaxprune.tracing import trace
from jaxprune.units import Slice
from jaxprune.units import UnitGroup
from jaxprune.units import check_group
from jaxprune.units import check_groups
from jaxprune.units import compact
from jaxprune.units import redistribute
from jaxprune.units import uncompact

__version__ = "0.1.0"
from jaxprune.train import Trainer
from jaxprune.train import accuracy
from jaxprune.train import evaluate
from jaxprune.train import evaluate_many
from jaxprune.train import fit
from jaxprune.train import fit_many
from jaxprune.train import make_trainer
from jaxprune.train import rewind


def __getattr__(name):
  # ``jaxprune.data`` pulls in scikit-learn; import it on first use to keep ``import jaxprune``
  # light for library users.
  if name == "data":
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module("jaxprune.data")
  raise AttributeError(f"module 'jaxprune' has no attribute {name!r}")
