"""Pruners: jit-compiled transforms ``(params, masks, ...) -> (params, masks, report)``."""

from jaxprune.pruners.distinctiveness import ProgressiveReport
from jaxprune.pruners.distinctiveness import SweepReport
from jaxprune.pruners.distinctiveness import distinctiveness
from jaxprune.pruners.distinctiveness import pairwise_angles
from jaxprune.pruners.distinctiveness import progressive_distinctiveness
from jaxprune.pruners.distinctiveness import report_actions
from jaxprune.pruners.distinctiveness import weight_distinctiveness
