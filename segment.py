"""
segment.py: part segmentation with a pre-trained I2P-MAE encoder (I2P-MAE paper, section
"Downstream Tasks", part segmentation on ShapeNetPart). I2P-MAE ships no segmentation code:
the head, recipe and metrics are those of its 3D-only parent, Point-M2AE
(segmentation/Point_M2AE_SEG.py, main.py and dataset.py of ZrrSkywalker/Point-M2AE).

  python segment.py                                        # synthetic demo on a CPU, a few minutes
  python segment.py --data shapenetpart --gpu 0            # ShapeNetPart from runs/pretrain-shapenet/last.pt
  python segment.py --data shapenetpart --ckpt pre-train.pth --gpu 0   # from the authors' pre-training
  python segment.py --test_only --ckpt runs/segment-synthetic/last.pt  # test a segmentation run's weights
  torchrun --nproc_per_node=4 segment.py --data shapenetpart
--data picks a preset (PRESETS); any flag overrides it. The encoder's architecture comes from the
checkpoint; group sizes, radii and drop path, which no weight depends on, and the head's widths come
from the preset. We report the FINAL-epoch test mIoU_C / mIoU_I and a per-category table; the
authors' best test epoch is printed for comparison only. Writes runs/<run_name>/ as pretrain.py does;
`python demo.py segment` draws test shapes with their true and predicted parts. --test_only scores a
segmentation run's last.pt with the settings it was trained with (TRAINED_WITH, from the file) and
logs to runs/segment-<data>-test/, never to the training run's folder.

Its own script, not a finetune.py preset, because everything around the encoder differs from
classification: the data (a part label per point, a category per shape, shapes of different sizes
drawn with replacement), the head (features of every point, propagated from every scale), the
metrics (IoU over the ground-truth category's parts, per shape and per category) and the outputs.

  xyz (B, N, 3), category (B,)
    encoder, nothing masked, local attention   -> tokens per scale (B, G_i, C_i), LayerNorm each
    per scale: 3-NN upsampling to the N points, concat [xyz, features], Conv-BN-ReLU x2 -> (B, 1024, N)
    global max + mean of the 3 scales (3072), one-hot category -> Conv-BN-LeakyReLU (64), per point 3072
    head 6208 -> 1024 -> 512 -> 256 -> 50, log-softmax                      -> log-probs (B, N, 50)
  loss: NLL over all points; prediction: argmax over the parts of the shape's TRUE category
  mIoU_I: mean over shapes of the mean IoU of their category's parts (a part absent from both the
          prediction and the truth counts 1); mIoU_C: mean over categories of that mean per category

Read `PartSegmenter.forward`, then `train_step` and `evaluate`, then `train_segmenter` (training.train runs
the epochs). The data come from data.load_part_split ('synthetic' parts, or ShapeNetPart's text files)
and data.draw_part_points. Tests: the segment.py section of test_all.py
"""
import argparse
import math
import os
import time
from dataclasses import asdict, replace

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # before torch loads OpenMP: waiting threads sleep (docs/speed.md)
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import build_token_hierarchy
from model import Encoder, ModelConfig, SMALL_CONFIG, conv_bn, interpolate_3nn
from checkpoints import checkpoint_config, load_weights, read_checkpoint
from data import draw_part_points, load_part_split, scale_isotropic_and_shift
from flags import (ArgumentParser, add_run_flags, fraction, non_negative_float, non_negative_int, parse_run_flags,
                   positive_float, positive_int, run_script)
from processes import end_process, setup_process, sum_over_processes
from training import Run, param_groups, run_folder, train

# The protocol of Point-M2AE's segmentation (main.py, Point_M2AE_SEG.py); --data picks a preset and
# any flag given overrides it.
SHAPENETPART = dict(
    load_points=0, points=2048,     # 0: every stored point; the model sees 2048 drawn
    group_sizes=(16, 8, 8), local_radius=(0.32, 0.64, 1.28), drop_path_rate=0.1,
    epochs=300, warmup_epochs=10, batch_size=16, lr=2e-4, min_lr=1e-6, weight_decay=0.05, grad_clip=10.0,
    scale_low=0.8, scale_high=1.25, shift=0.1, config='full', head='full',
    ckpt='runs/pretrain-shapenet/last.pt')
