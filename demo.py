"""
demo.py: a picture of what each stage does, written to runs/demo/<stage>.png (copies in docs/); an
exercise's flags go into the name, runs/demo/mask-mask_ratio-0.6.png, so the default picture stays.

  python demo.py tokenizer [--config small]        token centres per scale, the kNN groups of 10 tokens
  python demo.py project [--samples 4]             clouds as the teacher sees them, in three views
  python demo.py teacher [--weights ...]           the teacher's class-token attention over each class
  python demo.py mask [--mask_ratio 0.6 --config small]   what stays visible at each scale, and why
  python demo.py model [--ckpt PATH | none]        input, what the encoder sees, what the decoder predicts
  python demo.py data                              one synthetic shape per class
  python demo.py segment [--ckpt PATH]             a segmentation run's test shapes: true and predicted parts
Every picture turns the three views so that y is up and uses one colour convention (pictures.py):
blue = visible to the encoder, light grey = hidden, orange = predicted, black = token centres.
"""
import argparse
import os
import time
from dataclasses import replace

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # before torch loads OpenMP: waiting threads sleep (docs/speed.md)
import torch
from PIL import Image

from tokenizer import build_token_hierarchy
from project import VIEWS, back_project, project_depth_images
from teacher import build_teacher, normalize_images, teacher_features_and_saliency, tiny_teacher
from mask import guided_mask, hierarchical_masks, num_visible, random_mask
from model import I2PMAE, ModelConfig, SMALL_CONFIG
from checkpoints import checkpoint_config, load_weights, read_checkpoint
from synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PART_NAMES
from data import load_part_split, make_synthetic
from train_teacher import DEMO_TEACHER_PATH, untrained_demo_teacher
from pictures import (CENTRE, CLOUD, GROUP_COLOURS, HIDDEN, PREDICTED, TILE, VIEW_NAMES, VISIBLE, Dots, cloud_frame,
                      group_colours, heat_colours, image_tile, points_tile, save_picture, titled_grid)
import segment


def config_of(name):
    """--config full: 2048 points, the paper's 512/256/64 tokens; small: 512 points, SMALL_CONFIG's 128/64/16."""
    return (ModelConfig(), 2048) if name == 'full' else (SMALL_CONFIG, 512)


def picture_teacher(weights='demo'):
    """(teacher, description) for the teacher and mask pictures. 'demo': the trained demo teacher if there is
    one, else 'tiny'; 'tiny': a small random ViT on 224-pixel images with 16-pixel patches (14 x 14, as
    ViT-B/16), 4 layers, 64 wide, seed 0; 'demo-random': the demo teacher untrained; else build_teacher's."""
    note = ''
    if weights == 'demo':
        found = os.path.isfile(DEMO_TEACHER_PATH)
        weights, note = (DEMO_TEACHER_PATH, '') if found else ('tiny', f' (no trained demo teacher at {DEMO_TEACHER_PATH})')
    if weights == 'demo-random':
        vit, arch = untrained_demo_teacher()
        return vit.eval(), f'the demo teacher\'s ViT ({arch["num_layers"]} layers, width {arch["hidden_dim"]}), untrained'
    if weights != 'tiny':
        return build_teacher(weights)
    vit = tiny_teacher(image_size=TILE, patch_size=16, num_layers=4, hidden_dim=64)
    return vit, (f'small RANDOM ViT ({len(vit.encoder.layers)} layers, {vit.hidden_dim} wide, seed 0), '
                 f'no pretrained knowledge{note}')


