"""
data.py: every point cloud the project reads, behind one call.

    load_split(name, split, data_root='./data', num_points=None, seed=0) -> PointSplit
      points       (S, N, 3) float32  S shapes of N points, xyz only
      labels       (S,) int64         official class order; None for pre-training pools
      class_names  list[str]          label id -> name ([] for pre-training pools)

Real datasets are read once, up front, from the exact on-disk formats of
Point-BERT / Point-MAE / I2P-MAE (layout: docs/data.md); nothing is
downloaded. 'synthetic', the default of every entry script, is generated from
parts (tables, chairs, lamps, ...), so the whole chain runs with no data at all.
The entry scripts index batches out of `points` and move them to the device;
the augmentations below then run batched there, drawing from torch's RNG:
    scale_and_translate, rotate_about_up_axis, random_point_subset, fps_subsample
Part segmentation (segment.py) reads its own splits, with a part label per point:
    load_part_split(name, split, data_root='./data', num_points=None, seed=0) -> PartSplit
      points (S, M, 3), parts (S, M) global part ids, counts (S,) points per shape (the rest of
      the M rows is padding), categories (S,), category_names, category_parts (the part table)
    'synthetic' (the same clouds as load_split's, with parts) or 'shapenetpart' (its text files,
    parsed once and cached); draw_part_points draws the points a step sees, with replacement.
Shapes: synthetic.py      Picture: python demo.py data      Tests: the data.py section of test_all.py
"""
import glob
import hashlib
import json
import math
import os
import pickle
import time
import warnings
import zipfile
from typing import List, NamedTuple, Optional

import h5py
import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from tokenizer import farthest_point_sample, gather_points
from synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PARTS, synthetic_clouds, synthetic_part_clouds

# load_split names: ShapeNet-55 (pre-training), ModelNet40 .dat (fine-tuning), ModelNet40 h5
# (linear SVM), ScanObjectNN OBJ-BG / OBJ-ONLY / PB-T50-RS (the hardest)
DATASET_NAMES = ('synthetic', 'shapenet', 'modelnet40', 'modelnet40_svm',
                 'scan_objbg', 'scan_objonly', 'scan_hardest')
# the standard shape_names order (label 0..39), docs/data.md
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
                       'ModelNet/modelnet40_normal_resampled/modelnet40_shape_names.txt\n'
                       '(or, to build the .dat from: modelnet40_{train,test}.txt (ids <class>_<NNNN>, one per line) and '
                       '<class>/<class>_<NNNN>.txt (rows x,y,z,nx,ny,nz))', POINT_BERT)
# points per cloud in Point-BERT's ModelNet40 .dat files (farthest point sampling of the raw 10,000)
MODELNET_DAT_POINTS = 8192
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


class DataError(ValueError):
    """A dataset file that is unreadable or malformed, or holds bad clouds: the message names the file (and
    the cloud). The entry scripts print it alone, without a traceback (training.run_script)."""


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
    """points array (S, N, C>=3) float -> (S, num_points, 3) float32 tensor, every cloud checked
    (check_cloud_values); errors name the file (and the cloud)."""
    points = np.asarray(points)
    if points.ndim != 3 or points.shape[2] < 3:
        raise DataError(f'{path}: expected point clouds of shape (S, N, 3), got shape {points.shape}')
    if not np.issubdtype(points.dtype, np.floating):
        raise DataError(f'{path}: expected float points, got dtype {points.dtype}')
    if points.shape[0] == 0:
        raise DataError(f'{path}: the split is empty')
    if points.shape[1] < num_points:
        raise DataError(f'{path}: clouds have {points.shape[1]} points, fewer than the {num_points} requested')
    points = np.ascontiguousarray(points[:, :num_points, :3], dtype=np.float32)
    check_cloud_values(points, path)
    return torch.from_numpy(points)


def check_cloud_values(points, path, files=None):
    """points (S, N, 3) float32: every cloud finite and not degenerate (all its points at one place, e.g. all
    zero), else a DataError naming `path` and the cloud's index there (or files[index]). Checked once, when
    the split is loaded, with two reductions per cloud: a bad cloud stops the run before its first step,
    not at the first batch that holds it."""
    low, high = points.min(axis=1), points.max(axis=1)                  # (S, 3) each; NaN propagates
    is_not_finite = ~(np.isfinite(low) & np.isfinite(high)).all(axis=1)
    is_degenerate = ~is_not_finite & ((high - low).max(axis=1) <= 0)
    for is_bad, what in ((is_not_finite, 'holds NaN or infinite coordinates'),
                         (is_degenerate, 'is degenerate: all its points lie at one place (zero extent)')):
        if is_bad.any():
            first = int(is_bad.argmax())
            where = files[first] if files is not None else f'{path}: cloud {first} (counting from 0)'
            raise DataError(f'{where} {what} ({int(is_bad.sum())} of the {len(points)} clouds there do); '
                            f'fix or remove it')


