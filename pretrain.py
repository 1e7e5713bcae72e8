"""
pretrain.py: I2P-MAE pre-training (paper section "Image-to-Point Masked Autoencoders").
Read `pretrain_step` first: it is the whole method. `train_one_epoch` runs it over the data.

  python pretrain.py                                  # synthetic demo on a CPU (trains the demo's 2D teacher first
                                                      # if runs/teacher-synthetic/teacher.pt is absent)
  python pretrain.py --data shapenet --gpu 0          # the paper's run (ShapeNet-55, 300 epochs)
  torchrun --nproc_per_node=8 pretrain.py --data shapenet
  python pretrain.py --benchmark [--config full]      # per-stage timings and peak memory
--data picks a preset (PRESETS): flags the user does not give take its values; all values are
printed at start. Writes runs/<run_name>/last.pt (the student only; atomically, every epoch and
on Ctrl-C), log.jsonl (with a header record per session), args.json and curves.png (--save_every,
--tensorboard: more). A folder holding another run is refused (--overwrite starts over);
`--resume runs/<run_name>/last.pt` continues exactly (training.py says how).
"""
import argparse
import os
import time
from dataclasses import asdict

import torch
from torch.nn.parallel import DistributedDataParallel

from tokenizer import build_token_hierarchy, gather_points
from project import VIEWS, project_depth_images, back_project
from teacher import DEMO_TEACHER_PATH, build_teacher, demo_teacher, normalize_images, teacher_features_and_saliency
from mask import guided_mask, random_mask, hierarchical_masks, visible_counts
from model import I2PMAE, ModelConfig, SMALL_CONFIG, compile_student, pack_visible, read_checkpoint, true_positions
from data import load_split, random_point_subset, scale_and_translate
from training import (ArgumentParser, Run, StopOnSignal, add_run_flags, check_ranks_agree, cosine_lr, end_process,
                      epoch_batches, file_sha256, fill_preset, non_negative_float, non_negative_int, param_groups,
                      positive_float, positive_int, refuse_finished, run_script, set_lr, setup_process,
                      share_rank0_buffers)

# The official settings (cfgs/pre-training/i2p-mae.yaml of the authors); flags the user gives override them.
# Real data needs a real teacher: `--teacher_weights random` must be asked for (auto is refused there).
SHAPENET = dict(config='full', num_points=2048, epochs=300, cosine_epochs=400, warmup_epochs=10, batch_size=64,
                teacher_weights='imagenet', svm_every=0)
# `python pretrain.py`: the synthetic demo, a small model for a CPU, and the demo's own 2D teacher (a small ViT
# trained with labels on depth images of other synthetic shapes: teacher.py --train; trained first if absent)
PRESETS = {'shapenet': SHAPENET,
           'synthetic': dict(SHAPENET, config='small', num_points=512, epochs=6, cosine_epochs=6, warmup_epochs=1,
                             batch_size=32, teacher_weights='demo', svm_every=3)}
# what to run next on the pre-trained encoder (the end of a run says so)
SVM_DATA_FOR, FINETUNE_DATA_FOR = {'shapenet': 'modelnet40', 'synthetic': 'synthetic'}, \
    {'shapenet': 'scan_hardest', 'synthetic': 'synthetic'}
