"""
finetune.py: fine-tune a pre-trained I2P-MAE encoder for shape classification and few-shot
learning (paper section "Downstream Tasks"; the authors' tools/runner_finetune.py). Read
`finetune` first: its `step` and `evaluate_epoch` are the recipe, training.train runs the epochs.

  python finetune.py                                   # synthetic demo on a CPU, a few minutes
  python finetune.py --data modelnet40 --gpu 0 --vote  # ModelNet40 1k, then voting
  python finetune.py --data scan_hardest --ckpt pre-train.pth    # from the authors' pre-training
  python finetune.py --data fewshot --ways 5 --shots 10          # 10 folds, mean +- std
  python finetune.py --data fewshot-synthetic --ways 5 --shots 10 --folds 0 1 2   # the demo's few-shot folds
  python finetune.py --data modelnet40 --ckpt modelnet40.pth --test_only --vote
  torchrun --nproc_per_node=4 finetune.py --data scan_objbg
--data picks a preset (PRESETS); any flag overrides it. The architecture comes from the checkpoint;
only group sizes and local radii, which no weight depends on, come from the preset. We report the
FINAL-epoch test accuracy; the authors' best test epoch is printed for comparison only, voting as
mean +- std over runs, and best.pt is chosen on a validation split carved from the training data
(--val_fraction), never on test (docs/evaluation.md). Writes runs/<run_name>/ as pretrain.py does.
"""
import argparse
import copy
import os
import time
from dataclasses import asdict, replace

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # before torch loads OpenMP: waiting threads sleep (docs/speed.md)
import numpy as np
import torch

from tokenizer import farthest_point_sample, gather_points
from model import SMALL_CONFIG, Classifier, ModelConfig, smoothed_cross_entropy
from checkpoints import checkpoint_config, load_weights, read_checkpoint
from data import (SYNTHETIC_CLASSES, fewshot_fold_path, fps_subsample, load_fewshot_fold, load_split,
                  random_point_subset, rotate_about_up_axis, scale_and_translate, synthetic_fewshot_fold,
                  validation_split)
from flags import (ArgumentParser, add_run_flags, fraction, non_negative_float, non_negative_int, parse_run_flags,
                   positive_float, positive_int, run_script)
from processes import end_process, seed_process, setup_process, sum_over_processes
from training import Run, param_groups, run_folder, train

# The official settings (the authors' cfgs/fine-tuning/*.yaml). --data picks one preset; flags the user gives override it.
MODELNET40 = dict(points=1024, train_fps=1200, group_sizes=(48, 24, 24), local_radius=(0.24, 0.48, 0.96),
                  pooling='mean+max', smoothing=0.2, scale_low=2 / 3, scale_high=3 / 2, translate=0.2, rotate=False,
                  epochs=300, warmup_epochs=10, load_points=0, val_fraction=0.0, config='full',
                  ckpt='runs/pretrain-shapenet/last.pt')
SCANOBJECTNN = dict(MODELNET40, points=2048, train_fps=0, group_sizes=(32, 16, 16), local_radius=(0.32, 0.64, 1.28),
                    pooling='concat', smoothing=0.0, scale_low=0.9, scale_high=1.1, translate=0.0, rotate=True)
