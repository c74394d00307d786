"""Pure-function models, each declaring its unit groups."""

from jaxprune.models.base import Model, activation_fn
from jaxprune.models.cnn import CNN4, LeNet
from jaxprune.models.mlp import MLP, Autoencoder
