"""
tokenizer.py: point tokens at three scales (I2P-MAE paper, section "Point Cloud
Tokenization"; the hierarchy is Point-M2AE's).

A cloud becomes tokens in two steps, repeated per scale:
  1. farthest point sampling picks G centres that cover the cloud evenly;
  2. each centre takes its K nearest neighbours as its token ("group").
Scale 0 groups the raw points; scale i > 0 groups the centres of scale i - 1,
so a coarse token is made of finer tokens:
  xyz       (B, N, 3)             the cloud, N = 2048 in pre-training
  scale 0   G = 512 tokens of K = 16 points
  scale 1   G = 256 tokens of K = 8 scale-0 centres
  scale 2   G = 64 tokens of K = 8 scale-1 centres
Each scale is a `Group`: centres (B, G, 3), neighbour indices (B, G, K) into the
previous scale, and the neighbours in absolute and centre-relative coordinates.
Everything is plain batched torch: no CUDA extension, no loop over samples.
Demo: python tokenizer.py [--config small]      Tests: test_fps_* / test_knn_* / test_group_* in test_all.py
"""
from typing import NamedTuple

import torch


class Group(NamedTuple):
    centers: torch.Tensor    # (B, G, 3)
    idx: torch.Tensor        # (B, G, K) long, indices into the grouped points, nearest first
    neighbors: torch.Tensor  # (B, G, K, 3) absolute coordinates
    relative: torch.Tensor   # (B, G, K, 3) neighbors - centers


def check_points(xyz, name='xyz', min_points=1):
    """Raise a ValueError naming `name` unless xyz is a finite (B, N, 3) cloud with N >= min_points."""
    if not torch.is_tensor(xyz) or xyz.dim() != 3 or xyz.shape[-1] != 3 or xyz.shape[0] == 0:
        shape = tuple(xyz.shape) if torch.is_tensor(xyz) else type(xyz).__name__
        raise ValueError(f'{name} must be a (B, N, 3) tensor with B >= 1, got {shape}')
    if not xyz.is_floating_point():
        raise ValueError(f'{name} must hold float coordinates, got {xyz.dtype} (shape {tuple(xyz.shape)})')
    if xyz.shape[1] < min_points:
        raise ValueError(f'{name} has {xyz.shape[1]} points per cloud, need at least {min_points} '
                         f'(shape {tuple(xyz.shape)})')
    if not torch.isfinite(xyz).all():
        raise ValueError(f'{name} holds NaN or infinite coordinates (shape {tuple(xyz.shape)})')


def gather_points(xyz, idx):
    """xyz (B, N, C) and idx (B, ...) long -> (B, ..., C): xyz[b, idx[b, ...]] for every b."""
    B, _, C = xyz.shape
    flat = idx.reshape(B, -1, 1).expand(-1, -1, C)
    return xyz.gather(1, flat).view(*idx.shape, C)


def farthest_point_sample(xyz, n_samples, skip_near_origin=False):
    """Indices (B, n_samples) of farthest point sampling, in the order they were picked.

    The first pick is index 0, as in the CUDA kernel the authors used; each next pick is the
    point whose squared distance to the picked set is largest, the lowest index on ties.
    skip_near_origin=True reproduces that kernel's accident of never picking (after the
    first) a point with x*x + y*y + z*z <= 1e-3.
    """
    check_points(xyz, 'xyz', min_points=n_samples)
    B, N, _ = xyz.shape
    idx = torch.zeros(B, n_samples, dtype=torch.long, device=xyz.device)
    min_dist = torch.full((B, N), 1e10, dtype=xyz.dtype, device=xyz.device)
    # deviation: the authors' kernel skips points near the origin (docs/authors_code.md B2); we do not by default
    never_pick = (xyz ** 2).sum(-1) <= 1e-3 if skip_near_origin else None
    farthest = torch.zeros(B, dtype=torch.long, device=xyz.device)
    for i in range(n_samples):  # inherently sequential; each step is batched over B x N
        idx[:, i] = farthest
        last = gather_points(xyz, farthest[:, None])        # (B, 1, 3)
        d = ((xyz - last) ** 2).sum(-1)                      # (B, N)
        min_dist = torch.minimum(min_dist, d)
        candidates = min_dist if never_pick is None else min_dist.masked_fill(never_pick, -1.0)
        farthest = candidates.argmax(dim=1)                  # first index on ties
    return idx


def square_distance(query, ref):
    """(B, M, 3), (B, N, 3) -> (B, M, N) squared distances from coordinate differences.

    Summed x, then y, then z, like the brute-force kNN the reference was made with,
    so that ties and near-ties order the same way.
    """
    return sum((query[:, :, None, c] - ref[:, None, :, c]) ** 2 for c in range(3))


def knn_indices(query, ref, k):
    """Indices (B, M, k) of the k nearest `ref` points of each `query` point, ascending.

    A stable sort keeps the lower index first on ties, as KNN_CUDA's insertion sort does.
    """
    check_points(query, 'query')
    check_points(ref, 'ref', min_points=k)
    if query.shape[0] != ref.shape[0]:
        raise ValueError(f'query and ref batch sizes differ: {tuple(query.shape)} vs {tuple(ref.shape)}')
    d = square_distance(query, ref)                          # (B, M, N)
    return d.sort(dim=-1, stable=True).indices[..., :k]