PRESETS = {
    'modelnet40': MODELNET40,
    'scan_objbg': SCANOBJECTNN,
    'scan_objonly': SCANOBJECTNN,
    'scan_hardest': dict(SCANOBJECTNN, local_radius=(0.48, 0.96, 1.92)),
    # I2P-MAE ships no few-shot config: the ModelNet40 model, 150 epochs, a 40-way head (Point-MAE's cfgs/fewshot.yaml)
    'fewshot': dict(MODELNET40, epochs=150),
    # CPU demo on model.py's SMALL_CONFIG: 1024 -> FPS 600 -> random 512 mirrors ModelNet40's
    # 8192 -> 1200 -> 1024; group sizes cover each scale as often as ScanObjectNN's (K x G / N = 8, 8, 4);
    # ModelNet40's radii block about the same share of token pairs here; 12 epochs chosen on the validation split
    # (docs/results.md: 6 left the pre-trained encoder under its own frozen-feature SVM)
    'synthetic': dict(MODELNET40, load_points=1024, points=512, train_fps=600, group_sizes=(32, 16, 16), epochs=12,
                      warmup_epochs=None, val_fraction=0.1, config='small', ckpt='runs/pretrain-synthetic/last.pt'),
}
# the demo's few-shot folds (data.synthetic_fewshot_fold): the demo's recipe, FEWSHOT_EPOCHS, no validation split
FEWSHOT_EPOCHS = 150
PRESETS['fewshot-synthetic'] = dict(PRESETS['synthetic'], epochs=FEWSHOT_EPOCHS, val_fraction=0.0)
# the files each --data reads, for the messages about missing ones (svm_eval.py reads ModelNet40 from the h5 files)
DATA_FILES = {
    'modelnet40': "Point-BERT's ModelNet/modelnet40_normal_resampled/modelnet40_{train,test}_8192pts_fps.dat (8192 "
                  "points per cloud, for the authors' sampling: FPS 1200, then a random 1024; built from the raw "
                  "modelnet40_normal_resampled/<class>/<id>.txt files if only those are there), not the PointNet h5 "
                  "files svm_eval.py reads",
    'scan_objbg': 'ScanObjectNN/main_split/{training,test}_objectdataset.h5',
    'scan_objonly': 'ScanObjectNN/main_split_nobg/{training,test}_objectdataset.h5',
    'scan_hardest': 'ScanObjectNN/main_split/{training,test}_objectdataset_augmentedrot_scale75.h5',
    'synthetic': 'no files (generated)',
    'fewshot-synthetic': 'no files (generated)',
}
# flags that may change on --resume: they do not change what the run computes
MAY_DIFFER = ('test_every', 'ckpt', 'from_scratch', 'config', 'test_only', 'vote', 'vote_runs', 'ways', 'shots', 'folds')
# Point-MAE's few-shot head predicts all 40 ModelNet40 classes (cls_dim 40), whatever the fold's way; the labels
# are 0..way-1, and label smoothing spreads over the 39 other outputs. The synthetic folds' head: all 13 classes.
FEWSHOT_CLASSES = {'fewshot': 40, 'fewshot-synthetic': len(SYNTHETIC_CLASSES)}
# a fresh BatchNorm's running statistics are 0.9^steps away from their start at momentum 0.1: eval-mode accuracy
# of a short run can sit at chance until they catch up (finetune says so when it sees it)
BATCHNORM_CATCH_UP_STEPS = 100
# FPS samplings per training cloud with --train_fps (training_pool): each read draws one of them
FPS_POOL_SIZE = 16


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group('data (flags without a default take the --data preset)')
    d.add_argument('--data', default='synthetic', choices=list(PRESETS), help='dataset and its preset (PRESETS)')
    d.add_argument('--data_root', default='./data', help='folder holding the datasets (docs/data.md)')
    d.add_argument('--load_points', type=non_negative_int, help='points read per cloud, 0 = all (preset: all; synthetic 1024)')
    d.add_argument('--points', type=positive_int, help='points the model sees (official: 1024 ModelNet40, 2048 ScanObjectNN)')
    d.add_argument('--train_fps', type=non_negative_int, help='training: FPS to this many, then a random --points of them; '
                                                 '0 = a random --points (official: 1200 ModelNet40, 0 Scan)')
    d.add_argument('--scale_low', type=positive_float, help='per-axis scale augmentation (official: 2/3 ModelNet40, 0.9 Scan)')
    d.add_argument('--scale_high', type=positive_float, help='(official: 3/2 ModelNet40, 1.1 ScanObjectNN)')
    d.add_argument('--translate', type=non_negative_float, help='per-axis shift augmentation (official: 0.2 ModelNet40, 0 Scan)')
    d.add_argument('--rotate', action=argparse.BooleanOptionalAction, help='one y-rotation per batch (official: Scan)')
    d.add_argument('--val_fraction', type=fraction, help='share of each training class held out to choose best.pt '
                                                      '(preset: 0 = train on all, as the paper; synthetic 0.1)')
    d.add_argument('--ways', type=positive_int, nargs='+', default=[5, 10], help='few-shot ways (official: 5 10)')
    d.add_argument('--shots', type=positive_int, nargs='+', default=[10, 20], help='few-shot shots (official: 10 20)')
    d.add_argument('--folds', type=non_negative_int, nargs='+', default=list(range(10)), help='few-shot folds (official: 0 .. 9)')
    m = p.add_argument_group('model')
    m.add_argument('--ckpt', help='pretrain.py checkpoint or the authors\' .pth (preset: runs/pretrain-shapenet/'
                                  'last.pt; synthetic: runs/pretrain-synthetic/last.pt)')
    m.add_argument('--from_scratch', action='store_true', help='random initialisation instead of --ckpt')
    m.add_argument('--config', choices=['full', 'small'], help='architecture with --from_scratch (preset: full; '
                                                               'synthetic: small = model.SMALL_CONFIG)')
    m.add_argument('--group_sizes', type=positive_int, nargs=3, help='kNN sizes per scale (official: 48 24 24 ModelNet40, 32 16 16 Scan)')
    m.add_argument('--local_radius', type=non_negative_float, nargs=3, help='attention radii per scale (official: .24 .48 .96 '
                                                                  'ModelNet40, .32 .64 1.28 Scan, .48 .96 1.92 PB-T50-RS)')
    m.add_argument('--pooling', choices=['mean+max', 'concat'], help='head input (official: mean+max ModelNet40, concat Scan)')
    o = p.add_argument_group('optimisation')
    o.add_argument('--smoothing', type=fraction, help='label smoothing, eps/(n-1) per wrong class (official: 0.2 ModelNet40, 0 Scan)')
    o.add_argument('--epochs', type=positive_int, help='epochs (official: 300, few-shot 150; their loop runs one more)')
    o.add_argument('--cosine_epochs', type=positive_int, help='length of the cosine schedule (official: = epochs)')
    o.add_argument('--warmup_epochs', type=non_negative_int, help='linear warm-up from --min_lr (official: 10; synthetic '
                                                                  '1, none in a run of one epoch)')
    o.add_argument('--batch_size', type=positive_int, default=32,
                   help='total batch over all processes, at least 2 per process for BatchNorm (official: 32)')
    o.add_argument('--lr', type=positive_float, default=5e-4, help='peak learning rate (official: 5e-4)')
    o.add_argument('--min_lr', type=non_negative_float, default=1e-6, help='floor and warm-up start (official: 1e-6)')
    o.add_argument('--weight_decay', type=non_negative_float, default=0.05, help='AdamW weight decay (official: 0.05)')
    o.add_argument('--grad_clip', type=positive_float, default=10.0, help='clip_grad_norm_ over all parameters (official: 10)')
    s = add_run_flags(p, 'finetune')
    s.add_argument('--test_only', action='store_true', help='evaluate a fine-tuned --ckpt, no training')
    s.add_argument('--vote', action='store_true', help='also test by voting: 10 augmented views, logits averaged')
    s.add_argument('--vote_runs', type=positive_int, default=10, help='voting test passes; we report mean +- std (paper: max of 49)')
    s.add_argument('--test_every', type=positive_int, default=1, help='epochs between test evaluations (monitoring only)')
    args = parse_run_flags(p, argv, PRESETS, MAY_DIFFER)
    if args.vote and args.train_fps <= args.points:
        p.error('--vote draws random --points out of --train_fps FPS points: ModelNet40 only '
                '(the official voting code raises for 2048 points)')
    if args.train_fps and args.train_fps < args.points:
        p.error(f'--train_fps {args.train_fps} is fewer than --points {args.points}: a random --points are drawn '
                f'out of the --train_fps FPS points (0 = draw them from the whole cloud)')
    if args.load_points and args.load_points < max(args.points, args.train_fps):
        p.error(f'--load_points {args.load_points} is fewer than the {max(args.points, args.train_fps)} points '
                f'--points / --train_fps take from each cloud')
    if args.batch_size < 2:
        p.error('--batch_size 1: BatchNorm in training mode needs at least 2 clouds per batch')
    for low, high in (('scale_low', 'scale_high'), ('min_lr', 'lr')):
        if getattr(args, low) > getattr(args, high):
            p.error(f'--{low} {getattr(args, low)} is above --{high} {getattr(args, high)}')
    if args.save_every and args.data.startswith('fewshot'):
        p.error('--save_every keeps snapshots of one training run; few-shot trains one classifier per fold')
    args.group_sizes, args.local_radius = tuple(args.group_sizes), tuple(args.local_radius)
    args.run_name = args.run_name or f'finetune-{args.data}' + ('-test' if args.test_only else '')
    return args


