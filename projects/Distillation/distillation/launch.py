"""detectron2's launch, plus a CPU path: several processes over gloo where no GPU exists
(detectron2 v0.6's launch asserts CUDA and uses NCCL). Bad input found inside a worker process
(an InputError, e.g. a weights file that is no checkpoint) ends the run as it does in one
process: its one-line message and exit status 2, not a multiprocessing traceback."""
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

from .errors import InputError

# the exit status of a worker that stopped on bad input (its message already printed)
INPUT_ERROR_STATUS = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_worker(local_rank, main_func, world_size, procs_per_machine, machine_rank, dist_url,
                args):
    rank = machine_rank * procs_per_machine + local_rank
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank)
    for i in range(world_size // procs_per_machine):
        ranks = list(range(i * procs_per_machine, (i + 1) * procs_per_machine))
        group = dist.new_group(ranks)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def _main_reporting_input_errors(main_func, *args):
    """main_func(*args) in a worker process: an InputError prints its message (as the scripts
    print it) and exits with INPUT_ERROR_STATUS, which the parent turns into its own exit."""
    try:
        return main_func(*args)
    except InputError as e:
        rank = f" (process {comm.get_rank()})" if comm.get_world_size() > 1 else ""
        print(f"{os.path.basename(sys.argv[0])}{rank}: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        sys.exit(INPUT_ERROR_STATUS)


def launch(main_func, num_procs_per_machine, num_machines=1, machine_rank=0, dist_url=None,
           args=()):
    """Run main_func(*args) in num_procs_per_machine x num_machines processes: one per GPU with
    NCCL (detectron2's launch) when GPUs are visible, else CPU processes over gloo. In several
    processes, a worker's InputError ends the run with SystemExit(INPUT_ERROR_STATUS) after its
    message (one process: the InputError itself, for the caller to report)."""
    world_size = num_procs_per_machine * num_machines
    if world_size <= 1:
        return main_func(*args)
    try:
        return _launch_processes(_main_reporting_input_errors, num_procs_per_machine,
                                 num_machines, machine_rank, dist_url, (main_func,) + tuple(args))
    except mp.ProcessExitedException as e:
        if e.exit_code == INPUT_ERROR_STATUS:
            raise SystemExit(INPUT_ERROR_STATUS) from None
        raise


def _launch_processes(main_func, num_procs_per_machine, num_machines, machine_rank, dist_url,
                      args):
    if torch.cuda.is_available():
        return d2_launch(main_func, num_procs_per_machine, num_machines=num_machines,
                         machine_rank=machine_rank, dist_url=dist_url, args=args)
    world_size = num_procs_per_machine * num_machines
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("dist_url='auto' only works on one machine")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    mp.start_processes(_cpu_worker, nprocs=num_procs_per_machine,
                       args=(main_func, world_size, num_procs_per_machine, machine_rank,
                             dist_url, args), daemon=False, start_method="spawn")
