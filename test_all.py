"""
test_all.py: executable documentation for every stage, in pipeline order.

Run with `python -m pytest -q test_all.py` (or `python test_all.py`).
Reference tests read the authors' recorded tensors from authors_reference/ (or
$I2P_REFERENCE_DIR, a folder in the same format) and take every size from the files' config.
"""
import math
import os
import pickle
import sys

import h5py
import numpy as np
import pytest
import torch

import data

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE_DIR = os.environ.get('I2P_REFERENCE_DIR', os.path.join(HERE, 'authors_reference'))


# ---------------------------------------------------------------- core stages
from dataclasses import asdict

import scipy.spatial
import torch.nn.functional as F

from tokenizer import (build_token_hierarchy, farthest_point_sample, gather_points, group_points,
                       knn_indices, square_distance)
from project import (VIEWS, back_project, bicubic_matrix, project_depth_images,
                     sample_upsampled)
from teacher import normalize_images, teacher_features_and_saliency, tiny_teacher
from mask import guided_mask, hierarchical_masks, propagate_mask, random_mask, visible_counts
from model import (Classifier, I2PMAE, ModelConfig, chamfer_l2, load_official_checkpoint,
                   official_to_ours)


def load_reference(name):
    path = os.path.join(REFERENCE_DIR, name)
    assert os.path.exists(path), f'reference file {path} is missing (authors_reference/ or $I2P_REFERENCE_DIR)'
    return torch.load(path, weights_only=True)


def relative_error(ours, ref):
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(ours, ref, name, tol=1e-5):
    assert ours.shape == ref.shape, f'{name}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}'
    if ref.dtype in (torch.bool, torch.int64, torch.int32):
        assert torch.equal(ours.to(ref.dtype), ref), f'{name}: differs from the reference'
    else:
        err = relative_error(ours, ref)
        assert err <= tol, f'{name}: relative error {err:.2e} > {tol:.0e}'


def reference_config(c):
    """ModelConfig from a reference file's config: every size comes from the file."""
    default = ModelConfig()
    return ModelConfig(
        num_groups=tuple(c['num_groups']), group_sizes=tuple(c['group_sizes']),
        encoder_dims=tuple(c['encoder_dims']), encoder_depths=tuple(c['encoder_depths']),
        num_heads=c['num_heads'], local_radius=tuple(float(r) for r in c['local_radius']),
        drop_path_rate=c['drop_path_rate'],
        decoder_dims=tuple(c.get('decoder_dims', default.decoder_dims)),
        decoder_depths=tuple(c.get('decoder_depths', default.decoder_depths)),
        decoder_up_blocks=tuple(c.get('decoder_up_blocks', default.decoder_up_blocks)),
        feat_dim_2d=c.get('feat_dim_2d', 0),
        # the authors' pre-training mask ANDs radius and padding (SPEC B5); only a radius > 0 shows it
        official_radius_bug='decoder_dims' in c and any(r > 0 for r in c['local_radius']))


def flat_idx(group, n_in):
    """Our (B, G, K) neighbour indices as the reference's flat b * N_in + j."""
    B = group.idx.shape[0]
    return (group.idx + torch.arange(B)[:, None, None] * n_in).flatten()


class Recorder:
    """Forward hooks that copy module inputs/outputs by name."""
    def __init__(self):
        self.values = {}

    def output(self, module, name):
        module.register_forward_hook(lambda m, args, out: self.values.__setitem__(name, out))

    def inputs(self, module, name):
        module.register_forward_pre_hook(lambda m, args: self.values.__setitem__(name, args))


@pytest.fixture(scope='module')
def pretrain_reference():
    case = load_reference('pretrain_case.pt')
    t, c = case['tensors'], case['config']
    cfg = reference_config(c)
    groups = build_token_hierarchy(t['points'], cfg.num_groups, cfg.group_sizes)
    masks = hierarchical_masks(t['mask_top'], groups)
    proj = load_reference('pretrain_proj.pt')['tensors']
    img_size = proj['view1.hit'].shape[-1]
    images, geometry = project_depth_images(t['points'], img_size)
    B, G1, K1 = groups[1].idx.shape
    target_2d = back_project(groups[1].neighbors.flatten(1, 2), geometry, t['teacher.feats'],
                             img_size).view(B, G1, K1, -1)
    return dict(t=t, c=c, cfg=cfg, groups=groups, masks=masks, proj=proj, img_size=img_size,
                images=images, geometry=geometry, target_2d=target_2d,
                weights=load_reference('pretrain_weights.pt')['state_dict'])


def reference_student(ref):
    model = I2PMAE(ref['cfg'])
    assert load_official_checkpoint(model, {'base_model': ref['weights']}) == {}
    return model


# --- tokenizer.py

def numpy_fps(xyz, n):
    """Farthest point sampling written the obvious way, one sample at a time."""
    chosen, dist = [0], np.full(len(xyz), np.inf)
    for _ in range(n - 1):
        dist = np.minimum(dist, ((xyz - xyz[chosen[-1]]) ** 2).sum(1))
        chosen.append(int(np.argmax(dist)))
    return chosen


def test_fps_matches_numpy_brute_force():
    xyz = torch.randn(3, 200, 3, generator=torch.Generator().manual_seed(0))
    idx = farthest_point_sample(xyz, 32)
    for b in range(3):
        assert idx[b].tolist() == numpy_fps(xyz[b].double().numpy(), 32)


def test_fps_first_index_is_fixed_and_ties_go_to_lowest_index():
    # a square: after corner 0 the two adjacent corners tie; the lower index must win
    square = torch.tensor([[[0., 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]]])
    assert farthest_point_sample(square, 4).tolist() == [[0, 3, 1, 2]]
    xyz = torch.rand(2, 50, 3)
    assert (farthest_point_sample(xyz, 5)[:, 0] == 0).all()


def test_knn_agrees_with_scipy_kdtree():
    g = torch.Generator().manual_seed(1)
    ref, query = torch.rand(2, 300, 3, generator=g), torch.rand(2, 40, 3, generator=g)
    idx = knn_indices(query, ref, 10)
    for b in range(2):
        _, expected = scipy.spatial.cKDTree(ref[b].numpy()).query(query[b].numpy(), k=10)
        assert np.array_equal(idx[b].numpy(), expected)


def test_knn_puts_the_centre_first_and_breaks_ties_by_index():
    xyz = torch.tensor([[[0., 0, 0], [1, 0, 0], [-1, 0, 0], [0, 0, 0], [3, 0, 0]]])
    group = group_points(xyz, 2, 4)
    assert group.idx[0, 0].tolist() == [0, 3, 1, 2]           # centre, its duplicate, then the tie 1 < 2
    assert torch.equal(group.relative, group.neighbors - group.centers[:, :, None])


def test_hierarchy_groups_previous_centres():
    xyz = torch.rand(2, 256, 3)
    groups = build_token_hierarchy(xyz, (64, 32, 8), (16, 8, 8))
    assert [tuple(g.neighbors.shape) for g in groups] == [(2, 64, 16, 3), (2, 32, 8, 3), (2, 8, 8, 3)]
    assert torch.equal(groups[1].neighbors, groups[0].centers[torch.arange(2)[:, None, None], groups[1].idx])
    assert torch.equal(groups[2].centers[:, 0], xyz[:, 0])    # FPS starts at index 0 at every scale


@pytest.mark.parametrize('bad, message', [
    (torch.rand(10, 3), 'xyz must be a \\(B, N, 3\\)'),
    (torch.rand(1, 10, 2), 'xyz must be a \\(B, N, 3\\)'),
    (torch.rand(1, 5, 3), 'need at least 8'),
])
def test_tokenizer_rejects_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        group_points(bad, 8, 4)


def plain_fps(xyz, n):
    """The FPS loop as it was first written (one pick per step, distances ((xyz - last) ** 2).sum(-1))."""
    B, N, _ = xyz.shape
    idx = torch.zeros(B, n, dtype=torch.long)
    min_dist = torch.full((B, N), 1e10, dtype=xyz.dtype)
    farthest = torch.zeros(B, dtype=torch.long)
    for i in range(n):
        idx[:, i] = farthest
        min_dist = torch.minimum(min_dist, ((xyz - xyz[torch.arange(B), farthest][:, None]) ** 2).sum(-1))
        farthest = min_dist.argmax(dim=1)
    return idx


def tie_heavy_clouds():
    """Clouds built for ties: integer lattices (many equal distances), duplicated points, and a cloud of
    10 distinct points repeated (FPS runs out of new points and picks index 0 again)."""
    g = torch.Generator().manual_seed(5)
    lattice = torch.randint(-3, 4, (3, 256, 3), generator=g).float()
    duplicated = torch.rand(3, 128, 3, generator=g).repeat(1, 2, 1)[:, torch.randperm(256, generator=g)]
    few = torch.rand(3, 10, 3, generator=g)[:, torch.randint(0, 10, (256,), generator=g)]
    return [lattice, duplicated, few, torch.randn(3, 256, 3, generator=g)]


def test_fps_loop_picks_exactly_what_the_plain_loop_picks():
    for xyz in tie_heavy_clouds() + [torch.rand(2, 300, 3, dtype=torch.float64)]:
        assert torch.equal(farthest_point_sample(xyz, 64), plain_fps(xyz, 64))


def test_fps_of_fps_centres_is_a_prefix_of_the_finer_fps():
    """Why one FPS run serves every scale: FPS(FPS(x, 64), 32) picks the first 32 of FPS(x, 64) --
    the same indices where all picks differ, the same points where FPS ran out of new points."""
    for xyz in tie_heavy_clouds():
        fine = gather_points(xyz, farthest_point_sample(xyz, 64))                 # (B, 64, 3)
        coarse = gather_points(fine, farthest_point_sample(fine, 32))
        assert torch.equal(coarse, fine[:, :32])
    xyz = torch.randn(4, 2048, 3, generator=torch.Generator().manual_seed(0))
    fine = gather_points(xyz, farthest_point_sample(xyz, 512))
    assert torch.equal(farthest_point_sample(fine, 256), torch.arange(256).expand(4, -1))


def test_hierarchy_from_one_fps_run_equals_fps_at_every_scale():
    for xyz in tie_heavy_clouds():
        groups, points = [], xyz
        for n, k in zip((64, 32, 8), (16, 8, 8)):
            groups.append(group_points(points, n, k))
            points = groups[-1].centers
        for ours, expected in zip(build_token_hierarchy(xyz, (64, 32, 8), (16, 8, 8)), groups):
            assert all(torch.equal(a, b) for a, b in zip(ours, expected))


