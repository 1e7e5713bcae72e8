"""
flags.py: the command line of every script: one-line errors, flag types that check their domain,
the flags every training script has (add_run_flags), and how a run's flags are resolved
(parse_run_flags): a new run takes its --data preset; --resume takes the run's own flags back.
"""
import argparse
import importlib.util
import math
import sys

import torch

from checkpoints import read_checkpoint
from data import DataError

# flags of every script that do not change what a run computes: a resumed run may give them new values
RUN_FLAGS_THAT_MAY_DIFFER = ('epochs', 'run_name', 'data_root', 'log_every', 'save_every', 'tensorboard',
                             'deterministic')
# flags about this command, not the run: --resume does not take them from the checkpoint
THIS_COMMAND = ('resume', 'allow_changes', 'reseed', 'overwrite', 'gpu', 'changes')


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage block would bury the message)."""
    def error(self, message):
        sys.stderr.write(f'{self.prog}: error: {message} (--help lists every flag)\n')
        raise SystemExit(2)


def checked(convert, is_valid, wanted):
    """An argparse `type=`: `--epochs 0` stops at once with "argument --epochs: '0' is not a positive integer"."""
    def flag_type(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not is_valid(value):   # float() also reads 'nan' and 'inf': refused below
            raise argparse.ArgumentTypeError(f'{text!r} is not {wanted}')
        return value
    return flag_type


positive_int = checked(int, lambda v: v >= 1, 'a positive integer')
non_negative_int = checked(int, lambda v: v >= 0, 'an integer >= 0')
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, 'a finite number > 0')
non_negative_float = checked(float, lambda v: math.isfinite(v) and v >= 0, 'a finite number >= 0')
fraction = checked(float, lambda v: 0 <= v < 1, 'a fraction in [0, 1) (0.1 means 10%)')
gpu_index = checked(int, lambda v: v >= -1, 'a GPU index (0, 1, ...) or -1 for the CPU')
seed_value = checked(int, lambda v: 0 <= v < 2 ** 31, 'a seed in [0, 2**31)')   # NumPy's range, plus each rank


def add_run_flags(parser, script):
    """The flags every training script has: device, seed, run folder, resume, logging."""
    s = parser.add_argument_group('system')
    s.add_argument('--gpu', type=gpu_index, default=0 if torch.cuda.is_available() else -1, help='GPU index, -1 = CPU')
    s.add_argument('--amp', action=argparse.BooleanOptionalAction, help='bf16 autocast (default: on for GPU, off for CPU)')
    s.add_argument('--seed', type=seed_value, default=0, help='random streams: process r uses --seed + r (default: 0)')
    s.add_argument('--deterministic', action='store_true', help='deterministic algorithms (slower)')
    s.add_argument('--run_name', help=f'runs/<run_name>/ (default: {script}-<data>)')
    s.add_argument('--resume', help='continue the run of this checkpoint (runs/<name>/last.pt) in its folder, with its flags')
    s.add_argument('--allow_changes', action='store_true', help='with --resume: accept flags that change the run (e.g. '
                                                                'a lower --lr after a divergence); the log records them')
    s.add_argument('--reseed', action='store_true', help='with --resume: allow another number of processes, '
                                                         'reseeding every one (the run no longer retraces the original)')
    s.add_argument('--overwrite', action='store_true', help='start over in a run folder that holds another run')
    s.add_argument('--log_every', type=positive_int, default=20, help='steps between progress lines')
    s.add_argument('--max_steps_per_epoch', type=non_negative_int, default=0, help='cut epochs short (tests, quick looks)')
    s.add_argument('--save_every', type=non_negative_int, default=0,
                   help='also keep runs/<run_name>/epoch-<N>.pt every N epochs (0 = only last.pt)')
    s.add_argument('--tensorboard', action='store_true', help='also write the logged numbers to runs/<run_name>/'
                                                              'tensorboard/ (needs the tensorboard package)')
    return s


def plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def parse_run_flags(parser, argv, presets, may_differ):
    """The flags of a run. A new run: every flag not given takes the --data preset's value. --resume PATH:
    every flag not given takes the checkpoint's value (the run continues as it was started); a given flag
    that changes the run (all but RUN_FLAGS_THAT_MAY_DIFFER and `may_differ`) needs --allow_changes, and
    args.changes says what changed. A finished run is refused here, before anything is built."""
    args = parser.parse_args(argv)
    if args.tensorboard and importlib.util.find_spec('tensorboard') is None:
        parser.error('--tensorboard needs the tensorboard package (pip install tensorboard; it is optional, not in '
                     'requirements.txt); log.jsonl and curves.png hold the same numbers')
    if getattr(args, 'test_only', False) and args.resume:
        parser.error('--resume continues a training run; --test_only tests the weights of --ckpt')
    args.changes = []
    if args.resume is None:
        for key, value in presets[args.data].items():   # argparse resolved abbreviations: a given flag stays
            if getattr(args, key) is None:
                setattr(args, key, value)
        follow_epochs(args)
        return args
    checkpoint = read_checkpoint(args.resume, '--resume')
    saved = checkpoint.get('args')
    if not isinstance(saved, dict) or 'optimizer' not in checkpoint:
        raise SystemExit(f'--resume {args.resume}: not a point to continue from; resume from the last.pt a run wrote')
    parser.set_defaults(**{k: v for k, v in saved.items() if k in vars(args) and k not in THIS_COMMAND})
    args = parser.parse_args(argv)
    keep = set(RUN_FLAGS_THAT_MAY_DIFFER) | set(may_differ) | set(THIS_COMMAND)
    args.changes = [f'--{k} {plain(saved.get(k))} -> {plain(v)}' for k, v in sorted(vars(args).items())
                    if k not in keep and plain(saved.get(k)) != plain(v)]
    if args.changes and not args.allow_changes:
        parser.error(f'--resume continues {args.resume} with its own flags; {", ".join(args.changes)} would change the '
                     f'run: leave the flag out, or add --allow_changes to continue with it (the log records it)')
    if checkpoint['epoch'] >= args.epochs:
        parser.error(f'--resume {args.resume}: the run has done {checkpoint["epoch"]} epoch(s) and --epochs is '
                     f'{args.epochs}: nothing to do (pass a larger --epochs to train it further)')
    return args


def follow_epochs(args):
    """A schedule the flags and the preset leave open (None) follows --epochs: the cosine spans the run and the
    warm-up is one epoch (none in a run of one), so a shortened run is still a whole schedule, annealed to
    --min_lr. (The ShapeNet pre-training preset keeps the authors' 10 warm-up epochs and 400-epoch cosine.)"""
    if args.cosine_epochs is None:
        args.cosine_epochs = args.epochs
    if args.warmup_epochs is None:
        args.warmup_epochs = min(1, args.epochs - 1)


def run_script(main, parse_args):
    """What every entry script's `if __name__ == '__main__':` runs. A user's mistake ends in its message
    alone, exit code 1, no traceback: our checks raise SystemExit(message); data.py's readers raise
    DataError or FileNotFoundError about the user's files. Any other exception is a programming error."""
    try:
        return main(parse_args())
    except (DataError, FileNotFoundError) as error:
        raise SystemExit(f'error: {error}') from None
