"""
pretrain.py: I2P-MAE pre-training (paper section "Image-to-Point Masked Autoencoders").
Read `pretrain_step` first: it is the whole method. `main` hands it to training.train, the epoch loop.

  python pretrain.py                                  # the synthetic demo on a CPU (trains the demo's 2D
                                                      # teacher first if runs/teacher-synthetic/teacher.pt is absent)
  python pretrain.py --data shapenet --gpu 0          # the paper's run (ShapeNet-55, 300 epochs)
  torchrun --nproc_per_node=8 pretrain.py --data shapenet
  python pretrain.py --resume runs/pretrain-synthetic/last.pt    # continue a run, with its own flags
--data picks a preset (PRESETS): flags the user does not give take its values. Writes
runs/<run_name>/: last.pt (the student only; atomically, every epoch and on Ctrl-C), log.jsonl,
args.json (every flag) and curves.png. docs/training.md says how runs, resume and torchrun work.
"""
import argparse
import os
import time
import warnings
from dataclasses import asdict, replace

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # before torch loads OpenMP: waiting threads sleep (docs/speed.md)
import torch

from tokenizer import build_token_hierarchy, gather_points
from project import VIEWS, project_depth_images, back_project
from teacher import build_teacher, freeze, normalize_images, teacher_features_and_saliency, teacher_fingerprint
from mask import guided_mask, random_mask, hierarchical_masks, visible_counts
from model import I2PMAE, ModelConfig, SMALL_CONFIG, TokenEmbed, TokenPropagation, pack_visible, true_positions
from data import load_split, random_point_subset, scale_and_translate
from flags import (ArgumentParser, add_run_flags, non_negative_float, non_negative_int, parse_run_flags, positive_float,
                   positive_int, run_script)
from processes import end_process, setup_process
from training import Run, param_groups, run_folder, train
from train_teacher import DEMO_TEACHER_PATH, train_and_save, untrained_demo_teacher
from svm_eval import svm_check

# The official settings (cfgs/pre-training/i2p-mae.yaml of the authors); flags the user gives override them.
SHAPENET = dict(config='full', num_points=2048, epochs=300, cosine_epochs=400, warmup_epochs=10, batch_size=64,
                teacher_weights='imagenet', svm_every=0)
# `python pretrain.py`: the synthetic demo, a small model for a CPU, and the demo's own 2D teacher (train_teacher.py)
PRESETS = {'shapenet': SHAPENET,
           'synthetic': dict(SHAPENET, config='small', num_points=512, epochs=9, cosine_epochs=None, warmup_epochs=None,
                             batch_size=32, teacher_weights='demo', svm_every=3)}
