"""
ablation.py: the paper's ablation (its Table 6: which of 2D-guided masking and 2D-semantic targets
helps), measured on the synthetic demo, and the question the demo must answer honestly: does a 2D
teacher whose knowledge is NOT the test's labels help the 3D student?

Each row pre-trains the small encoder with pretrain.py's synthetic preset (one schedule for every
row) and seed, with a linear-SVM check after every epoch (a curve), scores the frozen encoder with
a linear SVM on the synthetic test split (svm_eval.py, C by 5-fold cross-validation on the training
features) and with few labels (a hard-margin linear SVM on 1, 5 and 10 labelled shapes per class,
svm_eval.py --shots), and, for the rows in --finetune_rows and --fewshot_rows, fine-tunes it
(finetune.py's synthetic preset; and on --folds 5-way 10-shot folds of the synthetic classes) next
to runs from scratch. --split val scores the linear SVMs by cross-validation over the training
split instead (runs/ablation/table-val.md): how the demo's schedule was chosen, the test split unread. The teachers: the demo's (train_teacher.py: 40 classes of random assemblies,
none of the student's), the same ViT trained on the student's 13 test classes (the leaky
comparison, runs/teacher-sameclass/teacher.pt, trained first if absent), and the same ViT
untrained. It prints a markdown table of mean ± std over the seeds (ddof 1, every seed's number
beside it) with the dataset's own baselines, writes it to runs/ablation/table.md, and draws the SVM
accuracy against pre-training epochs, mean ± std over the seeds, to runs/ablation/curves.png.

Every run keeps its folder under runs/ (ablation-<row>-s<seed>, ...-svm, ...-ft): a run whose
result is already there is not redone, an interrupted one is resumed, so the loop can be stopped
with Ctrl-C and started again.

    python ablation.py                                   # all rows, seeds 0 1 2: hours on 2 CPU cores
    python ablation.py --rows i2p-mae 3d-only --seeds 0  # a part of it
    python ablation.py --table_only                      # the table and curves of what has been measured so far
    python ablation.py --baselines                       # the dataset's own baselines (seconds)
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch

from PIL import Image

from tokenizer import build_token_hierarchy, gather_points, square_distance
from mask import hierarchical_masks, random_mask
from model import chamfer_l2
from data import load_split, scale_and_translate, validation_folds
from svm_eval import VAL_FOLDS, svm_scores, untrained_pointnet_features
from pretrain import PRESETS
from pictures import line_plot

# name: (what the row is, mask, 2D target, teacher, pretrain.py flags); None: no pre-training at all
ROWS = {
    'untrained': ('untrained encoder (BatchNorm calibrated)', '-', '-', '-', None),
    '3d-only': ('3D-only (Point-M2AE)', 'random', 'no', '-', ['--mask', 'random', '--no_2d_target']),
    '2d-target': ('+ 2D target', 'random', 'yes', 'other classes', ['--mask', 'random']),
    'guided-mask': ('+ 2D-guided mask', 'guided', 'no', 'other classes', ['--no_2d_target']),
    'i2p-mae': ('I2P-MAE', 'guided', 'yes', 'other classes', []),
    'i2p-mae-same-classes': ('I2P-MAE, leaky: the teacher learned the test classes\' labels', 'guided', 'yes',
                             'the test classes', ['--teacher_weights', 'runs/teacher-sameclass/teacher.pt']),
    'random-teacher': ('I2P-MAE, untrained teacher', 'guided', 'yes', 'untrained', ['--teacher_weights', 'demo-random']),
}
CURVE_ROWS = {'3d-only': '3D-only', 'i2p-mae': 'I2P-MAE', 'i2p-mae-same-classes': 'I2P-MAE, leaky teacher',
              'random-teacher': 'I2P-MAE, untrained teacher'}   # drawn in curves.png, with these names
FINETUNE_ROWS = ['3d-only', 'i2p-mae', 'i2p-mae-same-classes', 'scratch']   # 'scratch': finetune.py --from_scratch
FEWSHOT_ROWS = ['3d-only', 'i2p-mae', 'scratch']   # few-shot fine-tuning (finetune.py --data fewshot-synthetic)
FEW_LABELS = (1, 5, 10)   # labelled shapes per class of the few-label linear SVM (svm_eval.py --shots)
FEWSHOT = (5, 10)         # (ways, shots) of the few-shot folds


# ---------------------------------------------------------------- the dataset's own baselines


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


def baselines(num_points, seeds=(0,), split='test'):
    """{name: [(accuracy %, {k: few-label accuracy %}) per seed]} of svm_eval.py's linear SVM (SVC, C by 5-fold
    cross-validation on the training features, no scaling: the protocol of every encoder row; FEW_LABELS shapes
    per class for the few-label ones) on two feature extractors that learn nothing from the data (the untrained
    PointNet drawn with each seed), at num_points points; split 'val' cross-validates over the training split."""
    train = load_split('synthetic', 'train', num_points=num_points)
    test = load_split('synthetic', 'test', num_points=num_points) if split == 'test' else None

    def scores(features):
        x, y = features(train.points).numpy(), train.labels.numpy()
        parts = ([(x, y, features(test.points).numpy(), test.labels.numpy())] if split == 'test' else
                 [(x[fit], y[fit], x[held], y[held]) for fit, held in validation_folds(train.labels, VAL_FOLDS)])
        done = [svm_scores(*part, None, True, FEW_LABELS) for part in parts]
        return (float(np.mean([accuracy for accuracy, _, _ in done])),
                {k: float(np.mean([a for _, _, few in done for a in few[k]])) for k in FEW_LABELS})
    return {'hand-crafted global statistics': [scores(global_statistics)],
            'untrained PointNet (shared MLP 3-32-256, max-pool)':
                [scores(lambda xyz: untrained_pointnet_features(xyz, seed=seed)) for seed in seeds]}


# ---------------------------------------------------------------- the loop


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rows', nargs='+', default=list(ROWS), choices=list(ROWS), help='rows to measure (default: all)')
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2], help='seeds (default: 0 1 2)')
    p.add_argument('--finetune_rows', nargs='*', default=FINETUNE_ROWS, choices=list(ROWS) + ['scratch'],
                   help=f'rows also fine-tuned (those among --rows), "scratch" for no pre-training '
                        f'(default: {" ".join(FINETUNE_ROWS)}; none: leave the flag empty)')
    p.add_argument('--fewshot_rows', nargs='*', default=FEWSHOT_ROWS, choices=list(ROWS) + ['scratch'],
                   help=f'rows also fine-tuned on the {FEWSHOT[0]}-way {FEWSHOT[1]}-shot folds of the synthetic classes '
                        f'(default: {" ".join(FEWSHOT_ROWS)}; none: leave the flag empty)')
    p.add_argument('--folds', type=int, default=3, help='few-shot folds per seed (default: 3, a lab session; the '
                                                        'protocol\'s 10 with --folds 10)')
    p.add_argument('--split', choices=['test', 'val'], default='test',
                   help=f'the linear SVMs\' scores: the test split (default), or {VAL_FOLDS}-fold cross-validation over '
                        f'the training split (val: to choose a schedule; the test split is not read, and nothing is '
                        f'fine-tuned)')
    p.add_argument('--table_only', action='store_true', help='print the table of the results found, run nothing')
    p.add_argument('--why_3d_only', action='store_true', help='3D-only and I2P-MAE after every pre-training epoch '
                                                             '(first --seeds): each scale\'s SVM accuracy, the features\' '
                                                             'effective rank (runs/ablation/why-3d-only.png)')
    p.add_argument('--baselines', action='store_true', help='print only the dataset\'s own baselines (seconds)')
    p.add_argument('--epochs', type=int, default=PRESETS['synthetic']['epochs'],
                   help='pre-training epochs of every row (default: the preset\'s); another number keeps its runs apart '
                        '(runs/ablation-<row>-s<seed>-e<epochs>) and its table (table-e<epochs>.md, curves-e<epochs>.png)')
    return p.parse_args(argv)


def folder(name):
    return os.path.join('runs', name)


def last_record_with(name, key):
    """The last log.jsonl record of runs/<name>/ that has `key`, or None."""
    path = os.path.join(folder(name), 'log.jsonl')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        records = [json.loads(line) for line in f if line.endswith('\n')]
    found = [r for r in records if key in r]
    return found[-1] if found else None


def run(script, flags, name):
    """python <script> <flags> --run_name <name>, continuing an interrupted run of that name."""
    command = [sys.executable, script, *flags, '--run_name', name]
    if os.path.isfile(os.path.join(folder(name), 'last.pt')):
        command += ['--resume', os.path.join(folder(name), 'last.pt')]
    elif os.path.isdir(folder(name)):
        command += ['--overwrite']   # a run that died before its first checkpoint: start it again
    print('$', ' '.join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def schedule_suffix(epochs):
    """'' for the preset's number of epochs, '-e<epochs>' for another: its runs, table and curves apart."""
    return '' if epochs == PRESETS['synthetic']['epochs'] else f'-e{epochs}'


