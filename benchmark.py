"""
benchmark.py: where the time, the kernel launches, the host-device syncs and the memory go, and the
check to run first on a GPU.

  python benchmark.py step [--steps 5] [pretrain.py flags]   one pre-training step, stage by stage
  python benchmark.py svm [--batch_size 32 --num_points 1024 --config full --gpu -1]
                                                       the linear-SVM feature path (svm_features)
  python benchmark.py fps [--batch_size 32 --num_points 8192 --samples 1200 --gpu -1]
                                                       fine-tuning's per-step FPS against the pool
  python benchmark.py memory [--batch_sizes 16 32 64 --gpu -1]
                                                       the paper's full step's peak memory against the batch
  python benchmark.py gpu [--gpu 0] [--tiny]           the first GPU's check: every GPU path measured, one
                                                       table, runs/gpu-check/report.json (at most 10 minutes)

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
On a GPU the profiler also counts the CUDA kernels the step launches.
`memory` runs the paper's full step (ViT-B/16 teacher, random weights, 2048 points) once per batch size
and per precision (float32, bf16 autocast), each in a process of its own, and fits the peak against
the batch: the memory per sample, and the GPU memory the paper's recipe needs.
`gpu --tiny --gpu -1` runs the gpu check's code on the CPU at a tiny size (the test suite does).
Numbers measured with them, and the commands: docs/speed.md.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # before torch loads OpenMP: waiting threads sleep (docs/speed.md)
import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tokenizer import farthest_point_sample, fps_loop
from model import I2PMAE, ModelConfig, SMALL_CONFIG
from processes import Process, setup_process
from training import param_groups
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


def cuda_kernels(step, device):
    """CUDA kernels that step() launches (copies and fills excluded), counted by the profiler; None on a CPU
    or where the profiler cannot see the GPU (it says so)."""
    if device.type != 'cuda':
        return None
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    try:
        with torch.profiler.profile(activities=activities) as profile:
            step()
            torch.cuda.synchronize(device)
    except RuntimeError as error:
        print(f'  (no kernel count: the profiler failed: {error})')
        return None
    return sum(1 for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(('Memcpy', 'Memset')))


def measure_step(args, steps, warmup=2, student=None, teacher=None, compile_backend='inductor'):
    """One training step of pretrain.py's flags `args` on random clouds, measured: milliseconds per stage
    (mean of `steps` after `warmup`), samples/s, peak memory, and the ATen ops and host syncs of each stage of
    one more step (and its CUDA kernels on a GPU). student and teacher: built from `args` if not given;
    with --compile the student is compiled (pretrain.compile_student) with `compile_backend`."""
    device = setup_process(args).device
    if teacher is None:
        teacher, _ = teacher_of(args, Process(device))
    student = student if student is not None else student_of(args, teacher).to(device)
    if args.compile:
        compile_student(student, compile_backend)
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
    for i in range(warmup + steps):
        if i == warmup:
            times.clear()
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
        sync()
        clock.last = time.perf_counter()
        step(clock)
    peak = peak_memory_mb(device)
    with StageCounts(device) as counts:
        step(counts)
    with torch.no_grad(), StageCounts(device) as fps:   # the FPS loop alone, as the tokenizer runs it
        farthest_point_sample(xyz, student.cfg.num_groups[0])
        fps('fps')
    kernels = cuda_kernels(lambda: step(lambda stage: None), device)
    ms = {stage: 1000 * seconds / steps for stage, seconds in times.items()}
    rows = [v for stage, v in counts.table.items() if stage != 'teacher']
    return dict(config=args.config, batch_size=args.batch_size, num_points=args.num_points, device=str(device),
                amp=bool(args.amp), threads=torch.get_num_threads(), steps=steps, compiled=bool(args.compile),
                stage_ms=ms, step_ms=sum(ms.values()), step_without_teacher_ms=sum(ms.values()) - ms.get('teacher', 0),
                samples_per_s=args.batch_size / (sum(ms.values()) / 1000), peak_memory_mb=peak,
                memory_before_mb=before, memory_kind='GPU, allocated' if device.type == 'cuda' else 'process RSS',
                stage_counts={stage: dict(aten_ops=k, views=v, syncs=sum(c.values()), sync_calls=dict(c),
                                          cuda_sync_warnings=w) for stage, (k, v, c, w) in counts.table.items()},
                aten_ops_without_teacher=sum(r[0] for r in rows), views_without_teacher=sum(r[1] for r in rows),
                syncs_without_teacher=sum(sum(r[2].values()) for r in rows),
                cuda_sync_warnings_without_teacher=sum(r[3] for r in rows), fps_aten_ops=fps.table['fps'][0],
                cuda_kernels=kernels)


def print_step(r):
    """measure_step's numbers as a table, with what the counts mean."""
    cuda = r['device'].startswith('cuda')
    print(f'\nbenchmark: config {r["config"]}, batch {r["batch_size"]}, {r["num_points"]} points, {r["device"]}, '
          f'amp {r["amp"]}, {r["threads"]} threads, mean of {r["steps"]} steps'
          + (', student compiled' if r['compiled'] else ''))
    print(f'{"stage":<18}{"ms / step":>12}{"ATen ops":>10}{"(views)":>9}{"syncs":>7}  sync calls')
    for stage, ms in r['stage_ms'].items():
        c = r['stage_counts'][stage]
        print(f'{stage:<18}{ms:>12.1f}{c["aten_ops"]:>10}{c["views"]:>9}{c["syncs"]:>7}  '
              + ', '.join(f'{k} x{v}' for k, v in sorted(c['sync_calls'].items())))
    print(f'{"step":<18}{r["step_ms"]:>12.1f}')
    print(f'{"step w/o teacher":<18}{r["step_without_teacher_ms"]:>12.1f}{r["aten_ops_without_teacher"]:>10}'
          f'{r["views_without_teacher"]:>9}{r["syncs_without_teacher"]:>7}')
    memory = (f'peak memory {r["peak_memory_mb"]:.0f} MB ({r["memory_kind"]}' + ('' if cuda else
              f'; {r["memory_before_mb"]:.0f} MB of it before the first step: Python, torch, the models') + ')')
    print(f'samples/s {r["samples_per_s"]:.1f}; {memory}')
    fps_ops, ops = r['fps_aten_ops'], r['aten_ops_without_teacher']
    print(f'ATen ops: operations dispatched in one more step (tokens, mask, forward, backward, AdamW(fused=True); '
          f'the teacher on its own line), counted by a TorchDispatchMode; "(views)" launch no kernel and are not '
          f'counted before them. The FPS loop makes {fps_ops} of them'
          + (f' (one CUDA graph replay); the profiler counted {r["cuda_kernels"]} CUDA kernels in a step, teacher '
             f'included' if cuda else f' (on a GPU it is one CUDA graph replay, so the step launches about '
                                       f'{ops - fps_ops + 3})') + '.')
    print('syncs: calls that make the host wait for the device (.item, .tolist, bool/int of a tensor, boolean-mask '
          'indexing, nonzero, multinomial, tensors from Python data on a device ...), counted by a TorchFunctionMode'
          + (f'; CUDA sync debug mode saw {r["cuda_sync_warnings_without_teacher"]} (teacher excluded)' if cuda
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


# ---------------------------------------------------------------- memory against the batch


# card: usable memory in MiB (what torch.cuda.mem_get_info reports of an idle card, roughly)
CARDS = {'24 GB (RTX 3090/4090, A10)': 24 * 1024, '40 GB (A100 40GB)': 40 * 1024, '80 GB (A100/H100 80GB)': 79 * 1024}
CUDA_OVERHEAD_MB = 1024   # the CUDA context, cuBLAS/cuDNN workspaces and the allocator's slack: not measured here


def imports_mb():
    """This process's resident memory now (Python, torch, the imports), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_against_batch(args):
    """The paper's full step (config, points, ViT-B/16 teacher with random weights), one process per batch size
    and precision: peak memory (GPU allocated, or process RSS on a CPU), a straight-line fit against the batch,
    and the GPU memory it implies at the paper's batch of 64."""
    results = {}
    for precision in ('fp32', 'bf16'):
        for batch in args.batch_sizes:
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, 'step.json')
                command = [sys.executable, os.path.abspath(__file__), 'step', '--steps', '1', '--warmup', '1',
                           '--json', path, '--data', 'shapenet', '--teacher_weights', 'random', '--batch_size',
                           str(batch), '--gpu', str(args.gpu), '--amp' if precision == 'bf16' else '--no-amp']
                print('$', ' '.join(command[1:]), flush=True)
                done = subprocess.run(command, stdout=subprocess.DEVNULL)
                if done.returncode != 0:   # out of memory (killed) or another failure: larger batches would not fit
                    print(f'  {precision}, batch {batch}: the step failed (exit code {done.returncode}); stopping '
                          f'{precision} here', flush=True)
                    break
                with open(path) as f:
                    results[precision, batch] = json.load(f)
                r = results[precision, batch]
                print(f'  {precision}, batch {batch}: peak {r["peak_memory_mb"]:.0f} MB ({r["memory_kind"]}), '
                      f'{r["step_ms"] / 1000:.1f} s per step', flush=True)
    print(f'\npeak memory of the full step (config full, 2048 points, ViT-B/16 teacher), '
          f'{next(iter(results.values()))["device"] if results else "-"}:')
    print(f'{"precision":<10}' + ''.join(f'{"batch " + str(b):>14}' for b in args.batch_sizes)
          + f'{"per sample":>14}{"fixed":>10}{"at 64":>10}')
    fits = {}
    for precision in ('fp32', 'bf16'):
        measured = sorted((b, r['peak_memory_mb'] - r['imports_mb']) for (p, b), r in results.items() if p == precision)
        cells = ''.join(f'{dict(measured).get(b, float("nan")):>11.0f} MB' for b in args.batch_sizes)
        if len(measured) < 2:
            print(f'{precision:<10}{cells}   (too few batch sizes for a fit)')
            continue
        per_sample, fixed = np.polyfit([b for b, _ in measured], [m for _, m in measured], 1)
        at_64 = fixed + 64 * per_sample
        fits[precision] = dict(per_sample_mb=per_sample, fixed_mb=fixed, at_64_mb=at_64)
        print(f'{precision:<10}{cells}{per_sample:>11.0f} MB{fixed:>7.0f} MB{at_64 / 1024:>7.1f} GB')
    print(f'(each: peak minus the {next(iter(results.values()))["imports_mb"]:.0f} MB of Python and torch before '
          f'anything was built; "fixed" holds the student, its optimizer state and the teacher)' if results else '')
    for precision, fit in fits.items():
        need = fit['at_64_mb'] + CUDA_OVERHEAD_MB
        largest = {card: int((mb - CUDA_OVERHEAD_MB - fit['fixed_mb']) // fit['per_sample_mb']) for card, mb in CARDS.items()}
        fit.update(need_at_64_mb=need, largest_batch=largest)
        print(f'{precision}: batch 64 needs about {need / 1024:.1f} GB on one GPU (with {CUDA_OVERHEAD_MB} MB for the '
              f'CUDA context and workspaces); the largest batch per card: '
              + ', '.join(f'{card} {b}' for card, b in largest.items()))
    return dict(measured={f'{p} batch {b}': r for (p, b), r in results.items()}, fits=fits)


# ---------------------------------------------------------------- the first GPU's check

# the paper's step: full config, 2048 points, batch 64, a ViT-B/16 teacher (random weights: nothing to download)
PAPER_STEP = ['--data', 'shapenet', '--teacher_weights', 'random']
TINY_STEP = ['--config', 'small', '--num_points', '128', '--batch_size', '4', '--teacher_weights', 'demo-random']
SHAPENET_TRAIN_CLOUDS = 52470   # ShapeNet-55's training split (docs/data.md)
GPU_CHECK = os.path.join('runs', 'gpu-check')


def step_flags(args, amp, *more):
    """pretrain.py's flags for the check's step: the paper's (or the tiny one), on --gpu, bf16 or float32."""
    return parse_args((TINY_STEP if args.tiny else PAPER_STEP) + ['--gpu', str(args.gpu), '--run_name', 'gpu-check',
                                                                 '--amp' if amp else '--no-amp', *more])


class Recording(torch.nn.Module):
    """Stands in for the student in pretrain_step: keeps what the step hands it, then runs the student."""
    def __init__(self, student):
        super().__init__()
        self.module = student

    def forward(self, *inputs):
        self.inputs = inputs
        return self.module(*inputs)


def step_under(amp, xyz, student, teacher, args):
    """(groups, masks, 2D targets, (loss_3d, loss_2d)) of one pretrain_step of the student, under bf16 autocast or
    not, from one random state (the mask's draw)."""
    model = Recording(student)
    with torch.random.fork_rng(devices=[xyz.device] if xyz.is_cuda else []), \
            torch.autocast(xyz.device.type, dtype=torch.bfloat16, enabled=amp):
        torch.manual_seed(0)
        losses = pretrain_step(model, teacher, xyz, args)
    groups, masks, target_2d, _ = model.inputs
    return groups, masks, target_2d, losses


def bf16_against_fp32(args, teacher):
    """One batch, one student (eval mode), one random state, stepped in float32 and under bf16 autocast."""
    flags = step_flags(args, False)
    device = setup_process(flags).device
    student = student_of(flags, teacher).to(device).eval()
    xyz = random_clouds(flags.batch_size, flags.num_points, device)
    (groups, masks, target, losses), (groups_16, masks_16, target_16, losses_16) = (
        step_under(amp, xyz, student, teacher, flags) for amp in (False, True))
    result = dict(tokens_identical=all(torch.equal(g.idx, h.idx) for g, h in zip(groups, groups_16)),
                  masks_identical=all(torch.equal(m, n) for m, n in zip(masks, masks_16)),
                  targets_2d_identical=torch.equal(target, target_16))
    for name, fp32, bf16 in zip(('loss_3d', 'loss_2d'), losses, losses_16):
        result.update({f'{name}_fp32': fp32.item(), f'{name}_bf16': bf16.item(),
                       f'{name}_relative_difference': (bf16.item() - fp32.item()) / fp32.item()})
    return result


def fps_graph_against_loop(args):
    """The CUDA-graph FPS against the eager loop on one batch: identical indices? ms each (mean of 5)."""
    device = torch.device('cuda', args.gpu) if args.gpu >= 0 else torch.device('cpu')
    flags = step_flags(args, False)
    xyz = random_clouds(flags.batch_size, flags.num_points, device)
    picks = (SMALL_CONFIG if flags.config == 'small' else ModelConfig()).num_groups[0]
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def timed(fps):
        fps()
        sync()
        start = time.perf_counter()
        for _ in range(5):
            indices = fps()
        sync()
        return indices, 1000 * (time.perf_counter() - start) / 5
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        loop, loop_ms = timed(lambda: fps_loop(xyz, picks))
        graph, graph_ms = timed(lambda: farthest_point_sample(xyz, picks))   # the graph on a GPU, the loop elsewhere
    fell_back = [str(w.message) for w in caught if 'CUDA graph' in str(w.message)]
    return dict(batch_size=flags.batch_size, points=flags.num_points, picks=picks, loop_ms=loop_ms,
                cuda_graph_ms=graph_ms if device.type == 'cuda' and not fell_back else None,
                identical=torch.equal(loop, graph), fell_back=fell_back)


def compile_against_eager(args, teacher, eager):
    """The step with --compile against `eager` (measure_step's numbers of the same step uncompiled). On a CPU
    (--tiny) torch.compile's 'eager' backend stands in for inductor, which would take ~40 s to compile here."""
    amp = args.gpu >= 0
    backend = 'inductor' if args.gpu >= 0 else 'eager'
    start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        compiled = measure_step(step_flags(args, amp, '--compile'), args.steps, teacher=teacher, compile_backend=backend)
    fell_back = sorted({str(w.message) for w in caught if '--compile' in str(w.message)})
    return dict(backend=backend, amp=amp, eager_step_ms=eager['step_ms'], compiled_step_ms=compiled['step_ms'],
                change=compiled['step_ms'] / eager['step_ms'] - 1, seconds_with_compiling=time.time() - start,
                fell_back=fell_back, peak_memory_mb=compiled['peak_memory_mb'])


def synthetic_end_to_end(args):
    """`python pretrain.py` for one epoch on this device, then `python svm_eval.py` of its checkpoint."""
    from train_teacher import DEMO_TEACHER_PATH
    import pretrain
    import svm_eval
    teacher = 'demo' if os.path.isfile(DEMO_TEACHER_PATH) else 'demo-random'   # training one is a CPU job
    folder = os.path.join(GPU_CHECK, 'pretrain')
    start = time.time()
    pretrain.main(parse_args(['--gpu', str(args.gpu), '--epochs', '1', '--svm_every', '0', '--teacher_weights', teacher,
                              '--run_name', os.path.relpath(folder, 'runs'), '--overwrite']
                             + (['--batch_size', '4', '--max_steps_per_epoch', '2'] if args.tiny else [])))
    minutes = (time.time() - start) / 60
    accuracy = svm_eval.main(svm_eval.parse_args(['--ckpt', os.path.join(folder, 'last.pt'), '--gpu', str(args.gpu)]))
    return dict(teacher=teacher, pretrain_minutes=minutes, svm_accuracy=accuracy,
                svm_minutes=(time.time() - start) / 60 - minutes)


def torchrun_two_processes(args):
    """One short synthetic pre-training under torchrun on 2 GPUs; skipped with fewer."""
    gpus = torch.cuda.device_count() if args.gpu >= 0 else 0
    if gpus < 2:
        return dict(skipped=f'{gpus} GPU(s): needs 2')
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', 'pretrain.py', '--epochs', '1',
               '--max_steps_per_epoch', '10', '--svm_every', '0', '--teacher_weights', 'demo-random', '--run_name',
               'gpu-check/torchrun', '--overwrite']
    done = subprocess.run(command, capture_output=True, text=True)
    agreed = 'weights identical on all 2 processes' in done.stdout
    if done.returncode != 0 or not agreed:
        raise RuntimeError(f'{" ".join(command[1:])} exited {done.returncode}: {(done.stderr or done.stdout)[-500:]}')
    return dict(processes=2, weights_identical=agreed)


def cuda_only_tests():
    """The suite's CUDA-only tests (their names hold 'cuda'; on a CPU they skip themselves)."""
    done = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-k', 'cuda',
                           os.path.join(os.path.dirname(os.path.abspath(__file__)), 'test_all.py')],
                          capture_output=True, text=True)
    summary = (done.stdout.strip().splitlines() or ['no output'])[-1]
    if done.returncode != 0:
        raise RuntimeError(f'{summary}\n{done.stdout[-3000:]}')
    return dict(summary=summary)