def check_labels(labels, num_shapes, num_classes, path):
    """labels array (S,) or (S, 1) integer -> (S,) int64 tensor, every label in 0..num_classes-1."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f'{path}: expected integer labels, got dtype {labels.dtype}')
    labels = labels.reshape(-1)                                       # ModelNet h5 stores (S, 1)
    if len(labels) != num_shapes:
        raise DataError(f'{path}: {len(labels)} labels for {num_shapes} point clouds')
    is_bad = (labels < 0) | (labels >= num_classes)
    if is_bad.any():
        raise DataError(f'{path}: label {labels[is_bad][0]} is outside 0..{num_classes - 1} '
                         f'({is_bad.sum()} shapes affected)')
    return torch.from_numpy(labels.astype(np.int64))


def check_class_names(path, expected):
    """A shape_names file, if present, must list the standard classes in the standard order."""
    if os.path.exists(path):
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
        if names != expected:
            raise DataError(f'{path}: class names differ from the standard order {expected[:3]}...')
    return list(expected)


def read_h5(path, layout):
    """-> (data, label) arrays as stored; other keys (normal, faceId, mask, ...) are ignored."""
    require_path(path, layout)
    try:
        f = h5py.File(path, 'r')
    except OSError as err:
        raise DataError(f'{path}: not a readable HDF5 file ({err})') from err
    with f:
        missing = sorted({'data', 'label'} - set(f.keys()))
        if missing:
            raise DataError(f'{path}: missing key(s) {missing}; the file has {sorted(f.keys())}')
        return f['data'][:], f['label'][:]


def read_npy(path, layout):
    require_path(path, layout)
    try:
        return np.load(path)
    except (ValueError, OSError) as err:
        raise DataError(f'{path}: not a readable .npy array ({err})') from err


def read_pickle(path, layout):
    with open(require_path(path, layout), 'rb') as f:
        try:
            return pickle.load(f)      # only open pickles you trust: unpickling can run code
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise DataError(f'{path}: not a readable pickle ({err})') from err


def stack_xyz(clouds, path):
    """list of (N, C>=3) arrays -> (S, N, 3) float array; all clouds must have one shape."""
    shapes = sorted({np.shape(c) for c in clouds})
    if len(shapes) > 1:
        raise DataError(f'{path}: point clouds of different shapes, e.g. {shapes[:2]}')
    if not clouds or len(shapes[0]) != 2 or shapes[0][1] < 3:
        raise DataError(f'{path}: expected a non-empty list of (N, 3+) clouds, got shapes {shapes[:2]}')
    return np.stack([np.asarray(c)[:, :3] for c in clouds])


def check_split(split, allowed=('train', 'test')):
    if split not in allowed:
        raise ValueError(f'split must be one of {allowed}, got {split!r}')


# ---------------------------------------------------------------- real datasets (docs/data.md)

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
    writable, the split is read file by file, with a warning.
    """
    check_split(split)
    root = os.path.join(data_root, 'ShapeNet55-34')
    list_path = require_path(os.path.join(root, 'ShapeNet-55', f'{split}.txt'), SHAPENET_LAYOUT)
    with open(list_path, 'rb') as f:
        listing = f.read()
    names = [line.strip() for line in listing.decode().splitlines() if line.strip()]
    if not names:
        raise DataError(f'{list_path}: the split is empty')
    digest = hashlib.sha1(listing).hexdigest()[:12]          # another list, another file
    consolidated = os.path.join(root, f'shapenet55_{split}_{num_points}pts_seed{seed}_{digest}.npy')
    if not os.path.exists(consolidated):
        clouds = read_shapenet55_files(root, list_path, names, num_points, seed)
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


