"""Starting the processes of a run on several devices: torchrun (torch.distributed.run) as a child process,
as ``cifarnet train --device cuda:0,1``, ``--device cuda:all`` or ``--device cpu --nproc 2`` ask.

The launcher runs ``python -m torch.distributed.run --standalone --nproc-per-node N -m cifarnet_cli <the same
command>`` with CUDA_VISIBLE_DEVICES narrowed to the chosen GPUs, and a folder of its own (CIFARNET_LAUNCH_DIR)
that the processes and it share:

- ``pid-<rank>``: each process's pid. Ctrl-C and SIGTERM to the launcher are forwarded to every process (not to
  torchrun, which is in a session of its own and would tear them down after 30 s): they stop together at their
  next optimizer step, rank 0 says what is saved, and the launcher exits 130 or 143. ``stop`` holds the request
  for a process that registers later. A second Ctrl-C stops the processes at once; a third kills them.
- ``status-<rank>.json``: how each process ended. A stop or an error the processes agreed on is reported by
  rank 0 alone, and they exit 0 so that torchrun does not add its own failure report; the launcher exits with
  the agreed code. A process that ends without a status (killed, crashed) is named in one line with the
  command that resumes the run (``run.json``, written by rank 0 when the run is open).

Under a user's own torchrun none of this is there: the processes recognise torchrun's environment, nothing is
relaunched, and they exit with their own codes. Kept free of torch at import (the CLI consults it for every
error it prints).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from cifarnet_cli import choices, fileio, interrupts
from cifarnet_cli.errors import CifarNetError, UsageError

LAUNCH_DIR_ENV = "CIFARNET_LAUNCH_DIR"
#: The launcher's folder: ``<temporary folder>/cifarnet-launch-<random>``, locked through :data:`OWNER_FILE`
#: while the launcher runs (a launcher killed with -9 leaves it; the next launch removes it).
FOLDER_PREFIX = "cifarnet-launch-"
OWNER_FILE = "launcher.lock"
#: A launcher's folder without its lock file (an older version's, or one killed as it created it) is taken
#: for a leftover once it is this old.
UNLOCKED_STALE_S = 3600.0
RESUME_OPTIONS_ENV = "CIFARNET_RESUME_OPTIONS"
ARGUMENTS_ENV = "CIFARNET_LAUNCH_ARGS"


@dataclass(frozen=True)
class LaunchPlan:
    nproc: int
    device_type: str  # "cuda" or "cpu"
    visible: str | None  # CUDA_VISIBLE_DEVICES for the processes (the chosen GPUs, in order)
    resume_options: str  # what --resume needs besides the run's recorded --device, e.g. " --nproc 2"

    def describe(self) -> str:
        if self.device_type == "cpu":
            return f"{self.nproc} CPU processes (gloo)"
        return f"{self.nproc} GPUs (CUDA_VISIBLE_DEVICES={self.visible}, NCCL)"


def in_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


#: The variables torchrun sets in each process's environment.
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class TorchrunEnvError(UsageError):
    """An environment torchrun would not have set: each process's own, so every process says it (a rank
    outside the world may be the only one wrong)."""


def check_torchrun_env() -> None:
    """Under torchrun (RANK and WORLD_SIZE set), refuse an environment torchrun would not have set (a count of
    processes below 1, a rank outside the world, a port that is no port) with one usage line, before any
    data is read or any process group is joined; they would end in a ZeroDivisionError or a silent exit."""
    if not in_torchrun():
        return
    why = _torchrun_env_problem(os.environ)
    if why is not None:
        raise TorchrunEnvError(
            f"The torchrun environment is not one torchrun sets: {why}. Start the processes with torchrun (or "
            "--nproc N), or unset RANK and WORLD_SIZE to train in one process."
        )


def _torchrun_env_problem(env: Any) -> str | None:
    def number(name: str, low: int, high: int, what: str) -> tuple[int | None, str | None]:
        text = env.get(name)
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not low <= value <= high:
            return None, f"{name}={text!r} is not {what}"
        return value, None

    size, why = number("WORLD_SIZE", 1, 1 << 20, "a number of processes (1 or more)")
    if size is None:
        return why
    _rank, why = number("RANK", 0, size - 1, f"a rank of WORLD_SIZE={size} (0 to {size - 1})")
    if why is not None:
        return why
    local_size: int | None = size
    if "LOCAL_WORLD_SIZE" in env:
        local_size, why = number("LOCAL_WORLD_SIZE", 1, size, f"a number of processes from 1 to WORLD_SIZE={size}")
    if local_size is None:
        return why
    if "LOCAL_RANK" in env:
        _local, why = number("LOCAL_RANK", 0, local_size - 1, f"a local rank from 0 to {local_size - 1}")
        if why is not None:
            return why
    if size > 1:  # the processes meet at MASTER_ADDR:MASTER_PORT (PyTorch's env:// rendezvous)
        if not env.get("MASTER_ADDR", "").strip():
            return f"MASTER_ADDR={env.get('MASTER_ADDR', '')!r} is not a host name or address"
        _port, why = number("MASTER_PORT", 1, 65535, "a port (1 to 65535)")
        if why is not None:
            return why
    return None


def worker_rank() -> int | None:
    """This process's rank under torchrun; None for a plain process (read without importing torch)."""
    if not in_torchrun():
        return None
    try:
        return int(os.environ["RANK"])
    except ValueError:
        return None


