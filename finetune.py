"""
finetune.py: fine-tune a pre-trained I2P-MAE encoder for shape classification and few-shot
learning (SPEC.md sections 8.3, 8.4). Read `finetune` first: it is the whole recipe.

  python finetune.py                                   # synthetic demo on a CPU, a few minutes
  python finetune.py --data modelnet40 --gpu 0 --vote  # ModelNet40 1k, then voting
  python finetune.py --data scan_hardest --ckpt pre-train.pth    # from the authors' pre-training
  python finetune.py --data fewshot --ways 5 --shots 10          # 10 folds, mean +- std
  python finetune.py --data modelnet40 --ckpt modelnet_1k.pth --test_only --vote
  torchrun --nproc_per_node=4 finetune.py --data scan_objbg
--data picks a preset (PRESETS); any flag overrides it and the final values are printed at start.
The architecture comes from the checkpoint; only group sizes and local radii, which no weight
depends on, come from the preset. We report the FINAL-epoch test accuracy. The authors reported
the best test epoch and, for voting, the best of 49 voting runs: we print the first only for
comparison, labelled as chosen on test, and voting as mean +- std over runs. A "best" checkpoint
is chosen on a validation split carved from the training data (--val_fraction), never on test.
Writes runs/<run_name>/last.pt (atomically, every epoch and on Ctrl-C), best.pt (with a
validation split) and log.jsonl. `--resume runs/<run_name>/last.pt` continues exactly.
"""
import argparse
import copy
import math
import os
import signal
import time
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model import SMALL_CONFIG, Classifier, ModelConfig, load_official_checkpoint, official_to_ours, smoothed_cross_entropy
from pretrain import (Log, check_ranks_agree, check_resumable, cosine_lr, epoch_batches,
                      param_groups, rng_state, save_checkpoint, seed_everything, set_rng_state, setup_device)
from data import (fps_subsample, load_fewshot_fold, load_split, random_point_subset, rotate_about_up_axis,
                  scale_and_translate)