def read_shapenet55_files(root, list_path, names, num_points, seed):
    """The ~42k reads: (S, num_points, 3) float32, each a seeded random subset of its npy, checked
    (check_cloud_values) and normalised."""
    rng = np.random.default_rng(seed)
    clouds = np.empty((len(names), num_points, 3), np.float32)       # (S, num_points, 3)
    for i, name in enumerate(names):                                  # load time, not the training loop
        path = os.path.join(root, 'shapenet_pc', os.path.basename(name))
        cloud = read_npy(path, SHAPENET_LAYOUT)                       # (8192, 3)
        if cloud.ndim != 2 or cloud.shape[1] != 3 or not np.issubdtype(cloud.dtype, np.floating):
            raise DataError(f'{path}: expected a float (8192, 3) array, got {cloud.dtype} {cloud.shape}')
        if len(cloud) < num_points:
            raise DataError(f'{path}: {len(cloud)} points, fewer than the {num_points} requested')
        clouds[i] = cloud[rng.permutation(len(cloud))[:num_points]]   # shuffle, keep the first n
    check_cloud_values(clouds, list_path, [os.path.join(root, 'shapenet_pc', os.path.basename(n)) for n in names])
    return normalize_unit_sphere(torch.from_numpy(clouds)).numpy()


def read_modelnet40_dat(data_root, split, num_points=None):
    """Point-BERT's 8192-point ModelNet40 pickles: xyz normalised, normals dropped.

    num_points=None keeps all 8192 (fine-tuning runs FPS 1200 then a random 1024 per step);
    otherwise the first num_points of each cloud; like Point-BERT's loader we slice, then normalise.
    """
    check_split(split)
    folder = os.path.join(data_root, 'ModelNet', 'modelnet40_normal_resampled')
    path = os.path.join(folder, f'modelnet40_{split}_{MODELNET_DAT_POINTS}pts_fps.dat')
    if not os.path.exists(path) and os.path.exists(os.path.join(folder, f'modelnet40_{split}.txt')):
        build_modelnet40_dat(folder, split, MODELNET_DAT_POINTS)   # as the authors' loader does, once
    content = read_pickle(path, MODELNET_DAT_LAYOUT)
    if not isinstance(content, (list, tuple)) or len(content) != 2:
        raise DataError(f'{path}: expected a pickled pair [list of points, list of labels]')
    xyz = stack_xyz(content[0], path)                                 # (S, 8192, 3)
    points = check_point_array(xyz, path, num_points or xyz.shape[1])
    labels = check_labels(content[1], len(points), len(MODELNET40_CLASSES), path)
    names = check_class_names(os.path.join(folder, 'modelnet40_shape_names.txt'), MODELNET40_CLASSES)
    return PointSplit(normalize_unit_sphere(points), labels, names)


def read_raw_modelnet40(path, num_points):
    """One raw modelnet40_normal_resampled/<class>/<id>.txt -> (rows, 6) float32 (x,y,z,nx,ny,nz); checked."""
    try:
        rows = np.loadtxt(require_path(path, MODELNET_DAT_LAYOUT), delimiter=',', ndmin=2).astype(np.float32)   # as theirs
    except ValueError as err:
        raise DataError(f'{path}: not rows of 6 comma-separated numbers ({err})') from None
    if rows.shape[1] != 6 or len(rows) < num_points:
        raise DataError(f'{path}: {rows.shape[0]} rows of {rows.shape[1]} numbers; expected at least {num_points} '
                        f'rows of x,y,z,nx,ny,nz')
    check_cloud_values(rows[None, :, :3], path, [path])
    return rows


