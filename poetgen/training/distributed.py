"""Training on several processes: torchrun's environment -> a process group, and the few collective steps the
training loop needs (see poetgen.training.loop).

torchrun (or ``poetgen train --nproc N``, which starts torchrun) runs one process per device and gives each
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``init_from_env()`` joins them into one process group.
Collectives pick the backend by where a tensor lives: NCCL for CUDA tensors (each process on cuda:LOCAL_RANK),
gloo for CPU tensors. A CPU run is all gloo; on GPUs the gradients go through NCCL and the handful of CPU scalars
that keep the ranks in step (loss, stop votes, the clock) through gloo.

The share of each rank (poetgen.data.batches): N processes with --batch-size B read the same N·B streams, in the same
order, as one process with --batch-size N·B; rank r reads streams r·B … r·B+B-1. DDP averages the gradients over
ranks, and with equal shares that is the gradient of the mean loss over all N·B streams, so both runs take the
same steps up to float rounding.

A single process uses ``Local``: the same methods, doing nothing, so the loop is written once. ``context()``
returns the group of an already initialised torch.distributed (a library caller may set it up itself).

A worker started this way ends through ``leave`` (called by ``poetgen.cli.main``): without the interpreter's
finalisation, which gloo's leftover threads could abort (see there).

The launcher half (``launch``) only builds a torchrun command line and waits for it; it never imports torch.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Callable, NoReturn, TypeVar

from poetgen.errors import PoetgenError, TrainingError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# The environment torchrun gives every worker.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Words of the errors gloo / NCCL / c10d raise when a peer is gone or unreachable.
_TRANSPORT = re.compile(r"gloo|nccl|c10d|connection|socket|timed? ?out|peer|closed", re.IGNORECASE)


def mark_reported(error: BaseException) -> BaseException:
    """Flag an error that rank 0 reports too: the CLI of the other ranks then exits without repeating it."""
    error.reported_by_rank0 = True  # type: ignore[attr-defined]
    return error


def reported_by_rank0(error: BaseException) -> bool:
    return bool(getattr(error, "reported_by_rank0", False))


class Local:
    """One process: every collective is the identity."""

    rank = 0
    local_rank = 0
    world_size = 1
    distributed = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def collective(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, which talks to the other ranks (a collective, a DDP backward)."""
        return fn()

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def broadcast(self, values: list[float]) -> list[float]:
        return list(values)

    def barrier(self) -> None:
        pass

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """[t of every rank] on rank 0, None elsewhere."""
        return [t]

    def agree(self, fn: Callable[[], T]) -> T:
        return fn()

    def agree_in_turn(self, fn: Callable[[], T]) -> T:
        return fn()

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return model

    def close(self) -> None:
        pass