def run_name(row, seed, epochs, kind=''):
    """runs/ablation-<row>-s<seed>[-e<epochs>][-<kind>]: -svm and -ft for the evaluations of that pre-training."""
    return f'ablation-{row}-s{seed}{schedule_suffix(epochs)}' + (f'-{kind}' if kind else '')


def pretrained(row, seed, epochs):
    """The last.pt of the row's pre-training, run first if it is not finished; a linear-SVM check every epoch."""
    name = run_name(row, seed, epochs)
    last_epoch = last_record_with(name, 'train_loss_3d')
    if last_epoch is None or last_epoch['epoch'] + 1 < epochs:
        schedule = ['--epochs', str(epochs), '--cosine_epochs', str(epochs)] if schedule_suffix(epochs) else []
        run('pretrain.py', ROWS[row][4] + ['--seed', str(seed), '--svm_every', '1', *schedule], name)
    return os.path.join(folder(name), 'last.pt')


# an evaluation's run-name suffix -> the field its result record holds (few-shot: the accuracy of each fold)
RESULTS = {'svm': 'accuracy', 'svm-val': 'accuracy', 'ft': 'test_accuracy', 'fs': 'accuracies'}


def measured(kind, row, seed, epochs, key=None):
    """The result the row's evaluation logged (kind: 'svm', 'svm-val', 'ft', or 'fs<folds>', the mean over the
    folds), or None if it has none yet; key: another field of that record (the SVM's 'few_label_mean')."""
    field = RESULTS[kind.rstrip('0123456789')]
    record = last_record_with(run_name(row, seed, epochs, kind), field)
    if record is None:
        return None
    return record.get(key) if key else float(np.mean(record[field])) if kind.startswith('fs') else record[field]


