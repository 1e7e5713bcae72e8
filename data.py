"""
data.py: every point cloud the project reads, behind one call.

    load_split(name, split, data_root='./data', num_points=None, seed=0) -> PointSplit
      points       (S, N, 3) float32  S shapes of N points, xyz only
      labels       (S,) int64         official class order; None for pre-training pools
      class_names  list[str]          label id -> name ([] for pre-training pools)

Real datasets are read once, up front, from the exact on-disk formats of
Point-BERT / Point-MAE / I2P-MAE (layout: README, "Data layout"); nothing is
downloaded. 'synthetic', the default of every entry script, is generated from
parts (tables, chairs, lamps, ...), so the whole chain runs with no data at all.
The entry scripts index batches out of `points` and move them to the device;
the augmentations below then run batched there, drawing from torch's RNG:
    scale_and_translate, rotate_about_up_axis, random_point_subset, fps_subsample
Fine-tuning on ModelNet40 draws its per-step FPS from a pool computed once: fps_pool, draw_from_fps_pool.
Demo: python data.py          Shapes: synthetic.py      Tests: test_all.py, section "data.py"
"""
import argparse
import glob
import hashlib
import math
import os
import pickle
import time
import warnings
from typing import List, NamedTuple, Optional

import h5py
import numpy as np
import torch

from tokenizer import farthest_point_sample, gather_points
from synthetic import SYNTHETIC_CLASSES, synthetic_clouds

# load_split names: ShapeNet-55 (pre-training), ModelNet40 .dat (fine-tuning), ModelNet40 h5
# (linear SVM), ScanObjectNN OBJ-BG / OBJ-ONLY / PB-T50-RS (the hardest)
DATASET_NAMES = ('synthetic', 'shapenet', 'modelnet40', 'modelnet40_svm',
                 'scan_objbg', 'scan_objonly', 'scan_hardest')
# the standard shape_names order (label 0..39), SPEC section 9
MODELNET40_CLASSES = [
    'airplane', 'bathtub', 'bed', 'bench', 'bookshelf', 'bottle', 'bowl', 'car', 'chair', 'cone',
    'cup', 'curtain', 'desk', 'door', 'dresser', 'flower_pot', 'glass_box', 'guitar', 'keyboard',
    'lamp', 'laptop', 'mantel', 'monitor', 'night_stand', 'person', 'piano', 'plant', 'radio',
    'range_hood', 'sink', 'sofa', 'stairs', 'stool', 'table', 'tent', 'toilet', 'tv_stand', 'vase',
    'wardrobe', 'xbox']
SCANOBJECTNN_CLASSES = ['bag', 'bin', 'box', 'cabinet', 'chair', 'desk', 'display', 'door',
                        'shelf', 'table', 'bed', 'pillow', 'sink', 'sofa', 'toilet']
# shapes per synthetic split: a ModelNet-like ratio, small enough to generate in seconds
SYNTHETIC_SPLIT_SIZES = {'pretrain': 2000, 'train': 1000, 'test': 500}

POINT_BERT = "Point-BERT's DATASET.md, https://github.com/Julie-tang00/Point-BERT/blob/master/DATASET.md"
SHAPENET_LAYOUT = ('ShapeNet55-34/ShapeNet-55/{train,test}.txt   one file name per line: <synset>-<id>.npy\n'
                   'ShapeNet55-34/shapenet_pc/<synset>-<id>.npy  float array (8192, 3)', POINT_BERT)
MODELNET_DAT_LAYOUT = ('ModelNet/modelnet40_normal_resampled/modelnet40_{train,test}_8192pts_fps.dat'
                       '   pickle [points list of (8192, 6), labels list of (1,)]\n'
                       'ModelNet/modelnet40_normal_resampled/modelnet40_shape_names.txt', POINT_BERT)
MODELNET_H5_LAYOUT = ('modelnet40_ply_hdf5_2048/ply_data_train{0..4}.h5, ply_data_test{0,1}.h5'
                      '   keys data (S, 2048, 3), label (S, 1)\n'
                      'modelnet40_ply_hdf5_2048/shape_names.txt',
                      "PointNet's modelnet40_ply_hdf5_2048.zip, https://github.com/charlesq34/pointnet")