def build_modelnet40_dat(folder, split, num_points=MODELNET_DAT_POINTS, batch_size=32, device=None):
    """Write Point-BERT's modelnet40_<split>_<num_points>pts_fps.dat from the raw files, as the authors' loader
    does when it is missing (datasets/ModelNetDataset.py of ZrrSkywalker/I2P-MAE): for each id <class>_<NNNN>
    of modelnet40_<split>.txt, <class>/<id>.txt (10,000 rows x,y,z,nx,ny,nz) reduced to num_points rows (all six
    columns) by farthest point sampling of x,y,z; its label is the class's line of modelnet40_shape_names.txt.
    The pickle holds [list of (num_points, 6) float32, list of (1,) int32], as theirs. FPS runs batched, on
    `device` (default: a GPU if there is one); a progress line; written atomically (a crash leaves no half file).
    """
    path = os.path.join(folder, f'modelnet40_{split}_{num_points}pts_fps.dat')
    classes = check_class_names(require_path(os.path.join(folder, 'modelnet40_shape_names.txt'), MODELNET_DAT_LAYOUT),
                                MODELNET40_CLASSES)
    list_path = os.path.join(folder, f'modelnet40_{split}.txt')
    with open(list_path) as f:
        ids = [line.strip() for line in f if line.strip()]
    labels = []
    for number, shape_id in enumerate(ids, 1):
        name = shape_id.rsplit('_', 1)[0]     # night_stand_0001 -> night_stand
        if name not in classes:
            raise DataError(f'{list_path}, line {number}: {shape_id!r} is not <class>_<NNNN> with a ModelNet40 class')
        labels.append(np.array([classes.index(name)], dtype=np.int32))
    if device is None:   # a one-off preprocessing job: FPS of 10,000 points is 40x faster on a GPU
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    print(f'{path} is missing: building it from the {len(ids)} raw files of {folder} (once, as the authors\' '
          f'loader does: FPS to {num_points} points, on {device})', flush=True)
    clouds, start = [], time.time()
    for first in range(0, len(ids), batch_size):
        batch = [read_raw_modelnet40(os.path.join(folder, i.rsplit('_', 1)[0], f'{i}.txt'), num_points)
                 for i in ids[first:first + batch_size]]
        for size in sorted({len(rows) for rows in batch}):   # clouds of one size are stacked, FPS'd together
            same = [k for k, rows in enumerate(batch) if len(rows) == size]
            rows = torch.from_numpy(np.stack([batch[k] for k in same])).to(device)     # (b, size, 6)
            # deviation: FPS starts at index 0 (deterministic); theirs at an unseeded random index
            picked = gather_points(rows, farthest_point_sample(rows[..., :3], num_points)).cpu().numpy()
            for k, cloud in zip(same, picked):
                batch[k] = cloud                                                     # (num_points, 6)
        clouds += batch
        done, elapsed = len(clouds), time.time() - start
        print(f'\r  {done}/{len(ids)} clouds, {elapsed / 60:.1f} min, about {elapsed / done * (len(ids) - done) / 60:.1f}'
              f' min left', end='', flush=True)
    print()
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        with open(tmp, 'wb') as f:
            pickle.dump([clouds, labels], f)
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DataError(f'{path}: could not write it ({err}); build it where --data_root is writable') from None


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


def fewshot_fold_path(data_root, way, shot, fold):
    """The file load_fewshot_fold reads: Point-BERT's published <w>way<s>shot/<fold>.pkl, or, when only that
    exists, its loader's <w>way_<s>shot/<fold>.pkl."""
    root = os.path.join(data_root, 'ModelNetFewshot')
    path = os.path.join(root, f'{way}way{shot}shot', f'{fold}.pkl')
    loader_path = os.path.join(root, f'{way}way_{shot}shot', f'{fold}.pkl')
    return loader_path if not os.path.exists(path) and os.path.exists(loader_path) else path


def load_fewshot_fold(data_root, way, shot, fold, num_points=None):
    """One ModelNet40 few-shot fold -> (train, test) PointSplits, labels 0..way-1, xyz normalised.

    class_names[k] is the ModelNet40 name of the fold's class k (the pickle's third field).
    Point-BERT publishes folders named '5way10shot'; its loader reads '5way_10shot': both work.
    """
    path = fewshot_fold_path(data_root, way, shot, fold)
    content = read_pickle(path, FEWSHOT_LAYOUT)
    if not isinstance(content, dict) or not {'train', 'test'} <= set(content):
        raise DataError(f"{path}: expected a pickled dict with keys 'train' and 'test'")
    splits = []
    for split in ('train', 'test'):
        items = content[split]
        if not items or any(len(item) != 3 for item in items):
            raise DataError(f'{path}: {split!r} must be a non-empty list of (points, label, class id)')
        xyz = stack_xyz([item[0] for item in items], path)
        points = check_point_array(xyz, f"{path} ['{split}']", num_points or xyz.shape[1])
        labels = check_labels(np.array([np.asarray(item[1]).item() for item in items]), len(points), way, path)
        pairs = sorted({(int(label), int(np.asarray(item[2]).item())) for label, item in zip(labels, items)})
        if [label for label, _ in pairs] != list(range(way)):   # each label 0..way-1 once, with one class id
            raise DataError(f'{path}: {split!r} pairs labels with ModelNet40 class ids as {pairs}, '
                             f'expected labels 0..{way - 1} each with one class id')
        names = [MODELNET40_CLASSES[class_id] for _, class_id in pairs]
        splits.append(PointSplit(normalize_unit_sphere(points), labels, names))
    return splits[0], splits[1]