def end_worker(code: object) -> None:
    """A process of several (a torchrun worker of a world of 2 or more) ends here with ``code``, as the
    interpreter would end it (its other threads joined, the atexit functions run, the streams flushed) but
    without finalizing it: gloo's worker threads, left by DistributedDataParallel, can still hold tensors then,
    and freeing them during finalization aborted the process ("terminate called without an active
    exception", SIGABRT) after runs that had finished and saved: 4 of 30 bare two-process DDP runs of torch
    2.14 on the CPU, 2 of 18 two-process cifarnet runs (pytorch/pytorch#179291 describes the cause). A plain
    process returns."""
    if worker_rank() is None:
        return
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            return
    except ValueError:
        return
    import atexit
    import threading

    status = code if isinstance(code, int) else 0 if code is None else 1
    if not isinstance(code, int) and code is not None:
        print(code, file=sys.stderr)  # what sys.exit("message") prints
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream: nothing more can be said on it
            stream.flush()
    os._exit(status)


# --------------------------------------------------------------------------------------------------
# The plan: how many processes on which devices


def plan(device_spec: str | None, nproc: int | None) -> LaunchPlan | None:
    """The processes ``--device`` and ``--nproc`` ask for, or None to train in this process (one device, or
    already one of torchrun's processes)."""
    if nproc is not None and nproc < 1:
        raise UsageError(f"--nproc must be at least 1 (got {nproc}).")
    _check_device_form(device_spec)
    check_torchrun_env()
    if in_torchrun():
        if nproc is not None and nproc > 1:
            raise UsageError("--nproc starts processes itself; under torchrun, give torchrun's --nproc-per-node.")
        return None
    spec = (device_spec or "auto").strip().lower()
    if spec in ("cpu", "mps") or (spec == "auto" and not _cuda_count()):
        kind = "cpu" if spec == "auto" else spec
        if (nproc or 1) == 1:
            return None
        if kind == "mps":
            raise UsageError("--device mps trains in one process (no torch.distributed backend for Apple GPUs).")
        _check_distributed(cuda=False)
        return LaunchPlan(nproc or 1, "cpu", None, f" --nproc {nproc}")
    return _cuda_plan(spec, nproc)


def _check_device_form(device_spec: str | None) -> None:
    """Refuse a --device of no known form before anything starts (a list's GPUs are checked later)."""
    spec = (device_spec or "auto").strip().lower()
    if spec not in ("auto", "cpu", "mps", "cuda") and not spec.startswith("cuda:"):
        raise UsageError(choices.unknown("--device", device_spec or "", choices.DEVICES))


def _cuda_plan(spec: str, nproc: int | None) -> LaunchPlan | None:
    from cifarnet_cli.distributed import parse_cuda_list

    listed = parse_cuda_list(spec) if spec not in ("auto", "cuda") else None
    count = _cuda_count()
    if spec == "cuda:all":
        listed = list(range(count))
    options = ""
    if listed is None:  # auto / cuda: one GPU unless --nproc says more
        listed = list(range(nproc or 1))
        options = f" --nproc {nproc}" if (nproc or 1) > 1 else ""
    elif nproc is not None and nproc != len(listed):
        raise UsageError(f"--device {spec} names {len(listed)} GPU(s) but --nproc is {nproc}; give one of them.")
    if len(listed) <= 1:
        return None
    _check_distributed(cuda=False)
    if not count:
        raise CifarNetError(f"--device {spec}: CUDA is not available here; use --device cpu (with --nproc N).")
    missing = [i for i in listed if i >= count]
    if missing:
        raise CifarNetError(
            f"--device {spec}: only {count} GPU(s) are visible (cuda:0..cuda:{count - 1}); there is no cuda:{missing[0]}."
        )
    _check_distributed(cuda=True)
    physical = [p.strip() for p in os.environ["CUDA_VISIBLE_DEVICES"].split(",")] if _narrowed_by_user() else None
    visible = ",".join(physical[i] if physical else str(i) for i in listed)
    return LaunchPlan(len(listed), "cuda", visible, options)