SCAN_LAYOUT = ('ScanObjectNN/main_split/{training,test}_objectdataset.h5                          OBJ-BG\n'
               'ScanObjectNN/main_split/{training,test}_objectdataset_augmentedrot_scale75.h5    PB-T50-RS\n'
               'ScanObjectNN/main_split_nobg/{training,test}_objectdataset.h5                    OBJ-ONLY\n'
               '   keys data (S, 2048, 3), label (S,)',
               'the ScanObjectNN project page, https://hkust-vgd.github.io/scanobjectnn '
               '(h5_files.zip; its terms-of-use form gives the download link)')
FEWSHOT_LAYOUT = ('ModelNetFewshot/{5way10shot,5way20shot,10way10shot,10way20shot}/{0..9}.pkl'
                  "   (or 5way_10shot, ...)\n"
                  "   pickle {'train': [(points (8192, 6), label, class id), ...], 'test': [...]}",
                  POINT_BERT)


class PointSplit(NamedTuple):
    points: torch.Tensor                # (S, N, 3) float32
    labels: Optional[torch.Tensor]      # (S,) int64, or None for an unlabeled pre-training pool
    class_names: List[str]


def normalize_unit_sphere(points):
    """(..., N, 3) -> same shape: subtract the centroid, divide by the largest radius."""
    centred = points - points.mean(dim=-2, keepdim=True)
    radius = centred.norm(dim=-1).amax(dim=-1, keepdim=True)         # (..., 1)
    return centred / radius.clamp_min(1e-12).unsqueeze(-1)


# ---------------------------------------------------------------- checks shared by the readers

def require_path(path, layout):
    """Raise one FileNotFoundError naming the path, the expected layout and where to get it."""
    if not os.path.exists(path):
        tree, source = layout
        raise FileNotFoundError(
            f'{path} not found.\nExpected under --data_root:\n{tree}\n'
            f'The dataset is published at {source}. Nothing is downloaded at run time: '
            f'download it, unpack it under --data_root, or run with --data synthetic.')
    return path


def check_point_array(points, path, num_points):
    """points array (S, N, C>=3) float -> (S, num_points, 3) float32 tensor; errors name the file."""
    points = np.asarray(points)
    if points.ndim != 3 or points.shape[2] < 3:
        raise ValueError(f'{path}: expected point clouds of shape (S, N, 3), got shape {points.shape}')
    if not np.issubdtype(points.dtype, np.floating):
        raise ValueError(f'{path}: expected float points, got dtype {points.dtype}')
    if points.shape[0] == 0:
        raise ValueError(f'{path}: the split is empty')
    if points.shape[1] < num_points:
        raise ValueError(f'{path}: clouds have {points.shape[1]} points, fewer than the {num_points} requested')
    return torch.from_numpy(np.ascontiguousarray(points[:, :num_points, :3], dtype=np.float32))


