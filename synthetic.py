"""
synthetic.py: the procedural shapes behind `--data synthetic` (used through data.py).

13 classes of y-up objects built from parts (boxes, frustums, rods, ellipsoids, tori), each
shape with its own proportions and part counts, then sampled by area with uneven density,
scaled anisotropically, turned about the up axis and jittered:
  synthetic_clouds(num_shapes, num_points, rng) -> clouds (S, N, 3) float32 (not normalised),
                                                   labels (S,) int64, balanced to within one
  synthetic_part_clouds(...)                    -> the same clouds and labels, and part labels
                                                   (S, N) int64: the part each point lies on
Part ids are global, numbered class after class as ShapeNetPart's 50 are: SYNTHETIC_PARTS
lists each class's parts, SYNTHETIC_PART_NAMES[id] is 'class/part'. Adding the part labels
changed no random draw: the clouds are the ones the classification stages have always seen.
data.py normalises them, splits them into pretrain / train / test and draws the picture.
Tests: test_synthetic_* in test_all.py
"""
import math

import numpy as np

SYNTHETIC_CLASSES = ['table', 'chair', 'stool', 'bench', 'bed', 'sofa', 'shelf',
                     'lamp', 'mug', 'bottle', 'vase', 'airplane', 'car']
# The parts of each class, for segmentation. What each name covers is set in the class functions below:
# a 'leg' is a leg, a pedestal or a slab end; a lamp's 'pole' includes its arm, its 'shade' may be a
# globe; a vase's 'base', 'body' and 'neck' are the lowest, middle and top frustums of its stack.
SYNTHETIC_PARTS = {
    'table': ['top', 'leg', 'shelf'],
    'chair': ['seat', 'leg', 'back', 'arm'],
    'stool': ['seat', 'leg', 'ring', 'back'],
    'bench': ['seat', 'leg', 'back'],
    'bed': ['mattress', 'headboard', 'footboard', 'base', 'pillow'],
    'sofa': ['seat', 'back', 'arm', 'cushion', 'leg'],
    'shelf': ['upright', 'board', 'back'],
    'lamp': ['base', 'pole', 'shade'],
    'mug': ['body', 'handle'],
    'bottle': ['body', 'neck', 'cap'],
    'vase': ['base', 'body', 'neck'],
    'airplane': ['fuselage', 'wing', 'tail', 'engine'],
    'car': ['body', 'cabin', 'wheel'],
}
SYNTHETIC_PART_NAMES = [f'{c}/{p}' for c in SYNTHETIC_CLASSES for p in SYNTHETIC_PARTS[c]]   # global part id -> name
PART_ID = {tuple(name.split('/')): i for i, name in enumerate(SYNTHETIC_PART_NAMES)}       # (class, part) -> id


# ---------------------------------------------------------------- surfaces
# A surface is (area, sample) with sample(n, rng) -> (n, 3) points on it, uniform by area.
# Objects stand on the floor (y = 0) with y up, like ShapeNet and ModelNet.

AXIS_ORDER = {'x': [1, 0, 2], 'y': [0, 1, 2], 'z': [0, 2, 1]}   # local y (symmetry axis) -> this axis


