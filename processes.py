"""
processes.py: one process, or one of several under torchrun: its device, rank and random streams, and
the collectives every multi-process number goes through (training.py, svm_eval.py, finetune.py, ...).
NCCL carries only tensors on the process's own GPU and must be told a barrier's device; gloo (CPU runs)
carries host tensors: collective_device says which, and every collective here moves its tensor there.
"""
import os
import random
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist


class Process(NamedTuple):
    """Process(device) alone is a run of one process (as in tests and notebooks)."""
    device: torch.device                                      # where the model and the batches live
    rank: int = 0
    world: int = 1
    collective_device: torch.device = torch.device('cpu')     # where the process group's tensors must be
    owns_group: bool = False                                  # setup_process started torch.distributed


def collective_device(backend, device):
    """The device whose tensors the process group carries: NCCL only the process's CUDA device; gloo the host."""
    return device if backend == 'nccl' else torch.device('cpu')


def setup_process(args):
    """This process's device, rank and world size. Under torchrun (RANK, WORLD_SIZE set) it starts
    torch.distributed, unless the caller did; the process's GPU is cuda:LOCAL_RANK. Seeds every
    random stream with --seed + rank, and resolves --amp (default: on for a GPU)."""
    launched = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    if args.gpu >= 0:
        if not torch.cuda.is_available():
            raise SystemExit(f'--gpu {args.gpu}: no CUDA device here; use --gpu -1 for the CPU')
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', args.gpu)) if launched else args.gpu)
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    owns_group = launched and not dist.is_initialized()
    if owns_group:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                device_id=device if device.type == 'cuda' else None)
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if args.amp is None:
        args.amp = device.type == 'cuda'
    seed_process(args.seed, rank)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return Process(device, rank, world, collective_device(dist.get_backend() if distributed else None, device),
                   owns_group)


def end_process(process):
    if process.owns_group:
        dist.destroy_process_group()


def sum_over_processes(tensor, process):
    """The sum of `tensor` over all processes (a new tensor, on tensor's device)."""
    if process.world == 1:
        return tensor.detach().clone()
    total = tensor.detach().to(process.collective_device, copy=True)
    dist.all_reduce(total)
    return total.to(tensor.device)


def barrier(process):
    """Wait for every process; NCCL must be told which device the barrier runs on."""
    if process.world > 1:
        device = process.collective_device
        dist.barrier(device_ids=[device.index]) if device.type != 'cpu' else dist.barrier()


def share_rank0_buffers(model, process):
    """Give every process rank 0's buffers (BatchNorm running statistics). Under DDP each process updates
    them with its own batches, and DDP hands rank 0's out only at the start of the next training forward:
    at the end of an epoch they differ. Evaluate, and check, only after this: every process then scores with
    the statistics last.pt saves (rank 0's), and the numbers are those one process gets from that file."""
    if process.world > 1:
        for buffer in model.buffers():
            shared = buffer.to(process.collective_device)
            dist.broadcast(shared, 0)
            buffer.copy_(shared.to(buffer.device))


def check_ranks_agree(model, process, log):
    """After DDP training every process must hold rank 0's weights and buffers; say so (or stop)."""
    checksum = torch.stack([t.detach().double().sum() for t in [*model.parameters(), *model.buffers()]])
    reference = checksum.to(process.collective_device, copy=True)
    dist.broadcast(reference, 0)
    if sum_over_processes((reference.to(checksum.device) != checksum).any().double(), process).item() > 0:
        raise RuntimeError('DDP processes disagree on the weights')
    log(f'weights identical on all {process.world} processes')


# ---------------------------------------------------------------- random streams


def seed_process(seed, rank=0):
    """Seed Python, NumPy and torch (CPU and CUDA) with seed + rank: processes draw different streams."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def rng_state(device):
    """This process's random state, as tensors and plain values (so checkpoints load with weights_only=True)."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None,   # its own device only
            'numpy': (torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)),
            'python': random.getstate()}


def set_rng_state(state, device):
    torch.set_rng_state(state['torch'])
    if device.type == 'cuda' and state['cuda'] is not None:
        torch.cuda.set_rng_state(state['cuda'], device)
    keys, position, has_gauss, gauss = state['numpy']
    np.random.set_state(('MT19937', keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state['python'])
