"""
benchmark.py: where the time, the kernel launches, the host-device syncs and the memory go.

  python benchmark.py step [--steps 5] [pretrain.py flags]   one pre-training step, stage by stage
  python benchmark.py svm [--batch_size 32 --num_points 1024 --config full --gpu -1]
                                                       the linear-SVM feature path (svm_features)
  python benchmark.py fps [--batch_size 32 --num_points 8192 --samples 1200 --gpu -1]
                                                       fine-tuning's per-step FPS against the pool

The step benchmark runs `pretrain.pretrain_step` on random clouds with the configuration
pretrain.py's flags give, 2 warm-up steps then --steps timed ones, and prints
milliseconds per stage (tokenize / project / teacher / mask / student forward / backward /
optimizer), samples/s and peak memory. One more step then runs under two counters, stage by stage:
  ATen ops      every operation PyTorch dispatches (a TorchDispatchMode), split into ops that
                launch work on the device and views/metadata ops that launch nothing
  host syncs    calls that make the host wait for the device (a TorchFunctionMode): .item(),
                .tolist(), bool()/int()/float() of a tensor, boolean-mask indexing, nonzero,
                multinomial (it checks its input on the host), .cpu()/.numpy(), tensors made from
                Python data on a device, ... On a CPU nothing really waits, so this counts the calls
                that would sync on a GPU; on a GPU, torch.cuda.set_sync_debug_mode counts as well.
Numbers measured with it, and the commands: docs/speed.md.
"""
import argparse
import resource
import sys
import time
import warnings
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tokenizer import farthest_point_sample
from model import I2PMAE, ModelConfig, SMALL_CONFIG
from training import Process, param_groups, setup_process
from pretrain import compile_student, parse_args, pretrain_step, student_of, teacher_of
from finetune import draw_from_fps_pool, fps_pool

# ATen ops that allocate or relabel memory without launching a kernel (besides views)
NO_KERNEL = {'empty', 'empty_strided', 'detach', 'lift_fresh', '_unsafe_view', 'alias', 'set_', 'resize_',
             '_reshape_alias', 'sym_size', 'sym_stride', 'sym_numel', 'is_same_size', '_local_scalar_dense'}
# Python-level calls that read a device tensor's value or size on the host
SYNC_CALLS = {'item', 'tolist', '__bool__', '__int__', '__float__', '__index__', 'numpy', 'cpu', 'nonzero',
              'argwhere', 'masked_select', 'unique', 'unique_consecutive', 'multinomial', 'equal', 'allclose',
              'bincount', 'histc', 'nonzero_static'}


class OpCounter(TorchDispatchMode):
    """Counts dispatched ATen ops: `kernels` launch work on the device, `views` only relabel memory."""
    def __init__(self):
        super().__init__()
        self.kernels, self.views = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view or func.overloadpacket.__name__ in NO_KERNEL:
            self.views += 1
        else:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def has_bool_index(index):
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in items)


class SyncCounter(TorchFunctionMode):
    """Counts the Python-level calls that wait for the device, by name (see the file docstring)."""
    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, '__name__', '')
        if (name in SYNC_CALLS
                or (name in ('__getitem__', '__setitem__') and has_bool_index(args[1]))
                or (name in ('tensor', 'as_tensor') and kwargs.get('device') is not None)
                or (name == 'to' and any(str(a) == 'cpu' for a in list(args[1:]) + list(kwargs.values())))
                or (name == 'repeat_interleave' and 'output_size' not in kwargs and torch.is_tensor(args[-1]))):
            self.calls[name] += 1
        return func(*args, **kwargs)

    @property
    def total(self):
        return sum(self.calls.values())


class StageCounts:
    """Ops and syncs per stage: `clock(stage)` books what ran since the previous call to `stage`."""
    def __init__(self, device):
        self.ops, self.syncs = OpCounter(), SyncCounter()
        self.device, self.cuda_syncs = device, []
        self.table, self.last = {}, (0, 0, Counter(), 0)

    def __enter__(self):
        if self.device.type == 'cuda':
            self.caught = warnings.catch_warnings(record=True)
            self.cuda_syncs = self.caught.__enter__()
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
        self.ops.__enter__()
        self.syncs.__enter__()
        return self

    def __exit__(self, *exc):
        self.syncs.__exit__(*exc)
        self.ops.__exit__(*exc)
        if self.device.type == 'cuda':
            torch.cuda.set_sync_debug_mode(0)
            self.caught.__exit__(*exc)

    def __call__(self, stage):
        now = (self.ops.kernels, self.ops.views, self.syncs.calls.copy(), len(self.cuda_syncs))
        kernels, views, calls, cuda = (a - b for a, b in zip(now, self.last))
        self.table[stage] = (kernels, views, calls, cuda)
        self.last = (now[0], now[1], now[2], now[3])


