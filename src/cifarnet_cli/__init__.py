"""cifarnet: train, evaluate, fine-tune, run and export CIFAR-10 classifiers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cifarnet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
