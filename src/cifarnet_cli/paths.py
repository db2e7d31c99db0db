"""Where cifarnet keeps its files: runs, datasets, caches and the torch hub.

Everything lives under the user's platform directories (platformdirs) unless ``CIFARNET_HOME`` moves
the runs and datasets, or ``CIFARNET_DATA`` / ``CIFARNET_CACHE`` point elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "cifarnet"


def home_dir() -> Path:
    """Root of runs and datasets: ``$CIFARNET_HOME`` or the platform's user data dir."""
    env = os.environ.get("CIFARNET_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir(APP_NAME))


def runs_dir() -> Path:
    return home_dir() / "runs"


def datasets_dir() -> Path:
    return home_dir() / "datasets"


def default_data_dir() -> Path:
    """Default CIFAR-10 location: ``$CIFARNET_DATA``, else ``<home>/datasets/cifar10``."""
    env = os.environ.get("CIFARNET_DATA")
    return Path(env).expanduser() if env else datasets_dir() / "cifar10"


def cache_dir() -> Path:
    """Decoded image-folder caches: ``$CIFARNET_CACHE``, else the platform's user cache dir."""
    env = os.environ.get("CIFARNET_CACHE")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir(APP_NAME))


def torch_hub_checkpoints_dir() -> Path:
    """The folder torchvision downloads weights to, so both tools reuse each other's files."""
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home:
        base = Path(torch_home).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "torch"
    return base / "hub" / "checkpoints"