# The official settings (SPEC 8.3, 8.4). --data picks one preset; flags the user gives override it.
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
    # I2P-MAE ships no few-shot config: the ModelNet40 model, 150 epochs (Point-M2AE's protocol)
    'fewshot': dict(MODELNET40, epochs=150),
    # CPU demo on model.py's SMALL_CONFIG: 1024 -> FPS 600 -> random 512 mirrors ModelNet40's
    # 8192 -> 1200 -> 1024; group sizes cover each scale as often as ScanObjectNN's (K x G / N = 8, 8, 4);
    # ModelNet40's radii block the same share of token pairs here (93/77/39% vs 93/75/32%, measured)
    'synthetic': dict(MODELNET40, load_points=1024, points=512, train_fps=600, group_sizes=(32, 16, 16), epochs=6,
                      warmup_epochs=1, val_fraction=0.1, config='small', ckpt='runs/pretrain-synthetic/last.pt'),
}
RESUME_SETTINGS = ('data', 'points', 'train_fps', 'batch_size', 'val_fraction', 'pooling', 'smoothing', 'seed')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group('data (flags without a default take the --data preset)')
    d.add_argument('--data', default='synthetic', choices=list(PRESETS), help='dataset and its preset (PRESETS)')
    d.add_argument('--data_root', default='./data', help='folder holding the datasets (README: data layout)')
    d.add_argument('--load_points', type=int, help='points read per cloud, 0 = all (preset: all; synthetic 1024)')
    d.add_argument('--points', type=int, help='points the model sees (official: 1024 ModelNet40, 2048 ScanObjectNN)')
    d.add_argument('--train_fps', type=int, help='training: FPS to this many, then a random --points of them; '
                                                 '0 = a random --points (official: 1200 ModelNet40, 0 Scan)')
    d.add_argument('--scale_low', type=float, help='per-axis scale augmentation (official: 2/3 ModelNet40, 0.9 Scan)')
    d.add_argument('--scale_high', type=float, help='(official: 3/2 ModelNet40, 1.1 ScanObjectNN)')
    d.add_argument('--translate', type=float, help='per-axis shift augmentation (official: 0.2 ModelNet40, 0 Scan)')
    d.add_argument('--rotate', action=argparse.BooleanOptionalAction, help='one y-rotation per batch (official: Scan)')
    d.add_argument('--val_fraction', type=float, help='share of each training class held out to choose best.pt '
                                                      '(preset: 0 = train on all, as the paper; synthetic 0.1)')
    d.add_argument('--ways', type=int, nargs='+', default=[5, 10], help='few-shot ways (official: 5 10)')
    d.add_argument('--shots', type=int, nargs='+', default=[10, 20], help='few-shot shots (official: 10 20)')
    d.add_argument('--folds', type=int, nargs='+', default=list(range(10)), help='few-shot folds (official: 0 .. 9)')
    m = p.add_argument_group('model')
    m.add_argument('--ckpt', help='pretrain.py checkpoint or the authors\' .pth (preset: runs/pretrain-shapenet/'
                                  'last.pt; synthetic: runs/pretrain-synthetic/last.pt)')
    m.add_argument('--from_scratch', action='store_true', help='random initialisation instead of --ckpt')
    m.add_argument('--config', choices=['full', 'small'], help='architecture with --from_scratch (preset: full; '
                                                               'synthetic: small = model.SMALL_CONFIG)')
    m.add_argument('--group_sizes', type=int, nargs=3, help='kNN sizes per scale (official: 48 24 24 ModelNet40, 32 16 16 Scan)')
    m.add_argument('--local_radius', type=float, nargs=3, help='attention radii per scale (official: SPEC 8.3)')
    m.add_argument('--pooling', choices=['mean+max', 'concat'], help='head input (official: mean+max ModelNet40, concat Scan)')
    o = p.add_argument_group('optimisation')
    o.add_argument('--smoothing', type=float, help='label smoothing, eps/(n-1) per wrong class (official: 0.2 ModelNet40, 0 Scan)')
    o.add_argument('--epochs', type=int, help='epochs (official: 300, few-shot 150; their loop runs one more)')
    o.add_argument('--cosine_epochs', type=int, help='length of the cosine schedule (official: = epochs)')
    o.add_argument('--warmup_epochs', type=int, help='linear warm-up from --min_lr (official: 10; synthetic 1)')
    o.add_argument('--batch_size', type=int, default=32, help='total batch over all processes (official: 32)')
    o.add_argument('--lr', type=float, default=5e-4, help='peak learning rate (official: 5e-4)')
    o.add_argument('--min_lr', type=float, default=1e-6, help='floor and warm-up start (official: 1e-6)')
    o.add_argument('--weight_decay', type=float, default=0.05, help='AdamW weight decay (official: 0.05)')
    o.add_argument('--grad_clip', type=float, default=10.0, help='clip_grad_norm_ over all parameters (official: 10)')
    s = p.add_argument_group('evaluation and system')
    s.add_argument('--test_only', action='store_true', help='evaluate a fine-tuned --ckpt, no training')
    s.add_argument('--vote', action='store_true', help='also test by voting: 10 augmented views, logits averaged')
    s.add_argument('--vote_runs', type=int, default=10, help='voting test passes; we report mean +- std (paper: max of 49)')
    s.add_argument('--test_every', type=int, default=1, help='epochs between test evaluations (monitoring only)')
    s.add_argument('--gpu', type=int, default=0 if torch.cuda.is_available() else -1, help='GPU index, -1 = CPU')
    s.add_argument('--amp', action=argparse.BooleanOptionalAction, help='bf16 autocast (default: on for GPU, off for CPU)')
    s.add_argument('--seed', type=int, default=0, help='training run, validation split and voting (default: 0)')
    s.add_argument('--deterministic', action='store_true', help='deterministic algorithms (slower)')
    s.add_argument('--run_name', help='runs/<run_name>/ (default: finetune-<data>)')
    s.add_argument('--resume', help='checkpoint to continue from (runs/<run_name>/last.pt)')
    s.add_argument('--log_every', type=int, default=20, help='steps between progress lines')
    args = p.parse_args(argv)
    for key, value in PRESETS[args.data].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.vote and args.train_fps <= args.points:
        p.error('--vote draws random --points out of --train_fps FPS points: ModelNet40 only '
                '(the official voting code raises for 2048 points)')
    args.group_sizes, args.local_radius = tuple(args.group_sizes), tuple(args.local_radius)
    args.cosine_epochs = args.cosine_epochs or args.epochs
    args.run_name = args.run_name or f'finetune-{args.data}'
    return args


# ---------------------------------------------------------------- building the classifier