def svm_accuracy(row, seed, epochs, split='test'):
    kind = 'svm' if split == 'test' else 'svm-val'
    if measured(kind, row, seed, epochs) is None:
        # the untrained row takes the 3D-only checkpoint's shape and draws new weights with this seed
        flags = ['--random_init', '--seed', str(seed)] if row == 'untrained' else []
        checkpoint = pretrained('3d-only' if row == 'untrained' else row, seed, epochs)
        run('svm_eval.py', ['--ckpt', checkpoint, '--cv', '--overwrite', '--split', split, '--shots',
                            *map(str, FEW_LABELS), *flags], run_name(row, seed, epochs, kind))
    return measured(kind, row, seed, epochs)


def finetune_accuracy(row, seed, epochs):
    if measured('ft', row, seed, epochs) is None:
        start = ['--from_scratch'] if row == 'scratch' else ['--ckpt', pretrained(row, seed, epochs)]
        run('finetune.py', [*start, '--seed', str(seed), '--test_every', '100'], run_name(row, seed, epochs, 'ft'))
    return measured('ft', row, seed, epochs)


def fewshot_accuracy(row, seed, epochs, folds):
    """Mean test accuracy over few-shot folds 0 .. folds-1 (FEWSHOT's ways and shots), each fine-tuned afresh."""
    kind = f'fs{folds}'
    if measured(kind, row, seed, epochs) is None:
        start = ['--from_scratch'] if row == 'scratch' else ['--ckpt', pretrained(row, seed, epochs)]
        run('finetune.py', ['--data', 'fewshot-synthetic', *start, '--seed', str(seed), '--ways', str(FEWSHOT[0]),
                            '--shots', str(FEWSHOT[1]), '--folds', *map(str, range(folds)), '--test_every', '1000'],
            run_name(row, seed, epochs, kind))
    return measured(kind, row, seed, epochs)


def cell(values, seeds=True):
    """'mean ± std (a / b / c)' of what has been measured ('mean ± std' without seeds), '' if nothing."""
    values = [v for v in values if v is not None]
    if not values:
        return ''
    spread = f' ± {np.std(values, ddof=1):.1f}' if len(values) > 1 else ''
    return f'{np.mean(values):.1f}{spread}' + (f' ({" / ".join(f"{v:.1f}" for v in values)})' if seeds else '')