def test_knn_topk_keeps_lowest_index_on_ties():
    """topk promises no order among equal values; the (distance, index) key must give the stable sort's."""
    g = torch.Generator().manual_seed(2)
    for ref in tie_heavy_clouds() + [torch.zeros(2, 40, 3)]:                    # the last: all points equal
        query = ref[:, torch.randperm(ref.shape[1], generator=g)[:30]]
        for k in (1, 8, 16, ref.shape[1]):
            expected = square_distance(query, ref).sort(dim=-1, stable=True).indices[..., :k]
            assert torch.equal(knn_indices(query, ref, k), expected)
    assert knn_indices(torch.zeros(1, 1, 3), torch.zeros(1, 5, 3), 5).tolist() == [[[0, 1, 2, 3, 4]]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU: the CUDA graph of the FPS loop')
def test_fps_cuda_graph_replays_the_loop_exactly():
    for xyz in tie_heavy_clouds():
        for trial in range(2):   # the second call replays the recorded graph on new points
            cloud = (xyz + trial).cuda()
            assert torch.equal(farthest_point_sample(cloud, 64).cpu(), plain_fps(cloud.cpu(), 64))
    first = farthest_point_sample(tie_heavy_clouds()[3].cuda(), 64)
    farthest_point_sample(tie_heavy_clouds()[0].cuda(), 64)                     # same shape, other points
    assert torch.equal(first.cpu(), plain_fps(tie_heavy_clouds()[3], 64))      # outputs are not aliased


def test_reference_fps_knn_and_chamfer_ops():
    ops = load_reference('ops_cases.pt')['tensors']
    n = ops['fps.idx'].shape[1]
    # with the CUDA kernel's near-origin skip (SPEC B2) every index matches
    assert_close(farthest_point_sample(ops['fps.points'], n, skip_near_origin=True), ops['fps.idx'], 'fps.idx')
    # our default (no skip) matches wherever no near-origin point would be picked: sample 0 here
    plain = farthest_point_sample(ops['fps.points'], n)
    assert torch.equal(plain[0], ops['fps.idx'][0]) and not torch.equal(plain[1], ops['fps.idx'][1])
    k = ops['knn.idx'].shape[-1]
    assert_close(knn_indices(ops['knn.query'], ops['knn.ref'], k), ops['knn.idx'], 'knn.idx')
    assert_close(chamfer_l2(ops['chamfer.a'], ops['chamfer.b']), ops['chamfer.loss'], 'chamfer.loss')


def test_reference_grouping(pretrain_reference):
    t, groups = pretrain_reference['t'], pretrain_reference['groups']
    n_in = t['points'].shape[1]
    for i, group in enumerate(groups):
        assert_close(flat_idx(group, n_in), t[f'g{i}.idx'], f'g{i}.idx')
        assert_close(group.centers, t[f'g{i}.center'], f'g{i}.center')
        assert_close(group.relative, t[f'g{i}.neighborhood'], f'g{i}.neighborhood')
        assert_close(group.neighbors, t[f'g{i}.neighborhood_ori'], f'g{i}.neighborhood_ori')
        n_in = group.centers.shape[1]


# --- project.py

def test_projection_hand_worked_pixels():
    # cell = 1.7265625 / 221 = 2**-7 exactly; in view 1 (row x, col y) the rows span the whole
    # image (offset 0) and the columns are centred: offset 224/2 - floor((-1 + 67) / 2) - 1 = 78
    xyz = torch.tensor([[[0.0, 0.0, 0.3], [1.7265625, 0.5, -0.2]]])
    images, geometry = project_depth_images(xyz, 224)
    assert geometry.cell[0] == 2 ** -7 and geometry.offset[0].tolist() == [0.0, 78.0]
    view1 = images[0, 0]
    sig = torch.sigmoid
    assert view1[1, 79] == sig(torch.tensor(0.3))             # point 0's own pixel: cell + 1 + offset
    assert view1[0, 79] == sig(torch.tensor(0.6))             # row -1 is moved onto row 0: two splats sum
    assert view1[222, 143] == sig(torch.tensor(-0.2))
    assert view1[223, 143] == sig(torch.tensor(-0.4))
    assert (view1 != 0.5).sum() == 40                          # 2 points x 4 rows x 5 columns, rest empty
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])


def test_back_projection_reads_back_what_projection_wrote():
    # at full resolution the bicubic "upsampling" is the identity, so each isolated point reads
    # its own pixel: the sigmoid of its depth in that view
    xyz = torch.tensor([[[0.0, 0.0, 0.3], [1.0, 0.5, -0.2], [0.3, 1.0, 0.9]]])
    images, geometry = project_depth_images(xyz, 224)
    read = back_project(xyz, geometry, images[:, :1], 224)     # (1, 3, V)
    depth = torch.stack([xyz[0, :, view[2]] for view in VIEWS], dim=1)
    assert torch.allclose(read[0], torch.sigmoid(depth), atol=1e-6)


@pytest.mark.parametrize('h, size', [(14, 224), (4, 32), (5, 37)])
def test_sparse_bicubic_equals_upsample_then_gather(h, size):
    g = torch.Generator().manual_seed(h)
    maps = torch.randn(3, 7, h, h, generator=g)
    pixels = torch.randint(0, size, (3, 50, 2), generator=g)
    full = F.interpolate(maps, size=(size, size), mode='bicubic', align_corners=False)
    expected = full.flatten(2).gather(2, (pixels[..., 0] * size + pixels[..., 1])[:, None].expand(-1, 7, -1))
    assert torch.allclose(sample_upsampled(maps, pixels, size), expected.transpose(1, 2), atol=1e-5)
    U = bicubic_matrix(h, size)
    assert torch.allclose(U @ maps @ U.T, full, atol=1e-5)


def test_projection_of_a_line_seen_end_on_is_a_dot_in_the_middle():
    line = torch.tensor([[[0.5, 0.5, 0.0], [0.5, 0.5, 1.0]]])                    # along z: no extent in view 1
    images, geometry = project_depth_images(line, 224)
    painted = (images[0, 0] != 0.5).nonzero()
    assert painted.min(0).values.tolist() == [109, 109] and painted.max(0).values.tolist() == [113, 113]
    assert images[0, 0, 111, 111] == torch.sigmoid(torch.tensor(1.0))           # both depths summed
    assert torch.isfinite(geometry.cell).all() and (geometry.cell > 0).all()
    with pytest.raises(ValueError, match='must be a \\(B, N, 3\\)'):
        project_depth_images(torch.rand(2, 3))


def test_reference_projection(pretrain_reference):
    ref, proj = pretrain_reference, pretrain_reference['proj']
    B, S = ref['t']['points'].shape[0], ref['img_size']
    images, geometry = normalize_images(ref['images']), ref['geometry']
    for v in range(len(VIEWS)):
        rows = slice(v * B, (v + 1) * B)
        expected = proj['img_background'].view(1, 3, 1, 1).expand(B, 3, S, S).clone()
        expected.permute(0, 2, 3, 1)[proj[f'view{v + 1}.hit']] = proj[f'view{v + 1}.values']
        assert_close(images[rows], expected, f'view{v + 1} image')
        assert_close(geometry.pc_min[rows], proj[f'view{v + 1}.pc_min'][:, 0], f'view{v + 1}.pc_min')
        assert_close(geometry.cell[rows], proj[f'view{v + 1}.grid_size'].flatten(), f'view{v + 1}.grid_size')
        offset = torch.cat([proj[f'view{v + 1}.offset_x'], proj[f'view{v + 1}.offset_y']], dim=1)
        assert_close(geometry.offset[rows], offset, f'view{v + 1}.offset')


def test_reference_back_projection(pretrain_reference):
    ref, t = pretrain_reference, pretrain_reference['t']
    groups, geometry, S = ref['groups'], ref['geometry'], ref['img_size']
    h = t['teacher.feats'].shape[-1]
    saliency = t['teacher.attn_row0'][:, 1:].reshape(-1, 1, h, h)
    per_view = back_project(groups[-1].centers, geometry, saliency, S)           # (B, G2, V)
    C = t['teacher.feats'].shape[1]
    targets = back_project(groups[1].neighbors.flatten(1, 2), geometry, t['teacher.feats'], S)
    for v in range(len(VIEWS)):
        assert_close(per_view[..., v:v + 1], t[f'i2p.sals_view{v + 1}'], f'i2p.sals_view{v + 1}')
        assert_close(targets[..., v * C:(v + 1) * C], t[f'i2p.target_view{v + 1}'], f'i2p.target_view{v + 1}')
    assert_close(per_view.mean(-1), t['spatial_sals'], 'spatial_sals')
    assert_close(ref['target_2d'][~ref['masks'][1]], t['target_2d'], 'target_2d')


def test_back_projection_works_for_a_single_sample():
    # deviation: the authors' squeeze() breaks at B = 1 (SPEC B3); we keep every dimension
    xyz = torch.rand(1, 100, 3)
    _, geometry = project_depth_images(xyz, 32)
    assert back_project(xyz[:, :10], geometry, torch.rand(3, 1, 4, 4), 32).shape == (1, 10, 3)


# --- teacher.py

def test_teacher_features_equal_torchvision_encoder():
    vit = tiny_teacher()
    images = normalize_images(torch.rand(4, 3, 32, 32))
    features, saliency = teacher_features_and_saliency(vit, images)
    tokens = vit._process_input(images)
    tokens = torch.cat([vit.class_token.expand(4, -1, -1), tokens], dim=1)
    expected = vit.encoder(tokens)[:, 1:]                                       # torchvision's own forward
    assert features.shape == (4, 32, 4, 4) and saliency.shape == (4, 4, 4)
    assert torch.allclose(features.flatten(2).transpose(1, 2), expected, atol=1e-5)


def test_teacher_saliency_is_head_mean_class_token_attention():
    vit = tiny_teacher()
    images = normalize_images(torch.rand(2, 3, 32, 32))
    _, saliency = teacher_features_and_saliency(vit, images)
    # recompute the last block's attention from its weights: softmax(q k^T / sqrt(d)) per head
    x = torch.cat([vit.class_token.expand(2, -1, -1), vit._process_input(images)], dim=1) + vit.encoder.pos_embedding
    for block in vit.encoder.layers[:-1]:
        x = block(x)
    last = vit.encoder.layers[-1]
    q, k, _ = F.linear(last.ln_1(x), last.self_attention.in_proj_weight, last.self_attention.in_proj_bias).chunk(3, -1)
    H = last.self_attention.num_heads
    q, k = (t.view(2, -1, H, t.shape[-1] // H).transpose(1, 2) for t in (q, k))
    attention = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5), dim=-1).mean(1)
    assert torch.allclose(attention.sum(-1), torch.ones(2, 17))                 # rows sum to one
    assert torch.allclose(saliency.flatten(1), attention[:, 0, 1:], atol=1e-6)
    assert (saliency.flatten(1).sum(1) < 1).all()                                # the rest is the class token's


def test_teacher_gets_no_gradients():
    vit = tiny_teacher()
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    features, saliency = teacher_features_and_saliency(vit, images)
    assert not features.requires_grad and not saliency.requires_grad
    assert not any(p.requires_grad for p in vit.parameters()) and not vit.training


