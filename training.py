"""
training.py: the epoch loop pretrain.py, finetune.py and segment.py share, and its plumbing. A script
keeps its recipe (model, data, one training step, the evaluation) and hands it to `train`, which sets
the learning rate every step (cosine_lr), logs, evaluates and saves runs/<name>/last.pt every epoch.
Its guarantees, each tested:
  - exact resume: a checkpoint holds the position (epoch, step), weights, optimizer, and for EVERY process
    its random state and running sums; a resumed run computes and logs what the uninterrupted one does
    (bit for bit on a CPU), and log.jsonl is cut back to what the checkpoint had seen;
  - Ctrl-C (or SIGTERM) lets the step finish, saves, exits with 130; a second Ctrl-C stops at once;
  - saves are atomic and never of non-finite weights; a non-finite loss stops every process;
  - under torchrun (DDP) every process takes part in everything, through the collectives of processes.py
    (NCCL carries only tensors on the process's GPU), and the logged numbers are the world's.
"""
import datetime
import glob
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DistributedSampler

from checkpoints import read_checkpoint, save_atomically
from processes import (barrier, check_ranks_agree, rng_state, seed_process, set_rng_state, share_rank0_buffers,
                       sum_over_processes)
from pictures import curves_picture

# the files a run writes into runs/<name>/ (besides epoch-<N>.pt snapshots and tensorboard/);
# a new run refuses a folder holding any of them
RUN_FILES = ('last.pt', 'best.pt', 'log.jsonl', 'args.json', 'curves.png')


# ---------------------------------------------------------------- schedule and batches


def cosine_lr(progress, args):
    """Learning rate at `progress` epochs (fractional): linear warm-up from min_lr, then cosine over cosine_epochs.

    As timm's scheduler the authors used, the cosine counts from epoch 0, not from the warm-up's end.
    """
    if progress < args.warmup_epochs:
        return args.min_lr + (args.lr - args.min_lr) * progress / args.warmup_epochs
    t = min(progress / args.cosine_epochs, 1.0)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))


def schedule_line(args, steps):
    """The run's learning-rate schedule in words, for its log."""
    warmup = (f'rising from {args.min_lr:g} to {args.lr:g} over {args.warmup_epochs} warm-up epoch(s)' if args.warmup_epochs
              else f'{args.lr:g} from the first step')
    return (f'schedule: {args.epochs} epoch(s) of {steps} step(s); learning rate {warmup}, then a cosine over '
            f'{args.cosine_epochs} epochs towards {args.min_lr:g}, at {cosine_lr(args.epochs, args):.2g} when the run '
            f'ends' + (f' (the cosine spans {args.cosine_epochs} epochs)' if args.cosine_epochs > args.epochs else ''))


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


