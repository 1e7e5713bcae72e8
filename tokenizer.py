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
import functools
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Group(NamedTuple):
    centers: torch.Tensor    # (B, G, 3)
    idx: torch.Tensor        # (B, G, K) long, indices into the grouped points, nearest first
    neighbors: torch.Tensor  # (B, G, K, 3) absolute coordinates
    relative: torch.Tensor   # (B, G, K, 3) neighbors - centers


def check_points(xyz, name='xyz', min_points=1):
    """Raise a ValueError naming `name` unless xyz is a float (B, N, 3) tensor with B >= 1, N >= min_points.

    Shapes and dtype only: they cost nothing. Whether the coordinates are finite is checked once,
    when a dataset is loaded (data.py), not here: that would read a value back from the GPU at
    every call.
    """
    if not torch.is_tensor(xyz) or xyz.dim() != 3 or xyz.shape[-1] != 3 or xyz.shape[0] == 0:
        shape = tuple(xyz.shape) if torch.is_tensor(xyz) else type(xyz).__name__
        raise ValueError(f'{name} must be a (B, N, 3) tensor with B >= 1, got {shape}')
    if not xyz.is_floating_point():
        raise ValueError(f'{name} must hold float coordinates, got {xyz.dtype} (shape {tuple(xyz.shape)})')
    if xyz.shape[1] < min_points:
        raise ValueError(f'{name} has {xyz.shape[1]} points per cloud, need at least {min_points} '
                         f'(shape {tuple(xyz.shape)})')


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
    On a GPU the loop is recorded once per input shape as a CUDA graph and replayed.
    """
    check_points(xyz, 'xyz', min_points=n_samples)
    if xyz.is_cuda and not torch.cuda.is_current_stream_capturing() and not torch.compiler.is_compiling():
        graph = fps_cuda_graph(tuple(xyz.shape), xyz.dtype, xyz.device, n_samples, skip_near_origin)
        if graph is not None:
            return graph(xyz)
    return fps_loop(xyz, n_samples, skip_near_origin)


def fps_loop(xyz, n_samples, skip_near_origin=False):
    """The sampling loop of farthest_point_sample: 5 batched operations per pick, no host sync."""
    B, N, _ = xyz.shape
    xyz = xyz.transpose(1, 2).contiguous()                    # (B, 3, N): each coordinate contiguous
    min_dist = torch.full((B, N), 1e10, dtype=xyz.dtype, device=xyz.device)
    # deviation: the authors' kernel skips points near the origin (README, deviations); we do not by default
    if skip_near_origin:   # a distance of -1 can never rise above a real one, so they are never picked
        min_dist.masked_fill_((xyz ** 2).sum(1) <= 1e-3, -1.0)
    farthest = torch.zeros(B, 1, dtype=torch.long, device=xyz.device)
    picks = [farthest]
    for _ in range(n_samples - 1):   # inherently sequential; each step is batched over B x N
        last = xyz.gather(2, farthest[:, None].expand(-1, 3, -1))                         # (B, 3, 1)
        # squared distances: (x - last)^2 per coordinate in one op (that is all mse_loss computes
        # without reduction), then summed x + y + z, exactly as ((xyz - last) ** 2).sum(-1)
        d = F.mse_loss(xyz, last.expand_as(xyz), reduction='none').sum(1)                # (B, N)
        torch.minimum(min_dist, d, out=min_dist)
        farthest = min_dist.argmax(dim=1, keepdim=True)                                  # first index on ties
        picks.append(farthest)
    return torch.cat(picks, dim=1)


@functools.lru_cache(maxsize=8)
def fps_cuda_graph(shape, dtype, device, n_samples, skip_near_origin):
    """fps_loop for one input shape, recorded as a CUDA graph: a callable xyz -> indices, or None if
    recording fails (the caller then runs the loop as it is). Kept for the 8 latest shapes.

    A graph replays the loop's ~5 * n_samples kernels without the host launching each one.
    It reads from one fixed input buffer and writes to one fixed output buffer, so each call
    copies its points in and the indices out.
    """
    try:   # plain tensors even if the first call comes under inference_mode (later calls may not)
        with torch.inference_mode(False), torch.no_grad(), torch.autocast('cuda', enabled=False):
            static_xyz = torch.zeros(shape, dtype=dtype, device=device)
            side = torch.cuda.Stream(device)   # warm up off the main stream, as recording requires
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                fps_loop(static_xyz, n_samples, skip_near_origin)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_idx = fps_loop(static_xyz, n_samples, skip_near_origin)
    except RuntimeError as error:
        warnings.warn(f'farthest_point_sample: could not record a CUDA graph ({error}); running the loop eagerly')
        return None

    def replay(xyz):
        static_xyz.copy_(xyz)
        graph.replay()
        return static_idx.clone()
    return replay


def square_distance(query, ref):
    """(B, M, 3), (B, N, 3) -> (B, M, N) squared distances from coordinate differences.

    Summed x, then y, then z, like the brute-force kNN the reference was made with,
    so that ties and near-ties order the same way.
    """
    B, M, N = query.shape[0], query.shape[1], ref.shape[1]
    x, y, z = (F.mse_loss(query[:, :, None, c].expand(B, M, N), ref[:, None, :, c].expand(B, M, N),
                          reduction='none') for c in range(3))        # (q_c - r_c)^2, one op each
    return x.add_(y).add_(z)                                          # (x + y) + z, in place


def knn_indices(query, ref, k):
    """Indices (B, M, k) of the k nearest `ref` points of each `query` point, ascending.

    Equal distances keep the lower index first, as KNN_CUDA's insertion sort does. topk alone
    does not promise an order among equal values, so it runs on a key that has none: the
    distance's float bits (for floats >= 0 they order like the floats) above the point's index.
    """
    check_points(query, 'query')
    check_points(ref, 'ref', min_points=k)
    if query.shape[0] != ref.shape[0]:
        raise ValueError(f'query and ref batch sizes differ: {tuple(query.shape)} vs {tuple(ref.shape)}')
    d = square_distance(query, ref)                                       # (B, M, N)
    if d.dtype != torch.float32:   # the key below needs 32-bit floats; a stable sort says the same
        return d.sort(dim=-1, stable=True).indices[..., :k]
    key = d.view(torch.int32).long()                                      # (B, M, N) int64
    key <<= 32
    key |= torch.arange(ref.shape[1], device=ref.device)
    return key.topk(k, dim=-1, largest=False).indices


def group_around(points, centers, k):
    """A `Group`: each of the centers (B, G, 3) with its k nearest neighbours among points (B, N, 3)."""
    idx = knn_indices(centers, points, k)                                 # (B, G, K)
    neighbors = gather_points(points, idx)                                # (B, G, K, 3)
    return Group(centers, idx, neighbors, neighbors - centers[:, :, None])


def group_points(xyz, n_groups, k, skip_near_origin=False):
    """One scale of tokens: FPS centres of xyz and their k nearest neighbours in xyz."""
    check_points(xyz, 'xyz', min_points=max(n_groups, k))
    return group_around(xyz, gather_points(xyz, farthest_point_sample(xyz, n_groups, skip_near_origin)), k)


def build_token_hierarchy(xyz, num_groups=(512, 256, 64), group_sizes=(16, 8, 8),
                          skip_near_origin=False):
    """List of `Group`s, finest first: scale 0 groups xyz, scale i groups scale i-1's centres.

    FPS is greedy from a fixed start with lowest-index ties, so FPS of scale i-1's centres picks
    exactly their first G_i, in order (the distances among them are the same floats in both runs,
    and a tie goes to the earlier pick in both): one FPS run gives the centres of every scale.
    The near-origin rule of skip_near_origin breaks that in corner cases, so it samples every scale.
    """
    if len(num_groups) != len(group_sizes):
        raise ValueError(f'num_groups {num_groups} and group_sizes {group_sizes} differ in length')
    check_points(xyz, 'xyz', min_points=max(num_groups[0], group_sizes[0]))
    for i in range(1, len(num_groups)):
        if num_groups[i] > num_groups[i - 1] or group_sizes[i] > num_groups[i - 1]:
            raise ValueError(f'scale {i} takes {num_groups[i]} tokens of {group_sizes[i]} out of the '
                             f'{num_groups[i - 1]} tokens of scale {i - 1}: num_groups {num_groups}, '
                             f'group_sizes {group_sizes}')
    if skip_near_origin:
        groups, points = [], xyz
        for n_groups, k in zip(num_groups, group_sizes):
            groups.append(group_points(points, n_groups, k, skip_near_origin))
            points = groups[-1].centers
        return groups
    centers = gather_points(xyz, farthest_point_sample(xyz, num_groups[0]))   # (B, G_0, 3)
    groups, points = [], xyz
    for n_groups, k in zip(num_groups, group_sizes):
        groups.append(group_around(points, centers[:, :n_groups], k))
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
