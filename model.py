"""
model.py: the hierarchical point transformer, its decoder, the two losses and the
classifier (I2P-MAE paper, sections "Hierarchical Encoder-Decoder", "2D-semantic
Reconstruction" and "Downstream"; docs/authors_code.md sections 2, 6, 7, 10).

  encoder   for each scale 0 (fine) .. 2 (coarse): embed every token with a mini-PointNet
            (scale 0: its K points; scale i: its K finer tokens' features), keep the visible
            tokens packed to the front, add positional MLPs, run the transformer blocks
              groups (list of Group) + masks (B, G_i) bool -> per scale (B, L_i, C_i)
  decoder   coarse visible tokens + mask tokens -> transformer -> 3-NN upsampling to scale 1
            with the encoder's scale-1 tokens as skip features -> transformer   (B, G_1, D_1)
  losses    3D: Chamfer-L2 between predicted and true neighbourhoods of MASKED scale-1 tokens
            2D: MSE against the teacher features back-projected to the K points of VISIBLE
                scale-1 tokens, three views concatenated;   loss = loss_3d + loss_2d
  svm       max over the coarsest tokens of the frozen encoder, nothing masked   (B, C_2)
  classify  mean + max (ModelNet40) or concat[mean, max] (ScanObjectNN), then an MLP head
Key layout, initialisation and numerics follow the authors' released model; the authors'
checkpoints, and ours, load with `load_weights` (files read by `read_checkpoint`: weights_only).
Demo: python model.py [--ckpt none] [--steps 60]      Tests: test_reference_* / test_model_* in test_all.py
"""
import os
import pickle
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import build_token_hierarchy, gather_points, square_distance
from mask import hierarchical_masks, visible_counts

BLOCKED = -100000.0   # additive attention logit of a blocked pair, as the authors (not -inf: padded rows stay finite)


@dataclass
class ModelConfig:
    """Architecture; defaults are the authors' pre-training config (cfgs/pre-training/i2p-mae.yaml)."""
    num_groups: tuple = (512, 256, 64)       # tokens per scale, fine to coarse
    group_sizes: tuple = (16, 8, 8)          # neighbours per token (fine-tuning uses 32/16/16 or 48/24/24)
    encoder_dims: tuple = (96, 192, 384)
    encoder_depths: tuple = (5, 5, 5)
    num_heads: int = 6
    local_radius: tuple = (0.0, 0.0, 0.0)    # attention only between centres closer than this; 0 = off
    drop_path_rate: float = 0.1
    decoder_dims: tuple = (384, 192)         # decoder stages, coarse to fine
    decoder_depths: tuple = (1, 1)
    decoder_up_blocks: tuple = (1, 1)        # residual conv blocks in the upsampling into each finer stage
    feat_dim_2d: int = 768                   # teacher width (768 = torchvision ViT-B/16); 0 = no 2D target
    num_views: int = 3                       # depth views whose teacher features the 2D head predicts
    point_embed_dims: tuple = (128, 256, 512)  # widths of the scale-0 mini-PointNet (smaller only for CPU demos)
    official_radius_bug: bool = False        # pre-training only: AND the radius with padding as the authors (docs/authors_code.md B5)

    def __post_init__(self):
        """Refuse a configuration whose lists do not fit together, naming the field, before any layer is built."""
        scales, stages = len(self.num_groups), len(self.decoder_dims)
        problems = [f'{name} has {len(getattr(self, name))} entries for {scales} scales (num_groups)'
                    for name in ('group_sizes', 'encoder_dims', 'encoder_depths', 'local_radius')
                    if len(getattr(self, name)) != scales]
        problems += [f'{name} has {len(getattr(self, name))} entries for the {stages} decoder stages (decoder_dims)'
                     for name in ('decoder_depths', 'decoder_up_blocks') if len(getattr(self, name)) != stages]
        if not 1 <= stages <= scales:
            problems.append(f'decoder_dims: {stages} decoder stages for {scales} scales (1 to {scales})')
        if len(self.point_embed_dims) != 3:
            problems.append(f'point_embed_dims has {len(self.point_embed_dims)} entries: the scale-0 mini-PointNet has 3 widths')
        sizes = ('num_groups', 'group_sizes', 'encoder_dims', 'decoder_dims', 'point_embed_dims')
        problems += [f'{name} {tuple(getattr(self, name))}: every entry must be a positive integer' for name in sizes
                     if not all(isinstance(v, int) and v > 0 for v in getattr(self, name))]
        problems += [f'{name} {tuple(getattr(self, name))}: every entry must be an integer >= 0'
                     for name in ('encoder_depths', 'decoder_depths', 'decoder_up_blocks')
                     if not all(isinstance(v, int) and v >= 0 for v in getattr(self, name))]
        if problems:   # the checks below index these lists
            raise ValueError('ModelConfig: ' + '; '.join(problems))
        if not all(r >= 0 for r in self.local_radius):
            problems.append(f'local_radius {tuple(self.local_radius)}: radii must be >= 0 (0 = off)')
        for i in range(1, scales):   # scale i picks its centres among, and groups, scale i-1's centres
            if self.num_groups[i] > self.num_groups[i - 1]:
                problems.append(f'num_groups {tuple(self.num_groups)}: scale {i} picks its {self.num_groups[i]} centres '
                                f'among the {self.num_groups[i - 1]} of scale {i - 1}')
            if self.group_sizes[i] > self.num_groups[i - 1]:
                problems.append(f'group_sizes[{i}] {self.group_sizes[i]}: a scale-{i} token groups its nearest '
                                f'scale-{i - 1} centres, of which there are {self.num_groups[i - 1]}')
        problems += self.heads_problems('encoder_dims')
        if not 0 <= self.drop_path_rate < 1:
            problems.append(f'drop_path_rate {self.drop_path_rate}: must be in [0, 1)')
        if not (isinstance(self.feat_dim_2d, int) and self.feat_dim_2d >= 0):
            problems.append(f'feat_dim_2d {self.feat_dim_2d}: the teacher width, an integer >= 0 (0 = no 2D target)')
        if self.num_views not in (1, 2, 3):
            problems.append(f'num_views {self.num_views}: 1, 2 or 3 depth views')
        if problems:
            raise ValueError('ModelConfig: ' + '; '.join(problems))

    def heads_problems(self, name):
        return [f'num_heads {self.num_heads} does not divide the width {d} ({name})' for d in getattr(self, name)
                if not (isinstance(self.num_heads, int) and self.num_heads > 0 and d % self.num_heads == 0)]

    def check_decoder(self):
        """The decoder's fields (a pre-training model's; a classifier ignores them) must fit the encoder."""
        problems = self.heads_problems('decoder_dims')
        if self.decoder_dims[0] != self.encoder_dims[-1]:
            problems.append(f'decoder_dims[0] {self.decoder_dims[0]} must equal encoder_dims[-1] '
                            f'{self.encoder_dims[-1]}: the decoder starts from the coarsest encoder tokens')
        if problems:
            raise ValueError('ModelConfig: ' + '; '.join(problems))


