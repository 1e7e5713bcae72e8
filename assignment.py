"""
assignment.py: classroom assignments cut out of the stage files, graded by the existing tests.

  python assignment.py                         # the assignments, one line each
  python assignment.py fps --out hw-fps        # a copy of the repository with FPS to write: hw-fps/ASSIGNMENT.md
  python assignment.py fps --grade             # in the copy: the score, why each failing case fails;
                                               # exit status 1 below full marks
  python assignment.py --check [NAME ...]      # for teachers: every stub fails exactly its grading tests

An assignment is one function (or a few small ones) of a stage file. `--out` copies the repository
and replaces those functions' bodies (found by name with `ast`; their signatures and docstrings stay)
by a stub that raises NotImplementedError with the task; everything else in the copy works as
before. The grading tests are tests of test_all.py that were already there: brute force,
hand-worked cases and the authors' recorded tensors; every parametrisation is a grading case, and a
student's partial credit is the number of cases that pass (the same count in the list, ASSIGNMENT.md
and the grader). `--check` proves, for each assignment, that the untouched code passes its grading
tests and that the stubbed copy fails every one of them and no grading test of another assignment
that does not call the stubbed functions.
"""
import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
SKIPPED = {'.git', 'runs', 'data', '__pycache__', '.pytest_cache'}   # never copied into an assignment


class Assignment(NamedTuple):
    file: str           # the stage file
    functions: tuple    # names to stub ('Class.method' for a method)
    minutes: int        # how long it takes a student, roughly
    teaches: str        # one line for the list
    task: str           # what the stub says: inputs, outputs with shapes, the rule to follow
    hints: str          # ASSIGNMENT.md only
    tests: tuple        # the grading tests (test_all.py names; every parametrisation counts)


# the reference tests that read the authors' tensors through the tokenizer (every grouping needs FPS and kNN)
GROUPED = ('test_reference_grouping', 'test_reference_masks', 'test_reference_back_projection',
           'test_reference_pretrain_forward', 'test_reference_svm_features', 'test_reference_classifier')
