"""Data: class names and aliases, image decoding, local CIFAR-10 sources, the split, the device loader."""
