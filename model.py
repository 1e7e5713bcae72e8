"""
model.py: the hierarchical point transformer, its decoder, the two losses and the
classifier (I2P-MAE paper, sections "Hierarchical Encoder-Decoder", "2D-semantic
Reconstruction" and "Downstream"; SPEC.md sections 2.2-2.3, 6, 7, 8.3).

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
checkpoints load with `load_official_checkpoint`.
Demo: python model.py      Tests: test_reference_* / test_model_* in test_all.py
"""
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
    official_radius_bug: bool = False        # pre-training only: AND the radius with padding as the authors (SPEC B5)


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
    """1x1 Conv1d, BatchNorm1d and an optional activation over (B, C, N), as the authors.

    (A Linear over rows is the same map and a little faster on CPUs, but rounds differently,
    and train-mode BatchNorm amplifies that beyond the reference tolerance.)
    """
    return nn.Sequential(nn.Conv1d(c_in, c_out, 1), nn.BatchNorm1d(c_out), *([act] if act else []))


class TokenEmbed(nn.Module):
    """Mini-PointNet over each token's K members: (B, G, K, C_in) -> (B, G, C_out).

    per member: conv, BN, ReLU, conv -> max over K -> concat [max, member] -> conv, BN, ReLU, conv -> max over K
    The conv after the concat is applied in two halves: the max half is the same for all K members
    of a token, so its product is computed once per token, not K times (the same sum, added in
    another order: equal to 1e-7; the scale-0 embedding is most of a step's arithmetic).
    """
    def __init__(self, c_in, hidden, c_mid, hidden2, c_out):
        super().__init__()
        self.first_conv = nn.Sequential(*conv_bn(c_in, hidden, nn.ReLU(inplace=True)), nn.Conv1d(hidden, c_mid, 1))
        self.second_conv = nn.Sequential(*conv_bn(2 * c_mid, hidden2, nn.ReLU(inplace=True)), nn.Conv1d(hidden2, c_out, 1))

    def forward(self, members):
        B, G, K, C = members.shape
        x = self.first_conv(members.reshape(B * G, K, C).transpose(1, 2))     # (B*G, c_mid, K)
        pooled = x.max(dim=2, keepdim=True).values                             # (B*G, c_mid, 1)
        concat_conv, *rest = self.second_conv                                  # applied to [pooled; x]
        w_pooled, w_member = concat_conv.weight.split(x.shape[1], dim=1)
        x = F.conv1d(x, w_member).add_(F.conv1d(pooled, w_pooled, concat_conv.bias))   # (B*G, hidden2, K)
        for layer in rest:
            x = layer(x)
        return x.max(dim=2).values.view(B, G, -1)                             # (B*G, c_out) per token


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
        # deviation: the authors' pre-training encoder ANDs the two (SPEC B5, dead code at their radius 0),
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
        counts = visible_counts(masks) if counts is None else counts
        encoded = self.encode(groups, masks, counts)
        x = self.decode(groups, masks, encoded, counts).flatten(0, 1)          # (B * G_h, D)
        h, group = self.head_scale, groups[self.head_scale]
        K = group.idx.shape[-1]
        masked = true_positions(masks[h], masks[h].numel() - sum(counts[h]))   # (L_masked,) in (sample, token) order
        rec_3d = self.head_3d(x[masked]).view(-1, K, 3)                        # (L_masked, K, 3)
        loss_3d = chamfer_l2(rec_3d, group.relative.flatten(0, 1)[masked])
        if target_2d is None or self.head_2d is None:
            return loss_3d, torch.zeros_like(loss_3d)
        visible = true_positions(~masks[h], sum(counts[h]))                    # (L_visible,)
        rec_2d = self.head_2d(x[visible]).view(-1, K, target_2d.shape[-1])     # (L_visible, K, V*C)
        return loss_3d, F.mse_loss(rec_2d, target_2d)

    forward = pretrain_losses   # so DistributedDataParallel can wrap the student


