"""Pure-function models, each declaring its unit groups."""

from jaxprune.models.base import Model, activation_fn
from jaxprune.models.cnn import CNN4, LeNet
from jaxprune.models.mlp import MLP, Autoencoder
from jaxprune.models.resnet import ResNet18, load_resnet18, save_resnet18