def _narrowed_by_user() -> bool:
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES", "").strip())


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_distributed(*, cuda: bool) -> None:
    import torch

    from cifarnet_cli.distributed import NO_DISTRIBUTED

    if not torch.distributed.is_available():
        raise UsageError(f"Several devices need torch.distributed, but {NO_DISTRIBUTED} (--device cuda).")
    if cuda and not torch.distributed.is_nccl_available():
        raise UsageError("Several GPUs need NCCL, which this torch build lacks; train on one GPU (--device cuda).")


# --------------------------------------------------------------------------------------------------
# The launcher


def run(plan: LaunchPlan, argv: list[str], *, arguments: list[str] | None = None) -> tuple[int, str | None]:
    """Run ``python -m torch.distributed.run ... <argv>`` (``argv``: ``-m module args...``) and wait for it,
    forwarding stop signals to the processes. ``arguments``: the cifarnet command line of the processes, handed
    over in the environment (:func:`launched_arguments`), out of reach of torchrun's own parser, which takes an
    abbreviation of its options for its own (``--run`` for ``--run-path``). Returns the exit code to end with
    and a line to print (None when the processes said everything themselves)."""
    remove_stale_folders()
    folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
    owner = fileio.hold_lock(folder / OWNER_FILE)
    try:
        env = dict(os.environ)
        env[LAUNCH_DIR_ENV] = str(folder)
        if arguments is not None:
            env[ARGUMENTS_ENV] = json.dumps(arguments)
        env[RESUME_OPTIONS_ENV] = plan.resume_options
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.nproc)))
        if plan.visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = plan.visible
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a rendezvous on a free local port, chosen by torchrun
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(plan.nproc),
            "--max-restarts",
            "0",
            *argv,
        ]
        # A session of its own: a terminal's Ctrl-C reaches the launcher alone, which forwards it to the
        # processes (torchrun would answer it by terminating them, and print a traceback of its own).
        proc = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_end_with_parent)
        forwarder = _Forwarder(proc, folder)
        with forwarder.installed():
            code = _wait(proc)
        return _outcome(folder, code, plan)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if owner is not None:
            os.close(owner)


def remove_stale_folders() -> list[Path]:
    """Remove this user's launcher folders whose launcher is gone (``kill -9`` skips its cleanup): their lock
    is free, or they have none and are older than :data:`UNLOCKED_STALE_S`. A live launcher's stays."""
    root = tempfile.gettempdir()
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith(FOLDER_PREFIX)]
    except OSError:
        return []
    removed = []
    for entry in entries:
        with contextlib.suppress(OSError):
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            lock = os.path.join(entry.path, OWNER_FILE)
            if os.path.lexists(lock):
                gone = fileio.owner_is_gone(lock)
            else:
                gone = time.time() - info.st_mtime > UNLOCKED_STALE_S
            if gone:
                shutil.rmtree(entry.path)
                removed.append(Path(entry.path))
    return removed


def _wait(proc: subprocess.Popen[bytes]) -> int:
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # only if a signal arrives before the forwarder is installed
            continue


