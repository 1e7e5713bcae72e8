"""
test_all.py: executable documentation for every stage, in pipeline order.

Run with `python -m pytest -q test_all.py` (or `python test_all.py`).
Reference tests read the authors' recorded tensors from $I2P_REFERENCE_DIR
(default ../shared/reference) and take every size from the files' config.
"""
import os
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE_DIR = os.environ.get('I2P_REFERENCE_DIR', os.path.join(HERE, '..', 'shared', 'reference'))


# ---------------------------------------------------------------- core stages


# ---------------------------------------------------------------- data.py

import math  # noqa: E402  (data.py section)
import pickle  # noqa: E402

import h5py  # noqa: E402

import data  # noqa: E402


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


# ---------------------------------------------------------------- entry scripts


if __name__ == '__main__':
    sys.exit(pytest.main([__file__, '-q']))
