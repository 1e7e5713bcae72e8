"""
svm_eval.py: linear-SVM evaluation of a frozen pre-trained encoder (paper section
"Linear SVM"; the authors' tools/runner_test_svm.py).

The encoder runs in eval mode with nothing masked at the coarsest scale; a cloud's feature
is the max over its coarsest tokens (B, 384). A linear SVM (scikit-learn SVC) is fitted on
the training features and scored on the test features; no feature scaling, as the authors.
  python svm_eval.py                                   # the demo's runs/pretrain-synthetic/last.pt, synthetic data
  python svm_eval.py --ckpt runs/pretrain-shapenet/last.pt --data modelnet40
  python svm_eval.py --ckpt pre-train.pth --data scanobjectnn   # the authors' checkpoint
  python svm_eval.py --random_init                     # the same encoder, untrained: the baseline
  python svm_eval.py --shots 1 5 10                    # also: a linear SVM on 1, 5, 10 labelled shapes per class
  python svm_eval.py --split val --cv                  # scored by 5-fold cross-validation on the training split
  python svm_eval.py --run_name svm-demo --save_features runs/svm-demo/features.npz
--split val never reads the test split: choose schedules and recipes with it.
ScanObjectNN's training clouds are read in a seeded random point order (--seed), as the authors'
loader reads them, so that the eval-mode FPS (from index 0) starts anywhere. --run_name keeps the
evaluation in an SVM run folder, runs/<run_name>/: args.json (every flag, the encoder's configuration,
the checkpoint and its SHA-256) and log.jsonl (a header record, then one record with the result);
without it the result is printed only. --save_features writes train_x, train_y, test_x, test_y (.npz).
"""
import argparse
import hashlib
import os
import time
from dataclasses import asdict

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # before torch loads OpenMP: waiting threads sleep (docs/speed.md)
import numpy as np
import torch
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

from model import I2PMAE
from checkpoints import checkpoint_config, load_weights, read_checkpoint
from data import few_labels, load_split, validation_folds
from flags import ArgumentParser, gpu_index, positive_float, positive_int, run_script, seed_value
from processes import Process, sum_over_processes
from training import Run

# the authors' test-script values; their per-epoch monitor used 0.01 (docs/deviations.md, B8). They were tuned for
# their features on real data; on synthetic data (None) C is chosen by cross-validation on train.
SVM_C = {'modelnet40': 0.0093, 'scanobjectnn': 0.018, 'synthetic': None}
# --split val: cross-validation over the training split (each fifth of every class held out once), in place of
# the test split
VAL_FOLDS = 5
# --shots: a few labelled shapes per class, drawn FEW_LABEL_DRAWS times. At most a few hundred shapes in 256 or 384
# dimensions are linearly separable, and a hard margin (a C this large) needs no C chosen, which so few labels
# could not do (nor may the test split)
FEW_LABEL_C = 1e4
FEW_LABEL_DRAWS = 10
# the default --ckpt: the pre-training run of this kind of data (finetune.py and segment.py default to the same)
PRETRAINED = {'modelnet40': 'runs/pretrain-shapenet/last.pt', 'scanobjectnn': 'runs/pretrain-shapenet/last.pt',
              'synthetic': 'runs/pretrain-synthetic/last.pt'}