ASSIGNMENTS = {
    'fps': Assignment(
        'tokenizer.py', ('fps_loop',), 45, 'farthest point sampling, batched, lowest index on ties',
        'Farthest point sampling, batched over the clouds.\n'
        '  xyz (B, N, 3) float, n_samples -> indices (B, n_samples) long, in the order they were picked.\n'
        '  The first pick is index 0; each next pick is the point whose squared distance to the picked set\n'
        '  is largest, the lowest index on ties. skip_near_origin=True: after the first pick, never pick a\n'
        '  point with x*x + y*y + z*z <= 1e-3 (the authors\' CUDA kernel does that).',
        '- Keep one running minimum of the squared distance to the picked set, (B, N), and update it after\n'
        '  each pick; `argmax` returns the first index on ties.\n'
        '- Loop over the picks only: every operation inside the loop works on the whole batch (B x N).\n'
        '- A point that must never be picked can get a distance no real distance is below (e.g. -1).',
        ('test_fps_matches_numpy_brute_force', 'test_fps_first_index_is_fixed_and_ties_go_to_lowest_index',
         'test_fps_loop_picks_exactly_what_the_plain_loop_picks', 'test_fps_of_fps_centres_is_a_prefix_of_the_finer_fps',
         'test_hierarchy_from_one_fps_run_equals_fps_at_every_scale', 'test_hierarchy_groups_previous_centres',
         'test_knn_puts_the_centre_first_and_breaks_ties_by_index', 'test_reference_fps_knn_and_chamfer_ops') + GROUPED),
    'knn': Assignment(
        'tokenizer.py', ('knn_indices', 'group_around'), 45, 'kNN grouping into tokens, neighbourhoods relative to '
                                                            'their centre',
        'kNN grouping.\n'
        '  knn_indices(query (B, M, 3), ref (B, N, 3), k) -> (B, M, k) long: the k nearest ref points of each\n'
        '  query point by squared distance, nearest first, the lower index first on equal distances.\n'
        '  group_around(points (B, N, 3), centers (B, G, 3), k) -> Group(centers, idx (B, G, k),\n'
        '  neighbors (B, G, k, 3) absolute, relative (B, G, k, 3) = neighbors - their centre).',
        '- square_distance(query, ref) gives the (B, M, N) squared distances.\n'
        '- A stable sort keeps the lower index first among equal distances (torch.sort(stable=True)).\n'
        '- gather_points(points, idx) gathers rows for any index shape.',
        ('test_knn_agrees_with_scipy_kdtree', 'test_knn_puts_the_centre_first_and_breaks_ties_by_index',
         'test_knn_topk_keeps_lowest_index_on_ties', 'test_hierarchy_groups_previous_centres',
         'test_hierarchy_from_one_fps_run_equals_fps_at_every_scale', 'test_reference_fps_knn_and_chamfer_ops') + GROUPED),
    'projection': Assignment(
        'project.py', ('project_depth_images', 'point_pixels', 'back_project'), 90,
        'multi-view depth projection (the splat) and back-projection of 2D features to points',
        'Multi-view depth images, and reading teacher maps back at points (docs/authors_code.md section 3).\n'
        '  project_depth_images(xyz (B, N, 3), img_size S, views) -> images (V*B, 3, S, S) and ViewGeometry:\n'
        '  per view, permute the axes into (row, column, depth); cell = largest of the two extents / (S - 3);\n'
        '  paint the 5 x 5 pixels around each point\'s cell (+1) with its depth, SUM what lands on a pixel,\n'
        '  centre the painted block, clamp to the image, then sigmoid (empty pixels 0.5), the same in 3 channels.\n'
        '  point_pixels(points (B, M, 3), geometry, S) -> (V*B, M, 2) long: each point\'s own pixel (cell + 1 + offset).\n'
        '  back_project(points (B, M, 3), geometry, maps (V*B, C, h, w), S) -> (B, M, V*C): the maps upsampled\n'
        '  bicubically to S x S, read at point_pixels, views concatenated [view 1 | view 2 | view 3].',
        '- permute_views and pixel_cells are given; so are bicubic_matrix and sample_upsampled (a bicubic\n'
        '  read at pixels: F.interpolate then a gather computes the same, only slower).\n'
        '- scatter_add_ sums values into a flat (V*B, S*S) image: index = row * S + column.\n'
        '- The centring offset per view: S / 2 - floor((max + min) / 2) - 1 over the painted coordinates.',
        ('test_projection_hand_worked_pixels', 'test_back_projection_reads_back_what_projection_wrote',
         'test_projection_of_a_line_seen_end_on_is_a_dot_in_the_middle', 'test_back_projection_works_for_a_single_sample',
         'test_reference_projection', 'test_reference_back_projection', 'test_reference_pretrain_forward')),
    'mask': Assignment(
        'mask.py', ('guided_mask', 'propagate_mask'), 60, 'the 2D-guided mask and its propagation to finer scales',
        'The 2D-guided mask and its propagation (docs/authors_code.md section 5).\n'
        '  guided_mask(saliency (B, G), mask_ratio, generator) -> is_masked (B, G) bool: draw the tokens one by\n'
        '  one without replacement with probabilities softmax(saliency) (no temperature); the first\n'
        '  num_visible(G, mask_ratio) drawn stay visible (False), the rest are hidden (True). Draw exactly\n'
        '  what torch.multinomial(probs, n, generator=generator) draws, without its host-side check.\n'
        '  propagate_mask(is_masked_coarse (B, Gc), neighbor_idx (B, Gc, K), num_fine) -> (B, num_fine) bool:\n'
        '  a fine token is visible iff it is among the K neighbours of a visible coarse token of the same sample.',
        '- torch.multinomial without replacement: waiting times q ~ Exp(1) (exponential_(generator=...)); the\n'
        '  n largest p / q are drawn first. mask_from_visible turns visible indices into is_masked.\n'
        '- Propagation: scatter the visible coarse tokens\' votes onto their neighbours\' indices, per sample.',
        ('test_guided_mask_hides_exact_ratio', 'test_guided_mask_draws_what_multinomial_draws',
         'test_salient_tokens_stay_visible_more_often', 'test_propagation_rule_on_a_hand_built_case',
         'test_reference_masks', 'test_reference_back_projection', 'test_reference_pretrain_forward',
         'test_reference_svm_features')),
    'chamfer': Assignment(
        'model.py', ('chamfer_l2',), 20, 'the Chamfer-L2 distance, the 3D loss',
        'Chamfer-L2 of point sets, the 3D reconstruction loss.\n'
        '  pred (L, K, 3), target (L, K\', 3) -> a scalar: the mean over all predicted points of the squared\n'
        '  distance to the nearest target point of the same set, plus the mean over all target points of\n'
        '  the squared distance to the nearest predicted point of the same set.',
        '- square_distance(pred, target) gives (L, K, K\') squared distances; min over one dimension, then mean.',
        ('test_chamfer_matches_brute_force', 'test_reference_fps_knn_and_chamfer_ops', 'test_reference_pretrain_forward')),
    'attention': Assignment(
        'model.py', ('Attention.forward', 'attention_bias'), 60,
        'the encoder\'s attention with padding and local-radius masks',
        'Multi-head self-attention over packed tokens, and the mask that blocks what must not attend.\n'
        '  Attention.forward(x (B, L, C), bias (B, 1, L, L) or None) -> (B, L, C): qkv projection, H heads,\n'
        '  softmax(q k^T / sqrt(C / H) + bias) v, heads joined, output projection.\n'
        '  attention_bias(is_pad (B, L) bool, centers (B, L, 3), radius, radius_and_padding=False) -> (B, 1, L, L):\n'
        '  BLOCKED where the query or the key is padding, or (radius > 0) where the two centres are radius\n'
        '  or more apart; 0 elsewhere. radius_and_padding=True: the authors\' pre-training AND of the two.',
        '- self.qkv(x) is (B, L, 3C): view it (B, L, 3, H, C / H) and permute to 3 x (B, H, L, C / H).\n'
        '- F.scaled_dot_product_attention adds a float attn_mask to the logits.\n'
        '- torch.cdist gives the distances between centres.',
        ('test_attention_bias_blocks_padding_or_far_centres', 'test_reference_pretrain_forward',
         'test_reference_svm_features', 'test_reference_classifier')),
}


