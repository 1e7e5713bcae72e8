"""
teacher.py: the frozen 2D teacher (I2P-MAE paper, section "2D Pre-trained Models").

The authors use CLIP's ViT-B/16; we use torchvision's `VisionTransformer` (default
vit_b_16, ImageNet weights when available), which needs nothing but torchvision.
For a batch of depth images the teacher gives
  features   (N, D, h, w)  last-layer patch tokens after the final LayerNorm
                           (D = 768, h = w = 14 for vit_b_16 on 224 x 224 images)
  saliency   (N, h, w)     last block's attention from the class token to each patch,
                           averaged over heads (each row of the attention sums to 1)
The saliency needs the attention weights, which torchvision's blocks do not return,
so the forward is written out below and the last block is run by hand.
The teacher is never part of the student: not in its checkpoint, optimizer or .train().
Weights: torchvision's ImageNet ones, random ones, or a file; a file written by
train_teacher.py (the synthetic demo's own small teacher) carries its architecture.
Picture: python demo.py teacher [--weights ...]      Tests: the teacher.py section of test_all.py
"""
import hashlib
import os
import socket
import warnings

import torch
import torchvision
from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer

# the depth images are normalised like ImageNet photos, as the authors do (even for CLIP)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_S = 10   # an offline machine must fail fast, not hang


def freeze(vit):
    """Evaluation mode, no gradients: the teacher only ever gives targets."""
    return vit.eval().requires_grad_(False)


def tiny_teacher(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, seed=0):
    """A small random-weight VisionTransformer for tests and quick demos (a 4 x 4 patch grid).

    Its weights depend on `seed` only: the global random stream (seeded by --seed) is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                                num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=4 * hidden_dim)
    return freeze(vit)


def vit_from_config(config):
    """A torchvision VisionTransformer from plain settings (a file's `config`); stem_channels: 3x3 stride-2
    convolutions before the patch embedding (a convolutional stem), [] for none."""
    config = dict(config)
    stem = config.pop('stem_channels', [])
    if stem and 2 ** len(stem) != config['patch_size']:
        raise ValueError(f'a stem of {len(stem)} stride-2 convolutions makes {2 ** len(stem)}-pixel patches, '
                         f'not patch_size {config["patch_size"]}')
    return VisionTransformer(**config, conv_stem_configs=[ConvStemConfig(c, 3, 2) for c in stem] or None)


def imagenet_vit_b_16():
    """torchvision's ViT-B/16 with IMAGENET1K_V1 weights: the local cache, else a download."""
    weights = torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(weights.url))
    if os.path.exists(cached):
        return torchvision.models.vit_b_16(weights=weights)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return torchvision.models.vit_b_16(weights=weights)
    finally:
        socket.setdefaulttimeout(previous)


def torchvision_vit(arch):
    """An untrained torchvision ViT by constructor name (vit_b_16, vit_b_32, ...)."""
    if arch not in ('vit_b_16', 'vit_b_32', 'vit_l_16', 'vit_l_32', 'vit_h_14'):
        raise ValueError(f'--teacher_arch {arch!r} is not a torchvision ViT (vit_b_16, vit_b_32, ...)')
    return getattr(torchvision.models, arch)(weights=None)


def build_teacher(weights='auto', arch='vit_b_16'):
    """The frozen teacher and a short description of where its weights came from.

    weights: 'imagenet' (torchvision IMAGENET1K_V1, vit_b_16 only), 'random', 'auto' (imagenet if it
    can be had, else random with a loud warning) or a path: a state_dict of `arch` (a torchvision ViT
    constructor name), or a file that carries its own architecture (`config`, as train_teacher.py writes).
    The global random stream is left as it was: building a ViT draws initial weights (which a file then
    replaces), and the student built after it must start the same whatever the teacher.
    """
    with torch.random.fork_rng(devices=[]):   # a teacher built never shifts the student's initial weights
        return load_teacher(weights, arch)


