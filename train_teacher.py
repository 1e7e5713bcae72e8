"""
train_teacher.py: the synthetic demo's own "2D pre-trained model".

I2P-MAE learns from a 2D model pre-trained on images (CLIP in the paper): a model whose knowledge
comes from other data than the 3D benchmark it helps on. With no such weights at hand (no download,
a CPU), the synthetic demo makes its teacher: a small torchvision ViT trained with labels on depth
images (project.py's) of shapes of its own, whose classes are NONE of the 13 the student is tested
on: 40 random assemblies of the same primitives (synthetic.random_assembly), from a random stream of
their own. So what the teacher knows is how objects made of parts look in depth images, not the
test's labels. The 3D student never sees a label either: it regresses the teacher's features and is
masked by its attention.

  python train_teacher.py                                  # runs/teacher-synthetic/teacher.pt, a few CPU-minutes
  python train_teacher.py --classes test --out runs/teacher-sameclass/teacher.pt
      # the leaky comparison: the same teacher trained on the student's 13 test classes (docs/results.md)

The file holds the weights, the architecture (`config`, which teacher.build_teacher reads) and the
training record. pretrain.py's synthetic preset uses it, and trains it first if it is absent.
Tests: the train_teacher.py section of test_all.py
"""
import argparse
import contextlib
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from tokenizer import gather_points
from project import VIEWS, project_depth_images
from teacher import freeze, normalize_images, vit_from_config
from synthetic import assembly_clouds, random_assembly
from data import SYNTHETIC_CLASSES, normalize_unit_sphere, scale_and_translate, synthetic_shapes

DEMO_TEACHER_PATH = os.path.join('runs', 'teacher-synthetic', 'teacher.pt')
# Sized for a 2-core CPU: an 8 x 8 saliency grid over each view, against the demo student's 16 coarse tokens
# classes: 'other' (random assemblies, none of the student's test classes) or 'test' (the student's 13 classes)
DEMO_TEACHER = dict(image_size=64, patch_size=8, num_layers=4, num_heads=4, hidden_dim=64, stem_channels=(16, 32, 64),
                    num_points=512, train_shapes=4000, test_shapes=520, epochs=8, batch_size=64, lr=3e-3,
                    weight_decay=0.05, seed=0, data_seed=0, classes='other')
ASSEMBLY_CLASSES = 40   # the teacher's own classes: random assemblies of primitives
# The teacher's shapes come from np.random.default_rng([data_seed, part, TEACHER_STREAM]) (its assembly classes
# from part 2). data.py's splits use [data_seed, split index 0..2]; SeedSequence pads a short list with zeros,
# so each of their streams has 0 as third word, ours has this tag there: the pools cannot share a shape.
TEACHER_STREAM = 0x7EAC


def teacher_classes(classes):
    """The names of the teacher's classes: 40 random assemblies, or the student's 13 test classes."""
    return list(SYNTHETIC_CLASSES) if classes == 'test' else [f'assembly {k}' for k in range(ASSEMBLY_CLASSES)]


def teacher_shapes(num_shapes, num_points, part, data_seed=0, classes='other'):
    """Labeled shapes for the teacher only, normalised: part 0 trains it, part 1 is held out. classes 'other':
    the random assemblies (the same 40 classes for both parts); 'test': the student's 13 classes."""
    rng = np.random.default_rng([data_seed, part, TEACHER_STREAM])
    if classes == 'test':
        return synthetic_shapes(num_shapes, num_points, rng)
    assemblies_rng = np.random.default_rng([data_seed, 2, TEACHER_STREAM])
    assemblies = [random_assembly(assemblies_rng) for _ in range(ASSEMBLY_CLASSES)]
    clouds, labels = assembly_clouds(assemblies, num_shapes, num_points, rng)
    return normalize_unit_sphere(torch.from_numpy(clouds)), torch.from_numpy(labels)


def depth_views(xyz, image_size):
    """(B, N, 3) clouds -> (3B, 3, S, S) normalised depth images, the teacher's input in pre-training."""
    images, _ = project_depth_images(xyz, image_size)
    return normalize_images(images)


