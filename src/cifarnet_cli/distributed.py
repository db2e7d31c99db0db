"""Several processes training one run with torch.distributed, as torchrun (torch.distributed.run) starts them.

torchrun tells each process its place through the environment: RANK and WORLD_SIZE (over all nodes),
LOCAL_RANK and LOCAL_WORLD_SIZE (on this node), MASTER_ADDR/MASTER_PORT (its store), TORCHELASTIC_RUN_ID.
:func:`session` joins the process group from that environment (NCCL for CUDA tensors, gloo for CPU tensors,
as torchvision's reference ``init_distributed_mode`` does) and always leaves it again.

The rest is what the processes must agree on, so that none of them waits in a collective the others never
reach: sums of metrics, one process's decision (:func:`from_main`), errors met while setting up
(:func:`agree`), a stop requested by a signal (exchanged at fixed optimizer steps), and the arithmetic that
cuts an epoch's micro-batches between the processes so that they are exactly those of one process.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import Any, TypeVar

import torch

from cifarnet_cli import interrupts
from cifarnet_cli.errors import CifarNetError, UsageError

T = TypeVar("T")

#: Seconds a process waits in a collective for the others before it gives up (a rank that died, a node that
#: hangs). It also bounds the set-up: the other processes wait while the first on each node decodes an image
#: folder or downloads CIFAR-10, which takes minutes on a slow disk or network. PyTorch's own default for
#: gloo is 30 minutes; NCCL's is 10.
TIMEOUT_ENV = "CIFARNET_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0

NO_DISTRIBUTED = (
    "this torch build has no distributed support (torch.distributed.is_available() is False, as in NVIDIA's "
    "Jetson wheels): train on one device"
)


@dataclass(frozen=True)
class World:
    """This process's place among the processes training one run (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.local_size))


_current = World()
_initialised = False  # a process group was joined in this process (errors before that are the same everywhere)


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise CifarNetError(f"{name} is not set; start the processes with torchrun.")
        return default
    try:
        return int(value)
    except ValueError:
        raise CifarNetError(f"{name}={value!r} is not a number (torchrun sets it).") from None


def launched_by_torchrun() -> bool:
    """torchrun (or another launcher that sets its variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_world() -> World:
    """The world torchrun's environment describes; one process when it is not there."""
    if not launched_by_torchrun():
        return World()
    from cifarnet_cli import launch

    launch.check_torchrun_env()
    size = _env_int("WORLD_SIZE")
    return World(
        rank=_env_int("RANK"),
        size=size,
        local_rank=_env_int("LOCAL_RANK", 0),
        local_size=_env_int("LOCAL_WORLD_SIZE", size),
    )


def current() -> World:
    return _current


def is_main_process() -> bool:
    """Rank 0, the one process that prints, draws and writes the run's files (also before :func:`session`)."""
    return (_current if _initialised else env_world()).rank == 0


def timeout_seconds() -> float:
    """The collective timeout: $CIFARNET_DIST_TIMEOUT seconds, else :data:`DEFAULT_TIMEOUT_S`."""
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds above 0, e.g. 600.")
    return value


def check_available() -> None:
    if not torch.distributed.is_available():
        raise UsageError(f"Several processes need torch.distributed, but {NO_DISTRIBUTED}.")


# --------------------------------------------------------------------------------------------------
# The process group


@contextmanager
def session() -> Iterator[World]:
    """Join the process group torchrun's environment describes (nothing to join for one process), with stop
    signals held for the processes to agree on (:class:`StopRequests`), and leave it on every way out."""
    global _current, _initialised
    world = env_world()
    if world.size <= 1:
        yield world
        return
    check_available()
    import torch.distributed as dist

    # CPU tensors (stop flags, objects) go through gloo, CUDA tensors (gradients, metrics) through NCCL: the
    # control exchanges never wait for the GPU.
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"  # NCCL starts with the first CUDA collective
    try:
        with _signals_end_the_wait():
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_seconds()))
    except (RuntimeError, ValueError) as exc:
        raise CifarNetError(
            f"Could not join the other processes ({_first_line(exc)}); check MASTER_ADDR/--rdzv-endpoint and that "
            "every node can reach it."
        ) from None
    _current, _initialised = world, True
    try:
        with _stops.installed():
            from cifarnet_cli import launch

            launch.register_worker(world.rank, _stops.add_source)
            yield world
    except Exception as exc:
        if is_collective_failure(exc):
            raise mark_agreed(
                PeerLost(
                    f"Lost contact with the other processes of this run: {_lost_reason(exc)}. The run keeps its last "
                    "completed epoch; resume it with --resume once every process can run."
                )
            ) from None
        raise
    finally:
        _current = World()
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving a group whose peers are gone must not hide the real error
            pass


