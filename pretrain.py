"""
pretrain.py: I2P-MAE pre-training (paper section "Image-to-Point Masked Autoencoders";
SPEC.md sections 1 and 8.1). Read `pretrain_step` first: it is the whole method.

  python pretrain.py                                  # synthetic demo on a CPU, about 10 minutes
  python pretrain.py --data shapenet --gpu 0          # the paper's run (ShapeNet-55, 300 epochs)
  torchrun --nproc_per_node=8 pretrain.py --data shapenet
  python pretrain.py --benchmark [--config full]      # per-stage timings and peak memory
Writes runs/<run_name>/last.pt (student only; atomically, every epoch and on Ctrl-C) and
runs/<run_name>/log.jsonl. `--resume runs/<run_name>/last.pt` continues exactly.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DistributedSampler

from tokenizer import build_token_hierarchy, gather_points
from project import VIEWS, project_depth_images, back_project
from teacher import build_teacher, normalize_images, teacher_features_and_saliency, tiny_teacher
from mask import guided_mask, random_mask, hierarchical_masks, visible_counts
from model import I2PMAE, ModelConfig, SMALL_CONFIG, pack_visible, true_positions
from data import load_split, scale_and_translate

# `python pretrain.py` with no flags: flags the user did not give take these values on synthetic data
SYNTHETIC_DEMO = dict(config='small', num_points=512, epochs=12, warmup_epochs=1, cosine_epochs=12,
                      batch_size=32, small_random_teacher=True, svm_every=4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group('data')
    d.add_argument('--data', default='synthetic', choices=['synthetic', 'shapenet'],
                   help='synthetic (built in, runs anywhere; demo settings) or shapenet (ShapeNet-55 train split)')
    d.add_argument('--data_root', default='./data', help='folder holding the datasets (README: data layout)')
    d.add_argument('--num_points', type=int, default=2048, help='points per cloud (official: 2048)')
    m = p.add_argument_group('model')
    m.add_argument('--config', default='full', choices=['full', 'small'],
                   help='full = the official architecture; small = SMALL_CONFIG for CPU demos')
    m.add_argument('--mask', default='guided', choices=['guided', 'random'],
                   help='guided = 2D-guided (I2P-MAE); random = the 3D-only ablation')
    m.add_argument('--mask_ratio', type=float, default=0.8, help='share of coarse tokens hidden (official: 0.8)')
    m.add_argument('--views', type=int, default=3, choices=[1, 2, 3],
                   help='depth views shown to the teacher: the first 1, 2 or 3 of (x,y,z), (z,x,y), (y,z,x) (official: 3)')
    m.add_argument('--no_2d_target', action='store_true', help='drop the 2D target: 3D-only reconstruction (Point-M2AE)')
    m.add_argument('--teacher_weights', default='auto',
                   help='auto (ImageNet if available, else random), imagenet, random, or a state_dict path')
    m.add_argument('--teacher_arch', default='vit_b_16', help='torchvision ViT constructor (official: ViT-B/16)')
    m.add_argument('--small_random_teacher', action=argparse.BooleanOptionalAction, default=False,
                   help='if the teacher ends up random, use a small random ViT instead (no less knowledge, much faster)')
    o = p.add_argument_group('optimisation')
    o.add_argument('--epochs', type=int, default=300, help='epochs to train (official: 300)')
    o.add_argument('--cosine_epochs', type=int, default=400,
                   help='length of the cosine schedule (official: 400, longer than the run, so it ends near 1.5e-4)')
    o.add_argument('--warmup_epochs', type=int, default=10, help='linear warm-up from 1e-6 (official: 10)')
    o.add_argument('--batch_size', type=int, default=64, help='total batch over all processes (official: 64)')
    o.add_argument('--lr', type=float, default=1e-3, help='peak learning rate for the total batch (official: 1e-3)')
    o.add_argument('--min_lr', type=float, default=1e-6, help='floor and warm-up start (official: 1e-6)')
    o.add_argument('--weight_decay', type=float, default=0.05, help='AdamW weight decay (official: 0.05)')
    s = p.add_argument_group('system')
    s.add_argument('--gpu', type=int, default=0 if torch.cuda.is_available() else -1, help='GPU index, -1 = CPU')
    s.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='bf16 autocast (default: on for GPU, off for CPU)')
    s.add_argument('--seed', type=int, default=0)
    s.add_argument('--deterministic', action='store_true', help='deterministic algorithms (slower)')
    s.add_argument('--run_name', default=None, help='runs/<run_name>/ (default: pretrain-<data>)')
    s.add_argument('--resume', default=None, help='checkpoint to continue from (runs/<name>/last.pt)')
    s.add_argument('--log_every', type=int, default=20, help='steps between progress lines')
    s.add_argument('--svm_every', type=int, default=0,
                   help='epochs between linear-SVM checks (0 = off); monitoring only, never picks a checkpoint')
    s.add_argument('--max_steps_per_epoch', type=int, default=0, help='cut epochs short (tests, quick looks)')
    s.add_argument('--benchmark', action='store_true', help='time the stages of one step and exit')
    s.add_argument('--benchmark_steps', type=int, default=5, help='timed steps after 2 warm-up steps')
    args = p.parse_args(argv)
    if args.data == 'synthetic':   # the demo: presets fill every flag the user did not give
        flags = [a.split('=')[0][2:] for a in (sys.argv[1:] if argv is None else argv) if a.startswith('--')]
        given = {f[3:] if f.startswith('no-') else f for f in flags}
        for key, value in SYNTHETIC_DEMO.items():
            if key not in given:
                setattr(args, key, value)
    args.run_name = args.run_name or f'pretrain-{args.data}'
    return args


# ---------------------------------------------------------------- the method, one step


def pretrain_step(model, teacher, xyz, args, clock=lambda stage: None):
    """(loss_3d, loss_2d) for a batch of clouds xyz (B, N, 3). `clock(stage)` marks stage ends (--benchmark).

    model is the I2PMAE student, or DistributedDataParallel around it; the teacher stays outside.
    """
    student = getattr(model, 'module', model)
    cfg = student.cfg
    groups = build_token_hierarchy(xyz, cfg.num_groups, cfg.group_sizes)          # 3 scales of tokens
    clock('tokenize')
    needs_teacher = args.mask == 'guided' or not args.no_2d_target
    if needs_teacher:
        S = teacher.image_size
        images, geometry = project_depth_images(xyz, S, VIEWS[:args.views])      # (V*B, 3, S, S)
        clock('project')
        features, saliency = teacher_features_and_saliency(teacher, normalize_images(images))  # one call, all views
        clock('teacher')
    if args.mask == 'guided':
        token_saliency = back_project(groups[-1].centers, geometry, saliency[:, None], S).mean(-1)  # (B, G_top)
        is_masked = guided_mask(token_saliency, args.mask_ratio)
    else:
        is_masked = random_mask(xyz.shape[0], cfg.num_groups[-1], args.mask_ratio, xyz.device)
    masks = hierarchical_masks(is_masked, groups)                                  # finest first
    counts = visible_counts(masks)   # visible tokens per scale and sample: the step's one wait for the GPU
    target_2d = None
    if not args.no_2d_target:
        h = student.head_scale
        target_2d = visible_targets(groups[h], masks[h], geometry, features, S, counts[h])   # (L_visible, K, V*C)
    clock('mask')
    return model(groups, masks, target_2d, counts)                                 # I2PMAE.pretrain_losses


def visible_targets(group, is_masked, geometry, features, img_size, counts=None):
    """Teacher features at the K members of every visible token -> (L_visible, K, V*C), (sample, token) order.

    Only visible tokens get a 2D target, so only their members are read back (packed per sample).
    counts: the visible tokens of each sample (this scale of mask.visible_counts), if the caller has them.
    """
    counts = visible_counts([is_masked])[0] if counts is None else counts
    order, is_pad = pack_visible(is_masked, max(counts))                           # (B, L) visible first
    B, L = order.shape
    members = gather_points(group.neighbors.flatten(2), order).view(B, -1, 3)      # (B, L*K, 3)
    target = back_project(members, geometry, features, img_size)                   # (B, L*K, V*C)
    rows = true_positions(~is_pad, sum(counts))                                    # the visible rows, in order
    return target.view(B * L, group.idx.shape[-1], -1)[rows]


# ---------------------------------------------------------------- pieces shared with finetune.py


def cosine_lr(progress, args):
    """Learning rate at `progress` epochs (fractional): linear warm-up from min_lr, then cosine over cosine_epochs.

    As timm's scheduler the authors used, the cosine counts from epoch 0, not from the warm-up's end.
    """
    if progress < args.warmup_epochs:
        return args.min_lr + (args.lr - args.min_lr) * progress / args.warmup_epochs
    t = min(progress / args.cosine_epochs, 1.0)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))


def param_groups(model, weight_decay):
    """AdamW groups: no decay for biases, norms and, as the authors, any name containing 'token'."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith('.bias') or 'token' in name else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def setup_device(args):
    """Device, rank and world size; initialises torch.distributed when launched by torchrun."""
    distributed = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if distributed else (0, 1)
    if args.gpu >= 0:
        if not torch.cuda.is_available():
            raise SystemExit(f'--gpu {args.gpu}: no CUDA device here; use --gpu -1 for the CPU')
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', args.gpu)) if distributed else args.gpu)
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    if distributed:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    if args.amp is None:
        args.amp = device.type == 'cuda'
    seed_everything(args.seed + rank)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return device, rank, world


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    return {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def save_checkpoint(path, **content):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    torch.save(content, path + '.tmp')
    os.replace(path + '.tmp', path)


def check_resumable(checkpoint, path, model_config, settings):
    """Refuse a checkpoint whose architecture or training set-up differs, naming every mismatch."""
    as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
    mismatches = [f'{k}: checkpoint {checkpoint["model_config"].get(k)} vs now {v}'
                  for k, v in asdict(model_config).items() if as_tuple(checkpoint['model_config'].get(k)) != as_tuple(v)]
    mismatches += [f'--{k}: checkpoint {checkpoint["args"].get(k)} vs now {v}'
                   for k, v in settings.items() if checkpoint['args'].get(k) != v]
    if mismatches:
        raise SystemExit(f'cannot resume from {path}, the configuration differs:\n  ' + '\n  '.join(mismatches))


def epoch_batches(num_items, batch_size, epoch, seed, rank=0, world=1):
    """This process's index batches for one epoch: DistributedSampler's seeded shuffle, split over
    processes, the last partial batch dropped. The same for a given epoch however often it is asked."""
    sampler = DistributedSampler(range(num_items), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return list(BatchSampler(sampler, batch_size // world, drop_last=True))


class Log:
    """Progress lines on rank 0 and the same numbers as JSON lines in runs/<name>/log.jsonl."""
    def __init__(self, folder, rank):
        self.rank, self.path = rank, os.path.join(folder, 'log.jsonl')
        if rank == 0:
            os.makedirs(folder, exist_ok=True)

    def __call__(self, line, **numbers):
        if self.rank == 0:
            print(line, flush=True)
            if numbers:
                with open(self.path, 'a') as f:
                    f.write(json.dumps(numbers) + '\n')


# ---------------------------------------------------------------- main


def build(args, device):
    """The frozen teacher (outside the student) and the student."""
    needs_teacher = args.mask == 'guided' or not args.no_2d_target
    teacher, described = None, 'none (random masking, no 2D target)'
    if needs_teacher:
        if not (args.small_random_teacher and args.teacher_weights == 'random'):
            teacher, described = build_teacher(args.teacher_weights, args.teacher_arch)
        if args.small_random_teacher and (teacher is None or 'random' in described):
            teacher = tiny_teacher(image_size=224, patch_size=16, num_layers=4, hidden_dim=64)
            described = 'small random ViT (4 layers, width 64, 16-pixel patches): no pretrained knowledge'
        teacher = teacher.to(device)
    base = SMALL_CONFIG if args.config == 'small' else ModelConfig()
    cfg = ModelConfig(**{**asdict(base), 'feat_dim_2d': 0 if args.no_2d_target else teacher.hidden_dim,
                         'num_views': args.views})
    return teacher, described, I2PMAE(cfg).to(device)


def main(args):
    device, rank, world = setup_device(args)
    folder = os.path.join('runs', args.run_name)
    log = Log(folder, rank)
    teacher, described, student = build(args, device)
    if args.benchmark:   # benchmark.py times this step; it is not part of training
        from benchmark import benchmark_pretrain_step
        return benchmark_pretrain_step(args, device, teacher, student)
    if args.batch_size % world:
        raise SystemExit(f'--batch_size {args.batch_size} must be divisible by the {world} processes')
    split = load_split(args.data, 'pretrain' if args.data == 'synthetic' else 'train',
                       data_root=args.data_root, num_points=args.num_points)
    points = split.points
    optimizer = torch.optim.AdamW(param_groups(student, args.weight_decay), lr=args.lr)
    start_epoch, start_step = 0, 0
    if args.resume:
        checkpoint = torch.load(args.resume, map_location='cpu', weights_only=False)
        check_resumable(checkpoint, args.resume, student.cfg,
                        {k: getattr(args, k) for k in ('data', 'num_points', 'batch_size', 'mask', 'no_2d_target')})
        student.load_state_dict(checkpoint['model'], strict=True)
        optimizer.load_state_dict(checkpoint['optimizer'])
        start_epoch, start_step = checkpoint['epoch'], checkpoint['step_in_epoch']
        set_rng_state(checkpoint['rng'])
    # the scale-0 LayerNorm feeds no loss, so DDP must expect parameters without gradients
    model = DistributedDataParallel(student, find_unused_parameters=True) if world > 1 else student
    log(f'I2P-MAE pre-training on {args.data} ({len(points)} clouds of {args.num_points} points), device {device}, '
        f'{world} process(es), total batch {args.batch_size} ({args.batch_size // world} per process), '
        f'peak lr {args.lr}, amp {args.amp}\n  teacher: {described}\n  model: {args.config} {asdict(student.cfg)}\n'
        f'  mask {args.mask} {args.mask_ratio}, 2D target {not args.no_2d_target}, epochs {args.epochs} '
        f'(cosine over {args.cosine_epochs}, warm-up {args.warmup_epochs})'
        + (f', resumed at epoch {start_epoch} step {start_step}' if args.resume else ''))

    def save(epoch, step_in_epoch):
        if rank == 0:
            save_checkpoint(os.path.join(folder, 'last.pt'), model=student.state_dict(), optimizer=optimizer.state_dict(),
                            epoch=epoch, step_in_epoch=step_in_epoch, rng=rng_state(), args=vars(args),
                            model_config=asdict(student.cfg), teacher=described)
    steps_per_epoch = len(epoch_batches(len(points), args.batch_size, 0, args.seed, rank, world))
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise SystemExit(f'--batch_size {args.batch_size} is larger than the {len(points)} training clouds')
    resume_at = (start_epoch, start_step)   # where a Ctrl-C checkpoint must continue
    try:
        for epoch in range(start_epoch, args.epochs):
            model.train()
            sums, tick, epoch_start = torch.zeros(2, device=device), time.time(), time.time()
            order = epoch_batches(len(points), args.batch_size, epoch, args.seed, rank, world)
            for step in range(start_step if epoch == start_epoch else 0, steps_per_epoch):
                lr = cosine_lr(epoch + step / steps_per_epoch, args)
                for group in optimizer.param_groups:
                    group['lr'] = lr
                xyz = scale_and_translate(points[order[step]].to(device, non_blocking=True))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                    loss_3d, loss_2d = pretrain_step(model, teacher, xyz, args)
                loss = loss_3d + loss_2d
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sums += torch.stack([loss_3d.detach(), loss_2d.detach()]).float()
                resume_at = (epoch, step + 1)
                if (step + 1) % args.log_every == 0 or step + 1 == steps_per_epoch:
                    l3, l2 = loss_3d.item(), loss_2d.item()   # .item() syncs with the GPU: logging steps only
                    if not math.isfinite(l3 + l2):
                        raise FloatingPointError(f'non-finite loss at epoch {epoch} step {step} (loss_3d {l3}, '
                                                 f'loss_2d {l2}); stopping, {folder}/last.pt keeps the last good epoch')
                    rate = args.batch_size * (step % args.log_every + 1) / (time.time() - tick)
                    left = (args.epochs - epoch) * steps_per_epoch - step - 1
                    log(f'epoch {epoch} step {step + 1}/{steps_per_epoch} loss_3d {l3:.4f} loss_2d {l2:.4f} '
                        f'lr {lr:.2e} {rate:.1f} samples/s ETA {left * args.batch_size / rate / 60:.1f} min',
                        epoch=epoch, step=step + 1, loss_3d=l3, loss_2d=l2, lr=lr, samples_per_s=rate)
                    tick = time.time()
            done = steps_per_epoch - (start_step if epoch == start_epoch else 0)
            mean_3d, mean_2d = (sums / max(done, 1)).tolist()
            if not math.isfinite(mean_3d + mean_2d):
                raise FloatingPointError(f'non-finite loss in epoch {epoch}; {folder}/last.pt keeps the last good epoch')
            save(epoch + 1, 0)
            resume_at = (epoch + 1, 0)
            summary = dict(epoch=epoch, mean_loss_3d=mean_3d, mean_loss_2d=mean_2d, minutes=(time.time() - epoch_start) / 60)
            if args.svm_every and (epoch + 1) % args.svm_every == 0 and rank == 0:
                from svm_eval import svm_check   # monitoring only: never used to choose a checkpoint
                summary['svm_accuracy'] = svm_check(student, args, device)
            log(f'== epoch {epoch} done: mean loss_3d {mean_3d:.4f} loss_2d {mean_2d:.4f}'
                + (f' | linear SVM accuracy {summary["svm_accuracy"]:.2f}% (monitoring only)' if 'svm_accuracy' in summary else '')
                + f' | {summary["minutes"]:.1f} min | saved {folder}/last.pt', **summary)
    except KeyboardInterrupt:
        save(*resume_at)
        log(f'interrupted: saved {folder}/last.pt to continue at epoch {resume_at[0]} step {resume_at[1]}; '
            f'continue with --resume {folder}/last.pt')
        raise SystemExit(130)
    if world > 1:
        check_ranks_agree(student, log)
        dist.destroy_process_group()
    return student


def check_ranks_agree(student, log):
    """After DDP training every process must hold the same weights; say so (or fail)."""
    checksum = torch.cat([p.detach().double().sum().view(1) for p in student.parameters()]).cpu()
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError('DDP ranks disagree on the weights')
    log(f'weights identical on all {len(gathered)} ranks')


if __name__ == '__main__':
    main(parse_args())