PRESETS = {
    'shapenetpart': SHAPENETPART,
    # CPU demo: model.SMALL_CONFIG (128/64/16 tokens) on 512 points drawn from 1024, as the pre-training
    # demo's 512 (each scale-0 token covers the same share of the cloud: K x G / N = 4, as 16 x 512 / 2048).
    # The official radii block about the same share of token pairs here as in the full setting (the share
    # follows the cloud's size, not G); the learning rate comes from a sweep (both: docs/evaluation.md).
    'synthetic': dict(SHAPENETPART, load_points=1024, points=512, epochs=8, warmup_epochs=None,
                      lr=3e-3, config='small', head='small', ckpt='runs/pretrain-synthetic/last.pt'),
}
# the training split of each dataset: the protocol trains on ShapeNetPart's train + val lists
TRAIN_SPLIT = {'shapenetpart': 'trainval', 'synthetic': 'train'}
# Widths of the head: per-scale propagation convs, the label branch, the MLP after the concatenation.
# 'full' is Point-M2AE's (1536 = 4 x 384, 1024; 64; 1024, 512, 256); 'small' fits a CPU demo.
HEADS = {'full': dict(propagation_dims=(1536, 1024), label_dim=64, head_dims=(1024, 512, 256)),
         'small': dict(propagation_dims=(128, 64), label_dim=16, head_dims=(128, 64, 32))}