def draw_tokenizer(args):
    cfg, num_points = config_of(args.config)
    shown = 10   # kNN groups coloured per scale: the first tokens FPS picks lie far apart
    xyz, _ = make_synthetic(1, num_points=num_points, seed=args.seed)
    groups = build_token_hierarchy(xyz, cfg.num_groups, cfg.group_sizes)
    members_of = ['points'] + [f'scale-{i} centres' for i in range(len(groups) - 1)]
    for i, g in enumerate(groups):
        print(f'scale {i}: {g.centers.shape[1]} tokens, each the {g.idx.shape[2]} nearest {members_of[i]}')
    frame, tiles, labels = cloud_frame(xyz[0]), [], []
    for i, g in enumerate(groups):
        G, K = g.idx.shape[1:]
        centres, cloud = Dots(g.centers[0], CENTRE, radius=1 if G > 200 else 2), Dots(xyz[0], CLOUD, radius=0)
        row = [points_tile(frame, view, cloud, centres) for view in range(len(VIEW_NAMES))]
        members = g.neighbors[0, :shown]                                        # (shown, K, 3)
        row.append(points_tile(frame, 0, cloud,
                               Dots(members.reshape(-1, 3), group_colours(shown).repeat_interleave(K, dim=0), radius=2),
                               Dots(g.centers[0, :shown], CENTRE, radius=3, marker='cross')))
        tiles.append(row)
        labels.append(f'scale {i}: {G} tokens, each the K = {K} nearest {members_of[i]}')
    return titled_grid(
        tiles, f'tokenizer.py: farthest point sampling + kNN at {len(groups)} scales ({num_points} points, '
               f'--config {args.config})',
        col_labels=list(VIEW_NAMES) + [f'view 1: the first {shown} tokens\' kNN groups'], row_labels=labels,
        legend=[(CLOUD, f'the {num_points} input points'), (CENTRE, 'token centres (FPS picks)'),
                (GROUP_COLOURS[0], 'last column: a colour per token for its members, x its centre')],
        caption='Each scale picks its centres by farthest point sampling among the previous scale\'s centres '
                '(scale 0: among the points), so coarser tokens cover the shape evenly with fewer centres. '
                'A token is its centre (a cross in the last column) with its K nearest points of the previous '
                'scale: the tokens of scale 1 and 2 group centres, not points. Groups may overlap; some points '
                'belong to no token.')


def draw_project(args):
    xyz, labels = make_synthetic(args.samples, num_points=2048, seed=args.seed)
    images, geometry = project_depth_images(xyz, args.img_size)
    B, V = len(xyz), len(VIEWS)
    print(f'{tuple(xyz.shape)} points -> {tuple(images.shape)} depth images, views stacked [view 1 of every '
          f'sample; view 2; view 3]')
    depth = images[:, 0].view(V, B, args.img_size, args.img_size)               # one channel: all 3 are equal
    return titled_grid(
        [[image_tile(depth[v, b], view=v) for v in range(V)] for b in range(B)],
        f'project.py: {B} synthetic clouds ({xyz.shape[1]} points) as the teacher sees them',
        col_labels=list(VIEW_NAMES),
        row_labels=[f'sample {b + 1}: {SYNTHETIC_CLASSES[k]}' for b, k in enumerate(labels.tolist())],
        caption='Each point paints the 5 x 5 pixels around its cell with its depth coordinate; a pixel holds the '
                'SUM of what lands on it, squashed by a sigmoid: mid-grey = empty (0.5), brighter = positive '
                'summed depth, darker = negative. Each cloud fills its image. Views are turned for display so that '
                'y is up; the projection itself is the authors\'.')


def draw_teacher(args):
    torch.manual_seed(args.seed)   # a random ViT-B/16 is drawn from the global stream: the same picture every run
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
    return titled_grid(
        [tiles[:7], tiles[7:]], f'teacher.py: class-token attention ({h} x {w} patches) over the depth image of each '
                                f'synthetic class, {VIEW_NAMES[args.view]}',
        tile_labels=[names[:7], names[7:]],
        heat_scale=(0, high, {0: '0', uniform: f'uniform 1/{h * w}', high: f'max {high:.4f}'}),
        caption=f'Teacher: {described}. Attention from {low:.4f} to {high:.4f} per patch (each image sums to 1; '
                f'the largest is {high / uniform:.1f} x uniform); one scale for every class, from 0 to the largest.')