# ---------------------------------------------------------------- held-out and few-label subsets of a labelled split

def draw_per_class(labels, count, seed):
    """Indices of a seeded random `count(n)` of the n shapes of every class, class by class (count: n -> k)."""
    generator, drawn = torch.Generator().manual_seed(seed), [torch.zeros(0, dtype=torch.long)]
    for c in labels.unique():   # a loop over classes, not samples
        members = (labels == c).nonzero()[:, 0]
        drawn.append(members[torch.randperm(len(members), generator=generator)][:count(len(members))])
    return torch.cat(drawn)


def validation_split(labels, fraction, seed):
    """(train indices, validation indices): a seeded `fraction` of every class held out."""
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[draw_per_class(labels, lambda n: round(fraction * n), seed)] = True
    return (~is_val).nonzero()[:, 0], is_val.nonzero()[:, 0]


def validation_folds(labels, folds, seed=0):
    """[(fit indices, held-out indices)] for each of `folds` folds: every class's shapes dealt, in a seeded
    order, into `folds` parts of sizes within one; each part is held out once (stratified k-fold)."""
    generator, fold_of = torch.Generator().manual_seed(seed), torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():   # a loop over classes, not samples
        members = (labels == c).nonzero()[:, 0]
        fold_of[members[torch.randperm(len(members), generator=generator)]] = torch.arange(len(members)) % folds
    return [((fold_of != k).nonzero()[:, 0], (fold_of == k).nonzero()[:, 0]) for k in range(folds)]


def few_labels(labels, shots, seed):
    """Indices of `shots` shapes of every class (seeded): the labelled few of a few-label evaluation."""
    too_few = [int(c) for c in labels.unique() if (labels == c).sum() < shots]
    if too_few:
        raise ValueError(f'{shots} shapes per class: classes {too_few} have fewer')
    return draw_per_class(labels, lambda n: shots, seed)


def synthetic_fewshot_fold(way, shot, fold, num_points=None, test_per_class=20):
    """One synthetic few-shot fold -> (train, test) PointSplits, labels 0..way-1: `way` of the 13 classes, `shot`
    shapes of each from the synthetic train split and `test_per_class` from its test split (20, as Point-BERT's
    ModelNet40 folds), all drawn with the fold's own seed (from way, shot and fold)."""
    seed = int(np.random.SeedSequence([way, shot, fold]).generate_state(1)[0])
    classes = torch.randperm(len(SYNTHETIC_CLASSES), generator=torch.Generator().manual_seed(seed))[:way].sort().values

    def part_of(split, per_class):
        keep = torch.isin(split.labels, classes).nonzero()[:, 0]
        idx = keep[draw_per_class(split.labels[keep], lambda n: per_class, seed)]
        labels = torch.searchsorted(classes, split.labels[idx])       # a class's position among the fold's
        return PointSplit(split.points[idx], labels, [split.class_names[c] for c in classes])
    return (part_of(load_split('synthetic', 'train', num_points=num_points), shot),
            part_of(load_split('synthetic', 'test', num_points=num_points), test_per_class))


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


# ---------------------------------------------------------------- part segmentation (segment.py)
# ShapeNetPart: 16 categories, in the order of the official synsetoffset2category.txt (alphabetical),
# and the number of global part ids of each, in that order: Airplane 0-3, Bag 4-5, ..., Table 47-49
# (the part table of Point-M2AE's segmentation/main.py; 50 parts in all).
SHAPENETPART_CATEGORIES = ['Airplane', 'Bag', 'Cap', 'Car', 'Chair', 'Earphone', 'Guitar', 'Knife', 'Lamp',
                           'Laptop', 'Motorbike', 'Mug', 'Pistol', 'Rocket', 'Skateboard', 'Table']
SHAPENETPART_PART_COUNTS = [4, 2, 2, 4, 4, 3, 3, 2, 4, 2, 6, 2, 3, 3, 3, 3]
SHAPENETPART_DIR = 'shapenetcore_partanno_segmentation_benchmark_v0_normal'
SHAPENETPART_LAYOUT = (
    f'{SHAPENETPART_DIR}/<synset>/<id>.txt            one point per line: "x y z nx ny nz part"\n'
    f'{SHAPENETPART_DIR}/synsetoffset2category.txt    one "<Category> <synset>" per line, 16 lines\n'
    f'{SHAPENETPART_DIR}/train_test_split/shuffled_{{train,val,test}}_file_list.json'
    '   JSON lists of "shape_data/<synset>/<id>"',
    'https://shapenet.cs.stanford.edu/media/shapenetcore_partanno_segmentation_benchmark_v0_normal.zip '
    "(PointNet++'s ShapeNetPart with normals, the copy Point-M2AE reads)")