# flags that may change on --resume: they do not change what the run computes
MAY_DIFFER = ('epochs', 'resume', 'reseed', 'overwrite', 'run_name', 'gpu', 'data_root', 'log_every', 'svm_every',
              'deterministic', 'benchmark', 'benchmark_steps', 'teacher_weights', 'teacher_arch',
              'save_every', 'tensorboard', 'compile')


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group('data (flags without a default take the --data preset)')
    d.add_argument('--data', default='synthetic', choices=list(PRESETS),
                   help='synthetic (built in, runs anywhere; demo settings) or shapenet (ShapeNet-55 train split)')
    d.add_argument('--data_root', default='./data', help='folder holding the datasets (README: data layout)')
    d.add_argument('--num_points', type=positive_int, help='points per cloud in a step (official: 2048; synthetic 512)')
    d.add_argument('--load_points', type=positive_int, help='points read per cloud (default: --num_points); with more, every '
                                                   'step draws a new random --num_points of them, as the authors\' '
                                                   'loader does of ShapeNet\'s 8192')
    m = p.add_argument_group('model')
    m.add_argument('--config', choices=['full', 'small'],
                   help='full = the official architecture; small = SMALL_CONFIG for CPU demos (synthetic)')
    m.add_argument('--mask', default='guided', choices=['guided', 'random'],
                   help='guided = 2D-guided (I2P-MAE); random = the 3D-only ablation')
    m.add_argument('--mask_ratio', type=float, default=0.8, help='share of coarse tokens hidden, in (0, 1) (official: 0.8)')
    m.add_argument('--views', type=int, default=3, choices=[1, 2, 3],
                   help='depth views shown to the teacher: the first 1, 2 or 3 of (x,y,z), (z,x,y), (y,z,x) (official: 3)')
    m.add_argument('--no_2d_target', action='store_true', help='drop the 2D target: 3D-only reconstruction (Point-M2AE)')
    m.add_argument('--teacher_weights', help='imagenet, random (ViT-B/16), a weights file, auto (ImageNet if it can be '
                                             'had: from the torch hub cache, or downloaded (330 MB) on a connected '
                                             'machine; else random; synthetic only), demo (the synthetic demo\'s '
                                             f'trained teacher, {DEMO_TEACHER_PATH}, trained first if absent) or '
                                             'demo-random (its architecture, untrained) (preset: imagenet; synthetic demo)')
    m.add_argument('--teacher_arch', default='vit_b_16', help='torchvision ViT constructor (official: ViT-B/16)')
    o = p.add_argument_group('optimisation')
    o.add_argument('--epochs', type=positive_int, help='epochs to train (official: 300; synthetic 6)')
    o.add_argument('--cosine_epochs', type=positive_int,
                   help='length of the cosine schedule (official: 400, longer than the run, so it ends near 1.5e-4)')
    o.add_argument('--warmup_epochs', type=non_negative_int, help='linear warm-up from 1e-6 (official: 10; synthetic 1)')
    o.add_argument('--batch_size', type=positive_int, help='total batch over all processes (official: 64; synthetic 32)')
    o.add_argument('--lr', type=positive_float, default=1e-3, help='peak learning rate for the total batch (official: 1e-3)')
    o.add_argument('--min_lr', type=non_negative_float, default=1e-6, help='floor and warm-up start (official: 1e-6)')
    o.add_argument('--weight_decay', type=non_negative_float, default=0.05, help='AdamW weight decay (official: 0.05)')
    s = add_run_flags(p, 'pretrain')
    s.add_argument('--svm_every', type=non_negative_int, help='epochs between linear-SVM checks (0 = off; synthetic 3); '
                                                 'monitoring only, never picks a checkpoint')
    s.add_argument('--max_steps_per_epoch', type=non_negative_int, default=0, help='cut epochs short (tests, quick looks)')
    s.add_argument('--benchmark', action='store_true', help='time the stages of one step and exit')
    s.add_argument('--benchmark_steps', type=positive_int, default=5, help='timed steps after 2 warm-up steps')
    s.add_argument('--compile', action='store_true', help='torch.compile the student\'s fixed-shape parts (model.'
                                                          'compile_student): for GPUs; on a CPU about 7%% faster after a ~90 s compile')
    args = p.parse_args(argv)
    given_teacher = args.teacher_weights
    fill_preset(args, PRESETS[args.data])
    if args.data != 'synthetic' and given_teacher == 'auto':
        p.error('--teacher_weights auto turns into a random teacher when the ImageNet weights cannot be had; on real '
                'data name the teacher: imagenet, a state_dict path, or random (explicitly)')
    if not 0 < args.mask_ratio < 1:
        p.error(f'--mask_ratio {args.mask_ratio}: must be in (0, 1). At 0 no token is hidden, so the 3D loss (a '
                f'mean over the hidden tokens) is over nothing: NaN; at 1 the encoder sees nothing')
    if args.min_lr > args.lr:
        p.error(f'--min_lr {args.min_lr} is above --lr {args.lr}: the schedule would rise instead of decay')
    if args.load_points is None:
        args.load_points = args.num_points
    if args.load_points < args.num_points:
        p.error(f'--load_points {args.load_points} is fewer than --num_points {args.num_points}')
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


