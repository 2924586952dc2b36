"""The process group train.py runs in: joined under the deepspeed launcher (GPUs over NCCL, CPU ranks over gloo,
one machine or several) or created for a plain `python train.py`, with the checks and clean-ups that DeepSpeed's
CPU path and a multi-machine output_dir need. Errors are the typed ones of medextract.errors."""
from __future__ import annotations

import contextlib
import glob
import os
import socket
import time

import torch
import torch.distributed as dist

from utils import atomic_write_text

from .errors import OutputError


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or, for a plain `python train.py`, create) the process group; returns (rank, world size, device)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        # No launcher: become rank 0 of a 1-process group, with the variables DeepSpeed's launcher would have set.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # ranks on one machine share its cores instead of oversubscribing
            local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_size))
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    if device.type == "cpu" and os.environ["RANK"] == "0" and not cpu_comm_module_built():
        print("DeepSpeed compiles its CPU communication module on first use (about a minute); it is cached afterwards",
              flush=True)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    if device.type == "cpu":
        unlink_cpu_allreduce_buffer()
    return dist.get_rank(), dist.get_world_size(), device


SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's shared-memory allreduce for CPU ranks, a C++ extension


def cpu_comm_module_built() -> bool:
    """Whether DeepSpeed's CPU communication module is ready to load: installed prebuilt, compiled by an earlier run
    into torch's extension cache (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/<python>_<accelerator>/), or
    not used on this machine. Otherwise the process group's creation compiles it first, silently, for about a
    minute."""
    import deepspeed.ops
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(SHM_COMM_OP) or not deepspeed.ops.__compatible_ops__.get(SHM_COMM_OP, False):
        return True
    return cpu_comm_module_cached()


def cpu_comm_module_cached() -> bool:
    """Whether an earlier run compiled DeepSpeed's CPU communication module into torch's extension cache."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    library = f"{SHM_COMM_OP}.so"
    return any(os.path.isfile(os.path.join(folder, SHM_COMM_OP, library))
               for folder in (root, *glob.glob(os.path.join(glob.escape(root), "*"))))


def unlink_cpu_allreduce_buffer() -> None:
    """DeepSpeed's CPU accelerator gives each rank of a one-machine group a 69 MB shared-memory allreduce buffer,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, and never unlinks it: every CPU
    run, even one killed, would leave its buffers in RAM until the machine reboots. Its init maps every peer's buffer
    before it returns, so once all ranks are past it (the barrier) each rank removes its own name; the mappings live
    on until the process exits."""
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):  # the op was not built, or the ranks span machines
        os.unlink(os.path.join("/dev/shm", name))


def check_output_dir_shared(output_dir: str, rank: int, world_size: int, device: torch.device,
                            wait_s: float = 60.0) -> None:
    """Every rank writes its part of each checkpoint into output_dir and rank 0 renames the whole, so on several
    machines output_dir must be one shared directory: a file rank 0 writes there must become visible to every rank
    (within `wait_s`, which covers NFS's cache of a directory that did not exist a moment ago)."""
    if world_size == 1:
        return
    marker = os.path.join(output_dir, f".shared-check-{os.getpid()}-{time.time_ns()}")
    shared = [marker, ""]  # rank 0's marker path, and its error if it cannot write there
    if rank == 0:
        try:
            os.makedirs(output_dir, exist_ok=True)
            atomic_write_text(marker, "")
        except OSError as e:
            shared[1] = f"--output_dir {output_dir}: cannot write there ({e})"
    dist.broadcast_object_list(shared, src=0)
    marker, error = shared
    if error:
        raise OutputError(error)
    deadline = time.monotonic() + wait_s
    while not visible(marker) and time.monotonic() < deadline:
        time.sleep(1.0)
    seen = torch.tensor([1.0 if visible(marker) else 0.0], device=device)
    dist.all_reduce(seen)
    dist.barrier()
    if rank == 0:
        os.remove(marker)
    if seen.item() < world_size:
        raise OutputError(f"--output_dir {output_dir}: {world_size - int(seen.item())} of {world_size} ranks cannot "
                          f"see files that rank 0 writes there; with several machines it must be on a filesystem "
                          f"they all share (NFS, Lustre, ...)")


def visible(path: str) -> bool:
    """Whether `path` exists, listing its directory first (a listing makes NFS look again)."""
    try:
        return os.path.basename(path) in os.listdir(os.path.dirname(path))
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
