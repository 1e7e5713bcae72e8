"""
pictures.py: drawing with Pillow (no plotting library): the stage pictures of demo.py and the
curves.png of every training run.

Every demo picture is one `titled_grid`: a title, column labels, row labels, square tiles
(optionally with a label under each), and a footer with a colour legend and a caption:

    title
              column 1   column 2   column 3
    row 1     [tile]     [tile]     [tile]
    row 2     [tile]     [tile]     [tile]
    legend and caption

A tile is an image (a depth image, an attention map: `image_tile`) or the points of a cloud
drawn in one view (`points_tile`), one colour per point. The views are project.py's (row,
column, depth) permutations (x,y,z), (z,x,y), (y,z,x); for DISPLAY only, each is turned so
that y points up (`upright_image`). View 2 looks from above: there y is the depth.
Every picture uses one colour convention: VISIBLE, HIDDEN, PREDICTED, CENTRE below.

Training runs draw one more picture, curves.png (`curves_picture`, redrawn by training.Run every
epoch): the numbers of log.jsonl against epochs, in panels of `line_plot`s (losses, learning rate,
accuracies).
"""
import math
import os
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from project import VIEWS, point_pixels, project_depth_images

TILE = 224            # tile side in pixels (the teacher's image size in the paper)
PAD = 4               # gap between tiles and around the grid
MARGIN = 8            # blank border inside a points tile, so that dots at the edge stay whole
LINE = 16             # height of one line of text
TITLE_H = 28          # the title line
COL_LABEL_H = 2 * LINE        # column labels wrap to at most two lines
ROW_LABEL_W = 150             # row labels wrap to this width
TILE_LABEL_H = LINE + 2       # a label under each tile, when there are tile labels
FOOTER_LINES = 6              # legend + caption lines; a longer footer is an error
FOOTER_H = FOOTER_LINES * LINE + PAD

WHITE, TEXT, BORDER = (255, 255, 255), (20, 20, 20), (160, 160, 160)
# one colour convention in every picture
VISIBLE = (31, 100, 200)      # blue: tokens the encoder sees
HIDDEN = (200, 200, 200)      # light grey: tokens hidden from the encoder (masked)
PREDICTED = (235, 120, 0)     # orange: points the decoder predicts
CENTRE = (0, 0, 0)            # black: token centres
CLOUD = (110, 110, 110)       # dark grey: the input points, where nothing is hidden yet
# telling kNN groups apart (colours carry no meaning beyond "another token")
GROUP_COLOURS = ((228, 26, 28), (55, 126, 184), (77, 175, 74), (152, 78, 163), (255, 127, 0),
                 (166, 86, 40), (247, 129, 191), (0, 170, 170), (150, 150, 0), (120, 190, 250))
# attention colour map, low to high: dark purple, red, orange, light yellow
HEAT = ((40, 10, 70), (150, 30, 110), (225, 80, 50), (250, 175, 40), (255, 250, 190))

# for display only: (swap rows and columns, flip rows) turns each view so that y points up
UPRIGHT = ((True, True), (False, False), (False, True))
VIEW_NAMES = ('view 1 (x,y,z): front, y up', 'view 2 (z,x,y): from above (y = depth)',
              'view 3 (y,z,x): side, y up')
assert len(UPRIGHT) == len(VIEW_NAMES) == len(VIEWS)

FONT = ImageFont.load_default(size=13)
TITLE_FONT = ImageFont.load_default(size=16)


class Dots(NamedTuple):
    """One layer of a points tile: points (M, 3), one rgb or (M, 3) colours, dot radius, 'dot' or 'cross'."""
    points: torch.Tensor
    colour: object
    radius: int = 1
    marker: str = 'dot'


# ---------------------------------------------------------------- tiles

def upright_image(image, view):
    """(..., S, S) image of view `view` -> the same pixels, turned so that y points up."""
    swap, flip = UPRIGHT[view]
    image = image.transpose(-1, -2) if swap else image
    return image.flip(-2) if flip else image


