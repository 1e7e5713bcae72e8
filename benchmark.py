"""
benchmark.py: where the time and memory of one pre-training step go (`python pretrain.py --benchmark`).

Runs `pretrain.pretrain_step` on random clouds with the configuration pretrain.py's flags give,
2 warm-up steps then --benchmark_steps timed ones, and prints milliseconds per stage
(tokenize / project / teacher / mask / student forward / backward / optimizer), samples/s and
peak memory. Numbers measured with it are in the README ("Speed and memory").
"""
import resource
import time

import torch

from pretrain import param_groups, pretrain_step


def peak_memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # the whole process, in MB


def benchmark_pretrain_step(args, device, teacher, student):
    """Milliseconds per stage of one training step, samples/s and peak memory, on random clouds."""
    optimizer = torch.optim.AdamW(param_groups(student, args.weight_decay), lr=args.lr)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    times = {}

    def clock(stage):
        sync()
        now = time.perf_counter()
        times[stage] = times.get(stage, 0.0) + now - clock.last
        clock.last = now
    xyz = torch.randn(args.batch_size, args.num_points, 3, device=device)
    xyz = xyz / xyz.norm(dim=-1).amax(1)[:, None, None]
    for step in range(2 + args.benchmark_steps):
        if step == 2:
            times.clear()
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
        sync()
        clock.last = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss_3d, loss_2d = pretrain_step(student, teacher, xyz, args, clock)
            clock('student forward')
        (loss_3d + loss_2d).backward()
        clock('backward')
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock('optimizer')
    n = args.benchmark_steps
    total = sum(times.values()) / n
    print(f'\nbenchmark: config {args.config}, batch {args.batch_size}, {args.num_points} points, '
          f'{device}, amp {args.amp}, {torch.get_num_threads()} threads, mean of {n} steps')
    print(f'{"stage":<18}{"ms / step":>12}')
    for stage, seconds in times.items():
        print(f'{stage:<18}{1000 * seconds / n:>12.1f}')
    print(f'{"step":<18}{1000 * total:>12.1f}')
    print(f'{"step w/o teacher":<18}{1000 * (total - times.get("teacher", 0) / n):>12.1f}')
    print(f'samples/s {args.batch_size / total:.1f}; peak memory {peak_memory_mb(device):.0f} MB '
          f'({"GPU allocated" if device.type == "cuda" else "process RSS"})')