# flags that may change on --resume: they do not change what the run computes
MAY_DIFFER = ('test_every', 'ckpt', 'from_scratch', 'config', 'test_only')
# what --test_only takes from a segmentation checkpoint's flags: the settings that change what the test computes
# (the head's widths, the test points drawn per shape, the grouping and attention radii, the synthetic shapes)
TRAINED_WITH = ('head', 'points', 'group_sizes', 'local_radius', 'load_points')


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group('data (flags without a default take the --data preset)')
    d.add_argument('--data', default='synthetic', choices=list(PRESETS), help='dataset and its preset (PRESETS)')
    d.add_argument('--data_root', default='./data', help='folder holding the datasets (docs/data.md)')
    d.add_argument('--load_points', type=non_negative_int, help='synthetic points generated per shape (synthetic: 1024; '
                                                                'ShapeNetPart: 0, every stored point)')
    d.add_argument('--points', type=positive_int, help='points drawn per shape, with replacement (official: 2048)')
    d.add_argument('--scale_low', type=positive_float, help='isotropic scale augmentation, per shape (official: 0.8)')
    d.add_argument('--scale_high', type=positive_float, help='(official: 1.25)')
    d.add_argument('--shift', type=non_negative_float, help='per-axis shift augmentation, per shape (official: 0.1)')
    m = p.add_argument_group('model')
    m.add_argument('--ckpt', help="pretrain.py checkpoint or the authors' pre-training .pth "
                                  '(preset: runs/pretrain-shapenet/last.pt; synthetic: runs/pretrain-synthetic/last.pt)')
    m.add_argument('--from_scratch', action='store_true', help='random initialisation instead of --ckpt')
    m.add_argument('--config', choices=['full', 'small'], help='encoder with --from_scratch (preset: full; synthetic: small)')
    m.add_argument('--head', choices=list(HEADS), help='head widths (preset: full = Point-M2AE; synthetic: small)')
    m.add_argument('--group_sizes', type=positive_int, nargs=3, help='kNN sizes per scale (official: 16 8 8)')
    m.add_argument('--local_radius', type=non_negative_float, nargs=3,
                   help='attention radii per scale (official: 0.32 0.64 1.28)')
    m.add_argument('--drop_path_rate', type=fraction, help='stochastic depth of the encoder (official: 0.1)')
    o = p.add_argument_group('optimisation')
    o.add_argument('--epochs', type=positive_int, help='epochs (official: 300)')
    o.add_argument('--cosine_epochs', type=positive_int, help='length of the cosine schedule (official: = epochs, as '
                                                              'the authors\' timm t_initial)')
    o.add_argument('--warmup_epochs', type=non_negative_int, help='linear warm-up from --min_lr (official: 10; synthetic '
                                                                  '1, none in a run of one epoch)')
    o.add_argument('--batch_size', type=positive_int,
                   help='total batch over all processes, at least 2 per process for BatchNorm (official: 16)')
    o.add_argument('--lr', type=positive_float, help='peak learning rate (official: 2e-4)')
    o.add_argument('--min_lr', type=non_negative_float, help='floor and warm-up start (official: 1e-6)')
    o.add_argument('--weight_decay', type=non_negative_float,
                   help='AdamW weight decay (official code: 0.05; the paper says 0.1)')
    o.add_argument('--grad_clip', type=positive_float, help='clip_grad_norm_ over all parameters (official: 10)')
    s = add_run_flags(p, 'segment')
    s.add_argument('--test_only', action='store_true',
                   help="evaluate a segmentation --ckpt (segment.py's last.pt), no training: the settings it was trained "
                        f'with ({", ".join(TRAINED_WITH)}) come from the file; writes runs/<run_name>/ '
                        '(default: segment-<data>-test), never the training run\'s folder unless --run_name names it')
    s.add_argument('--test_every', type=positive_int, default=1, help='epochs between test evaluations (monitoring only)')
    args = parse_run_flags(p, argv, PRESETS, MAY_DIFFER)
    if args.batch_size < 2:
        p.error(f'--batch_size {args.batch_size}: BatchNorm in training mode needs at least 2 shapes per batch')
    for low, high in (('scale_low', 'scale_high'), ('min_lr', 'lr')):
        if getattr(args, low) > getattr(args, high):
            p.error(f'--{low} {getattr(args, low)} is above --{high} {getattr(args, high)}')
    if args.data != 'synthetic' and args.load_points:
        p.error(f'--load_points {args.load_points}: for --data synthetic only ({args.data} keeps every stored point)')
    if args.data == 'synthetic' and not args.load_points:
        p.error('--load_points 0: --data synthetic generates a number of points per shape (preset: 1024)')
    args.group_sizes, args.local_radius = tuple(args.group_sizes), tuple(args.local_radius)
    args.run_name = args.run_name or f'segment-{args.data}' + ('-test' if args.test_only else '')
    return args


# ---------------------------------------------------------------- the model


