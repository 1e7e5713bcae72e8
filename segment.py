"""
segment.py: part segmentation with a pre-trained I2P-MAE encoder (I2P-MAE paper, section
"Downstream Tasks", part segmentation on ShapeNetPart). I2P-MAE ships no segmentation code:
the head, recipe and metrics are those of its 3D-only parent, Point-M2AE
(segmentation/Point_M2AE_SEG.py, main.py and dataset.py of ZrrSkywalker/Point-M2AE).

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

Read `PartSegmenter.forward`, then `train_step` and `evaluate`. The data come from
data.load_part_split ('synthetic' parts, or ShapeNetPart's text files) and data.draw_part_points.
Tests: the "segment.py" section of test_all.py
"""
import argparse
import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import build_token_hierarchy
from model import Encoder, ModelConfig, SMALL_CONFIG, conv_bn, interpolate_3nn, official_to_ours
from data import draw_part_points, scale_isotropic_and_shift

# The protocol of Point-M2AE's segmentation (main.py, Point_M2AE_SEG.py); --data picks a preset and
# any flag given overrides it.
SHAPENETPART = dict(
    train_split='trainval', load_points=0, points=2048,     # 0: every stored point; the model sees 2048 drawn
    group_sizes=(16, 8, 8), local_radius=(0.32, 0.64, 1.28), drop_path_rate=0.1,
    epochs=300, warmup_epochs=10, batch_size=16, lr=2e-4, min_lr=1e-6, weight_decay=0.05, grad_clip=10.0,
    scale_low=0.8, scale_high=1.25, shift=0.1, config='full', head='full',
    ckpt='runs/pretrain-shapenet/last.pt')