# (dataset name in data.py, points per cloud): ModelNet40 uses the first 1024 h5 points, OBJ-BG all 2048
SVM_DATA = {'modelnet40': ('modelnet40_svm', 1024), 'scanobjectnn': ('scan_objbg', 2048), 'synthetic': ('synthetic', None)}
# the files each --data reads, for the messages about missing ones (finetune.py reads ModelNet40 from the .dat files)
DATA_FILES = {'modelnet40': "PointNet's modelnet40_ply_hdf5_2048/ply_data_{train,test}*.h5 (the authors' SVM protocol: "
                            "the first 1024 of their 2048 points, as stored), not the .dat files finetune.py reads",
              'scanobjectnn': 'ScanObjectNN/main_split/{training,test}_objectdataset.h5 (OBJ-BG)',
              'synthetic': 'no files (generated)'}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', default=None, help='pretrain.py checkpoint or the authors\' pre-train.pth (default: the '
                                                'pre-training run of the data, as finetune.py: runs/pretrain-synthetic/'
                                                'last.pt on synthetic data, runs/pretrain-shapenet/last.pt on real data)')
    p.add_argument('--data', default='synthetic', choices=sorted(SVM_DATA), help='evaluation data set')
    p.add_argument('--data_root', default='./data', help='folder holding the datasets')
    p.add_argument('--num_points', type=positive_int, default=None,
                   help='points per cloud (default: 1024 ModelNet40, 2048 ScanObjectNN, the pre-training count on synthetic)')
    p.add_argument('--C', type=positive_float, default=None,
                   help='SVM C (default: 0.0093 ModelNet40, 0.018 ScanObjectNN, cross-validated on synthetic)')
    p.add_argument('--cv', action='store_true', help='choose C by 5-fold cross-validation on the training features only')
    p.add_argument('--split', choices=['test', 'val'], default='test',
                   help=f'score on the test split (default), or by {VAL_FOLDS}-fold cross-validation over the training '
                        f'split (val: each fold fitted on the rest, scored on the fold; to choose schedules and '
                        f'recipes, the test split is not read)')
    p.add_argument('--shots', type=positive_int, nargs='+', default=[],
                   help=f'also fit a linear SVM on this many labelled shapes per class ({FEW_LABEL_DRAWS} seeded draws, '
                        f'hard margin C {FEW_LABEL_C:g}) and score it on the same split: the few-label setting')
    p.add_argument('--random_init', action='store_true',
                   help='evaluate a randomly initialised encoder of the same shape (BatchNorm statistics '
                        'estimated on the training clouds first, see calibrate_batchnorm)')
    p.add_argument('--calibrate_batchnorm', action='store_true',
                   help='re-estimate BatchNorm statistics on the training clouds, nothing masked, before extracting features')
    p.add_argument('--batch_size', type=positive_int, default=128, help='feature extraction batch (official: 128)')
    p.add_argument('--gpu', type=gpu_index, default=0 if torch.cuda.is_available() else -1, help='GPU index, -1 = CPU')
    p.add_argument('--seed', type=seed_value, default=0, help='the ScanObjectNN training clouds\' point shuffle (default: 0)')
    p.add_argument('--save_features', metavar='PATH.npz', help='also write the train/test features and labels there')
    p.add_argument('--run_name', help='keep this evaluation in runs/<run_name>/: args.json and log.jsonl (a header '
                                      'record, then the result); default: print only')
    p.add_argument('--overwrite', action='store_true', help='with --run_name: replace another run in that folder')
    args = p.parse_args(argv)
    if args.C is not None and args.cv:
        p.error('--C and --cv: give a C, or let cross-validation choose it, not both')
    if args.save_features is not None and args.split == 'val':
        p.error('--save_features writes the test split\'s features too; --split val does not read it')
    if args.save_features is not None and not args.save_features.endswith('.npz'):
        p.error(f'--save_features {args.save_features}: name a .npz file (numpy.savez adds .npz otherwise)')
    return args


def load_student(path, random_init=False):
    """The pre-trained I2PMAE from our checkpoint or the authors' (checkpoints.load_weights), and the flags it was
    trained with."""
    checkpoint = read_checkpoint(path, '--ckpt')
    student = I2PMAE(checkpoint_config(checkpoint, path))
    skipped = {} if random_init else load_weights(student, checkpoint, path)
    for key, why in skipped.items():
        print(f'  skipped {key}: {why}')
    return student, checkpoint.get('args', {})


@torch.no_grad()
def extract_features(student, points, batch_size, device, process=None):
    """(S, N, 3) clouds -> (S, C) numpy features of the frozen encoder, in batches, with progress.
    With a `process` of a multi-process run, each process encodes every world-th cloud (all take part)
    and every process gets all the features."""
    student.eval()
    rank, world = (process.rank, process.world) if process else (0, 1)
    features = []
    for start in range(rank * batch_size, len(points), world * batch_size):   # this process's batches
        features.append(student.svm_features(points[start:start + batch_size].to(device)).float())
        if rank == 0:
            print(f'\r  features {min(start + world * batch_size, len(points))}/{len(points)}', end='', flush=True)
    if rank == 0:
        print()
    mine = torch.cat(features) if features else torch.zeros(0, student.cfg.encoder_dims[-1], device=device)
    if world > 1:   # every process's batches, added into one zero-padded array (an exact sum: one writer a row)
        everything = torch.zeros(len(points), mine.shape[1], device=device)
        rows = torch.cat([torch.arange(s, min(s + batch_size, len(points)), device=device)
                          for s in range(rank * batch_size, len(points), world * batch_size)] or
                         [torch.zeros(0, dtype=torch.long, device=device)])
        mine = sum_over_processes(everything.index_copy(0, rows, mine), process)
    return mine.cpu().numpy()