def check_head(state, classifier, path):
    """Explain, and stop, when a fine-tuned head in `state` (our key names) does not fit this classifier."""
    if 'cls_head.8.weight' in state:
        theirs = (state['cls_head.8.weight'].shape[0], state['cls_head.0.weight'].shape[1])
        ours = (classifier.cls_head[8].out_features, classifier.cls_head[0].in_features)
        if theirs != ours:
            raise SystemExit(
                f'{path} is a classifier fine-tuned for {theirs[0]} classes on {theirs[1]}-wide pooled features, but '
                f'this dataset has {ours[0]} classes and pooling {classifier.pooling!r} gives {ours[1]}-wide features. '
                f'A fine-tuned head fits only the dataset it was trained on: to fine-tune, start from a pre-training '
                f'checkpoint (pretrain.py\'s last.pt, the authors\' pre-train.pth); to test, use its own --data.')


def load_encoder(classifier, checkpoint, path='checkpoint', whole=False):
    """Load a pre-trained encoder (whole=True: a whole fine-tuned classifier) into `classifier`.

    checkpoint: ours (model, model_config: strict; only `encoder.*` unless whole) or the authors'
    (base_model or a bare state_dict; 'module.' is handled by load_official_checkpoint).
    Returns {skipped key: reason}; a misfit raises SystemExit naming every missing or unexpected
    key and every shape difference.
    """
    if 'model_config' in checkpoint:
        if whole and 'num_classes' not in checkpoint:
            raise SystemExit(f'{path} is a pre-training checkpoint: it has no classifier head; fine-tune it first')
        target, state = (classifier, checkpoint['model']) if whole else (classifier.encoder, {
            k[len('encoder.'):]: v for k, v in checkpoint['model'].items() if k.startswith('encoder.')})
        check_head(state, classifier, path)
        own = target.state_dict()
        problems = ([f'missing key {k}' for k in sorted(own.keys() - state.keys())]
                    + [f'unexpected key {k}' for k in sorted(state.keys() - own.keys())]
                    + [f'shape of {k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}'
                       for k in sorted(own.keys() & state.keys()) if state[k].shape != own[k].shape])
        if problems:
            raise SystemExit(f'{path} does not fit this {"classifier" if whole else "encoder"} '
                             f'(a different architecture?):\n  ' + '\n  '.join(problems))
        target.load_state_dict(state, strict=True)
        return {}
    theirs = {official_to_ours(k): v for k, v in checkpoint.get('base_model', checkpoint).items()}
    check_head(theirs, classifier, path)
    if whole and 'cls_head.8.weight' not in theirs:
        raise SystemExit(f'{path} is the authors\' pre-training checkpoint: it has no classifier head; fine-tune it first')
    try:
        return load_official_checkpoint(classifier, checkpoint)
    except ValueError as err:
        raise SystemExit(f'{path}: {err}') from None


def build_classifier(args, num_classes, resume=None):
    """(Classifier, a line saying where its weights come from). The architecture is the checkpoint's."""
    def with_preset(cfg):   # parameter shapes do not depend on group sizes or radii
        return replace(cfg, group_sizes=args.group_sizes, local_radius=args.local_radius)
    if resume is not None:   # `finetune` loads its weights, with the optimizer
        cfg = with_preset(ModelConfig(**resume['model_config']))
        check_resumable(resume, args.resume, cfg, {k: getattr(args, k) for k in RESUME_SETTINGS})
        return Classifier(cfg, resume['num_classes'], resume['pooling']), f'resumed from {args.resume}'
    if args.from_scratch:
        cfg = with_preset(SMALL_CONFIG if args.config == 'small' else ModelConfig())
        return Classifier(cfg, num_classes, args.pooling), f'random initialisation ({args.config} config)'
    if not os.path.isfile(args.ckpt):
        raise SystemExit(f'--ckpt {args.ckpt}: no such file. Pre-train first (python pretrain.py), pass our last.pt '
                         f'or the authors\' pre-train.pth as --ckpt, or train with --from_scratch')
    checkpoint = torch.load(args.ckpt, map_location='cpu', weights_only=False)
    ours = 'model_config' in checkpoint
    classifier = Classifier(with_preset(ModelConfig(**checkpoint['model_config']) if ours else ModelConfig()),
                            num_classes, args.pooling)
    skipped = load_encoder(classifier, checkpoint, args.ckpt, whole=args.test_only)
    reasons = {why: [k for k in skipped if skipped[k] == why] for why in skipped.values()}
    return classifier, (f'{"classifier" if args.test_only else "encoder"} from {args.ckpt} ({"ours" if ours else "theirs"})'
                        + ''.join(f'\n    skipped {len(k)} key(s) like {k[0]}: {why}' for why, k in reasons.items()))