PRESETS = {
    'shapenetpart': SHAPENETPART,
    # CPU demo: model.SMALL_CONFIG (128/64/16 tokens) on 512 points drawn from 1024, as the pre-training
    # demo's 512 (each scale-0 token covers the same share of the cloud: K x G / N = 4, as 16 x 512 / 2048).
    # The official radii block about the same share of token pairs here as in the full setting
    # (88/60/16% vs 87/59/12%, measured on synthetic shapes): the share follows the cloud's size, not G.
    # Batch 16 and lr 2e-3 / 3e-3 / 5e-3 reached 56 / 63 / 64% mIoU_I in 8 epochs from scratch (measured);
    # 3e-3 is the milder of the two best: it also has to suit a pre-trained encoder.
    'synthetic': dict(SHAPENETPART, train_split='train', load_points=1024, points=512, epochs=8, warmup_epochs=1,
                      lr=3e-3, config='small', head='small', ckpt='runs/pretrain-synthetic/last.pt'),
}
# Widths of the head: per-scale propagation convs, the label branch, the MLP after the concatenation.
# 'full' is Point-M2AE's (1536 = 4 x 384, 1024; 64; 1024, 512, 256); 'small' fits a CPU demo.
HEADS = {'full': dict(propagation_dims=(1536, 1024), label_dim=64, head_dims=(1024, 512, 256)),
         'small': dict(propagation_dims=(128, 64), label_dim=16, head_dims=(128, 64, 32))}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group('data (flags without a default take the --data preset)')
    d.add_argument('--data', default='synthetic', choices=list(PRESETS), help='dataset and its preset (PRESETS)')
    d.add_argument('--data_root', default='./data', help='folder holding the datasets (README: data layout)')
    d.add_argument('--load_points', type=int, help='synthetic points generated per shape (ShapeNetPart: all stored)')
    d.add_argument('--points', type=int, help='points drawn per shape, with replacement (official: 2048)')
    d.add_argument('--scale_low', type=float, help='isotropic scale augmentation, per shape (official: 0.8)')
    d.add_argument('--scale_high', type=float, help='(official: 1.25)')
    d.add_argument('--shift', type=float, help='per-axis shift augmentation, per shape (official: 0.1)')
    m = p.add_argument_group('model')
    m.add_argument('--ckpt', help="pretrain.py checkpoint or the authors' pre-training .pth "
                                  '(preset: runs/pretrain-shapenet/last.pt; synthetic: runs/pretrain-synthetic/last.pt)')
    m.add_argument('--from_scratch', action='store_true', help='random initialisation instead of --ckpt')
    m.add_argument('--config', choices=['full', 'small'], help='encoder with --from_scratch (preset: full; synthetic: small)')
    m.add_argument('--head', choices=list(HEADS), help='head widths (preset: full = Point-M2AE; synthetic: small)')
    m.add_argument('--group_sizes', type=int, nargs=3, help='kNN sizes per scale (official: 16 8 8)')
    m.add_argument('--local_radius', type=float, nargs=3, help='attention radii per scale (official: 0.32 0.64 1.28)')
    m.add_argument('--drop_path_rate', type=float, help='stochastic depth of the encoder (official: 0.1)')
    o = p.add_argument_group('optimisation')
    o.add_argument('--epochs', type=int, help='epochs (official: 300)')
    o.add_argument('--warmup_epochs', type=int, help='linear warm-up from --min_lr (official: 10)')
    o.add_argument('--batch_size', type=int, help='total batch over all processes (official: 16)')
    o.add_argument('--lr', type=float, help='peak learning rate (official: 2e-4)')
    o.add_argument('--min_lr', type=float, help='floor and warm-up start (official: 1e-6)')
    o.add_argument('--weight_decay', type=float, help='AdamW weight decay (official code: 0.05; the paper says 0.1)')
    o.add_argument('--grad_clip', type=float, help='clip_grad_norm_ over all parameters (official: 10)')
    s = p.add_argument_group('system')
    s.add_argument('--gpu', type=int, default=0 if torch.cuda.is_available() else -1, help='GPU index, -1 = CPU')
    s.add_argument('--amp', action=argparse.BooleanOptionalAction, help='bf16 autocast (default: on for GPU, off for CPU)')
    s.add_argument('--seed', type=int, default=0, help='training run: initialisation, draws, augmentation (default: 0)')
    s.add_argument('--log_every', type=int, default=20, help='steps between progress lines')
    args = p.parse_args(argv)
    for key, value in PRESETS[args.data].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.group_sizes, args.local_radius = tuple(args.group_sizes), tuple(args.local_radius)
    args.cosine_epochs = args.epochs   # the authors' cosine spans the run (timm t_initial = epochs)
    return args


# ---------------------------------------------------------------- the model


class PartSegmenter(nn.Module):
    """The encoder with its per-scale LayerNorms, and Point-M2AE's segmentation head.

    forward(xyz (B, N, 3), categories (B,)) -> log-probabilities (B, N, num_parts).
    """
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
        features = []
        for group, encoded, norm, propagate in zip(groups, self.encoder(groups, nothing_masked), self.encoder_norms,
                                                   self.propagation):
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
    cfg = replace(encoder_config, group_sizes=args.group_sizes, local_radius=args.local_radius,
                  drop_path_rate=args.drop_path_rate)
    return PartSegmenter(cfg, num_categories, num_parts, **HEADS[args.head])


def fresh_encoder_config(args):
    """The architecture of --from_scratch: the paper's, or SMALL_CONFIG for the CPU demo."""
    return SMALL_CONFIG if args.config == 'small' else ModelConfig()