def test_teacher_auto_falls_back_to_random_with_a_loud_warning(monkeypatch):
    import teacher

    def offline():
        raise OSError('no network')
    monkeypatch.setattr(teacher, 'imagenet_vit_b_16', offline)
    with pytest.warns(UserWarning, match='RANDOMLY INITIALISED'):
        vit, described = teacher.build_teacher('auto')
    assert 'random' in described and not any(p.requires_grad for p in vit.parameters())
    with pytest.raises(RuntimeError, match='ImageNet ViT-B/16'):
        teacher.build_teacher('imagenet')


# --- mask.py

def test_guided_mask_hides_exact_ratio():
    is_masked = guided_mask(torch.rand(5, 64), 0.8)
    assert is_masked.dtype == torch.bool and (is_masked.sum(1) == 51).all()
    assert (random_mask(5, 64, 0.8).sum(1) == 51).all()


def test_guided_mask_draws_what_multinomial_draws():
    """Written out to avoid multinomial's host-side check, the draw is still multinomial's own."""
    saliency = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    for seed in range(3):
        drawn = torch.multinomial(torch.softmax(saliency, 1), 13, generator=torch.Generator().manual_seed(seed))
        expected = torch.ones(6, 64, dtype=torch.bool).scatter(1, drawn, False)
        assert torch.equal(guided_mask(saliency, 0.8, generator=torch.Generator().manual_seed(seed)), expected)


def test_salient_tokens_stay_visible_more_often():
    saliency = torch.zeros(4000, 8)
    saliency[:, 0] = 1.0                                     # weight e : 1 against every other token
    visible = ~guided_mask(saliency, 0.75, generator=torch.Generator().manual_seed(0))   # 2 of 8 visible
    rate = visible.float().mean(0)
    assert rate[0] > 0.40 and (rate[1:] < 0.27).all()        # uniform would be 0.25 each
    uniform = (~random_mask(4000, 8, 0.75, generator=torch.Generator().manual_seed(0))).float().mean(0)
    assert (uniform - 0.25).abs().max() < 0.03


def test_visible_counts_are_read_for_every_scale_at_once():
    masks = [torch.tensor([[True, False, False], [False, False, False]]), torch.tensor([[True, False], [True, True]])]
    assert visible_counts(masks) == [[2, 3], [1, 0]]


def test_propagation_rule_on_a_hand_built_case():
    # two samples, 2 coarse tokens with 2 fine neighbours each, 5 fine tokens
    idx = torch.tensor([[[1, 2], [2, 3]], [[0, 4], [3, 4]]])
    is_masked_coarse = torch.tensor([[False, True], [True, False]])
    fine = propagate_mask(is_masked_coarse, idx, 5)
    assert fine.tolist() == [[True, False, False, True, True],    # sample 0: token 0 stays masked (no leak)
                             [True, True, True, False, False]]


def test_reference_masks(pretrain_reference):
    t = pretrain_reference['t']
    for i, mask in enumerate(pretrain_reference['masks']):
        assert_close(mask, t[f'masks.scale{i}'], f'masks.scale{i}')


# --- model.py

def test_chamfer_matches_brute_force():
    a, b = torch.rand(3, 6, 3), torch.rand(3, 5, 3)
    total_ab = total_ba = 0.0
    for l in range(3):
        for p in a[l]:
            total_ab += min(((p - q) ** 2).sum().item() for q in b[l])
        for q in b[l]:
            total_ba += min(((p - q) ** 2).sum().item() for p in a[l])
    assert abs(chamfer_l2(a, b).item() - (total_ab / 18 + total_ba / 15)) < 1e-6


def test_parameter_counts_match_the_authors():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(I2PMAE(ModelConfig())) == 18_808_600                 # feat_dim 768 (torchvision ViT-B/16)
    assert count(I2PMAE(ModelConfig(feat_dim_2d=512))) == 17_622_808  # their CLIP width
    mn40 = ModelConfig(group_sizes=(48, 24, 24), local_radius=(0.24, 0.48, 0.96))
    assert count(Classifier(mn40, 40, 'mean+max')) == 12_830_056
    assert count(Classifier(mn40, 15, 'concat')) == 12_921_935
    assert count(Classifier(mn40, 40).encoder) == 12_653_632


def test_3nn_interpolation_is_exact_at_shared_centres_far_from_the_origin():
    """Every coarse centre is also a fine one: its weight must be ~1 however the cloud is placed.
    (|a|^2 - 2ab + |b|^2 cancels catastrophically when |a|^2 >> d: in fp32 300 units from the origin,
    as in TF32 matmuls near it; there it gives errors of order 1.)"""
    from model import interpolate_3nn
    generator = torch.Generator().manual_seed(0)
    fine = torch.rand(2, 40, 3, generator=generator) + 300.0
    coarse_xyz = fine[:, ::4]                                             # (2, 10, 3), each also a fine point
    coarse = torch.randn(2, 10, 5, generator=generator)
    out = interpolate_3nn(fine, coarse_xyz, coarse)
    assert torch.allclose(out[:, ::4], coarse, atol=1e-5)
    with torch.autocast('cpu', dtype=torch.bfloat16):                      # distances stay fp32
        assert torch.allclose(interpolate_3nn(fine, coarse_xyz, coarse)[:, ::4].float(), coarse, atol=1e-2)


def test_token_embedding_applies_the_concat_conv_in_halves_exactly_enough():
    """Convolving [max; member] equals the max half once per token plus the member half per member."""
    from model import TokenEmbed, init_encoder_weights
    torch.manual_seed(0)
    embed = TokenEmbed(3, 16, 32, 64, 24).apply(init_encoder_weights)
    members = torch.randn(2, 10, 8, 3, dtype=torch.float64) * 0.1
    embed = embed.double().train()
    x = embed.first_conv(members.reshape(20, 8, 3).transpose(1, 2))
    whole = embed.second_conv(torch.cat([x.max(2, keepdim=True).values.expand(-1, -1, 8), x], 1)).max(2).values
    assert torch.allclose(embed(members), whole.view(2, 10, 24), rtol=0, atol=1e-12)


def test_attention_bias_blocks_padding_or_far_centres():
    from model import attention_bias
    centers = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0], [0.0, 0, 0]]])     # token 2 is padding
    is_pad = torch.tensor([[False, False, True]])
    ours = attention_bias(is_pad, centers, 0.5)[0, 0] < 0
    assert ours.tolist() == [[False, True, True], [True, False, True], [True, True, True]]
    theirs = attention_bias(is_pad, centers, 0.5, radius_and_padding=True)[0, 0] < 0   # SPEC B5
    assert theirs.tolist() == [[False, False, False], [False, False, True], [False, True, False]]
    assert not (attention_bias(is_pad[:, :2], centers[:, :2], 0.0) < 0).any()


def record_pretrain(model):
    rec = Recorder()
    for i in range(len(model.encoder.blocks)):
        rec.output(model.encoder.token_embed[i], f'enc{i}.token_embed')
        rec.output(model.encoder.pos_embed[i], f'enc{i}.pos')
        rec.inputs(model.encoder.blocks[i][0], f'enc{i}.first_block')
        rec.output(model.encoder.blocks[i][-1], f'enc{i}.block_out')
    for j in range(len(model.decoder_blocks)):
        rec.output(model.decoder_pos_embed[j], f'dec{j}.pos')
        rec.inputs(model.decoder_blocks[j][0], f'dec{j}.first_block')
        rec.output(model.decoder_blocks[j][-1], f'dec{j}.block_out')
    for j, prop in enumerate(model.token_propagation):
        rec.inputs(prop, f'prop{j}.in')
        rec.output(prop, f'prop{j}.out')
    for name in ('decoder_norm', 'head_3d', 'head_2d'):
        rec.output(getattr(model, name), name)
    return rec


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_reference_pretrain_forward(pretrain_reference, mode):
    ref, t = pretrain_reference, pretrain_reference['t']
    model = reference_student(ref).train(mode == 'train')
    rec = record_pretrain(model)
    loss_3d, loss_2d = model.pretrain_losses(ref['groups'], ref['masks'], ref['target_2d'][~ref['masks'][1]])
    state = {k: v.clone() for k, v in model.state_dict().items()}   # BatchNorm statistics after one forward
    v, p = rec.values, mode + '.'
    for i in range(len(ref['groups'])):
        valid = t[p + f'enc{i}.valid']
        x_in, bias = v[f'enc{i}.first_block']
        assert_close(v[f'enc{i}.token_embed'], t[p + f'enc{i}.token_embed'], f'enc{i}.token_embed')
        assert_close(v[f'enc{i}.pos'], t[p + f'enc{i}.pos'], f'enc{i}.pos')
        assert_close(x_in, t[p + f'enc{i}.block_in'] + t[p + f'enc{i}.pos'], f'enc{i}.block_in + pos')
        blocked = torch.zeros_like(t[p + f'enc{i}.attn_mask']) if bias is None else bias[:, 0] / -1e5   # None: nothing blocked
        assert_close(blocked, t[p + f'enc{i}.attn_mask'], f'enc{i}.attn_mask')
        assert_close(v[f'enc{i}.block_out'][valid], t[p + f'enc{i}.block_out'][valid], f'enc{i}.block_out')
    encoded = model.encode(ref['groups'], ref['masks'])
    for i, e in enumerate(encoded):
        valid = t[p + f'enc{i}.valid']
        assert_close(~e.is_pad, valid, f'enc{i}.valid')
        assert_close(e.x[valid], t[p + f'enc{i}.out'][valid], f'enc{i}.out')
    for j in range(len(model.decoder_blocks)):
        assert_close(v[f'dec{j}.pos'], t[p + f'dec{j}.pos'], f'dec{j}.pos')
        assert_close(v[f'dec{j}.first_block'][0], t[p + f'dec{j}.block_in'] + t[p + f'dec{j}.pos'], f'dec{j}.block_in + pos')
        assert_close(v[f'dec{j}.block_out'], t[p + f'dec{j}.block_out'], f'dec{j}.block_out')
    fine_xyz, coarse_xyz, skip, coarse = v['prop0.in']
    assert_close(coarse_xyz, t[p + 'prop0.xyz_known'], 'prop0.xyz_known')
    assert_close(skip, t[p + 'prop0.points1'], 'prop0.points1')
    assert_close(coarse, t[p + 'prop0.points2'], 'prop0.points2')
    assert_close(v['prop0.out'], t[p + 'prop0.out'], 'prop0.out')
    assert_close(v['decoder_norm'], t[p + 'dec_out'], 'dec_out')
    K = ref['cfg'].group_sizes[1]
    assert_close(v['head_3d'].view(-1, K, 3), t[p + 'rec_3d'], 'rec_3d')
    assert_close(ref['groups'][1].relative[ref['masks'][1]], t[p + 'gt_3d'], 'gt_3d')
    assert_close(v['head_2d'].view(-1, K, t[p + 'rec_2d'].shape[-1]), t[p + 'rec_2d'], 'rec_2d')
    assert_close(loss_3d, t[p + 'loss_3d'], 'loss_3d')
    assert_close(loss_2d, t[p + 'loss_2d'], 'loss_2d')
    if mode == 'train':   # one forward moved every BatchNorm's running statistics like theirs
        stats = [k for k in t if k.startswith('train.bn_after.')]
        assert stats
        for key in stats:
            assert_close(state[official_to_ours(key[len('train.bn_after.'):])], t[key], key)