def augment_clouds(xyz, num_points, generator):
    """Label-preserving changes of y-up clouds (B, N, 3) -> (B, num_points, 3), before rendering.

    A new random subset of the points, a mirror about a vertical plane (x -> -x), a turn about
    the up axis and pre-training's per-axis scale and shift. (No flips of the up axis and no turns
    within an image: objects stand upright in every view; no grey-level jitter: grey is depth.)
    """
    B, N, _ = xyz.shape
    device = xyz.device
    keep = torch.rand(B, N, generator=generator, device=device).argsort(dim=1)[:, :num_points]
    xyz = gather_points(xyz, keep)                                                      # (B, n, 3)
    mirror = torch.where(torch.rand(B, generator=generator, device=device) < 0.5, -1.0, 1.0)
    xyz = xyz * torch.stack([mirror, torch.ones_like(mirror), torch.ones_like(mirror)], 1)[:, None]
    angle = torch.rand(B, generator=generator, device=device) * 2 * math.pi
    c, s, zero, one = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle), torch.ones_like(angle)
    yaw = torch.stack([c, zero, s, zero, one, zero, -s, zero, c], 1).view(B, 3, 3)
    return scale_and_translate(xyz @ yaw.transpose(1, 2), generator=generator)


@torch.no_grad()
def view_accuracy(vit, xyz, labels, batch_size=128):
    """Held-out accuracy (%) of the teacher per view, (V,), on un-augmented clouds (S, N, 3)."""
    was_training = vit.training
    vit.eval()
    correct = torch.zeros(len(VIEWS), device=xyz.device)
    for start in range(0, len(xyz), batch_size):
        logits = vit(depth_views(xyz[start:start + batch_size], vit.image_size))     # (3b, classes)
        hits = logits.argmax(1).view(len(VIEWS), -1) == labels[start:start + batch_size]
        correct += hits.sum(1)
    vit.train(was_training)
    return (100 * correct / len(xyz)).tolist()


def untrained_demo_teacher(cfg=DEMO_TEACHER):
    """The demo teacher before its training -> (ViT, its architecture): weights drawn from seed cfg['seed']
    (the global random stream is left as it was). Frozen, it is the ablation's random teacher."""
    arch = dict(image_size=cfg['image_size'], patch_size=cfg['patch_size'], num_layers=cfg['num_layers'],
                num_heads=cfg['num_heads'], hidden_dim=cfg['hidden_dim'], mlp_dim=4 * cfg['hidden_dim'],
                num_classes=len(teacher_classes(cfg['classes'])), stem_channels=list(cfg['stem_channels']))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg['seed'])
        return vit_from_config(arch), arch