class PartSegmenter(nn.Module):
    """The encoder with its per-scale LayerNorms, and Point-M2AE's segmentation head.

    forward(xyz (B, N, 3), categories (B,)) -> log-probabilities (B, N, num_parts).
    """
    # checkpoints.load_weights: what a pre-training file lacks (the encoder and its norms come from pre-training)
    NAME, NEW_KEYS = 'segmenter', ('propagation.', 'label_conv.', 'head.')

    def __init__(self, cfg, num_categories=16, num_parts=50, propagation_dims=(1536, 1024), label_dim=64,
                 head_dims=(1024, 512, 256)):
        super().__init__()
        self.cfg, self.num_categories = cfg, num_categories
        self.encoder = Encoder(cfg)
        self.encoder_norms = nn.ModuleList([nn.LayerNorm(d) for d in cfg.encoder_dims])   # as pre-training's
        hidden, out = propagation_dims
        self.propagation = nn.ModuleList([nn.Sequential(*conv_bn(3 + d, hidden, nn.ReLU()), *conv_bn(hidden, out, nn.ReLU()))
                                          for d in cfg.encoder_dims])
        self.label_conv = nn.Sequential(nn.Conv1d(num_categories, label_dim, 1, bias=False), nn.BatchNorm1d(label_dim),
                                        nn.LeakyReLU(0.2))
        width = 2 * len(cfg.encoder_dims) * out + label_dim         # global 3 x 1024, label 64, per point 3 x 1024
        layers = []
        for i, d in enumerate(head_dims):
            layers += [*conv_bn(width, d, nn.ReLU()), *([nn.Dropout(0.5)] if i == 0 else [])]
            width = d
        self.head = nn.Sequential(*layers, nn.Conv1d(width, num_parts, 1))

    def point_features(self, xyz):
        """(B, N, 3) -> (B, 3 x out, N): every scale's tokens, propagated to every point."""
        groups = build_token_hierarchy(xyz, self.cfg.num_groups, self.cfg.group_sizes)
        nothing_masked = [torch.zeros(g.idx.shape[:2], dtype=torch.bool, device=xyz.device) for g in groups]
        counts = [[g] * xyz.shape[0] for g in self.cfg.num_groups]      # every token visible: nothing to read back
        features = []
        encoded_scales = self.encoder(groups, nothing_masked, counts)
        for group, encoded, norm, propagate in zip(groups, encoded_scales, self.encoder_norms, self.propagation):
            tokens = norm(encoded.x)                                     # (B, G_i, C_i), in token order
            upsampled = interpolate_3nn(xyz, group.centers, tokens)      # (B, N, C_i)
            features.append(propagate(torch.cat([xyz, upsampled], dim=-1).transpose(1, 2)))   # (B, out, N)
        return torch.cat(features, dim=1)

    def forward(self, xyz, categories):
        N = xyz.shape[1]
        x = self.point_features(xyz)                                     # (B, 3 x out, N)
        global_feature = x.max(dim=2, keepdim=True).values + x.mean(dim=2, keepdim=True)     # (B, 3 x out, 1)
        one_hot = F.one_hot(categories, self.num_categories).to(x.dtype)[..., None]          # (B, 16, 1)
        x = torch.cat([global_feature.expand(-1, -1, N), self.label_conv(one_hot).expand(-1, -1, N), x], dim=1)
        return F.log_softmax(self.head(x).float(), dim=1).transpose(1, 2)   # (B, N, num_parts)


def build_segmenter(encoder_config, args, num_categories, num_parts):
    """A PartSegmenter on `encoder_config` (a ModelConfig, e.g. a checkpoint's), with the preset's group
    sizes, local radii and drop path (no weight depends on them) and the preset's head widths."""
    try:   # ModelConfig checks itself
        cfg = replace(encoder_config, group_sizes=args.group_sizes, local_radius=args.local_radius,
                      drop_path_rate=args.drop_path_rate)
    except ValueError as error:
        raise SystemExit(f'--group_sizes {args.group_sizes} / --local_radius {args.local_radius}: {error}') from None
    if args.points < cfg.min_points:
        raise SystemExit(f'--points {args.points}: the model groups {cfg.min_points} points per shape at its finest '
                         f'scale (num_groups {cfg.num_groups[0]}, --group_sizes {cfg.group_sizes[0]})')
    return PartSegmenter(cfg, num_categories, num_parts, **HEADS[args.head])


# ---------------------------------------------------------------- metrics


def part_table(category_parts, num_parts, device=None):
    """[[0, 1, 2, 3], [4, 5], ...] -> (num_categories, num_parts) bool: which parts each category has."""
    table = torch.zeros(len(category_parts), num_parts, dtype=torch.bool, device=device)
    for c, ids in enumerate(category_parts):   # a loop over the 16 categories, once
        table[c, ids] = True
    return table


def predict_parts(log_probs, categories, table):
    """(B, N, P) log-probabilities -> (B, N) part ids: the argmax over the parts of each shape's TRUE
    category only (the protocol: a chair point is never called a wing)."""
    allowed = table[categories][:, None, :]                                  # (B, 1, P)
    return log_probs.masked_fill(~allowed, -math.inf).argmax(dim=-1)