def stub(source, function, task):
    """`source` with the body of `function` ('name' or 'Class.name') replaced by a NotImplementedError
    that carries the task; its signature and docstring stay."""
    tree, lines = ast.parse(source), source.split('\n')
    scope, *method = function.split('.')
    node = next(n for n in tree.body if getattr(n, 'name', None) == scope)
    if method:
        node = next(n for n in node.body if getattr(n, 'name', None) == method[0])
    first = node.body[1] if isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) \
        else node.body[0]
    indent = ' ' * first.col_offset
    body = [f'{indent}raise NotImplementedError("""{function}: your task (ASSIGNMENT.md)\n{task}""")']
    return '\n'.join(lines[:first.lineno - 1] + body + lines[node.end_lineno:])


def copy_repository(out):
    """The repository's files into `out` (runs/, data/, caches and assignment copies left out)."""
    def ignored(folder, names):
        return [n for n in names if n in SKIPPED or os.path.isfile(os.path.join(folder, n, 'ASSIGNMENT.md'))]
    shutil.copytree(HERE, out, ignore=ignored)


def write_assignment(name, out):
    """A copy of the repository in `out` with assignment `name` stubbed, and its ASSIGNMENT.md."""
    a = ASSIGNMENTS[name]
    if os.path.exists(out):
        raise SystemExit(f'--out {out}: already exists; choose a new folder')
    copy_repository(out)
    path = os.path.join(out, a.file)
    source = open(path).read()
    for function in a.functions:
        source = stub(source, function, a.task)
    with open(path, 'w') as f:
        f.write(source)
    with open(os.path.join(out, 'ASSIGNMENT.md'), 'w') as f:
        their = 'Their signatures and docstrings are there; their bodies raise' if len(a.functions) > 1 else \
            'Its signature and docstring are there; its body raises'
        f.write(f'# Assignment: {a.teaches}\n\nWrite {", ".join(f"`{fn}`" for fn in a.functions)} in `{a.file}` '
                f'(about {a.minutes} minutes). {their}\nNotImplementedError until you write '
                f'{"them" if len(a.functions) > 1 else "it"}. Everything else in this copy works as in the repository.\n\n'
                f'## The task\n\n```\n{a.task}\n```\n\n## Hints\n\n{a.hints}\n\n## Grading\n\n'
                f'```bash\npython assignment.py {name} --grade\n```\n\nruns the {len(grading_cases(a.tests, out))} '
                f'grading cases (tests of `test_all.py`, each parametrisation a case: brute force, hand-worked examples '
                f'and the authors\' recorded tensors), prints why each failing one fails and how many pass, and exits '
                f'non-zero below full marks. The tests are in `test_all.py`: read them, do not change them.\n')
    return out


def grading_cases(tests, folder=HERE):
    """The case ids of `tests` as pytest collects them in `folder`: every parametrisation is a case."""
    done = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', '-p', 'no:cacheprovider',
                           *[f'test_all.py::{t}' for t in tests]], cwd=folder, capture_output=True, text=True,
                          env={**os.environ, 'PYTHONPATH': folder})
    return [line.split('::', 1)[1] for line in done.stdout.splitlines() if line.startswith('test_all.py::')]