@contextlib.contextmanager
def one_cpu_thread(device):
    """On a CPU, run the block on one thread (and restore the count after)."""
    threads = torch.get_num_threads()
    if torch.device(device).type == 'cpu':
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_demo_teacher(device='cpu', log=print, **settings):
    """Train the demo teacher from scratch -> (frozen ViT, record of its configuration and accuracy).

    settings override DEMO_TEACHER. Every random draw comes from local generators seeded by `seed`.
    On a CPU it trains on one thread: float sums then run in one order whatever the core count.
    """
    with one_cpu_thread(device):
        cfg = {**DEMO_TEACHER, **settings}
        unknown = set(cfg) - set(DEMO_TEACHER)
        if unknown:
            raise ValueError(f'unknown teacher setting(s) {sorted(unknown)}; known: {sorted(DEMO_TEACHER)}')
        start = time.time()
        vit, arch = untrained_demo_teacher(cfg)
        vit = vit.to(device)
        generator = torch.Generator(device).manual_seed(cfg['seed'])
        # twice the points a view shows, so every epoch draws a different subset of each shape
        train_xyz, train_y = (t.to(device) for t in teacher_shapes(cfg['train_shapes'], 2 * cfg['num_points'], 0,
                                                                   cfg['data_seed'], cfg['classes']))
        test_xyz, test_y = (t.to(device) for t in teacher_shapes(cfg['test_shapes'], cfg['num_points'], 1,
                                                                 cfg['data_seed'], cfg['classes']))
        steps_per_epoch = cfg['train_shapes'] // cfg['batch_size']
        total = cfg['epochs'] * steps_per_epoch
        optimizer = torch.optim.AdamW(vit.parameters(), lr=cfg['lr'], weight_decay=cfg['weight_decay'])
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg['lr'], total_steps=total, pct_start=0.1)
        log(f'training the demo teacher: ViT {arch} on {cfg["train_shapes"]} synthetic shapes x 3 views of '
            f'{len(teacher_classes(cfg["classes"]))} classes ({"the student" if cfg["classes"] == "test" else "none"} '
            f'of the student\'s test classes), {cfg["epochs"]} epochs of {steps_per_epoch} steps')
        vit.train()
        for step in range(total):
            if step % steps_per_epoch == 0:
                order = torch.randperm(cfg['train_shapes'], generator=generator, device=device)
            idx = order[(step % steps_per_epoch) * cfg['batch_size']:][:cfg['batch_size']]
            images = depth_views(augment_clouds(train_xyz[idx], cfg['num_points'], generator), cfg['image_size'])
            loss = F.cross_entropy(vit(images), train_y[idx].repeat(len(VIEWS)))     # every view, the shape's label
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if (step + 1) % steps_per_epoch == 0:
                accuracy = view_accuracy(vit, test_xyz, test_y)
                log(f'  teacher epoch {(step + 1) // steps_per_epoch}/{cfg["epochs"]}: loss {loss.item():.3f}, held-out '
                    f'image accuracy {sum(accuracy) / 3:.1f}% (views {", ".join(f"{a:.1f}" for a in accuracy)}), '
                    f'{time.time() - start:.0f} s')
        accuracy = view_accuracy(vit, test_xyz, test_y)
        about = (f'small ViT ({arch["num_layers"]} layers, width {arch["hidden_dim"]}, {arch["image_size"]}-pixel '
                 f'images, {arch["patch_size"]}-pixel patches) trained on depth images of '
                 + ('the 13 classes the student is tested on' if cfg['classes'] == 'test' else
                    f'{ASSEMBLY_CLASSES} classes of random assemblies, none of the student\'s')
                 + f', held-out accuracy {sum(accuracy) / 3:.1f}%')
        training = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
        record = dict(config=arch, about=about, training=training, accuracy=sum(accuracy) / 3,
                      view_accuracy=accuracy, seconds=time.time() - start)
        return freeze(vit), record


def save_teacher(path, vit, record):
    """Write the weights with their configuration and training record (tensors and plain types only)."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    torch.save({'model': vit.state_dict(), **record}, path + '.tmp')
    os.replace(path + '.tmp', path)   # atomically: an interrupted run leaves no half-written teacher


def train_and_save(path=DEMO_TEACHER_PATH, device='cpu', log=print, **settings):
    """Train the demo teacher (settings override DEMO_TEACHER) and write it to `path`; returns its record.
    It leaves nothing behind in the caller's process: the global random streams and the thread count are
    as they were (pretrain.py trains it this way when the file is absent, then builds its student)."""
    vit, record = train_demo_teacher(device, log, **settings)
    save_teacher(path, vit, record)
    log(f'wrote {path}: held-out image accuracy {record["accuracy"]:.1f}% after {record["seconds"] / 60:.1f} min')
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=DEMO_TEACHER_PATH, help=f'where to write it (default: {DEMO_TEACHER_PATH})')
    parser.add_argument('--classes', choices=['other', 'test'], default='other',
                        help='other: random assemblies, none of the student\'s test classes (default); test: the '
                             'student\'s 13 test classes, the ablation\'s leaky comparison')
    parser.add_argument('--seed', type=int, default=DEMO_TEACHER['seed'],
                        help='the initial weights and the batch order (default: 0; the data stay the same)')
    args = parser.parse_args()
    train_and_save(args.out, classes=args.classes, seed=args.seed)


if __name__ == '__main__':
    main()
