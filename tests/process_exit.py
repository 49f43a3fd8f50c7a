"""A clean exit for every process a test launches, and the check that each one had it.

Why: a 2-process run of 0.2.0 trained every mode, then rank 1 aborted at exit (``terminate called without an active
exception``, return code -6), now and then on a loaded machine. At exit each rank still had gloo's
threads (``pt_gloo_runloop`` x2, ``gloo_tcp_loop``) alive, although the run was over: DeepSpeed, imported by
accelerate after the process group exists, keeps the group as a default argument
(``deepspeed.comm.torch.TorchBackend.barrier(self, group=GroupMember.WORLD)`` is evaluated at import), so neither
``destroy_process_group`` nor Axolotl's ``cleanup_distributed`` frees it. The group was then destroyed during
interpreter finalisation, where a gloo thread that needs the GIL (to free a tensor of its last work) is ended by
Python with a forced unwind through C++ ``noexcept`` code: ``std::terminate`` (the mechanism of PyTorch's #179291).
The fix is to end the group, and drop what still holds it, while the interpreter is whole.

Workers call ``install()`` first: at exit each process destroys the group if the program left it (after a barrier
when the program ends normally: ``end_process_group``), releases the references, collects, checks that no gloo
thread is left and prints ``EXIT_MARKER``. Tests launch through ``run_processes``, which asserts the return code and
one marker per process.
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import subprocess
import sys
import types
import warnings
from collections.abc import Sequence

import torch.distributed as dist

EXIT_MARKER = "sftkey-test: process exited cleanly"
FREED = "process group freed"
HELD = "process group still held, interpreter finalisation skipped"
RANK = os.environ.get("RANK", "0")
GLOO_THREADS = frozenset({"pt_gloo_runloop", "gloo_tcp_loop"})  # ProcessGroupGloo's worker threads, gloo's I/O loop


def native_threads() -> list[str]:
    """The names of this process's native threads (``/proc/self/task/*/comm``)."""
    tasks = "/proc/self/task"
    names = []
    for task in os.listdir(tasks):
        try:
            with open(f"{tasks}/{task}/comm", encoding="utf-8") as handle:
                names.append(handle.read().strip())
        except FileNotFoundError:  # the thread ended while we listed
            continue
    return names


def release_captured_groups() -> None:
    """Drop what keeps a destroyed group alive: process groups held as default arguments (DeepSpeed), and the caches
    that hold ``DeviceMesh``es under FSDP2 (every ``lru_cache``; DTensor's sharding-propagation and redistribution
    caches)."""
    with warnings.catch_warnings():  # looking at torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore")
        for item in gc.get_objects():
            if isinstance(item, types.FunctionType) and any(
                isinstance(d, dist.ProcessGroup) for d in item.__defaults__ or ()
            ):
                item.__defaults__ = tuple(None if isinstance(d, dist.ProcessGroup) else d for d in item.__defaults__)
            elif isinstance(item, functools._lru_cache_wrapper):
                item.cache_clear()
    if "torch.distributed.tensor" in sys.modules:
        from torch.distributed.tensor import _redistribute, debug

        debug._clear_sharding_prop_cache()
        _redistribute.clear_redistribute_planner_cache()


def _say(line: str) -> None:
    """One line on stdout in a single write, so the lines of two processes sharing the pipe never interleave."""
    sys.stdout.flush()
    os.write(1, f"{line}\n".encode())


def _free_group() -> list[str]:
    """Destroy the group (if the program left it), release its holders; the gloo threads still alive."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    release_captured_groups()
    gc.collect()
    return sorted(name for name in native_threads() if name in GLOO_THREADS)


def end_process_group() -> None:
    """The normal end of a worker: every process reaches the barrier, the group is destroyed and freed. A group that
    something still holds (DeepSpeed's module state and ZeRO-3 parameters) would be freed during interpreter
    finalisation, where the abort happens: such a process ends here, with status 0, without finalisation."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if not _free_group():
        _say(f"{EXIT_MARKER} (rank {RANK}): {FREED}")
        atexit.unregister(_exit_cleanly)
        return
    _say(f"{EXIT_MARKER} (rank {RANK}): {HELD}")
    sys.stderr.flush()
    os._exit(0)


def _exit_cleanly() -> None:
    # Paths that did not reach end_process_group (an error, an Axolotl run): no barrier, the other process may never
    # reach it
    alive = _free_group()
    _say(
        f"sftkey-test: gloo threads alive at exit (rank {RANK}): {alive}"
        if alive
        else f"{EXIT_MARKER} (rank {RANK}): {FREED}"
    )


def install() -> None:
    """Run the clean exit when this process's interpreter exits (registered once per process)."""
    atexit.unregister(_exit_cleanly)
    atexit.register(_exit_cleanly)


def run_processes(
    command: Sequence[str], processes: int, group_freed: bool = True, **kwargs: object
) -> subprocess.CompletedProcess:
    """Run a launch of ``processes`` workers to the end; assert it succeeded and every process exited cleanly, its
    process group freed (``group_freed``) or, where DeepSpeed holds it, ended without interpreter finalisation."""
    done = subprocess.run(list(command), capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    exits = sorted(line for line in (done.stdout + done.stderr).splitlines() if line.startswith("sftkey-test: "))
    expected = [f"{EXIT_MARKER} (rank {rank}): {FREED if group_freed else HELD}" for rank in range(processes)]
    assert exits == expected, (exits, done.stderr[-3000:])
    return done
