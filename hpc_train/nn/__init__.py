"""Neural-network layers with explicit forward/backward on numpy or cupy arrays."""

from .layers import GELU, BatchNorm, Conv2d, Dropout, Embedding, Flatten, LayerNorm, Linear, MaxPool2d, ReLU
from .losses import SoftmaxCrossEntropy, accuracy
from .models import ACTIVATIONS, MODELS, cnn, cnn_parameters, mlp, mlp_parameters
from .module import Module, Parameter, Sequential
from .trainable import Classifier, TrainableModel

__all__ = [
    "ACTIVATIONS", "MODELS", "GELU", "BatchNorm", "Classifier", "Conv2d", "Dropout", "Embedding", "Flatten",
    "LayerNorm", "Linear", "MaxPool2d", "Module", "Parameter", "ReLU", "Sequential", "SoftmaxCrossEntropy",
    "TrainableModel", "accuracy", "cnn", "cnn_parameters", "mlp", "mlp_parameters",
]