# which official lists make each split: the protocol trains on train + val and tests on test
SHAPENETPART_SPLITS = {'trainval': ('train', 'val'), 'train': ('train',), 'val': ('val',), 'test': ('test',)}
SHAPENETPART_CACHE_VERSION = 1   # bump when what the parsed-points cache holds changes


class PartSplit(NamedTuple):
    """A part-segmentation split. Shapes have different numbers of points (ShapeNetPart): shape s
    has counts[s] real points, then padding (zeros, part -1) up to the longest; draw_part_points
    draws from the real ones only. Synthetic shapes all have N points and no padding."""
    points: torch.Tensor               # (S, M, 3) float32, each shape normalised (centroid, max radius 1)
    parts: torch.Tensor                # (S, M) int64 global part id of each point, -1 on padding
    counts: torch.Tensor               # (S,) int64 real points per shape
    categories: torch.Tensor           # (S,) int64 category of each shape
    category_names: List[str]          # category id -> name
    category_parts: List[List[int]]    # category id -> its global part ids


def consecutive_part_ids(part_counts):
    """[4, 2, ...] -> [[0, 1, 2, 3], [4, 5], ...]: each category's global part ids."""
    ends = np.cumsum(part_counts).tolist()
    return [list(range(end - n, end)) for n, end in zip(part_counts, ends)]


def pad_clouds(xyz, parts, counts):
    """Concatenated clouds xyz (P, 3), parts (P,) and counts (S,) (P = counts.sum()) -> points (S, M, 3)
    and parts (S, M), shape s in row s, padded with zeros and part -1 up to the longest (M)."""
    points = pad_sequence(xyz.split(counts.tolist()), batch_first=True)                       # (S, M, 3)
    return points, pad_sequence(parts.long().split(counts.tolist()), batch_first=True, padding_value=-1)


def first_bad_line(path, part_ids, category):
    """The first line of a ShapeNetPart file that is not 'x y z nx ny nz part' with a finite point
    and an integral part id of `category` -> 'line k: what is wrong' (None if every line is fine)."""
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                values = [float(v) for v in fields]
            except ValueError:
                return f'line {number}: not a number in {line.strip()[:80]!r}'
            if len(values) != 7:
                return f'line {number}: {len(values)} numbers, expected 7 (x y z nx ny nz part)'
            if not all(math.isfinite(v) for v in values):
                return f'line {number}: a value is not finite: {line.strip()[:80]!r}'
            if values[6] not in part_ids:
                return (f'line {number}: part {values[6]:g} is not a part of {category} '
                        f'(its parts are {part_ids[0]}..{part_ids[-1]})')
    return None


def read_part_file(path, part_ids, category):
    """One ShapeNetPart shape file -> xyz (n, 3) float32 normalised, part ids (n,) int8 (normals dropped).

    np.loadtxt parses it in C; only a file that fails a check is read again line by line, to name the line.
    """
    if os.path.getsize(require_path(path, SHAPENETPART_LAYOUT)) == 0:
        raise DataError(f'{path}: no points')
    try:
        rows = np.loadtxt(path, dtype=np.float32, ndmin=2, comments=None)     # (n, 7)
    except ValueError:
        rows = None
    is_fine = (rows is not None and rows.shape[1:] == (7,) and np.isfinite(rows).all()
               and np.isin(rows[:, 6], part_ids).all())    # part ids must be integers of this category
    if not is_fine:
        raise DataError(f'{path}, {first_bad_line(path, part_ids, category) or "no points"}')
    check_cloud_values(rows[None, :, :3], path, [path])   # all points at one place: normalising would divide by 0
    return normalize_unit_sphere(torch.from_numpy(rows[:, :3])).numpy(), rows[:, 6].astype(np.int8)