def check_labels(labels, num_shapes, num_classes, path):
    """labels array (S,) or (S, 1) integer -> (S,) int64 tensor, every label in 0..num_classes-1."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f'{path}: expected integer labels, got dtype {labels.dtype}')
    labels = labels.reshape(-1)                                       # ModelNet h5 stores (S, 1)
    if len(labels) != num_shapes:
        raise ValueError(f'{path}: {len(labels)} labels for {num_shapes} point clouds')
    is_bad = (labels < 0) | (labels >= num_classes)
    if is_bad.any():
        raise ValueError(f'{path}: label {labels[is_bad][0]} is outside 0..{num_classes - 1} '
                         f'({is_bad.sum()} shapes affected)')
    return torch.from_numpy(labels.astype(np.int64))


def check_class_names(path, expected):
    """A shape_names file, if present, must list the standard classes in the standard order."""
    if os.path.exists(path):
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
        if names != expected:
            raise ValueError(f'{path}: class names differ from the standard order {expected[:3]}...')
    return list(expected)


def read_h5(path, layout):
    """-> (data, label) arrays as stored; other keys (normal, faceId, mask, ...) are ignored."""
    require_path(path, layout)
    try:
        f = h5py.File(path, 'r')
    except OSError as err:
        raise ValueError(f'{path}: not a readable HDF5 file ({err})') from err
    with f:
        missing = sorted({'data', 'label'} - set(f.keys()))
        if missing:
            raise ValueError(f'{path}: missing key(s) {missing}; the file has {sorted(f.keys())}')
        return f['data'][:], f['label'][:]


def read_npy(path, layout):
    require_path(path, layout)
    try:
        return np.load(path)
    except (ValueError, OSError) as err:
        raise ValueError(f'{path}: not a readable .npy array ({err})') from err


def read_pickle(path, layout):
    with open(require_path(path, layout), 'rb') as f:
        try:
            return pickle.load(f)      # only open pickles you trust: unpickling can run code
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise ValueError(f'{path}: not a readable pickle ({err})') from err


def stack_xyz(clouds, path):
    """list of (N, C>=3) arrays -> (S, N, 3) float array; all clouds must have one shape."""
    shapes = sorted({np.shape(c) for c in clouds})
    if len(shapes) > 1:
        raise ValueError(f'{path}: point clouds of different shapes, e.g. {shapes[:2]}')
    if not clouds or len(shapes[0]) != 2 or shapes[0][1] < 3:
        raise ValueError(f'{path}: expected a non-empty list of (N, 3+) clouds, got shapes {shapes[:2]}')
    return np.stack([np.asarray(c)[:, :3] for c in clouds])


def check_split(split, allowed=('train', 'test')):
    if split not in allowed:
        raise ValueError(f'split must be one of {allowed}, got {split!r}')


# ---------------------------------------------------------------- real datasets (SPEC section 9)

def read_shapenet55(data_root, split, num_points=2048, seed=0):
    """ShapeNet-55 pre-training pool: a random num_points-subset of each 8192-point npy, normalised.

    deviation: the official loader draws a fresh 2048-of-8192 subset every time a shape
    is read; we draw it once at load time (seeded), since keeping all 8192 points of
    ~42k shapes would take 4 GB. Pass num_points=8192 to keep them and subsample per step.

    The first run that reads a split writes the result next to the data as ONE array file,
    ShapeNet55-34/shapenet55_<split>_<n>pts_seed<seed>_<hash of the list>.npy (atomically:
    a temporary file, then a rename). Later runs, and every process of a multi-GPU run, map
    that file into memory instead of reading ~42k files: the operating system keeps one copy
    of its pages for all processes of a node. Delete it to rebuild it; if the folder is not
    writable, the split is read file by file as before, with a warning.
    """
    check_split(split)
    root = os.path.join(data_root, 'ShapeNet55-34')
    list_path = require_path(os.path.join(root, 'ShapeNet-55', f'{split}.txt'), SHAPENET_LAYOUT)
    with open(list_path, 'rb') as f:
        listing = f.read()
    names = [line.strip() for line in listing.decode().splitlines() if line.strip()]
    if not names:
        raise ValueError(f'{list_path}: the split is empty')
    digest = hashlib.sha1(listing).hexdigest()[:12]          # another list, another file
    consolidated = os.path.join(root, f'shapenet55_{split}_{num_points}pts_seed{seed}_{digest}.npy')
    if not os.path.exists(consolidated):
        clouds = read_shapenet55_files(root, names, num_points, seed)
        try:
            save_array_atomically(consolidated, clouds)
        except OSError as err:
            warnings.warn(f'could not write {consolidated} ({err}); every run will read the '
                          f'{len(names)} files of the split again')
            return PointSplit(torch.from_numpy(clouds), None, [])
    # copy-on-write mapping: pages are shared until written (nothing here writes them)
    return PointSplit(torch.from_numpy(np.load(consolidated, mmap_mode='c')), None, [])


def save_array_atomically(path, array):
    """np.save to a temporary file beside `path`, then rename: readers never see half a file."""
    temporary = f'{path}.{os.getpid()}.tmp'
    try:
        with open(temporary, 'wb') as f:
            np.save(f, array)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_shapenet55_files(root, names, num_points, seed):
    """The ~42k reads: (S, num_points, 3) float32, each a seeded random subset of its npy, normalised."""
    rng = np.random.default_rng(seed)
    clouds = np.empty((len(names), num_points, 3), np.float32)       # (S, num_points, 3)
    for i, name in enumerate(names):                                  # load time, not the training loop
        path = os.path.join(root, 'shapenet_pc', os.path.basename(name))
        cloud = read_npy(path, SHAPENET_LAYOUT)                       # (8192, 3)
        if cloud.ndim != 2 or cloud.shape[1] != 3 or not np.issubdtype(cloud.dtype, np.floating):
            raise ValueError(f'{path}: expected a float (8192, 3) array, got {cloud.dtype} {cloud.shape}')
        if len(cloud) < num_points:
            raise ValueError(f'{path}: {len(cloud)} points, fewer than the {num_points} requested')
        clouds[i] = cloud[rng.permutation(len(cloud))[:num_points]]   # shuffle, keep the first n
    return normalize_unit_sphere(torch.from_numpy(clouds)).numpy()


def read_modelnet40_dat(data_root, split, num_points=None):
    """Point-BERT's 8192-point ModelNet40 pickles: xyz normalised, normals dropped.

    num_points=None keeps all 8192 (fine-tuning runs FPS 1200 then a random 1024 per step);
    otherwise the first num_points of each cloud; like Point-BERT's loader we slice, then normalise.
    """
    check_split(split)
    folder = os.path.join(data_root, 'ModelNet', 'modelnet40_normal_resampled')
    path = os.path.join(folder, f'modelnet40_{split}_8192pts_fps.dat')
    content = read_pickle(path, MODELNET_DAT_LAYOUT)
    if not isinstance(content, (list, tuple)) or len(content) != 2:
        raise ValueError(f'{path}: expected a pickled pair [list of points, list of labels]')
    xyz = stack_xyz(content[0], path)                                 # (S, 8192, 3)
    points = check_point_array(xyz, path, num_points or xyz.shape[1])
    labels = check_labels(content[1], len(points), len(MODELNET40_CLASSES), path)
    names = check_class_names(os.path.join(folder, 'modelnet40_shape_names.txt'), MODELNET40_CLASSES)
    return PointSplit(normalize_unit_sphere(points), labels, names)


def read_h5_split(paths, num_points, class_names, layout):
    """Concatenate h5 files -> PointSplit of their first num_points points, not re-normalised."""
    clouds, labels = [], []
    for path in paths:
        data, label = read_h5(path, layout)
        clouds.append(check_point_array(data, path, num_points or np.shape(data)[1]))
        labels.append(check_labels(label, len(clouds[-1]), len(class_names), path))
    return PointSplit(torch.cat(clouds), torch.cat(labels), list(class_names))


def read_modelnet40_h5(data_root, split, num_points=1024):
    """PointNet's modelnet40_ply_hdf5_2048 for the linear SVM: the first 1024 points, as stored."""
    check_split(split)
    folder = require_path(os.path.join(data_root, 'modelnet40_ply_hdf5_2048'), MODELNET_H5_LAYOUT)
    pattern = os.path.join(folder, f'ply_data_{split}*.h5')
    paths = sorted(glob.glob(pattern))          # deviation: the official glob order is unsorted
    if not paths:
        require_path(pattern, MODELNET_H5_LAYOUT)
    names = check_class_names(os.path.join(folder, 'shape_names.txt'), MODELNET40_CLASSES)
    return read_h5_split(paths, num_points, names, MODELNET_H5_LAYOUT)