def shape_ious(predicted, parts, categories, table):
    """(B, N) predicted and true part ids -> (B,) mean IoU over each shape's category parts.

    A part in neither the prediction nor the truth counts as IoU 1 (Point-M2AE's main.py)."""
    P = table.shape[1]
    is_pred, is_true = F.one_hot(predicted, P).bool(), F.one_hot(parts, P).bool()   # (B, N, P) each
    intersection, union = (is_pred & is_true).sum(dim=1), (is_pred | is_true).sum(dim=1)   # (B, P)
    iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(intersection, dtype=torch.float))
    allowed = table[categories]                                              # (B, P)
    return (iou * allowed).sum(dim=1) / allowed.sum(dim=1)


def iou_sums(ious, categories, num_categories):
    """Per-shape IoUs (B,) -> (num_categories, 2): summed IoU and number of shapes of each category.
    Sums, so that batches and DDP ranks can be added up before the means are taken."""
    sums = torch.zeros(num_categories, 2, device=ious.device)
    return sums.index_add_(0, categories, torch.stack([ious, torch.ones_like(ious)], dim=1))


def segmentation_metrics(sums, correct, seen, category_names):
    """(num_categories, 2) IoU sums and counts, correct and seen points -> dict of
    miou_c (%, mean over the categories present), miou_i (%, mean over shapes), accuracy (% of
    points) and per_category {name: (% IoU, shapes)} for the categories present."""
    total, count = sums[:, 0].double(), sums[:, 1].double()
    present = count > 0
    per_category = total[present] / count[present]
    names = [n for n, p in zip(category_names, present.tolist()) if p]
    return dict(miou_c=100 * per_category.mean().item(), miou_i=100 * (total.sum() / count.sum()).item(),
                accuracy=100 * correct / max(seen, 1),
                per_category={n: (100 * v, int(c)) for n, v, c in zip(names, per_category.tolist(), count[present].tolist())})


def iou_table(metrics):
    """The per-category table as text lines."""
    rows = [f'  {name:<12s} {iou:6.2f}%  ({shapes} shapes)' for name, (iou, shapes) in metrics['per_category'].items()]
    return '\n'.join(['  category      mIoU', *rows, f'  mIoU_C {metrics["miou_c"]:.2f}%  mIoU_I {metrics["miou_i"]:.2f}%  '
                                                       f'point accuracy {metrics["accuracy"]:.2f}%'])


# ---------------------------------------------------------------- one step, one epoch, one evaluation


def training_batch(split, idx, args, device):
    """Shapes idx of a PartSplit -> (xyz (B, points, 3), parts (B, points), categories (B,)) on the device:
    `points` drawn with replacement from each shape, then scaled and shifted (Point-M2AE's provider.py)."""
    idx = idx.to(split.points.device)
    xyz, parts = draw_part_points(split.points[idx], split.parts[idx], split.counts[idx], args.points)
    xyz = scale_isotropic_and_shift(xyz.to(device, non_blocking=True), args.scale_low, args.scale_high, args.shift)
    return xyz, parts.to(device, non_blocking=True), split.categories[idx].to(device, non_blocking=True)