@torch.no_grad()
def calibrate_batchnorm(student, points, batch_size, device):
    """Estimate BatchNorm running statistics on these clouds (forwards with only the BatchNorms in
    training mode: stochastic depth stays off; no gradients).

    Freshly initialised BatchNorm layers hold mean 0 / variance 1, while the authors' init gives
    their inputs a variance near 1e-5: an untrained encoder in eval mode then outputs nearly the
    same feature for every cloud. Calibrating makes the random-init baseline a fair one.
    """
    student.eval()
    for m in student.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.reset_running_stats()
            m.momentum = None            # a plain average over all batches
            m.train()
    for start in range(0, len(points), batch_size):
        student.svm_features(points[start:start + batch_size].to(device))
    student.eval()


def untrained_pointnet_features(xyz, width=256, seed=0):
    """(B, N, 3) -> (B, width): a randomly initialised PointNet (shared MLP 3-32-width, max-pool), untrained: the
    features of the dataset's own baseline, what a linear SVM gets from a feature that learns nothing."""
    generator = torch.Generator().manual_seed(seed)
    w1 = torch.randn(3, 32, generator=generator).to(xyz.device)
    w2 = (torch.randn(32, width, generator=generator) / 32 ** 0.5).to(xyz.device)
    return torch.cat([(torch.relu(chunk @ w1) @ w2).amax(dim=1) for chunk in xyz.split(64)])   # (B, width)


def linear_svm_accuracy(train_x, train_y, test_x, test_y, C):
    """Test accuracy (%) of SVC(kernel='linear', C) fitted on the training features."""
    svm = SVC(kernel='linear', C=C).fit(train_x, train_y)
    return 100.0 * float((svm.predict(test_x) == test_y).mean())


def choose_C(train_x, train_y, grid=(0.001, 0.0093, 0.018, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)):
    """C by 5-fold cross-validation on the training features only (the test set is never looked at)."""
    search = GridSearchCV(SVC(kernel='linear'), {'C': list(grid)}, cv=5).fit(train_x, train_y)
    return search.best_params_['C']


def shuffle_points(points, seed):
    """(S, N, 3) -> the same clouds, each in its own seeded random point order. The authors' ScanObjectNN
    loader shuffles every training cloud it reads, so their eval-mode FPS (from index 0) starts anywhere."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(points.shape[:2], generator=generator).argsort(dim=1)     # (S, N)
    return points.gather(1, order[..., None].expand_as(points))


def load_svm_split(data, split, data_root, num_points):
    """load_split of --data's split, with the files this script reads named when they are missing or broken."""
    name, default_points = SVM_DATA[data]
    try:
        return load_split(name, split, data_root=data_root, num_points=num_points or default_points)
    except FileNotFoundError as error:   # say which files this script needs (a bad file's own message is clear)
        raise FileNotFoundError(f'svm_eval.py --data {data} reads {DATA_FILES[data]}:\n{error}') from None


def few_label_accuracy(train_x, train_y, test_x, test_y, shots, draws=FEW_LABEL_DRAWS):
    """{k: [accuracy % of each draw]}: a hard-margin linear SVM fitted on k labelled shapes per class (drawn
    with seeds 0 .. draws-1) and scored on all the test features."""
    labels = torch.from_numpy(train_y)
    return {k: [linear_svm_accuracy(train_x[i], train_y[i], test_x, test_y, FEW_LABEL_C)
                for i in (few_labels(labels, k, seed).numpy() for seed in range(draws))] for k in shots}


def svm_scores(train_x, train_y, test_x, test_y, C, cv, shots):
    """(accuracy, C, few-label accuracies) of one fit; C by cross-validation on the fitted features if cv or C is None."""
    C = choose_C(train_x, train_y) if cv or C is None else C
    return (linear_svm_accuracy(train_x, train_y, test_x, test_y, C), C,
            few_label_accuracy(train_x, train_y, test_x, test_y, shots))