def propagation_story(masks, groups, mask_ratio):
    """One paragraph: why the finer scales keep more tokens visible than the ratio says."""
    visible = [int((~m).sum()) for m in masks]
    top = len(groups) - 1
    steps = [f'each of the {visible[i]} visible scale-{i} tokens keeps its {groups[i].idx.shape[-1]} nearest '
             f'scale-{i - 1} tokens ({visible[i] * groups[i].idx.shape[-1]} picks, {visible[i - 1]} of '
             f'{masks[i - 1].shape[1]} distinct)' for i in range(top, 0, -1)]
    return (f'Why {100 * visible[0] / masks[0].shape[1]:.0f}% of scale-0 tokens stay visible at mask ratio '
            f'{mask_ratio}: only scale {top} is masked at the ratio ({visible[top]} of {masks[top].shape[1]} '
            f'visible), and a finer token stays visible if ANY visible coarser token has it among its K nearest: '
            + '; '.join(steps) + '.')


def draw_mask(args):
    cfg, num_points = config_of(args.config)
    xyz, _ = make_synthetic(1, num_points=num_points, seed=args.shape_seed)
    groups = build_token_hierarchy(xyz, cfg.num_groups, cfg.group_sizes)
    vit, described = picture_teacher(args.teacher_weights)
    images, geometry = project_depth_images(xyz, vit.image_size)
    _, saliency = teacher_features_and_saliency(vit, normalize_images(images))
    token_saliency = back_project(groups[-1].centers, geometry, saliency[:, None], vit.image_size).mean(-1)
    probs = torch.softmax(token_saliency, dim=1)
    generator = torch.Generator().manual_seed(args.seed)
    masks = {'2D-guided': hierarchical_masks(guided_mask(token_saliency, args.mask_ratio, generator), groups),
             'random': hierarchical_masks(random_mask(1, cfg.num_groups[-1], args.mask_ratio, generator=generator),
                                          groups)}
    ratio = (probs.max() / probs.min()).item()
    print(f'teacher: {described}')
    print(f'softmax(token saliency) over the {probs.shape[1]} coarse tokens: largest/smallest = {ratio:.3f}')
    counts = {}
    for name, scales in masks.items():
        counts[name] = ', '.join(f'{int((~m).sum())}/{m.shape[1]} ({100 * (~m).float().mean().item():.0f}%)'
                                 for m in scales)
        print(f'{name} mask, visible tokens per scale 0, 1, 2 (fine to coarse): {counts[name]}')
    frame, top, tiles = cloud_frame(xyz[0]), len(groups) - 1, []
    for name, scales in masks.items():
        row = []
        for i in range(top, 0, -1):   # coarse token centres, then the next finer ones
            is_masked = scales[i][0]
            row.append(points_tile(frame, 0, Dots(groups[i].centers[0][is_masked], HIDDEN, radius=3),
                                   Dots(groups[i].centers[0][~is_masked], VISIBLE, radius=3)))
        hidden, visible = groups[0].neighbors[0][scales[0][0]], groups[0].neighbors[0][~scales[0][0]]
        row += [points_tile(frame, view, Dots(hidden.reshape(-1, 3), HIDDEN), Dots(visible.reshape(-1, 3), VISIBLE))
                for view in range(len(VIEW_NAMES))]
        tiles.append(row)
    hidden_top = cfg.num_groups[-1] - num_visible(cfg.num_groups[-1], args.mask_ratio)
    return titled_grid(
        tiles, f'mask.py: --mask_ratio {args.mask_ratio} hides {hidden_top} of {cfg.num_groups[-1]} coarse tokens, '
               f'then the mask propagates to finer scales (--config {args.config})',
        col_labels=[f'scale {i}: token centres, view 1' for i in range(top, 0, -1)] +
                   [f'scale 0: token points, {name}' for name in VIEW_NAMES],
        row_labels=[f'{name} mask; visible per scale 0, 1, 2: {counts[name]}' for name in masks],
        legend=[(VISIBLE, 'visible: the encoder sees it'), (HIDDEN, 'hidden (masked)')],
        caption=propagation_story(masks['2D-guided'], groups, args.mask_ratio) +
                f' Guided: coarse tokens drawn from softmax(saliency), largest/smallest = {ratio:.3f}. '
                f'Teacher: {described}.')


