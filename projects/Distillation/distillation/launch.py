"""detectron2's launch, plus a CPU path: several processes over gloo where no GPU exists
(detectron2 v0.6's launch asserts CUDA and uses NCCL)."""
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm


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


def launch(main_func, num_procs_per_machine, num_machines=1, machine_rank=0, dist_url=None,
           args=()):
    """Run main_func(*args) in num_procs_per_machine x num_machines processes: one per GPU with
    NCCL (detectron2's launch) when GPUs are visible, else CPU processes over gloo."""
    if torch.cuda.is_available():
        return d2_launch(main_func, num_procs_per_machine, num_machines=num_machines,
                         machine_rank=machine_rank, dist_url=dist_url, args=args)
    world_size = num_procs_per_machine * num_machines
    if world_size <= 1:
        return main_func(*args)
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("dist_url='auto' only works on one machine")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    mp.start_processes(_cpu_worker, nprocs=num_procs_per_machine,
                       args=(main_func, world_size, num_procs_per_machine, machine_rank,
                             dist_url, args), daemon=False, start_method="spawn")