def evaluate(student, data, data_root, num_points, C, batch_size, device, cv=False, calibrate=False, process=None,
             seed=0, features_path=None, split='test', shots=()):
    """Linear-SVM accuracy of the student's frozen features: a dict of accuracy, C, n_train, n_test, and
    few_label ({k: [accuracy of each draw]} for k in shots).

    split 'test': fitted on the training split, scored on the test split. split 'val': VAL_FOLDS-fold
    cross-validation over the training split (data.validation_folds), the test split is not read: each fold
    is fitted on the rest (with C chosen there) and scored on its held-out part; accuracy is their mean and
    C the list of each fold's.
    calibrate=True first estimates BatchNorm statistics on the training clouds (random-init baseline).
    process: in a multi-process run every process extracts its share of the features, then fits the
    same SVM on all of them (no process waits in a collective while another fits).
    ScanObjectNN's training clouds are shuffled point-wise first (shuffle_points, `seed`), as the authors'
    loader does. features_path: also write the features and labels there (train_x, train_y, test_x, test_y).
    """
    train = load_svm_split(data, 'train', data_root, num_points)
    if data == 'scanobjectnn':
        train = train._replace(points=shuffle_points(train.points, seed))
    if calibrate:
        calibrate_batchnorm(student, train.points, batch_size, device)
    train_x, train_y = extract_features(student, train.points, batch_size, device, process), train.labels.numpy()
    if split == 'test':
        test = load_svm_split(data, 'test', data_root, num_points)
        test_x, test_y = extract_features(student, test.points, batch_size, device, process), test.labels.numpy()
        if features_path is not None:
            save_features(features_path, train_x, train_y, test_x, test_y)
        parts = [(train_x, train_y, test_x, test_y)]
    else:
        parts = [(train_x[fit], train_y[fit], train_x[held], train_y[held])
                 for fit, held in validation_folds(train.labels, VAL_FOLDS)]
    scores = [svm_scores(*part, C, cv, shots) for part in parts]
    return dict(accuracy=float(np.mean([accuracy for accuracy, _, _ in scores])), n_train=len(parts[0][0]),
                C=scores[0][1] if split == 'test' else [C for _, C, _ in scores], n_test=sum(len(p[2]) for p in parts),
                few_label={k: [a for _, _, few in scores for a in few[k]] for k in shots})