# ---------------------------------------------------------------- building the classifier


def build_classifier(args, num_classes, resume=None):
    """(Classifier, a line saying where its weights come from). The architecture is the checkpoint's."""
    def with_preset(cfg):   # parameter shapes do not depend on group sizes or radii
        try:
            cfg = replace(cfg, group_sizes=args.group_sizes, local_radius=args.local_radius)
        except ValueError as error:   # ModelConfig checks itself
            raise SystemExit(f'--group_sizes {args.group_sizes} / --local_radius {args.local_radius}: {error}') from None
        if args.points < cfg.min_points:
            raise SystemExit(f'--points {args.points}: the model groups {cfg.min_points} points per cloud at its finest '
                             f'scale (num_groups {cfg.num_groups[0]}, --group_sizes {cfg.group_sizes[0]})')
        return cfg
    if resume is not None:   # training.train loads its weights, with the optimizer
        cfg = with_preset(checkpoint_config(resume, args.resume))
        return Classifier(cfg, resume['num_classes'], resume['pooling']), f'resumed from {args.resume}'
    if args.from_scratch:
        cfg = with_preset(SMALL_CONFIG if args.config == 'small' else ModelConfig())
        return Classifier(cfg, num_classes, args.pooling), f'random initialisation ({args.config} config)'
    checkpoint = read_checkpoint(args.ckpt, '--ckpt')
    classifier = Classifier(with_preset(checkpoint_config(checkpoint, args.ckpt)), num_classes, args.pooling)
    skipped = load_weights(classifier, checkpoint, args.ckpt, fine_tune=not args.test_only)
    reasons = {why: [k for k in skipped if skipped[k] == why] for why in skipped.values()}
    ours = 'model_config' in checkpoint
    teacher = f', pre-trained with teacher: {checkpoint["teacher"]}' if 'teacher' in checkpoint else ''
    return classifier, (f'{"classifier" if args.test_only else "encoder"} from {args.ckpt} ({"ours" if ours else "theirs"}'
                        f'{teacher})' + ''.join(f'\n    skipped {len(k)} key(s) like {k[0]}: {why}' for why, k in reasons.items()))