# ---------------------------------------------------------------- Ctrl-C


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the step it is in (a step cut short would
    leave BatchNorm statistics, the random streams or the optimizer half-way, and a resume could not
    retrace the run). One process: a second Ctrl-C stops at once, saving nothing. Under torchrun all
    processes must stop after the same step: they agree at the next logging step (Run.step_numbers);
    torchrun kills its workers 30 s after Ctrl-C, so keep --log_every steps shorter than that."""
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

    def now(self):
        return self.requested if self.process.world == 1 else self.agreed

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------- the run folder


def position(epoch, step):
    """Where a checkpoint continues, in words: epochs done, and steps done of the next (log.jsonl and the
    checkpoint count `epoch` from 0; the console and curves.png count epochs from 1)."""
    return f'{epoch} epoch(s) done' + (f', {step} step(s) of epoch {epoch + 1}' if step else '')


def run_header(process, **about):
    """Where and how this session runs: a log.jsonl record researchers can compare weeks later."""
    try:   # the commit, '-dirty' if a tracked file changed
        git = subprocess.run(['git', '-C', os.path.dirname(os.path.abspath(__file__)), 'describe', '--always',
                              '--dirty', '--abbrev=40', '--exclude=*'], capture_output=True, text=True, timeout=10)
        commit = git.stdout.strip() if git.returncode == 0 else 'unknown: not a git repository'
    except (OSError, subprocess.SubprocessError) as error:
        commit = f'unknown: git cannot be run ({type(error).__name__})'
    device = process.device
    return dict(header=True, time=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
                command=' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]), git=commit,
                python=platform.python_version(), torch=torch.__version__,
                torchvision=importlib.metadata.version('torchvision'),   # not imported: that costs seconds
                cuda=torch.version.cuda if torch.cuda.is_available() else f'not available (build {torch.version.cuda})',
                device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else
                f'CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores',
                world_size=process.world, **about)


def run_folder(args):
    """A resumed run lives where its checkpoint is; a new one in runs/<run_name>/."""
    return os.path.dirname(args.resume) or '.' if args.resume else os.path.join('runs', args.run_name)


class Run:
    """One run as its processes see it: its folder (written by rank 0 only) and what was last saved there,
    so that a message can say it truly. log(line, **numbers) prints on rank 0 and appends the numbers as one
    record to log.jsonl; a checkpoint stores how many records it has seen, and a resume cuts the log back to
    that many, so a run killed and resumed logs nothing twice. curves.png is redrawn after each epoch record.
    script: the file that runs it (pretrain.py, ...), for the commands it prints."""
    def __init__(self, folder, process, script):
        self.folder, self.process, self.script = folder, process, script
        self.records, self.last_saved, self.tensorboard = 0, 'no checkpoint of this run saved yet', None
        self.started = time.time()

    def path(self, name):
        return os.path.join(self.folder, name)

    def command(self, *flags):
        """The shell command that runs this script with `flags`, as this run was launched (python or torchrun)."""
        launcher = 'python' if self.process.world == 1 else f'torchrun --nproc_per_node={self.process.world}'
        return ' '.join([launcher, self.script, *flags])

    def claim(self, overwrite=False):
        """A new run's folder: another run's files there are refused, unless --overwrite deletes them."""
        found = [] if self.process.rank else [
            f for f in RUN_FILES if os.path.exists(self.path(f))] + sorted(
            os.path.basename(p) for p in glob.glob(self.path('epoch-*.pt'))) + (
            ['tensorboard/'] if os.path.isdir(self.path('tensorboard')) else [])
        if sum_over_processes(torch.tensor(float(bool(found) and not overwrite)), self.process).item() > 0:
            raise SystemExit(f'{self.folder} holds another run ({", ".join(found) or "see rank 0"}): continue it with '
                             f'{self.command("--resume", self.path("last.pt"))}, start over with --overwrite (deletes '
                             f'them), or choose another --run_name')
        for name in found:
            shutil.rmtree(self.path(name)) if name.endswith('/') else os.remove(self.path(name))
        barrier(self.process)

    def resume(self, args):
        """The checkpoint of --resume, checked to continue this run exactly; a new run claims its folder (None)."""
        if args.resume is None:
            return self.claim(args.overwrite)
        checkpoint = read_checkpoint(args.resume, '--resume')
        if checkpoint['world_size'] != self.process.world and not args.reseed:
            raise SystemExit(f'--resume {args.resume}: written by {checkpoint["world_size"]} process(es), this run has '
                             f'{self.process.world}: every process\'s random streams and share of the data would '
                             f'change. Resume with {checkpoint["world_size"]} process(es), or pass --reseed to go on '
                             f'with {self.process.world} (reseeded: the run then no longer retraces the original)')
        self.records = checkpoint['log_records']
        if self.process.rank == 0 and os.path.exists(self.path('log.jsonl')):   # what the checkpoint had seen
            with open(self.path('log.jsonl')) as f:
                kept = [line for line in f if line.endswith('\n')][:self.records]
            with open(self.path('log.jsonl.tmp'), 'w') as f:
                f.writelines(kept)
            os.replace(self.path('log.jsonl.tmp'), self.path('log.jsonl'))
        self.last_saved = f'{args.resume} holds {position(checkpoint["epoch"], checkpoint["step_in_epoch"])}'
        self.log(f'resuming {args.resume}: {position(checkpoint["epoch"], checkpoint["step_in_epoch"])}')
        return checkpoint

    def start(self, args, **about):
        """Begin this session: args.json (every resolved flag and `about`: the model configuration, the
        teacher, ...) and a header record in log.jsonl (time, command, git commit, versions, device)."""
        if self.process.rank == 0:
            os.makedirs(self.folder, exist_ok=True)
            with open(self.path('args.json.tmp'), 'w') as f:
                json.dump(dict(args=vars(args), **about), f, indent=1, default=str)
            os.replace(self.path('args.json.tmp'), self.path('args.json'))
            if getattr(args, 'tensorboard', False):   # optional: flags.parse_run_flags checked it is installed
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(self.path('tensorboard'))
        resumed = {'resumed_from': args.resume} if getattr(args, 'resume', None) else {}
        header = run_header(self.process, **about, **resumed)
        self.log(f'{self.folder}: args.json, log.jsonl; git {header["git"]}, torch {header["torch"]}, '
                 f'{header["device_name"]}, {self.process.world} process(es)'
                 + ''.join(f'\n  resumed with --allow_changes: {change}' for change in getattr(args, 'changes', [])),
                 **header)

    def log(self, line, **numbers):
        if self.process.rank == 0:
            print(line, flush=True)
            if numbers:
                os.makedirs(self.folder, exist_ok=True)
                with open(self.path('log.jsonl'), 'a') as f:
                    f.write(json.dumps(numbers) + '\n')
                if 'epoch' in numbers and 'step' not in numbers:   # a whole epoch
                    self.draw_curves()
                if self.tensorboard is not None and 'epoch' in numbers:
                    at = numbers.get('global_step', numbers['epoch'] + 1)
                    for key, value in numbers.items():
                        if isinstance(value, (int, float)) and key not in ('epoch', 'step', 'global_step'):
                            self.tensorboard.add_scalar(f'{"step" if "step" in numbers else "epoch"}/{key}', value, at)
                    self.tensorboard.flush()
        self.records += bool(numbers)

    def draw_curves(self):
        """Redraw curves.png from log.jsonl (atomically: a viewer never sees half a picture)."""
        with open(self.path('log.jsonl')) as f:
            picture = curves_picture([json.loads(line) for line in f if line.endswith('\n')], self.folder)
        if picture is not None:
            picture.save(self.path('curves.png.tmp'), format='PNG')
            os.replace(self.path('curves.png.tmp'), self.path('curves.png'))

    def step_numbers(self, values, stop, where):
        """{name: this process's scalar tensor} -> {name: mean over processes}, read at a logging step (one
        collective, one device sync). The processes also agree here whether to stop; a non-finite value
        stops every process, each with the same message."""
        local = torch.stack([v.detach().double().reshape(()) for v in values.values()])
        flag = local.new_tensor([float(stop.requested)])
        *totals, stops = sum_over_processes(torch.cat([local, flag]), self.process).tolist()
        stop.agreed = stops > 0
        means = {name: total / self.process.world for name, total in zip(values, totals)}
        if not all(math.isfinite(m) for m in means.values()):
            raise FloatingPointError(f'non-finite loss at {where} ({", ".join(f"{k} {v}" for k, v in means.items())}): '
                                     f'every process stops, nothing saved; {self.last_saved}')
        return means

    def save(self, name, model, epoch, step, args, optimizer=None, sums=None, **content):
        """Write <folder>/<name> atomically, on rank 0, continuing at (epoch, step); every process calls it.
        The weights are checked finite everywhere first: exploded weights are never saved, the previous file
        stays. With an optimizer it is a resume point: every process's random state and running sums."""
        where = position(epoch, step)
        bad = torch.stack([~t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()])
        if sum_over_processes(bad.any().double(), self.process).item() > 0:
            raise FloatingPointError(f'non-finite weights before saving {name} at {where}: not saved, every process '
                                     f'stops; {self.last_saved}')
        ranks = [{'rng': rng_state(self.process.device), 'sums': sums.cpu()}] if optimizer else None
        if optimizer and self.process.world > 1:
            ranks = [None] * self.process.world
            dist.all_gather_object(ranks, {'rng': rng_state(self.process.device), 'sums': sums.cpu()})
        if self.process.rank == 0:
            content = dict(about=f'{name} of {self.folder}: weights of {type(model).__name__} at {where}'
                                 + (', a point --resume continues from' if optimizer else ' (weights only)'),
                           model=model.state_dict(), epoch=epoch, step_in_epoch=step, args=vars(args), **content)
            if optimizer:
                content.update(optimizer=optimizer.state_dict(), world_size=self.process.world, ranks=ranks,
                               log_records=self.records)
            os.makedirs(self.folder, exist_ok=True)
            save_atomically(self.path(name), content)
        barrier(self.process)   # on return the file is there, for every process
        if optimizer:
            self.last_saved = f'{self.path(name)} holds {where}'

    def restore(self, checkpoint, model, optimizer, args, sums):
        """(epoch, step, history) to continue at: the weights, the optimizer, this process's own random state
        and running sums (into `sums`). --reseed: each process reseeded from (--seed, position, rank)."""
        if checkpoint is None:
            return 0, 0, []
        model.load_state_dict(checkpoint['model'], strict=True)
        optimizer.load_state_dict(checkpoint['optimizer'])
        epoch, step, ranks = checkpoint['epoch'], checkpoint['step_in_epoch'], checkpoint['ranks']
        sums.zero_()
        if checkpoint['world_size'] == self.process.world:
            set_rng_state(ranks[self.process.rank]['rng'], self.process.device)
            sums.copy_(ranks[self.process.rank]['sums'])
        else:
            seed_process(int(np.random.SeedSequence([args.seed, epoch, step, self.process.rank]).generate_state(1)[0]))
            self.log(f'resumed {len(ranks)} process(es) as {self.process.world}: every process reseeded (--reseed)')
            if self.process.rank == 0:   # the epoch's sums so far
                sums.copy_(sum(r['sums'] for r in ranks))
        return epoch, step, list(checkpoint.get('history', []))