def save_features(path, train_x, train_y, test_x, test_y):
    """numpy .npz of the features and labels (atomically), for trying other classifiers without re-extracting."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    try:
        with open(path + '.tmp', 'wb') as f:
            np.savez(f, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    except OSError as error:
        if os.path.exists(path + '.tmp'):
            os.remove(path + '.tmp')
        raise SystemExit(f'--save_features {path}: could not write it ({error})') from None
    os.replace(path + '.tmp', path)
    print(f'  features and labels written to {path} (train_x {train_x.shape}, test_x {test_x.shape})')


def svm_check(student, args, process, baseline=False):
    """pretrain.py's periodic monitor: {'svm_accuracy': %} on synthetic data or ModelNet40, never used to pick
    checkpoints; with baseline, also 'baseline_svm_accuracy', the same SVM on an untrained PointNet's features
    (the reference line of curves.png). Every process of the run takes part and gets the same numbers."""
    data = 'synthetic' if args.data == 'synthetic' else 'modelnet40'
    points = args.num_points if data == 'synthetic' else None
    result = evaluate(student, data, args.data_root, points, SVM_C[data], 128, process.device, process=process)
    student.train()
    numbers = dict(svm_accuracy=result['accuracy'])
    if baseline:
        train, test = (load_svm_split(data, split, args.data_root, points) for split in ('train', 'test'))
        train_x, test_x = (untrained_pointnet_features(s.points).numpy() for s in (train, test))
        numbers['baseline_svm_accuracy'] = svm_scores(train_x, train.labels.numpy(), test_x, test.labels.numpy(),
                                                      SVM_C[data], False, ())[0]
    return numbers


def main(args):
    torch.manual_seed(args.seed)
    if args.gpu >= 0 and not torch.cuda.is_available():
        raise SystemExit(f'--gpu {args.gpu}: no CUDA device here; use --gpu -1 for the CPU')
    device = torch.device('cuda', args.gpu) if args.gpu >= 0 else torch.device('cpu')
    path = args.ckpt or PRETRAINED[args.data]
    if not os.path.isfile(path):   # before anything is announced or read
        command = 'python pretrain.py' + ('' if args.data == 'synthetic' else ' --data shapenet')
        raise SystemExit((f'--ckpt {path}: no such file. Pre-train first' if args.ckpt else f'no {path}: pre-train first')
                         + f' ({command}), or pass --ckpt PATH (our last.pt or the authors\' pre-train.pth)')
    print(f'linear SVM on {args.data} of the {"RANDOMLY INITIALISED" if args.random_init else "pre-trained"} encoder of '
          f'{path}' + ('' if args.ckpt else f' (the default --ckpt: the run of pretrain.py on {args.data} data)')
          + (f', scored by {VAL_FOLDS}-fold cross-validation over the training split (--split val)'
             if args.split == 'val' else ''))
    student, trained_with = load_student(path, args.random_init)
    student.to(device)
    num_points = args.num_points or (trained_with.get('num_points') if args.data == 'synthetic' else None)
    if (num_points or SVM_DATA[args.data][1] or 2048) < student.cfg.min_points:
        raise SystemExit(f'--num_points {num_points}: the encoder of {path} groups {student.cfg.min_points} points '
                         f'per cloud at its finest scale')
    run = None
    if args.run_name:   # an SVM run folder: args.json, log.jsonl (a header record, then the result)
        run = Run(os.path.join('runs', args.run_name), Process(device), 'svm_eval.py')
        if os.path.realpath(os.path.dirname(path)) == os.path.realpath(run.folder):
            raise SystemExit(f'--run_name {args.run_name}: {path} is in that folder; keep the SVM result in another '
                             f'one (e.g. --run_name {args.run_name}-svm)')
        run.claim(overwrite=args.overwrite)   # checks (and --overwrite clears) the folder; written after the SVM,
        with open(path, 'rb') as f:           # so a failed evaluation leaves nothing that blocks a retry
            checkpoint_sha256 = hashlib.file_digest(f, 'sha256').hexdigest()
    print(f'  model {asdict(student.cfg)}')
    start = time.time()
    given_C = args.C if args.C is not None else SVM_C[args.data]
    r = evaluate(student, args.data, args.data_root, num_points, given_C, args.batch_size, device, args.cv,
                 calibrate=args.random_init or args.calibrate_batchnorm, seed=args.seed, features_path=args.save_features,
                 split=args.split, shots=args.shots)
    chosen = args.cv or given_C is None
    scored = 'test' if args.split == 'test' else f'held-out (each once, {VAL_FOLDS} folds)'
    line = (f'{"accuracy" if args.split == "test" else "validation accuracy"} {r["accuracy"]:.2f}%  (C {r["C"]}'
            f'{" by cross-validation on the training features" if chosen else ""}, {r["n_train"]} train / {r["n_test"]} '
            f'{scored} shapes, {time.time() - start:.1f} s)')
    few = {k: (float(np.mean(v)), float(np.std(v))) for k, v in r['few_label'].items()}
    line += ''.join(f'\n  {k} labelled shape{"s" * (k > 1)} per class: {m:.2f} ± {sd:.2f}% (hard margin, mean ± std '
                    f'over {FEW_LABEL_DRAWS} draws)' for k, (m, sd) in few.items())
    if run is None:
        print(line)
    else:
        run.start(args, model_config=asdict(student.cfg), checkpoint=path, checkpoint_sha256=checkpoint_sha256,
                  trained_with=trained_with)
        run.log(line, accuracy=r['accuracy'], C=r['C'], C_by_cross_validation=chosen, n_train=r['n_train'],
                n_test=r['n_test'], split=args.split, seconds=time.time() - start, checkpoint=path,
                features=args.save_features, few_label={str(k): v for k, v in r['few_label'].items()},
                few_label_mean={str(k): m for k, (m, _) in few.items()})
    return r['accuracy']


if __name__ == '__main__':
    run_script(main, parse_args)
