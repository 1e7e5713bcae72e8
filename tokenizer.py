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
Demo: python tokenizer.py      Tests: test_fps_* / test_knn_* / test_group_* in test_all.py
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
    if not torch.is_tensor(xyz) or xyz.dim() != 3 or xyz.shape[-1] != 3:
        shape = tuple(xyz.shape) if torch.is_tensor(xyz) else type(xyz).__name__
        raise ValueError(f'{name} must be a (B, N, 3) tensor, got {shape}')
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
    # deviation: the authors' kernel skips points near the origin (SPEC B2); we do not by default
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


if __name__ == '__main__':
    import os
    from torchvision.utils import save_image
    from data import make_synthetic
    from project import project_depth_images

    xyz, _ = make_synthetic(1, num_points=2048, seed=3)
    groups = build_token_hierarchy(xyz)
    for i, g in enumerate(groups):
        print(f'scale {i}: centres {tuple(g.centers.shape)}, neighbours {tuple(g.neighbors.shape)}')
    # one row per scale: the cloud, then the centres of each scale, in the three views
    rows = [project_depth_images(pts, img_size=224)[0] for pts in [xyz] + [g.centers for g in groups]]
    os.makedirs('runs/demo', exist_ok=True)
    save_image(torch.cat(rows), 'runs/demo/tokenizer.png', nrow=3, padding=4, pad_value=1.0)
    print('wrote runs/demo/tokenizer.png (rows: points, scale-0, scale-1, scale-2 centres; columns: views)')