def test_reference_svm_features(pretrain_reference):
    ref, t = pretrain_reference, pretrain_reference['t']
    model = reference_student(ref).eval()
    feat = model.svm_features(t['points'])
    assert_close(feat, t['svm.feat'], 'svm.feat')
    groups = ref['groups']
    masks = hierarchical_masks(torch.zeros_like(t['mask_top']), groups)
    for i, (mask, e) in enumerate(zip(masks, model.encode(groups, masks))):
        valid = t[f'svm.enc{i}.valid']
        assert_close(mask, t[f'svm.masks.scale{i}'], f'svm.masks.scale{i}')
        assert_close(~e.is_pad, valid, f'svm.enc{i}.valid')
        assert_close(e.x[valid], t[f'svm.enc{i}.out'][valid], f'svm.enc{i}.out')


@pytest.mark.parametrize('dataset', ['modelnet40', 'scanobjectnn'])
def test_reference_classifier(dataset):
    case = load_reference(f'finetune_{dataset}_case.pt')
    t, c = case['tensors'], case['config']
    cfg = reference_config(c)
    model = Classifier(cfg, c['num_classes'], 'concat' if 'concat' in c['pooling'] else 'mean+max')
    state = load_reference(f'finetune_{dataset}_weights.pt')['state_dict']
    assert load_official_checkpoint(model, {'base_model': state}) == {}
    model.eval()
    rec = Recorder()
    for i in range(len(cfg.num_groups)):
        rec.output(model.encoder.token_embed[i], f'enc{i}.token_embed')
        rec.output(model.encoder.pos_embed[i], f'enc{i}.pos')
        rec.inputs(model.encoder.blocks[i][0], f'enc{i}.first_block')
        rec.output(model.encoder.blocks[i][-1], f'enc{i}.block_out')
    rec.output(model.norm, 'norm_out')
    rec.output(model.cls_head[0], 'head_in')
    rec.inputs(model.cls_head, 'pooled')
    logits = model(t['points'])
    v = rec.values
    n_in = t['points'].shape[1]
    for i, group in enumerate(build_token_hierarchy(t['points'], cfg.num_groups, cfg.group_sizes)):
        assert_close(flat_idx(group, n_in), t[f'g{i}.idx'], f'g{i}.idx')
        n_in = cfg.num_groups[i]
        x_in, bias = v[f'enc{i}.first_block']
        assert_close(v[f'enc{i}.token_embed'], t[f'enc{i}.token_embed'], f'enc{i}.token_embed')
        assert_close(v[f'enc{i}.pos'], t[f'enc{i}.pos'], f'enc{i}.pos')
        assert_close(x_in, t[f'enc{i}.block_in'] + t[f'enc{i}.pos'], f'enc{i}.block_in + pos')
        assert_close(bias[:, 0] < 0, t[f'enc{i}.radius_mask'], f'enc{i}.radius_mask')
        assert_close(v[f'enc{i}.block_out'], t[f'enc{i}.block_out'], f'enc{i}.block_out')
    assert_close(v['norm_out'], t['norm_out'], 'norm_out')
    assert_close(v['pooled'][0], t['pooled'], 'pooled')
    assert_close(logits, t['logits'], 'logits')


def official_state_dict(listing, prefix='module.'):
    """A state_dict in the authors' layout from a key listing, each tensor filled with its own number."""
    state = {}
    for n, line in enumerate(open(os.path.join(REFERENCE_DIR, listing))):
        name, shape, dtype = line.rstrip('\n').split('\t')
        shape = tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
        state[prefix + name] = torch.full(shape, float(n), dtype=getattr(torch, dtype.replace('torch.', '')))
    return state


def test_official_pretrain_checkpoint_loads_with_report():
    state = official_state_dict('official_keys_pretrain.txt')
    state['module.clip_model.visual.proj'] = torch.zeros(768, 512, dtype=torch.float16)
    model = I2PMAE(ModelConfig())                            # 768-wide 2D head: theirs is 512-wide
    skipped = load_official_checkpoint(model, {'base_model': state, 'epoch': 300})
    assert set(skipped) == {'module.clip_model.visual.proj', 'module.rec_head_2d.weight', 'module.rec_head_2d.bias'}
    assert 'depends on the teacher' in skipped['module.rec_head_2d.weight']
    ours = model.state_dict()
    for key, value in state.items():
        if key not in skipped:   # every other tensor arrived, by value
            name = official_to_ours(key)
            assert torch.equal(ours[name], value.reshape(ours[name].shape).to(ours[name].dtype)), key


def test_official_checkpoints_load_into_classifiers():
    for listing, classes, pooling in (('official_keys_finetune_modelnet40.txt', 40, 'mean+max'),
                                      ('official_keys_finetune_scanobjectnn.txt', 15, 'concat')):
        cfg = ModelConfig(group_sizes=(32, 16, 16))
        assert load_official_checkpoint(Classifier(cfg, classes, pooling), official_state_dict(listing, '')) == {}
    # a pre-training file fine-tunes: encoder loads, their decoder is skipped, our head is new
    model = Classifier(ModelConfig(), 40)
    skipped = load_official_checkpoint(model, {'base_model': official_state_dict('official_keys_pretrain.txt')})
    assert any(k.startswith('module.h_decoder') for k in skipped) and 'cls_head.0.weight' in skipped
    assert not any('h_encoder.token_embed' in k or 'encoder_blocks' in k for k in skipped)


def test_official_checkpoint_mismatch_fails_loudly():
    state = official_state_dict('official_keys_pretrain.txt')
    del state['module.h_encoder.encoder_blocks.0.blocks.0.attn.qkv.weight']
    state['module.h_encoder.extra.weight'] = torch.zeros(1)
    with pytest.raises(ValueError, match=r'(?s)unexpected key module.h_encoder.extra.weight.*'
                                         r'missing key encoder.blocks.0.0.attn.qkv.weight'):
        load_official_checkpoint(I2PMAE(ModelConfig()), {'base_model': state})
    with pytest.raises(ValueError, match='shape of'):
        load_official_checkpoint(I2PMAE(ModelConfig(encoder_dims=(96, 192, 256))),
                                 {'base_model': official_state_dict('official_keys_pretrain.txt')})


@pytest.mark.parametrize('stage, extra, picture, rows, cols', [
    ('tokenizer', [], 'tokenizer.png', 4, 3), ('project', [], 'project.png', 4, 3),
    ('teacher', ['random'], 'teacher.png', 3, 2), ('mask', [], 'mask.png', 2, 3),
    ('model', [], 'model.png', 2, 3), ('data', [], 'synthetic_classes.png', 2, 7)])
def test_stage_demo_writes_its_picture(tmp_path, stage, extra, picture, rows, cols):
    import subprocess
    from torchvision.io import read_image
    done = subprocess.run([sys.executable, os.path.join(HERE, f'{stage}.py')] + extra, cwd=tmp_path,
                          env={**os.environ, 'PYTHONPATH': HERE}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    image = read_image(str(tmp_path / 'runs' / 'demo' / picture))
    assert tuple(image.shape[1:]) == (rows * 228 + 4, cols * 228 + 4)   # 224-pixel tiles, 4-pixel padding
    assert image.float().std() > 0       # not a blank picture


def test_a_copy_of_the_repository_alone_passes_its_reference_tests(tmp_path):
    """What a fresh clone holds (git's tracked and unignored files), with no sibling folders, is enough."""
    import shutil
    import subprocess
    listed = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'], cwd=HERE,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip('not a git checkout: nothing tells which files a clone holds')
    clone = tmp_path / 'lonely' / 'i2p-mae'     # nothing beside it: no ../shared
    for name in listed.stdout.split():
        os.makedirs(clone / os.path.dirname(name), exist_ok=True)
        shutil.copy(os.path.join(HERE, name), clone / name)
    env = {k: v for k, v in os.environ.items() if k != 'I2P_REFERENCE_DIR'}
    done = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'test_all.py',
                           '-k', 'reference and not copy_of_the_repository'],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert ' passed' in done.stdout and 'skipped' not in done.stdout, done.stdout[-500:]


def test_no_top_level_file_shadows_stdlib():
    names = {f[:-3] for f in os.listdir(HERE) if f.endswith('.py')}
    assert not names & set(sys.stdlib_module_names), names & set(sys.stdlib_module_names)


# ---------------------------------------------------------------- data.py


def _unit_sphere_np(xyz):
    centred = xyz - xyz.mean(axis=-2, keepdims=True)
    return centred / np.linalg.norm(centred, axis=-1).max(axis=-1)[..., None, None]


def _write_h5(path, points, labels, **extra):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, 'w') as f:
        f['data'], f['label'] = points, labels
        for key, value in extra.items():
            f[key] = value