def yaw_matrix(angle):
    """(3, 3) rotation about the up (y) axis."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def box_surface(center, size, rotation=None):
    """The six faces of a box of `size` (3,), optionally turned by `rotation` (3, 3) about its centre."""
    size = np.asarray(size, float)
    face_area = np.repeat([size[1] * size[2], size[0] * size[2], size[0] * size[1]], 2)  # -x +x -y +y -z +z

    def sample(n, rng):
        face = rng.choice(6, n, p=face_area / face_area.sum())
        local = rng.uniform(-0.5, 0.5, (n, 3))
        local[np.arange(n), face // 2] = np.where(face % 2 == 1, 0.5, -0.5)      # onto the chosen face
        local = local * size
        return (local if rotation is None else local @ rotation.T) + center
    return face_area.sum(), sample


def frustum_surface(base, r_bottom, r_top, height, axis='y', bottom=True, top=True):
    """Side and optional end discs of a cone frustum standing on point `base` along `axis`.
    r_bottom == r_top gives a cylinder, r_top == 0 a cone."""
    dr = r_top - r_bottom
    area = np.array([math.pi * (r_bottom + r_top) * math.hypot(height, dr),
                     math.pi * r_bottom ** 2 * bottom, math.pi * r_top ** 2 * top])

    def sample(n, rng):
        piece = rng.choice(3, n, p=area / area.sum())                  # 0 side, 1 bottom, 2 top
        u, angle = rng.random(n), rng.uniform(0, 2 * math.pi, n)
        if abs(dr) < 1e-9:
            t_side = u
        else:   # the side's area grows with its radius: invert the cumulative area
            t_side = (np.sqrt(r_bottom ** 2 + u * (r_top ** 2 - r_bottom ** 2)) - r_bottom) / dr
        t = np.where(piece == 0, t_side, piece - 1.0)                  # height fraction
        disc_r = np.where(piece == 1, r_bottom, r_top) * np.sqrt(rng.random(n))
        radius = np.where(piece == 0, r_bottom + dr * t, disc_r)
        local = np.stack([radius * np.cos(angle), t * height, radius * np.sin(angle)], 1)
        return local[:, AXIS_ORDER[axis]] + base
    return area.sum(), sample


def rod_surface(start, end, radius):
    """Open cylinder from point `start` to point `end`: legs, poles, struts."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    direction = end - start
    length = np.linalg.norm(direction)
    helper = [1.0, 0, 0] if abs(direction[0]) < 0.9 * length else [0, 1.0, 0]
    u = np.cross(direction, helper)
    u /= np.linalg.norm(u)
    v = np.cross(direction / length, u)                                # (u, v) spans the cross-section

    def sample(n, rng):
        t, angle = rng.random((n, 1)), rng.uniform(0, 2 * math.pi, (n, 1))
        return start + t * direction + radius * (np.cos(angle) * u + np.sin(angle) * v)
    return 2 * math.pi * radius * length, sample


def ellipsoid_surface(center, radii):
    """Ellipsoid; normalised Gaussian directions are close to, not exactly, uniform by area."""
    a, b, c = radii
    p = 1.6075      # Knud Thomsen's approximation of the ellipsoid's area
    area = 4 * math.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)

    def sample(n, rng):
        d = rng.standard_normal((n, 3))
        return d / np.linalg.norm(d, axis=1, keepdims=True) * radii + center
    return area, sample


def torus_surface(center, major, minor, arc, axis='y'):
    """`arc` radians of a torus around `axis`, centred on local +x: mug handles, foot rings."""
    def sample(n, rng):
        u, v = rng.uniform(-arc / 2, arc / 2, n), rng.uniform(0, 2 * math.pi, n)
        ring = major + minor * np.cos(v)
        local = np.stack([ring * np.cos(u), minor * np.sin(v), ring * np.sin(u)], 1)
        return local[:, AXIS_ORDER[axis]] + center
    return arc * major * 2 * math.pi * minor, sample


def leg_surfaces(rng, half_x, half_z, top, thickness, splay=1.0):
    """Four legs from the floor up to height `top` at (+-half_x, +-half_z): round or square."""
    corners = [(sx * half_x, sz * half_z) for sx in (-1, 1) for sz in (-1, 1)]
    if rng.random() < 0.5:
        return [rod_surface((x * splay, 0, z * splay), (x, top, z), thickness / 2) for x, z in corners]
    return [box_surface((x, top / 2, z), (thickness, top, thickness)) for x, z in corners]