def peak_memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # the whole process, in MB


def memory_line(device, before_mb):
    if device.type == 'cuda':
        return f'peak memory {peak_memory_mb(device):.0f} MB (GPU allocated)'
    return (f'peak memory {peak_memory_mb(device):.0f} MB (process RSS; {before_mb:.0f} MB of it before the first '
            f'step: Python, torch, the models)')


def random_clouds(batch_size, num_points, device, seed=0):
    xyz = torch.randn(batch_size, num_points, 3, generator=torch.Generator().manual_seed(seed)).to(device)
    return xyz / xyz.norm(dim=-1).amax(1)[:, None, None]                 # inside the unit sphere


def benchmark_pretrain_step(args, steps):
    """Milliseconds per stage of one training step (pretrain.py's flags `args`), samples/s and peak memory,
    on random clouds; then ATen ops and host syncs per stage of one more step."""
    device = setup_process(args).device
    teacher, _ = teacher_of(args, Process(device))
    student = student_of(args, teacher).to(device)
    if args.compile:
        compile_student(student)
    before = peak_memory_mb(device)
    # fused: one kernel per step for all parameters (a loop over them would launch ~10 per tensor)
    optimizer = torch.optim.AdamW(param_groups(student, args.weight_decay), lr=args.lr, fused=True)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    times = {}

    def clock(stage):
        sync()
        now = time.perf_counter()
        times[stage] = times.get(stage, 0.0) + now - clock.last
        clock.last = now

    def step(clock):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss_3d, loss_2d = pretrain_step(student, teacher, xyz, args, clock)
            clock('student forward')
        (loss_3d + loss_2d).backward()
        clock('backward')
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock('optimizer')
    xyz = random_clouds(args.batch_size, args.num_points, device)
    for i in range(2 + steps):
        if i == 2:
            times.clear()
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
        sync()
        clock.last = time.perf_counter()
        step(clock)
    memory = memory_line(device, before)
    with StageCounts(device) as counts:
        step(counts)
    with torch.no_grad(), StageCounts(device) as fps:   # the FPS loop alone, as the tokenizer runs it
        farthest_point_sample(xyz, student.cfg.num_groups[0])
        fps('fps')
    n = steps
    total = sum(times.values()) / n
    print(f'\nbenchmark: config {args.config}, batch {args.batch_size}, {args.num_points} points, '
          f'{device}, amp {args.amp}, {torch.get_num_threads()} threads, mean of {n} steps'
          + (', student compiled' if getattr(args, 'compile', False) else ''))
    print(f'{"stage":<18}{"ms / step":>12}{"ATen ops":>10}{"(views)":>9}{"syncs":>7}  sync calls')
    for stage, seconds in times.items():
        kernels, views, calls, _ = counts.table[stage]
        print(f'{stage:<18}{1000 * seconds / n:>12.1f}{kernels:>10}{views:>9}{sum(calls.values()):>7}  '
              + ', '.join(f'{k} x{v}' for k, v in sorted(calls.items())))
    rows = [v for stage, v in counts.table.items() if stage != 'teacher']
    kernels, views, syncs = (sum(r[0] for r in rows), sum(r[1] for r in rows), sum(sum(r[2].values()) for r in rows))
    print(f'{"step":<18}{1000 * total:>12.1f}')
    print(f'{"step w/o teacher":<18}{1000 * (total - times.get("teacher", 0) / n):>12.1f}{kernels:>10}{views:>9}{syncs:>7}')
    print(f'samples/s {args.batch_size / total:.1f}; {memory}')
    fps_kernels = fps.table['fps'][0]
    print(f'ATen ops: operations dispatched in one more step (tokens, mask, forward, backward, AdamW(fused=True); '
          f'the teacher on its own line), counted by a TorchDispatchMode; "(views)" launch no kernel and are not '
          f'counted before them. The FPS loop makes {fps_kernels} of them'
          + (f' (on a GPU it is one CUDA graph replay, so the step launches about {kernels - fps_kernels + 3})'
             if device.type != 'cuda' else ' (one CUDA graph replay)') + '.')
    print('syncs: calls that make the host wait for the device (.item, .tolist, bool/int of a tensor, boolean-mask '
          'indexing, nonzero, multinomial, tensors from Python data on a device ...), counted by a TorchFunctionMode'
          + (f'; CUDA sync debug mode saw {sum(r[3] for r in rows)} (teacher excluded)' if device.type == 'cuda'
             else '; on a CPU nothing waits: these are the calls that would sync on a GPU') + '. Training adds one '
          'more on the steps that log the loss.')


