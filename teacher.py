"""
teacher.py: the frozen 2D teacher (I2P-MAE paper, section "2D Pre-trained Models").

The authors use CLIP's ViT-B/16; we use torchvision's `VisionTransformer` (default
vit_b_16, ImageNet weights when available), which needs nothing but torchvision.
For a batch of depth images the teacher gives
  features   (N, D, h, w)  last-layer patch tokens after the final LayerNorm
                           (D = 768, h = w = 14 for vit_b_16 on 224 x 224 images)
  saliency   (N, h, w)     last block's attention from the class token to each patch,
                           averaged over heads (each row of the attention sums to 1)
The saliency needs the attention weights, which torchvision's blocks do not return,
so the forward is written out below and the last block is run by hand.
The teacher is never part of the student: not in its checkpoint, optimizer or .train().
With no pretrained weights at hand (no download, or a CPU), the synthetic demo makes its own
"2D pre-trained model": `python teacher.py --train` trains a small ViT WITH LABELS on depth
images of a separate pool of synthetic shapes and writes it, with its configuration, to
runs/teacher-synthetic/teacher.pt (`demo_teacher` loads it, or trains it first).
Demo: python teacher.py [--weights demo|tiny|random|imagenet|PATH] [--train]      Tests: test_teacher_* in test_all.py
"""
import contextlib
import math
import os
import socket
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer

from tokenizer import gather_points
from project import VIEWS, project_depth_images
from data import SYNTHETIC_CLASSES, scale_and_translate, synthetic_shapes

# the depth images are normalised like ImageNet photos, as the authors do (even for CLIP)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_S = 10   # an offline machine must fail fast, not hang


def freeze(vit):
    """Evaluation mode, no gradients: the teacher only ever gives targets."""
    return vit.eval().requires_grad_(False)


def tiny_teacher(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, seed=0):
    """A small random-weight VisionTransformer for tests and quick demos (a 4 x 4 patch grid).

    Its weights depend on `seed` only: the global random stream (seeded by --seed) is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                                num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=4 * hidden_dim)
    return freeze(vit)


def imagenet_vit_b_16():
    """torchvision's ViT-B/16 with IMAGENET1K_V1 weights: the local cache, else a download."""
    weights = torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(weights.url))
    if os.path.exists(cached):
        return torchvision.models.vit_b_16(weights=weights)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return torchvision.models.vit_b_16(weights=weights)
    finally:
        socket.setdefaulttimeout(previous)


def torchvision_vit(arch):
    """An untrained torchvision ViT by constructor name (vit_b_16, vit_b_32, ...)."""
    if arch not in ('vit_b_16', 'vit_b_32', 'vit_l_16', 'vit_l_32', 'vit_h_14'):
        raise ValueError(f'--teacher_arch {arch!r} is not a torchvision ViT (vit_b_16, vit_b_32, ...)')
    return getattr(torchvision.models, arch)(weights=None)