# ---------------------------------------------------------------- inputs and evaluation


def fps_pool(points, n, pool_size=16, seed=0, batch_size=256, progress=lambda done, total: None):
    """(S, N, 3) clouds -> (S, pool_size, n) point indices (int16 where N allows it: ModelNet40's
    9843 clouds x 16 x 1200 take 378 MB): pool_size farthest-point samplings of n points per cloud,
    each from a random start, computed once (on the device of `points`); progress(done, total) after
    each batch of clouds.

    The official fine-tuning loader shuffles a cloud at every read and then runs FPS from index 0,
    so each read's FPS starts at a random point. Running that FPS (ModelNet40: 1200 of 8192, most
    of a fine-tuning step: docs/speed.md) every step is the cost this pool removes: each training read draws one
    of the pool's samplings instead (draw_from_fps_pool). Each pooled sampling is exactly an
    official one (a random permutation, then FPS from its first point, ties to the earlier point
    of the permutation).
    deviation: a cloud's FPS start is one of pool_size drawn once (seeded), not one of all N drawn
    at every read; the random n-subset and the scaling that follow still vary at every read.
    """
    generator = torch.Generator(device=points.device).manual_seed(seed)
    S, N, _ = points.shape
    pool = torch.empty(S, pool_size, n, dtype=torch.int16 if N <= 2 ** 15 else torch.int32, device=points.device)
    for p in range(pool_size):
        shuffles = torch.rand(S, N, generator=generator, device=points.device).argsort(dim=1)   # (S, N)
        for start in range(0, S, batch_size):   # batches of clouds bound the memory, not the result
            shuffle = shuffles[start:start + batch_size]
            picked = farthest_point_sample(gather_points(points[start:start + batch_size], shuffle), n)
            pool[start:start + batch_size, p] = shuffle.gather(1, picked).to(pool.dtype)   # shuffle positions -> points
            progress(p * S + min(start + batch_size, S), pool_size * S)
    return pool