# ---------------------------------------------------------------- the classes and their parts
# One function per class: rng -> list of (part name, surface). Proportions and part counts are
# drawn per shape; the ranges overlap on purpose (square stools vs small tables, benches vs
# tables and beds, sofas vs beds, wide bottles and vases vs mugs without a handle), so that
# global statistics cannot separate the classes (the hand-crafted baseline, docs/results.md). Every point keeps the
# name of the part it was sampled on: the labels of the segmentation task (SYNTHETIC_PARTS).

def labelled(name, surfaces):
    """Tag each surface with the name of the part it belongs to -> list of (name, surface)."""
    return [(name, surface) for surface in surfaces]


def table_parts(rng):
    height, width, top_t = rng.uniform(0.45, 0.8), rng.uniform(0.5, 1.8), rng.uniform(0.03, 0.1)
    depth = width * rng.uniform(0.4, 1.0)
    if rng.random() < 0.3:                              # round top
        parts, depth = labelled('top', [frustum_surface((0, height - top_t, 0), width / 2, width / 2, top_t)]), width
    else:
        parts = labelled('top', [box_surface((0, height - top_t / 2, 0), (width, top_t, depth))])
    if rng.random() < 0.7:
        inset = rng.uniform(0.05, 0.15)
        parts += labelled('leg', leg_surfaces(rng, (0.5 - inset) * width, (0.5 - inset) * depth, height - top_t,
                                              rng.uniform(0.03, 0.08), splay=rng.uniform(1.0, 1.1)))
    else:                                               # pedestal and foot
        parts += labelled('leg', [rod_surface((0, 0, 0), (0, height - top_t, 0), rng.uniform(0.03, 0.1)),
                                  frustum_surface((0, 0, 0), rng.uniform(0.15, 0.35), rng.uniform(0.05, 0.1),
                                                  rng.uniform(0.02, 0.06))])
    if rng.random() < 0.3:                              # lower shelf
        parts += labelled('shelf', [box_surface((0, rng.uniform(0.1, 0.3) * height, 0),
                                                (0.8 * width, top_t / 2, 0.8 * depth))])
    return parts


def chair_parts(rng):
    width, depth, seat_y = rng.uniform(0.38, 0.6), rng.uniform(0.38, 0.6), rng.uniform(0.38, 0.55)
    seat_t, back_h = rng.uniform(0.03, 0.1), rng.uniform(0.15, 0.7)
    parts = labelled('seat', [box_surface((0, seat_y, 0), (width, seat_t, depth))])
    if rng.random() < 0.8:
        parts += labelled('leg', leg_surfaces(rng, width / 2 - 0.03, depth / 2 - 0.03, seat_y,
                                              rng.uniform(0.025, 0.06), splay=rng.uniform(1.0, 1.15)))
    else:                                               # swivel chair: a column on a star of 5 feet
        parts += labelled('leg', [rod_surface((0, 0.08, 0), (0, seat_y, 0), 0.03)])
        parts += labelled('leg', [rod_surface((0, 0.08, 0), (0.3 * math.cos(a), 0.02, 0.3 * math.sin(a)), 0.02)
                                  for a in np.arange(5) * 2 * math.pi / 5])
    lean = rng.uniform(0, 0.3)                          # the backrest leans back (to -z) by this angle
    tilt = np.array([[1, 0, 0], [0, math.cos(lean), math.sin(lean)], [0, -math.sin(lean), math.cos(lean)]])

    def on_back(f):                                     # (y, z) of the point a fraction f up the backrest
        return seat_y + math.cos(lean) * f * back_h, -depth / 2 + 0.02 - math.sin(lean) * f * back_h
    if rng.random() < 0.6:
        parts += labelled('back', [box_surface((0, *on_back(0.5)), (width, back_h, rng.uniform(0.02, 0.06)), tilt)])
    else:                                               # two posts and 2..4 slats
        parts += labelled('back', [box_surface((x, *on_back(0.5)), (0.04, back_h, 0.04), tilt)
                                   for x in (-width / 2, width / 2)])
        parts += labelled('back', [box_surface((0, *on_back(f)), (width, 0.04, 0.02), tilt)
                                   for f in np.linspace(0.3, 1.0, rng.integers(2, 5))])
    if rng.random() < 0.3:                              # armrests on front posts
        arm_y = seat_y + rng.uniform(0.15, 0.25)
        for x in (-width / 2, width / 2):
            parts += labelled('arm', [box_surface((x, arm_y, 0), (0.05, 0.04, depth)),
                                      rod_surface((x, seat_y, depth / 2 - 0.03), (x, arm_y, depth / 2 - 0.03), 0.02)])
    return parts