def load_pretrained_encoder(model, checkpoint, path='checkpoint'):
    """Copy a pre-trained encoder and its per-scale LayerNorms into `model` (a PartSegmenter), strictly.

    checkpoint: ours (pretrain.py's: 'model' and 'model_config') or the authors' pre-training file
    ('base_model' or a bare state_dict, keys h_encoder.*, with or without 'module.'). Every tensor of
    model.encoder and model.encoder_norms must come from the file with its shape; the decoder, the
    reconstruction heads and the authors' CLIP teacher are skipped. The head stays new, as theirs.
    Returns {skipped key: reason}; a misfit raises SystemExit naming every missing, unexpected or
    differently shaped key. (Point-M2AE loads with strict=False, which loads nothing, silently, from a
    checkpoint saved with 'module.' prefixes.)
    """
    ours = 'model_config' in checkpoint
    state = checkpoint['model'] if ours else {official_to_ours(k): v
                                              for k, v in checkpoint.get('base_model', checkpoint).items()}
    if any(k.startswith('cls_head.') for k in state):
        raise SystemExit(f'{path} is a fine-tuned classifier: it has no per-scale LayerNorms to segment with; '
                         f'start from a pre-training checkpoint (pretrain.py\'s last.pt, the authors\' pre-train.pth)')
    pretrained = nn.ModuleDict({'encoder': model.encoder, 'encoder_norms': model.encoder_norms})
    wanted = {k: v for k, v in state.items() if k.startswith(('encoder.', 'encoder_norms.'))}
    own = pretrained.state_dict()
    problems = ([f'missing key {k}' for k in sorted(own.keys() - wanted.keys())]
                + [f'unexpected key {k}' for k in sorted(wanted.keys() - own.keys())]
                + [f'shape of {k}: checkpoint {tuple(wanted[k].shape)}, model {tuple(own[k].shape)}'
                   for k in sorted(own.keys() & wanted.keys()) if wanted[k].shape != own[k].shape])
    if problems:
        raise SystemExit(f'{path} does not fit this encoder (a different architecture?):\n  ' + '\n  '.join(problems))
    pretrained.load_state_dict({k: v.to(own[k].dtype) for k, v in wanted.items()}, strict=True)
    return {k: 'their CLIP teacher' if k.startswith('clip_model.') else 'pre-training only: not part of the encoder'
            for k in state.keys() - wanted.keys()}


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


def train_one_epoch(model, optimizer, split, batches, args, device, set_lr=None):
    """One epoch: for each batch of shape indices, a training_batch and a train_step.

    set_lr(step) is called before each step (the schedule lives with the caller). Returns sums (3,) on
    the device: loss x points, correct points, points (no .item() inside the loop)."""
    model.train()
    sums = torch.zeros(3, device=device)
    for step, idx in enumerate(batches):
        if set_lr is not None:
            set_lr(step)
        xyz, parts, categories = training_batch(split, torch.as_tensor(idx), args, device)
        loss, correct = train_step(model, optimizer, xyz, parts, categories, args)
        sums += torch.stack([loss * parts.numel(), correct.float(), torch.tensor(float(parts.numel()), device=device)])
    return sums


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
    """Fixed test points xyz (S, n, 3), parts (S, n), categories (S,) -> (IoU sums (C, 2), correct points,
    points), all tensors on the model's device, ready to be summed over DDP ranks."""
    model.eval()
    device = table.device
    sums, counts = torch.zeros(table.shape[0], 2, device=device), torch.zeros(2, device=device)
    for idx in torch.arange(len(xyz)).split(batch_size):
        x, y, c = xyz[idx].to(device), parts[idx].to(device), categories[idx].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            predicted = predict_parts(model(x, c), c, table)                 # (b, n)
        sums += iou_sums(shape_ious(predicted, y, c, table), c, table.shape[0])
        counts += torch.stack([(predicted == y).sum().float(), torch.tensor(float(y.numel()), device=device)])
    return sums, counts[0], counts[1]


def evaluate(model, xyz, parts, categories, category_parts, category_names, batch_size=32, amp=False):
    """mIoU_C, mIoU_I, point accuracy and the per-category table (segmentation_metrics) on fixed test points."""
    device = next(model.parameters()).device
    table = part_table(category_parts, model.head[-1].out_channels, device)
    sums, correct, seen = evaluation_sums(model, xyz, parts, categories, table, batch_size, amp)
    return segmentation_metrics(sums, correct.item(), seen.item(), category_names)