def visible_targets(group, is_masked, geometry, features, img_size, counts):
    """Teacher features at the K members of every visible token -> (L_visible, K, V*C), (sample, token) order.

    Only visible tokens get a 2D target, so only their members are read back (packed per sample).
    counts: the visible tokens of each sample (this scale of mask.visible_counts).
    """
    order, is_pad = pack_visible(is_masked, max(counts))                           # (B, L) visible first
    B, L = order.shape
    members = gather_points(group.neighbors.flatten(2), order).view(B, -1, 3)      # (B, L*K, 3)
    target = back_project(members, geometry, features, img_size)                   # (B, L*K, V*C)
    rows = true_positions(~is_pad, sum(counts))                                    # the visible rows, in order
    return target.view(B * L, group.idx.shape[-1], -1)[rows]


# ---------------------------------------------------------------- one epoch


def train_one_epoch(model, teacher, optimizer, points, epoch, first_step, steps, sums, args, run, stop):
    """Pre-train on this process's batches of one epoch, from `first_step`; returns the step it
    stopped after (`steps` unless Ctrl-C asked to stop). sums (3,): this process's running loss_3d,
    loss_2d and step count, updated in place (checkpoints save them with the position)."""
    device = sums.device
    order = epoch_batches(len(points), args.batch_size, epoch, args.seed, run.process.rank, run.process.world)
    tick, ticked = time.time(), 0
    for step in range(first_step, steps):
        lr = cosine_lr(epoch + step / steps, args)
        set_lr(optimizer, lr)
        xyz = points[order[step]].to(device, non_blocking=True)
        if xyz.shape[1] > args.num_points:   # --load_points: a new random subset every step
            xyz = random_point_subset(xyz, args.num_points)
        xyz = scale_and_translate(xyz)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss_3d, loss_2d = pretrain_step(model, teacher, xyz, args)
        optimizer.zero_grad(set_to_none=True)
        (loss_3d + loss_2d).backward()
        optimizer.step()
        sums += torch.stack([loss_3d.detach().double(), loss_2d.detach().double(), sums.new_ones(())])
        ticked += 1
        run.session_steps += 1
        if (step + 1) % args.log_every == 0 or step + 1 == steps:   # every process logs at the same steps
            losses = run.step_numbers(dict(loss_3d=loss_3d, loss_2d=loss_2d), stop, f'epoch {epoch} step {step + 1}')
            rate = args.batch_size * ticked / (time.time() - tick)
            left = (args.epochs - epoch) * steps - step - 1
            run.log(f'epoch {epoch} step {step + 1}/{steps} loss_3d {losses["loss_3d"]:.4f} loss_2d {losses["loss_2d"]:.4f} '
                    f'lr {lr:.2e} {rate:.1f} samples/s ETA {run.eta_minutes(left):.1f} min',
                    epoch=epoch, step=step + 1, global_step=epoch * steps + step + 1, **losses, lr=lr, samples_per_s=rate)
            tick, ticked = time.time(), 0
        if stop.now(run.process):
            return step + 1
    return steps


# ---------------------------------------------------------------- main