def stool_parts(rng):
    seat_y, radius, seat_t = rng.uniform(0.4, 0.8), rng.uniform(0.15, 0.3), rng.uniform(0.03, 0.08)
    parts = labelled('seat', [frustum_surface((0, seat_y - seat_t, 0), radius, radius, seat_t) if rng.random() < 0.6
                              else box_surface((0, seat_y - seat_t / 2, 0), (2 * radius, seat_t, 2 * radius))])
    n_legs, splay, leg_r = rng.integers(3, 5), rng.uniform(1.0, 1.5), rng.uniform(0.015, 0.035)
    angles = rng.uniform(0, 2 * math.pi) + np.arange(n_legs) * 2 * math.pi / n_legs
    top_r = 0.75 * radius
    parts += labelled('leg', [rod_surface((splay * top_r * math.cos(a), 0, splay * top_r * math.sin(a)),
                                          (top_r * math.cos(a), seat_y - seat_t, top_r * math.sin(a)), leg_r)
                              for a in angles])
    if rng.random() < 0.4:                              # foot ring, where it meets the splayed legs
        ring_y = rng.uniform(0.2, 0.4) * seat_y
        parts += labelled('ring', [torus_surface((0, ring_y, 0), top_r * (splay - (splay - 1) * ring_y / seat_y),
                                                 leg_r, 2 * math.pi)])
    if rng.random() < 0.15:                             # a low back: a bar chair
        parts += labelled('back', [box_surface((0, seat_y + 0.1, -radius), (1.6 * radius, 0.12, 0.03))])
    return parts


def bench_parts(rng):
    length, depth = rng.uniform(0.9, 2.0), rng.uniform(0.3, 0.55)
    seat_y, seat_t = rng.uniform(0.38, 0.5), rng.uniform(0.03, 0.08)
    parts = labelled('seat', [box_surface((0, seat_y - seat_t / 2, 0), (length, seat_t, depth))])
    if rng.random() < 0.6:
        parts += labelled('leg', leg_surfaces(rng, length / 2 - 0.08, depth / 2 - 0.04, seat_y - seat_t,
                                              rng.uniform(0.03, 0.07)))
    else:                                               # two slab ends
        parts += labelled('leg', [box_surface((x, (seat_y - seat_t) / 2, 0), (0.05, seat_y - seat_t, 0.9 * depth))
                                  for x in (-0.4 * length, 0.4 * length)])
    if rng.random() < 0.5:                              # backrest
        back_h = rng.uniform(0.2, 0.45)
        parts += labelled('back', [box_surface((0, seat_y + back_h / 2 + 0.05, -depth / 2), (length, back_h, 0.04))])
    return parts