@contextmanager
def _signals_end_the_wait() -> Iterator[None]:
    """Ctrl-C and SIGTERM end the process at once while it waits for the others to join: torch waits in C++
    (up to the collective timeout, 30 minutes) where Python's handlers never run, so a process whose peers
    never come (torchrun's variables set by hand) ignored both for as long. Nothing is open yet to save."""
    with interrupts.stop_signals_to(signal.SIG_DFL):
        yield


def is_collective_failure(exc: BaseException) -> bool:
    """A collective that failed because another process is gone or silent (gloo reports a closed connection
    at once, NCCL and gloo a timeout)."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        words in text
        for words in ("Connection closed by peer", "Connection reset by peer", "Timed out", "NCCL", "Gloo")
    )


def _lost_reason(exc: BaseException) -> str:
    text = str(exc)
    if "closed by peer" in text or "reset by peer" in text:
        return "another process closed its connection (it ended or was killed)"
    if "Timed out" in text or "timed out" in text or "Timeout" in text:
        return f"another process did not answer within {timeout_seconds():g} s (${TIMEOUT_ENV})"
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


# --------------------------------------------------------------------------------------------------
# Stops: a signal on any process becomes one decision of all, taken at the same optimizer step


class AgreedStop(KeyboardInterrupt):
    """Every process stops here, at the same step, because one of them was asked to (Ctrl-C, SIGTERM)."""

    def __init__(self, exit_code: int) -> None:
        super().__init__()
        self.exit_code = exit_code
        self.cifarnet_agreed = True


class StopRequests:
    """SIGINT and SIGTERM under several processes: the first is noted and exchanged with the others at the next
    agreement point (every optimizer step while training); a second one of this process stops it at once."""

    def __init__(self) -> None:
        self.code = 0  # 130 (SIGINT) or 143 (SIGTERM) once asked
        self.signals = 0
        self.extra: Callable[[], int] = lambda: 0  # another source of requests (the launcher's stop file)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signals += 1
        code = 143 if signum == signal.SIGTERM else 130
        if self.signals > 1:
            raise interrupts.Terminated() if code == 143 else KeyboardInterrupt()
        self.code = self.code or code

    def requested(self) -> int:
        if not self.code:
            self.code = self.extra()
        return self.code

    def add_source(self, check: Callable[[], int]) -> None:
        self.extra = check

    @contextmanager
    def installed(self) -> Iterator[None]:
        try:
            with interrupts.stop_signals_to(self._on_signal):
                yield
        finally:
            self.code, self.signals, self.extra = 0, 0, lambda: 0


_stops = StopRequests()


def stops() -> StopRequests:
    return _stops


def exchange(values: Sequence[int]) -> list[int]:
    """The largest of each value over all processes, through gloo on the CPU (no GPU synchronisation)."""
    import torch.distributed as dist

    tensor = torch.tensor(list(values), dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [int(v) for v in tensor.tolist()]


def stop_point() -> None:
    """Raise :class:`AgreedStop` on every process when any of them was asked to stop (a collective: every
    process calls it at the same point)."""
    if _current.size > 1:
        (code,) = exchange([_stops.requested()])
        if code:
            raise AgreedStop(code)


# --------------------------------------------------------------------------------------------------
# Collectives


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor summed over all processes (one collective for all of them, in float64), returned as new
    tensors; with one process, float64 copies."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    if _current.size > 1:
        import torch.distributed as dist

        dist.all_reduce(flat)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (pickled, through gloo)."""
    if _current.size <= 1:
        return obj
    import torch.distributed as dist

    box = [obj if _current.is_main else None]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if _current.size <= 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * _current.size
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------------
# Errors: one decision for all processes


class RelayedError(CifarNetError):
    """The error another process met, raised here too so that every process stops the same way (only rank 0
    prints it)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PeerLost(CifarNetError):
    """A collective failed: another process died or stopped answering within the timeout."""


def mark_agreed(exc: BaseException) -> BaseException:
    """Note that every process raises this same error at the same point (rank 0 alone reports it)."""
    exc.cifarnet_agreed = True  # type: ignore[attr-defined]
    return exc


def is_agreed(exc: BaseException) -> bool:
    """Raised the same way on every process: marked so, or raised before any process group was joined (the
    options are the same everywhere, so is their validation)."""
    return bool(getattr(exc, "cifarnet_agreed", False)) or not _initialised


def describe_error(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, KeyboardInterrupt):
        return "Interrupted.", int(getattr(exc, "exit_code", 130))
    if isinstance(exc, CifarNetError):
        return str(exc), exc.exit_code
    return f"An internal error stopped rank {_current.rank}: {_first_line(exc)}", 1


def _outcome(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    try:
        return fn(), None
    except CifarNetError as exc:
        return None, exc


def agree(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every process, then stop all of them if it failed on any (or one was asked to stop): each
    raises the error of the lowest failing rank (its own, when it failed), so none waits for the others."""
    if _current.size <= 1:
        return fn()
    value, error = _outcome(fn)
    report = (*describe_error(error), type(error).__name__) if error is not None else None
    reports = gather_objects((report, _stops.requested()))
    _raise_first(error, [r for r, _stop in reports])
    code = max(stop for _r, stop in reports)
    if code:
        raise AgreedStop(code)
    return value  # type: ignore[return-value]