# flags a resumed run may change: they do not change what it computes (the teacher is checked by its weights)
MAY_DIFFER = ('svm_every', 'teacher_weights', 'teacher_arch', 'compile')


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group('data (flags without a default take the --data preset)')
    d.add_argument('--data', default='synthetic', choices=list(PRESETS),
                   help='synthetic (built in, runs anywhere; demo settings) or shapenet (ShapeNet-55 train split)')
    d.add_argument('--data_root', default='./data', help='folder holding the datasets (docs/data.md)')
    d.add_argument('--num_points', type=positive_int, help='points per cloud in a step (official: 2048; synthetic 512)')
    d.add_argument('--load_points', type=positive_int, help='points read per cloud (default: --num_points); with more, '
                                                            'every step draws a new random --num_points of them, as '
                                                            'the authors\' loader does of ShapeNet\'s 8192')
    m = p.add_argument_group('model')
    m.add_argument('--config', choices=['full', 'small'],
                   help='full = the official architecture; small = SMALL_CONFIG for CPU demos (synthetic)')
    m.add_argument('--mask', default='guided', choices=['guided', 'random'],
                   help='guided = 2D-guided (I2P-MAE); random = the 3D-only ablation')
    m.add_argument('--mask_ratio', type=float, default=0.8, help='share of coarse tokens hidden, in (0, 1) (official: 0.8)')
    m.add_argument('--views', type=int, default=3, choices=[1, 2, 3],
                   help='depth views shown to the teacher: the first 1, 2 or 3 of (x,y,z), (z,x,y), (y,z,x) (official: 3)')
    m.add_argument('--no_2d_target', action='store_true', help='drop the 2D target: 3D-only reconstruction (Point-M2AE)')
    m.add_argument('--teacher_weights', help='imagenet, random (ViT-B/16), a weights file, auto (imagenet if it can be '
                                             'had, else random; synthetic only), demo (the synthetic demo\'s trained '
                                             f'teacher, {DEMO_TEACHER_PATH}, trained first if absent) or demo-random '
                                             '(its architecture, untrained) (preset: imagenet; synthetic: demo)')
    m.add_argument('--teacher_arch', default='vit_b_16', help='torchvision ViT constructor (official: ViT-B/16)')
    o = p.add_argument_group('optimisation')
    o.add_argument('--epochs', type=positive_int, help='epochs to train (official: 300; synthetic 9, chosen on a validation '
                                                       'split: docs/results.md)')
    o.add_argument('--cosine_epochs', type=positive_int,
                   help='length of the cosine schedule (official: 400, longer than the run, so it ends near 1.5e-4; '
                        'synthetic: --epochs)')
    o.add_argument('--warmup_epochs', type=non_negative_int, help='linear warm-up from --min_lr (official: 10; synthetic '
                                                                  '1, none in a run of one epoch)')
    o.add_argument('--batch_size', type=positive_int, help='total batch over all processes (official: 64; synthetic 32)')
    o.add_argument('--lr', type=positive_float, default=1e-3, help='peak learning rate for the total batch (official: 1e-3)')
    o.add_argument('--min_lr', type=non_negative_float, default=1e-6, help='floor and warm-up start (official: 1e-6)')
    o.add_argument('--weight_decay', type=non_negative_float, default=0.05, help='AdamW weight decay (official: 0.05)')
    s = add_run_flags(p, 'pretrain')
    s.add_argument('--svm_every', type=non_negative_int, help='epochs between linear-SVM checks (0 = off; synthetic 3); '
                                                              'monitoring only, never picks a checkpoint')
    s.add_argument('--compile', action='store_true', help='torch.compile the student\'s fixed-shape parts (meant for '
                                                          'GPUs; docs/speed.md)')
    args = parse_run_flags(p, argv, PRESETS, MAY_DIFFER)
    if args.data != 'synthetic' and args.teacher_weights == 'auto':
        p.error('--teacher_weights auto turns into a random teacher when the ImageNet weights cannot be had; on real '
                'data name the teacher: imagenet, a state_dict path, or random (explicitly)')
    tokens = (SMALL_CONFIG if args.config == 'small' else ModelConfig()).num_groups[-1]
    if not 0 < args.mask_ratio < 1 or int(args.mask_ratio * tokens) == 0:
        p.error(f'--mask_ratio {args.mask_ratio}: must hide at least one of the {tokens} coarsest tokens and keep '
                f'one (int(ratio x {tokens}) >= 1, ratio < 1): the 3D loss is a mean over the hidden ones')
    if args.min_lr > args.lr:
        p.error(f'--min_lr {args.min_lr} is above --lr {args.lr}: the schedule would rise instead of decay')
    fewest = (SMALL_CONFIG if args.config == 'small' else ModelConfig()).min_points
    if args.num_points < fewest:
        p.error(f'--num_points {args.num_points}: the --config {args.config} model groups {fewest} points per cloud at '
                f'its finest scale: use at least {fewest}')
    args.load_points = args.load_points or args.num_points
    if args.load_points < args.num_points:
        p.error(f'--load_points {args.load_points} is fewer than --num_points {args.num_points}')
    args.run_name = args.run_name or f'pretrain-{args.data}'
    return args


# ---------------------------------------------------------------- the method, one step


def pretrain_step(model, teacher, xyz, args, clock=lambda stage: None):
    """(loss_3d, loss_2d) for a batch of clouds xyz (B, N, 3). `clock(stage)` marks stage ends (benchmark.py).

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


# ---------------------------------------------------------------- the teacher and the student


def teacher_of(args, process):
    """The frozen teacher on the process's device and a line saying what it is, or (None, why none)."""
    if args.mask == 'random' and args.no_2d_target:
        return None, 'none (random masking, no 2D target)'
    if args.teacher_weights == 'demo-random':
        vit, arch = untrained_demo_teacher()
        return freeze(vit).to(process.device), (f'the demo teacher\'s small ViT ({arch["num_layers"]} layers, width '
                                                f'{arch["hidden_dim"]}), untrained: no knowledge')
    weights = DEMO_TEACHER_PATH if args.teacher_weights == 'demo' else args.teacher_weights
    if args.teacher_weights == 'demo' and not os.path.isfile(weights):
        if process.world > 1:
            raise SystemExit(f'--teacher_weights demo: no {weights} yet; train it once, before starting several '
                             f'processes: python train_teacher.py')
        print(f'no trained teacher at {weights}: training it first (python train_teacher.py does only this)')
        train_and_save(weights)
    try:
        vit, described = build_teacher(weights, args.teacher_arch)
    except Exception as error:   # no weights, a file torch.load cannot read, a state_dict of another ViT ...
        raise SystemExit(f'--teacher_weights {args.teacher_weights}: {type(error).__name__}: '
                         f'{str(error).splitlines()[0] if str(error) else "unreadable"}') from None
    return vit.to(process.device), described


def student_of(args, teacher):
    """The I2PMAE student of these flags: --config's architecture with a 2D head as wide as the teacher's features."""
    base = SMALL_CONFIG if args.config == 'small' else ModelConfig()
    return I2PMAE(replace(base, feat_dim_2d=0 if args.no_2d_target else teacher.hidden_dim, num_views=args.views))