def bed_parts(rng):
    length, width = rng.uniform(1.6, 2.2), rng.uniform(0.8, 1.9)
    bottom, thick, head_h = rng.uniform(0.1, 0.4), rng.uniform(0.12, 0.35), rng.uniform(0.1, 0.9)
    top = bottom + thick
    parts = (labelled('mattress', [box_surface((0, bottom + thick / 2, 0), (width, thick, length))])
             + labelled('headboard', [box_surface((0, (top + head_h) / 2, -length / 2), (width, top + head_h, 0.06))]))
    if rng.random() < 0.5:                              # footboard
        foot_h = top + rng.uniform(0.0, 0.3)
        parts += labelled('footboard', [box_surface((0, foot_h / 2, length / 2), (width, foot_h, 0.05))])
    if rng.random() < 0.6:
        parts += labelled('base', leg_surfaces(rng, width / 2 - 0.05, length / 2 - 0.05, bottom, rng.uniform(0.04, 0.08)))
    else:                                               # a closed base
        parts += labelled('base', [box_surface((0, bottom / 2, 0), (0.95 * width, bottom, 0.95 * length))])
    n_pillows = rng.integers(0, 3)
    for x in np.linspace(-width / 4, width / 4, n_pillows) if n_pillows == 2 else [0] * n_pillows:
        parts += labelled('pillow', [ellipsoid_surface((x, top + 0.05, -length / 2 + 0.25),
                                                       (min(0.3, width / 4), 0.07, 0.18))])
    return parts


def sofa_parts(rng):
    length, depth, seat_y = rng.uniform(1.2, 2.6), rng.uniform(0.7, 1.0), rng.uniform(0.35, 0.5)
    foot, back_h, back_t = rng.uniform(0.0, 0.15), rng.uniform(0.25, 0.55), rng.uniform(0.12, 0.3)
    parts = (labelled('seat', [box_surface((0, (foot + seat_y) / 2, 0), (length, seat_y - foot, depth))])
             + labelled('back', [box_surface((0, seat_y + back_h / 2, -depth / 2 + back_t / 2), (length, back_h, back_t))]))
    if rng.random() < 0.8:                              # arms
        arm_h, arm_w = rng.uniform(0.1, 0.3), rng.uniform(0.1, 0.25)
        parts += labelled('arm', [box_surface((x, (foot + seat_y + arm_h) / 2, 0), (arm_w, seat_y + arm_h - foot, depth))
                                  for x in (-(length - arm_w) / 2, (length - arm_w) / 2)])
    cushions = rng.integers(0, 4)
    parts += labelled('cushion', [box_surface((x, seat_y + 0.04, back_t / 2), (0.9 * length / cushions, 0.08, depth - back_t))
                                  for x in (np.arange(cushions) - (cushions - 1) / 2) * length / max(cushions, 1)])
    if foot > 0.03:
        parts += labelled('leg', leg_surfaces(rng, length / 2 - 0.05, depth / 2 - 0.05, foot, 0.05))
    return parts


def shelf_parts(rng):
    width, height, depth = rng.uniform(0.5, 1.6), rng.uniform(0.5, 2.0), rng.uniform(0.25, 0.45)
    board = rng.uniform(0.015, 0.04)
    parts = labelled('upright', [box_surface((x, height / 2, 0), (board, height, depth)) for x in (-width / 2, width / 2)])
    parts += labelled('board', [box_surface((0, y, 0), (width, board, depth))
                                for y in np.linspace(board / 2, height - board / 2, rng.integers(2, 7))])
    if rng.random() < 0.6:                              # back panel
        parts += labelled('back', [box_surface((0, height / 2, -depth / 2), (width, height, board))])
    if rng.random() < 0.3:                              # divider
        parts += labelled('upright', [box_surface((0, height / 2, 0), (board, height, depth))])
    return parts