def gpu_check(args):
    """Every GPU path of the project, measured, each in its own try: one table and runs/gpu-check/report.json.
    Returns the report; a check that fails is a FAILED row (with its error) and the others still run."""
    device = torch.device('cuda', args.gpu) if args.gpu >= 0 else torch.device('cpu')
    report = dict(device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU', tiny=args.tiny,
                  torch=torch.__version__, cuda=torch.version.cuda, gpus=torch.cuda.device_count() if args.gpu >= 0 else 0,
                  threads=torch.get_num_threads())
    rows, started = [], time.time()

    def check(name, measure, summary):
        print(f'\n== {name} ({(time.time() - started) / 60:.1f} min so far)', flush=True)
        start = time.time()
        try:
            result = measure()
            report[name] = dict(result, seconds=time.time() - start)
            rows.append((name, summary(result)))
        except Exception as error:   # recorded, and the other checks still run
            traceback.print_exc()
            report[name] = dict(error=f'{type(error).__name__}: {error}', seconds=time.time() - start)
            rows.append((name, f'FAILED: {type(error).__name__}: {(str(error).strip() or "-").splitlines()[0]}'))
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    check('CUDA-only tests', cuda_only_tests, lambda r: r['summary'])
    teacher, _ = teacher_of(step_flags(args, False), Process(device))
    steps = {}
    for amp in (False, True):
        precision = 'bf16' if amp else 'fp32'

        def step(amp=amp, precision=precision):
            steps[precision] = measure_step(step_flags(args, amp), args.steps, teacher=teacher)
            return steps[precision]
        check(f'step {precision}', step, lambda r: (
            f'batch {r["batch_size"]}: {r["step_ms"]:.0f} ms ({r["step_without_teacher_ms"]:.0f} without the teacher), '
            f'{r["samples_per_s"]:.1f} samples/s, peak {r["peak_memory_mb"] / 1024:.2f} GB ({r["memory_kind"]}), '
            + (f'{r["cuda_kernels"]} CUDA kernels' if r['cuda_kernels'] is not None else
               f'{r["aten_ops_without_teacher"]} ATen ops w/o teacher') + f', {r["syncs_without_teacher"]} sync(s)'))
    epoch_steps = SHAPENET_TRAIN_CLOUDS // step_flags(args, False).batch_size
    check('ShapeNet-55 epoch, projected', lambda: {f'{p}_minutes': epoch_steps * r['step_ms'] / 60000
                                                   for p, r in steps.items()} | dict(steps=epoch_steps),
          lambda r: f'{epoch_steps} steps: ' + ', '.join(f'{k[:4]} {v:.1f} min (300 epochs {v * 5:.0f} h)'
                                                         for k, v in r.items() if k.endswith('minutes')))
    check('bf16 against fp32, one batch', lambda: bf16_against_fp32(args, teacher), lambda r: (
        f'tokens identical {r["tokens_identical"]}, masks identical {r["masks_identical"]}, 2D targets identical '
        f'{r["targets_2d_identical"]}; loss_3d {100 * r["loss_3d_relative_difference"]:+.2f}%, loss_2d '
        f'{100 * r["loss_2d_relative_difference"]:+.2f}%'))
    check('FPS: CUDA graph against the loop', lambda: fps_graph_against_loop(args), lambda r: (
        f'{r["picks"]} of {r["points"]} points, batch {r["batch_size"]}: loop {r["loop_ms"]:.1f} ms, '
        + (f'graph {r["cuda_graph_ms"]:.1f} ms' if r['cuda_graph_ms'] is not None else 'no CUDA graph here')
        + f', indices identical {r["identical"]}' + (f'; FELL BACK: {r["fell_back"][0]}' if r['fell_back'] else '')))
    eager = steps.get('bf16' if args.gpu >= 0 else 'fp32')
    if eager is not None:
        check('--compile', lambda: compile_against_eager(args, teacher, eager), lambda r: (
            f'backend {r["backend"]}: {r["eager_step_ms"]:.0f} -> {r["compiled_step_ms"]:.0f} ms per step '
            f'({100 * r["change"]:+.0f}%), {r["seconds_with_compiling"]:.0f} s with compiling'
            + (f'; FELL BACK: {r["fell_back"][0]}' if r['fell_back'] else '')))
    del teacher
    check('synthetic demo, one epoch, then its SVM', lambda: synthetic_end_to_end(args), lambda r: (
        f'pre-training {r["pretrain_minutes"]:.1f} min ({r["teacher"]} teacher), SVM {r["svm_accuracy"]:.1f}% in '
        f'{r["svm_minutes"]:.1f} min'))
    check('torchrun, 2 processes', lambda: torchrun_two_processes(args),
          lambda r: r.get('skipped') or f'weights identical on both: {r["weights_identical"]}')
    report['minutes'] = (time.time() - started) / 60
    os.makedirs(GPU_CHECK, exist_ok=True)
    path = os.path.join(GPU_CHECK, 'report.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(report, f, indent=1)
    os.replace(path + '.tmp', path)
    width = max(len(name) for name, _ in rows)
    print(f'\nGPU check on {report["device"]} (torch {report["torch"]}, CUDA {report["cuda"]}, {report["gpus"]} GPU(s)'
          f'{", tiny" if args.tiny else ""}), {report["minutes"]:.1f} min')
    for name, summary in rows:
        print(f'  {name:<{width}}  {summary}')
    print(f'wrote {path}')
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('what', choices=['step', 'svm', 'fps', 'memory', 'gpu'],
                   help='step: a pre-training step (the other flags are pretrain.py\'s); svm: the linear-SVM feature '
                        'path; fps: fine-tuning\'s FPS; memory: the full step\'s peak memory against the batch; gpu: '
                        'the first GPU\'s check')
    p.add_argument('--steps', type=int, default=None, help='timed steps or batches (default: 3; gpu 5, 1 with --tiny)')
    args, rest = p.parse_known_args(argv)
    if args.what == 'step':
        p.add_argument('--warmup', type=int, default=2, help='untimed steps first (default: 2)')
        p.add_argument('--json', help='also write the numbers to this file')
        args, rest = p.parse_known_args(argv)
        imported = imports_mb()
        result = dict(measure_step(parse_args(rest + ['--run_name', 'benchmark']), args.steps or 3, args.warmup),
                      imports_mb=imported)
        print_step(result)
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(result, f)
        return result
    p.add_argument('--gpu', type=int, default=0 if torch.cuda.is_available() else -1, help='GPU index, -1 = CPU')
    if args.what == 'memory':
        p.add_argument('--batch_sizes', type=int, nargs='+', default=[16, 32, 64], help='(default: 16 32 64)')
        return memory_against_batch(p.parse_args(argv))
    if args.what == 'gpu':
        p.add_argument('--tiny', action='store_true', help='a tiny step and one tiny epoch: the same code, in seconds '
                                                           '(with --gpu -1, the test suite runs it on the CPU)')
        args = p.parse_args(argv)
        args.steps = args.steps or (1 if args.tiny else 5)
        report = gpu_check(args)
        failed = [name for name, value in report.items() if isinstance(value, dict) and 'error' in value]
        if failed:
            raise SystemExit(f'gpu check: {len(failed)} check(s) FAILED: {", ".join(failed)} (report.json has the errors)')
        return report
    p.add_argument('--config', default='full', choices=['full', 'small'], help='architecture (default: full)')
    p.add_argument('--batch_size', type=int, default=32, help='clouds per batch (default: 32)')
    p.add_argument('--num_points', type=int, default=None, help='points per cloud (default: 1024 svm, 8192 fps)')
    p.add_argument('--samples', type=int, default=1200, help='fps: points kept by FPS (default: 1200)')
    p.add_argument('--pool_size', type=int, default=16, help='fps: samplings per cloud in the pool (default: 16)')
    args = p.parse_args(argv)
    args.steps = args.steps or 3
    device = torch.device('cuda', args.gpu) if args.gpu >= 0 else torch.device('cpu')
    if args.what == 'svm':
        args.num_points = args.num_points or 1024
        benchmark_svm_features(args, device)
    else:
        args.num_points = args.num_points or 8192
        benchmark_finetune_fps(args, device)


if __name__ == '__main__':
    main(sys.argv[1:])