def draw_from_fps_pool(xyz, pool, generator=None):
    """xyz (B, N, 3) and its clouds' pools (B, P, n) -> (B, n, 3): one of each cloud's P pooled
    samplings, uniformly at random, in its FPS order."""
    B, P, n = pool.shape
    choice = torch.randint(P, (B, 1, 1), generator=generator, device=pool.device).expand(-1, -1, n)
    return gather_points(xyz, pool.gather(1, choice)[:, 0].to(xyz.device, torch.long))


def training_pool(points, args, run):
    """With --train_fps, the FPS samplings a training read draws from (fps_pool): (S, P, train_fps) point
    indices on the host, computed once per run on the run's device, saying so; None without --train_fps.
    P = 16 samplings per cloud keep FPS at 16/300 of its per-read cost (ModelNet40); a run of fewer epochs
    gets P = epochs: never more FPS work than one per read."""
    if not args.train_fps:
        return None
    samplings = min(FPS_POOL_SIZE, args.epochs)
    run.log(f'building the FPS pool: {samplings} farthest-point samplings of {args.train_fps} points from random '
            f'starts for each of the {len(points)} training clouds, once per run (docs/evaluation.md)')

    def progress(done, total):
        if run.process.rank == 0:
            print(f'\r  {done}/{total} samplings', end='\n' if done == total else '', flush=True)
    return fps_pool(points.to(run.process.device), args.train_fps, samplings, seed=args.seed, progress=progress).cpu()


def training_view(xyz, args):
    """A training batch (B, N, 3) as the model sees it (B, points, 3): sampling and augmentation (the
    authors' fine-tuning runner). With --train_fps, xyz holds FPS samplings already (training_pool)."""
    # deviation: a random subset per cloud; the official code draws one subset for the whole batch.
    # (ScanObjectNN's FPS of all 2048 and then a random 2048 is a random permutation: this.)
    xyz = random_point_subset(xyz, args.points)
    xyz = scale_and_translate(xyz, args.scale_low, args.scale_high, args.translate)
    return rotate_about_up_axis(xyz) if args.rotate else xyz


@torch.no_grad()
def test_inputs(points, args, device):
    """Deterministic FPS of every cloud to max(points, train_fps) points, once, on the device (S, P, 3).

    FPS is greedy, so the first `points` of each result are exactly fps(cloud, points): the plain
    test input. Voting draws its random subsets from all of them (ModelNet40: 1200)."""
    return torch.cat([fps_subsample(chunk.to(device), max(args.points, args.train_fps)) for chunk in points.split(256)])


@torch.no_grad()
def vote_logits(classifier, pool, args, generator=None, passes=10):
    """(B, P, 3) FPS'd clouds -> (B, classes): logits averaged over `passes` views, each a random
    `points`-subset, scaled and translated (the official voting transform). `generator`: on pool's device."""
    total = 0
    for _ in range(passes):   # 10 views: a small constant, each batched over B
        view = random_point_subset(pool, args.points, generator)
        view = scale_and_translate(view, args.scale_low, args.scale_high, args.translate, generator)
        total = total + classifier(view).float()
    return total / passes