def lamp_parts(rng):
    pole_h, base_r = rng.uniform(0.3, 1.6), rng.uniform(0.08, 0.22)
    parts = (labelled('base', [frustum_surface((0, 0, 0), base_r, base_r * rng.uniform(0.5, 1.0), rng.uniform(0.02, 0.06))
                               if rng.random() < 0.7 else box_surface((0, 0.02, 0), (2 * base_r, 0.04, 2 * base_r))])
             + labelled('pole', [rod_surface((0, 0, 0), (0, pole_h, 0), rng.uniform(0.01, 0.025))]))
    head = np.array([0, pole_h, 0])
    if rng.random() < 0.4:                              # an arm
        head = head + [rng.uniform(0.15, 0.5), rng.uniform(-0.2, 0.1), 0]
        parts += labelled('pole', [rod_surface((0, pole_h, 0), head, 0.012)])
    if rng.random() < 0.75:                             # an open shade
        shade_h, r_bottom = rng.uniform(0.12, 0.35), rng.uniform(0.1, 0.3)
        parts += labelled('shade', [frustum_surface(head - [0, shade_h / 2, 0], r_bottom, r_bottom * rng.uniform(0.4, 1.0),
                                                    shade_h, bottom=False, top=False)])
    else:                                               # a globe
        parts += labelled('shade', [ellipsoid_surface(head, np.full(3, rng.uniform(0.08, 0.2)))])
    return parts


def mug_parts(rng):
    radius, height = rng.uniform(0.035, 0.06), rng.uniform(0.06, 0.13)
    parts = labelled('body', [frustum_surface((0, 0, 0), radius, radius * rng.uniform(1.0, 1.25), height, top=False)])
    if rng.random() < 0.85:                             # handle
        parts += labelled('handle', [torus_surface((radius, height / 2, 0), rng.uniform(0.2, 0.35) * height,
                                                   rng.uniform(0.004, 0.01), rng.uniform(0.8, 1.0) * math.pi, axis='z')])
    return parts


def bottle_parts(rng):
    radius, body_h, shoulder_h = rng.uniform(0.025, 0.06), rng.uniform(0.08, 0.25), rng.uniform(0.005, 0.05)
    neck_r, neck_h = rng.uniform(0.3, 0.6) * radius, rng.uniform(0.01, 0.08)
    neck_y = body_h + shoulder_h
    return (labelled('body', [frustum_surface((0, 0, 0), radius, radius * rng.uniform(0.85, 1.0), body_h, top=False),
                              frustum_surface((0, body_h, 0), 0.9 * radius, neck_r, shoulder_h, bottom=False, top=False)])
            + labelled('neck', [frustum_surface((0, neck_y, 0), neck_r, neck_r, neck_h, bottom=False, top=False)])
            + labelled('cap', [frustum_surface((0, neck_y + neck_h, 0), 1.15 * neck_r, 1.15 * neck_r,
                                               rng.uniform(0.01, 0.025))]))


def vase_parts(rng):
    heights = rng.uniform(0.03, 0.12, rng.integers(2, 5))          # a stack of 2..4 frustums
    radii = rng.uniform(0.3, 1.0, len(heights) + 1) * rng.uniform(0.03, 0.09)
    bases = np.concatenate([[0], np.cumsum(heights)[:-1]])
    name = lambda i: 'base' if i == 0 else 'neck' if i == len(heights) - 1 else 'body'   # bottom, top, between
    return [(name(i), frustum_surface((0, y, 0), r0, r1, h, bottom=(i == 0), top=False))
            for i, (y, r0, r1, h) in enumerate(zip(bases, radii[:-1], radii[1:], heights))]


