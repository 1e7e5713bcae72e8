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
Picture: python demo.py tokenizer [--config small]      Tests: the tokenizer.py section of test_all.py
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


def check_points(xyz, name='xyz', min_points=1, dtype=None):
    """Raise a ValueError naming `name` unless xyz is a float (B, N, 3) tensor, B >= 1, N >= min_points
    (and of `dtype`, if given). Shapes and dtypes only: no value is read back from a GPU. Whether the
    coordinates are finite is checked once, when a dataset is loaded (data.py)."""
    shape = tuple(xyz.shape) if torch.is_tensor(xyz) else type(xyz).__name__
    if not torch.is_tensor(xyz) or xyz.dim() != 3 or xyz.shape[-1] != 3 or xyz.shape[0] == 0:
        raise ValueError(f'{name} must be a (B, N, 3) tensor with B >= 1, got {shape}')
    if not xyz.is_floating_point() or (dtype is not None and xyz.dtype != dtype):
        raise ValueError(f'{name} is {xyz.dtype} {shape}; it must hold {dtype or "float"} coordinates'
                         + (f' (the model\'s weights): pass {name}.to({dtype})' if dtype else ''))
    if xyz.shape[1] < min_points:
        raise ValueError(f'{name} has {xyz.shape[1]} points per cloud {shape}, need at least {min_points}')


def points_needed(num_groups, group_sizes):
    """The fewest points per cloud a hierarchy can tokenize: its finest scale picks num_groups[0]
    centres and groups each with its group_sizes[0] nearest points."""
    return max(num_groups[0], group_sizes[0])


def hierarchy_problems(num_groups, group_sizes):
    """What makes (num_groups, group_sizes) an impossible hierarchy, as sentences ([] if nothing)."""
    if len(num_groups) != len(group_sizes):
        return [f'num_groups {tuple(num_groups)} and group_sizes {tuple(group_sizes)} differ in length']
    return [f'scale {i} takes {num_groups[i]} tokens of {group_sizes[i]} out of the {num_groups[i - 1]} tokens of '
            f'scale {i - 1} (num_groups {tuple(num_groups)}, group_sizes {tuple(group_sizes)})'
            for i in range(1, len(num_groups))
            if num_groups[i] > num_groups[i - 1] or group_sizes[i] > num_groups[i - 1]]


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
    # deviation: the authors' kernel skips points near the origin (docs/deviations.md, B2); we do not by default
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


def group_points(xyz, n_groups, k):
    """One scale of tokens: FPS centres of xyz and their k nearest neighbours in xyz."""
    return group_around(xyz, gather_points(xyz, farthest_point_sample(xyz, n_groups)), k)


def build_token_hierarchy(xyz, num_groups=(512, 256, 64), group_sizes=(16, 8, 8)):
    """List of `Group`s, finest first: scale 0 groups xyz, scale i groups scale i-1's centres.

    FPS is greedy from a fixed start with lowest-index ties, so FPS of scale i-1's centres picks
    exactly their first G_i, in order (the distances among them are the same floats in both runs,
    and a tie goes to the earlier pick in both): one FPS run gives the centres of every scale,
    the same as group_points at every scale (tested).
    """
    problems = hierarchy_problems(num_groups, group_sizes)
    if problems:
        raise ValueError('; '.join(problems))
    check_points(xyz, 'xyz', min_points=points_needed(num_groups, group_sizes))
    centers = gather_points(xyz, farthest_point_sample(xyz, num_groups[0]))   # (B, G_0, 3)
    groups, points = [], xyz
    for n_groups, k in zip(num_groups, group_sizes):
        groups.append(group_around(points, centers[:, :n_groups], k))
        points = groups[-1].centers
    return groups