def table(rows, seeds, finetune_rows, fewshot_rows, measure, dataset_baselines, split='test', folds=3):
    """Markdown table; measure(kind, row, seed, key=None) -> measured()'s; dataset_baselines: baselines()'s."""
    labels = ' | '.join(f'{k} label{"s" * (k > 1)} per class, %' for k in FEW_LABELS)
    lines = [f'| row | mask | 2D target | teacher | linear SVM, % | {labels} | {FEWSHOT[0]}-way {FEWSHOT[1]}-shot, '
             f'fine-tuned ({folds} fold{"s" * (folds > 1)}), % | fine-tuned, % |', '|---|---|---|---|---|' + '---|' * len(FEW_LABELS) + '---|---|']
    for name, values in dataset_baselines.items():
        few = ' | '.join(cell([v[1][k] for v in values], seeds=False) for k in FEW_LABELS)
        lines.append(f'| dataset baseline: {name} | - | - | - | {cell([v[0] for v in values])} | {few} |  |  |')
    svm = 'svm' if split == 'test' else 'svm-val'
    for row in rows + (['scratch'] if 'scratch' in finetune_rows + fewshot_rows else []):
        what, mask, target, teacher, _ = ROWS.get(row, ('from scratch (no pre-training)', '-', '-', '-', None))
        few_label = [measure(svm, row, s, 'few_label_mean') or {} for s in seeds] if row in ROWS else []
        few = ' | '.join(cell([f.get(str(k)) for f in few_label], seeds=False) for k in FEW_LABELS)
        accuracy = cell([measure(svm, row, s) for s in seeds]) if row in ROWS else ''
        fewshot = cell([measure(f'fs{folds}', row, s) for s in seeds]) if row in fewshot_rows else ''
        tuned = cell([measure('ft', row, s) for s in seeds]) if row in finetune_rows else ''
        lines.append(f'| {what} | {mask} | {target} | {teacher} | {accuracy} | {few} | {fewshot} | {tuned} |')
    return '\n'.join(lines)


def svm_curve(row, seed, epochs):
    """The linear-SVM checks of the row's pre-training, one per epoch: (epochs done, accuracies)."""
    path = os.path.join(folder(run_name(row, seed, epochs)), 'log.jsonl')
    records = [json.loads(line) for line in open(path) if line.endswith('\n')] if os.path.isfile(path) else []
    checks = [(r['epoch'] + 1, r['svm_accuracy']) for r in records if 'svm_accuracy' in r and 'step' not in r]
    return [e for e, _ in checks], [a for _, a in checks]


def curves_picture(rows, seeds, epochs, references):
    """SVM accuracy against pre-training epochs, mean (line) and ± std (bars) over the seeds, for `rows`;
    references {name: accuracy}: horizontal lines (the untrained encoder, the dataset's baselines)."""
    series, bands, last = {}, {}, 1
    for row in rows:
        curves = [c for c in (svm_curve(row, seed, epochs) for seed in seeds) if c[0]]
        if not curves:
            continue
        n = min(len(done) for done, _ in curves)
        done, accuracy = curves[0][0][:n], np.array([values[:n] for _, values in curves])
        name, last = f'{CURVE_ROWS[row]} ({len(curves)} seed{"s" * (len(curves) > 1)})', max(last, done[-1])
        series[name] = (done, accuracy.mean(0).tolist(), 3)
        if len(curves) > 1:
            spread = accuracy.std(0, ddof=1)
            bands[name] = (done, (accuracy.mean(0) - spread).tolist(), (accuracy.mean(0) + spread).tolist())
    series.update({name: ([0, last], [value, value], 1) for name, value in references.items()})
    return line_plot(series, f'linear SVM accuracy (%) on the synthetic test split after each pre-training epoch, '
                             f'mean ± std over seeds {" ".join(map(str, seeds))}', size=(960, 520), bands=bands)


# ---------------------------------------------------------------- why 3D-only learns so little here

WHY_ROWS = ('3d-only', 'i2p-mae')


@torch.no_grad()
def scale_features(student, points, batch_size=128):
    """(S, N, 3) -> [(S, C_i) numpy per scale]: the frozen encoder's max over each scale's tokens (svm_features
    is the last; nothing masked at the top, finer tokens no coarse one covers left out)."""
    student.eval()
    features = [[] for _ in student.cfg.num_groups]
    for chunk in points.split(batch_size):
        groups = build_token_hierarchy(chunk, student.cfg.num_groups, student.cfg.group_sizes)
        visible = torch.zeros(len(chunk), student.cfg.num_groups[-1], dtype=torch.bool)
        for i, e in enumerate(student.encode(groups, hierarchical_masks(visible, groups))):
            features[i].append(e.x.masked_fill(e.is_pad[..., None], float('-inf')).amax(dim=1))
    return [torch.cat(f).numpy() for f in features]