def airplane_parts(rng):
    length = rng.uniform(2.5, 4.0)
    radius, span, chord = (length * rng.uniform(0.04, 0.08), length * rng.uniform(0.6, 1.2),
                           length * rng.uniform(0.15, 0.3))
    nose, tail = length * rng.uniform(0.05, 0.12), length * rng.uniform(0.15, 0.3)
    tail_x = -length / 2 + 0.1 * length
    parts = (labelled('fuselage', [frustum_surface((-length / 2 + tail, 0, 0), radius, radius, length - tail - nose,
                                                   axis='x', bottom=False, top=False),
                                   ellipsoid_surface((length / 2 - nose, 0, 0), (nose, radius, radius)),    # nose
                                   frustum_surface((-length / 2, 0.6 * radius, 0), 0.3 * radius, radius, tail,
                                                   axis='x', top=False)])                                   # tail cone
             + labelled('tail', [box_surface((tail_x, radius + 0.1 * span, 0), (0.5 * chord, 0.2 * span, 0.02))]))  # fin
    wing_x, wing_y = length * rng.uniform(-0.1, 0.15), radius * rng.uniform(-0.7, 0.7)
    sweep = rng.uniform(0, 0.6)
    for side in (-1, 1):
        turn = yaw_matrix(-side * sweep)                # wing tips swept back (to -x)
        wing_center = (wing_x - math.sin(sweep) * span / 4, wing_y, side * span / 4)
        parts += (labelled('wing', [box_surface(wing_center, (chord, 0.03 * chord + 0.01, span / 2), turn)])
                  + labelled('tail', [box_surface((tail_x, radius, side * span / 8), (0.5 * chord, 0.02, span / 4), turn)]))
    n_engines = rng.choice([0, 2, 4], p=[0.3, 0.5, 0.2])
    for z in np.array([-2, -1, 1, 2] if n_engines == 4 else [-1, 1] if n_engines == 2 else []) * span / 6:
        parts += labelled('engine', [frustum_surface((wing_x - 0.1 * length, wing_y - 0.8 * radius, z), 0.4 * radius,
                                                     0.4 * radius, 0.25 * length, axis='x')])
    return parts


def car_parts(rng):
    length, width, body_h = rng.uniform(3.5, 5.0), rng.uniform(1.6, 2.0), rng.uniform(0.45, 0.8)
    wheel_r, wheel_w = rng.uniform(0.28, 0.4), rng.uniform(0.18, 0.3)
    clearance = wheel_r * rng.uniform(0.5, 0.9)
    cabin_l, cabin_h = length * rng.uniform(0.35, 0.7), rng.uniform(0.35, 0.7)
    cabin_x = length * rng.uniform(-0.2, 0.15)
    parts = (labelled('body', [box_surface((0, clearance + body_h / 2, 0), (length, body_h, width))])
             + labelled('cabin', [box_surface((cabin_x, clearance + body_h + cabin_h / 2, 0),
                                              (cabin_l, cabin_h, width * rng.uniform(0.8, 0.95)))]))
    axle_x = length / 2 - rng.uniform(0.55, 0.9)
    for x in [-axle_x, axle_x] + ([-axle_x + 2.2 * wheel_r] if rng.random() < 0.1 else []):   # 4 or 6 wheels
        parts += labelled('wheel', [frustum_surface((x, wheel_r, z), wheel_r, wheel_r, wheel_w, axis='z')
                                    for z in (-width / 2, width / 2 - wheel_w)])
    return parts


# same order as SYNTHETIC_CLASSES: PARTS_OF_CLASS[label](rng) -> [(part name, surface), ...]
PARTS_OF_CLASS = (table_parts, chair_parts, stool_parts, bench_parts, bed_parts, sofa_parts,
                  shelf_parts, lamp_parts, mug_parts, bottle_parts, vase_parts, airplane_parts, car_parts)


def sample_shape(parts, num_points, rng):
    """[(part id, surface), ...] of one object -> points (num_points, 3) and their part ids (num_points,):
    sampled by area, unevenly dense, scaled, turned, noisy."""
    part_ids, surfaces = zip(*parts)
    area = np.array([a for a, _ in surfaces]) * rng.lognormal(0.0, 0.6, len(surfaces))  # uneven density per part
    counts = rng.multinomial(num_points, area / area.sum())
    xyz = np.concatenate([sample(n, rng) for (_, sample), n in zip(surfaces, counts)])   # (num_points, 3)
    labels = np.repeat(part_ids, counts)                     # the part of each point, in the same order
    xyz = xyz * rng.uniform(0.75, 1.33, 3)                   # anisotropic scale
    xyz = xyz @ yaw_matrix(rng.uniform(0, 2 * math.pi)).T    # random rotation about the up axis
    extent = np.abs(xyz - xyz.mean(0)).max()
    xyz = xyz + rng.normal(0.0, rng.uniform(0.002, 0.015) * extent, xyz.shape)
    order = rng.permutation(num_points)                      # no part order in the point order
    return xyz[order], labels[order]