def upright_pixels(pixels, view, size):
    """(M, 2) (row, col) pixels of view `view` in a size x size image -> their place after upright_image."""
    swap, flip = UPRIGHT[view]
    rows, cols = (pixels[:, 1], pixels[:, 0]) if swap else (pixels[:, 0], pixels[:, 1])
    return torch.stack([size - 1 - rows if flip else rows, cols], dim=1)


def image_tile(image, view=None, resample=Image.NEAREST):
    """An (S, S) grey image in [0, 1] or an (S, S, 3) uint8 one -> a TILE x TILE tile (upright if view given)."""
    if view is not None:
        image = upright_image(image if image.dim() == 2 else image.permute(2, 0, 1), view)
        image = image if image.dim() == 2 else image.permute(1, 2, 0)
    if image.dim() == 2:
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)[..., None].expand(-1, -1, 3)
    return Image.fromarray(image.contiguous().numpy()).resize((TILE, TILE), resample)


def cloud_frame(xyz):
    """How one cloud (N, 3) fills a points tile in every view (project.py's geometry, inside the margin)."""
    return project_depth_images(xyz[None], TILE - 2 * MARGIN)[1]


def marker_offsets(radius, marker):
    """(row, col) offsets of the pixels a marker of this radius covers."""
    steps = range(-radius, radius + 1)
    if marker == 'cross':
        return [(d, d) for d in steps] + [(d, -d) for d in steps]
    return [(dr, dc) for dr in steps for dc in steps if dr * dr + dc * dc <= radius * radius + radius]


def points_tile(frame, view, *layers):
    """A TILE x TILE tile: each `Dots` layer drawn in turn (later layers on top) in view `view`."""
    canvas = np.full((TILE, TILE, 3), 255, dtype=np.uint8)
    inner = TILE - 2 * MARGIN
    for layer in layers:
        pixels = point_pixels(layer.points.reshape(1, -1, 3), frame, inner)[view]    # (M, 2)
        rows, cols = (upright_pixels(pixels, view, inner) + MARGIN).numpy().T
        colour = np.broadcast_to(np.asarray(layer.colour, dtype=np.uint8), (len(rows), 3))
        for dr, dc in marker_offsets(layer.radius, layer.marker):
            canvas[np.clip(rows + dr, 0, TILE - 1), np.clip(cols + dc, 0, TILE - 1)] = colour
    return Image.fromarray(canvas)


def heat_colours(values):
    """Values (...) in [0, 1] -> (..., 3) uint8 colours of the HEAT map, linearly between its stops."""
    stops = torch.tensor(HEAT, dtype=torch.float32)
    position = values.clamp(0, 1) * (len(HEAT) - 1)
    low = position.floor().long().clamp(max=len(HEAT) - 2)
    t = (position - low)[..., None]
    return ((1 - t) * stops[low] + t * stops[low + 1]).round().to(torch.uint8)


def group_colours(num_groups):
    """(G, 3) uint8: a colour per token, repeating GROUP_COLOURS."""
    return torch.tensor(GROUP_COLOURS, dtype=torch.uint8)[torch.arange(num_groups) % len(GROUP_COLOURS)]


# ---------------------------------------------------------------- the grid

def grid_size(rows, cols, row_labels=True, col_labels=True, tile_labels=False):
    """(width, height) in pixels of a titled_grid with this layout."""
    width = (ROW_LABEL_W if row_labels else 0) + cols * (TILE + PAD) + PAD
    return width, tile_origin(rows, 0, row_labels, col_labels, tile_labels)[1] + FOOTER_H


def tile_origin(row, col, row_labels=True, col_labels=True, tile_labels=False):
    """(x, y) in pixels of the top left corner of tile [row][col] in a titled_grid with this layout."""
    left = ROW_LABEL_W if row_labels else 0
    top = TITLE_H + (COL_LABEL_H if col_labels else 0)
    cell_h = TILE + PAD + (TILE_LABEL_H if tile_labels else 0)
    return left + PAD + col * (TILE + PAD), top + PAD + row * cell_h


