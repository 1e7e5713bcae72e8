"""
training.py: the plumbing every training script shares (pretrain.py, finetune.py, and any new one).
The scripts keep the recipe -- the model, the data, `train_one_epoch` -- and use this file for the rest:

  processes    setup_process(args) -> Process(device, rank, world, collective_device); under torchrun
               it starts torch.distributed (NCCL on GPUs, gloo on CPUs); end_process(process)
  collectives  sum_over_processes, gather_from_processes, gather_rows, barrier, share_rank0_buffers,
               check_ranks_agree
  randomness   seed_process (--seed + rank), rng_state / set_rng_state: one process's own streams
               (torch CPU, its own CUDA device, NumPy, Python) as tensors and plain values
  schedule     cosine_lr, set_lr, param_groups, epoch_batches
  flags        ArgumentParser (one-line errors), the flag types that check a domain at parse time
               (positive_int, non_negative_int, positive_float, non_negative_float, fraction, gpu_index,
               seed_value), add_run_flags (--gpu --seed --resume --overwrite --save_every --tensorboard ...),
               fill_preset (a preset fills every flag the user did not give), check_resumable, refuse_finished
  user errors  run_script(main, parse_args): what every entry script's __main__ runs. A user's mistake ends
               in one message naming the flag, file or shape, exit code 1, no traceback: our own checks raise
               SystemExit(message); data.py's readers raise DataError / FileNotFoundError about the user's
               files, turned into the same there. Any other exception is a programming error: traceback
  stopping     StopOnSignal: Ctrl-C or SIGTERM lets the current step finish; the script saves, exits 130
  run folder   Run: runs/<name>/ with log.jsonl and the checkpoints; refuses to overwrite another run;
               resumes exactly; saves atomically and never non-finite weights. Run.start writes args.json
               (every resolved flag, the model configuration) and a header record in log.jsonl (git
               commit, versions, device, world size, teacher); Run.log redraws curves.png after every
               epoch record and, with --tensorboard, writes the numbers as TensorBoard scalars;
               Run.keep_snapshot keeps epoch-<N>.pt every --save_every epochs

A training script reads (pretrain.py is the example):
    process = setup_process(args)
    run = Run(os.path.join('runs', args.run_name), process)
    run.claim(args.resume, args.overwrite)                       # whose folder this is
    checkpoint = run.resume(args.resume, args, MAY_DIFFER)       # None without --resume
    refuse_finished(checkpoint, args)                            # --resume of a finished run: nothing to do
    run.start(args, model_config=..., teacher=...)               # args.json, the log's header record
    sums = torch.zeros(3, dtype=torch.float64, device=process.device)   # this process's running sums
    first_epoch, first_step = run.restore(checkpoint, model, optimizer, args, sums)
    with StopOnSignal(process) as stop:
        for epoch in range(first_epoch, args.epochs):
            stopped_at = train_one_epoch(..., sums, run, stop)   # logs via run.step_numbers, run.log
            if stopped_at < steps: run.save('last.pt', ..., epoch, stopped_at, ...); exit 130
            ... run.totals(sums, ...), run.log(...), sums.zero_(), run.save('last.pt', ..., epoch + 1, 0, ...)
            run.keep_snapshot(epoch + 1, args.save_every)
    check_ranks_agree(model, process, run.log) if process.world > 1; end_process(process)
if __name__ == '__main__':
    run_script(main, parse_args)

Resume is exact. A checkpoint holds the position (epoch, step in it), the weights and optimizer,
and for EVERY process its random state and its running sums of the epoch so far; each process
restores its own, so an interrupted and resumed run computes, and logs, what the uninterrupted run
does (bit for bit on a CPU). log.jsonl is cut back to the records the checkpoint had seen, so a run
killed with kill -9 and resumed logs nothing twice. A resume with a different number of processes
is refused unless --reseed asks for it. Checkpoints hold tensors and plain Python values only and
are read with torch.load(weights_only=True) (model.read_checkpoint): a file cannot run code.

Multi-GPU (torchrun). Each process trains on its own GPU under DistributedDataParallel with
`--batch_size / world` clouds per step and its own random streams (--seed + rank). Every process
takes part in everything: losses and epoch numbers are summed over processes (the log is the
world's, not rank 0's), the periodic SVM check extracts features on every process (gather_rows),
a non-finite loss stops every process at the same step, Ctrl-C stops them after the same step.
Only rank 0 writes files. NCCL carries only tensors on the process's CUDA device, so every
collective of ours goes through the functions below, which put their tensors on
`process.collective_device` (the CUDA device under NCCL, the CPU under gloo) and give barriers
their device. (Random states are gathered with all_gather_object, which picks its device itself.)
The two-process tests prove it on a CPU: they declare a collective device that is not the host
(torch's lazy-tensor device) and wrap torch.distributed's entry points with NCCL's rule, so a
tensor left on the host, or a barrier without its device, fails there as it would on GPUs.
"""
import argparse
import datetime
import glob
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DistributedSampler