class Group(Local):
    """The process group torchrun started this process in."""

    distributed = True

    def __init__(self, rank: int, world_size: int, local_rank: int):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    def collective(self, fn: Callable[[], T]) -> T:
        # A peer that died (crash, SIGKILL) closes its sockets: gloo raises instead of waiting forever. Other
        # errors (say out of memory in a DDP backward) pass through unchanged.
        try:
            return fn()
        except RuntimeError as e:
            text = str(e).strip()
            if not _TRANSPORT.search(text):
                raise
            # "[.../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:16287: Connection reset by peer. This
            # is typically caused by ..." -> its first sentence, without the source location.
            first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]).split(". ")[0]
            raise TrainingError(
                f"lost contact with the other training processes (one of them stopped or crashed): {first}"
            ) from None

    def _reduce(self, values: list[float], op) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)  # CPU -> gloo; float64 adds no rounding to float32 values
        self.collective(lambda: dist.all_reduce(t, op=op))
        return t.tolist()

    def sum(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        return self._reduce(values, dist.ReduceOp.SUM)

    def broadcast(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        self.collective(lambda: dist.broadcast(t, src=0))
        return t.tolist()

    def barrier(self) -> None:
        import torch.distributed as dist

        self.collective(lambda: dist.barrier())

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        import torch
        import torch.distributed as dist

        t = t.detach().to("cpu").contiguous()  # same shape on every rank
        parts = [torch.empty_like(t) for _ in range(self.world_size)] if self.is_main else None
        self.collective(lambda: dist.gather(t, parts, dst=0))
        return parts

    def agree(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if it raised a PoetgenError anywhere, raise on every rank, so no rank waits
        in a collective for one that gave up. Rank 0 reports: its own error, or which ranks failed."""
        error: PoetgenError | None = None
        result = None
        try:
            result = fn()
        except PoetgenError as e:
            error = e
        failed = [r for r, bad in enumerate(self._gather_flags(error is not None)) if bad]
        if not failed:
            return result  # type: ignore[return-value]
        if error is not None:
            raise mark_reported(error) if self.rank != 0 and 0 in failed else error
        which = ", ".join(map(str, failed))
        stop = TrainingError(f"training process(es) with rank {which} failed (see the error above)")
        raise mark_reported(stop) if self.rank != 0 else stop

    def _gather_flags(self, flag: bool) -> list[bool]:
        import torch
        import torch.distributed as dist

        mine = torch.tensor([1 if flag else 0], dtype=torch.int64)
        every = [torch.zeros_like(mine) for _ in range(self.world_size)]
        self.collective(lambda: dist.all_gather(every, mine))
        return [bool(t.item()) for t in every]

    def agree_in_turn(self, fn: Callable[[], T]) -> T:
        """Like ``agree``, but local rank 0 of each machine runs first (it may fill a cache the others reuse,
        e.g. a raw corpus prepared on the fly), then the other ranks."""
        first = self.local_rank == 0
        r1 = self.agree(fn if first else (lambda: None))
        r2 = self.agree((lambda: None) if first else fn)
        return r1 if first else r2  # type: ignore[return-value]

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        # DDP copies rank 0's weights to every rank, then all-reduces (averages) gradients during backward.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# Whether init_from_env started a process group in this process (so this process is a torchrun worker of ours).
_joined = False


def joined() -> bool:
    return _joined


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env() -> Local:
    """Join the process group torchrun describes in the environment; ``Local()`` when not started by torchrun
    (or with a single process)."""
    if not under_torchrun():
        return Local()
    missing = [k for k in ENV_VARS if not os.environ.get(k)]
    if missing:
        raise TrainingError(
            f"WORLD_SIZE is set but {', '.join(missing)} not: start distributed training with torchrun "
            "(or poetgen train --nproc N)"
        )
    import torch
    import torch.distributed as dist

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            if local < torch.cuda.device_count():
                torch.cuda.set_device(local)  # NCCL and the CUDA RNG use the current device
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        global _joined
        _joined = True
    return Group(rank, world, local)


def leave(code: int) -> NoReturn:
    """End a worker process that joined a process group: atexit handlers, flushed stdout/stderr, then ``os._exit``
    without the interpreter's finalisation.

    Why: a DistributedDataParallel model keeps references to its process group that never go away (torch 2.13), so
    ``destroy_process_group()`` cannot free the gloo backend and its worker threads outlive Python. After a
    collective returns, the worker thread still releases its finished work, which may hold a tensor created in
    Python; doing that needs the GIL, and if the interpreter is finalising by then, the thread is torn down and
    the process dies with "terminate called without an active exception" (SIGABRT) after a run that succeeded.
    On a 2-core machine beside two busy processes, 5 launches in 70 ended so. Skipping finalisation removes the
    window; atexit handlers still run, while the interpreter is whole, and every file of ours is closed by then.
    """
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said there
                pass
        os._exit(code)


def context() -> Local:
    """The process group of this process if torch.distributed is initialised with more than one rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return Local()


# --- per-rank state in a checkpoint ---------------------------------------------------------------------------


def rng_tensors(ctx: Local, device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's torch (and, training on CUDA, its device's) RNG state, gathered on rank 0 as checkpoint
    tensors ``rng.<rank>.torch`` / ``rng.<rank>.cuda``. Python's ``random`` is not used by training: left out."""
    import torch

    out: dict[str, torch.Tensor] = {}
    parts = ctx.gather(torch.get_rng_state())
    if parts is not None:
        out.update({f"rng.{r}.torch": p for r, p in enumerate(parts)})
    if device.type == "cuda":  # the same on every rank, so every rank joins this gather
        parts = ctx.gather(torch.cuda.get_rng_state(device))
        if parts is not None:
            out.update({f"rng.{r}.cuda": p for r, p in enumerate(parts)})
    return out


def restore_rank_rng(tensors: dict[str, torch.Tensor], rank: int) -> None:
    import torch

    if f"rng.{rank}.torch" not in tensors:
        raise TrainingError(f"the checkpoint has no random state for rank {rank}, so it cannot be resumed exactly")
    torch.set_rng_state(tensors[f"rng.{rank}.torch"].cpu())
    if f"rng.{rank}.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng.{rank}.cuda"].cpu())


def rank_seed(seed: int, rank: int) -> int:
    """A distinct seed per rank for dropout masks (the weights start equal: seeded with ``seed`` everywhere)."""
    return (seed * 1_000_003 + 7919 * (rank + 1)) % 2**63


# --- the launcher: poetgen train --nproc N ---------------------------------------------------------------------


def strip_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE`` (everything after ``--`` is kept)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out.extend(argv[i:])
            break
        if a == option:
            i += 2
            continue
        if a.startswith(option + "="):
            i += 1
            continue
        out.append(a)
        i += 1
    return out


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """torchrun on one machine: --standalone picks a free local port for the rendezvous."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "poetgen", *args]


def launch(nproc: int, args: list[str]) -> int:
    """Run ``torchrun --standalone --nproc-per-node N -m poetgen ARGS`` and return its exit code.

    torchrun starts in a session of its own, so a Ctrl-C reaches it once, through us: the first SIGINT / SIGTERM /
    SIGHUP is passed on (torchrun passes it to every worker, which then stop together and save); later ones are
    ignored, because torchrun kills workers that have not finished 30 s after it was signalled. Exit code: 128 +
    the signal when one was passed on and training did not end cleanly, else torchrun's.
    """
    env = dict(os.environ)
    # torchrun would set 1 and warn; share the cores instead (GPU runs hardly use CPU threads).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(torchrun_command(nproc, args), env=env, start_new_session=True)
    forwarded: list[int] = []

    def forward(signum, frame):
        if not forwarded:
            forwarded.append(signum)
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, forward) for s in handled}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if forwarded and code != 0:
        return 128 + forwarded[0]
    return code