# ---------------------------------------------------------------- inputs and evaluation


def training_view(xyz, args):
    """A training batch (B, N, 3) as the model sees it (B, points, 3): sampling and augmentation (SPEC 8.3)."""
    if args.train_fps:   # the official loader shuffles each cloud, so FPS (from index 0) starts anywhere
        xyz = fps_subsample(random_point_subset(xyz, xyz.shape[1]), args.train_fps)
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
def vote_logits(classifier, pool, args, passes=10):
    """(B, P, 3) FPS'd clouds -> (B, classes): logits averaged over `passes` views, each a random
    `points`-subset, scaled and translated (the official test transform; SPEC 8.3 voting)."""
    total = 0
    for _ in range(passes):   # 10 views: a small constant, each batched over B
        view = scale_and_translate(random_point_subset(pool, args.points), args.scale_low, args.scale_high, args.translate)
        total = total + classifier(view).float()
    return total / passes


@torch.no_grad()
def evaluate(classifier, pool, labels, args, rank=0, world=1, vote=False):
    """Accuracy (%) on FPS'd clouds (S, P, 3): each process takes every world-th cloud, counts are summed."""
    classifier.eval()
    counts = torch.zeros(2, device=pool.device)   # correct, seen
    for idx in torch.arange(rank, len(pool), world).split(args.batch_size):
        xyz, y = pool[idx.to(pool.device)], labels[idx].to(pool.device)
        with torch.autocast(pool.device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = vote_logits(classifier, xyz, args) if vote else classifier(xyz[:, :args.points])
        counts += torch.stack([(logits.argmax(dim=1) == y).sum(), torch.tensor(len(idx), device=pool.device)])
    if world > 1:
        dist.all_reduce(counts)
    return 100.0 * (counts[0] / counts[1]).item()


def voting(classifier, pool, labels, args, rank=0, world=1):
    """Mean and std of --vote_runs seeded voting test passes (the paper reports the max of 49)."""
    torch.manual_seed(args.seed + rank)
    runs = [evaluate(classifier, pool, labels, args, rank, world, vote=True) for _ in range(args.vote_runs)]
    return dict(vote_runs=runs, vote_mean=float(np.mean(runs)), vote_std=float(np.std(runs)))


def validation_split(labels, fraction, seed):
    """(train indices, validation indices): a seeded `fraction` of every class held out."""
    generator, held = torch.Generator().manual_seed(seed), [torch.zeros(0, dtype=torch.long)]
    for c in labels.unique():   # a loop over classes, not samples
        members = (labels == c).nonzero()[:, 0]
        held.append(members[torch.randperm(len(members), generator=generator)][:round(fraction * len(members))])
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[torch.cat(held)] = True
    return (~is_val).nonzero()[:, 0], is_val.nonzero()[:, 0]


# ---------------------------------------------------------------- the recipe


def finetune(classifier, train, test, args, device, rank, world, log, folder, resume=None, extra=None):
    """Fine-tune `classifier` on `train` (a PointSplit) and test it. Returns a dict whose 'test_accuracy'
    is the FINAL-epoch test accuracy. `extra` is stored in every checkpoint (few-shot bookkeeping)."""
    train_idx, val_idx = validation_split(train.labels, args.val_fraction, args.seed)
    points, labels = train.points[train_idx], train.labels[train_idx]
    test_pool = test_inputs(test.points, args, device)
    val_pool = test_inputs(train.points[val_idx], args, device) if len(val_idx) else None
    optimizer = torch.optim.AdamW(param_groups(classifier, args.weight_decay), lr=args.lr)
    start_epoch, start_step, history, best_val = 0, 0, [], -1.0
    if resume is not None:
        classifier.load_state_dict(resume['model'], strict=True)
        optimizer.load_state_dict(resume['optimizer'])
        start_epoch, start_step, history, best_val = (resume[k] for k in ('epoch', 'step_in_epoch', 'history', 'best_val'))
        set_rng_state(resume['rng'])
    model = DistributedDataParallel(classifier) if world > 1 else classifier   # averages the gradients
    steps = len(epoch_batches(len(points), args.batch_size, 0, args.seed))
    if steps == 0:
        raise SystemExit(f'--batch_size {args.batch_size} is larger than the {len(points)} training clouds')

    def save(name, epoch, step_in_epoch):
        if rank == 0:
            save_checkpoint(os.path.join(folder, name), model=classifier.state_dict(), optimizer=optimizer.state_dict(),
                            epoch=epoch, step_in_epoch=step_in_epoch, rng=rng_state(), args=vars(args),
                            model_config=asdict(classifier.cfg), num_classes=classifier.cls_head[-1].out_features,
                            pooling=classifier.pooling, history=history, best_val=best_val, **(extra or {}))
    # Ctrl-C finishes the current step, saves and stops, so that --resume continues exactly (a step cut short
    # would leave BatchNorm statistics and the RNG half-updated); a second Ctrl-C stops at once. Under
    # torchrun, Ctrl-C stops every process at once and the last epoch's last.pt is where to resume.
    stop, handler = [], lambda *_: (stop.append(True), signal.signal(signal.SIGINT, signal.default_int_handler))
    previous_handler = signal.signal(signal.SIGINT, handler if world == 1 else signal.getsignal(signal.SIGINT))
    try:
        for epoch in range(start_epoch, args.epochs):
            model.train()
            sums, tick = torch.zeros(3, device=device), time.time()   # loss x clouds, correct, clouds
            order = epoch_batches(len(points), args.batch_size, epoch, args.seed, rank, world)
            for step in range(start_step if epoch == start_epoch else 0, steps):
                lr = cosine_lr(epoch + step / steps, args)
                for group in optimizer.param_groups:
                    group['lr'] = lr
                xyz = training_view(points[order[step]].to(device, non_blocking=True), args)
                y = labels[order[step]].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                    logits = model(xyz).float()
                loss = smoothed_cross_entropy(logits, y, args.smoothing)   # smoothing 0 is plain cross-entropy
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(classifier.parameters(), args.grad_clip)
                optimizer.step()
                sums += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum(), torch.tensor(len(y), device=device)])
                if (step + 1) % args.log_every == 0:   # .item() syncs with the GPU: logging steps only
                    log(f'  epoch {epoch} step {step + 1}/{steps} loss {loss.item():.4f} lr {lr:.2e}')
                if stop:
                    save('last.pt', epoch, step + 1)
                    log(f'interrupted: saved {folder}/last.pt at epoch {epoch} step {step + 1}; '
                        f'continue with --resume {folder}/last.pt')
                    raise SystemExit(130)
            if world > 1:
                dist.all_reduce(sums)
            seen, lr = sums[2].clamp_min(1), optimizer.param_groups[0]['lr']
            record = dict(epoch=epoch, lr=lr, train_loss=(sums[0] / seen).item(),
                          train_accuracy=100 * (sums[1] / seen).item(), minutes=(time.time() - tick) / 60)
            if not math.isfinite(record['train_loss']):
                raise FloatingPointError(f'non-finite loss in epoch {epoch}; {folder}/last.pt keeps the last good epoch')
            if len(val_idx):
                record['val_accuracy'] = evaluate(classifier, val_pool, train.labels[val_idx], args, rank, world)
                if record['val_accuracy'] > best_val:
                    best_val = record['val_accuracy']
                    save('best.pt', epoch + 1, 0)
            if (epoch + 1) % args.test_every == 0 or epoch + 1 == args.epochs:   # monitoring, never selection
                record['test_accuracy'] = evaluate(classifier, test_pool, test.labels, args, rank, world)
            history.append(record)
            save('last.pt', epoch + 1, 0)
            log(f'epoch {epoch} loss {record["train_loss"]:.4f} train {record["train_accuracy"]:.2f}%'
                + ''.join(f' {k[:-9]} {record[k]:.2f}%' for k in ('val_accuracy', 'test_accuracy') if k in record)
                + f' lr {lr:.2e} {record["minutes"]:.1f} min', **record, **({'fold': extra['fold']} if extra else {}))
            if stop:
                raise SystemExit(130)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    if world > 1:
        check_ranks_agree(classifier, log)
    tested = [h['test_accuracy'] for h in history if 'test_accuracy' in h]
    done = history and history[-1]['epoch'] == args.epochs - 1 and 'test_accuracy' in history[-1]
    result = dict(test_accuracy=tested[-1] if done else evaluate(classifier, test_pool, test.labels, args, rank, world),
                  max_test_accuracy_over_epochs=max(tested, default=None), history=history)
    if len(val_idx):   # the checkpoint chosen on validation, tested once
        if world > 1:
            dist.barrier()   # rank 0 wrote best.pt
        chosen = copy.deepcopy(classifier)
        chosen.load_state_dict(torch.load(os.path.join(folder, 'best.pt'), map_location=device, weights_only=False)['model'])
        result.update(best_val_accuracy=best_val,
                      test_accuracy_of_best_val=evaluate(chosen, test_pool, test.labels, args, rank, world))
    if args.vote:
        result.update(voting(classifier, test_pool, test.labels, args, rank, world))
    return result


