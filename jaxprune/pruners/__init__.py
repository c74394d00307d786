"""Pruners: jit-compiled transforms ``(params, masks, ...) -> (params, masks, report)``."""

from jaxprune.pruners.angles import pairwise_angles
from jaxprune.pruners.angles import weight_angles
from jaxprune.pruners.distinctiveness_pruning import StableReport
from jaxprune.pruners.distinctiveness_pruning import distinctiveness
from jaxprune.pruners.distinctiveness_pruning import until_stable
from jaxprune.pruners.distinctiveness_pruning import weight_distinctiveness
from jaxprune.pruners.progressive import ProgressiveReport
from jaxprune.pruners.progressive import progressive_distinctiveness
from jaxprune.pruners.selection import SweepReport
from jaxprune.pruners.selection import report_actions
from jaxprune.pruners.importance import ImportanceReport
from jaxprune.pruners.importance import IterativeReport
from jaxprune.pruners.importance import importance_prune
from jaxprune.pruners.importance import importance_scores
from jaxprune.pruners.importance import iterative_importance
from jaxprune.pruners.magnitude import MagnitudeReport
from jaxprune.pruners.magnitude import magnitude_prune
from jaxprune.pruners.magnitude import random_prune
from jaxprune.pruners.magnitude import select_leaves
from jaxprune.pruners.redundancy import RedundancyReport
from jaxprune.pruners.redundancy import group_redundancy