@torch.no_grad()
def evaluate(classifier, pool, labels, args, process, vote=False, generator=None):
    """Accuracy (%) on FPS'd clouds (S, P, 3): each process takes every world-th cloud, counts are summed."""
    classifier.eval()
    counts = torch.zeros(2, device=pool.device)   # correct, seen
    for idx in torch.arange(process.rank, len(pool), process.world).split(args.batch_size):
        xyz, y = pool[idx.to(pool.device)], labels[idx].to(pool.device)
        with torch.autocast(pool.device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = vote_logits(classifier, xyz, args, generator) if vote else classifier(xyz[:, :args.points])
        counts += torch.stack([(logits.argmax(dim=1) == y).sum(), torch.tensor(len(idx), device=pool.device)])
    counts = sum_over_processes(counts, process)
    return 100.0 * (counts[0] / counts[1]).item()


def voting(classifier, pool, labels, args, process):
    """Mean and std of --vote_runs seeded voting test passes (the paper reports the max of 49)."""
    generator = torch.Generator(pool.device).manual_seed(args.seed + process.rank)
    runs = [evaluate(classifier, pool, labels, args, process, vote=True, generator=generator) for _ in range(args.vote_runs)]
    return dict(vote_runs=runs, vote_mean=float(np.mean(runs)), vote_std=float(np.std(runs)))


# ---------------------------------------------------------------- the recipe


def batchnorm_note(record, chance, steps_done):
    """Why eval accuracy sits at chance early in a short run from scratch, if the epoch's record shows it
    (eval accuracy near chance, training accuracy well above it, few steps done); else ''."""
    measured = [k for k in ('test_accuracy', 'val_accuracy') if k in record]
    if measured and steps_done < 3 * BATCHNORM_CATCH_UP_STEPS and record[measured[0]] <= 2 * chance \
            and record['train_accuracy'] >= 2 * chance + 10:
        return (f'  note: {measured[0][:-9]} accuracy {record[measured[0]]:.1f}% is near chance ({chance:.1f}%) while '
                f'training accuracy is {record["train_accuracy"]:.1f}%: after {steps_done} steps the BatchNorm running '
                f'statistics that evaluation uses (momentum 0.1) still hold much of their initial values; they need '
                f'about {BATCHNORM_CATCH_UP_STEPS} steps to catch up (docs/evaluation.md, BatchNorm).')
    return ''


def finetune(classifier, train_split, test, args, run, checkpoint=None, fold=None, **content):
    """Fine-tune `classifier` on `train_split` (a PointSplit) and test it. Returns a dict whose 'test_accuracy'
    is the FINAL-epoch test accuracy. `content` is stored in every checkpoint (few-shot bookkeeping)."""
    process, device = run.process, run.process.device
    train_idx, val_idx = validation_split(train_split.labels, args.val_fraction, args.seed)
    points, labels = train_split.points[train_idx], train_split.labels[train_idx]
    pool = training_pool(points, args, run)
    test_pool = test_inputs(test.points, args, device)
    val_pool = test_inputs(train_split.points[val_idx], args, device) if len(val_idx) else None
    optimizer = torch.optim.AdamW(param_groups(classifier, args.weight_decay), lr=args.lr)
    chance, noted = 100 / len(train_split.class_names), []

    def step(model, idx):
        clouds = points[idx]
        if pool is not None:   # --train_fps: one of each cloud's pooled FPS samplings, gathered on the host
            clouds = draw_from_fps_pool(clouds, pool[idx])                          # (B, train_fps, 3)
        xyz, y = training_view(clouds.to(device, non_blocking=True), args), labels[idx].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = model(xyz).float()
        loss = smoothed_cross_entropy(logits, y, args.smoothing)   # smoothing 0 is plain cross-entropy
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(classifier.parameters(), args.grad_clip)
        optimizer.step()
        return dict(loss=loss, accuracy=100 * (logits.argmax(1) == y).double().mean()), len(idx)

    def evaluate_epoch(epoch, record):   # monitoring; only validation chooses best.pt
        numbers = dict(fold=fold) if fold else {}
        if len(val_idx):
            numbers['val_accuracy'] = evaluate(classifier, val_pool, train_split.labels[val_idx], args, process)
        if (epoch + 1) % args.test_every == 0 or epoch + 1 == args.epochs:
            numbers['test_accuracy'] = evaluate(classifier, test_pool, test.labels, args, process)
        note = '' if noted else batchnorm_note({**record, **numbers}, chance, (epoch + 1) * len(points) // args.batch_size)
        if note:
            noted.append(note)
            run.log(note)
        return numbers
    history = train(run, classifier, optimizer, args, len(points), step, evaluate_epoch, ('loss', 'accuracy'),
                    checkpoint, best_on='val_accuracy', model_config=asdict(classifier.cfg),
                    num_classes=classifier.cls_head[-1].out_features, pooling=classifier.pooling, **content)
    tested = [h['test_accuracy'] for h in history if 'test_accuracy' in h]   # the last epoch always tests
    result = dict(test_accuracy=tested[-1], max_test_accuracy_over_epochs=max(tested), history=history)
    if len(val_idx):   # the checkpoint chosen on validation (written by rank 0, seen by all), tested once
        chosen = copy.deepcopy(classifier)
        chosen.load_state_dict(read_checkpoint(run.path('best.pt'), 'best.pt')['model'])
        result.update(best_val_accuracy=max(h['val_accuracy'] for h in history),
                      test_accuracy_of_best_val=evaluate(chosen, test_pool, test.labels, args, process))
    if args.vote:
        result.update(voting(classifier, test_pool, test.labels, args, process))
    return result


def run_fewshot(args, run, checkpoint=None):
    """Every (way, shot, fold): a fresh classifier from the same checkpoint; mean +- std over folds."""
    done, summary, started = dict(checkpoint.get('fewshot_results', {})) if checkpoint else {}, {}, False
    for way in args.ways:
        for shot in args.shots:
            setting = f'{way}way{shot}shot'
            for fold in args.folds:
                key = f'{setting}/{fold}'
                if key not in done:
                    if args.data == 'fewshot':
                        source = f'read {fewshot_fold_path(args.data_root, way, shot, fold)}'
                        train_split, test = load_fewshot_fold(args.data_root, way, shot, fold, args.load_points or None)
                    else:
                        train_split, test = synthetic_fewshot_fold(way, shot, fold, args.load_points or None)
                        source = f'classes {", ".join(train_split.class_names)}'
                    state = checkpoint if checkpoint is not None and checkpoint.get('fold') == key else None
                    seed_process(args.seed, run.process.rank)   # a fold's result does not depend on which ran before
                    head = FEWSHOT_CLASSES[args.data]
                    classifier, described = build_classifier(args, head, state)
                    if not started:   # this session's first fold: args.json, the log's header
                        run.start(args, model_config=asdict(classifier.cfg), weights=described, num_classes=head)
                        started = True
                    run.log(f'{key}: {source}: {len(train_split.labels)} train / {len(test.labels)} test shapes, '
                            f'labels 0..{way - 1} of a {head}-way head (as Point-MAE), {described}')
                    done[key] = finetune(classifier.to(run.process.device), train_split, test, args, run, state,
                                         fold=key, fewshot_results=dict(done))['test_accuracy']
                run.log(f'{key}: final-epoch test accuracy {done[key]:.2f}%', fold=key, test_accuracy=done[key])
            accuracies = [done[f'{setting}/{fold}'] for fold in args.folds]
            summary[setting] = (float(np.mean(accuracies)), float(np.std(accuracies)))
            run.log(f'== {way}-way {shot}-shot: {summary[setting][0]:.2f} ± {summary[setting][1]:.2f} '
                    f'(mean ± std over folds {args.folds})', setting=setting, accuracies=accuracies)
    return dict(fewshot=summary, folds=done)


def check_cloud_points(split, args):
    """The clouds must hold the points --points and --train_fps take from each."""
    need = max(args.points, args.train_fps)
    if split.points.shape[1] < need:
        raise SystemExit(f'--points {args.points} / --train_fps {args.train_fps} take {need} points from each cloud; '
                         f'--data {args.data} clouds have {split.points.shape[1]}'
                         + (f' (--load_points {args.load_points})' if args.load_points else ''))


def main(args):
    if not (args.resume or args.from_scratch or os.path.isfile(args.ckpt)):   # before anything is announced or built
        raise SystemExit(f'--ckpt {args.ckpt}: no such file' + '. Pre-train first (python pretrain.py'
                         + ('' if 'synthetic' in args.data else ' --data shapenet') + '), pass our last.pt or the '
                         'authors\' pre-train.pth as --ckpt, or train with --from_scratch')
    process = setup_process(args)
    if args.batch_size % process.world or args.batch_size // process.world < 2:
        raise SystemExit(f'--batch_size {args.batch_size} over {process.world} processes: each process needs an '
                         f'equal share of at least 2 clouds (BatchNorm)')
    run = Run(run_folder(args), process, 'finetune.py')
    run.log(f'fine-tuning on {args.data} ' + ('continuing ' + args.resume if args.resume else 'from a random encoder '
            '(--from_scratch)' if args.from_scratch else f'from the encoder of {args.ckpt}' + (
            ' (the default --ckpt: the pre-training run of this kind of data, as svm_eval.py)'
            if args.ckpt == PRESETS[args.data]['ckpt'] else '')))
    checkpoint = None if args.test_only else run.resume(args)   # --test_only appends to its own folder's log
    if args.data.startswith('fewshot'):
        result = run_fewshot(args, run, checkpoint)
    else:
        train_split, test = (load_classification_split(args, split) for split in ('train', 'test'))
        for split in (train_split, test):
            check_cloud_points(split, args)
        classifier, described = build_classifier(args, len(train_split.class_names), checkpoint)
        classifier.to(process.device)
        run.start(args, model_config=asdict(classifier.cfg), weights=described, num_classes=len(train_split.class_names))
        run.log(f'{args.data}: {len(train_split.labels)} train / {len(test.labels)} test shapes, {described}\n'
                f'  every flag and the model: {run.path("args.json")}')
        if args.test_only:
            pool = test_inputs(test.points, args, process.device)
            result = dict(test_accuracy=evaluate(classifier, pool, test.labels, args, process),
                          **(voting(classifier, pool, test.labels, args, process) if args.vote else {}))
        else:
            result = finetune(classifier, train_split, test, args, run, checkpoint)
        r = result
        run.log((f'== test accuracy of {args.ckpt} {r["test_accuracy"]:.2f}%' if args.test_only else
                 f'== final-epoch test accuracy {r["test_accuracy"]:.2f}% (the number we report)')
                + (f'\n   best.pt (chosen on validation, {r["best_val_accuracy"]:.2f}%): test accuracy '
                   f'{r["test_accuracy_of_best_val"]:.2f}%' if 'best_val_accuracy' in r else '')
                + (f'\n   voting: {r["vote_mean"]:.2f} ± {r["vote_std"]:.2f}% (mean ± std of {args.vote_runs} runs)'
                   if 'vote_mean' in r else '')
                + (f'\n   for comparison only: best test epoch {r["max_test_accuracy_over_epochs"]:.2f}% (the paper\'s '
                   f'convention, chosen on the test set)' if 'max_test_accuracy_over_epochs' in r else '')
                + f'\n   {(time.time() - run.started) / 60:.1f} min in all (this session)',
                **{k: v for k, v in r.items() if k != 'history'})
    end_process(process)
    return result


def load_classification_split(args, split):
    """load_split, with the files this script reads named when they are missing or broken: --data modelnet40
    means Point-BERT's .dat files here, the h5 files in svm_eval.py."""
    try:   # data seed 0: the shapes pretrain.py and svm_eval.py see by default
        return load_split(args.data, split, args.data_root, args.load_points or None, seed=0)
    except FileNotFoundError as error:   # say which files this script needs (a bad file's own message is clear)
        raise FileNotFoundError(f'finetune.py --data {args.data} reads {DATA_FILES[args.data]}:\n{error}') from None


if __name__ == '__main__':
    run_script(main, parse_args)
