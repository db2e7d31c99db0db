"""Checkpoints: plain dicts written atomically and read back with ``weights_only=True``, and validated
here, once, before any command uses them (evaluate, predict, export, resume, --weights).

A checkpoint written by cifarnet holds ``model`` (a state dict), ``config`` (``asdict(TrainConfig)``),
``meta`` (architecture, its arguments, class names, where the data came from) and, for ``last.pt``, the
optimizer, schedule and random state to resume from. A hand-edited or foreign file is refused with a
sentence that says what is missing, instead of a KeyError, an AttributeError or an IndexError later.
"""

from __future__ import annotations

import pickle
import reprlib
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cifarnet_cli import fileio
from cifarnet_cli.errors import CifarNetError, first_line

if TYPE_CHECKING:
    from cifarnet_cli.models import Classifier

CHECKPOINT_VERSION = 1


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write through a temporary file in the same folder, then rename (fileio.atomic_writer): a crash,
    Ctrl-C or a full disk leaves the old checkpoint or the new one, never half of one, and a failure
    to write is one CifarNetError naming the file and the problem."""
    with fileio.atomic_writer(path) as fh:
        torch.save(obj, fh)


def _display(path: Path) -> str:
    return fileio.display(path)


_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)


def _globals_in(stream: Any) -> list[str]:
    """The ``module.name`` of every class or function one pickle in ``stream`` would import, read with
    pickletools (nothing is executed). Raises ValueError (or EOFError) for bytes that are not a pickle."""
    import pickletools

    found: list[str] = []
    recent: list[str] = []  # the last strings pushed, for STACK_GLOBAL (protocol 4+)
    memo: dict[Any, str] = {}
    for op, arg, _pos in pickletools.genops(stream):
        name = op.name
        if name == "GLOBAL" or name == "INST":
            found.append(str(arg).replace(" ", "."))
        elif name == "STACK_GLOBAL" and len(recent) >= 2:
            found.append(f"{recent[-2]}.{recent[-1]}")
        elif name in _STRING_OPS:
            recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
        elif name in ("BINPUT", "LONG_BINPUT", "PUT") and recent:
            memo[arg] = recent[-1]
        elif name == "MEMOIZE" and recent:
            memo[len(memo)] = recent[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
            recent.append(memo[arg])
        if name == "STOP":
            break
    return found


def _pickled_globals(path: Path) -> list[str]:
    """The globals the pickle of a checkpoint names: ``*/data.pkl`` of a zip checkpoint, or the first four
    pickles of a legacy file (magic number, protocol, system info, the object)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                raise ValueError("no data.pkl")
            with archive.open(name) as fh:
                return _globals_in(fh)
    with open(path, "rb") as fh:
        return [g for _ in range(4) for g in _globals_in(fh)]


def _allowed_globals() -> set[str]:
    """What torch's weights-only unpickler builds (its own private list where this torch has one, which
    differs between versions, plus the user-registered safe globals)."""
    allowed: set[str] = set()
    try:
        from torch import _weights_only_unpickler as unpickler

        allowed.update(getattr(unpickler, "_get_allowed_globals", dict)().keys())
    except ImportError:  # pragma: no cover - a torch without the module
        pass
    for entry in getattr(torch.serialization, "get_safe_globals", list)():
        obj = entry[0] if isinstance(entry, tuple) else entry
        allowed.add(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}")
    return allowed


def _refusal(path: Path) -> CifarNetError:
    """torch.load(weights_only=True) raised UnpicklingError: the one type every torch version (2.0 to 2.14)
    raises both for an object it refuses to build and for bytes that are no pickle, each with its own
    wording. Which of the two it was is read from the file itself: a pickle that parses but names a class
    or function torch does not allow is a refusal (named), anything else is damage."""
    try:
        names = _pickled_globals(path)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, RuntimeError):
        return CifarNetError(f"{_display(path)} is not a readable checkpoint (its pickled contents are damaged).")
    allowed = _allowed_globals()
    foreign = [n for n in names if n not in allowed and n.split(".")[0] not in ("torch", "collections")]
    foreign = foreign or [n for n in names if n not in allowed]
    holding = f" (it holds {foreign[0]})" if foreign else ""
    return CifarNetError(
        f"{_display(path)} contains code or Python objects that cifarnet will not load{holding}: "
        "a cifarnet checkpoint holds only tensors and plain values. Load only files from sources you trust."
    )


def _refuse_exports(path: Path) -> None:
    """An exported model (ONNX, TensorRT, TorchScript) where a checkpoint is expected: say what it is and
    what takes it, instead of torch's weights-only advice."""
    from cifarnet_cli.runtime import is_exported

    if is_exported(path):
        kind = "an exported model (ONNX or TensorRT)"
        use = f"predict and evaluate run it with --model {_display(path)}"
    else:
        try:
            with zipfile.ZipFile(path) as archive:
                torchscript = any(name.endswith("/constants.pkl") for name in archive.namelist())
        except (OSError, zipfile.BadZipFile):
            return
        if not torchscript:
            return
        kind = "a TorchScript export (for libtorch and C++)"
        use = "predict and evaluate take the run's checkpoint or its ONNX export"
    raise CifarNetError(
        f"{_display(path)} is {kind}, not a checkpoint: {use}; export and --init-from need the run's checkpoint "
        "(best.pt)."
    )