def read_scanobjectnn(data_root, variant, split, num_points=None):
    """ScanObjectNN h5, variant 'objbg' | 'objonly' | 'hardest' (PB-T50-RS); 2048 points, as stored."""
    check_split(split)
    folder, suffix = {'objbg': ('main_split', ''), 'objonly': ('main_split_nobg', ''),
                      'hardest': ('main_split', '_augmentedrot_scale75')}[variant]
    prefix = 'training' if split == 'train' else 'test'
    path = os.path.join(data_root, 'ScanObjectNN', folder, f'{prefix}_objectdataset{suffix}.h5')
    return read_h5_split([path], num_points, SCANOBJECTNN_CLASSES, SCAN_LAYOUT)


def load_fewshot_fold(data_root, way, shot, fold, num_points=None):
    """One ModelNet40 few-shot fold -> (train, test) PointSplits, labels 0..way-1, xyz normalised.

    class_names[k] is the ModelNet40 name of the fold's class k (the pickle's third field).
    Point-BERT publishes folders named '5way10shot'; its loader reads '5way_10shot': both work.
    """
    root = os.path.join(data_root, 'ModelNetFewshot')
    path = os.path.join(root, f'{way}way{shot}shot', f'{fold}.pkl')
    loader_path = os.path.join(root, f'{way}way_{shot}shot', f'{fold}.pkl')
    if not os.path.exists(path) and os.path.exists(loader_path):
        path = loader_path
    content = read_pickle(path, FEWSHOT_LAYOUT)
    if not isinstance(content, dict) or not {'train', 'test'} <= set(content):
        raise ValueError(f"{path}: expected a pickled dict with keys 'train' and 'test'")
    splits = []
    for split in ('train', 'test'):
        items = content[split]
        if not items or any(len(item) != 3 for item in items):
            raise ValueError(f'{path}: {split!r} must be a non-empty list of (points, label, class id)')
        xyz = stack_xyz([item[0] for item in items], path)
        points = check_point_array(xyz, path, num_points or xyz.shape[1])
        labels = check_labels(np.array([np.asarray(item[1]).item() for item in items]), len(points), way, path)
        pairs = sorted({(int(label), int(np.asarray(item[2]).item())) for label, item in zip(labels, items)})
        if [label for label, _ in pairs] != list(range(way)):   # each label 0..way-1 once, with one class id
            raise ValueError(f'{path}: {split!r} pairs labels with ModelNet40 class ids as {pairs}, '
                             f'expected labels 0..{way - 1} each with one class id')
        names = [MODELNET40_CLASSES[class_id] for _, class_id in pairs]
        splits.append(PointSplit(normalize_unit_sphere(points), labels, names))
    return splits[0], splits[1]


