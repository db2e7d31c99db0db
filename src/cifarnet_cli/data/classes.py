"""CIFAR-10 class names, and matching folder names (with common aliases) onto a model's classes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# Names other data sets use for the same classes (PASCAL VOC says aeroplane/car, ImageNet-style sets use
# plurals). "motorbike", "bus", "person" ... are deliberately absent: they are not CIFAR-10 classes and must
# be reported as unknown rather than folded into automobile or truck.
_ALIASES: dict[str, str] = {
    "aeroplane": "airplane",
    "plane": "airplane",
    "aircraft": "airplane",
    "jet": "airplane",
    "car": "automobile",
    "auto": "automobile",
    "boat": "ship",
    "lorry": "truck",
    "kitten": "cat",
    "puppy": "dog",
    "toad": "frog",
    "pony": "horse",
}


def canonical_name(name: str) -> str:
    """Lower-case, strip separators and a plural "s" / "es"; map aliases to CIFAR-10 names."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = key.split("_", 1)[1] if key[:1].isdigit() and "_" in key else key  # "0_airplane" → "airplane"
    candidates = [key]
    if key.endswith("es"):
        candidates.append(key[:-2])
    if key.endswith("s"):
        candidates.append(key[:-1])
    for cand in candidates:
        if cand in CIFAR10_CLASSES:
            return cand
        if cand in _ALIASES:
            return _ALIASES[cand]
    return key


def match_classes(folder_names: Iterable[str], classes: Sequence[str]) -> tuple[dict[str, int], list[str]]:
    """Map folder names onto indices of ``classes``; return (mapping, names that match no class)."""
    index = {canonical_name(c): i for i, c in enumerate(classes)}
    mapping: dict[str, int] = {}
    unknown: list[str] = []
    for name in folder_names:
        key = canonical_name(name)
        if key in index:
            mapping[name] = index[key]
        else:
            unknown.append(name)
    return mapping, unknown


def classes_for_folders(folder_names: Sequence[str]) -> tuple[str, ...]:
    """The class list a training set of these folders gets: CIFAR-10's standard order when every folder
    is a CIFAR-10 class (or alias), otherwise the sorted folder names (a custom data set)."""
    _mapping, unknown = match_classes(folder_names, CIFAR10_CLASSES)
    if not unknown:
        return CIFAR10_CLASSES
    return tuple(sorted(folder_names))