# The same architecture shrunk for a 2-core CPU (demos, tests): fewer and narrower tokens, 2 blocks per scale.
SMALL_CONFIG = ModelConfig(num_groups=(128, 64, 16), group_sizes=(16, 8, 8), encoder_dims=(64, 128, 256),
                           encoder_depths=(2, 2, 2), num_heads=4, decoder_dims=(256, 128),
                           point_embed_dims=(32, 64, 128))

# ------------------------------------------------------------------ small pieces


def check_clouds(xyz, cfg, dtype):
    """What the public entry points (svm_features, Classifier.forward) accept: a (B, N, 3) tensor of the
    weights' dtype, B >= 1, N >= the points the finest scale groups. Shapes and dtypes only, so no device
    sync: a float64, integer or empty batch fails here, by name, not inside a convolution."""
    shape = tuple(xyz.shape) if torch.is_tensor(xyz) else type(xyz).__name__
    if not torch.is_tensor(xyz) or xyz.dim() != 3 or xyz.shape[2] != 3 or xyz.shape[0] == 0:
        raise ValueError(f'xyz must be a (B, N, 3) tensor of clouds with B >= 1, got {shape}')
    if xyz.dtype != dtype:
        raise ValueError(f'xyz is {xyz.dtype} {shape}, the model\'s weights are {dtype}: pass xyz.to({dtype})')
    fewest = max(cfg.num_groups[0], cfg.group_sizes[0])
    if xyz.shape[1] < fewest:
        raise ValueError(f'xyz has {xyz.shape[1]} points per cloud {shape}; the finest scale groups {fewest} '
                         f'(num_groups[0] {cfg.num_groups[0]}, group_sizes[0] {cfg.group_sizes[0]})')


def check_tokens(groups, masks, cfg, dtype):
    """What I2PMAE.pretrain_losses accepts: a Group and a bool is_masked (B, G_i) per scale, groups of the
    config's sizes and of the weights' dtype, B >= 1 (shapes and dtypes only: no device sync)."""
    if len(groups) != len(cfg.num_groups) or len(masks) != len(groups):
        raise ValueError(f'{len(groups)} groups and {len(masks)} masks for a model of {len(cfg.num_groups)} scales')
    if groups[0].relative.dtype != dtype or groups[0].centers.shape[0] == 0:
        raise ValueError(f'groups hold {groups[0].relative.dtype} points of shape {tuple(groups[0].relative.shape)}; '
                         f'the model takes a batch B >= 1 of {dtype}')
    for i, (group, is_masked) in enumerate(zip(groups, masks)):
        if group.idx.shape[2] != cfg.group_sizes[i]:
            raise ValueError(f'scale {i}: groups of {group.idx.shape[2]} members, the model was built for '
                             f'group_sizes[{i}] {cfg.group_sizes[i]}')
        if is_masked.dtype != torch.bool or is_masked.shape != group.idx.shape[:2]:
            raise ValueError(f'scale {i}: masks must be bool (B, G) {tuple(group.idx.shape[:2])}, got '
                             f'{is_masked.dtype} {tuple(is_masked.shape)}')



def chamfer_l2(pred, target):
    """Chamfer-L2 of point sets (L, K, 3) vs (L, K', 3): mean over all predicted points of the squared
    distance to the nearest target point of their set, plus the same from targets to predictions."""
    d = square_distance(pred, target)                         # (L, K, K')
    return d.min(dim=2).values.mean() + d.min(dim=1).values.mean()