# ---------------------------------------------------------------- synthetic dataset (shapes: synthetic.py)

def synthetic_shapes(num_shapes, num_points, rng):
    """-> points (S, N, 3) float32 on the unit sphere, labels (S,) int64, classes balanced to within one."""
    clouds, labels = synthetic_clouds(num_shapes, num_points, rng)
    return normalize_unit_sphere(torch.from_numpy(clouds)), torch.from_numpy(labels)


def make_synthetic(num_shapes, num_points=2048, seed=0):
    """Deterministic labeled synthetic shapes: the same seed gives the same tensors."""
    return synthetic_shapes(num_shapes, num_points, np.random.default_rng(seed))


def load_split(name, split, data_root='./data', num_points=None, seed=0):
    """One split of one dataset as a PointSplit (see the file docstring).

    name: one of DATASET_NAMES; split: 'train' | 'test', and 'pretrain' for synthetic.
    num_points=None is the protocol's default: 2048 for synthetic and ShapeNet, all 8192 for the
    ModelNet40 .dat files (FPS happens in the step), the first 1024 for the SVM h5 files, 2048 for
    ScanObjectNN. seed picks the dataset (synthetic shapes, ShapeNet subsets), not the training run:
    keep it the same in pretrain.py, svm_eval.py and finetune.py."""
    if name == 'synthetic':
        check_split(split, tuple(SYNTHETIC_SPLIT_SIZES))
        rng = np.random.default_rng([seed, list(SYNTHETIC_SPLIT_SIZES).index(split)])  # one stream per split
        points, labels = synthetic_shapes(SYNTHETIC_SPLIT_SIZES[split], num_points or 2048, rng)
        if split == 'pretrain':
            return PointSplit(points, None, [])
        return PointSplit(points, labels, list(SYNTHETIC_CLASSES))
    if name == 'shapenet':
        return read_shapenet55(data_root, split, num_points or 2048, seed)
    if name == 'modelnet40':
        return read_modelnet40_dat(data_root, split, num_points)
    if name == 'modelnet40_svm':
        return read_modelnet40_h5(data_root, split, num_points or 1024)
    if name in ('scan_objbg', 'scan_objonly', 'scan_hardest'):
        return read_scanobjectnn(data_root, name[len('scan_'):], split, num_points)
    raise ValueError(f'unknown dataset {name!r}; choose one of {DATASET_NAMES}')


# ---------------------------------------------------------------- augmentations (batched, on the device)
# `generator` must live on xyz's device; None uses torch's global RNG (seeded once by --seed).

def scale_and_translate(xyz, scale_low=2 / 3, scale_high=3 / 2, translate=0.2, generator=None):
    """(B, N, 3) -> (B, N, 3): per sample, per axis scale ~ U(low, high), then shift ~ U(-t, t)
    (official PointcloudScaleAndTranslate, without its loop over the batch)."""
    B = xyz.shape[0]
    scale = torch.rand(B, 1, 3, generator=generator, device=xyz.device) * (scale_high - scale_low) + scale_low
    shift = (torch.rand(B, 1, 3, generator=generator, device=xyz.device) * 2 - 1) * translate
    return xyz * scale + shift