# ---------------------------------------------------------------- the loop


def train(run, model, optimizer, args, num_items, train_step, evaluate, names, checkpoint=None, best_on=None,
          find_unused_parameters=False, **content):
    """Train `model` (under DDP when there are several processes) for args.epochs epochs of num_items items.

    train_step(model, indices) runs one step on the items of `indices` (forward, backward, optimizer step)
    and returns ({name: scalar tensor} for `names`, the number of items they average over); the loop sums
    them, weighted, into the epoch's train_<name>. evaluate(epoch, record) -> numbers added to the epoch's
    record (validation, test, SVM), after every process took rank 0's BatchNorm statistics. Each epoch
    ends in last.pt (and best.pt when record[best_on] is the best so far); `content` goes into each
    checkpoint. Returns the history: one record per epoch.
    """
    process = run.process
    steps = len(epoch_batches(num_items, args.batch_size, 0, args.seed, process.rank, process.world))
    steps = min(steps, args.max_steps_per_epoch or steps)
    if steps == 0:
        raise SystemExit(f'--batch_size {args.batch_size} is larger than the {num_items} training shapes')
    sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=process.device)   # weighted sums, count
    first_epoch, first_step, history = run.restore(checkpoint, model, optimizer, args, sums)
    run.log(schedule_line(args, steps))
    ddp = model if process.world == 1 else DistributedDataParallel(
        model, device_ids=[process.device.index] if process.device.type == 'cuda' else None,
        find_unused_parameters=find_unused_parameters)   # averages the gradients

    def save(name, epoch, step, resumable=True):
        run.save(name, model, epoch, step, args, optimizer if resumable else None, sums, history=history, **content)
    busy, done = 0.0, 0   # this session's seconds in training steps and their number: the pace of the ETA
    with StopOnSignal(process) as stop:
        for epoch in range(first_epoch, args.epochs):
            ddp.train()
            epoch_start, order = time.time(), epoch_batches(num_items, args.batch_size, epoch, args.seed,
                                                            process.rank, process.world)
            for step in range(first_step if epoch == first_epoch else 0, steps):
                lr = cosine_lr(epoch + step / steps, args)
                for group in optimizer.param_groups:
                    group['lr'] = lr
                tick = time.time()
                values, count = train_step(ddp, torch.as_tensor(order[step]))
                sums += torch.stack([*(values[n].detach().double() * count for n in names), sums.new_tensor(count)])
                if (step + 1) % args.log_every == 0 or step + 1 == steps:   # every process, the same steps
                    means = run.step_numbers(values, stop, f'epoch {epoch + 1} step {step + 1}')
                busy, done = busy + time.time() - tick, done + 1
                if (step + 1) % args.log_every == 0 or step + 1 == steps:
                    pace = busy / done
                    run.log(f'epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps} '
                            + ' '.join(f'{k} {v:.2f}' if 'accuracy' in k else f'{k} {v:.4f}' for k, v in means.items())
                            + f' lr {lr:.2e} {args.batch_size / pace:.1f} samples/s ETA '
                            f'{pace * ((args.epochs - epoch) * steps - step - 1) / 60:.1f} min', epoch=epoch,
                            step=step + 1, global_step=epoch * steps + step + 1, **means, lr=lr,
                            samples_per_s=args.batch_size / pace)
                if stop.now() and step + 1 < steps:   # Ctrl-C: the step finished; save where to continue
                    save('last.pt', epoch, step + 1)
                    run.log(f'interrupted: {run.last_saved}; continue with: {run.command("--resume", run.path("last.pt"))}')
                    raise SystemExit(130)
            share_rank0_buffers(model, process)   # every process scores with what last.pt saves
            *totals, count = sum_over_processes(sums, process).tolist()
            if not all(math.isfinite(t) for t in totals):
                raise FloatingPointError(f'non-finite loss in epoch {epoch + 1}: every process stops, nothing saved; '
                                         f'{run.last_saved}')
            record = dict(epoch=epoch, lr=lr, **{f'train_{n}': t / count for n, t in zip(names, totals)})
            record.update(evaluate(epoch, record), minutes=(time.time() - epoch_start) / 60)
            history.append(record)
            run.log(f'== epoch {epoch + 1}/{args.epochs} done: ' + ', '.join(f'{k} {v:.4g}' for k, v in record.items()
                                                          if k != 'epoch' and isinstance(v, (int, float))), **record)
            sums.zero_()
            if best_on in record and record[best_on] >= max(h[best_on] for h in history):
                save('best.pt', epoch + 1, 0, resumable=False)
            save('last.pt', epoch + 1, 0)
            if args.save_every and (epoch + 1) % args.save_every == 0 and process.rank == 0:   # a fixed schedule
                shutil.copyfile(run.path('last.pt'), run.path(f'epoch-{epoch + 1}.pt.tmp'))
                os.replace(run.path(f'epoch-{epoch + 1}.pt.tmp'), run.path(f'epoch-{epoch + 1}.pt'))
            if stop.now():
                run.log(f'stopped after epoch {epoch + 1}/{args.epochs}; continue with: '
                        f'{run.command("--resume", run.path("last.pt"))}')
                raise SystemExit(130)
    if process.world > 1:
        check_ranks_agree(model, process, run.log)
    return history