def build_teacher(weights='auto', arch='vit_b_16'):
    """The frozen teacher and a short description of where its weights came from.

    weights: 'imagenet' (torchvision IMAGENET1K_V1, vit_b_16 only), 'random',
    a path to a state_dict file, 'auto' (imagenet if it can be had, else random
    with a loud warning), or 'demo-random' (the demo teacher's architecture before its training). `arch` names a torchvision ViT constructor (vit_b_16, vit_b_32, ...);
    a file written by save_teacher carries its own architecture, and `arch` is then not used.
    """
    if weights in ('imagenet', 'auto'):
        if arch != 'vit_b_16':
            raise ValueError(f'ImageNet teacher weights are wired for vit_b_16 only, not {arch!r}')
        try:
            return freeze(imagenet_vit_b_16()), 'vit_b_16 ImageNet (torchvision IMAGENET1K_V1)'
        except Exception as error:   # offline, blocked, corrupt cache: all mean "no weights"
            if weights == 'imagenet':
                raise RuntimeError(f'could not load the ImageNet ViT-B/16 weights: {error}. Put '
                                   'them in the torch hub cache, or pass --teacher_weights PATH') from error
            warnings.warn(f'\n{"!" * 78}\nTEACHER WEIGHTS UNAVAILABLE ({type(error).__name__}: {error}).\n'
                          'Continuing with a RANDOMLY INITIALISED ViT: the 2D guidance and 2D targets '
                          'then carry no pretrained knowledge.\n' + '!' * 78, stacklevel=2)
            weights = 'random'
    if weights == 'random':
        return freeze(torchvision_vit(arch)), f'{arch} random init (no pretrained knowledge)'
    if weights == 'demo-random':
        vit, config = untrained_demo_teacher()
        return freeze(vit), (f'the demo teacher\'s small ViT ({config["num_layers"]} layers, width {config["hidden_dim"]}, '
                             f'{config["image_size"]}-pixel images) with random weights, untrained: no knowledge')
    if not os.path.isfile(weights):
        raise FileNotFoundError(f'--teacher_weights {weights!r}: no such file (expected imagenet, '
                                'random, auto, demo, demo-random or a weights file)')
    state = torch.load(weights, map_location='cpu', weights_only=True)
    if isinstance(state, dict) and 'config' in state:   # a file that carries its architecture (save_teacher)
        vit = vit_from_config(state['config'])
        vit.load_state_dict(state['model'])
        return freeze(vit), describe_trained_teacher(state, weights)
    vit = torchvision_vit(arch)
    vit.load_state_dict(state.get('model', state) if isinstance(state, dict) else state)
    return freeze(vit), f'{arch} from {weights}'


def normalize_images(images):
    """(N, 3, S, S) in [0, 1] -> ImageNet-normalised, the input the teacher expects.

    Channel by channel with Python numbers: a mean/std tensor made from Python data here would
    be copied to the GPU, and wait for it, at every step.
    """
    return torch.stack([(images[:, c] - mean) / std
                        for c, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))], dim=1)


@torch.no_grad()
def teacher_features_and_saliency(vit, images):
    """Run the frozen ViT on normalised images (N, 3, S, S) -> features (N, D, h, w), saliency (N, h, w)."""
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != vit.image_size:
        raise ValueError(f'images must be (N, 3, {vit.image_size}, {vit.image_size}) for this teacher, '
                         f'got {tuple(images.shape)}')
    N = images.shape[0]
    h = w = vit.image_size // vit.patch_size
    x = vit.conv_proj(images).flatten(2).transpose(1, 2)           # (N, h*w, D) patches, row-major
    x = torch.cat([vit.class_token.expand(N, -1, -1), x], dim=1)   # (N, 1 + h*w, D), class token first
    x = vit.encoder.dropout(x + vit.encoder.pos_embedding)
    *blocks, last = vit.encoder.layers
    for block in blocks:
        x = block(x)
    # the last block by hand, asking its attention for the head-averaged weights
    y = last.ln_1(x)
    y, attention = last.self_attention(y, y, y, need_weights=True, average_attn_weights=True)
    x = x + last.dropout(y)
    x = x + last.mlp(last.ln_2(x))
    x = vit.encoder.ln(x)
    features = x[:, 1:].transpose(1, 2).reshape(N, -1, h, w)      # (N, D, h, w)
    saliency = attention[:, 0, 1:].reshape(N, h, w)                # class-token query over patches
    return features, saliency


# ---------------------------------------------------------------- the demo's own 2D pre-trained model
# With no ImageNet/CLIP weights at hand, the synthetic demo makes its teacher: a small ViT trained
# WITH LABELS on depth images of a separate pool of synthetic shapes. The 3D student never sees a label.

DEMO_TEACHER_PATH = os.path.join('runs', 'teacher-synthetic', 'teacher.pt')
# Sized for a 2-core CPU: an 8 x 8 saliency grid over each view, against the demo student's 16 coarse tokens
DEMO_TEACHER = dict(image_size=64, patch_size=8, num_layers=4, num_heads=4, hidden_dim=64, stem_channels=(16, 32, 64),
                    num_points=512,
                    train_shapes=4000, test_shapes=520, epochs=8, batch_size=64, lr=3e-3, weight_decay=0.05,
                    seed=0, data_seed=0)
