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
Layer names, initialisation and numerics follow the authors' released model, so their
checkpoints load (checkpoints.py reads theirs and ours).
Picture: python demo.py model      Tests: the model.py section of test_all.py
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import (build_token_hierarchy, check_points, gather_points, hierarchy_problems, points_needed,
                       square_distance)
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

    def __post_init__(self):
        """Refuse, naming the field, a configuration whose entries do not fit together, before any layer is built."""
        scales, stages = len(self.num_groups), len(self.decoder_dims)
        lengths = dict(group_sizes=scales, encoder_dims=scales, encoder_depths=scales, local_radius=scales,
                       decoder_depths=stages, decoder_up_blocks=stages, point_embed_dims=3)
        problems = [f'{k} has {len(getattr(self, k))} entries, not {n}' for k, n in lengths.items()
                    if len(getattr(self, k)) != n]
        least = dict(num_groups=1, group_sizes=1, encoder_dims=1, decoder_dims=1, point_embed_dims=1,
                     encoder_depths=0, decoder_depths=0, decoder_up_blocks=0)
        problems += [f'{k} {tuple(getattr(self, k))}: entries must be integers >= {n}' for k, n in least.items()
                     if not all(isinstance(v, int) and v >= n for v in getattr(self, k))]
        problems += [f'{k} {getattr(self, k)}: must be an integer >= {n}' for k, n in (('num_heads', 1), ('feat_dim_2d', 0))
                     if not (isinstance(getattr(self, k), int) and getattr(self, k) >= n)]
        if problems:   # the checks below index these lists
            raise ValueError('ModelConfig: ' + '; '.join(problems))
        problems = hierarchy_problems(self.num_groups, self.group_sizes)
        problems += [f'num_heads {self.num_heads} does not divide encoder_dims entry {d}' for d in self.encoder_dims
                     if d % self.num_heads]
        problems += [f'{k} {v}: must be {rule}' for k, v, ok, rule in (
            ('decoder_dims', self.decoder_dims, 1 <= stages <= scales, f'1 to {scales} stages'),
            ('local_radius', self.local_radius, all(r >= 0 for r in self.local_radius), '>= 0 (0 = off)'),
            ('drop_path_rate', self.drop_path_rate, 0 <= self.drop_path_rate < 1, 'in [0, 1)'),
            ('num_views', self.num_views, self.num_views in (1, 2, 3), '1, 2 or 3')) if not ok]
        if problems:
            raise ValueError('ModelConfig: ' + '; '.join(problems))

    @property
    def min_points(self):
        """Points per cloud the finest scale needs (tokenizer.points_needed)."""
        return points_needed(self.num_groups, self.group_sizes)


# The same architecture shrunk for a 2-core CPU (demos, tests): fewer and narrower tokens, 2 blocks per scale.
SMALL_CONFIG = ModelConfig(num_groups=(128, 64, 16), group_sizes=(16, 8, 8), encoder_dims=(64, 128, 256),
                           encoder_depths=(2, 2, 2), num_heads=4, decoder_dims=(256, 128),
                           point_embed_dims=(32, 64, 128))

# ------------------------------------------------------------------ small pieces


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


class TokenEmbed(nn.Module):
    """Mini-PointNet over each token's K members (B, G, K, C_in) -> (B, G, C_out), the authors' Token_Embed:
    per member conv-BN-ReLU-conv, max over the K members, concat [max, member], conv-BN-ReLU-conv, max."""
    def __init__(self, c_in, hidden, c_mid, hidden2, c_out):
        super().__init__()
        self.first_conv = nn.Sequential(*conv_bn(c_in, hidden, nn.ReLU(inplace=True)), nn.Conv1d(hidden, c_mid, 1))
        self.second_conv = nn.Sequential(*conv_bn(2 * c_mid, hidden2, nn.ReLU(inplace=True)), nn.Conv1d(hidden2, c_out, 1))

    def forward(self, members):
        B, G, K, C = members.shape
        x = self.first_conv(members.reshape(B * G, K, C).transpose(1, 2))      # (B*G, c_mid, K)
        pooled = x.max(dim=2, keepdim=True).values                              # (B*G, c_mid, 1)
        x = self.second_conv(torch.cat([pooled.expand(-1, -1, K), x], dim=1))   # (B*G, c_out, K)
        return x.max(dim=2).values.view(B, G, -1)


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
        if cfg.decoder_dims[0] != cfg.encoder_dims[-1] or any(d % cfg.num_heads for d in cfg.decoder_dims):
            raise ValueError(f'ModelConfig: decoder_dims {cfg.decoder_dims} must start at encoder_dims[-1] '
                             f'{cfg.encoder_dims[-1]} (the decoder starts from the coarsest encoder tokens) and be '
                             f'divisible by num_heads {cfg.num_heads}')
        self.encoder = Encoder(cfg)
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
        check_points(xyz, 'xyz', self.cfg.min_points, self.mask_token.dtype)
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
        if len(groups) != len(self.cfg.num_groups) or len(masks) != len(groups):
            raise ValueError(f'{len(groups)} groups and {len(masks)} masks for a model of {len(self.cfg.num_groups)} scales')
        for i, (group, is_masked) in enumerate(zip(groups, masks)):
            if group.idx.shape[2] != self.cfg.group_sizes[i] or is_masked.dtype != torch.bool \
                    or is_masked.shape != group.idx.shape[:2]:
                raise ValueError(f'scale {i}: the model takes groups of {self.cfg.group_sizes[i]} members and a bool '
                                 f'mask (B, G) = {tuple(group.idx.shape[:2])}; got groups of {group.idx.shape[2]} '
                                 f'members and a {is_masked.dtype} mask {tuple(is_masked.shape)}')
        check_points(groups[0].centers, 'groups[0].centers', dtype=self.mask_token.dtype)
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


# ------------------------------------------------------------------ fine-tuning model


class Classifier(nn.Module):
    """The encoder with a final LayerNorm and an MLP head, nothing masked.

    pooling 'mean+max' (ModelNet40: their sum, C wide) or 'concat' (ScanObjectNN: 2C wide).
    """
    NAME, NEW_KEYS = 'classifier', ('norm.', 'cls_head.')   # checkpoints.load_weights: what a pre-training file lacks

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
        check_points(xyz, 'xyz', self.cfg.min_points, self.norm.weight.dtype)
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