def rotate_about_up_axis(xyz, generator=None):
    """(B, N, 3) -> (B, N, 3): ONE angle ~ U(-pi, pi) for the whole batch, about the y axis
    (the ScanObjectNN fine-tuning rotation, SPEC section 8.3)."""
    angle = (torch.rand((), generator=generator, device=xyz.device) * 2 - 1) * math.pi
    c, s = torch.cos(angle), torch.sin(angle)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    rotation = torch.stack([torch.stack([c, zero, s]), torch.stack([zero, one, zero]),
                            torch.stack([-s, zero, c])]).to(xyz.dtype)          # (3, 3)
    return xyz @ rotation.T


def random_point_subset(xyz, n, generator=None):
    """(B, N, 3) -> (B, n, 3): a different random n-subset per sample, without replacement.
    n = N is a random permutation, which is what the official train loaders' shuffle does."""
    B, N, _ = xyz.shape
    if n > N:
        raise ValueError(f'cannot take {n} points out of {N}')
    idx = torch.rand(B, N, generator=generator, device=xyz.device).argsort(dim=1)[:, :n]   # (B, n)
    return gather_points(xyz, idx)


def fps_subsample(xyz, n):
    """(B, N, 3) -> (B, n, 3): deterministic farthest point sampling (test-time inputs)."""
    return gather_points(xyz, farthest_point_sample(xyz, n))


def fps_pool(points, n, pool_size=16, seed=0, batch_size=256):
    """(S, N, 3) clouds -> (S, pool_size, n) point indices (int16 where N allows it: ModelNet40's
    9843 clouds x 16 x 1200 take 378 MB): pool_size farthest-point samplings of n points per cloud,
    each from a random start, computed once (on the device of `points`).

    The official fine-tuning loader shuffles a cloud at every read and then runs FPS from index 0,
    so each read's FPS starts at a random point. Running that FPS (ModelNet40: 1200 of 8192, ~85%
    of a fine-tuning step) every step is the cost this pool removes: each training read draws one
    of the pool's samplings instead (draw_from_fps_pool). Each pooled sampling is exactly an
    official one (a random permutation, then FPS from its first point, ties to the earlier point
    of the permutation).
    deviation: a cloud's FPS start is one of pool_size drawn once (seeded), not one of all N drawn
    at every read; the random n-subset and the scaling that follow still vary at every read.
    """
    generator = torch.Generator(device=points.device).manual_seed(seed)
    S, N, _ = points.shape
    pool = torch.empty(S, pool_size, n, dtype=torch.int16 if N <= 2 ** 15 else torch.int32, device=points.device)
    for p in range(pool_size):
        shuffles = torch.rand(S, N, generator=generator, device=points.device).argsort(dim=1)   # (S, N)
        for start in range(0, S, batch_size):   # batches of clouds bound the memory, not the result
            shuffle = shuffles[start:start + batch_size]
            picked = farthest_point_sample(gather_points(points[start:start + batch_size], shuffle), n)
            pool[start:start + batch_size, p] = shuffle.gather(1, picked).to(pool.dtype)   # shuffle positions -> points
    return pool


def draw_from_fps_pool(xyz, pool, generator=None):
    """xyz (B, N, 3) and its clouds' pools (B, P, n) -> (B, n, 3): one of each cloud's P pooled
    samplings, uniformly at random, in its FPS order."""
    B, P, n = pool.shape
    choice = torch.randint(P, (B, 1, 1), generator=generator, device=pool.device).expand(-1, -1, n)
    return gather_points(xyz, pool.gather(1, choice)[:, 0].to(xyz.device, torch.long))


# ---------------------------------------------------------------- demo: baselines and a picture