def synthetic_part_clouds(num_shapes, num_points, rng):
    """-> clouds (S, N, 3) float32 as sampled, labels (S,) int64 balanced to within one, and
    part labels (S, N) int64: the global id (SYNTHETIC_PART_NAMES) of the part each point lies on."""
    labels = rng.permutation(np.arange(num_shapes) % len(SYNTHETIC_CLASSES))
    clouds, parts = zip(*[sample_shape([(PART_ID[SYNTHETIC_CLASSES[label], name], surface)
                                        for name, surface in PARTS_OF_CLASS[label](rng)], num_points, rng)
                          for label in labels])
    return np.stack(clouds).astype(np.float32), labels.astype(np.int64), np.stack(parts).astype(np.int64)


def synthetic_clouds(num_shapes, num_points, rng):
    """-> clouds (S, N, 3) float32 as sampled, labels (S,) int64, classes balanced to within one.
    The same random draws as synthetic_part_clouds, which also returns the part labels."""
    clouds, labels, _ = synthetic_part_clouds(num_shapes, num_points, rng)
    return clouds, labels


# ---------------------------------------------------------------- the demo teacher's own classes
# The synthetic demo's 2D teacher (train_teacher.py) learns classes that are none of the 13 above: each is a
# random assembly of the same primitives (2 to 5 parts: boxes, cylinders, cones, ellipsoids and rods, each
# with its own place, size and axis), and each of its shapes moves and resizes the parts by up to a fifth,
# then is sampled, scaled, turned and jittered as every synthetic shape is (sample_shape).

PRIMITIVES = ('box', 'cylinder', 'cone', 'ellipsoid', 'rod')


def random_assembly(rng):
    """One class of random assemblies: [(primitive, centre (3,), size (3,), axis), ...], 2 to 5 parts."""
    return [(str(rng.choice(PRIMITIVES)), rng.uniform([-0.5, 0.0, -0.5], [0.5, 1.0, 0.5]), rng.uniform(0.05, 0.6, 3),
             str(rng.choice(['x', 'y', 'z']))) for _ in range(rng.integers(2, 6))]


def assembly_surfaces(assembly, rng):
    """The surfaces of one shape of an assembly class: each part moved and resized by up to a fifth."""
    surfaces = []
    for kind, centre, size, axis in assembly:
        centre, (a, b, h) = centre + rng.uniform(-0.2, 0.2, 3) * size, size * rng.uniform(0.8, 1.2, 3)
        along = np.eye(3)['xyz'.index(axis)]
        base = centre - 0.5 * h * along                      # frustums and rods stand on their base
        if kind == 'box':
            surfaces.append(box_surface(centre, (a, b, h)))
        elif kind == 'ellipsoid':
            surfaces.append(ellipsoid_surface(centre, np.array([a, b, h]) / 2))
        elif kind == 'rod':
            surfaces.append(rod_surface(base, base + h * along, 0.1 * a))
        else:                                                # a cylinder, or a cone (a narrow top)
            surfaces.append(frustum_surface(base, a / 2, a / 2 if kind == 'cylinder' else 0.1 * a, h, axis))
    return surfaces


def assembly_clouds(assemblies, num_shapes, num_points, rng):
    """-> clouds (S, N, 3) float32 as sampled and labels (S,) int64 (assembly index), balanced to within one."""
    labels = rng.permutation(np.arange(num_shapes) % len(assemblies))
    clouds = [sample_shape([(0, surface) for surface in assembly_surfaces(assemblies[k], rng)], num_points, rng)[0]
              for k in labels]
    return np.stack(clouds).astype(np.float32), labels.astype(np.int64)