def compile_student(student, backend='inductor'):
    """--compile: torch.compile the student's fixed-shape parts (the token embeddings, most of a step's
    arithmetic, and the decoder's upsampling), in place: the state_dict keeps its keys. The encoder's
    blocks see another number of visible tokens at every step, so they stay eager. A part that cannot
    be compiled (no C++ compiler, no Triton for this GPU, ...) says why in a warning and runs eagerly."""
    for module in student.modules():
        if isinstance(module, (TokenEmbed, TokenPropagation)):
            module.compile(dynamic=False, backend=backend)
            module._compiled_call_impl = eager_if_compiling_fails(module, module._compiled_call_impl)
    return student


def eager_if_compiling_fails(module, compiled):
    """module's compiled call; if compiling raises (before any of it runs), a warning, then module's own call."""
    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as error:
            why = getattr(error, 'inner_exception', None) or error   # the backend's own error
            warnings.warn(f'--compile: torch.compile could not compile {type(module).__name__} ({type(why).__name__}: '
                          f'{(str(why).strip() or "no message").splitlines()[0]}); it runs eagerly')
            module._compiled_call_impl = None
            return module._call_impl(*args, **kwargs)
    return call


def main(args):
    process = setup_process(args)
    device, world = process.device, process.world
    if args.batch_size % world:
        raise SystemExit(f'--batch_size {args.batch_size} must be divisible by the {world} processes')
    run = Run(run_folder(args), process, 'pretrain.py')
    checkpoint = run.resume(args)   # a new run claims its folder (another run's files are refused)
    # the data before the teacher: a missing dataset is named before minutes of teacher training or a download
    points = load_split(args.data, 'pretrain' if args.data == 'synthetic' else 'train', data_root=args.data_root,
                        num_points=args.load_points).points
    started, trains_teacher = time.time(), args.teacher_weights == 'demo' and not os.path.isfile(DEMO_TEACHER_PATH)
    teacher, described = teacher_of(args, process)
    teacher_minutes = (time.time() - started) / 60
    identity = teacher_fingerprint(teacher) if teacher is not None else None
    if checkpoint is not None and checkpoint.get('teacher_identity') != identity:
        raise SystemExit(f'--resume {args.resume}: the run was pre-trained with the teacher "{checkpoint.get("teacher")}"'
                         f', and --teacher_weights {args.teacher_weights} now gives "{described}", whose weights differ '
                         f'(was its file retrained or replaced?): the 2D targets would change in mid-run. Resume with '
                         f'the teacher the run started with')
    student = student_of(args, teacher).to(device)
    cfg = student.cfg
    if args.compile:
        compile_student(student)
    optimizer = torch.optim.AdamW(param_groups(student, args.weight_decay), lr=args.lr)
    about = dict(model_config=asdict(cfg), teacher=described, teacher_identity=identity)
    run.start(args, **about)
    run.log(f'I2P-MAE pre-training on {args.data}: {len(points)} clouds of {args.load_points} points, batch '
            f'{args.batch_size} ({args.batch_size // world} per process), {args.epochs} epochs, {device}\n'
            f'  teacher: {described}\n  every flag and the model: {run.path("args.json")}')

    def step(model, idx):
        xyz = points[idx].to(device, non_blocking=True)
        if xyz.shape[1] > args.num_points:   # --load_points: a new random subset every step
            xyz = random_point_subset(xyz, args.num_points)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss_3d, loss_2d = pretrain_step(model, teacher, scale_and_translate(xyz), args)
        optimizer.zero_grad(set_to_none=True)
        (loss_3d + loss_2d).backward()
        optimizer.step()
        return dict(loss_3d=loss_3d, loss_2d=loss_2d), len(idx)

    checked = []

    def evaluate(epoch, record):   # monitoring only: never used to choose a checkpoint
        if not (args.svm_every and (epoch + 1) % args.svm_every == 0):
            return {}
        checked.append(epoch)   # the first check of a session also scores the untrained-PointNet baseline
        return svm_check(student, args, process, baseline=len(checked) == 1)
    # the scale-0 LayerNorm feeds no loss, so DDP must expect parameters without gradients
    started = time.time()
    train(run, student, optimizer, args, len(points), step, evaluate, ('loss_3d', 'loss_2d'), checkpoint,
          find_unused_parameters=True, **about)
    data = 'synthetic' if args.data == 'synthetic' else 'modelnet40'
    run.log(f'pre-training done: {(time.time() - started) / 60:.1f} min this session'
            + (f' (and {teacher_minutes:.1f} min before it training the demo teacher)' if trains_teacher else '')
            + f'. Next: the frozen encoder\'s linear SVM, python svm_eval.py --ckpt {run.path("last.pt")} --data {data}, '
            f'or fine-tuning, python finetune.py --ckpt {run.path("last.pt")} --data '
            f'{"synthetic" if data == "synthetic" else "scan_hardest"}')
    end_process(process)
    return student


if __name__ == '__main__':
    run_script(main, parse_args)