def test_shapenet_reader_reads_npy_list_and_normalises(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / 'ShapeNet55-34'
    (root / 'shapenet_pc').mkdir(parents=True)
    (root / 'ShapeNet-55').mkdir()
    names = ['02691156-aaa.npy', '03001627-bbb.npy', '04379243-ccc.npy']
    clouds = [rng.normal(size=(100, 3)) * [1, 2, 3] + 5 for _ in names]   # float64, off-centre
    for name, cloud in zip(names, clouds):
        np.save(root / 'shapenet_pc' / name, cloud)
    (root / 'ShapeNet-55' / 'train.txt').write_text('\n'.join(names) + '\n')
    split = data.load_split('shapenet', 'train', data_root=str(tmp_path), num_points=64, seed=7)
    assert split.points.shape == (3, 64, 3) and split.points.dtype == torch.float32
    assert split.labels is None and split.class_names == []
    # documented sampling: per file, in list order, a seeded shuffle, then the first 64, then normalise
    order = np.random.default_rng(7)
    expected = np.stack([_unit_sphere_np(c[order.permutation(100)[:64]]) for c in clouds])
    np.testing.assert_allclose(split.points.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(split.points.norm(dim=-1).amax(dim=1).numpy(), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match='fewer than the 128'):
        data.load_split('shapenet', 'train', data_root=str(tmp_path), num_points=128)
    (root / 'ShapeNet-55' / 'test.txt').write_text('\n')
    with pytest.raises(ValueError, match='empty'):
        data.load_split('shapenet', 'test', data_root=str(tmp_path))


def write_shapenet(root, names, num_points=100, seed=0):
    rng = np.random.default_rng(seed)
    (root / 'ShapeNet55-34' / 'shapenet_pc').mkdir(parents=True, exist_ok=True)
    (root / 'ShapeNet55-34' / 'ShapeNet-55').mkdir(exist_ok=True)
    for name in names:
        np.save(root / 'ShapeNet55-34' / 'shapenet_pc' / name, rng.normal(size=(num_points, 3)).astype(np.float32))
    (root / 'ShapeNet55-34' / 'ShapeNet-55' / 'train.txt').write_text('\n'.join(names) + '\n')


def test_shapenet_is_read_once_into_one_memory_mapped_array(tmp_path, monkeypatch):
    names = [f'02691156-{i:03d}.npy' for i in range(5)]
    write_shapenet(tmp_path, names)
    first = data.load_split('shapenet', 'train', data_root=str(tmp_path), num_points=64, seed=3)
    folder = tmp_path / 'ShapeNet55-34'
    written = sorted(p.name for p in folder.iterdir() if p.is_file())
    assert len(written) == 1 and written[0].startswith('shapenet55_train_64pts_seed3_') and written[0].endswith('.npy')
    monkeypatch.setattr(data, 'read_npy', lambda *a: pytest.fail('read a shape file again'))
    again = data.load_split('shapenet', 'train', data_root=str(tmp_path), num_points=64, seed=3)
    assert torch.equal(again.points, first.points)                       # the same tensor, bit for bit
    if os.path.exists('/proc/self/maps'):                                # mapped, not read into this process
        assert str(folder / written[0]) in open('/proc/self/maps').read()
    monkeypatch.undo()
    (folder / 'ShapeNet-55' / 'train.txt').write_text('\n'.join(names[:4]) + '\n')   # another list: another file
    assert len(data.load_split('shapenet', 'train', data_root=str(tmp_path), num_points=64, seed=3).points) == 4
    assert len([p for p in folder.iterdir() if p.suffix == '.npy']) == 2
    assert not [p for p in folder.iterdir() if p.name.endswith('.tmp')]


def test_modelnet40_dat_reader_drops_normals(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / 'ModelNet' / 'modelnet40_normal_resampled'
    folder.mkdir(parents=True)
    clouds = [np.concatenate([rng.normal(size=(200, 3)) + 3, np.full((200, 3), 100.0)], 1).astype(np.float32)
              for _ in range(4)]                                     # xyz + (absurd) normals
    labels = [np.array([k], np.int32) for k in (0, 7, 39, 7)]
    with open(folder / 'modelnet40_test_8192pts_fps.dat', 'wb') as f:
        pickle.dump([clouds, labels], f)
    (folder / 'modelnet40_shape_names.txt').write_text('\n'.join(data.MODELNET40_CLASSES) + '\n')
    split = data.load_split('modelnet40', 'test', data_root=str(tmp_path))
    assert split.points.shape == (4, 200, 3) and split.points.dtype == torch.float32
    np.testing.assert_allclose(split.points.numpy(), _unit_sphere_np(np.stack(clouds)[..., :3]), atol=1e-5)
    assert split.labels.tolist() == [0, 7, 39, 7] and split.labels.dtype == torch.int64
    assert split.class_names[7] == 'car' and len(split.class_names) == 40
    first = data.load_split('modelnet40', 'test', data_root=str(tmp_path), num_points=50)
    np.testing.assert_allclose(first.points.numpy(), _unit_sphere_np(np.stack(clouds)[:, :50, :3]), atol=1e-5)


def test_modelnet40_class_names_file_must_match_standard_order(tmp_path):
    folder = tmp_path / 'ModelNet' / 'modelnet40_normal_resampled'
    folder.mkdir(parents=True)
    with open(folder / 'modelnet40_train_8192pts_fps.dat', 'wb') as f:
        pickle.dump([[np.zeros((8, 6), np.float32) + np.arange(8)[:, None]], [np.array([0])]], f)
    (folder / 'modelnet40_shape_names.txt').write_text('\n'.join(sorted(data.MODELNET40_CLASSES, reverse=True)))
    with pytest.raises(ValueError, match='modelnet40_shape_names.txt'):
        data.load_split('modelnet40', 'train', data_root=str(tmp_path))


def test_h5_reader_keeps_first_1024_points(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / 'modelnet40_ply_hdf5_2048'
    parts = [rng.normal(size=(n, 2048, 3)).astype(np.float32) for n in (3, 2)]
    labels = [np.array([[5], [0], [39]], np.uint8), np.array([[12], [33]], np.uint8)]
    for i, (points, label) in enumerate(zip(parts, labels)):       # files found by glob, read in sorted order
        _write_h5(str(folder / f'ply_data_train{i}.h5'), points, label, normal=np.zeros_like(points))
    _write_h5(str(folder / 'ply_data_test0.h5'), parts[1], labels[1])
    split = data.load_split('modelnet40_svm', 'train', data_root=str(tmp_path))
    assert split.points.shape == (5, 1024, 3) and split.points.dtype == torch.float32
    assert torch.equal(split.points, torch.from_numpy(np.concatenate(parts)[:, :1024]))   # not re-normalised
    assert split.labels.tolist() == [5, 0, 39, 12, 33] and split.labels.dtype == torch.int64
    assert split.class_names == data.MODELNET40_CLASSES
    assert len(data.load_split('modelnet40_svm', 'test', data_root=str(tmp_path)).points) == 2


def test_scanobjectnn_three_splits(tmp_path):
    files = {('scan_objbg', 'train'): 'main_split/training_objectdataset.h5',
             ('scan_objbg', 'test'): 'main_split/test_objectdataset.h5',
             ('scan_objonly', 'train'): 'main_split_nobg/training_objectdataset.h5',
             ('scan_objonly', 'test'): 'main_split_nobg/test_objectdataset.h5',
             ('scan_hardest', 'train'): 'main_split/training_objectdataset_augmentedrot_scale75.h5',
             ('scan_hardest', 'test'): 'main_split/test_objectdataset_augmentedrot_scale75.h5'}
    for i, ((name, split), file) in enumerate(files.items()):      # each file holds i + 1 clouds of value i
        points = np.full((i + 1, 2048, 3), float(i), np.float32)
        _write_h5(str(tmp_path / 'ScanObjectNN' / file), points, np.arange(i + 1) % 15, mask=np.zeros((i + 1, 2048)))
    for i, (name, split) in enumerate(files):
        loaded = data.load_split(name, split, data_root=str(tmp_path))
        assert loaded.points.shape == (i + 1, 2048, 3) and loaded.points.dtype == torch.float32
        assert torch.all(loaded.points == i), f'{name}/{split} read the wrong file'
        assert loaded.labels.tolist() == list(np.arange(i + 1) % 15)
        assert loaded.class_names == data.SCANOBJECTNN_CLASSES and len(loaded.class_names) == 15
    assert data.load_split('scan_objbg', 'train', data_root=str(tmp_path), num_points=1000).points.shape == (1, 1000, 3)


def test_fewshot_fold_reader(tmp_path):
    rng = np.random.default_rng(3)
    class_ids = [8, 0, 33, 2, 7]                                   # chair, airplane, table, bed, car

    def items(per_class):
        return [(np.concatenate([rng.normal(size=(60, 3)) * 4, np.ones((60, 3))], 1).astype(np.float32), k, c)
                for k, c in enumerate(class_ids) for _ in range(per_class)]
    fold = {'train': items(2), 'test': items(3)}
    for folder in ('5way10shot', '10way_20shot'):                  # Point-BERT's and its loader's folder names
        (tmp_path / 'ModelNetFewshot' / folder).mkdir(parents=True)
        with open(tmp_path / 'ModelNetFewshot' / folder / '4.pkl', 'wb') as f:
            pickle.dump(fold, f)
    train, test = data.load_fewshot_fold(str(tmp_path), way=5, shot=10, fold=4)
    assert train.points.shape == (10, 60, 3) and test.points.shape == (15, 60, 3)
    np.testing.assert_allclose(train.points.numpy(), _unit_sphere_np(np.stack([p[:, :3] for p, _, _ in fold['train']])),
                               atol=1e-5)
    assert train.labels.tolist() == [k for k in range(5) for _ in range(2)]
    assert train.class_names == test.class_names == ['chair', 'airplane', 'table', 'bed', 'car']
    with pytest.raises(ValueError, match='outside 0..9|expected labels 0..9'):
        data.load_fewshot_fold(str(tmp_path), way=10, shot=20, fold=4)   # 5 classes in a 10-way file


@pytest.mark.parametrize('name, published', [('shapenet', 'Point-BERT'), ('modelnet40', 'Point-BERT'),
                                             ('modelnet40_svm', 'charlesq34/pointnet'),
                                             ('scan_objbg', 'hkust-vgd.github.io/scanobjectnn'),
                                             ('scan_objonly', 'scanobjectnn'), ('scan_hardest', 'scanobjectnn')])
def test_missing_dataset_names_path_and_layout(tmp_path, name, published):
    with pytest.raises(FileNotFoundError) as info:
        data.load_split(name, 'train', data_root=str(tmp_path / 'nowhere'))
    message = str(info.value)
    assert str(tmp_path / 'nowhere') in message and 'Expected under --data_root' in message
    assert published in message and 'Nothing is downloaded' in message
    with pytest.raises(FileNotFoundError, match='ModelNetFewshot.*5way10shot'):
        data.load_fewshot_fold(str(tmp_path), 5, 10, 0)
    with pytest.raises(ValueError, match='unknown dataset'):
        data.load_split('modelnet10', 'train')


def test_wrong_shape_file_names_file(tmp_path):
    path = tmp_path / 'ScanObjectNN' / 'main_split' / 'training_objectdataset.h5'
    _write_h5(str(path), np.zeros((4, 2048), np.float32), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r'training_objectdataset\.h5.*shape \(4, 2048\)'):
        data.load_split('scan_objbg', 'train', data_root=str(tmp_path))
    _write_h5(str(path), np.zeros((4, 2048, 3), np.int32), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r'training_objectdataset\.h5.*dtype int32'):
        data.load_split('scan_objbg', 'train', data_root=str(tmp_path))
    _write_h5(str(path), np.zeros((4, 2048, 3), np.float32), np.zeros(4, np.int64))
    with h5py.File(path, 'a') as f:
        del f['label']
    with pytest.raises(ValueError, match=r"training_objectdataset\.h5.*missing key.*'label'"):
        data.load_split('scan_objbg', 'train', data_root=str(tmp_path))
    path.write_bytes(b'not an hdf5 file')
    with pytest.raises(ValueError, match=r'training_objectdataset\.h5.*not a readable HDF5'):
        data.load_split('scan_objbg', 'train', data_root=str(tmp_path))
    with pytest.raises(ValueError, match='fewer than the 4096'):
        _write_h5(str(path), np.zeros((4, 2048, 3), np.float32), np.zeros(4, np.int64))
        data.load_split('scan_objbg', 'train', data_root=str(tmp_path), num_points=4096)


def test_label_out_of_range_is_an_error(tmp_path):
    path = tmp_path / 'ScanObjectNN' / 'main_split_nobg' / 'test_objectdataset.h5'
    _write_h5(str(path), np.zeros((3, 2048, 3), np.float32), np.array([0, 15, 3]))
    with pytest.raises(ValueError, match=r'test_objectdataset\.h5: label 15 is outside 0..14'):
        data.load_split('scan_objonly', 'test', data_root=str(tmp_path))
    _write_h5(str(path), np.zeros((3, 2048, 3), np.float32), np.array([0.0, 1.0, 3.0]))
    with pytest.raises(ValueError, match='integer labels'):
        data.load_split('scan_objonly', 'test', data_root=str(tmp_path))
    _write_h5(str(path), np.zeros((0, 2048, 3), np.float32), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match='empty'):
        data.load_split('scan_objonly', 'test', data_root=str(tmp_path))


def test_normalize_unit_sphere_matches_numpy():
    xyz = torch.randn(4, 30, 3, dtype=torch.float64) * 3 + 2
    np.testing.assert_allclose(data.normalize_unit_sphere(xyz).numpy(), _unit_sphere_np(xyz.numpy()), atol=1e-12)


def test_synthetic_is_deterministic_and_balanced():
    points, labels = data.make_synthetic(39, 128, seed=3)
    again, again_labels = data.make_synthetic(39, 128, seed=3)
    assert torch.equal(points, again) and torch.equal(labels, again_labels)
    assert not torch.equal(points, data.make_synthetic(39, 128, seed=4)[0])
    assert points.shape == (39, 128, 3) and points.dtype == torch.float32 and labels.dtype == torch.int64
    assert len(data.SYNTHETIC_CLASSES) >= 10
    assert labels.bincount(minlength=len(data.SYNTHETIC_CLASSES)).tolist() == [3] * 13
    pool = data.load_split('synthetic', 'pretrain', num_points=32)
    train = data.load_split('synthetic', 'train', num_points=32)
    assert pool.labels is None and pool.points.shape == (data.SYNTHETIC_SPLIT_SIZES['pretrain'], 32, 3)
    assert train.class_names == data.SYNTHETIC_CLASSES and len(train.labels) == data.SYNTHETIC_SPLIT_SIZES['train']
    assert not torch.equal(train.points[:10], data.load_split('synthetic', 'test', num_points=32).points[:10])


def test_synthetic_is_normalised():
    points, _ = data.make_synthetic(26, 256, seed=0)
    np.testing.assert_allclose(points.mean(dim=1).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(points.norm(dim=-1).amax(dim=1).numpy(), 1.0, atol=1e-5)


def test_synthetic_generation_speed_benchmark():
    import time
    start = time.perf_counter()
    points, _ = data.make_synthetic(1000, 2048, seed=0)
    print(f'\nmake_synthetic(1000, 2048): {time.perf_counter() - start:.2f} s on this machine')
    assert points.shape == (1000, 2048, 3)


def test_scale_and_translate_ranges():
    B = 2000
    xyz = torch.tensor([[0.0, 0, 0], [1, 1, 1]]).expand(B, 2, 3)  # the origin and (1, 1, 1)
    out = data.scale_and_translate(xyz, generator=torch.Generator().manual_seed(0))
    shift, scale = out[:, 0], out[:, 1] - out[:, 0]                # (B, 3) each
    assert scale.min() >= 2 / 3 and scale.max() <= 3 / 2 and scale.min() < 0.68 and scale.max() > 1.48
    assert shift.abs().max() <= 0.2 and shift.min() < -0.19 and shift.max() > 0.19
    assert (scale[:, 0] != scale[:, 1]).all() and (scale[0] != scale[1]).all()   # per axis, per sample
    same = data.scale_and_translate(xyz, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, same)
    flat = data.scale_and_translate(xyz, 0.9, 1.1, 0.0, generator=torch.Generator().manual_seed(0))
    assert torch.all(flat[:, 0] == 0) and flat[:, 1].min() >= 0.9 and flat[:, 1].max() <= 1.1


def test_rotation_is_about_y_and_one_angle_per_batch():
    xyz = torch.randn(6, 50, 3, dtype=torch.float64)
    out = data.rotate_about_up_axis(xyz, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[..., 1], xyz[..., 1])                                  # y untouched
    torch.testing.assert_close(out[..., [0, 2]].norm(dim=-1), xyz[..., [0, 2]].norm(dim=-1))
    turn = torch.atan2(out[..., 2], out[..., 0]) - torch.atan2(xyz[..., 2], xyz[..., 0])   # (6, 50)
    turn = torch.remainder(turn - turn[0, 0] + math.pi, 2 * math.pi) - math.pi            # relative to the first
    torch.testing.assert_close(turn, torch.zeros_like(turn))                     # one angle for everything
    angles = []
    generator = torch.Generator().manual_seed(1)
    for _ in range(400):
        p = data.rotate_about_up_axis(torch.tensor([[[1.0, 0, 0]]]), generator=generator)[0, 0]
        angles.append(math.atan2(p[2].item(), p[0].item()))
    assert min(angles) < -3.0 and max(angles) > 3.0                              # U(-pi, pi)


def test_random_subset_without_replacement():
    B, N = 64, 40
    ids = torch.arange(N, dtype=torch.float32)
    xyz = torch.stack([ids, 2 * ids, 3 * ids], -1).expand(B, N, 3)               # point i = (i, 2i, 3i)
    out = data.random_point_subset(xyz, 25, generator=torch.Generator().manual_seed(0))
    assert out.shape == (B, 25, 3)
    assert torch.equal(out[..., 1], 2 * out[..., 0]) and torch.equal(out[..., 2], 3 * out[..., 0])
    picked = out[..., 0].long()                                                    # (B, 25) point ids
    assert all(len(set(row.tolist())) == 25 for row in picked)                     # no id twice in a sample
    assert len({tuple(sorted(row.tolist())) for row in picked}) > B // 2          # a different subset per sample
    with pytest.raises(ValueError):
        data.random_point_subset(xyz, N + 1)


def test_fps_subsample_gathers_farthest_point_sample():
    tokenizer = pytest.importorskip('tokenizer')
    xyz = torch.randn(3, 100, 3)
    expected = torch.stack([xyz[b, tokenizer.farthest_point_sample(xyz, 16)[b]] for b in range(3)])
    assert torch.equal(data.fps_subsample(xyz, 16), expected)


def test_fps_pool_holds_official_fps_samplings_from_random_starts():
    """Each pooled sampling is FPS (from index 0) of a randomly shuffled cloud, as the official loader's."""
    points = torch.randn(5, 300, 3, generator=torch.Generator().manual_seed(0))
    pool = data.fps_pool(points, 40, pool_size=6, seed=1, batch_size=2)
    assert pool.shape == (5, 6, 40) and pool.dtype == torch.int16
    pool = pool.long()
    for s in range(5):
        for p in range(6):
            picked = pool[s, p]
            assert len(set(picked.tolist())) == 40
            # FPS from the sampling's own first point picks the same points (ties aside: none here)
            shuffled = torch.cat([points[s, picked[:1]], points[s]])             # start at that point
            again = farthest_point_sample(shuffled[None], 40)[0] - 1
            again[0] = picked[0]
            assert torch.equal(again, picked)
    assert len(set(pool[:, :, 0].flatten().tolist())) > 20                       # the starts differ
    assert torch.equal(pool, data.fps_pool(points, 40, pool_size=6, seed=1).long())   # seeded, batch size aside


def test_draw_from_fps_pool_picks_each_pooled_sampling_uniformly():
    points = torch.randn(2, 50, 3)
    pool = torch.stack([torch.arange(10) + 10 * p for p in range(4)])[None].expand(2, -1, -1)   # (2, 4, 10)
    g = torch.Generator().manual_seed(0)
    drawn = [data.draw_from_fps_pool(points, pool, generator=g) for _ in range(2000)]
    which = torch.stack([torch.cdist(d[:, :1], points).argmin(-1)[:, 0] // 10 for d in drawn])   # (2000, 2)
    assert torch.equal(drawn[0][1], points[1, pool[1, which[0, 1]]])
    counts = torch.bincount(which.flatten(), minlength=4).float() / which.numel()
    assert (counts - 0.25).abs().max() < 0.03


# ---------------------------------------------------------------- pretrain.py
import json
import subprocess

import pretrain
from pretrain import cosine_lr, param_groups, parse_args, pretrain_step

PRETRAIN_FLAGS = ['--config', 'small', '--num_points', '256', '--batch_size', '8', '--teacher_weights', 'random',
        '--small_random_teacher', '--log_every', '1', '--gpu', '-1']


def tiny_student_and_teacher(feat_dim=32):
    cfg = ModelConfig(num_groups=(32, 16, 8), group_sizes=(8, 4, 4), encoder_dims=(16, 32, 64),
                      encoder_depths=(1, 1, 1), num_heads=2, decoder_dims=(64, 32), drop_path_rate=0.0,
                      point_embed_dims=(8, 16, 32), feat_dim_2d=feat_dim)
    return I2PMAE(cfg), tiny_teacher(hidden_dim=feat_dim)


def run_losses(args, steps, seed=0, batch=None):
    torch.manual_seed(seed)
    student, teacher = tiny_student_and_teacher()
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3)
    xyz = batch if batch is not None else torch.rand(4, 128, 3, generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(steps):
        loss_3d, loss_2d = pretrain_step(student, teacher, xyz, args)
        optimizer.zero_grad()
        (loss_3d + loss_2d).backward()
        optimizer.step()
        losses.append((loss_3d.item(), loss_2d.item()))
    return losses


def test_pretrain_step_overfits_one_batch():
    losses = run_losses(parse_args(['--data', 'shapenet']), steps=40)
    (first_3d, first_2d), (last_3d, last_2d) = losses[0], losses[-1]
    assert last_3d < 0.5 * first_3d and last_2d < 0.5 * first_2d, losses[::10]


def test_same_seed_same_loss_on_cpu():
    args = parse_args(['--data', 'shapenet'])
    assert run_losses(args, 2, seed=3) == run_losses(args, 2, seed=3)
    assert run_losses(args, 2, seed=3) != run_losses(args, 2, seed=4)


def test_ablations_run_without_teacher_parts():
    args = parse_args(['--data', 'shapenet', '--mask', 'random', '--no_2d_target'])
    teacher = None     # neither the mask nor a target needs the teacher: it is never called
    student, _ = tiny_student_and_teacher()
    loss_3d, loss_2d = pretrain_step(student, teacher, torch.rand(2, 128, 3), args)
    assert loss_3d > 0 and loss_2d == 0


def test_one_view_ablation_predicts_one_view_of_features():
    args = parse_args(['--data', 'shapenet', '--views', '1'])
    cfg = ModelConfig(num_groups=(32, 16, 8), group_sizes=(8, 4, 4), encoder_dims=(16, 32, 64), encoder_depths=(1, 1, 1),
                      num_heads=2, decoder_dims=(64, 32), point_embed_dims=(8, 16, 32), feat_dim_2d=32, num_views=1)
    student = I2PMAE(cfg)
    assert student.head_2d.out_features == 4 * 1 * 32
    loss_3d, loss_2d = pretrain_step(student, tiny_teacher(hidden_dim=32), torch.rand(2, 128, 3), args)
    assert loss_3d > 0 and loss_2d > 0


def test_visible_targets_equal_reading_every_token_then_selecting(pretrain_reference):
    ref = pretrain_reference
    targets = pretrain.visible_targets(ref['groups'][1], ref['masks'][1], ref['geometry'],
                                       ref['t']['teacher.feats'], ref['img_size'])
    assert torch.allclose(targets, ref['target_2d'][~ref['masks'][1]], atol=1e-6)


def test_synthetic_demo_presets_fill_only_unset_flags():
    demo, paper = parse_args([]), parse_args(['--data', 'shapenet'])
    assert demo.config == 'small' and demo.epochs == pretrain.SYNTHETIC_DEMO['epochs']
    assert parse_args(['--epochs', '3']).epochs == 3
    assert parse_args(['--no-small_random_teacher']).small_random_teacher is False
    assert (paper.config, paper.epochs, paper.batch_size, paper.lr, paper.mask_ratio, paper.num_points) == \
        ('full', 300, 64, 1e-3, 0.8, 2048)


def test_cosine_lr_warms_up_then_decays():
    args = parse_args(['--data', 'shapenet'])
    assert cosine_lr(0, args) == args.min_lr
    official = lambda t: 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + np.cos(np.pi * t / 400))
    assert cosine_lr(args.warmup_epochs / 2, args) == pytest.approx((1e-6 + 1e-3) / 2)
    assert cosine_lr(args.warmup_epochs, args) == pytest.approx(official(10))   # timm: cosine counts from 0
    assert cosine_lr(args.cosine_epochs, args) == pytest.approx(args.min_lr)
    # the official schedule: cosine over 400 epochs, so epoch 300 is still at about 1.5e-4
    assert cosine_lr(300, args) == pytest.approx(official(300))


def test_no_weight_decay_on_biases_norms_and_token_parameters():
    student, _ = tiny_student_and_teacher()
    decay, no_decay = param_groups(student, 0.05)
    names = {id(p): n for n, p in student.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay['params']}
    assert 'mask_token' in no_decay_names and 'encoder.token_embed.0.first_conv.0.weight' in no_decay_names
    assert 'token_propagation.0.fuse.0.weight' in no_decay_names          # 'token' in the name, as theirs
    assert 'encoder.blocks.0.0.attn.qkv.weight' in {names[id(p)] for p in decay['params']}
    assert not any(n.endswith('.bias') for n in {names[id(p)] for p in decay['params']})


def read_log(folder):
    return [json.loads(line) for line in open(os.path.join(folder, 'log.jsonl'))]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = PRETRAIN_FLAGS + ['--epochs', '2', '--max_steps_per_epoch', '2']
    pretrain.main(parse_args(common + ['--run_name', 'straight']))
    pretrain.main(parse_args(common + ['--run_name', 'cut', '--epochs', '1']))
    # the cut run stopped after epoch 0; resuming it with --epochs 2 must retrace the straight run
    pretrain.main(parse_args(common + ['--run_name', 'cut', '--resume', 'runs/cut/last.pt']))
    straight = [r for r in read_log('runs/straight') if 'step' in r]
    cut = [r for r in read_log('runs/cut') if 'step' in r]
    assert [(r['epoch'], r['step'], r['loss_3d'], r['loss_2d']) for r in straight] == \
           [(r['epoch'], r['step'], r['loss_3d'], r['loss_2d']) for r in cut]
    summaries = [r for r in read_log('runs/straight') if 'mean_loss_3d' in r]
    assert summaries[-1]['mean_loss_3d'] < summaries[0]['mean_loss_3d']    # a few steps already help
    # the checkpoint: student only, loads strictly into the SVM and fine-tuning encoders
    checkpoint = torch.load('runs/straight/last.pt', weights_only=False)
    assert not any(k.startswith(('teacher', 'vit', 'clip')) for k in checkpoint['model'])
    assert checkpoint['epoch'] == 2 and checkpoint['model_config']['feat_dim_2d'] == 64
    cfg = ModelConfig(**checkpoint['model_config'])
    I2PMAE(cfg).load_state_dict(checkpoint['model'], strict=True)
    encoder = {k[len('encoder.'):]: v for k, v in checkpoint['model'].items() if k.startswith('encoder.')}
    Classifier(cfg, 13).encoder.load_state_dict(encoder, strict=True)
    # an incompatible configuration is refused, naming what differs
    with pytest.raises(SystemExit, match='encoder_dims'):
        pretrain.main(parse_args(PRETRAIN_FLAGS + ['--config', 'full', '--run_name', 'cut', '--resume', 'runs/cut/last.pt']))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse_args(PRETRAIN_FLAGS + ['--epochs', '1', '--max_steps_per_epoch', '1', '--run_name', 'nan'])
    pretrain.main(args)
    good = torch.load('runs/nan/last.pt', weights_only=False)

    def exploding_step(*a, **k):
        loss = torch.tensor(float('nan'), requires_grad=True)
        return loss, loss
    monkeypatch.setattr(pretrain, 'pretrain_step', exploding_step)
    with pytest.raises(FloatingPointError, match='non-finite loss'):
        pretrain.main(parse_args(PRETRAIN_FLAGS + ['--epochs', '2', '--max_steps_per_epoch', '1', '--run_name', 'nan',
                                         '--resume', 'runs/nan/last.pt']))
    kept = torch.load('runs/nan/last.pt', weights_only=False)
    assert kept['epoch'] == good['epoch'] and all(torch.equal(kept['model'][k], v) for k, v in good['model'].items())


def test_ctrl_c_saves_where_to_continue(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_step, calls = pretrain.pretrain_step, []

    def interrupted_second_step(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step(*a, **k)
    monkeypatch.setattr(pretrain, 'pretrain_step', interrupted_second_step)
    with pytest.raises(SystemExit):
        pretrain.main(parse_args(PRETRAIN_FLAGS + ['--epochs', '1', '--max_steps_per_epoch', '3', '--run_name', 'cc']))
    saved = torch.load('runs/cc/last.pt', weights_only=False)
    assert (saved['epoch'], saved['step_in_epoch']) == (0, 1)        # one step done, the second to redo


def test_ddp_two_cpu_processes_agree_on_the_weights(tmp_path):
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29533',
               os.path.join(HERE, 'pretrain.py')] + PRETRAIN_FLAGS + ['--epochs', '1', '--max_steps_per_epoch', '2',
                                                            '--run_name', 'ddp']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': HERE}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert 'weights identical on all 2 ranks' in done.stdout
    assert 'total batch 8 (4 per process)' in done.stdout
    assert os.path.exists(tmp_path / 'runs' / 'ddp' / 'last.pt')


def test_benchmark_prints_a_stage_table(capsys):
    pretrain.main(parse_args(PRETRAIN_FLAGS + ['--benchmark', '--benchmark_steps', '1']))
    out = capsys.readouterr().out
    for stage in ('tokenize', 'project', 'teacher', 'mask', 'student forward', 'backward', 'optimizer', 'samples/s',
                  'ATen ops', 'syncs', 'FPS loop'):
        assert stage in out
    step_row = next(line for line in out.splitlines() if line.startswith('step w/o teacher')).split()
    assert int(step_row[-1]) == 1                                       # the visible-count read


def test_pretrain_step_waits_for_the_device_once():
    """One read per step (the visible-token counts); the old step made ~28 (checks, packing, indexing)."""
    from benchmark import SyncCounter
    student, teacher = tiny_student_and_teacher()
    for flags in ([], ['--mask', 'random'], ['--no_2d_target']):
        with SyncCounter() as syncs:
            loss_3d, loss_2d = pretrain_step(student, teacher, torch.rand(3, 128, 3), parse_args(['--data', 'shapenet'] + flags))
            (loss_3d + loss_2d).backward()
        assert dict(syncs.calls) == {'tolist': 1}, flags


def test_benchmark_svm_and_fps_modes_print_their_numbers(capsys, monkeypatch):
    import benchmark
    monkeypatch.setattr(sys, 'argv', ['benchmark.py', 'svm', '--config', 'small', '--batch_size', '2',
                                      '--num_points', '256', '--steps', '1', '--gpu', '-1'])
    benchmark.main()
    monkeypatch.setattr(sys, 'argv', ['benchmark.py', 'fps', '--batch_size', '2', '--num_points', '300',
                                      '--samples', '40', '--pool_size', '2', '--steps', '1', '--gpu', '-1'])
    benchmark.main()
    out = capsys.readouterr().out
    assert 'shapes/s' in out and 'syncs per batch' in out and 'draw from the pool' in out


# ---------------------------------------------------------------- svm_eval.py and finetune.py
import signal
from dataclasses import replace

from sklearn.svm import SVC

import finetune
import svm_eval
from data import PointSplit, load_split, random_point_subset, scale_and_translate

# tiny enough for a CPU test; the same architecture as the paper's, fewer and narrower tokens
TINY = ModelConfig(num_groups=(32, 16, 8), group_sizes=(8, 4, 4), encoder_dims=(16, 32, 64), encoder_depths=(1, 1, 1),
                   num_heads=2, decoder_dims=(64, 32), feat_dim_2d=0, point_embed_dims=(8, 16, 32))
TINY_FLAGS = ['--points', '48', '--train_fps', '56', '--group_sizes', '8', '4', '4', '--gpu', '-1']


@pytest.fixture(scope='module')
def pretrain_checkpoint(tmp_path_factory):
    """A pretrain.py-format checkpoint of a TINY I2PMAE whose every tensor differs from a fresh init."""
    torch.manual_seed(0)
    student = I2PMAE(TINY)
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v + 3 for k, v in student.state_dict().items()}
    state = {k: v.abs() if k.endswith('running_var') else v for k, v in state.items()}
    path = str(tmp_path_factory.mktemp('pretrain') / 'last.pt')
    torch.save(dict(model=state, model_config=asdict(TINY), args={'data': 'synthetic'}, optimizer={}, epoch=1,
                    step_in_epoch=0, rng=None, teacher='none'), path)
    return path


@pytest.fixture(scope='module')
def small_synthetic():
    """Four synthetic classes, 64 points per cloud: 96 training and 32 test shapes."""
    data = load_split('synthetic', 'test', num_points=64)
    keep = (data.labels < 4).nonzero()[:, 0]
    return (PointSplit(data.points[keep[:96]], data.labels[keep[:96]], data.class_names[:4]),
            PointSplit(data.points[keep[96:128]], data.labels[keep[96:128]], data.class_names[:4]))


def test_finetune_loads_every_pretrained_encoder_tensor_and_learns(pretrain_checkpoint, small_synthetic, tmp_path):
    args = finetune.parse_args(['--ckpt', pretrain_checkpoint, *TINY_FLAGS, '--points', '64', '--train_fps', '0',
                                '--epochs', '12', '--warmup_epochs', '0', '--lr', '1e-3', '--batch_size', '16',
                                '--val_fraction', '0', '--test_every', '100'])
    args.amp = False
    torch.manual_seed(0)
    classifier, described = finetune.build_classifier(args, num_classes=4)
    saved = torch.load(pretrain_checkpoint, weights_only=False)['model']
    encoder_keys = [k for k in saved if k.startswith('encoder.')]
    loaded = classifier.encoder.state_dict()
    assert len(loaded) == len(encoder_keys) > 0
    for key in encoder_keys:   # by value: every tensor, BatchNorm statistics included
        assert torch.equal(loaded[key[len('encoder.'):]], saved[key]), key
    assert classifier.cfg.group_sizes == (8, 4, 4) and classifier.cfg.encoder_dims == TINY.encoder_dims
    train, test = small_synthetic
    result = finetune.finetune(classifier, train, test, args, torch.device('cpu'), 0, 1, lambda *a, **k: None,
                               str(tmp_path))
    accuracy = [h['train_accuracy'] for h in result['history']]
    assert np.mean(accuracy[-2:]) > accuracy[0] + 15, accuracy
    assert result['test_accuracy'] == result['history'][-1]['test_accuracy']   # the final epoch, not the best
    assert os.path.exists(tmp_path / 'last.pt')


def test_ctrl_c_saves_and_resume_continues_exactly(small_synthetic, tmp_path, monkeypatch):
    train, test = small_synthetic
    args = finetune.parse_args([*TINY_FLAGS, '--epochs', '2', '--batch_size', '16', '--val_fraction', '0.25'])
    args.amp, silent = False, lambda *a, **k: None

    def run(folder, resume=None):
        torch.manual_seed(0)
        classifier = (finetune.build_classifier(args, 4, resume)[0] if resume
                      else Classifier(replace(TINY, local_radius=args.local_radius), 4))   # as build_classifier
        result = finetune.finetune(classifier, train, test, args, torch.device('cpu'), 0, 1, silent, str(folder), resume)
        return classifier.state_dict(), result
    straight, _ = run(tmp_path / 'straight')
    views, training_view = [], finetune.training_view

    def ctrl_c_in_step_3(xyz, args):   # the signal arrives in the middle of a step
        views.append(xyz)
        if len(views) == 3:
            signal.raise_signal(signal.SIGINT)
        return training_view(xyz, args)
    monkeypatch.setattr(finetune, 'training_view', ctrl_c_in_step_3)
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path / 'cut')
    assert stopped.value.code == 130 and len(views) == 3   # the step finished, nothing after it ran
    monkeypatch.setattr(finetune, 'training_view', training_view)
    args.resume = str(tmp_path / 'cut' / 'last.pt')
    checkpoint = torch.load(args.resume, weights_only=False)
    assert (checkpoint['epoch'], checkpoint['step_in_epoch']) == (0, 3)
    resumed, result = run(tmp_path / 'cut', checkpoint)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert [h['epoch'] for h in result['history']] == [0, 1] and 'test_accuracy_of_best_val' in result


def test_finetune_loads_the_authors_checkpoints():
    theirs = official_state_dict('official_keys_finetune_modelnet40.txt')   # 'module.' prefix, as saved on one GPU
    mn40 = ModelConfig(group_sizes=(48, 24, 24), local_radius=(0.24, 0.48, 0.96))
    classifier = Classifier(mn40, 40, 'mean+max')
    assert finetune.load_encoder(classifier, {'base_model': theirs}, 'modelnet_1k.pth', whole=True) == {}
    ours = classifier.state_dict()
    for key, value in theirs.items():   # every tensor arrived, by value
        name = official_to_ours(key)
        assert torch.equal(ours[name], value.reshape(ours[name].shape).to(ours[name].dtype)), key
    with pytest.raises(SystemExit, match=r'(?s)40 classes.*15 classes'):   # their ModelNet40 head on ScanObjectNN
        finetune.load_encoder(Classifier(mn40, 15, 'concat'), {'base_model': theirs}, 'modelnet_1k.pth')
    pretrained = official_state_dict('official_keys_pretrain.txt')
    classifier = Classifier(mn40, 15, 'concat')
    skipped = finetune.load_encoder(classifier, {'base_model': pretrained}, 'pre-train.pth')
    encoder = classifier.state_dict()
    loaded = [k for k in pretrained if k.startswith('module.h_encoder.') and 'encoder_norms' not in k]
    assert loaded and not set(loaded) & set(skipped)
    for key in loaded:
        name = official_to_ours(key)
        assert torch.equal(encoder[name], pretrained[key].to(encoder[name].dtype)), key
    with pytest.raises(SystemExit, match='no classifier head'):
        finetune.load_encoder(classifier, {'base_model': pretrained}, 'pre-train.pth', whole=True)


def test_voting_averages_the_logits_of_ten_augmented_views():
    args = finetune.parse_args(['--data', 'modelnet40', *TINY_FLAGS, '--vote_runs', '3'])
    args.amp = False
    torch.manual_seed(0)
    classifier = Classifier(TINY, 5).eval()
    pool = torch.rand(6, 56, 3)
    torch.manual_seed(1)
    voted = finetune.vote_logits(classifier, pool, args)
    torch.manual_seed(1)
    with torch.no_grad():
        views = torch.stack([classifier(scale_and_translate(random_point_subset(pool, 48), 2 / 3, 3 / 2, 0.2))
                             for _ in range(10)])
    assert not torch.allclose(views[0], views[1])   # ten different views...
    assert torch.allclose(voted, views.mean(dim=0), atol=1e-6)   # ...whose logits are averaged
    result = finetune.voting(classifier, pool, torch.arange(6) % 5, args, 0, 1)
    assert len(result['vote_runs']) == 3 and result['vote_mean'] == pytest.approx(np.mean(result['vote_runs']))


def write_fewshot_folds(root, way, shot, folds, num_test=2, num_points=64):
    """Fake folds in Point-BERT's pickle format: {'train': [(points (N, 6), label, class id)], 'test': [...]}."""
    for fold in folds:
        rng = np.random.default_rng(fold)
        class_ids = rng.choice(40, way, replace=False)
        def items(per_class):
            return [(rng.normal(size=(num_points, 6)).astype(np.float32) * (1 + label), label, int(class_ids[label]))
                    for label in range(way) for _ in range(per_class)]
        folder = root / 'ModelNetFewshot' / f'{way}way{shot}shot'
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f'{fold}.pkl', 'wb') as f:
            pickle.dump({'train': items(shot), 'test': items(num_test)}, f)


def test_fewshot_runs_every_fold_and_reports_mean_and_std(pretrain_checkpoint, tmp_path, monkeypatch, capsys):
    write_fewshot_folds(tmp_path / 'data', way=3, shot=4, folds=range(3))
    monkeypatch.chdir(tmp_path)
    args = finetune.parse_args(['--data', 'fewshot', '--data_root', 'data', '--ckpt', pretrain_checkpoint, *TINY_FLAGS,
                                '--ways', '3', '--shots', '4', '--folds', '0', '1', '2', '--epochs', '1',
                                '--batch_size', '4'])
    result = finetune.main(args)
    accuracies = [result['folds'][f'3way4shot/{fold}'] for fold in range(3)]
    assert all(0 <= a <= 100 for a in accuracies)
    mean, std = result['fewshot']['3way4shot']
    assert mean == pytest.approx(np.mean(accuracies)) and std == pytest.approx(np.std(accuracies))
    out = capsys.readouterr().out
    assert f'3-way 4-shot: {mean:.2f} ± {std:.2f}' in out and out.count('final-epoch test accuracy') == 3


def test_finetune_bad_inputs_are_explained(pretrain_checkpoint, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(['--data', 'modelnet'])
    error = capsys.readouterr().err
    assert "invalid choice: 'modelnet'" in error and all(f"'{name}'" in error for name in finetune.PRESETS)
    with pytest.raises(SystemExit):
        finetune.parse_args(['--data', 'scan_hardest', '--vote'])
    assert 'ModelNet40 only' in capsys.readouterr().err
    checkpoint = torch.load(pretrain_checkpoint, weights_only=False)
    wider = Classifier(replace(TINY, encoder_dims=(16, 32, 48)), 4)
    with pytest.raises(SystemExit, match=r'shape of pos_embed.2.0.weight: checkpoint \(64, 3\), model \(48, 3\)'):
        finetune.load_encoder(wider, checkpoint, 'last.pt')
    deeper = Classifier(replace(TINY, encoder_depths=(2, 1, 1)), 4)
    with pytest.raises(SystemExit, match=r'missing key blocks.0.1.attn.qkv.weight'):
        finetune.load_encoder(deeper, checkpoint, 'last.pt')
    del checkpoint['model']['encoder.pos_embed.0.0.weight']
    with pytest.raises(SystemExit, match=r'missing key pos_embed.0.0.weight'):
        finetune.load_encoder(Classifier(TINY, 4), checkpoint, 'last.pt')
    with pytest.raises(SystemExit, match='no classifier head'):
        finetune.load_encoder(Classifier(TINY, 4), checkpoint, 'last.pt', whole=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match='python pretrain.py'):   # no checkpoint at the default path
        finetune.build_classifier(finetune.parse_args([]), 13)


def test_svm_eval_scores_encoder_width_features_with_sklearn():
    torch.manual_seed(0)
    student = I2PMAE(TINY)
    accuracy, C, n_train, n_test = svm_eval.evaluate(student, 'synthetic', './data', 64, 0.0093, 256, torch.device('cpu'))
    train, test = (load_split('synthetic', split, num_points=64) for split in ('train', 'test'))
    train_x = svm_eval.extract_features(student, train.points, 256, torch.device('cpu'))
    test_x = svm_eval.extract_features(student, test.points, 256, torch.device('cpu'))
    assert train_x.shape == (len(train.points), TINY.encoder_dims[-1]) and (n_train, n_test) == (len(train_x), len(test_x))
    svm = SVC(kernel='linear', C=0.0093).fit(train_x, train.labels.numpy())
    expected = 100 * (svm.predict(test_x) == test.labels.numpy()).mean()
    assert accuracy == pytest.approx(expected) and C == 0.0093
    assert svm_eval.linear_svm_accuracy(train_x, train.labels.numpy(), test_x, test.labels.numpy(), C) == pytest.approx(expected)


def test_random_init_baseline_gets_batchnorm_statistics_of_the_data():
    import svm_eval
    student, _ = tiny_student_and_teacher()
    clouds = torch.rand(6, 128, 3)
    seen = []
    bn = student.encoder.token_embed[0].first_conv[1]
    bn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    svm_eval.calibrate_batchnorm(student, clouds, batch_size=6, device=torch.device('cpu'))
    x = seen[0].transpose(0, 1).flatten(1)                      # (C, every position)
    assert torch.allclose(bn.running_mean, x.mean(1), atol=1e-6)
    assert torch.allclose(bn.running_var, x.var(1), rtol=1e-4)   # unbiased, as BatchNorm keeps it
    assert not student.training


def test_svm_eval_without_a_checkpoint_says_to_pretrain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match='pretrain.py'):
        svm_eval.main(svm_eval.parse_args([]))


if __name__ == '__main__':
    sys.exit(pytest.main([__file__, '-q']))