def _raise_first(own: BaseException | None, reports: list[Any]) -> None:
    failed = [(rank, r) for rank, r in enumerate(reports) if r is not None]
    if not failed:
        return
    rank, (message, code, _kind) = failed[0]
    if own is not None and rank == _current.rank:
        raise mark_agreed(own)
    where = f"Rank {rank}: " if rank != 0 else ""
    raise mark_agreed(RelayedError(where + message, code))


def leader_first(fn: Callable[[], T]) -> T:
    """``fn`` on the first process of each node, then on the others (which then find its downloads and
    decoded caches), all agreeing on failures as :func:`agree` does."""
    if _current.size <= 1:
        return fn()
    first = _current.local_rank == 0
    value = agree(fn if first else lambda: None)
    later = agree(lambda: None if first else fn())
    return value if first else later  # type: ignore[return-value]


def from_main(fn: Callable[[], T]) -> T:
    """``fn`` on rank 0 alone, and its result (or its error) on every process."""
    if _current.size <= 1:
        return fn()
    value, error = _outcome(fn) if _current.is_main else (None, None)
    report = (*describe_error(error), type(error).__name__) if error is not None else None
    shared = broadcast_object((report, value if error is None else None))
    _raise_first(error, [shared[0]] + [None] * (_current.size - 1))
    return shared[1]


class MainRelay:
    """Rank 0 works alone (opening the run: its lock, its checkpoint) while the others wait for the one
    message it sends: a value, or the error that stopped it. For one process it does nothing."""

    def __init__(self) -> None:
        self.sent = False

    def send(self, value: T) -> T:
        if _current.size > 1 and not self.sent:
            broadcast_object((None, value))
        self.sent = True
        return value

    def __enter__(self) -> MainRelay:
        return self

    def __exit__(self, _type: type | None, exc: BaseException | None, _tb: object) -> None:
        if exc is not None and not self.sent and _current.size > 1 and _current.is_main:
            self.sent = True
            broadcast_object(((*describe_error(exc), type(exc).__name__), None))
            mark_agreed(exc)


def receive_from_main() -> Any:
    """What rank 0's :class:`MainRelay` sent; its error raised here."""
    report, value = broadcast_object(None)
    _raise_first(None, [report] + [None] * (_current.size - 1))
    return value


# --------------------------------------------------------------------------------------------------
# The recipe over several processes