# The teacher's shapes come from np.random.default_rng([data_seed, part, TEACHER_STREAM]). data.py's
# splits use [data_seed, split index 0..2]; SeedSequence pads a short list with zeros, so each of
# their streams has 0 as third word, ours has this tag there: the pools cannot share a shape.
TEACHER_STREAM = 0x7EAC


def vit_from_config(config):
    """A torchvision VisionTransformer from plain settings; stem_channels: 3x3 stride-2 convolutions
    before the patch embedding (a convolutional stem, which trains faster on little data), [] for none."""
    config = dict(config)
    stem = config.pop('stem_channels', [])
    if stem and 2 ** len(stem) != config['patch_size']:
        raise ValueError(f'a stem of {len(stem)} stride-2 convolutions makes {2 ** len(stem)}-pixel patches, '
                         f'not patch_size {config["patch_size"]}')
    return VisionTransformer(**config, conv_stem_configs=[ConvStemConfig(c, 3, 2) for c in stem] or None)


def teacher_shapes(num_shapes, num_points, part, data_seed=0):
    """Labeled synthetic shapes for the teacher only: part 0 trains it, part 1 is held out."""
    return synthetic_shapes(num_shapes, num_points, np.random.default_rng([data_seed, part, TEACHER_STREAM]))


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
                num_classes=len(SYNTHETIC_CLASSES), stem_channels=list(cfg['stem_channels']))
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
    On a CPU it trains on one thread: float sums then run in one order whatever the core count, and
    the run writes the file the README's results used (66.5% held-out; on two threads the same
    training reached 63.2%, and the demo's SVM fell level with the untrained-PointNet baseline).
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
        train_xyz, train_y = (t.to(device) for t in
                              teacher_shapes(cfg['train_shapes'], 2 * cfg['num_points'], 0, cfg['data_seed']))
        test_xyz, test_y = (t.to(device) for t in teacher_shapes(cfg['test_shapes'], cfg['num_points'], 1, cfg['data_seed']))
        steps_per_epoch = cfg['train_shapes'] // cfg['batch_size']
        total = cfg['epochs'] * steps_per_epoch
        optimizer = torch.optim.AdamW(vit.parameters(), lr=cfg['lr'], weight_decay=cfg['weight_decay'])
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg['lr'], total_steps=total, pct_start=0.1)
        log(f'training the demo teacher: ViT {arch} on {cfg["train_shapes"]} synthetic shapes x 3 views, '
            f'{cfg["epochs"]} epochs of {steps_per_epoch} steps')
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
        training = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
        record = dict(config=arch, training={**training, 'augment': 'point subset, mirror x, yaw, scale_and_translate'},
                      accuracy=sum(accuracy) / 3, view_accuracy=accuracy, seconds=time.time() - start)
        return freeze(vit), record


def save_teacher(path, vit, record):
    """Write the weights with their configuration and training record (tensors and plain types only)."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    torch.save({'model': vit.state_dict(), **record}, path + '.tmp')
    os.replace(path + '.tmp', path)   # atomically: an interrupted run leaves no half-written teacher


def describe_trained_teacher(state, path):
    """One line for the logs: what the file written by save_teacher holds."""
    config = state['config']
    return (f'small ViT ({config["num_layers"]} layers, width {config["hidden_dim"]}, {config["image_size"]}-pixel '
            f'images, {config["patch_size"]}-pixel patches) trained on synthetic depth images, held-out accuracy '
            f'{state["accuracy"]:.1f}% ({path})')


def train_and_save_demo_teacher(path=DEMO_TEACHER_PATH, device='cpu', log=print, **settings):
    """`python teacher.py --train`: train the demo teacher and write it to `path`."""
    vit, record = train_demo_teacher(device, log, **settings)
    save_teacher(path, vit, record)
    log(f'wrote {path}: held-out image accuracy {record["accuracy"]:.1f}% after {record["seconds"] / 60:.1f} min')
    return vit, record


def demo_teacher(device, log=print, path=DEMO_TEACHER_PATH):
    """The synthetic demo's teacher -> (frozen ViT on device, description); trained first if `path` is absent."""
    if not os.path.isfile(path):
        log(f'no trained teacher at {path}: training it first (python teacher.py --train does only this)')
        train_and_save_demo_teacher(path, device, log)
    vit, described = build_teacher(path)
    return vit.to(device), described