def read_categories_file(path, expected):
    """synsetoffset2category.txt -> {synset: category id}; the names must be `expected`, in order."""
    with open(require_path(path, SHAPENETPART_LAYOUT)) as f:
        rows = [(number, line.split()) for number, line in enumerate(f, 1) if line.strip()]
    for number, fields in rows:
        if len(fields) != 2:
            raise DataError(f'{path}, line {number}: expected "<Category> <synset>", got {" ".join(fields)!r}')
    names = [fields[0] for _, fields in rows]
    if names != expected:
        raise DataError(f'{path}: categories {names} differ from the official {len(expected)}, in order: {expected}')
    return {fields[1]: c for c, (_, fields) in enumerate(rows)}


def read_shape_list(path, synsets):
    """One shuffled_*_file_list.json -> [(synset, shape id)], every entry checked."""
    with open(require_path(path, SHAPENETPART_LAYOUT)) as f:
        try:
            entries = json.load(f)
        except json.JSONDecodeError as err:
            raise DataError(f'{path}: not valid JSON ({err})') from None
    if not isinstance(entries, list):
        raise DataError(f'{path}: expected a JSON list of "shape_data/<synset>/<id>", got {type(entries).__name__}')
    shapes = []
    for entry in entries:
        fields = entry.split('/') if isinstance(entry, str) else []
        if len(fields) != 3 or fields[0] != 'shape_data' or fields[1] not in synsets or not fields[2]:
            raise DataError(f'{path}: entry {entry!r} is not "shape_data/<synset>/<id>" with a synset '
                             f'of synsetoffset2category.txt')
        shapes.append((fields[1], fields[2]))
    return shapes


def read_part_files(paths, categories, category_parts):
    """Every shape file of a split -> xyz (P, 3) float32, parts (P,) int8, counts (S,) int64: the
    shapes' normalised points one after the other (P = counts.sum())."""
    clouds, parts = zip(*[read_part_file(path, category_parts[c], SHAPENETPART_CATEGORIES[c])
                          for path, c in zip(paths, categories)])
    counts = np.array([len(p) for p in parts], dtype=np.int64)
    return np.concatenate(clouds), np.concatenate(parts), counts


def split_fingerprint(root, paths):
    """A digest of the files' names, sizes and modification times: a cache stays valid while it matches."""
    digest = hashlib.sha256(f'version {SHAPENETPART_CACHE_VERSION}'.encode())
    for path in paths:
        stat = os.stat(require_path(path, SHAPENETPART_LAYOUT))
        digest.update(f'{os.path.relpath(path, root)} {stat.st_size} {stat.st_mtime_ns}\n'.encode())
    return digest.hexdigest()


def read_cache(path, fingerprint):
    """The arrays cached at `path` if it exists and matches `fingerprint`, else None."""
    try:
        with np.load(path, allow_pickle=False) as cached:
            if str(cached['fingerprint']) == fingerprint:
                return cached['xyz'], cached['parts'], cached['counts']
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):   # none yet, or a broken one
        pass
    return None