@torch.no_grad()
def benchmark_svm_features(args, device):
    """Shapes/s of the linear-SVM feature path (I2PMAE.svm_features, eval mode) on random clouds."""
    before = peak_memory_mb(device)
    student = I2PMAE(SMALL_CONFIG if args.config == 'small' else ModelConfig()).to(device).eval()
    xyz = random_clouds(args.batch_size, args.num_points, device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    student.svm_features(xyz)                                                # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        student.svm_features(xyz)
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    with StageCounts(device) as counts:
        student.svm_features(xyz)
        counts('svm')
    kernels, views, calls, _ = counts.table['svm']
    print(f'\nsvm features: config {args.config}, batch {args.batch_size}, {args.num_points} points, {device}, '
          f'{torch.get_num_threads()} threads, mean of {args.steps} batches')
    print(f'{1000 * seconds:.1f} ms per batch, {args.batch_size / seconds:.1f} shapes/s; {memory_line(device, before)}')
    print(f'{kernels} ATen ops (+{views} views), {sum(calls.values())} syncs per batch '
          f'({", ".join(f"{k} x{v}" for k, v in sorted(calls.items()))})')


@torch.no_grad()
def benchmark_finetune_fps(args, device):
    """Fine-tuning's per-step FPS (samples of points, from a random start) against a draw from fps_pool."""
    points = random_clouds(args.batch_size, args.num_points, device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    shuffle = torch.rand(args.batch_size, args.num_points, generator=torch.Generator().manual_seed(1)).argsort(dim=1).to(device)

    def per_step():   # what finetune.py does today: shuffle, FPS from index 0
        shuffled = points.gather(1, shuffle[..., None].expand(-1, -1, 3))
        return shuffled.gather(1, farthest_point_sample(shuffled, args.samples)[..., None].expand(-1, -1, 3))
    start = time.perf_counter()
    pool = fps_pool(points, args.samples, pool_size=args.pool_size)
    sync()
    built = time.perf_counter() - start
    timings = {}
    draws = torch.Generator(device=device).manual_seed(2)
    for name, f in (('per-step FPS', per_step), ('draw from the pool', lambda: draw_from_fps_pool(points, pool, draws))):
        f()
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            f()
        sync()
        timings[name] = (time.perf_counter() - start) / args.steps
    print(f'\nfine-tuning FPS: batch {args.batch_size}, {args.samples} of {args.num_points} points, {device}, '
          f'{torch.get_num_threads()} threads')
    for name, seconds in timings.items():
        print(f'{name:<20}{1000 * seconds:>10.2f} ms per step')
    print(f'building the pool ({args.pool_size} samplings per cloud) took {built:.2f} s for these {args.batch_size} '
          f'clouds: {built / args.batch_size:.3f} s per cloud, once per run')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('what', choices=['step', 'svm', 'fps'], help='step: a pre-training step (the other flags are '
                                                                'pretrain.py\'s); svm: the linear-SVM feature path; '
                                                                'fps: fine-tuning\'s FPS')
    p.add_argument('--steps', type=int, default=3, help='timed steps or batches (default: 3)')
    args, rest = p.parse_known_args(argv)
    if args.what == 'step':
        return benchmark_pretrain_step(parse_args(rest + ['--run_name', 'benchmark']), args.steps)
    p.add_argument('--config', default='full', choices=['full', 'small'], help='architecture (default: full)')
    p.add_argument('--batch_size', type=int, default=32, help='clouds per batch (default: 32)')
    p.add_argument('--num_points', type=int, default=None, help='points per cloud (default: 1024 svm, 8192 fps)')
    p.add_argument('--samples', type=int, default=1200, help='fps: points kept by FPS (default: 1200)')
    p.add_argument('--pool_size', type=int, default=16, help='fps: samplings per cloud in the pool (default: 16)')
    p.add_argument('--gpu', type=int, default=0 if torch.cuda.is_available() else -1, help='GPU index, -1 = CPU')
    args = p.parse_args(argv)
    device = torch.device('cuda', args.gpu) if args.gpu >= 0 else torch.device('cpu')
    if args.what == 'svm':
        args.num_points = args.num_points or 1024
        benchmark_svm_features(args, device)
    else:
        args.num_points = args.num_points or 8192
        benchmark_finetune_fps(args, device)


if __name__ == '__main__':
    main(sys.argv[1:])