def compile_student(model):
    """torch.compile the parts of the student whose shapes are the same at every step (the flag
    --compile): the token embeddings, which hold most of a step's arithmetic, and the decoder's
    upsampling. In place (the state_dict keeps its keys); returns the model.

    The encoder's transformer blocks see a different number of visible tokens at every step.
    Compiling the whole student (its forward has no graph breaks) fails in torch 2.14 once those
    numbers become symbolic sizes, so only the fixed-shape parts are compiled. On a CPU it gains
    nothing (README, "Speed and memory").
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


# ------------------------------------------------------------------ the authors' checkpoints


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
NEW_IN_CLASSIFIER = ('norm.', 'cls_head.')


def official_to_ours(name):
    name = name[len('module.'):] if name.startswith('module.') else name
    for pattern, ours in OFFICIAL_NAMES:
        name, hits = re.subn(pattern, ours, name)
        if hits:
            break
    return name


def load_official_checkpoint(model, checkpoint):
    """Load the authors' weights (a path, or their dict with 'base_model') into I2PMAE or Classifier.

    Every encoder, decoder and head tensor must load; skipped are only their CLIP teacher, a 2D
    head whose width depends on the teacher, pre-training parts a Classifier has no place for,
    and a Classifier's new norm and head when the file is a pre-training checkpoint.
    Returns {skipped key: reason}; raises ValueError listing every other mismatch.
    """
    if isinstance(checkpoint, str):
        checkpoint = torch.load(checkpoint, map_location='cpu', weights_only=False)
    theirs = checkpoint.get('base_model', checkpoint)
    own = model.state_dict()
    is_classifier = isinstance(model, Classifier)
    is_pretrain_file = not any(official_to_ours(k).startswith('cls_head.') for k in theirs)
    state, skipped, too_narrow, problems = {}, {}, set(), []
    for key, value in theirs.items():
        name = official_to_ours(key)
        if name.startswith('clip_model.'):
            skipped[key] = 'their CLIP teacher: ours lives outside the student'
        elif name not in own:
            if is_classifier and name.startswith(PRETRAIN_ONLY):
                skipped[key] = 'pre-training only: a classifier has no decoder or reconstruction heads'
            else:
                problems.append(f'unexpected key {key} (ours would be {name})')
        elif value.shape == own[name].shape:
            state[name] = value
        elif value.shape == own[name].shape + (1,):    # their heads are kernel-1 Conv1d, ours Linear
            state[name] = value[..., 0]
        elif name.startswith('head_2d.'):
            skipped[key] = (f'2D head width depends on the teacher: theirs {tuple(value.shape)}, '
                            f'ours {tuple(own[name].shape)}')
            too_narrow.add(name)
        else:
            problems.append(f'shape of {key}: theirs {tuple(value.shape)}, ours {tuple(own[name].shape)}')
    for name in sorted(own.keys() - state.keys() - too_narrow):
        if is_classifier and is_pretrain_file and name.startswith(NEW_IN_CLASSIFIER):
            skipped[name] = 'new in the classifier: trained by fine-tuning'
        else:
            problems.append(f'missing key {name}')
    if problems:
        raise ValueError('the checkpoint does not fit this model:\n  ' + '\n  '.join(problems))
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in state.items()}}, strict=True)
    return skipped


if __name__ == '__main__':
    import glob
    import os
    from dataclasses import asdict
    from torchvision.utils import save_image
    from data import make_synthetic
    from project import paint_points
    from mask import random_mask

    torch.manual_seed(0)
    found = sorted(glob.glob('runs/pretrain-*/last.pt'), key=os.path.getmtime)
    if found:   # the demo checkpoint of `python pretrain.py`, if there is one
        checkpoint = torch.load(found[-1], map_location='cpu', weights_only=False)
        model = I2PMAE(ModelConfig(**checkpoint['model_config']))
        model.load_state_dict(checkpoint['model'])
        num_points, source = checkpoint['args']['num_points'], f'pre-trained student from {found[-1]}'
    else:       # no checkpoint: fit a small student to this one shape for a few steps (3D loss only)
        model = I2PMAE(ModelConfig(**{**asdict(SMALL_CONFIG), 'feat_dim_2d': 0}))
        num_points, source = 512, 'small student fitted to this shape for 60 steps (run pretrain.py for a real one)'
    xyz, _ = make_synthetic(1, num_points=num_points, seed=5)
    groups = build_token_hierarchy(xyz, model.cfg.num_groups, model.cfg.group_sizes)
    masks = hierarchical_masks(random_mask(1, model.cfg.num_groups[-1], 0.8), groups)
    if not found:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(60):
            loss_3d, _ = model.pretrain_losses(groups, masks)
            optimizer.zero_grad()
            loss_3d.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        x = model.decode(groups, masks, model.encode(groups, masks))             # (1, G_h, D)
        is_masked, group = masks[model.head_scale][0], groups[model.head_scale]
        K = group.idx.shape[-1]
        predicted = model.head_3d(x[0][is_masked]).view(-1, K, 3) + group.centers[0][is_masked][:, None]
        loss_3d, _ = model.pretrain_losses(groups, masks)
    print(f'{source}\nChamfer-L2 of the masked scale-{model.head_scale} tokens: {loss_3d.item():.4f}')
    kept = group.neighbors[0][~is_masked].reshape(-1, 3)                          # visible members, as given
    truth = torch.cat([kept, group.neighbors[0][is_masked].reshape(-1, 3)])
    guess = torch.cat([kept, predicted.reshape(-1, 3)])
    shade = torch.cat([torch.full((len(kept),), 0.4), torch.ones(predicted.numel() // 3)])   # bright = hidden part
    os.makedirs('runs/demo', exist_ok=True)
    save_image(torch.cat([paint_points(truth, shade), paint_points(guess, shade)]), 'runs/demo/model.png',
               nrow=3, padding=4, pad_value=1.0)
    print('wrote runs/demo/model.png (top: input, bottom: reconstruction; bright = the masked tokens)')