def build(args, process):
    """The frozen teacher (outside the student), what it is (a description, and an identity a resume must
    match: the SHA-256 of a weights file, else the description), and the student."""
    teacher, described, weights_file = None, 'none (random masking, no 2D target)', None
    if args.mask == 'guided' or not args.no_2d_target:
        weights_file = DEMO_TEACHER_PATH if args.teacher_weights == 'demo' else args.teacher_weights
        if args.teacher_weights == 'demo' and not os.path.isfile(weights_file):
            if process.world > 1:
                raise SystemExit(f'--teacher_weights demo: no {weights_file} yet; train it once, before starting '
                                 f'several processes: python teacher.py --train')
            demo_teacher(process.device)   # trains it, saying so
        try:
            teacher, described = build_teacher(weights_file, args.teacher_arch)
        except Exception as error:   # no weights, a file torch.load cannot read, a state_dict of another ViT ...
            raise SystemExit(f'--teacher_weights {args.teacher_weights}: {type(error).__name__}: '
                             f'{str(error).splitlines()[0] if str(error) else "unreadable"}') from None
        weights_file = weights_file if os.path.isfile(weights_file) else None
        teacher = teacher.to(process.device)
    identity = f'sha256 {file_sha256(weights_file)}' if weights_file else described
    base = SMALL_CONFIG if args.config == 'small' else ModelConfig()
    cfg = ModelConfig(**{**asdict(base), 'feat_dim_2d': 0 if args.no_2d_target else teacher.hidden_dim,
                         'num_views': args.views})
    student = I2PMAE(cfg).to(process.device)
    if args.compile:   # in place: the state_dict keeps its keys, checkpoints do not change
        compile_student(student)
    return teacher, described, identity, student