def draw_model(args):
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    if args.ckpt != 'none' and os.path.isfile(args.ckpt):   # the demo checkpoint of `python pretrain.py`
        checkpoint = read_checkpoint(args.ckpt, '--ckpt')
        model = I2PMAE(checkpoint_config(checkpoint, args.ckpt))
        load_weights(model, checkpoint, args.ckpt)
        num_points, source = checkpoint['args']['num_points'], f'pre-trained student from {args.ckpt}'
    else:       # no checkpoint: fit a small student to this one shape (3D loss only)
        model, num_points = I2PMAE(replace(SMALL_CONFIG, feat_dim_2d=0)), 512
        source = f'small student fitted to this one shape for {args.steps} steps, no 2D target'
        if args.ckpt != 'none':
            print(f'no {args.ckpt}: `python pretrain.py` (about 5 minutes on 2 idle cores) trains the demo student; '
                  'until then this picture fits a small student to one shape (about 1 minute).')
    print(source)
    xyz, _ = make_synthetic(1, num_points=num_points, seed=5)
    groups = build_token_hierarchy(xyz, model.cfg.num_groups, model.cfg.group_sizes)
    masks = hierarchical_masks(random_mask(1, model.cfg.num_groups[-1], 0.8), groups)
    if 'pre-trained' not in source:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(1, args.steps + 1):
            loss_3d, _ = model.pretrain_losses(groups, masks)
            optimizer.zero_grad()
            loss_3d.backward()
            optimizer.step()
            if step % 10 == 0 or step == args.steps:
                elapsed = time.perf_counter() - start
                print(f'  step {step}/{args.steps}: Chamfer-L2 {loss_3d.item():.4f}, {elapsed:.0f} s, '
                      f'about {elapsed / step * (args.steps - step):.0f} s to go')
    model.eval()
    with torch.no_grad():
        x = model.decode(groups, masks, model.encode(groups, masks))             # (1, G_h, D)
        h = model.head_scale
        is_masked, group = masks[h][0], groups[h]
        K = group.idx.shape[-1]
        predicted = model.head_3d(x[0][is_masked]).view(-1, K, 3) + group.centers[0][is_masked][:, None]
        loss_3d, _ = model.pretrain_losses(groups, masks)
    print(f'Chamfer-L2 of the masked scale-{h} tokens, eval mode: {loss_3d.item():.4f}')
    frame = cloud_frame(xyz[0])
    visible_points = groups[0].neighbors[0][~masks[0][0]].reshape(-1, 3)      # what the encoder embeds
    hidden_points = groups[0].neighbors[0][masks[0][0]].reshape(-1, 3)
    given, truth = group.centers[0][is_masked], group.neighbors[0][is_masked].reshape(-1, 3)
    tiles = [[points_tile(frame, v, Dots(xyz[0], CLOUD)),
              points_tile(frame, v, Dots(hidden_points, HIDDEN), Dots(visible_points, VISIBLE)),
              points_tile(frame, v, Dots(truth, HIDDEN), Dots(visible_points, VISIBLE),
                          Dots(predicted.reshape(-1, 3), PREDICTED), Dots(given, CENTRE, 3, 'cross'))]
             for v in range(len(VIEW_NAMES))]
    L, G = int(is_masked.sum()), is_masked.shape[0]
    return titled_grid(
        tiles, f'model.py: the student reconstructs its {L} masked scale-{h} tokens (Chamfer-L2 {loss_3d.item():.4f})',
        col_labels=[f'input: {num_points} points', 'what the encoder sees: visible tokens',
                    f'decoder output: {K} points for each masked token'],
        row_labels=list(VIEW_NAMES),
        legend=[(CLOUD, 'input points'), (VISIBLE, 'visible tokens (given)'), (HIDDEN, 'hidden tokens (true points)'),
                (CENTRE, 'x centre of a masked token (given)'), (PREDICTED, 'predicted points')],
        caption=f'Student: {source}. A random mask (ratio 0.8) hides {int(masks[-1].sum())} of '
                f'{masks[-1].shape[1]} coarse tokens; propagated as in mask.py, {L} of {G} scale-{h} tokens are '
                f'hidden. The decoder knows only the centres of the masked tokens (x) and predicts {K} points around '
                f'each (orange); the 3D loss is the Chamfer-L2 distance between them and the true points (light '
                f'grey). Visible tokens are not reconstructed in 3D.')