def global_statistics(xyz, bins=16):
    """(B, N, 3) -> (B, 8 + 3 * bins) hand-crafted, yaw-invariant shape statistics: covariance
    eigenvalues, height range, horizontal spread, and histograms of the distance to the centroid,
    of the height and of the distance to the up axis."""
    centred = xyz - xyz.mean(dim=1, keepdim=True)
    eig3 = torch.linalg.eigvalsh(centred.transpose(1, 2) @ centred / xyz.shape[1])          # (B, 3)
    xz = centred[..., [0, 2]]
    eig2 = torch.linalg.eigvalsh(xz.transpose(1, 2) @ xz / xyz.shape[1])                    # (B, 2)
    height = centred[..., 1]                                                                 # (B, N)
    y_range = torch.stack([height.amin(1), height.amax(1), height.std(1)], 1)               # (B, 3)

    def histogram(values, low, high):                                                        # (B, N) -> (B, bins)
        idx = ((values - low) / (high - low) * bins).long().clamp(0, bins - 1)
        counts = torch.zeros(len(values), bins, device=values.device).scatter_add_(1, idx, torch.ones_like(values))
        return counts / values.shape[1]
    return torch.cat([eig3, eig2, y_range, histogram(centred.norm(dim=-1), 0, 1),
                      histogram(height, -1, 1), histogram(xz.norm(dim=-1), 0, 1)], 1)


def random_encoder_features(xyz, width=256, seed=0):
    """(B, N, 3) -> (B, width): a randomly initialised PointNet (shared MLP, max-pool), untrained.
    A stand-in for svm_eval.py on a random-init I2P-MAE encoder."""
    generator = torch.Generator().manual_seed(seed)
    w1 = torch.randn(3, 32, generator=generator).to(xyz.device)
    w2 = (torch.randn(32, width, generator=generator) / 32 ** 0.5).to(xyz.device)
    return torch.cat([(torch.relu(chunk @ w1) @ w2).amax(dim=1) for chunk in xyz.split(64)])   # (B, width)


def linear_svm_accuracies(train_x, train_y, test_x, test_y):
    """Standardised features, sklearn's LinearSVC -> (train accuracy, test accuracy) in %."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC
    svm = make_pipeline(StandardScaler(), LinearSVC(C=1.0, max_iter=20000)).fit(train_x.numpy(), train_y.numpy())
    return 100 * svm.score(train_x.numpy(), train_y.numpy()), 100 * svm.score(test_x.numpy(), test_y.numpy())


def example_images(xyz):
    """(K, N, 3) y-up clouds -> (K, 1, S, S): project.py's third view (rows from y, columns from z),
    flipped so that up is up."""
    from project import project_depth_images
    images, _ = project_depth_images(xyz)                 # (3K, 3, S, S), views stacked
    return images[2 * len(xyz):, :1].flip(-2)


def main():
    parser = argparse.ArgumentParser(description='Synthetic dataset demo: timing, baselines, a picture.')
    parser.add_argument('--seed', type=int, default=0, help='dataset seed, as load_split takes it (default: 0)')
    parser.add_argument('--out', default='runs/demo', help='folder for synthetic_classes.png (default: runs/demo)')
    args = parser.parse_args()
    from torchvision.utils import make_grid, save_image

    start = time.perf_counter()
    points, labels = make_synthetic(1000, 2048, seed=0)
    print(f'make_synthetic(1000, 2048): {time.perf_counter() - start:.2f} s, points {tuple(points.shape)}')
    print('shapes per class:', dict(zip(SYNTHETIC_CLASSES, labels.bincount().tolist())))
    assert torch.equal(points, make_synthetic(1000, 2048, seed=0)[0]), 'not deterministic'

    train = load_split('synthetic', 'train', seed=args.seed)        # the splits svm_eval.py sees
    test = load_split('synthetic', 'test', seed=args.seed)
    print(f'linear SVMs fit on {len(train.labels)} train shapes, scored on {len(test.labels)} test shapes')
    for name, features in (('hand-crafted global statistics', global_statistics),
                           ('random-init PointNet, max-pool', random_encoder_features)):
        train_acc, test_acc = linear_svm_accuracies(features(train.points), train.labels,
                                                    features(test.points), test.labels)
        print(f'linear SVM on {name}: train {train_acc:.1f}%, test {test_acc:.1f}%')

    first_of_class = torch.stack([(labels == k).nonzero()[0, 0] for k in range(len(SYNTHETIC_CLASSES))])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, 'synthetic_classes.png')
    save_image(make_grid(example_images(points[first_of_class]), nrow=7, padding=4, pad_value=0.5), path)
    print(f'one example per class, in the order {SYNTHETIC_CLASSES}: {path}')


if __name__ == '__main__':
    main()