from model import read_checkpoint
from data import DataError

# the files a run writes into runs/<name>/ (besides epoch-<N>.pt snapshots and the tensorboard/ folder);
# a new run refuses a folder holding any of them
RUN_FILES = ('last.pt', 'best.pt', 'log.jsonl', 'args.json', 'curves.png')
SNAPSHOTS = 'epoch-*.pt'          # --save_every: epoch-<epochs done>.pt
TENSORBOARD_DIR = 'tensorboard'   # --tensorboard: the event files
# what a checkpoint must hold to be continued with --resume
RESUME_KEYS = ('model', 'optimizer', 'epoch', 'step_in_epoch', 'world_size', 'ranks', 'log_records', 'args')


# ---------------------------------------------------------------- processes and collectives


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
    carrier = collective_device(dist.get_backend() if distributed else None, device)
    if args.amp is None:
        args.amp = device.type == 'cuda'
    seed_process(args.seed, rank)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return Process(device, rank, world, carrier, owns_group)


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


def gather_from_processes(tensor, process):
    """(world, *tensor.shape): every process's `tensor`, in rank order (same shape on every process)."""
    if process.world == 1:
        return tensor.detach()[None].clone()
    local = tensor.detach().to(process.collective_device)
    gathered = [torch.empty_like(local) for _ in range(process.world)]
    dist.all_gather(gathered, local)
    return torch.stack(gathered).to(tensor.device)