def run_fewshot(args, device, rank, world, log, folder):
    """Every (way, shot, fold): a fresh classifier from the same checkpoint; mean +- std over folds."""
    resume = torch.load(args.resume, map_location='cpu', weights_only=False) if args.resume else None
    done, summary = dict(resume.get('fewshot_results', {})) if resume else {}, {}
    for way in args.ways:
        for shot in args.shots:
            setting = f'{way}way{shot}shot'
            for fold in args.folds:
                key = f'{setting}/{fold}'
                if key not in done:
                    train, test = load_fewshot_fold(args.data_root, way, shot, fold, args.load_points or None)
                    state = resume if resume is not None and resume.get('fold') == key else None
                    seed_everything(args.seed + rank)   # a fold's result does not depend on which folds ran before
                    classifier, described = build_classifier(args, way, state)
                    log(f'{key}: {len(train.labels)} train / {len(test.labels)} test shapes, {described}')
                    done[key] = finetune(classifier.to(device), train, test, args, device, rank, world, log, folder,
                                         state, dict(fold=key, fewshot_results=dict(done)))['test_accuracy']
                log(f'{key}: final-epoch test accuracy {done[key]:.2f}%', fold=key, test_accuracy=done[key])
            accuracies = [done[f'{setting}/{fold}'] for fold in args.folds]
            summary[setting] = (float(np.mean(accuracies)), float(np.std(accuracies)))
            log(f'== {way}-way {shot}-shot: {summary[setting][0]:.2f} ± {summary[setting][1]:.2f} '
                f'(mean ± std over folds {args.folds})', setting=setting, accuracies=accuracies)
    return dict(fewshot=summary, folds=done)