def effective_rank(x):
    """exp of the entropy of the normalised singular values of the centred features (S, C): how many directions
    the features spread over (1: all on a line; C: evenly over all)."""
    s = torch.linalg.svdvals(torch.from_numpy(x - x.mean(0)).double())
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))


def nearest_visible_chamfer(points, cfg, mask_ratio=0.8, seed=0):
    """The 3D loss of a predictor that knows nothing of shapes: each masked scale-1 token's neighbourhood is
    guessed to be the nearest visible scale-1 token's (relative coordinates), scored with the model's
    Chamfer-L2, on clouds augmented and masked as the 3D-only row's training steps are (seeded)."""
    generator, total, count = torch.Generator().manual_seed(seed), 0.0, 0
    for chunk in points.split(128):
        xyz = scale_and_translate(chunk, generator=generator)
        groups = build_token_hierarchy(xyz, cfg.num_groups, cfg.group_sizes)
        masks = hierarchical_masks(random_mask(len(xyz), cfg.num_groups[-1], mask_ratio, generator=generator), groups)
        group, hidden = groups[1], masks[1]                                               # the 3D head's scale
        d = square_distance(group.centers, group.centers).masked_fill(hidden[:, None, :], float('inf'))
        nearest = d.argmin(dim=2)                                                         # (B, G_1) visible token
        guess = gather_points(group.relative.flatten(2), nearest).view_as(group.relative)
        total += float(chamfer_l2(guess[hidden], group.relative[hidden])) * int(hidden.sum())
        count += int(hidden.sum())
    return total / count


def snapshot_run(row, seed, epochs):
    """runs/ablation-<row>-s<seed>-e<epochs>-every-epoch: the row's pre-training keeping epoch-<n>.pt after every
    epoch (run first if it is not finished)."""
    name = f'ablation-{row}-s{seed}-e{epochs}-every-epoch'
    last_epoch = last_record_with(name, 'train_loss_3d')
    if last_epoch is None or last_epoch['epoch'] + 1 < epochs:
        run('pretrain.py', ROWS[row][4] + ['--seed', str(seed), '--epochs', str(epochs), '--cosine_epochs', str(epochs),
                                           '--svm_every', '0', '--save_every', '1'], name)
    return name


def why_3d_only(seed, epochs):
    """For 3D-only and I2P-MAE: after every pre-training epoch, each scale's linear-SVM test accuracy and the top
    scale's effective rank; with the 3D loss of a predictor that knows nothing of shapes. Writes
    runs/ablation/why-3d-only.json and .png."""
    from svm_eval import load_student
    points = PRESETS['synthetic']['num_points']
    train, test = (load_split('synthetic', split, num_points=points) for split in ('train', 'test'))
    results = {}
    for row in WHY_ROWS:
        name = snapshot_run(row, seed, epochs)
        losses = {r['epoch'] + 1: r['train_loss_3d'] for r in map(json.loads, open(os.path.join(folder(name), 'log.jsonl')))
                  if 'train_loss_3d' in r and 'step' not in r}
        for epoch in range(1, epochs + 1):
            student, _ = load_student(os.path.join(folder(name), f'epoch-{epoch}.pt'))
            train_x, test_x = scale_features(student, train.points), scale_features(student, test.points)
            accuracy = [svm_scores(a, train.labels.numpy(), b, test.labels.numpy(), None, True, ())[0]
                        for a, b in zip(train_x, test_x)]
            results.setdefault(row, []).append(dict(epoch=epoch, svm_accuracy_per_scale=accuracy, loss_3d=losses[epoch],
                                                    effective_rank_top=effective_rank(train_x[-1]),
                                                    width_top=train_x[-1].shape[1]))
            print(f'{row} epoch {epoch}: SVM per scale ' + ' / '.join(f'{a:.1f}' for a in accuracy)
                  + f' %, top scale effective rank {results[row][-1]["effective_rank_top"]:.1f} of '
                  f'{train_x[-1].shape[1]}, loss_3d {losses[epoch]:.4f}', flush=True)
    cfg = load_student(os.path.join(folder(snapshot_run('3d-only', seed, epochs)), 'last.pt'))[0].cfg
    results['nearest_visible_loss_3d'] = nearest_visible_chamfer(load_split('synthetic', 'pretrain', num_points=points)
                                                                 .points[:512], cfg)
    print(f'the 3D loss of copying the nearest visible token\'s neighbourhood: {results["nearest_visible_loss_3d"]:.4f}')
    os.makedirs(folder('ablation'), exist_ok=True)
    with open(os.path.join(folder('ablation'), 'why-3d-only.json'), 'w') as f:
        json.dump(results, f, indent=1)
    names = {'3d-only': '3D-only', 'i2p-mae': 'I2P-MAE'}
    accuracy = {f'{names[row]}, scale {i}': ([r['epoch'] for r in results[row]],
                                             [r['svm_accuracy_per_scale'][i] for r in results[row]], 3 if i == 2 else 1)
                for row in WHY_ROWS for i in range(3)}
    rank = {names[row]: ([r['epoch'] for r in results[row]], [r['effective_rank_top'] for r in results[row]], 3)
            for row in WHY_ROWS}
    panels = [line_plot(accuracy, f'linear SVM test accuracy (%) of each scale\'s max-pooled tokens (scale 2 = '
                                  f'svm_features), seed {seed}', size=(960, 420)),
              line_plot(rank, 'effective rank of the top scale\'s features (of 256)', size=(960, 300))]
    picture = Image.new('RGB', (960, sum(p.height for p in panels)), 'white')
    for i, panel in enumerate(panels):
        picture.paste(panel, (0, sum(p.height for p in panels[:i])))
    picture.save(os.path.join(folder('ablation'), 'why-3d-only.png'))
    print(f'wrote {folder("ablation")}/why-3d-only.json and .png')
    return results