def load_teacher(weights, arch):
    """build_teacher's work (see there)."""
    if weights in ('imagenet', 'auto'):
        if arch != 'vit_b_16':
            raise ValueError(f'ImageNet teacher weights are wired for vit_b_16 only, not {arch!r}')
        try:
            return freeze(imagenet_vit_b_16()), 'vit_b_16 ImageNet (torchvision IMAGENET1K_V1)'
        except Exception as error:   # offline, blocked, corrupt cache: all mean "no weights"
            if weights == 'imagenet':
                raise RuntimeError(f'could not load the ImageNet ViT-B/16 weights: {error}. Put '
                                   'them in the torch hub cache, or pass --teacher_weights PATH') from error
            warnings.warn(f'\n{"!" * 78}\nTEACHER WEIGHTS UNAVAILABLE ({type(error).__name__}: {error}).\n'
                          'Continuing with a RANDOMLY INITIALISED ViT: the 2D guidance and 2D targets '
                          'then carry no pretrained knowledge.\n' + '!' * 78, stacklevel=2)
            weights = 'random'
    if weights == 'random':
        return freeze(torchvision_vit(arch)), f'{arch} random init (no pretrained knowledge)'
    if not os.path.isfile(weights):
        raise FileNotFoundError(f'--teacher_weights {weights!r}: no such file (expected imagenet, random, auto '
                                'or a weights file)')
    state = torch.load(weights, map_location='cpu', weights_only=True)
    if isinstance(state, dict) and 'config' in state:   # a file that carries its architecture
        vit = vit_from_config(state['config'])
        vit.load_state_dict(state['model'])
        return freeze(vit), state.get('about', f'ViT {state["config"]}') + f' ({weights})'
    vit = torchvision_vit(arch)
    vit.load_state_dict(state.get('model', state) if isinstance(state, dict) else state)
    return freeze(vit), f'{arch} from {weights}'


def teacher_fingerprint(vit):
    """What a checkpoint records of its teacher: a SHA-256 of its weights (names, shapes, values). A moved
    file, or one retrained to the same weights, is the same teacher; other weights are another."""
    digest = hashlib.sha256()
    for name, tensor in vit.state_dict().items():
        digest.update(f'{name} {tuple(tensor.shape)} {tensor.dtype}'.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def normalize_images(images):
    """(N, 3, S, S) in [0, 1] -> ImageNet-normalised, the input the teacher expects.

    Channel by channel with Python numbers: a mean/std tensor made from Python data here would
    be copied to the GPU, and wait for it, at every step.
    """
    return torch.stack([(images[:, c] - mean) / std
                        for c, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))], dim=1)


@torch.no_grad()
def teacher_features_and_saliency(vit, images):
    """Run the frozen ViT on normalised images (N, 3, S, S) -> features (N, D, h, w), saliency (N, h, w).

    In float32 even under bf16 autocast (--amp): the saliency decides which tokens stay visible (a sort),
    and bf16's rounding would change that decision.
    """
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != vit.image_size:
        raise ValueError(f'images must be (N, 3, {vit.image_size}, {vit.image_size}) for this teacher, '
                         f'got {tuple(images.shape)}')
    with torch.autocast(images.device.type, enabled=False):
        return vit_features_and_attention(vit, images.float())


def vit_features_and_attention(vit, images):
    """teacher_features_and_saliency's forward: torchvision's, with the last block's attention kept."""
    N = images.shape[0]
    h = w = vit.image_size // vit.patch_size
    x = vit.conv_proj(images).flatten(2).transpose(1, 2)           # (N, h*w, D) patches, row-major
    x = torch.cat([vit.class_token.expand(N, -1, -1), x], dim=1)   # (N, 1 + h*w, D), class token first
    x = vit.encoder.dropout(x + vit.encoder.pos_embedding)
    *blocks, last = vit.encoder.layers
    for block in blocks:
        x = block(x)
    # the last block by hand, asking its attention for the head-averaged weights
    y = last.ln_1(x)
    y, attention = last.self_attention(y, y, y, need_weights=True, average_attn_weights=True)
    x = x + last.dropout(y)
    x = x + last.mlp(last.ln_2(x))
    x = vit.encoder.ln(x)
    features = x[:, 1:].transpose(1, 2).reshape(N, -1, h, w)      # (N, D, h, w)
    saliency = attention[:, 0, 1:].reshape(N, h, w)                # class-token query over patches
    return features, saliency