def run_tests(folder, tests):
    """Run test_all.py's `tests` in `folder` -> {test case id: (passed, why it failed: its first lines or '')}."""
    with tempfile.TemporaryDirectory() as scratch:
        report = os.path.join(scratch, 'report.xml')
        subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', f'--junitxml={report}',
                        *[f'test_all.py::{t}' for t in tests]], cwd=folder, capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': folder}, timeout=1800)
        results = {}
        for case in ET.parse(report).getroot().iter('testcase'):
            failed = [child for child in case if child.tag in ('failure', 'error', 'skipped')]
            why = (failed[0].get('message') or failed[0].text or failed[0].tag) if failed else ''
            results[case.get('name')] = (not failed, why)
        return results


def reason(why, lines=2, width=150):
    """The first `lines` non-empty lines of a failure's message, each cut at `width` characters."""
    kept = [line.strip() for line in why.splitlines() if line.strip()][:lines]
    return [line if len(line) <= width else line[:width - 3] + '...' for line in kept]


def grade(name):
    """The student's score: the grading cases of `name` that pass in this folder, and why the others fail."""
    results = run_tests(HERE, ASSIGNMENTS[name].tests)
    for case, (passed, why) in sorted(results.items()):
        print(f'  {"pass" if passed else "FAIL"}  {case}')
        for line in [] if passed else reason(why):
            print(f'          {line}')
    passed = sum(ok for ok, _ in results.values())
    print(f'{name}: {passed} of {len(results)} grading cases pass')
    failing = sorted(case for case, (ok, _) in results.items() if not ok)
    if failing:
        print(f'the whole story of a failing case: python -m pytest -q "test_all.py::{failing[0]}"')
    return passed, len(results)


def check(names):
    """For each assignment: the untouched code passes its grading tests, and its stubbed copy fails every
    one of them and passes every other assignment's grading test that does not call the stubbed functions
    (the tests it fails are exactly its own). Returns the problems found ([] if none)."""
    everything = sorted({t for a in ASSIGNMENTS.values() for t in a.tests})
    untouched = {case: ok for case, (ok, _) in run_tests(HERE, everything).items()}
    problems = [f'{case} fails on the untouched code' for case, passed in untouched.items() if not passed]
    for name in names:
        with tempfile.TemporaryDirectory() as scratch:
            copy = write_assignment(name, os.path.join(scratch, name))
            stubbed = {case: ok for case, (ok, _) in run_tests(copy, everything).items()}
        own = {case for case in stubbed if case.split('[')[0] in ASSIGNMENTS[name].tests}
        problems += [f'{name}: {case} passes on the stub' for case in sorted(own) if stubbed[case]]
        problems += [f'{name}: {case} fails on the stub but is not one of its grading tests'
                     for case in sorted(set(stubbed) - own) if not stubbed[case]]
        print(f'{name}: the stub fails {sum(not stubbed[c] for c in own)} of its {len(own)} grading cases, '
              f'passes {sum(stubbed[c] for c in set(stubbed) - own)} of the {len(set(stubbed) - own)} others')
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('name', nargs='*', help='an assignment (none: list them)')
    p.add_argument('--out', help='write a copy of the repository with the assignment to do into this new folder')
    p.add_argument('--grade', action='store_true', help='run the assignment\'s grading tests here, print the score')
    p.add_argument('--check', action='store_true', help='prove every stub fails exactly its grading tests (teachers)')
    args = p.parse_args(argv)
    unknown = [n for n in args.name if n not in ASSIGNMENTS]
    if unknown:
        p.error(f'no assignment {", ".join(unknown)}; the assignments: {", ".join(ASSIGNMENTS)}')
    if args.check:
        problems = check(args.name or list(ASSIGNMENTS))
        print('\n'.join(problems) or 'every stub fails exactly its own grading tests; the untouched code passes them')
        raise SystemExit(1 if problems else 0)
    if not args.name:
        cases = grading_cases(sorted({t for a in ASSIGNMENTS.values() for t in a.tests}))
        for name, a in ASSIGNMENTS.items():
            print(f'{name:<11} {a.file}: {", ".join(a.functions)} -- {a.teaches} (~{a.minutes} min, '
                  f'{sum(c.split("[")[0] in a.tests for c in cases)} grading cases)')
        print('\npython assignment.py NAME --out DIR writes the assignment; in DIR, python assignment.py NAME --grade')
        return
    if len(args.name) != 1 or not (args.out or args.grade):
        p.error('name one assignment, with --out DIR (write it) or --grade (score it here)')
    if args.out:
        print(f'wrote {write_assignment(args.name[0], args.out)}: read {os.path.join(args.out, "ASSIGNMENT.md")}')
    else:
        passed, total = grade(args.name[0])
        raise SystemExit(0 if passed == total else 1)   # below full marks: a classroom CI sees the exit status


if __name__ == '__main__':
    main()
