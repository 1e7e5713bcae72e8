"""
checkpoints.py: reading checkpoints, ours and the authors', into our models; writing ours safely.

  read_checkpoint(path)        the dict torch.save wrote, read with weights_only=True: a file can never
                               run code; anything else stops with one line naming the flag and the file
  checkpoint_config(ckpt)      the ModelConfig of a checkpoint (ours stores it; theirs is the official one)
  save_atomically(path, ckpt)  torch.save to a temporary file, then a rename: a crash never leaves half a file
  load_weights(model, ckpt)    every tensor into an I2PMAE, a Classifier or segment.py's PartSegmenter,
                               the authors' key names translated (official_to_ours); what is skipped is
                               returned with the reason, anything missing or of another shape is an error
The authors' files: pre-train.pth ('base_model', their CLIP teacher inside), modelnet40.pth and
scan_pd.pth (fine-tuned), with or without DataParallel's 'module.' prefix (docs/authors_code.md B6);
and Point-M2AE's part segmentation seg.pth ('model_state_dict', with NumPy scores beside it).
Tests: the checkpoints.py section of test_all.py
"""
import os
import pickle
import re
import shutil

import numpy as np
import torch

from model import Classifier, ModelConfig


# NumPy scalars (Point-M2AE's seg.pth keeps its scores as numpy.float64): the scalar, the dtype and the numeric
# dtypes' classes, under NumPy 2's and NumPy 1's names. They build numbers from bytes, never run code; NumPy
# arrays (ndarray, _reconstruct) stay refused.
NUMPY_SCALARS = [np._core.multiarray.scalar, (np._core.multiarray.scalar, 'numpy.core.multiarray.scalar'), np.dtype,
                 *(type(np.dtype(t)) for t in ('bool', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32',
                                               'uint64', 'float16', 'float32', 'float64'))]


def read_checkpoint(path, flag='--ckpt'):
    """The dict saved at `path`, read with torch.load(weights_only=True): tensors and plain Python
    values (and NumPy scalars) only, so a file can never run code. Our checkpoints and the authors'
    .pth files both read this way. Anything else (a planted object, an old checkpoint of ours holding
    NumPy state, a file cut short) stops with a message naming `flag` and the file."""
    if not os.path.isfile(path):
        raise SystemExit(f'{flag} {path}: no such file')
    try:
        with torch.serialization.safe_globals(NUMPY_SCALARS):
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
        with open(path, 'rb') as f:   # torch.save writes a zip archive (older torch: a pickle)
            written_by_torch = f.read(4).startswith((b'PK\x03\x04', b'\x80'))
        if not written_by_torch:
            raise SystemExit(f'{flag} {path}: not a checkpoint (not a file torch.save wrote)') from None
        raise SystemExit(f'{flag} {path}: not a readable checkpoint, perhaps cut short by a crash or a full disk '
                         f'({type(error).__name__}: {str(error).splitlines()[0] if str(error) else "empty"})') from None
    if not isinstance(checkpoint, dict):
        raise SystemExit(f'{flag} {path}: holds a {type(checkpoint).__name__}, not a checkpoint (a dict)')
    return checkpoint


def save_atomically(path, content):
    """torch.save to path.tmp, then rename: a crash or a full disk leaves the previous file intact, and
    no .tmp behind. A write that fails (a full disk, a file-size limit) stops with a message saying so."""
    try:
        torch.save(content, path + '.tmp')
    except BaseException as error:
        if os.path.exists(path + '.tmp'):
            os.remove(path + '.tmp')
        if isinstance(error, (OSError, RuntimeError)):   # torch reports a short write as RuntimeError
            free = shutil.disk_usage(os.path.dirname(path) or '.').free
            kept = f'the previous {os.path.basename(path)} is intact' if os.path.exists(path) else 'nothing was written'
            raise SystemExit(f'could not write {path} ({type(error).__name__}: {str(error).splitlines()[0]}); the disk '
                             f'holding it has {free / 2 ** 20:.0f} MiB free; {kept}') from None
        raise
    os.replace(path + '.tmp', path)


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
    # Point-M2AE's Point_M2AE_SEG (seg.pth): its propagations' conv-BN pairs and head convs-BNs, in our Sequentials
    (r'^propagations\.(\d+)\.mlp_convs\.0\.', r'propagation.\1.0.'),
    (r'^propagations\.(\d+)\.mlp_bns\.0\.', r'propagation.\1.1.'),
    (r'^propagations\.(\d+)\.mlp_convs\.1\.', r'propagation.\1.3.'),
    (r'^propagations\.(\d+)\.mlp_bns\.1\.', r'propagation.\1.4.'),
    *((rf'^{theirs}\.', f'head.{ours}.') for theirs, ours in (('convs1', 0), ('bns1', 1), ('convs2', 4), ('bns2', 5),
                                                            ('convs3', 7), ('bns3', 8), ('convs4', 10))),
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
    """{key: tensor}: ours under 'model'; the authors' under 'base_model' (Point-M2AE's segmentation:
    'model_state_dict'), or a bare state_dict."""
    weights = checkpoint['model'] if 'model_config' in checkpoint else checkpoint.get(
        'base_model', checkpoint.get('model_state_dict', checkpoint))
    if not isinstance(weights, dict) or not weights or not all(torch.is_tensor(v) for v in weights.values()):
        raise SystemExit(f'{path} is neither our checkpoint (model, model_config) nor the authors\' (base_model, '
                         f'model_state_dict, or a state_dict): it has keys {sorted(checkpoint)[:8]}')
    return weights


def checkpoint_config(checkpoint, path='checkpoint'):
    """The architecture of a checkpoint: ours stores it; the authors' is the official one, with the
    2D head as wide as their file's (their CLIP teacher: 512), or none."""
    if 'model_config' in checkpoint:
        saved = dict(checkpoint['model_config'])
        saved.pop('official_radius_bug', None)   # a test-only switch (always False) that older checkpoints recorded
        try:
            return ModelConfig(**saved)
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