def draw_data(args, cols=7, view=2):
    points, labels = make_synthetic(1000, 2048, seed=args.seed)
    first = torch.stack([(labels == k).nonzero()[0, 0] for k in range(len(SYNTHETIC_CLASSES))])
    tiles = [points_tile(cloud_frame(cloud), view, Dots(cloud, CLOUD)) for cloud in points[first]]
    tiles += [None] * (-len(tiles) % cols)                 # titled_grid leaves None cells empty
    names = list(SYNTHETIC_CLASSES) + [''] * (-len(SYNTHETIC_CLASSES) % cols)
    return titled_grid([tiles[i:i + cols] for i in range(0, len(tiles), cols)],
                       f'data.py: one synthetic shape per class (2048 points, {VIEW_NAMES[view]})',
                       tile_labels=[names[i:i + cols] for i in range(0, len(names), cols)],
                       caption='Each shape is rotated about y, scaled per axis, and sampled with noise and uneven '
                               'density; each fills its own tile.')


@torch.no_grad()
def draw_segment(args, columns=5, view=0):
    """Test shapes of evenly spaced categories of a segmentation run: true parts above, prediction below."""
    flags = segment.parse_args(['--test_only', '--ckpt', args.ckpt, '--gpu', '-1',
                                '--data', read_checkpoint(args.ckpt, '--ckpt').get('args', {}).get('data', 'synthetic')])
    checkpoint, _ = segment.read_pretrained(flags)   # the settings the run was trained with
    test = load_part_split(flags.data, 'test', flags.data_root, flags.load_points or None)
    model, _ = segment.build_model(flags, len(test.category_names), sum(map(len, test.category_parts)), checkpoint)
    xyz, parts = segment.fixed_test_points(test, flags.points)
    present = test.categories.unique()
    chosen = present[torch.linspace(0, len(present) - 1, min(columns, len(present))).round().long()]
    idx = torch.stack([(test.categories == c).nonzero()[0, 0] for c in chosen])    # a loop over a few categories
    table = segment.part_table(test.category_parts, model.head[-1].out_channels)
    categories = test.categories[idx]
    predicted = segment.predict_parts(model.eval()(xyz[idx], categories), categories, table)   # (columns, n)
    ious = segment.shape_ious(predicted, parts[idx], categories, table).tolist()
    colour_of = torch.zeros(table.shape[1], 3, dtype=torch.uint8)        # global part id -> rgb
    for ids in test.category_parts:
        colour_of[ids] = group_colours(len(ids))
    names = SYNTHETIC_PART_NAMES if flags.data == 'synthetic' else [
        f'{name} part {i}' for name, ids in zip(test.category_names, test.category_parts) for i in ids]
    radius = 2 if xyz.shape[1] <= 1024 else 1
    tiles = [[points_tile(cloud_frame(xyz[s]), view, Dots(xyz[s], colour_of[labels], radius))
              for s, labels in zip(idx.tolist(), rows)] for rows in (parts[idx], predicted)]
    return titled_grid(
        tiles, 'segment.py: part segmentation of test shapes, ground truth and prediction',
        col_labels=[f'{test.category_names[c]} (test shape {s})' for c, s in zip(chosen.tolist(), idx.tolist())],
        row_labels=[f'ground truth, {VIEW_NAMES[view]}', "prediction (the category's parts only)"],
        tile_labels=[[f'{len(parts[s].unique())} of its category\'s {len(test.category_parts[c])} parts'
                      for s, c in zip(idx.tolist(), chosen.tolist())], [f'IoU {100 * iou:.1f}%' for iou in ious]],
        legend=[(tuple(colour_of[i].tolist()), names[i]) for c in chosen.tolist() for i in test.category_parts[c]],
        caption=f'Segmenter: {args.ckpt}, {checkpoint["epoch"]} epoch(s) on {flags.data}. {flags.points} points '
                f'drawn per test shape, once, seeded. Each category\'s parts take the colours in order; the prediction '
                f'is an argmax over the parts of the shape\'s true category (the protocol).')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='runs/demo', help='folder for <stage>.png, <stage>-<flag>-<value>.png with '
                                                          'other flags than the defaults (default: runs/demo)')
    stages = parser.add_subparsers(dest='stage', required=True)
    s = stages.add_parser('tokenizer', help='FPS + kNN tokens at three scales')
    s.set_defaults(draw=draw_tokenizer)
    s.add_argument('--config', choices=('full', 'small'), default='full',
                   help='full: 2048 points, 512/256/64 tokens (the paper); small: 512 points, 128/64/16 (the CPU demo)')
    s.add_argument('--seed', type=int, default=3, help='which synthetic shape (default: 3)')
    s = stages.add_parser('project', help='depth images of three views')
    s.set_defaults(draw=draw_project)
    s.add_argument('--samples', type=int, default=4, help='clouds to draw, one row each (default: 4)')
    s.add_argument('--seed', type=int, default=1, help='which synthetic shapes (default: 1)')
    s.add_argument('--img_size', type=int, default=224, help='image side S (paper: 224)')
    s = stages.add_parser('teacher', help='the teacher\'s class-token attention')
    s.set_defaults(draw=draw_teacher)
    s.add_argument('--weights', default='demo', help='demo (the trained demo teacher if there is one, else tiny), tiny '
                                                     '(a small random ViT), demo-random, random (ViT-B/16), imagenet, '
                                                     'auto, or a weights file (default: demo)')
    s.add_argument('--view', type=int, default=2, choices=[0, 1, 2], help='which of the 3 views (default: 2)')
    s.add_argument('--seed', type=int, default=0, help='seeds a random teacher (default: 0)')
    s.add_argument('--shape_seed', type=int, default=2, help='seed of the synthetic shapes (default: 2)')
    s = stages.add_parser('mask', help='2D-guided and random masks at every scale')
    s.set_defaults(draw=draw_mask)
    s.add_argument('--mask_ratio', type=float, default=0.8, help='share of coarse tokens hidden, in [0, 1) (paper: 0.8)')
    s.add_argument('--config', choices=('full', 'small'), default='full', help='as for tokenizer')
    s.add_argument('--teacher_weights', default='demo', help='as --weights of the teacher picture (default: demo)')
    s.add_argument('--seed', type=int, default=0, help='seeds the masks (default: 0)')
    s.add_argument('--shape_seed', type=int, default=4, help='which synthetic shape (default: 4)')
    s = stages.add_parser('model', help='the reconstruction of masked tokens')
    s.set_defaults(draw=draw_model)
    s.add_argument('--ckpt', default='runs/pretrain-synthetic/last.pt',
                   help='a pretrain.py checkpoint (default: the demo\'s, runs/pretrain-synthetic/last.pt; if it is '
                        'absent, or with none, a small student is fitted to this one shape)')
    s.add_argument('--steps', type=int, default=60, help='fitting steps without a checkpoint (default: 60)')
    s.add_argument('--seed', type=int, default=0, help='seeds the mask and the fitted student (default: 0)')
    s = stages.add_parser('data', help='one synthetic shape per class')
    s.set_defaults(draw=draw_data)
    s.add_argument('--seed', type=int, default=0, help='dataset seed (default: 0)')
    s = stages.add_parser('segment', help='a segmentation run\'s test shapes')
    s.set_defaults(draw=draw_segment)
    s.add_argument('--ckpt', default='runs/segment-synthetic/last.pt', help='a segment.py checkpoint '
                                                                            '(default: runs/segment-synthetic/last.pt)')
    args = parser.parse_args(argv)
    if args.stage == 'mask' and not 0 <= args.mask_ratio < 1:
        parser.error(f'--mask_ratio must be in [0, 1), got {args.mask_ratio}')
    return args


def picture_name(args):
    """<stage>.png, with each flag that differs from its default in the name: mask-mask_ratio-0.6.png."""
    defaults = vars(parse_args([args.stage]))
    changed = [(k, v) for k, v in vars(args).items() if k not in ('out', 'draw', 'stage') and v != defaults[k]]
    return args.stage + ''.join(f'-{k}-{str(v).replace(os.sep, "_")}' for k, v in changed) + '.png'


def main(args):
    start = time.perf_counter()
    path = save_picture(args.draw(args), os.path.join(args.out, picture_name(args)))
    print(f'wrote {path} in {time.perf_counter() - start:.1f} s')
    return path


if __name__ == '__main__':
    main(parse_args())