def split_for_world(batch: int, accum: int, world: int, *, given: bool) -> tuple[int, int]:
    """(micro-batch, accumulation) of the one-process recipe that ``world`` processes can share exactly: each
    runs accum / world micro-batches per optimizer step, so micro-batch × accumulation (the effective batch),
    the learning rate and the schedule stay those of one process. A split the user chose (``given``) is kept
    or refused; the default one is re-cut into smaller micro-batches of the same effective batch."""
    if world <= 1 or accum % world == 0:
        return batch, accum
    effective = batch * accum
    fit = next(
        ((b, effective // b) for b in range(batch, 1, -1) if effective % b == 0 and (effective // b) % world == 0), None
    )
    if fit is not None and not given:
        return fit
    if fit is not None:
        b, k = fit
        fix = (
            f"keep it with --batch-size {b} --accum {k} ({k // world} micro-batch(es) of {b} per process and step), "
            f"or use a number of processes that divides {accum}"
        )
    else:
        fix = (
            f"use a number of processes that divides the effective batch ({effective}), or choose another effective "
            f"batch, e.g. --batch-size {batch} --accum {world * -(-accum // world)}"
        )
    return _refuse_split(batch, accum, world, fix)


def _refuse_split(batch: int, accum: int, world: int, fix: str) -> tuple[int, int]:
    raise UsageError(
        f"--batch-size {batch} --accum {accum} cannot be shared by {world} processes without changing the recipe "
        f"(each process runs accum / {world} micro-batches per optimizer step); {fix}."
    )


def fit_batch_for_world(effective: int, cap: int, world: int) -> tuple[int, int] | None:
    """The largest micro-batch up to ``cap`` that splits ``effective`` into a whole number of micro-batches
    per process and step (for --batch-size auto); None when there is none of at least 2 images."""
    for b in range(min(cap, effective), 1, -1):
        if effective % b == 0 and (effective // b) % world == 0:
            return b, effective // b
    return None


# --------------------------------------------------------------------------------------------------
# Cutting an epoch between processes


@dataclass(frozen=True)
class Window:
    """One optimizer step of one process: the global indices and sizes of its micro-batches, the images of the
    whole window (over every process) and the forward/backward passes every process makes in it."""

    indices: tuple[int, ...]
    sizes: tuple[int, ...]
    images: int
    passes: int


def plan_epoch(batch_sizes: Sequence[int], accum: int, world: int, rank: int) -> list[Window]:
    """The epoch's accumulation windows as ``rank`` runs them.

    The epoch's micro-batches are those of one process (the same seeded permutation, cut at the same places);
    window w holds micro-batches wK … wK+K-1 (K = ``accum``), and rank r runs wK + r·k … wK + r·k + k-1 of them
    (k = K / world). Each micro-batch's loss weight is its size over the images of the whole window, so the
    gradients summed over the processes are the one-process window's. The last window may hold fewer than K:
    ranks past its end make empty passes (no image, zero gradient), so that every process takes part in every
    all-reduce, and all make as many passes as rank 0 (SyncBatchNorm needs the same number of forwards)."""
    if accum % world:
        raise ValueError(f"accum {accum} is not a multiple of world {world}")
    per_rank = accum // world
    n = len(batch_sizes)
    windows = []
    for start in range(0, n, accum):
        end = min(start + accum, n)
        mine = range(min(start + rank * per_rank, end), min(start + (rank + 1) * per_rank, end))
        passes = max(1, min(per_rank, end - start))
        windows.append(Window(tuple(mine), tuple(batch_sizes[i] for i in mine), sum(batch_sizes[start:end]), passes))
    return windows


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """A contiguous share of ``n`` evaluation images: no image twice, none left out, sizes differing by one at
    most (the sums are reduced, so the shares need not be equal and nothing is padded)."""
    return n * rank // world, n * (rank + 1) // world


# --------------------------------------------------------------------------------------------------
# Devices


def worker_device(spec: str, world: World, *, narrowed: bool) -> torch.device:
    """The device of this process. ``narrowed``: the launcher left only the chosen GPUs visible, one per local
    rank. Under a user's torchrun, ``cuda``/``auto``/``cuda:all`` give cuda:LOCAL_RANK and ``cuda:0,1`` the
    LOCAL_RANK-th listed; one named GPU cannot serve several processes."""
    spec = (spec or "auto").strip().lower()
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if spec == "mps":
        raise UsageError("--device mps cannot be shared by several processes (no torch.distributed backend for it).")
    if not spec.startswith("cuda") and spec != "auto":
        raise UsageError(f"--device {spec}: expected cpu, cuda, cuda:all or a list such as cuda:0,1.")
    if not torch.cuda.is_available():
        raise CifarNetError(f"--device {spec}: CUDA is not available here; use --device cpu.")
    count = torch.cuda.device_count()
    listed = parse_cuda_list(spec)
    if narrowed or listed is None:
        index = world.local_rank
    elif len(listed) == 1 and world.local_size > 1:
        raise UsageError(
            f"--device {spec} names one GPU for the {world.local_size} processes on this node; use --device cuda "
            "(each process takes cuda:LOCAL_RANK) or list one GPU per process, e.g. cuda:0,1."
        )
    elif len(listed) != world.local_size:
        raise UsageError(
            f"--device {spec} lists {len(listed)} GPU(s) for the {world.local_size} processes on this node; list one "
            "per process."
        )
    else:
        index = listed[world.local_rank]
    if index >= count:
        raise CifarNetError(
            f"Process {world.local_rank} of this node needs cuda:{index}, but only {count} GPU(s) are visible; start "
            "at most one process per GPU."
        )
    torch.cuda.set_device(index)  # NCCL's communicators (created lazily) use the current device
    return torch.device("cuda", index)


def parse_cuda_list(spec: str) -> list[int] | None:
    """``cuda:0,1`` → [0, 1]; ``cuda:2`` → [2]; ``cuda``, ``cuda:all``, ``auto`` → None (not a list)."""
    spec = spec.strip().lower()
    if not spec.startswith("cuda:") or spec == "cuda:all":
        return None
    parts = [p.strip() for p in spec[len("cuda:") :].split(",")]
    if not parts or not all(p.isdigit() for p in parts if p) or not any(parts):
        raise UsageError(f"--device {spec}: expected cuda:N, a list such as cuda:0,1, or cuda:all.")
    indices = [int(p) for p in parts if p]
    if len(set(indices)) != len(indices):
        raise UsageError(f"--device {spec} names a GPU twice; each process needs a GPU of its own.")
    return indices