def gather_rows(rows, total, process):
    """Undo items[rank::world]: each process computed `rows` for items rank, rank + world, ...;
    returns all `total` rows in item order, on every process."""
    per = -(-total // process.world)                         # the most rows any process holds
    padded = rows.new_zeros(per, *rows.shape[1:])
    padded[:len(rows)] = rows
    gathered = gather_from_processes(padded, process)        # (world, per, ...): item rank + world * j at [rank, j]
    return gathered.transpose(0, 1).reshape(per * process.world, *rows.shape[1:])[:total]


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
    """After DDP training every process must hold the same weights and buffers; say so (or stop)."""
    checksum = torch.stack([t.detach().double().sum() for t in [*model.parameters(), *model.buffers()]])
    gathered = gather_from_processes(checksum, process)                                 # (world, parameters)
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError('DDP processes disagree on the weights')
    log(f'weights identical on all {process.world} processes')


# ---------------------------------------------------------------- randomness


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


# ---------------------------------------------------------------- schedule, optimiser groups, batches


def cosine_lr(progress, args):
    """Learning rate at `progress` epochs (fractional): linear warm-up from min_lr, then cosine over cosine_epochs.

    As timm's scheduler the authors used, the cosine counts from epoch 0, not from the warm-up's end.
    """
    if progress < args.warmup_epochs:
        return args.min_lr + (args.lr - args.min_lr) * progress / args.warmup_epochs
    t = min(progress / args.cosine_epochs, 1.0)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr


def param_groups(model, weight_decay):
    """AdamW groups: no decay for biases, norms and, as the authors, any name containing 'token'."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith('.bias') or 'token' in name else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def epoch_batches(num_items, batch_size, epoch, seed, rank=0, world=1):
    """This process's index batches for one epoch: DistributedSampler's seeded shuffle, split over
    processes, the last partial batch dropped. The same for a given epoch however often it is asked."""
    sampler = DistributedSampler(range(num_items), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return list(BatchSampler(sampler, batch_size // world, drop_last=True))


# ---------------------------------------------------------------- flags: every domain checked at parse time


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, the flag and what is wrong with it (no usage block above it)."""
    def error(self, message):
        sys.stderr.write(f'{self.prog}: error: {message} (--help lists every flag)\n')
        raise SystemExit(2)


def checked(text, convert, is_valid, wanted):
    """`text` converted, if it converts and is valid; else an error that argparse prefixes with the flag."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not is_valid(value):
        raise argparse.ArgumentTypeError(f'{text!r} is not {wanted}')
    return value


# argparse `type=` functions: `--epochs 0` stops at once with "argument --epochs: '0' is not a positive integer"
def positive_int(text):
    return checked(text, int, lambda v: v >= 1, 'a positive integer')


def non_negative_int(text):
    return checked(text, int, lambda v: v >= 0, 'an integer >= 0')


def positive_float(text):   # float() also reads 'nan' and 'inf': refused
    return checked(text, float, lambda v: math.isfinite(v) and v > 0, 'a finite number > 0')


def non_negative_float(text):
    return checked(text, float, lambda v: math.isfinite(v) and v >= 0, 'a finite number >= 0')


def fraction(text):
    return checked(text, float, lambda v: 0 <= v < 1, 'a fraction in [0, 1) (0.1 means 10%)')


def gpu_index(text):
    return checked(text, int, lambda v: v >= -1, 'a GPU index (0, 1, ...) or -1 for the CPU')


def seed_value(text):   # NumPy seeds must lie in [0, 2**32); each process adds its rank
    return checked(text, int, lambda v: 0 <= v < 2 ** 31, 'a seed in [0, 2**31)')


def add_run_flags(parser, script):
    """The flags every training script has: device, seed, run folder, resume, logging."""
    s = parser.add_argument_group('system')
    s.add_argument('--gpu', type=gpu_index, default=0 if torch.cuda.is_available() else -1, help='GPU index, -1 = CPU')
    s.add_argument('--amp', action=argparse.BooleanOptionalAction, help='bf16 autocast (default: on for GPU, off for CPU)')
    s.add_argument('--seed', type=seed_value, default=0, help='random streams: process r uses --seed + r (default: 0)')
    s.add_argument('--deterministic', action='store_true', help='deterministic algorithms (slower)')
    s.add_argument('--run_name', help=f'runs/<run_name>/ (default: {script}-<data>)')
    s.add_argument('--resume', help='checkpoint to continue from (runs/<run_name>/last.pt)')
    s.add_argument('--reseed', action='store_true', help='with --resume: allow another number of processes, '
                                                         'reseeding every one (the run no longer retraces the original)')
    s.add_argument('--overwrite', action='store_true', help='start over in a run folder that holds another run')
    s.add_argument('--log_every', type=positive_int, default=20, help='steps between progress lines')
    s.add_argument('--save_every', type=non_negative_int, default=0,
                   help='also keep runs/<run_name>/epoch-<N>.pt every N epochs (0 = only last.pt)')
    s.add_argument('--tensorboard', action='store_true',
                   help='also write the logged numbers as TensorBoard scalars to runs/<run_name>/tensorboard/ '
                        '(needs the tensorboard package, not in requirements.txt)')
    return s


def run_script(main, parse_args):
    """What every entry script's `if __name__ == '__main__':` runs. A user's mistake ends in its message
    alone, exit code 1, no traceback: our own checks raise SystemExit(message) (flags, checkpoints, run
    folders); data.py's readers raise DataError, or FileNotFoundError, about the user's dataset files
    (a library's exceptions), turned into the same here. Any other exception is a programming error and
    keeps its traceback."""
    try:
        return main(parse_args())
    except (DataError, FileNotFoundError) as error:
        raise SystemExit(f'error: {error}') from None


def refuse_finished(checkpoint, args):
    """--resume of a run that has done its --epochs: say so (nothing to do) instead of exiting silently."""
    if checkpoint is not None and checkpoint['epoch'] >= args.epochs:
        raise SystemExit(f'--resume {args.resume}: the run has done {checkpoint["epoch"]} epoch(s) and --epochs is '
                         f'{args.epochs}: nothing to do (pass a larger --epochs to train it further)')


def fill_preset(args, preset):
    """Every flag the user did not give (still None) takes the preset's value. argparse has already
    resolved abbreviations (--batch 16 is --batch_size 16), so a given flag is never overridden."""
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def as_plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def check_resumable(checkpoint, path, args, may_differ, **now):
    """Refuse, naming every difference, a checkpoint written with other flags than `args` (all but
    `may_differ`, which do not change the run: more --epochs, another --gpu ...) or other `now` values."""
    saved = checkpoint['args']
    mismatches = [f'--{k}: checkpoint {saved.get(k)!r}, now {v!r}' for k, v in sorted(vars(args).items())
                  if k not in may_differ and as_plain(saved.get(k)) != as_plain(v)]
    for name, value in now.items():
        old = checkpoint.get(name)
        if isinstance(value, dict) and isinstance(old, dict):
            mismatches += [f'{name}.{k}: checkpoint {old.get(k)!r}, now {v!r}' for k, v in value.items()
                           if as_plain(old.get(k)) != as_plain(v)]
        elif old != value:
            mismatches.append(f'{name}: checkpoint {old!r}, now {value!r}')
    if mismatches:
        raise SystemExit(f'--resume {path}: the run was started differently, so it cannot continue exactly:\n  '
                         + '\n  '.join(mismatches) + '\n(resume with the flags it was started with)')


def file_sha256(path):
    """Hex SHA-256 of a file: what a checkpoint records of a weights file it depends on."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- stopping on Ctrl-C


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM asks the training loop to stop after the step it is in; the script
    then saves where to continue and exits with 130. (A step cut short leaves BatchNorm statistics,
    the random streams or the optimizer half-way, and a resume could not retrace the run.)

    One process: the loop checks `stop.now(process)` after every step; a second Ctrl-C stops at once,
    saving nothing. Under torchrun all processes must stop after the same step: they agree at the
    next logging step (Run.step_numbers sums the requests), and repeated signals change nothing (the
    terminal and torchrun both pass Ctrl-C on). torchrun kills its workers 30 s after Ctrl-C: keep
    --log_every steps shorter than that, or the run ends at its previous checkpoint.
    """
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, process):
        self.process, self.requested, self.agreed, self.previous = process, False, False, {}

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        self.requested = True
        if self.process.world == 1:   # the next one acts at once
            signal.signal(signum, self.previous[signum])

    def now(self, process):
        return self.requested if process.world == 1 else self.agreed

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------- the run folder: log and checkpoints


def save_atomically(path, content):
    """torch.save to path.tmp, then rename: a crash or a full disk leaves the previous file intact, and
    no .tmp behind. A write that fails (a full disk, a file-size limit) stops with a message saying so."""
    try:
        torch.save(content, path + '.tmp')
    except BaseException as error:
        if os.path.exists(path + '.tmp'):
            os.remove(path + '.tmp')
        if isinstance(error, (OSError, RuntimeError)):   # torch reports a short write as RuntimeError
            free = shutil.disk_usage(os.path.dirname(path) or '.').free
            kept = f'the previous {os.path.basename(path)} is intact' if os.path.exists(path) else 'nothing was written'
            raise SystemExit(f'could not write {path} ({type(error).__name__}: {str(error).splitlines()[0]}); the disk '
                             f'holding it has {free / 2 ** 20:.0f} MiB free; {kept}') from None
        raise
    os.replace(path + '.tmp', path)


def git_state(folder):
    """'<commit>' or '<commit> (uncommitted changes)' of the repository holding `folder`, or why there is none."""
    def git(*words):
        return subprocess.run(['git', '-C', folder, *words], capture_output=True, text=True, timeout=10)
    try:
        commit = git('rev-parse', 'HEAD')
    except (OSError, subprocess.SubprocessError) as error:
        return f'unknown: git cannot be run ({type(error).__name__})'
    if commit.returncode != 0:
        return 'unknown: not a git repository'
    changed = git('status', '--porcelain', '--untracked-files=no').stdout.strip()
    return commit.stdout.strip() + (' (uncommitted changes)' if changed else '')


def package_version(name):
    try:   # asked of the installed package's metadata: importing torchvision costs seconds
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return 'not installed'


def run_header(process, **about):
    """Where and how this session runs: a log.jsonl record researchers can compare weeks later."""
    device = process.device
    return dict(header=True, time=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
                command=' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
                git=git_state(os.path.dirname(os.path.abspath(__file__))),
                python=platform.python_version(), torch=torch.__version__, torchvision=package_version('torchvision'),
                cuda=torch.version.cuda if torch.cuda.is_available() else f'not available (build {torch.version.cuda})',
                device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else
                f'CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores',
                world_size=process.world, **about)


class Run:
    """One training run as its processes see it: runs/<name>/ (log.jsonl, last.pt, best.pt, args.json,
    curves.png, epoch-<N>.pt, tensorboard/), written by rank 0 only, and what was last saved there (so
    that an error message can say it truly).

    log(line, **numbers) prints on rank 0 and, with numbers, appends them as one JSON record;
    `records` counts them, every checkpoint stores the count, and a resume cuts the log back to it.
    After a record of a whole epoch (it has 'epoch' and no 'step') curves.png is redrawn from log.jsonl.
    """
    def __init__(self, folder, process):
        self.folder, self.process = folder, process
        self.records, self.last_saved = 0, 'no checkpoint of this run saved yet'
        self.tensorboard = None   # a SummaryWriter, with --tensorboard (Run.start)
        self.session_start, self.session_steps = time.time(), 0   # for eta_minutes

    def eta_minutes(self, steps_left):
        """Minutes left at this session's mean pace so far (count steps in session_steps): the pace of the
        last logging window alone swings several-fold on a shared machine."""
        return (time.time() - self.session_start) / max(self.session_steps, 1) * steps_left / 60

    def path(self, name):
        return os.path.join(self.folder, name)

    def found_files(self):
        """The run files already in the folder (rank 0 looks)."""
        if self.process.rank != 0:
            return []
        snapshots = sorted(os.path.basename(p) for p in glob.glob(self.path(SNAPSHOTS)))
        board = [TENSORBOARD_DIR + '/'] if os.path.isdir(self.path(TENSORBOARD_DIR)) else []
        return [f for f in RUN_FILES if os.path.exists(self.path(f))] + snapshots + board

    def claim(self, resume=None, overwrite=False):
        """Make the folder this run's. Another run's files there are refused unless --resume continues
        that run or --overwrite deletes them."""
        continuing = resume is not None and os.path.realpath(os.path.dirname(resume)) == os.path.realpath(self.folder)
        found = self.found_files()
        refused = bool(found) and not continuing and not overwrite
        if sum_over_processes(torch.tensor(float(refused), device=self.process.device), self.process).item() > 0:
            raise SystemExit(f'{self.folder} holds another run ({", ".join(found) or "see rank 0"}): continue it with '
                             f'--resume {self.path("last.pt")}, start over with --overwrite (deletes them), or '
                             f'choose another --run_name')
        if self.process.rank == 0:
            os.makedirs(self.folder, exist_ok=True)
            for name in found if overwrite and not continuing else []:
                shutil.rmtree(self.path(name)) if name.endswith('/') else os.remove(self.path(name))
        barrier(self.process)

    def start(self, args, args_file=True, **about):
        """Begin this session: args.json (every resolved flag, and `about`: the model configuration, the
        teacher, ...; args_file=False leaves another session's file alone) and a header record in
        log.jsonl (run_header: git commit, versions, device, world size, and `about` again), on rank 0.
        With --tensorboard, opens the TensorBoard writer."""
        if self.process.rank == 0:
            os.makedirs(self.folder, exist_ok=True)
            if args_file:
                with open(self.path('args.json.tmp'), 'w') as f:
                    json.dump(dict(args=vars(args), **about), f, indent=1, default=str)
                os.replace(self.path('args.json.tmp'), self.path('args.json'))
            if getattr(args, 'tensorboard', False):
                self.tensorboard = tensorboard_writer(self.path(TENSORBOARD_DIR))
        header = run_header(self.process, **about, **({} if args_file else {'args': vars(args)}))
        self.log(f'run folder {self.folder} ({"args.json; " if args_file else ""}a header record in log.jsonl): git '
                 f'{header["git"]}, torch {header["torch"]}, {header["device_name"]}', **header)

    def log(self, line, **numbers):
        if self.process.rank == 0:
            print(line, flush=True)
            if numbers:
                os.makedirs(self.folder, exist_ok=True)
                with open(self.path('log.jsonl'), 'a') as f:
                    f.write(json.dumps(numbers) + '\n')
                if self.tensorboard is not None:
                    add_scalars(self.tensorboard, numbers)
                if 'epoch' in numbers and 'step' not in numbers:   # a whole epoch: redraw the curves
                    self.draw_curves()
        self.records += bool(numbers)

    def draw_curves(self):
        """Redraw curves.png from log.jsonl (atomically: a viewer never sees half a picture)."""
        from pictures import curves_picture   # here, not at the top: pictures.py imports torchvision (seconds)
        with open(self.path('log.jsonl')) as f:
            records = [json.loads(line) for line in f if line.endswith('\n')]
        picture = curves_picture(records, f'runs/{os.path.basename(self.folder)}')
        if picture is not None:
            picture.save(self.path('curves.png.tmp'), format='PNG')
            os.replace(self.path('curves.png.tmp'), self.path('curves.png'))

    def keep_snapshot(self, epochs_done, every):
        """--save_every: a copy of last.pt as epoch-<epochs_done>.pt every `every` epochs (a fixed schedule:
        snapshots are never chosen by any accuracy). Call right after saving last.pt."""
        if every and epochs_done % every == 0 and self.process.rank == 0:
            name = f'epoch-{epochs_done}.pt'
            try:
                shutil.copyfile(self.path('last.pt'), self.path(name + '.tmp'))
            except OSError as error:
                if os.path.exists(self.path(name + '.tmp')):
                    os.remove(self.path(name + '.tmp'))
                raise SystemExit(f'could not write {self.path(name)} ({error}); last.pt is intact') from None
            os.replace(self.path(name + '.tmp'), self.path(name))
        barrier(self.process)

    def end_of_epoch(self, epoch, save_every, stop):
        """After last.pt of an epoch is saved: the --save_every snapshot, then stop (exit 130) if a Ctrl-C
        came during the epoch's last step."""
        self.keep_snapshot(epoch + 1, save_every)
        if stop.now(self.process):
            self.log(f'stopped after epoch {epoch}; continue with --resume {self.path("last.pt")}')
            raise SystemExit(130)

    def cut_log(self, records):
        """Keep the first `records` complete records of log.jsonl: what a checkpoint had seen."""
        path, self.records = self.path('log.jsonl'), 0
        if self.process.rank == 0 and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.endswith('\n')][:records]
            with open(path + '.tmp', 'w') as f:
                f.writelines(kept)
            os.replace(path + '.tmp', path)
            self.records = len(kept)

    def resume(self, path, args, may_differ, **now):
        """The checkpoint at `path` (None without --resume), checked to continue this run exactly:
        the same flags (check_resumable), the same number of processes unless --reseed."""
        if path is None:
            return None
        checkpoint = read_checkpoint(path, '--resume')
        missing = [k for k in RESUME_KEYS if k not in checkpoint]
        if missing:
            raise SystemExit(f'--resume {path}: not a point to continue from (it has no {", ".join(missing)}); '
                             f'resume from the last.pt a training run wrote')
        check_resumable(checkpoint, path, args, may_differ, **now)
        if checkpoint['world_size'] != self.process.world and not args.reseed:
            raise SystemExit(f'--resume {path}: written by {checkpoint["world_size"]} process(es), this run has '
                             f'{self.process.world}: every process\'s random streams and share of the data would '
                             f'change. Resume with {checkpoint["world_size"]} process(es), or pass --reseed to go on '
                             f'with {self.process.world} (reseeded: the run then no longer retraces the original)')
        self.cut_log(checkpoint['log_records'])
        self.last_saved = f'{path} holds epoch {checkpoint["epoch"]} step {checkpoint["step_in_epoch"]}'
        return checkpoint

    def restore(self, checkpoint, model, optimizer, args, sums):
        """(epoch, step) to continue at: loads the weights and the optimizer, and gives this process its
        own random state and its running sums (into `sums`). Without a checkpoint: (0, 0)."""
        if checkpoint is None:
            return 0, 0
        model.load_state_dict(checkpoint['model'], strict=True)
        optimizer.load_state_dict(checkpoint['optimizer'])
        epoch, step, ranks = checkpoint['epoch'], checkpoint['step_in_epoch'], checkpoint['ranks']
        if checkpoint['world_size'] == self.process.world:
            set_rng_state(ranks[self.process.rank]['rng'], self.process.device)
            sums.copy_(ranks[self.process.rank]['sums'])
            return epoch, step
        # --reseed: each process's streams derived from (--seed, position, rank); the epoch's sums so far go to rank 0
        seed_process(int(np.random.SeedSequence([args.seed, epoch, step, self.process.rank]).generate_state(1)[0]))
        self.log(f'resumed {len(ranks)} process(es) as {self.process.world}: every process reseeded (--reseed)')
        sums.zero_()
        if self.process.rank == 0:
            sums.copy_(sum(r['sums'] for r in ranks))
        return epoch, step

    def step_numbers(self, values, stop, where):
        """{name: this process's scalar tensor} -> {name: mean over processes}, read at a logging step
        (one collective, one device sync). The processes also agree here whether to stop (stop.agreed).
        A non-finite value stops every process, each with the same message."""
        local = torch.stack([v.detach().double().reshape(()) for v in values.values()])
        flag = torch.tensor([float(stop.requested)], dtype=torch.float64, device=local.device)
        *totals, stops = sum_over_processes(torch.cat([local, flag]), self.process).tolist()
        stop.agreed = stops > 0
        means = {name: total / self.process.world for name, total in zip(values, totals)}
        if not all(math.isfinite(m) for m in means.values()):
            raise FloatingPointError(f'non-finite loss at {where} ({", ".join(f"{k} {v}" for k, v in means.items())}): '
                                     f'every process stops, nothing saved; {self.last_saved}')
        return means

    def end_of_step(self, epoch, step, steps, lr, loss, stop, log_every):
        """The end of a fine-tuning step: a progress line every `log_every` steps and at the epoch's last
        (every process at the same steps, the loss averaged over them); True if Ctrl-C asked to stop."""
        if (step + 1) % log_every == 0 or step + 1 == steps:
            mean = self.step_numbers(dict(loss=loss), stop, f'epoch {epoch} step {step + 1}')['loss']
            self.log(f'  epoch {epoch} step {step + 1}/{steps} loss {mean:.4f} lr {lr:.2e}')
        return stop.now(self.process)

    def totals(self, sums, where):
        """The running sums of every process added up (floats); a non-finite one stops every process."""
        totals = sum_over_processes(sums, self.process).tolist()
        if not all(math.isfinite(t) for t in totals):
            raise FloatingPointError(f'non-finite loss in {where}: every process stops, nothing saved; {self.last_saved}')
        return totals

    def save(self, name, model, epoch, step, args, optimizer=None, sums=None, **extra):
        """Write runs/<name>/<name> atomically, on rank 0, continuing at (epoch, step). Every process
        calls it: the weights are checked finite everywhere first (exploded weights are never saved,
        the previous file stays), and with an optimizer it is a resume point holding every process's
        random state and running sums. `extra`: what the script adds (model_config, teacher, ...)."""
        where = f'epoch {epoch} step {step}'
        floats = [t for t in model.state_dict().values() if t.is_floating_point()]
        bad = torch.stack([~t.isfinite().all() for t in floats]).any().double()
        if sum_over_processes(bad, self.process).item() > 0:
            raise FloatingPointError(f'non-finite weights before saving {name} at {where}: not saved, every process '
                                     f'stops; {self.last_saved}')
        resumable = optimizer is not None
        ranks = [None] * self.process.world
        if resumable and self.process.world > 1:
            dist.all_gather_object(ranks, {'rng': rng_state(self.process.device), 'sums': sums.cpu()})
        elif resumable:
            ranks = [{'rng': rng_state(self.process.device), 'sums': sums.cpu()}]
        if self.process.rank == 0:
            content = dict(
                about=f'{name} of runs/{os.path.basename(self.folder)}: weights of {type(model).__name__}'
                      + (f', optimizer, and per process its random state and running sums; --resume continues '
                         f'at {where}' if resumable else f' at {where} (weights only: not a resume point)'),
                model=model.state_dict(), epoch=epoch, step_in_epoch=step, args=vars(args), **extra)
            if resumable:
                content.update(optimizer=optimizer.state_dict(), world_size=self.process.world, ranks=ranks,
                               log_records=self.records)
            os.makedirs(self.folder, exist_ok=True)
            save_atomically(self.path(name), content)
        barrier(self.process)   # on return the file is there, for every process
        if resumable:
            self.last_saved = f'{self.path(name)} holds {where}'


def tensorboard_writer(folder):
    """A TensorBoard SummaryWriter on `folder`; TensorBoard is optional, so it is imported only when asked for."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit('--tensorboard needs the tensorboard package, which this environment lacks: pip install '
                         'tensorboard (it is optional, not in requirements.txt), or run without --tensorboard; '
                         'log.jsonl and curves.png hold the same numbers') from None
    return SummaryWriter(folder)


def add_scalars(writer, record):
    """A log.jsonl record as TensorBoard scalars: step records (with 'global_step') under step/<name>, epoch
    records under epoch/<name> at epochs done; few-shot records under their fold. Flushed at once."""
    if 'epoch' not in record or ('step' in record and 'global_step' not in record):
        return
    at, kind = (record['global_step'], 'step') if 'step' in record else (record['epoch'] + 1, 'epoch')
    prefix = f'{record["fold"]}/' if 'fold' in record else ''
    for name, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in ('epoch', 'step', 'global_step'):
            writer.add_scalar(f'{prefix}{kind}/{name}', value, at)
    writer.flush()