def main(args):
    process = setup_process(args)
    device, world = process.device, process.world
    cfg = SMALL_CONFIG if args.config == 'small' else ModelConfig()   # checks first: the teacher may train for minutes
    fewest = max(cfg.num_groups[0], cfg.group_sizes[0])
    if args.num_points < fewest:
        raise SystemExit(f'--num_points {args.num_points}: the --config {args.config} model groups {fewest} points '
                         f'per cloud at its finest scale (num_groups {cfg.num_groups[0]}, group_sizes '
                         f'{cfg.group_sizes[0]}): use at least {fewest}')
    hidden, tokens = int(args.mask_ratio * cfg.num_groups[-1]), cfg.num_groups[-1]
    if hidden == 0:
        raise SystemExit(f'--mask_ratio {args.mask_ratio} hides int({args.mask_ratio} x {tokens}) = 0 of the {tokens} '
                         f'coarsest tokens: nothing to reconstruct (use at least {1 / tokens:.3f})')
    if args.batch_size % world:
        raise SystemExit(f'--batch_size {args.batch_size} must be divisible by the {world} processes')
    if args.benchmark:   # benchmark.py times this step; it is not part of training
        from benchmark import benchmark_pretrain_step
        teacher, _, _, student = build(args, process)
        return benchmark_pretrain_step(args, device, teacher, student)
    run = Run(os.path.join('runs', args.run_name), process)
    run.claim(args.resume, args.overwrite)
    if args.resume:
        read_checkpoint(args.resume, '--resume')   # a file that is no checkpoint is named before the teacher is built
    teacher, described, teacher_identity, student = build(args, process)
    checkpoint = run.resume(args.resume, args, MAY_DIFFER, model_config=asdict(student.cfg),
                            teacher_identity=teacher_identity)
    refuse_finished(checkpoint, args)
    points = load_split(args.data, 'pretrain' if args.data == 'synthetic' else 'train',
                        data_root=args.data_root, num_points=args.load_points).points
    optimizer = torch.optim.AdamW(param_groups(student, args.weight_decay), lr=args.lr)
    sums = torch.zeros(3, dtype=torch.float64, device=device)   # this process's loss_3d, loss_2d, steps
    first_epoch, first_step = run.restore(checkpoint, student, optimizer, args, sums)
    # the scale-0 LayerNorm feeds no loss, so DDP must expect parameters without gradients
    model = DistributedDataParallel(student, device_ids=[device.index] if device.type == 'cuda' else None,
                                    find_unused_parameters=True) if world > 1 else student
    steps = len(epoch_batches(len(points), args.batch_size, 0, args.seed, process.rank, world))
    steps = min(steps, args.max_steps_per_epoch or steps)
    if steps == 0:
        raise SystemExit(f'--batch_size {args.batch_size} is larger than the {len(points)} training clouds')
    run.start(args, model_config=asdict(student.cfg), teacher=described, teacher_identity=teacher_identity,
              resumed_from=args.resume and f'{args.resume} (epoch {first_epoch} step {first_step})')
    run.log(f'I2P-MAE pre-training on {args.data} ({len(points)} clouds of {args.load_points} points), device {device}, '
            f'{world} process(es), total batch {args.batch_size} ({args.batch_size // world} per process), '
            f'{steps} steps per epoch\n  teacher: {described}\n  model: {asdict(student.cfg)}\n'
            + '\n'.join(f'  --{k} {v}' for k, v in sorted(vars(args).items()))
            + (f'\n  resumed at epoch {first_epoch} step {first_step}' if checkpoint else ''))
    extra = dict(model_config=asdict(student.cfg), teacher=described, teacher_identity=teacher_identity)
    with StopOnSignal(process) as stop:
        for epoch in range(first_epoch, args.epochs):
            model.train()
            started = time.time()
            stopped_at = train_one_epoch(model, teacher, optimizer, points, epoch,
                                         first_step if epoch == first_epoch else 0, steps, sums, args, run, stop)
            if stopped_at < steps:   # Ctrl-C: the step finished; save where to continue
                run.save('last.pt', student, epoch, stopped_at, args, optimizer, sums, **extra)
                run.log(f'interrupted: {run.last_saved}; continue with --resume {run.path("last.pt")}')
                raise SystemExit(130)
            share_rank0_buffers(student, process)   # every process scores with what last.pt saves
            sum_3d, sum_2d, done = run.totals(sums, f'epoch {epoch}')
            summary = dict(epoch=epoch, mean_loss_3d=sum_3d / done, mean_loss_2d=sum_2d / done,
                           minutes=(time.time() - started) / 60)
            if args.svm_every and (epoch + 1) % args.svm_every == 0:   # every process takes part
                from svm_eval import svm_check   # monitoring only: never used to choose a checkpoint
                summary['svm_accuracy'] = svm_check(student, args, process)
            svm = f' | linear SVM accuracy {summary["svm_accuracy"]:.2f}% (monitoring only)' if 'svm_accuracy' in summary else ''
            run.log(f'== epoch {epoch} done: mean loss_3d {summary["mean_loss_3d"]:.4f} loss_2d {summary["mean_loss_2d"]:.4f}'
                    f'{svm} | {summary["minutes"]:.1f} min | saving {run.path("last.pt")}', **summary)
            sums.zero_()
            run.save('last.pt', student, epoch + 1, 0, args, optimizer, sums, **extra)
            run.end_of_epoch(epoch, args.save_every, stop)
    if world > 1:
        check_ranks_agree(student, process, run.log)
    run.log(f'pre-training done in {(time.time() - run.session_start) / 60:.1f} min (this session). Next: the '
            f'frozen encoder\'s linear SVM, python svm_eval.py --data {SVM_DATA_FOR[args.data]} --ckpt '
            f'{run.path("last.pt")}, or fine-tuning, python finetune.py --data {FINETUNE_DATA_FOR[args.data]} '
            f'--ckpt {run.path("last.pt")}')
    end_process(process)
    return student


if __name__ == '__main__':
    run_script(main, parse_args)