def _end_with_parent() -> None:
    """In torchrun's process: receive SIGTERM when the launcher dies (Linux), so that a launcher killed with -9
    does not leave the training running on its own."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Forwarder:
    """Ctrl-C / SIGTERM to the launcher: the first asks every process to stop at its next optimizer step, the
    second to stop at once, the third kills them."""

    def __init__(self, proc: subprocess.Popen[bytes], folder: Path) -> None:
        self.proc = proc
        self.folder = folder
        self.count = 0

    def _pids(self) -> list[int]:
        pids = []
        for path in self.folder.glob("pid-*"):
            try:
                pids.append(int(path.read_text().strip()))
            except (OSError, ValueError):
                continue
        return pids

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1
        if self.count == 1:
            _write(self.folder / "stop", str(143 if signum == signal.SIGTERM else 130))
        deliver = signal.SIGKILL if self.count >= 3 else signum
        for pid in self._pids():
            try:
                os.kill(pid, deliver)
            except OSError:
                continue
        if self.count >= 3:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass

    @contextmanager
    def installed(self) -> Iterator[None]:
        with interrupts.stop_signals_to(self._on_signal):
            yield


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _outcome(folder: Path, code: int, plan: LaunchPlan) -> tuple[int, str | None]:
    nproc = plan.nproc
    statuses = {r: s for r in range(nproc) if (s := _read_json(folder / f"status-{r}.json")) is not None}
    if code == 0:
        return int(statuses[0]["exit"]) if 0 in statuses else 0, None
    failed = [r for r, s in statuses.items() if s.get("exit") and not s.get("agreed")]
    if failed:  # it said why itself
        return int(statuses[failed[0]]["exit"]), None
    started = {r for r in range(nproc) if (folder / f"pid-{r}").exists()}
    if not started:
        return code, f"torchrun could not start the processes (exit code {code}); its messages are above."
    silent = [r for r in range(nproc) if r not in statuses]
    if not silent:
        return int(statuses.get(0, {}).get("exit") or code), None
    names = "Rank " + str(silent[0]) if len(silent) == 1 else "Ranks " + ", ".join(str(r) for r in silent)
    record = _read_json(folder / "run.json")
    if record is not None:
        after = (
            f" The run keeps its last completed epoch; continue with: {record['command']} --resume {record['run']}"
            f"{plan.resume_options}"
        )
    else:
        after = " No run was opened yet."
    return 1, (
        f"{names} of {nproc} ended without a word (killed, or out of memory); the other processes were stopped." + after
    )


# --------------------------------------------------------------------------------------------------
# The processes' side


def launched() -> Path | None:
    """The launcher's folder when ``cifarnet`` started this process itself (not a user's torchrun)."""
    folder = os.environ.get(LAUNCH_DIR_ENV)
    return Path(folder) if folder and in_torchrun() else None


def launched_arguments() -> list[str] | None:
    """The command line the launcher handed this process (None when it was not started by the launcher)."""
    text = os.environ.get(ARGUMENTS_ENV)
    if not text or launched() is None:
        return None
    try:
        args = json.loads(text)
    except ValueError:
        return None
    return [str(a) for a in args] if isinstance(args, list) else None


def narrowed() -> bool:
    """The launcher left one visible GPU per local rank (CUDA_VISIBLE_DEVICES)."""
    return launched() is not None


def resume_options() -> str:
    """What the resume command needs besides ``--resume NAME`` (``--nproc N`` when that started the run)."""
    return os.environ.get(RESUME_OPTIONS_ENV, "") if launched() is not None else ""


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass


def register_worker(rank: int, on_stop: Callable[[Callable[[], int]], None]) -> None:
    """Tell the launcher this process's pid, and hand ``on_stop`` the check of its stop file (a request that
    came before the pid was known)."""
    folder = launched()
    if folder is None:
        return
    _write(folder / f"pid-{rank}", str(os.getpid()))

    def stop_file() -> int:
        try:
            return int((folder / "stop").read_text().strip() or 130)
        except (OSError, ValueError):
            return 0

    on_stop(stop_file)


def note_run(name: str, command: str) -> None:
    """Rank 0: the run is open (the launcher can then name the command that resumes it)."""
    folder = launched()
    if folder is not None:
        _write(folder / "run.json", json.dumps({"run": name, "command": command}))


def speaks(exc: BaseException) -> bool:
    """Whether this process prints ``exc``: always alone; under several processes rank 0 does, and another
    rank only for an error of its own that the others did not share."""
    rank = worker_rank()
    if rank is None or rank == 0:
        return True
    if isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "TrainingInterrupted":
        return False
    if isinstance(exc, TorchrunEnvError):
        return True
    from cifarnet_cli.distributed import is_agreed

    return not is_agreed(exc)


def ranked(message: str) -> str:
    """``message`` from a rank other than 0 says which rank it comes from."""
    rank = worker_rank()
    return message if not rank else f"Rank {rank}: {message}"


def exit_code(exc: BaseException | None, code: int) -> int:
    """The code this process exits with; under the launcher its status is recorded, and an outcome the
    processes agreed on exits 0 (the launcher ends with the agreed code, without torchrun's failure report)."""
    folder = launched()
    if folder is None:
        return code
    from cifarnet_cli.distributed import is_agreed

    agreed = exc is not None and is_agreed(exc)
    rank = worker_rank() or 0
    _write(folder / f"status-{rank}.json", json.dumps({"exit": code, "agreed": agreed}))
    return 0 if agreed or code == 0 else code