def wrap(text, width):
    """Lines of `text` (paragraphs split at newlines) that each fit `width` pixels in FONT."""
    lines = []
    for paragraph in text.split('\n'):
        words, line = paragraph.split(), ''
        for word in words:
            candidate = f'{line} {word}'.strip()
            if line and FONT.getlength(candidate) > width:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return lines


def colour_bar(draw, x, y, width, low, high, marks):
    """A HEAT bar from low to high at (x, y), one LINE tall, with labelled marks {value: text} under it."""
    values = torch.linspace(0, 1, width)
    colours = heat_colours(values).tolist()
    for i, colour in enumerate(colours):
        draw.line([(x + i, y + 2), (x + i, y + LINE - 3)], fill=tuple(colour))
    draw.rectangle([x, y + 2, x + width - 1, y + LINE - 3], outline=BORDER)
    free = x   # labels go left to right, each after the previous one
    for value, text in sorted(marks.items()):
        at = x + round((value - low) / (high - low) * (width - 1))
        draw.line([(at, y), (at, y + LINE)], fill=TEXT)
        left = max(at - FONT.getlength(text) / 2, free)
        draw.text((left, y + LINE), text, fill=TEXT, font=FONT)
        free = left + FONT.getlength(text) + 8


def titled_grid(tiles, title, col_labels=None, row_labels=None, tile_labels=None, legend=(),
                caption='', heat_scale=None):
    """One picture: tiles[r][c] (PIL images, TILE x TILE, or None: empty) under a title, with labels and a footer.

    legend: (rgb, text) swatches; caption: text, wrapped; heat_scale: (low, high, {value: text})
    draws a HEAT colour bar from low to high with labelled marks. Every size comes from grid_size.
    """
    rows, cols = len(tiles), len(tiles[0])
    layout = (row_labels is not None, col_labels is not None, tile_labels is not None)
    width, height = grid_size(rows, cols, *layout)
    picture = Image.new('RGB', (width, height), WHITE)
    draw = ImageDraw.Draw(picture)
    draw.text((PAD, 6), title, fill=TEXT, font=TITLE_FONT)
    for c, label in enumerate(col_labels or []):
        for i, line in enumerate(wrap(label, TILE)[:2]):
            draw.text((tile_origin(0, c, *layout)[0], TITLE_H + i * LINE), line, fill=TEXT, font=FONT)
    for r in range(rows):
        if row_labels is not None:
            for i, line in enumerate(wrap(row_labels[r], ROW_LABEL_W - 2 * PAD)[:TILE // LINE]):
                draw.text((PAD, tile_origin(r, 0, *layout)[1] + i * LINE), line, fill=TEXT, font=FONT)
        for c in range(cols):
            if tiles[r][c] is None:   # an empty cell
                continue
            x, y = tile_origin(r, c, *layout)
            picture.paste(tiles[r][c], (x, y))
            draw.rectangle([x - 1, y - 1, x + TILE, y + TILE], outline=BORDER)
            if tile_labels is not None:
                text = tile_labels[r][c]
                draw.text((x + (TILE - FONT.getlength(text)) / 2, y + TILE + 2), text, fill=TEXT, font=FONT)
    footer(draw, PAD, height - FOOTER_H + PAD, width - 2 * PAD, legend, caption, heat_scale)
    return picture


def footer(draw, x, y, width, legend, caption, heat_scale):
    """Legend swatches (flowing), the colour bar, then the wrapped caption, in at most FOOTER_LINES lines."""
    line, at = 0, x
    for colour, text in legend:
        item = LINE + 4 + FONT.getlength(text) + 16
        if at > x and at + item > x + width:
            line, at = line + 1, x
        draw.rectangle([at, y + line * LINE + 2, at + LINE - 4, y + line * LINE + LINE - 2],
                       fill=colour, outline=BORDER)
        draw.text((at + LINE, y + line * LINE), text, fill=TEXT, font=FONT)
        at += item
    line += 1 if legend else 0
    if heat_scale is not None:
        low, high, marks = heat_scale
        colour_bar(draw, x, y + line * LINE, min(width, 2 * TILE), low, high, marks)
        line += 2
    lines = wrap(caption, width) if caption else []
    if line + len(lines) > FOOTER_LINES:
        raise ValueError(f'the footer needs {line + len(lines)} lines, more than FOOTER_LINES = {FOOTER_LINES}: '
                         f'shorten the caption {caption[:60]!r}...')
    for i, text in enumerate(lines):
        draw.text((x, y + (line + i) * LINE), text, fill=TEXT, font=FONT)


def save_picture(picture, path):
    """Write a PIL picture as PNG, creating its folder."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    picture.save(path)
    return path


# ---------------------------------------------------------------- line plots: a run's curves

PLOT_W, PLOT_H = 420, 300                 # one panel of curves.png
PLOT_LEFT, PLOT_BOTTOM, PLOT_TOP = 62, 34, 26   # room for the y tick labels, the x label, the panel title
# log.jsonl numbers drawn in curves.png, panel by panel: (title, does a record key belong here, log scale)
CURVE_PANELS = (('loss', lambda key: 'loss' in key, True),
                ('learning rate', lambda key: key == 'lr', True),
                ('accuracy (%)', lambda key: 'accuracy' in key, False),
                ('test mIoU (%)', lambda key: 'miou' in key, False))   # segment.py: test_miou_c, test_miou_i


def nice_ticks(low, high, log=False, count=5):
    """Tick values covering [low, high]: powers of ten on a log axis, else multiples of 1, 2 or 5 x 10^k."""
    if log:
        return [10.0 ** k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)]
    raw = (high - low) / count or 1.0
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [k * step for k in range(math.floor(low / step), math.ceil(high / step) + 1)]


def line_plot(series, title, x_label='epoch', log_y=False, size=(PLOT_W, PLOT_H), bands=None):
    """One panel: series {name: (xs, ys, width[, colour])} as lines in GROUP_COLOURS order (or that colour), with
    ticks and a legend;
    bands {name: (xs, lows, highs)}: a vertical bar from low to high at each x, in that series' colour.
    log_y draws the y axis in powers of ten (positive values only). Returns a PIL image."""
    bands = bands or {}
    width, height = size
    panel = Image.new('RGB', size, WHITE)
    draw = ImageDraw.Draw(panel)
    draw.text((PLOT_LEFT, 4), title, fill=TEXT, font=FONT)
    legend_width = 30 + max(FONT.getlength(name) for name in series)              # the legend, right of the plot
    box = (PLOT_LEFT, PLOT_TOP, width - PAD - 4 - legend_width, height - PLOT_BOTTOM)   # left, top, right, bottom
    xs = [x for x_list, *_ in series.values() for x in x_list]
    ys = [y for _, y_list, *_ in series.values() for y in y_list] + [y for _, lows, highs in bands.values()
                                                                     for y in lows + highs]
    warp = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    y_ticks = nice_ticks(min(ys), max(ys), log_y)
    y_low, y_high = warp(min(min(ys), y_ticks[0])), warp(max(max(ys), y_ticks[-1]))
    x_low, x_high = 0.0, max(max(xs), 1.0)

    def at(x, y):   # data -> pixel
        return (box[0] + (x - x_low) / (x_high - x_low) * (box[2] - box[0]),
                box[3] - (warp(y) - y_low) / ((y_high - y_low) or 1.0) * (box[3] - box[1]))
    draw.rectangle(box, outline=BORDER)
    for y in y_ticks:
        _, row = at(x_low, y)
        draw.line([(box[0] - 3, row), (box[0], row)], fill=TEXT)
        text = f'{y:.0e}' if log_y else f'{y:g}'
        draw.text((box[0] - 5 - FONT.getlength(text), row - LINE / 2), text, fill=TEXT, font=FONT)
    for x in nice_ticks(x_low, x_high, count=6):
        if x <= x_high:
            column, _ = at(x, y_ticks[0])
            draw.line([(column, box[3]), (column, box[3] + 3)], fill=TEXT)
            text = f'{x:g}'
            draw.text((column - FONT.getlength(text) / 2, box[3] + 3), text, fill=TEXT, font=FONT)
    draw.text(((box[0] + box[2] - FONT.getlength(x_label)) / 2, box[3] + LINE + 2), x_label, fill=TEXT, font=FONT)
    legend_row, legend_x = box[1] + 2, box[2] + 10
    for (name, (x_list, y_list, line_width, *chosen)), colour in zip(series.items(), GROUP_COLOURS * 3):
        colour = chosen[0] if chosen else colour
        for x, low, high in zip(*bands.get(name, ((), (), ()))):
            (column, top), (_, bottom) = at(x, high), at(x, low)
            draw.line([(column, top), (column, bottom)], fill=colour, width=1)
            draw.line([(column - 3, top), (column + 3, top)], fill=colour)
            draw.line([(column - 3, bottom), (column + 3, bottom)], fill=colour)
        points = [at(x, y) for x, y in zip(x_list, y_list)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=line_width)
        for column, row in points if len(points) < 30 else points[-1:]:   # few points: mark each one
            draw.ellipse([column - 2, row - 2, column + 2, row + 2], fill=colour)
        draw.line([(legend_x, legend_row + LINE / 2), (legend_x + 16, legend_row + LINE / 2)], fill=colour, width=3)
        draw.text((legend_x + 20, legend_row), name, fill=TEXT, font=FONT)
        legend_row += LINE
    return panel


def curves_series(records, wanted):
    """{key: (xs, ys, line width, colour)} of the log.jsonl records' keys that `wanted` accepts, x in epochs as the
    console counts them: a step record at epoch + step / (steps of that epoch), an epoch record at epoch + 1, its
    end (thicker line). A step curve and its epoch mean share a colour (loss_3d and train_loss_3d); a
    'baseline_' number is a horizontal line across the plot."""
    steps = {}
    for r in records:
        if 'step' in r:
            steps[r['epoch']] = max(steps.get(r['epoch'], 1), r['step'])
    series, bases = {}, []
    for r in records:
        x = r['epoch'] + (r['step'] / steps[r['epoch']] if 'step' in r else 1)
        for key, value in r.items():
            if wanted(key) and isinstance(value, (int, float)) and math.isfinite(value):
                base = key.removeprefix('train_')
                bases += [base] if base not in bases else []
                xs, ys, *_ = series.setdefault(key, ([], [], 1 if 'step' in r else 3,
                                                     GROUP_COLOURS[bases.index(base) % len(GROUP_COLOURS)]))
                xs.append(x)
                ys.append(value)
    last = max((x for xs, *_ in series.values() for x in xs), default=1)
    return {f'{key[len("baseline_"):]} of an untrained PointNet' if key.startswith('baseline_') else key:
            ([0, last], [ys[-1], ys[-1]], 1, colour) if key.startswith('baseline_') else (xs, ys, width, colour)
            for key, (xs, ys, width, colour) in series.items()}


def curves_picture(records, title):
    """curves.png of a run: its log.jsonl records (dicts) drawn against epochs, one panel per CURVE_PANELS
    entry that has numbers (few-shot: the fold of the last record). None if there is nothing to draw yet."""
    records = [r for r in records if 'epoch' in r and not r.get('header')]
    if records and 'fold' in records[-1]:
        records = [r for r in records if r.get('fold') == records[-1]['fold']]
        title = f'{title}, fold {records[-1]["fold"]}'
    panels = []
    for name, wanted, log_y in CURVE_PANELS:
        series = curves_series(records, wanted)
        if series:
            positive = all(y > 0 for _, ys, *_ in series.values() for y in ys)
            panels.append(line_plot(series, name, log_y=log_y and positive))
    if not panels:
        return None
    picture = Image.new('RGB', (len(panels) * PLOT_W + PAD, PLOT_H + TITLE_H), WHITE)
    ImageDraw.Draw(picture).text((PAD, 6), f'{title}: log.jsonl against epochs (thin: logged steps; thick: epochs)',
                                 fill=TEXT, font=TITLE_FONT)
    for i, panel in enumerate(panels):
        picture.paste(panel, (PAD + i * PLOT_W, TITLE_H))
    return picture