def train_step(model, optimizer, xyz, parts, categories, args):
    """Forward, NLL over every point, backward, clip, ONE optimizer step -> (loss, correct points), detached.

    deviation: Point-M2AE's main.py calls optimizer.step() twice per iteration, once before the gradient
    clipping and once after it (a bug: AdamW then moves twice on the same gradients); we step once, after.
    """
    with torch.autocast(xyz.device.type, dtype=torch.bfloat16, enabled=args.amp):
        log_probs = model(xyz, categories)                               # (B, N, P) float32
    loss = F.nll_loss(log_probs.flatten(0, 1), parts.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    return loss.detach(), (log_probs.detach().argmax(dim=-1) == parts).sum()


def fixed_test_points(split, num_points, seed=0):
    """The fixed test input: num_points drawn with replacement from every shape, once, with a seeded
    generator -> (xyz (S, n, 3), parts (S, n)). Every evaluation (each epoch, --test_only) sees these.

    deviation: Point-M2AE's loader redraws the 2048 points at every read, so each evaluation of theirs
    sees different points; fixed points make the numbers of two evaluations comparable.
    """
    return draw_part_points(split.points, split.parts, split.counts, num_points,
                            generator=torch.Generator(split.points.device).manual_seed(seed))


@torch.no_grad()
def evaluation_sums(model, xyz, parts, categories, table, batch_size, amp=False):
    """Fixed test points xyz (S, n, 3), parts (S, n), categories (S,) -> IoU sums (C, 2) and
    (correct points, points) (2,), on the model's device, ready to be summed over processes."""
    model.eval()
    device = table.device
    sums, counts = torch.zeros(table.shape[0], 2, device=device), torch.zeros(2, device=device)
    for idx in torch.arange(len(xyz)).split(batch_size):
        x, y, c = xyz[idx].to(device), parts[idx].to(device), categories[idx].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            predicted = predict_parts(model(x, c), c, table)                 # (b, n)
        sums += iou_sums(shape_ious(predicted, y, c, table), c, table.shape[0])
        counts += torch.stack([(predicted == y).sum().float(), torch.tensor(float(y.numel()), device=device)])
    return sums, counts


def evaluate(model, xyz, parts, categories, category_parts, category_names, batch_size=32, amp=False, process=None):
    """mIoU_C, mIoU_I, point accuracy and the per-category table (segmentation_metrics) on fixed test points.
    With the `process` of a multi-process run, each process scores every world-th shape and the sums are added."""
    device = next(model.parameters()).device
    table = part_table(category_parts, model.head[-1].out_channels, device)
    rank, world = (process.rank, process.world) if process is not None else (0, 1)
    sums, counts = evaluation_sums(model, xyz[rank::world], parts[rank::world], categories[rank::world], table,
                                   batch_size, amp)
    if process is not None:
        sums, counts = sum_over_processes(sums, process), sum_over_processes(counts, process)
    correct, seen = counts.tolist()
    return segmentation_metrics(sums, correct, seen, category_names)


# ---------------------------------------------------------------- data, model and picture of a run


def read_splits(args, process):
    """(train, test) PartSplits (data seed 0, whatever --seed is). Rank 0 reads first: with ShapeNetPart it
    parses the text files and writes their cache, then the other processes read the cache (rather than
    every process parsing the same 17k files at once)."""
    def read():
        return [load_part_split(args.data, split, args.data_root, args.load_points or None, seed=0)
                for split in (TRAIN_SPLIT[args.data], 'test')]
    splits, error = None, None
    if process.rank == 0:
        try:
            splits = read()
        except Exception as raised:   # said to every process: the others would wait for rank 0 until a timeout
            error = raised
    if sum_over_processes(torch.tensor(float(error is not None), device=process.device), process).item() > 0:
        if error is not None:
            raise error
        raise SystemExit(f'rank {process.rank}: rank 0 could not read --data {args.data} (its message says why)')
    return splits or read()


def read_pretrained(args):
    """The --ckpt file (None with --from_scratch), read once. With --test_only it must be a segmentation
    run's, and the flags it was trained with (TRAINED_WITH) replace ours, as they change what the test
    computes; returns the lines that say which changed."""
    if args.from_scratch:
        return None, []
    checkpoint = read_checkpoint(args.ckpt, '--ckpt')
    trained = checkpoint.get('args', {})
    if args.test_only and 'model_state_dict' in checkpoint:   # Point-M2AE's seg.pth: weights and scores, no flags
        return checkpoint, ['the file carries no settings; from the flags and the --data preset: ' + ', '.join(
            f'--{key} {getattr(args, key)}' for key in TRAINED_WITH)]
    if not args.test_only or 'head' not in trained:   # not a segmentation run: load_weights says what it is
        return checkpoint, []
    if trained['data'] != args.data:
        raise SystemExit(f'--ckpt {args.ckpt} was trained on --data {trained["data"]}: test it with --data {trained["data"]}')
    changed = []
    for key in TRAINED_WITH:
        value = tuple(trained[key]) if isinstance(trained[key], list) else trained[key]
        if value != getattr(args, key):
            changed.append(f'--{key} {value} (the flags said {getattr(args, key)})')
            setattr(args, key, value)
    return checkpoint, changed


def build_model(args, num_categories, num_parts, checkpoint=None, resume=None):
    """(PartSegmenter, a line saying where its weights come from). The encoder's architecture is the checkpoint's
    (`checkpoint`: read_pretrained's)."""
    if resume is not None:   # train_segmenter loads its weights, with the optimizer
        return build_segmenter(checkpoint_config(resume, args.resume), args, num_categories, num_parts), \
            f'resumed from {args.resume}'
    if checkpoint is None:
        return build_segmenter(SMALL_CONFIG if args.config == 'small' else ModelConfig(), args, num_categories, num_parts), \
            f'random initialisation ({args.config} encoder)'
    model = build_segmenter(checkpoint_config(checkpoint, args.ckpt), args, num_categories, num_parts)
    skipped = load_weights(model, checkpoint, args.ckpt, fine_tune=not args.test_only)
    reasons = {why: [k for k in skipped if skipped[k] == why] for why in skipped.values()}
    return model, (f'{"segmenter" if args.test_only else "encoder"} from {args.ckpt} '
                   f'({"ours" if "model_config" in checkpoint else "theirs"})'
                   + ''.join(f'\n    skipped {len(k)} key(s) like {k[0]}: {why}' for why, k in reasons.items()))


# ---------------------------------------------------------------- the recipe


def train_segmenter(segmenter, train_split, test, test_xyz, test_parts, args, run, checkpoint=None):
    """Train `segmenter` on `train_split` (a PartSplit), testing it every --test_every epochs and after the
    last on the fixed test points. Returns the history (one record per epoch) and the final metrics."""
    optimizer = torch.optim.AdamW(param_groups(segmenter, args.weight_decay), lr=args.lr)
    final = {}

    def step(model, idx):
        xyz, parts, categories = training_batch(train_split, idx, args, run.process.device)
        loss, correct = train_step(model, optimizer, xyz, parts, categories, args)
        return dict(loss=loss, accuracy=100 * correct / parts.numel()), parts.numel()

    def evaluate_epoch(epoch, record):   # monitoring, never selection
        if (epoch + 1) % args.test_every and epoch + 1 < args.epochs:
            return {}
        final.update(evaluate(segmenter, test_xyz, test_parts, test.categories, test.category_parts,
                              test.category_names, args.batch_size, args.amp, run.process))
        return dict(test_miou_c=final['miou_c'], test_miou_i=final['miou_i'], test_accuracy=final['accuracy'],
                    per_category=final['per_category'])
    history = train(run, segmenter, optimizer, args, len(train_split.points), step, evaluate_epoch, ('loss', 'accuracy'),
                    checkpoint, model_config=asdict(segmenter.cfg), num_categories=segmenter.num_categories,
                    num_parts=segmenter.head[-1].out_channels)
    return history, final   # the last epoch always tests (a finished run cannot be resumed)


def main(args):
    if not (args.resume or args.from_scratch or os.path.isfile(args.ckpt)):   # before anything is announced or built
        raise SystemExit(
            f'--ckpt {args.ckpt}: no such file; --test_only tests the last.pt of a segmentation run (runs/segment-'
            f'{args.data}/last.pt after python segment.py --data {args.data})' if args.test_only else
            f'--ckpt {args.ckpt}: no such file' + '. Pre-train first (python pretrain.py'
            + ('' if args.data == 'synthetic' else ' --data shapenet') + '), pass our last.pt or the authors\' '
            'pre-train.pth as --ckpt, or train with --from_scratch')
    process = setup_process(args)
    if args.batch_size % process.world or args.batch_size // process.world < 2:
        raise SystemExit(f'--batch_size {args.batch_size} over {process.world} processes: each process needs an '
                         f'equal share of at least 2 shapes (BatchNorm)')
    run = Run(run_folder(args), process, 'segment.py')
    run.log(f'part segmentation on {args.data} ' + ('continuing ' + args.resume if args.resume else 'from a random '
            'encoder (--from_scratch)' if args.from_scratch else f'{"testing" if args.test_only else "from the encoder of"} '
            f'{args.ckpt}' + (' (the default --ckpt: the pre-training run of this kind of data, as svm_eval.py)'
                              if args.ckpt == PRESETS[args.data]['ckpt'] else '')))
    checkpoint = None if args.test_only else run.resume(args)   # --test_only appends to its own folder's log
    pretrained, changed = (None, []) if checkpoint else read_pretrained(args)
    train_split, test = read_splits(args, process)
    num_parts = sum(len(ids) for ids in train_split.category_parts)
    segmenter, described = build_model(args, len(train_split.category_names), num_parts, pretrained, checkpoint)
    segmenter.to(process.device)
    run.start(args, model_config=asdict(segmenter.cfg), weights=described,
              num_categories=len(train_split.category_names), num_parts=num_parts)
    run.log(f'{args.data}: {len(train_split.points)} train / {len(test.points)} test shapes, '
            f'{len(train_split.category_names)} categories, {num_parts} parts, {args.points} points drawn per shape; '
            f'{described}\n  every flag and the model: {run.path("args.json")}'
            + ''.join(f'\n  {args.ckpt}: {line}' if line.startswith('the file') else
                      f'\n  from {args.ckpt}, as it was trained: {line}' for line in changed))
    test_xyz, test_parts = fixed_test_points(test, args.points)   # (S, points, 3), (S, points): every evaluation's
    if args.test_only:
        history, metrics = [], evaluate(segmenter, test_xyz, test_parts, test.categories, test.category_parts,
                                        test.category_names, args.batch_size, args.amp, process)
    else:
        history, metrics = train_segmenter(segmenter, train_split, test, test_xyz, test_parts, args, run, checkpoint)
    tested = [h for h in history if 'test_miou_c' in h]
    best = dict(max_test_miou_c_over_epochs=max(h['test_miou_c'] for h in tested),
                max_test_miou_i_over_epochs=max(h['test_miou_i'] for h in tested)) if tested else {}
    result = dict(test_miou_c=metrics['miou_c'], test_miou_i=metrics['miou_i'], test_accuracy=metrics['accuracy'],
                  per_category=metrics['per_category'], **best)
    run.log((f'== test of {args.ckpt}' if args.test_only else '== final-epoch test (the numbers we report)')
            + f': mIoU_C {metrics["miou_c"]:.2f}%, mIoU_I {metrics["miou_i"]:.2f}%\n' + iou_table(metrics)
            + (f'\n   for comparison only: best test epoch mIoU_C {best["max_test_miou_c_over_epochs"]:.2f}%, mIoU_I '
               f'{best["max_test_miou_i_over_epochs"]:.2f}% (the paper\'s convention, chosen on the test set, each '
               f'maximum over epochs on its own)' if best else ''), **result)
    minutes = (time.time() - run.started) / 60
    run.log(f'tested in {minutes:.1f} min; the log: {run.path("log.jsonl")}' if args.test_only else
            f'part segmentation done in {minutes:.1f} min (this session). Next: its picture, python demo.py segment '
            f'--ckpt {run.path("last.pt")}; or test these weights again, python segment.py --data {args.data} '
            f'--test_only --ckpt {run.path("last.pt")} (into runs/segment-{args.data}-test/)')
    end_process(process)
    return result


if __name__ == '__main__':
    run_script(main, parse_args)