def main(args):
    device, rank, world = setup_device(args)
    folder = os.path.join('runs', args.run_name)
    log = Log(folder, rank)
    log(f'I2P-MAE fine-tuning on {device}, {world} process(es), settings:\n'
        + '\n'.join(f'  --{k} {v}' for k, v in sorted(vars(args).items())))
    if args.batch_size % world:
        raise SystemExit(f'--batch_size {args.batch_size} must be divisible by the {world} processes')
    if args.data == 'fewshot':
        result = run_fewshot(args, device, rank, world, log, folder)
    else:   # data seed 0: the shapes pretrain.py and svm_eval.py see by default, whatever --seed is
        train, test = (load_split(args.data, split, args.data_root, args.load_points or None, seed=0)
                       for split in ('train', 'test'))
        resume = torch.load(args.resume, map_location='cpu', weights_only=False) if args.resume else None
        classifier, described = build_classifier(args, len(train.class_names), resume)
        classifier.to(device)
        log(f'{args.data}: {len(train.labels)} train / {len(test.labels)} test shapes, {described}\n'
            f'  model {asdict(classifier.cfg)}, pooling {classifier.pooling}')
        if args.test_only:
            pool = test_inputs(test.points, args, device)
            result = dict(test_accuracy=evaluate(classifier, pool, test.labels, args, rank, world),
                          **(voting(classifier, pool, test.labels, args, rank, world) if args.vote else {}))
        else:
            result = finetune(classifier, train, test, args, device, rank, world, log, folder, resume)
        r = result
        log((f'== test accuracy of {args.ckpt} {r["test_accuracy"]:.2f}%' if args.test_only else
             f'== final-epoch test accuracy {r["test_accuracy"]:.2f}% (the number we report)')
            + (f'\n   best.pt (chosen on validation, {r["best_val_accuracy"]:.2f}%): test accuracy '
               f'{r["test_accuracy_of_best_val"]:.2f}%' if 'best_val_accuracy' in r else '')
            + (f'\n   voting: {r["vote_mean"]:.2f} ± {r["vote_std"]:.2f}% (mean ± std of {args.vote_runs} runs)'
               if 'vote_mean' in r else '')
            + (f'\n   for comparison only: best test epoch {r["max_test_accuracy_over_epochs"]:.2f}% (the paper\'s '
               f'convention, chosen on the test set)' if r.get('max_test_accuracy_over_epochs') is not None else ''),
            **{k: v for k, v in r.items() if k != 'history'})
    if world > 1:
        dist.destroy_process_group()
    return result


if __name__ == '__main__':
    main(parse_args())