def main():
    import argparse
    from data import make_synthetic
    from PIL import Image
    from pictures import VIEW_NAMES, heat_colours, image_tile, picture_teacher, save_picture, titled_grid

    parser = argparse.ArgumentParser(description="Run the frozen teacher on a depth image of each synthetic class "
                                                 "and draw its class-token attention.")
    parser.add_argument('--weights', default='demo',
                        help='demo (the trained demo teacher in runs/teacher-synthetic/ if there is one, '
                             'else tiny), tiny (a small random ViT), random (ViT-B/16, random), '
                             'imagenet, auto, demo-random, or a weights file (default: demo)')
    parser.add_argument('--view', type=int, default=2, choices=[0, 1, 2], help='which of the 3 views (default: 2)')
    parser.add_argument('--seed', type=int, default=0, help='seeds a random teacher (default: 0)')
    parser.add_argument('--shape_seed', type=int, default=2, help='seed of the synthetic shapes (default: 2)')
    parser.add_argument('--out', default='runs/demo', help='folder for teacher.png (default: runs/demo)')
    parser.add_argument('--train', action='store_true',
                        help=f'train the synthetic demo\'s teacher into {DEMO_TEACHER_PATH} first (a few CPU-minutes)')
    args = parser.parse_args()
    if args.train:
        train_and_save_demo_teacher()
    start = time.perf_counter()
    torch.manual_seed(args.seed)   # a random ViT-B/16 is drawn from the global stream: the same picture on every run
    vit, described = picture_teacher(args.weights)
    print('teacher:', described)
    xyz, labels = make_synthetic(13 * 16, num_points=2048, seed=args.shape_seed)
    first = torch.stack([(labels == k).nonzero()[0, 0] for k in range(len(SYNTHETIC_CLASSES))])
    images, _ = project_depth_images(xyz[first], img_size=vit.image_size)      # (3 * 13, 3, S, S), view by view
    features, saliency = teacher_features_and_saliency(vit, normalize_images(images))
    C = len(first)
    depth, attention = images[args.view * C:(args.view + 1) * C, 0], saliency[args.view * C:(args.view + 1) * C]
    _, h, w = attention.shape
    low, high, uniform = attention.min().item(), attention.max().item(), 1 / (h * w)
    print(f'images {tuple(images.shape)} -> features {tuple(features.shape)}, saliency {tuple(saliency.shape)}')
    print(f'class-token attention per patch ({VIEW_NAMES[args.view]}): {low:.4f} to {high:.4f} (uniform: '
          f'1/{h * w} = {uniform:.4f}; the largest is {high / uniform:.1f} x uniform)')
    heat = heat_colours(attention / high)                                       # one scale for every class, from 0
    tiles = [Image.blend(image_tile(d, view=args.view, resample=Image.BILINEAR), image_tile(a, view=args.view), 0.5)
             for d, a in zip(depth, heat)]
    tiles += [None] * (-len(tiles) % 7)
    names = list(SYNTHETIC_CLASSES) + [''] * (-len(SYNTHETIC_CLASSES) % 7)
    picture = titled_grid(
        [tiles[:7], tiles[7:]], f'teacher.py: class-token attention ({h} x {w} patches) over the depth image of each '
                                f'synthetic class, {VIEW_NAMES[args.view]}',
        tile_labels=[names[:7], names[7:]],
        heat_scale=(0, high, {0: '0', uniform: f'uniform 1/{h * w}', high: f'max {high:.4f}'}),
        caption=f'Teacher: {described}. Attention from {low:.4f} to {high:.4f} per patch (each image sums to 1; '
                f'the largest is {high / uniform:.1f} x uniform); one scale for every class, from 0 to the largest.')
    path = save_picture(picture, os.path.join(args.out, 'teacher.png'))
    print(f'wrote {path} (one shape per class: attention blended over its depth image) '
          f'in {time.perf_counter() - start:.1f} s')


if __name__ == '__main__':
    main()