def main(args):
    if args.why_3d_only:
        return why_3d_only(args.seeds[0], args.epochs)
    points = PRESETS['synthetic']['num_points']
    dataset_baselines = baselines(points, args.seeds, args.split)
    if args.baselines:
        for name, values in dataset_baselines.items():
            print(f'linear SVM on {name} at {points} points ({args.split}): {cell([v[0] for v in values])}; '
                  + ', '.join(f'{k} per class {cell([v[1][k] for v in values], seeds=False)}' for k in FEW_LABELS))
        return
    tune = [r for r in args.finetune_rows if r in args.rows or r == 'scratch'] if args.split == 'test' else []
    fewshot = [r for r in args.fewshot_rows if r in args.rows or r == 'scratch'] if args.split == 'test' else []
    if not args.table_only:
        leaky_teacher = ROWS['i2p-mae-same-classes'][4][1]
        if 'i2p-mae-same-classes' in args.rows and not os.path.isfile(leaky_teacher):
            command = ['train_teacher.py', '--classes', 'test', '--out', leaky_teacher]   # a few minutes, once
            print('$', ' '.join(command), flush=True)
            subprocess.run([sys.executable, *command], check=True)
        for seed in args.seeds:   # seed by seed: a partial loop still gives every row a number
            for row in args.rows:
                svm_accuracy(row, seed, args.epochs, args.split)
            for row in tune:
                finetune_accuracy(row, seed, args.epochs)
            for row in fewshot:
                fewshot_accuracy(row, seed, args.epochs, args.folds)

    def measure(kind, row, seed, key=None):
        return measured(kind, row, seed, args.epochs, key)
    scored = 'the test split' if args.split == 'test' else f'{VAL_FOLDS}-fold cross-validation over the training split'
    text = (f'{args.epochs} epochs of pre-training, seeds {" ".join(map(str, args.seeds))}, linear SVMs scored on '
            f'{scored}: mean ± std over the seeds (each seed\'s number in brackets)\n\n'
            + table(args.rows, args.seeds, tune, fewshot, measure, dataset_baselines, args.split, args.folds))
    suffix = schedule_suffix(args.epochs) + ('' if args.split == 'test' else '-val')
    os.makedirs(folder('ablation'), exist_ok=True)
    with open(os.path.join(folder('ablation'), f'table{suffix}.md'), 'w') as f:
        f.write(text + '\n')
    print(text)
    untrained = [measure('svm', 'untrained', seed) for seed in args.seeds]
    references = {f'{name.split(" (")[0]} (dataset baseline)': float(np.mean([v[0] for v in values]))
                  for name, values in dataset_baselines.items()} if args.split == 'test' else {}
    if any(v is not None for v in untrained):
        references['untrained encoder'] = float(np.mean([v for v in untrained if v is not None]))
    path = os.path.join(folder('ablation'), f'curves{schedule_suffix(args.epochs)}.png')
    curves_picture([r for r in CURVE_ROWS if r in args.rows], args.seeds, args.epochs, references).save(path)
    print(f'wrote {path}')


if __name__ == '__main__':
    main(parse_args())