#: File signatures of what users hand over by mistake where a checkpoint belongs.
_FOREIGN = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"{", "a JSON file"),
)


def _refuse_foreign(path: Path) -> None:
    """A PyTorch checkpoint is a zip archive (torch.save since 1.6) or a pickle (older files, first byte
    0x80); anything else is named for what it is, instead of torch's page of advice about weights_only."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return
    kind = next((name for magic, name in _FOREIGN if head.startswith(magic)), "not a PyTorch file")
    raise CifarNetError(
        f"{_display(path)} is not a checkpoint ({kind}): give a run name or its best.pt/last.pt (exported .onnx "
        "and .engine files go to predict/evaluate --model)."
    )


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint (or a plain state dict) safely; unreadable files end in one clear error."""
    try:
        if not path.is_file():
            raise CifarNetError(f"No checkpoint at {_display(path)}.")
        _refuse_exports(path)
        _refuse_foreign(path)
        with warnings.catch_warnings():  # torch warns before some refusals; the refusal is worded below
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except CifarNetError:
        raise
    except OSError as exc:
        raise fileio.os_error(exc, path, "read") from exc
    except pickle.UnpicklingError as exc:  # torch's words are a page of advice about weights_only
        raise _refusal(path) from exc
    except Exception as exc:  # noqa: BLE001 - any failure of torch.load means a damaged or foreign file
        raise CifarNetError(f"{_display(path)} is not a readable checkpoint ({first_line(exc, 200)}).") from exc
    if not isinstance(obj, dict):
        raise CifarNetError(f"{_display(path)} does not hold a checkpoint dictionary.")
    return obj