def group_points(xyz, n_groups, k, skip_near_origin=False):
    """One scale of tokens: FPS centres of xyz and their k nearest neighbours in xyz."""
    check_points(xyz, 'xyz', min_points=max(n_groups, k))
    center_idx = farthest_point_sample(xyz, n_groups, skip_near_origin)   # (B, G)
    centers = gather_points(xyz, center_idx)                              # (B, G, 3)
    idx = knn_indices(centers, xyz, k)                                    # (B, G, K)
    neighbors = gather_points(xyz, idx)                                   # (B, G, K, 3)
    return Group(centers, idx, neighbors, neighbors - centers[:, :, None])


def build_token_hierarchy(xyz, num_groups=(512, 256, 64), group_sizes=(16, 8, 8),
                          skip_near_origin=False):
    """List of `Group`s, finest first: scale 0 groups xyz, scale i groups scale i-1's centres."""
    if len(num_groups) != len(group_sizes):
        raise ValueError(f'num_groups {num_groups} and group_sizes {group_sizes} differ in length')
    groups, points = [], xyz
    for n_groups, k in zip(num_groups, group_sizes):
        groups.append(group_points(points, n_groups, k, skip_near_origin))
        points = groups[-1].centers
    return groups


def main():
    import argparse
    import os
    import time
    from data import make_synthetic
    from model import SMALL_CONFIG, ModelConfig
    from pictures import (CENTRE, CLOUD, GROUP_COLOURS, VIEW_NAMES, Dots, cloud_frame, group_colours,
                          points_tile, save_picture, titled_grid)

    parser = argparse.ArgumentParser(description='Tokenize one synthetic cloud and draw its tokens.')
    parser.add_argument('--config', choices=('full', 'small'), default='full',
                        help='full: 2048 points, 512/256/64 tokens (the paper); small: 512 points, '
                             'model.SMALL_CONFIG 128/64/16 tokens (the CPU demo)')
    parser.add_argument('--seed', type=int, default=3, help='which synthetic shape (default: 3)')
    parser.add_argument('--out', default='runs/demo', help='folder for tokenizer.png (default: runs/demo)')
    args = parser.parse_args()
    start = time.perf_counter()
    shown = 10   # kNN groups coloured per scale: the first tokens FPS picks lie far apart
    cfg, num_points = (ModelConfig(), 2048) if args.config == 'full' else (SMALL_CONFIG, 512)
    xyz, _ = make_synthetic(1, num_points=num_points, seed=args.seed)
    groups = build_token_hierarchy(xyz, cfg.num_groups, cfg.group_sizes)
    members_of = ['points'] + [f'scale-{i} centres' for i in range(len(groups) - 1)]
    for i, g in enumerate(groups):
        print(f'scale {i}: {g.centers.shape[1]} tokens, each the {g.idx.shape[2]} nearest {members_of[i]}')

    frame = cloud_frame(xyz[0])
    tiles, labels = [], []
    for i, g in enumerate(groups):
        G, K = g.idx.shape[1:]
        centres = Dots(g.centers[0], CENTRE, radius=1 if G > 200 else 2)
        cloud = Dots(xyz[0], CLOUD, radius=0)
        row = [points_tile(frame, view, cloud, centres) for view in range(len(VIEW_NAMES))]
        members = g.neighbors[0, :shown]                                        # (shown, K, 3)
        colours = group_colours(shown)
        row.append(points_tile(frame, 0, cloud,
                               Dots(members.reshape(-1, 3), colours.repeat_interleave(K, dim=0), radius=2),
                               Dots(g.centers[0, :shown], CENTRE, radius=3, marker='cross')))
        tiles.append(row)
        labels.append(f'scale {i}: {G} tokens, each the K = {K} nearest {members_of[i]}')
    picture = titled_grid(
        tiles, f'tokenizer.py: farthest point sampling + kNN at {len(groups)} scales '
               f'({num_points} points, --config {args.config})',
        col_labels=list(VIEW_NAMES) + [f'view 1: the first {shown} tokens\' kNN groups'],
        row_labels=labels,
        legend=[(CLOUD, f'the {num_points} input points'), (CENTRE, 'token centres (FPS picks)'),
                (GROUP_COLOURS[0], 'last column: a colour per token for its members, x its centre')],
        caption='Each scale picks its centres by farthest point sampling among the previous scale\'s centres '
                '(scale 0: among the points), so coarser tokens cover the shape evenly with fewer centres. '
                'A token is its centre (a cross in the last column) with its K nearest points of the previous '
                'scale: the tokens of scale 1 and 2 group centres, not points. Groups may overlap; some points '
                'belong to no token.')
    path = save_picture(picture, os.path.join(args.out, 'tokenizer.png'))
    print(f'wrote {path} (rows: scales; columns: the three views and the kNN groups) '
          f'in {time.perf_counter() - start:.1f} s')


if __name__ == '__main__':
    main()
