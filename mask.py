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
Picture: python demo.py mask [--mask_ratio 0.6] [--config small]      Tests: the mask.py section of test_all.py
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

