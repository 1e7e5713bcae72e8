"""
mask.py: 2D-guided masking and its propagation down the token hierarchy
(I2P-MAE paper, section "2D-guided Masking"; docs/authors_code.md section 5).

Tokens the frozen 2D teacher finds salient stay visible more often: we draw the
coarse tokens one by one without replacement with probabilities softmax(saliency);
the first (1 - mask_ratio) * G drawn stay visible, the rest are hidden.
  saliency   (B, G) float  teacher attention back-projected to the coarsest tokens
  returns    (B, G) bool   is_masked: True = hidden from the encoder
The mask then propagates to the finer scales: a fine token is visible iff it is one
of the K neighbours of a visible coarse token of the same sample; every other fine
token (including ones no coarse token covers, also in evaluation) is masked.
Demo: python mask.py [--mask_ratio 0.6] [--config small]      Tests: test_*mask* in test_all.py
"""
import torch


def num_visible(num_tokens, mask_ratio):
    """Tokens kept visible: G - int(mask_ratio * G), as the authors round (13 of 64 at 0.8)."""
    if not 0 <= mask_ratio < 1:
        raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}')
    return num_tokens - int(mask_ratio * num_tokens)


def mask_from_visible(visible_idx, num_tokens):
    """(B, L) indices of the visible tokens -> (B, G) bool is_masked."""
    is_masked = torch.ones(visible_idx.shape[0], num_tokens, dtype=torch.bool, device=visible_idx.device)
    return is_masked.scatter(1, visible_idx, False)


def guided_mask(saliency, mask_ratio=0.8, generator=None):
    """2D-guided mask (B, G) bool: sample without replacement from softmax(saliency).

    The draw is torch.multinomial's own (the same numbers from the same random stream):
    token g gets an exponential waiting time q_g ~ Exp(1), and the n largest p_g / q_g are
    the first n drawn. Written out, because multinomial also checks its input on the host,
    which waits for the GPU.
    """
    if saliency.dim() != 2:
        raise ValueError(f'saliency must be a (B, G) tensor, got shape {tuple(saliency.shape)}')
    B, G = saliency.shape
    probs = torch.softmax(saliency.float(), dim=1)   # no temperature, as the authors
    waiting = torch.empty_like(probs).exponential_(generator=generator)
    first_drawn = (probs / waiting).topk(num_visible(G, mask_ratio), dim=1).indices
    return mask_from_visible(first_drawn, G)


def random_mask(batch_size, num_tokens, mask_ratio=0.8, device=None, generator=None):
    """Uniformly random mask (B, G) bool with exactly the same count hidden: the 3D-only ablation."""
    scores = torch.rand(batch_size, num_tokens, device=device, generator=generator)
    return mask_from_visible(scores.argsort(dim=1)[:, :num_visible(num_tokens, mask_ratio)], num_tokens)


def propagate_mask(is_masked_coarse, neighbor_idx, num_fine):
    """Fine-scale mask (B, num_fine): visible iff a neighbour of a visible coarse token.

    is_masked_coarse (B, Gc) bool; neighbor_idx (B, Gc, K) indices into the fine tokens.
    deviation: the authors also always unmask sample 0's token 0 (the index-0 leak, docs/authors_code.md B1);
    we apply the rule per sample, so one sample's mask never depends on another's.
    """
    B, Gc, K = neighbor_idx.shape
    if is_masked_coarse.shape != (B, Gc):
        raise ValueError(f'is_masked_coarse must be (B, Gc) = {(B, Gc)}, got {tuple(is_masked_coarse.shape)}')
    votes = (~is_masked_coarse)[:, :, None].expand(-1, -1, K).reshape(B, -1).float()   # (B, Gc*K)
    covered = torch.zeros(B, num_fine, device=neighbor_idx.device).scatter_add_(1, neighbor_idx.reshape(B, -1), votes)
    return covered == 0


def visible_counts(masks):
    """Visible tokens per scale and sample as Python ints, [[n_0, n_1, ...] for each scale].

    Packing the visible tokens needs these sizes on the host; reading them is the one time a
    training step waits for the GPU, so it is done once, for every scale together.
    """
    return torch.stack([(~m).sum(dim=1) for m in masks]).tolist()


def hierarchical_masks(is_masked_top, groups):
    """Masks for every scale, finest first, from the coarsest scale's mask and the token groups."""
    masks = [is_masked_top]
    for i in range(len(groups) - 1, 0, -1):
        masks.insert(0, propagate_mask(masks[0], groups[i].idx, groups[i - 1].centers.shape[1]))
    return masks


def propagation_story(masks, groups, mask_ratio):
    """One paragraph for the demo picture: why the finer scales keep more tokens visible than the ratio says."""
    visible = [int((~m).sum()) for m in masks]
    top = len(groups) - 1
    steps = [f'each of the {visible[i]} visible scale-{i} tokens keeps its {groups[i].idx.shape[-1]} nearest '
             f'scale-{i - 1} tokens ({visible[i] * groups[i].idx.shape[-1]} picks, {visible[i - 1]} of '
             f'{masks[i - 1].shape[1]} distinct)' for i in range(top, 0, -1)]
    return (f'Why {100 * visible[0] / masks[0].shape[1]:.0f}% of scale-0 tokens stay visible at mask ratio '
            f'{mask_ratio}: only scale {top} is masked at the ratio ({visible[top]} of {masks[top].shape[1]} '
            f'visible), and a finer token stays visible if ANY visible coarser token has it among its K nearest: '
            + '; '.join(steps) + '.')