def write_cache(path, fingerprint, xyz, parts, counts):
    """Write the cache atomically (a private temporary file, then os.replace): a crash, or another
    process (DDP ranks) writing the same cache at the same time, never leaves a half-written file."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        with open(tmp, 'wb') as f:
            np.savez(f, fingerprint=np.array(fingerprint), xyz=xyz, parts=parts, counts=counts)
        os.replace(tmp, path)
    except OSError as err:                    # a read-only dataset folder: go on without a cache
        print(f'note: could not write the cache {path} ({err}); the text files will be parsed again next time')
        if os.path.exists(tmp):
            os.remove(tmp)


def read_shapenetpart(data_root, split, cache=True):
    """ShapeNetPart with normals: every point of every shape of the split, xyz normalised, normals dropped.

    split: 'trainval' (the protocol's training set: the train and val lists), 'test', or 'train' / 'val'.
    Shapes come category by category, sorted by id within each, as in Point-M2AE's loader. All points
    are kept: the 2048 the model sees are drawn with replacement by draw_part_points.
    Parsing ~17k text files takes about half a minute, so the parsed points of a split are cached
    next to them (i2p_mae_cache_<split>.npz), valid while no file of the split changes size or time.
    """
    check_split(split, tuple(SHAPENETPART_SPLITS))
    root = os.path.join(data_root, SHAPENETPART_DIR)
    category_of = read_categories_file(os.path.join(root, 'synsetoffset2category.txt'), SHAPENETPART_CATEGORIES)
    category_parts = consecutive_part_ids(SHAPENETPART_PART_COUNTS)
    shapes = set()
    for name in SHAPENETPART_SPLITS[split]:
        list_path = os.path.join(root, 'train_test_split', f'shuffled_{name}_file_list.json')
        shapes.update(read_shape_list(list_path, category_of))
    if not shapes:
        raise DataError(f'{root}/train_test_split: the {split!r} split is empty')
    shapes = sorted(shapes, key=lambda shape: (category_of[shape[0]], shape[1]))
    categories = [category_of[synset] for synset, _ in shapes]
    paths = [os.path.join(root, synset, f'{shape_id}.txt') for synset, shape_id in shapes]
    cache_path, fingerprint = os.path.join(root, f'i2p_mae_cache_{split}.npz'), split_fingerprint(root, paths)
    cached = read_cache(cache_path, fingerprint) if cache else None
    if cached is None:
        print(f'parsing the {len(paths)} ShapeNetPart files of the {split!r} split'
              + (f' (once: then cached in {cache_path})' if cache else ''), flush=True)
    xyz, parts, counts = cached or read_part_files(paths, categories, category_parts)
    if cache and cached is None:
        write_cache(cache_path, fingerprint, xyz, parts, counts)
    counts = torch.from_numpy(counts)
    points, parts = pad_clouds(torch.from_numpy(xyz), torch.from_numpy(parts), counts)
    return PartSplit(points, parts, counts, torch.tensor(categories), list(SHAPENETPART_CATEGORIES), category_parts)


def load_part_split(name, split, data_root='./data', num_points=None, seed=0):
    """One part-segmentation split as a PartSplit.

    'shapenetpart': split 'trainval' | 'test' (or 'train' | 'val'); every point of every shape is kept.
    'synthetic': split 'train' | 'test', num_points per shape (default 2048): the very clouds and
    classes load_split('synthetic', split, num_points=num_points, seed=seed) returns, with part labels.
    """
    if name == 'shapenetpart':
        if num_points is not None:
            raise ValueError('num_points is for synthetic shapes: ShapeNetPart keeps all points of each shape')
        return read_shapenetpart(data_root, split)
    if name != 'synthetic':
        raise ValueError(f"unknown part-segmentation dataset {name!r}; choose 'synthetic' or 'shapenetpart'")
    check_split(split)
    rng = np.random.default_rng([seed, list(SYNTHETIC_SPLIT_SIZES).index(split)])   # load_split's stream
    clouds, labels, parts = synthetic_part_clouds(SYNTHETIC_SPLIT_SIZES[split], num_points or 2048, rng)
    points = normalize_unit_sphere(torch.from_numpy(clouds))
    counts = torch.full((len(points),), points.shape[1], dtype=torch.int64)
    return PartSplit(points, torch.from_numpy(parts), counts, torch.from_numpy(labels), list(SYNTHETIC_CLASSES),
                     consecutive_part_ids([len(SYNTHETIC_PARTS[c]) for c in SYNTHETIC_CLASSES]))


def draw_part_points(points, parts, counts, n, generator=None):
    """n points per shape drawn uniformly WITH replacement from its counts[s] real points, as
    Point-M2AE's loader draws 2048 (np.random.choice(..., replace=True)); batched on the device.
      points (B, M, 3), parts (B, M), counts (B,) -> points (B, n, 3), parts (B, n)"""
    B = points.shape[0]
    u = torch.rand(B, n, generator=generator, device=points.device)
    idx = torch.minimum((u * counts[:, None]).long(), counts[:, None] - 1)     # float rounding can reach counts
    return gather_points(points, idx), parts.gather(1, idx)


def scale_isotropic_and_shift(xyz, scale_low=0.8, scale_high=1.25, shift=0.1, generator=None):
    """(B, N, 3) -> (B, N, 3): per sample, ONE scale ~ U(low, high) for all three axes, then a shift
    ~ U(-shift, shift) per axis (the part-segmentation augmentation of Point-M2AE's provider.py,
    random_scale_point_cloud and shift_point_cloud, without their loop over the batch)."""
    B = xyz.shape[0]
    scale = torch.rand(B, 1, 1, generator=generator, device=xyz.device) * (scale_high - scale_low) + scale_low
    offset = (torch.rand(B, 1, 3, generator=generator, device=xyz.device) * 2 - 1) * shift
    return xyz * scale + offset


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
    (the ScanObjectNN fine-tuning rotation, docs/authors_code.md section 10)."""
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