def drop_path(x, rate, training):
    """Stochastic depth: zero a residual branch for a random subset of samples, rescale the rest."""
    if rate == 0 or not training:
        return x
    keep = torch.empty(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


def position_mlp(dim):
    """Centre (x, y, z) -> a dim-wide positional embedding."""
    return nn.Sequential(nn.Linear(3, dim), nn.GELU(), nn.Linear(dim, dim))


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        """x (B, L, C), bias (B, 1, L, L) additive logits or None -> (B, L, C)."""
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)   # 3 x (B, H, L, C/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth."""
    def __init__(self, dim, num_heads, drop_path_rate=0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim)
        self.drop_path_rate = drop_path_rate

    def forward(self, x, bias=None):
        x = x + drop_path(self.attn(self.norm1(x), bias), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


def transformer_stages(dims, depths, num_heads, drop_path_rate):
    """One list of Blocks per stage; stochastic-depth rates rise linearly over all blocks in order."""
    rates = iter(torch.linspace(0, drop_path_rate, sum(depths)).tolist())
    return nn.ModuleList([nn.ModuleList([Block(d, num_heads, next(rates)) for _ in range(depth)])
                          for d, depth in zip(dims, depths)])


def conv_bn(c_in, c_out, act=None):
    """1x1 Conv1d, BatchNorm1d and an optional activation over (B, C, N), as the authors."""
    return nn.Sequential(nn.Conv1d(c_in, c_out, 1), nn.BatchNorm1d(c_out), *([act] if act else []))


def fold_batchnorm(conv, bn):
    """(weight (C_out, C_in), bias) of x -> bn(conv(x)) for an eval-mode BatchNorm: one product."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    return conv.weight[..., 0] * scale[:, None], (conv.bias - bn.running_mean) * scale + bn.bias


def pointwise(x, weight, bias, K):
    """A 1x1 conv applied to member rows: x (T*K, C_in), weight (C_out, C_in) -> (T*K, C_out).

    It runs as a conv2d over (T, C, 1, K) in channels-last layout, which is the rows as they lie in
    memory: oneDNN's CPU kernels take that layout as it is, twice as fast as the authors' Conv1d over
    (T, C, K), which they first copy into a layout of their own (a transient copy of each tensor).
    """
    T = x.shape[0] // K
    y = F.conv2d(x.view(T, 1, K, -1).permute(0, 3, 1, 2), weight[:, :, None, None], bias)   # (T, C_out, 1, K)
    return y.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


class ReLUGradInPlace(torch.autograd.Function):
    """ReLU in place whose backward works in place too: it zeroes the incoming gradient where the
    output is 0 instead of writing a new tensor (the same numbers as F.relu's backward). After the
    widest layer of the scale-0 embedding (512 channels for every member, 256 MB at batch 16) that
    is one such tensor fewer at the step's peak of memory. The layer after it must hand back a
    gradient of its own (a conv does)."""
    @staticmethod
    def forward(ctx, x):
        ctx.mark_dirty(x)
        ctx.save_for_backward(x.relu_())
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        out, = ctx.saved_tensors   # ReLU's own backward kernel, told to write into the incoming gradient
        return torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)


class TokenEmbed(nn.Module):
    """Mini-PointNet over each token's K members: (B, G, K, C_in) -> (B, G, C_out).

    per member: conv, BN, ReLU, conv -> max over K -> concat [max, member] -> conv, BN, ReLU, conv -> max over K
    The layers are the authors' 1x1 Conv1d and BatchNorm1d (their checkpoints load as they are),
    applied to the members as rows (T*K, C), T = B*G tokens (`pointwise`). Two rewrites of the
    arithmetic, exact in real numbers (they round differently, ~1e-7):
    - the conv after the concat is split in halves, [W_max W_member]: the max half is the same for
      all K members of a token, so it is applied once per token, not K times;
    - the conv before the concat is linear, x = W2 r + b2, so the member half W_member x is
      (W_member W2) r + W_member b2: the widest product reads the 128-wide r, not the 256-wide x.
    The scale-0 embedding is most of a step's arithmetic; these take a third of it away.
    With its BatchNorms in eval mode (linear SVM, test sets) each is a fixed affine map, folded into
    the conv before it.
    """
    def __init__(self, c_in, hidden, c_mid, hidden2, c_out):
        super().__init__()
        self.first_conv = nn.Sequential(*conv_bn(c_in, hidden, nn.ReLU(inplace=True)), nn.Conv1d(hidden, c_mid, 1))
        self.second_conv = nn.Sequential(*conv_bn(2 * c_mid, hidden2, nn.ReLU(inplace=True)), nn.Conv1d(hidden2, c_out, 1))

    def forward(self, members):
        B, G, K, C = members.shape
        batch_statistics = self.first_conv[1].training or self.second_conv[1].training   # BatchNorms in train mode
        embed = self.embed_batch_statistics if batch_statistics else self.embed_folded
        return embed(members.reshape(B * G * K, C), K).view(B, G, -1)

    def embed_batch_statistics(self, rows, K):
        """rows (T*K, C_in) -> (T, C_out), each BatchNorm on this batch's statistics (train mode)."""
        conv1, bn1, _, conv2 = self.first_conv
        concat_conv, bn2, _, conv4 = self.second_conv
        w_pooled, w_member = concat_conv.weight[..., 0].split(conv2.out_channels, dim=1)
        r = ReLUGradInPlace.apply(bn1(pointwise(rows, conv1.weight[..., 0], conv1.bias, K)))   # (T*K, hidden)
        x = pointwise(r, conv2.weight[..., 0], conv2.bias, K)                                  # (T*K, c_mid)
        pooled = x.view(-1, K, x.shape[1]).max(dim=1).values                                   # (T, c_mid)
        per_token = F.linear(pooled, w_pooled, concat_conv.bias + w_member @ conv2.bias)      # (T, hidden2)
        h = pointwise(r, w_member @ conv2.weight[..., 0], None, K)                            # (T*K, hidden2)
        h = (h.view(-1, K, h.shape[1]) + per_token[:, None]).view(h.shape)   # not add_: an in-place add to
        h = ReLUGradInPlace.apply(bn2(h))                                    # a view costs a copy in backward
        out = pointwise(h, conv4.weight[..., 0], conv4.bias, K)                               # (T*K, c_out)
        return out.view(-1, K, out.shape[1]).max(dim=1).values

    def embed_folded(self, rows, K):
        """rows (T*K, C_in) -> (T, C_out), each BatchNorm folded into the conv before it (eval mode)."""
        conv1, bn1, _, conv2 = self.first_conv
        concat_conv, bn2, _, conv4 = self.second_conv
        w1, b1 = fold_batchnorm(conv1, bn1)
        w, b = fold_batchnorm(concat_conv, bn2)
        w_pooled, w_member = w.split(conv2.out_channels, dim=1)
        w_composed, b_pooled = w_member @ conv2.weight[..., 0], b + w_member @ conv2.bias

        def embed(rows):   # a bias shared by all K members is added after the max: fl(a + b) rises with a, so exact
            r = pointwise(rows, w1, b1, K).relu_()                                            # (T*K, hidden)
            pooled = pointwise(r, conv2.weight[..., 0], None, K).view(-1, K, conv2.out_channels).amax(dim=1) + conv2.bias
            h = pointwise(r, w_composed, None, K).view(-1, K, w.shape[0])                     # (T, K, hidden2)
            h = h.add_(F.linear(pooled, w_pooled, b_pooled)[:, None]).relu_().view(r.shape[0], -1)
            return pointwise(h, conv4.weight[..., 0], None, K).view(-1, K, conv4.out_channels).amax(dim=1) + conv4.bias

        # on a CPU in chunks of 8192 rows: each chunk's products then fit in memory the allocator reuses;
        # a product over a whole batch is fresh memory that the OS hands out, and zeroes, page by page
        chunk = max(1, 8192 // K) * K if rows.device.type == 'cpu' else rows.shape[0]
        return torch.cat([embed(part) for part in rows.split(chunk)])


class Encoded(NamedTuple):
    """One scale of encoder output: visible tokens packed to the front, padding after them."""
    x: torch.Tensor        # (B, L, C)
    is_pad: torch.Tensor   # (B, L) bool
    order: torch.Tensor    # (B, L) long: token index of each row


def pack_visible(is_masked, length):
    """Row order (B, L) that brings each sample's visible tokens to the front in index order, and is_pad (B, L).

    length L: the largest visible count in the batch (mask.visible_counts reads it, once per step).
    """
    order = is_masked.byte().argsort(dim=1, stable=True)[:, :length]
    return order, is_masked.gather(1, order)


def true_positions(flags, count):
    """Flat positions (count,) of the True entries of a bool tensor, in row-major order: what
    flags.flatten().nonzero() gives, but with the size known on the host, so nothing waits for the GPU
    (a stable sort brings the Trues first, in order)."""
    return flags.flatten().byte().argsort(descending=True, stable=True)[:count]


def attention_bias(is_pad, centers, radius, radius_and_padding=False):
    """(B, 1, L, L) additive logits blocking padded queries or keys and, if radius > 0, far centres."""
    blocked = is_pad[:, :, None] | is_pad[:, None, :]
    if radius > 0:
        far = torch.cdist(centers, centers) >= radius
        # deviation: the authors' pre-training encoder ANDs the two (docs/authors_code.md B5, dead code at their radius 0),
        # which ignores the radius between real tokens and opens nearby padding; we OR them
        blocked = (blocked & far) if radius_and_padding else (blocked | far)
    return (blocked.to(centers.dtype) * BLOCKED)[:, None]


class Encoder(nn.Module):
    """The hierarchical encoder shared by pre-training, the linear SVM and fine-tuning."""
    def __init__(self, cfg, radius_and_padding=False):
        super().__init__()
        dims = cfg.encoder_dims
        self.local_radius, self.radius_and_padding = cfg.local_radius, radius_and_padding
        self.token_embed = nn.ModuleList([TokenEmbed(3, *cfg.point_embed_dims, dims[0])] + [
            TokenEmbed(dims[i - 1], dims[i - 1], dims[i - 1], dims[i], dims[i]) for i in range(1, len(dims))])
        self.pos_embed = nn.ModuleList([position_mlp(d) for d in dims])
        self.blocks = transformer_stages(dims, cfg.encoder_depths, cfg.num_heads, cfg.drop_path_rate)
        self.apply(init_encoder_weights)

    def forward(self, groups, masks, counts=None):
        """groups: Groups finest first; masks: (B, G_i) bool is_masked per scale -> list of Encoded.

        counts: mask.visible_counts(masks), if the caller has them (else they are read here).
        """
        counts = visible_counts(masks) if counts is None else counts
        outputs, full = [], None   # full: the previous scale's features for every token (B, G, C)
        for i, (group, is_masked) in enumerate(zip(groups, masks)):
            # scale 0 embeds points; scale i embeds its members' features from scale i - 1
            members = group.relative if i == 0 else gather_points(full, group.idx)   # (B, G, K, C)
            tokens = self.token_embed[i](members)                                     # (B, G, C_i)
            order, is_pad = pack_visible(is_masked, max(counts[i]))
            x, centers = gather_points(tokens, order), gather_points(group.centers, order)   # (B, L, C_i), (B, L, 3)
            padded = min(counts[i]) < max(counts[i])
            if padded:
                x, centers = x.masked_fill(is_pad[..., None], 0), centers.masked_fill(is_pad[..., None], 0)
            pos = self.pos_embed[i](centers)
            # no bias where nothing is blocked: the fused attention kernels then apply
            bias = (attention_bias(is_pad, centers, self.local_radius[i], self.radius_and_padding)
                    if padded or self.local_radius[i] > 0 else None)
            for block in self.blocks[i]:
                x = block(x + pos, bias)   # positions are re-added before every block
            outputs.append(Encoded(x, is_pad, order))
            # next scale's input: transformer output where visible, the raw embedding where masked
            index = order[..., None].expand_as(x)
            full = torch.where(is_masked[..., None], tokens, tokens.scatter(1, index, x))
        return outputs


def unpack(encoded, num_tokens):
    """Packed rows back to token order (B, G, C), zeros at masked tokens."""
    x = encoded.x.masked_fill(encoded.is_pad[..., None], 0)
    full = torch.zeros(x.shape[0], num_tokens, x.shape[2], dtype=x.dtype, device=x.device)
    return full.scatter(1, encoded.order[..., None].expand_as(x), x)


class ResidualConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net1, self.net2 = conv_bn(dim, dim, nn.GELU()), conv_bn(dim, dim)

    def forward(self, x):
        return F.gelu(self.net2(self.net1(x)) + x)


def interpolate_3nn(fine_xyz, coarse_xyz, coarse):
    """Features (B, Gc, C) at coarse_xyz (B, Gc, 3) -> (B, Gf, C) at fine_xyz (B, Gf, 3): each fine point
    averages its 3 nearest coarse points with weights 1 / (d^2 + 1e-8), normalised to sum to 1.

    d^2 comes from coordinate differences, in fp32 even under autocast: every coarse centre is also a
    fine one, and the authors' |a|^2 - 2ab + |b|^2 turns those zero distances into +-1e-3 under TF32
    or bf16, so the weights into garbage. (It rounds like theirs to within the reference tolerance.)
    """
    with torch.autocast(fine_xyz.device.type, enabled=False):
        d = square_distance(fine_xyz.float(), coarse_xyz.float())             # (B, Gf, Gc)
    d, idx = d.topk(3, dim=-1, largest=False)                                 # (B, Gf, 3)
    weights = 1.0 / (d + 1e-8)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return (gather_points(coarse, idx) * weights[..., None].to(coarse.dtype)).sum(dim=2)


class TokenPropagation(nn.Module):
    """Upsample decoder tokens to a finer scale (PointNet++ feature propagation).

    Each fine centre averages its 3 nearest coarse tokens with weights 1/d^2, is concatenated
    [encoder skip, interpolated], fused (conv, BN, GELU: the authors' "ReLU" layers are GELU)
    and refined by residual conv blocks.
    """
    def __init__(self, skip_dim, coarse_dim, out_dim, num_blocks):
        super().__init__()
        self.fuse = conv_bn(skip_dim + coarse_dim, out_dim, nn.GELU())
        self.blocks = nn.Sequential(*[ResidualConv(out_dim) for _ in range(num_blocks)])

    def forward(self, fine_xyz, coarse_xyz, skip, coarse):
        interpolated = interpolate_3nn(fine_xyz, coarse_xyz, coarse)            # (B, Gf, C)
        x = self.fuse(torch.cat([skip, interpolated], dim=-1).transpose(1, 2))  # (B, out_dim, Gf)
        return self.blocks(x).transpose(1, 2)                                   # (B, Gf, out_dim)


def init_encoder_weights(m):
    """The authors' encoder init: truncated normal (std .02) for linear and conv weights, zero biases."""
    if isinstance(m, (nn.Linear, nn.Conv1d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_decoder_block(m):
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------ pre-training model


class I2PMAE(nn.Module):
    """The student: encoder, decoder and the 3D and 2D reconstruction heads (no teacher inside)."""
    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()   # a fresh default: instances never share one config
        cfg.check_decoder()
        self.encoder = Encoder(cfg, radius_and_padding=cfg.official_radius_bug)
        self.encoder_norms = nn.ModuleList([nn.LayerNorm(d) for d in cfg.encoder_dims])
        dims, top = cfg.decoder_dims, len(cfg.num_groups) - 1
        self.mask_token = nn.Parameter(torch.zeros(1, dims[0]))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder_pos_embed = nn.ModuleList([position_mlp(d) for d in dims])
        self.decoder_blocks = transformer_stages(dims, cfg.decoder_depths, cfg.num_heads, cfg.drop_path_rate)
        self.decoder_blocks.apply(init_decoder_block)
        # decoder stage j works at scale top - j; propagation j feeds stage j + 1
        self.token_propagation = nn.ModuleList([
            TokenPropagation(cfg.encoder_dims[top - j - 1], dims[j], dims[j + 1], cfg.decoder_up_blocks[j])
            for j in range(len(dims) - 1)])
        self.decoder_norm = nn.LayerNorm(dims[-1])
        self.head_scale = top - len(dims) + 1                  # scale 1 by default
        K = cfg.group_sizes[self.head_scale]
        self.head_3d = nn.Linear(dims[-1], K * 3)
        self.head_2d = nn.Linear(dims[-1], K * cfg.num_views * cfg.feat_dim_2d) if cfg.feat_dim_2d else None

    def encode(self, groups, masks, counts=None):
        """Encoder outputs per scale, each after its own LayerNorm."""
        return [e._replace(x=norm(e.x)) for e, norm in zip(self.encoder(groups, masks, counts), self.encoder_norms)]

    def svm_features(self, xyz):
        """(B, N, 3) -> (B, C_top): max over the coarsest tokens, nothing masked at the top.

        Finer tokens that no coarse token covers are still masked, as in the authors' code.
        """
        check_clouds(xyz, self.cfg, self.mask_token.dtype)
        groups = build_token_hierarchy(xyz, self.cfg.num_groups, self.cfg.group_sizes)
        top = torch.zeros(xyz.shape[0], self.cfg.num_groups[-1], dtype=torch.bool, device=xyz.device)
        return self.encode(groups, hierarchical_masks(top, groups))[-1].x.max(dim=1).values

    def decode(self, groups, masks, encoded, counts=None):
        """Decoder output (B, G_h, D) at the head scale, tokens in their original order."""
        top = len(groups) - 1
        coarse = encoded[top]
        counts = visible_counts(masks) if counts is None else counts
        if min(counts[top]) != max(counts[top]):
            raise ValueError(f'every sample must keep the same number of visible coarsest tokens, got {counts[top]}')
        # stage 0: [visible tokens; one mask token per hidden one], centres in the same order
        order = masks[top].byte().argsort(dim=1, stable=True)                  # (B, G_top)
        B, G = order.shape
        hidden = self.mask_token.expand(B, G - coarse.x.shape[1], -1)
        x = torch.cat([coarse.x, hidden], dim=1)                               # (B, G_top, D0)
        centers = gather_points(groups[top].centers, order)
        for j, blocks in enumerate(self.decoder_blocks):
            if j > 0:
                scale = top - j
                skip = unpack(encoded[scale], groups[scale].centers.shape[1])
                x = self.token_propagation[j - 1](groups[scale].centers, centers, skip, x)
                centers = groups[scale].centers
            pos = self.decoder_pos_embed[j](centers)
            for block in blocks:
                x = block(x + pos)
        return self.decoder_norm(x)

    def pretrain_losses(self, groups, masks, target_2d=None, counts=None):
        """(loss_3d, loss_2d) for one batch.

        groups, masks: from tokenizer.build_token_hierarchy and mask.hierarchical_masks;
        target_2d (L_visible, K_h, V * feat_dim_2d): teacher features at each member of each
        visible head-scale token, in (sample, token) order, or None to train without the 2D
        target (loss_2d = 0); counts: mask.visible_counts(masks), if the caller has them.
        """
        check_tokens(groups, masks, self.cfg, self.mask_token.dtype)
        K, width = self.cfg.group_sizes[self.head_scale], self.cfg.num_views * self.cfg.feat_dim_2d
        if target_2d is not None and (self.head_2d is None or target_2d.dim() != 3 or target_2d.shape[1:] != (K, width)):
            raise ValueError(f'target_2d {tuple(target_2d.shape)}: ' + ('this model has no 2D head (feat_dim_2d 0)'
                             if self.head_2d is None else f'expected (L_visible, {K}, {width}) (K, views x feat_dim_2d)'))
        counts = visible_counts(masks) if counts is None else counts
        encoded = self.encode(groups, masks, counts)
        x = self.decode(groups, masks, encoded, counts).flatten(0, 1)          # (B * G_h, D)
        h, group = self.head_scale, groups[self.head_scale]
        masked = true_positions(masks[h], masks[h].numel() - sum(counts[h]))   # (L_masked,) in (sample, token) order
        rec_3d = self.head_3d(x[masked]).view(-1, K, 3)                        # (L_masked, K, 3)
        loss_3d = chamfer_l2(rec_3d, group.relative.flatten(0, 1)[masked])
        if target_2d is None:
            return loss_3d, torch.zeros_like(loss_3d)
        visible = true_positions(~masks[h], sum(counts[h]))                    # (L_visible,)
        rec_2d = self.head_2d(x[visible]).view(-1, K, target_2d.shape[-1])     # (L_visible, K, V*C)
        # the mean as sum / count, the same number: F.mse_loss's result shares the storage of its unreduced
        # (L_visible, K, V*C) buffer (100 MB at batch 16); returned, it would keep it through the backward
        return loss_3d, F.mse_loss(rec_2d, target_2d, reduction='sum') / rec_2d.numel()

    forward = pretrain_losses   # so DistributedDataParallel can wrap the student


def compile_student(model):
    """torch.compile the parts of the student whose shapes are the same at every step (the flag
    --compile): the token embeddings, which hold most of a step's arithmetic, and the decoder's
    upsampling. In place (the state_dict keeps its keys); returns the model.

    The encoder's transformer blocks see a different number of visible tokens at every step.
    Compiling the whole student (its forward has no graph breaks) fails in torch 2.14 once those
    numbers become symbolic sizes, so only the fixed-shape parts are compiled. On a CPU the step
    was about 7% faster after a compile of about 90 s (README, "Speed and memory").
    """
    for module in model.modules():
        if isinstance(module, (TokenEmbed, TokenPropagation)):
            module.compile(dynamic=False)
    return model


# ------------------------------------------------------------------ fine-tuning model


class Classifier(nn.Module):
    """The encoder with a final LayerNorm and an MLP head, nothing masked.

    pooling 'mean+max' (ModelNet40: their sum, C wide) or 'concat' (ScanObjectNN: 2C wide).
    """
    NAME, NEW_KEYS = 'classifier', ('norm.', 'cls_head.')   # load_weights: what a pre-training file lacks

    def __init__(self, cfg, num_classes, pooling='mean+max'):
        super().__init__()
        if pooling not in ('mean+max', 'concat'):
            raise ValueError(f"pooling must be 'mean+max' or 'concat', got {pooling!r}")
        self.cfg, self.pooling = cfg, pooling
        self.encoder = Encoder(cfg)
        self.norm = nn.LayerNorm(cfg.encoder_dims[-1])
        width = cfg.encoder_dims[-1] * (2 if pooling == 'concat' else 1)
        self.cls_head = nn.Sequential(
            nn.Linear(width, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(256, num_classes))

    def pool(self, xyz):
        """(B, N, 3) -> pooled features (B, C) or (B, 2C)."""
        check_clouds(xyz, self.cfg, self.norm.weight.dtype)
        groups = build_token_hierarchy(xyz, self.cfg.num_groups, self.cfg.group_sizes)
        masks = [torch.zeros(g.idx.shape[:2], dtype=torch.bool, device=xyz.device) for g in groups]
        counts = [[g] * xyz.shape[0] for g in self.cfg.num_groups]              # every token visible
        x = self.norm(self.encoder(groups, masks, counts)[-1].x)                # (B, G_top, C)
        mean, top = x.mean(dim=1), x.max(dim=1).values
        return mean + top if self.pooling == 'mean+max' else torch.cat([mean, top], dim=1)

    def forward(self, xyz):
        return self.cls_head(self.pool(xyz))


def smoothed_cross_entropy(logits, labels, smoothing=0.2):
    """Cross-entropy with the authors' label smoothing: the wrong classes share eps evenly (eps / (n - 1))."""
    n = logits.shape[1]
    target = torch.full_like(logits, smoothing / (n - 1)).scatter_(1, labels[:, None], 1 - smoothing)
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


# ------------------------------------------------------------------ checkpoints: ours and the authors'


def read_checkpoint(path, flag='--ckpt'):
    """The dict saved at `path`, read with torch.load(weights_only=True): tensors and plain Python
    values only, so a file can never run code. Our checkpoints and the authors' .pth files both read
    this way. Anything else (a planted object, an old checkpoint of ours holding NumPy state, a file
    cut short) stops with a message naming `flag` and the file."""
    if not os.path.isfile(path):
        raise SystemExit(f'{flag} {path}: no such file')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r'GLOBAL ([\w.]+)', str(error))
        if found and found.group(1).startswith('numpy'):
            raise SystemExit(
                f'{flag} {path}: refused: it holds NumPy objects ({found.group(1)}), as checkpoints of older versions '
                f'of pretrain.py and finetune.py did (their random state). Reading them needs weights_only=False, '
                f'which would also run any code planted in the file, so they are not read. If you trust the file, '
                f'keep its weights: c = torch.load(PATH, weights_only=False); del c["rng"]; torch.save(c, NEW) '
                f'(NEW then works as --ckpt, not as --resume).') from None
        if found:
            raise SystemExit(f'{flag} {path}: refused: it holds a Python object ({found.group(1)}), not only tensors '
                             f'and plain values; reading it could run code from the file, so it is not read') from None
        raise SystemExit(f'{flag} {path}: not a checkpoint (not a file torch.save wrote)') from None
    except Exception as error:   # whatever torch.load meets in a file it did not write (IndexError, KeyError, ...)
        raise SystemExit(f'{flag} {path}: not a readable checkpoint, perhaps cut short by a crash or a full disk '
                         f'({type(error).__name__}: {str(error).splitlines()[0] if str(error) else "empty"})') from None
    if not isinstance(checkpoint, dict):
        raise SystemExit(f'{flag} {path}: holds a {type(checkpoint).__name__}, not a checkpoint (a dict)')
    return checkpoint


OFFICIAL_NAMES = [   # (their key pattern, ours), applied in order to keys without 'module.'
    (r'^h_encoder\.encoder_norms\.', 'encoder_norms.'),
    (r'^h_encoder\.encoder_pos_embeds\.', 'encoder.pos_embed.'),
    (r'^h_encoder\.encoder_blocks\.(\d+)\.blocks\.', r'encoder.blocks.\1.'),
    (r'^h_encoder\.', 'encoder.'),
    (r'^h_decoder\.(\d+)\.blocks\.', r'decoder_blocks.\1.'),
    (r'^decoder_pos_embeds\.', 'decoder_pos_embed.'),
    (r'^token_prop\.(\d+)\.fuse\.net\.', r'token_propagation.\1.fuse.'),
    (r'^token_prop\.(\d+)\.extraction\.operation\.', r'token_propagation.\1.blocks.'),
    (r'^rec_head_(\dd)\.', r'head_\1.'),
    (r'^cls_head_finetune\.', 'cls_head.'),
]
PRETRAIN_ONLY = ('encoder_norms.', 'mask_token', 'decoder_', 'token_propagation.', 'head_')


def official_to_ours(name):
    """Their key name -> ours ('module.' stripped); our own names pass unchanged."""
    name = name[len('module.'):] if name.startswith('module.') else name
    for pattern, ours in OFFICIAL_NAMES:
        name, hits = re.subn(pattern, ours, name)
        if hits:
            break
    return name


def checkpoint_weights(checkpoint, path='checkpoint'):
    """{key: tensor}: ours under 'model'; the authors' under 'base_model', or a bare state_dict."""
    weights = checkpoint['model'] if 'model_config' in checkpoint else checkpoint.get('base_model', checkpoint)
    if not isinstance(weights, dict) or not weights or not all(torch.is_tensor(v) for v in weights.values()):
        raise SystemExit(f'{path} is neither our checkpoint (model, model_config) nor the authors\' (base_model, '
                         f'or a state_dict): it has keys {sorted(checkpoint)[:8]}')
    return weights


def checkpoint_config(checkpoint, path='checkpoint'):
    """The architecture of a checkpoint: ours stores it; the authors' is the official one, with the
    2D head as wide as their file's (their CLIP teacher: 512), or none."""
    if 'model_config' in checkpoint:
        try:
            return ModelConfig(**checkpoint['model_config'])
        except (TypeError, ValueError) as error:   # unknown fields, or lists that do not fit together
            raise SystemExit(f'{path}: its model_config does not describe a model this code builds ({error})') from None
    head = [v for k, v in checkpoint_weights(checkpoint, path).items() if k.endswith('rec_head_2d.weight')]
    default = ModelConfig()
    return ModelConfig(feat_dim_2d=head[0].shape[0] // (default.num_views * default.group_sizes[1]) if head else 0)


def check_head(state, classifier, path):
    """Explain, and stop, when a fine-tuned head in `state` (our key names) does not fit this classifier."""
    theirs = (state['cls_head.8.weight'].shape[0], state['cls_head.0.weight'].shape[1])
    ours = (classifier.cls_head[8].out_features, classifier.cls_head[0].in_features)
    if theirs != ours:
        raise SystemExit(
            f'{path} is a classifier fine-tuned for {theirs[0]} classes on {theirs[1]}-wide pooled features, but '
            f'this dataset has {ours[0]} classes and pooling {classifier.pooling!r} gives {ours[1]}-wide features. '
            f'A fine-tuned head fits only the dataset it was trained on: to fine-tune, start from a pre-training '
            f'checkpoint (pretrain.py\'s last.pt, the authors\' pre-train.pth); to test, use its own --data.')


def load_weights(model, checkpoint, path='checkpoint', fine_tune=False):
    """Load a checkpoint, ours (pretrain.py's, finetune.py's, segment.py's) or the authors', into an I2PMAE
    or a downstream model: a Classifier, or segment.py's PartSegmenter.

    checkpoint: the dict read_checkpoint returns, or a path to read. Their key names are translated
    (official_to_ours); ours pass unchanged. An I2PMAE takes a pre-training file. A downstream model
    names its NEW_KEYS, the parts that fine-tuning trains from scratch: it takes a file that has them
    (a classifier's head must fit: check_head), or, with fine_tune=True, also the encoder of a
    pre-training file (its NEW_KEYS are then new). A fine-tuned classifier is refused by all but a Classifier.
    Skipped, and reported: their CLIP teacher, a 2D head whose width depends on the teacher, the
    pre-training parts a downstream model has no place for, a downstream model's new parts. Every other
    tensor must load: SystemExit naming the file and every missing or unexpected key and every shape
    difference. Returns {skipped key: reason}.
    """
    if isinstance(checkpoint, str):
        path, checkpoint = checkpoint, read_checkpoint(checkpoint)
    weights = checkpoint_weights(checkpoint, path)
    names = {key: official_to_ours(key) for key in weights}
    new = getattr(model, 'NEW_KEYS', ())                  # () for an I2PMAE
    is_classifier, has_head = isinstance(model, Classifier), 'cls_head.8.weight' in names.values()
    has_new = bool(new) and any(name.startswith(new) for name in names.values())
    whose = 'ours' if 'model_config' in checkpoint else 'the authors\''
    if has_head and not is_classifier:
        raise SystemExit(f'{path} is a fine-tuned classifier ({whose}); this needs a pre-training checkpoint '
                         f'(pretrain.py\'s last.pt or the authors\' pre-train.pth): fine-tuning changed its encoder '
                         f'with labels, and its pre-training parts are gone. To test the classifier itself: python '
                         f'finetune.py --test_only --ckpt {path} --data <the dataset it was fine-tuned on>')
    if is_classifier and has_head:
        check_head({names[k]: v for k, v in weights.items()}, model, path)
    elif new and not has_new and not fine_tune:
        raise SystemExit(f'{path} is a pre-training checkpoint ({whose}): it has no {model.NAME} head; '
                         f'fine-tune it first')
    own = model.state_dict()
    state, skipped, problems, unfit = {}, {}, [], set()   # unfit: a tensor of the file, of another shape
    for key, value in weights.items():
        name = names[key]
        said = key if key == name else f'{key} (ours: {name})'
        if name.startswith('clip_model.'):
            skipped[key] = 'their CLIP teacher: ours lives outside the student'
        elif name not in own:
            if new and name.startswith(PRETRAIN_ONLY):
                skipped[key] = f'pre-training only: a {model.NAME} has no decoder or reconstruction heads'
            else:
                problems.append(f'unexpected key {said}')
        elif value.shape == own[name].shape:
            state[name] = value
        elif value.shape == own[name].shape + (1,):    # their heads are kernel-1 Conv1d, ours Linear
            state[name] = value[..., 0]
        elif name.startswith('head_2d.'):
            skipped[key] = (f'2D head width depends on the teacher: file {tuple(value.shape)}, '
                            f'model {tuple(own[name].shape)}')
            unfit.add(name)
        else:
            problems.append(f'shape of {said}: file {tuple(value.shape)}, model {tuple(own[name].shape)}')
            unfit.add(name)
    for name in sorted(own.keys() - state.keys() - unfit):
        if new and not has_new and name.startswith(new):
            skipped[name] = f'new in the {model.NAME}: trained by fine-tuning'
        else:
            problems.append(f'missing key {name}')
    if problems:
        raise SystemExit(f'{path} does not fit this {type(model).__name__} (a different architecture?):\n  '
                         + '\n  '.join(problems))
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in state.items()}}, strict=True)
    return skipped


def main():
    import argparse
    import glob
    import time
    from dataclasses import asdict
    from data import make_synthetic
    from mask import random_mask
    from pictures import (CENTRE, CLOUD, HIDDEN, PREDICTED, VIEW_NAMES, VISIBLE, Dots, cloud_frame,
                          points_tile, save_picture, titled_grid)

    parser = argparse.ArgumentParser(description='Reconstruct the masked tokens of one synthetic cloud and draw them.')
    parser.add_argument('--ckpt', default='auto',
                        help='a pretrain.py checkpoint; auto: the newest runs/pretrain-*/last.pt, or, if there '
                             'is none, a small student fitted to this one shape (default: auto); none: always fit')
    parser.add_argument('--steps', type=int, default=60, help='fitting steps when there is no checkpoint (default: 60)')
    parser.add_argument('--seed', type=int, default=0, help='seeds the mask and the fitted student (default: 0)')
    parser.add_argument('--out', default='runs/demo', help='folder for model.png (default: runs/demo)')
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    found = sorted(glob.glob('runs/pretrain-*/last.pt'), key=os.path.getmtime) if args.ckpt == 'auto' else (
        [] if args.ckpt == 'none' else [args.ckpt])
    if found:   # the demo checkpoint of `python pretrain.py`
        checkpoint = read_checkpoint(found[-1], 'python model.py reads')
        model = I2PMAE(checkpoint_config(checkpoint))
        load_weights(model, checkpoint, found[-1])
        num_points, source = checkpoint['args']['num_points'], f'pre-trained student from {found[-1]}'
    else:       # no checkpoint: fit a small student to this one shape (3D loss only)
        model = I2PMAE(ModelConfig(**{**asdict(SMALL_CONFIG), 'feat_dim_2d': 0}))
        num_points = 512
        source = f'small student fitted to this one shape for {args.steps} steps, no 2D target'
        if args.ckpt == 'auto':
            print('no runs/pretrain-*/last.pt: `python pretrain.py` (about 5 minutes on 2 idle cores) trains the demo student; '
                  'until then this demo fits a small student to one shape (about 1 minute).')
    print(source)
    xyz, _ = make_synthetic(1, num_points=num_points, seed=5)
    groups = build_token_hierarchy(xyz, model.cfg.num_groups, model.cfg.group_sizes)
    masks = hierarchical_masks(random_mask(1, model.cfg.num_groups[-1], 0.8), groups)
    if not found:
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
    picture = titled_grid(
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
    path = save_picture(picture, os.path.join(args.out, 'model.png'))
    print(f'wrote {path} (rows: views; columns: input, visible tokens, reconstruction) '
          f'in {time.perf_counter() - start:.1f} s')


if __name__ == '__main__':
    main()