def main():
    import argparse
    import os
    import time
    from data import make_synthetic
    from tokenizer import build_token_hierarchy
    from project import project_depth_images, back_project
    from teacher import normalize_images, teacher_features_and_saliency
    from model import SMALL_CONFIG, ModelConfig
    from pictures import (HIDDEN, VIEW_NAMES, VISIBLE, Dots, cloud_frame, picture_teacher, points_tile,
                          save_picture, titled_grid)

    parser = argparse.ArgumentParser(description='2D-guided and random masks of one cloud, at every scale.')
    parser.add_argument('--mask_ratio', type=float, default=0.8, help='share of coarse tokens hidden (paper: 0.8)')
    parser.add_argument('--config', choices=('full', 'small'), default='full',
                        help='full: 2048 points, 512/256/64 tokens (the paper); small: 512 points, '
                             'model.SMALL_CONFIG 128/64/16 tokens (the CPU demo of pretrain.py)')
    parser.add_argument('--teacher_weights', default='demo',
                        help='demo (the trained demo teacher in runs/teacher-synthetic/ if there is one, else '
                             'tiny), tiny (a small random ViT), random, imagenet or a weights file (default: demo)')
    parser.add_argument('--seed', type=int, default=0, help='seeds the masks (default: 0)')
    parser.add_argument('--shape_seed', type=int, default=4, help='which synthetic shape (default: 4)')
    parser.add_argument('--out', default='runs/demo', help='folder for mask.png (default: runs/demo)')
    args = parser.parse_args()
    if not 0 <= args.mask_ratio < 1:
        parser.error(f'--mask_ratio must be in [0, 1), got {args.mask_ratio}')
    start = time.perf_counter()
    cfg, num_points = (ModelConfig(), 2048) if args.config == 'full' else (SMALL_CONFIG, 512)
    xyz, _ = make_synthetic(1, num_points=num_points, seed=args.shape_seed)
    groups = build_token_hierarchy(xyz, cfg.num_groups, cfg.group_sizes)
    vit, described = picture_teacher(args.teacher_weights)
    images, geometry = project_depth_images(xyz, vit.image_size)
    _, saliency = teacher_features_and_saliency(vit, normalize_images(images))
    token_saliency = back_project(groups[-1].centers, geometry, saliency[:, None], vit.image_size).mean(-1)
    probs = torch.softmax(token_saliency, dim=1)
    generator = torch.Generator().manual_seed(args.seed)
    masks = {'2D-guided': hierarchical_masks(guided_mask(token_saliency, args.mask_ratio, generator), groups),
             'random': hierarchical_masks(random_mask(1, cfg.num_groups[-1], args.mask_ratio,
                                                      generator=generator), groups)}
    print(f'teacher: {described}')
    print(f'softmax(token saliency) over the {probs.shape[1]} coarse tokens: largest/smallest = '
          f'{(probs.max() / probs.min()).item():.3f}')
    counts = {}
    for name, scales in masks.items():
        counts[name] = ', '.join(f'{int((~m).sum())}/{m.shape[1]} ({100 * (~m).float().mean().item():.0f}%)'
                                 for m in scales)
        print(f'{name} mask, visible tokens per scale 0, 1, 2 (fine to coarse): {counts[name]}')

    frame = cloud_frame(xyz[0])
    top = len(groups) - 1
    tiles = []
    for name, scales in masks.items():
        row = []
        for i in range(top, 0, -1):   # coarse token centres, then the next finer ones
            is_masked = scales[i][0]
            row.append(points_tile(frame, 0, Dots(groups[i].centers[0][is_masked], HIDDEN, radius=3),
                                   Dots(groups[i].centers[0][~is_masked], VISIBLE, radius=3)))
        is_masked = scales[0][0]
        hidden, visible = groups[0].neighbors[0][is_masked], groups[0].neighbors[0][~is_masked]
        row += [points_tile(frame, view, Dots(hidden.reshape(-1, 3), HIDDEN),
                            Dots(visible.reshape(-1, 3), VISIBLE)) for view in range(len(VIEW_NAMES))]
        tiles.append(row)
    hidden_top = cfg.num_groups[-1] - num_visible(cfg.num_groups[-1], args.mask_ratio)
    picture = titled_grid(
        tiles, f'mask.py: --mask_ratio {args.mask_ratio} hides {hidden_top} of {cfg.num_groups[-1]} coarse tokens, '
               f'then the mask propagates to finer scales (--config {args.config})',
        col_labels=[f'scale {i}: token centres, view 1' for i in range(top, 0, -1)] +
                   [f'scale 0: token points, {name}' for name in VIEW_NAMES],
        row_labels=[f'{name} mask; visible per scale 0, 1, 2: {counts[name]}' for name in masks],
        legend=[(VISIBLE, 'visible: the encoder sees it'), (HIDDEN, 'hidden (masked)')],
        caption=propagation_story(masks['2D-guided'], groups, args.mask_ratio) +
                f' Guided: coarse tokens drawn from softmax(saliency), largest/smallest = '
                f'{(probs.max() / probs.min()).item():.3f}. Teacher: {described}.')
    path = save_picture(picture, os.path.join(args.out, 'mask.png'))
    print(f'wrote {path} (rows: guided, random; columns: scales, then views) '
          f'in {time.perf_counter() - start:.1f} s')


if __name__ == '__main__':
    main()