# --------------------------------------------------------------------------------------------------
# Validation


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def state_dict_of(obj: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """``obj`` itself as a state dict (a torchvision weights file), or a clear refusal."""
    if not _is_state_dict(obj):
        raise CifarNetError(
            f"{_display(path)} is neither a cifarnet checkpoint nor a state dict (names mapped to tensors)."
        )
    return obj


@dataclass(frozen=True)
class ModelCheckpoint:
    """A checkpoint that passed validation: everything evaluate, predict and export need."""

    path: Path
    arch: str
    model_kwargs: dict[str, Any]
    classes: tuple[str, ...]
    state: dict[str, torch.Tensor]
    meta: dict[str, Any]
    config: dict[str, Any] | None
    completed_epochs: int | None  # None when the file does not say (a foreign or older checkpoint)
    raw: dict[str, Any]

    @property
    def untrained(self) -> bool:
        return self.completed_epochs == 0

    def untrained_notice(self) -> str | None:
        """What to tell a user who named this checkpoint explicitly although no epoch completed."""
        if not self.untrained:
            return None
        return (
            f"{_display(self.path)} has no completed epoch: its weights are the random initialization, so its "
            "predictions mean nothing. Train (or resume) the run for at least one epoch."
        )


def _completed_epochs(obj: dict[str, Any]) -> int | None:
    fit_state = obj.get("fit_state")
    epoch = fit_state.get("epoch") if isinstance(fit_state, dict) else obj.get("epoch")
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0 else None


def validate_model(obj: dict[str, Any], path: Path) -> ModelCheckpoint:
    """Check that ``obj`` is a cifarnet checkpoint whose model can be built and used; say what is wrong."""
    from cifarnet_cli.models import list_models  # the registry (and torchvision) only when a model is read

    where = _display(path)
    if "model" not in obj or "meta" not in obj:
        raise CifarNetError(f"{where} is not a cifarnet checkpoint (no model/meta); pass a run's best.pt or last.pt.")
    if not _is_state_dict(obj["model"]):
        raise CifarNetError(f"{where}: 'model' is not a state dict (names mapped to tensors); the file is damaged.")
    meta = obj["meta"]
    if not isinstance(meta, dict):
        raise CifarNetError(f"{where}: 'meta' is not a dictionary; the file is damaged or was edited by hand.")
    arch = meta.get("arch")
    if not isinstance(arch, str) or arch not in list_models():
        what = "names no architecture" if arch is None else f"names an unknown architecture {arch!r}"
        raise CifarNetError(f"{where} {what}; cifarnet knows: {', '.join(list_models())}.")
    kwargs = meta.get("model_kwargs", {})
    if not isinstance(kwargs, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0 for k, v in kwargs.items()
    ):
        raise CifarNetError(f"{where}: 'model_kwargs' must map argument names to positive integers.")
    classes = meta.get("classes")
    if (
        not isinstance(classes, list | tuple)
        or not classes
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise CifarNetError(f"{where}: 'classes' must be a list of distinct class names.")
    outputs = kwargs.get("num_classes", len(classes))
    if outputs != len(classes):
        raise CifarNetError(
            f"{where} names {len(classes)} classes for a model with {outputs} outputs; the file is damaged "
            "or was edited by hand."
        )
    _check_meta_values(meta, where)
    config = obj.get("config")
    return ModelCheckpoint(
        path,
        arch,
        dict(kwargs),
        tuple(classes),
        obj["model"],
        meta,
        config if isinstance(config, dict) else None,
        _completed_epochs(obj),
        obj,
    )


#: meta entries evaluate and predict compute with, and what each must be (None: absent or unset).
_META_TEXT = ("data_kind", "data_location", "data_fingerprint", "eval_split", "precision")
_META_COUNTS = ("val_split", "split_seed")


def _check_meta_values(meta: dict[str, Any], where: str) -> None:
    """The meta entries used to size inputs and recompute splits: an edited value ("lots", 0, 30000) is
    refused here, in words, instead of a ValueError in the middle of an evaluation."""
    from cifarnet_cli.data.images import IMAGE_SIZE, MAX_INPUT_SIZE, MIN_INPUT_SIZE, valid_input_size

    size = meta.get("input_size", IMAGE_SIZE)
    if not valid_input_size(size):
        raise CifarNetError(
            f"{where}: 'input_size' is {reprlib.repr(size)}, not a whole number of pixels from {MIN_INPUT_SIZE} to "
            f"{MAX_INPUT_SIZE}; the file is damaged or was edited by hand."
        )
    for key in _META_COUNTS:
        value = meta.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise CifarNetError(
                f"{where}: {key!r} is {reprlib.repr(value)}, not a whole number of at least 0; the file is damaged or was "
                "edited by hand."
            )
    for key in _META_TEXT:
        value = meta.get(key)
        if value is not None and not isinstance(value, str):
            raise CifarNetError(
                f"{where}: {key!r} is {reprlib.repr(value)}, not text; the file is damaged or was edited by hand."
            )


def read_model(path: Path, map_location: str | torch.device = "cpu") -> ModelCheckpoint:
    """Load and validate the checkpoint at ``path``."""
    return validate_model(load(path, map_location), path)


def build_model(ckpt: ModelCheckpoint) -> Classifier:
    """The checkpoint's model with its weights, loaded strictly; its head must fit the class names."""
    from cifarnet_cli.models import get_model

    try:
        model = get_model(ckpt.arch, **ckpt.model_kwargs)
    except (TypeError, ValueError) as exc:
        raise CifarNetError(
            f"{_display(ckpt.path)}: {ckpt.arch} cannot be built with {ckpt.model_kwargs} ({exc})."
        ) from exc
    load_state_strict(model, strip_prefixes(ckpt.state), _display(ckpt.path))
    outputs = model.get_classifier().out_features
    if outputs != len(ckpt.classes):
        raise CifarNetError(
            f"{_display(ckpt.path)} names {len(ckpt.classes)} classes for a model with {outputs} outputs; "
            "the file is damaged or was edited by hand."
        )
    return model


_FIT_STATE_NUMBERS = ("epoch", "best_accuracy", "train_images", "train_seconds")


def validate_resumable(obj: dict[str, Any], path: Path) -> None:
    """Check what `train --resume` reads besides the model: optimizer, schedule, progress, recipe."""
    where = _display(path)
    missing = [k for k in ("model", "optimizer", "scheduler", "fit_state", "config") if k not in obj]
    if missing:
        raise CifarNetError(
            f"{where} is not a resumable checkpoint (no {', '.join(missing)}); resume from a run's last.pt."
        )
    if not _is_state_dict(obj["model"]):
        raise CifarNetError(f"{where}: 'model' is not a state dict (names mapped to tensors); the file is damaged.")
    for key in ("optimizer", "scheduler", "config"):
        if not isinstance(obj[key], dict):
            raise CifarNetError(f"{where}: {key!r} is not a dictionary; the file is damaged or was edited by hand.")
    fit_state = obj["fit_state"]
    if not isinstance(fit_state, dict) or not all(
        isinstance(fit_state.get(k), int | float) and not isinstance(fit_state.get(k), bool) for k in _FIT_STATE_NUMBERS
    ):
        raise CifarNetError(f"{where}: 'fit_state' lacks the epoch count and progress; the file is damaged.")
    if _completed_epochs(obj) is None:
        raise CifarNetError(f"{where}: the completed epoch count is not a whole number; the file is damaged.")


def is_cifarnet_checkpoint(obj: dict[str, Any]) -> bool:
    """Written by cifarnet (as opposed to a plain state dict): validate it with :func:`validate_model`."""
    return "model" in obj and ("meta" in obj or "config" in obj)


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) key prefixes."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` whose failure names the keys, and shape mismatches, briefly."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)}≠{tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {show(mismatched)}")
        raise CifarNetError(f"{what} does not fit this model: {'; '.join(parts)}.")
    module.load_state_dict(state, strict=True)
