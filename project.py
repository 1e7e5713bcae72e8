"""
project.py: multi-view depth projection and image-to-point back-projection
(I2P-MAE paper, section "Efficient Projection"; docs/authors_code.md section 3).

Point to image. Each of V = 3 views permutes (x, y, z) into (row, column, depth).
A point paints the 5 x 5 pixels around its cell with its depth; a pixel holds the
SUM of the depths painted on it, squashed by a sigmoid (empty pixels are 0.5):
  xyz        (B, N, 3)
  images     (V*B, 3, S, S) in (0, 1), ordered [view 1 of every sample; view 2; view 3]
  geometry   per image: the cloud's minimum corner, cell size and centring offset
Image to point. A teacher map (V*B, C, h, w) is upsampled bicubically to S x S and
read at the pixel of each query point, with the geometry of the projection. We
evaluate the bicubic only at the pixels we read: upsampling is a linear map
U f U^T with U (S, h), so a point at (row, col) reads U[row] f U[col]^T.
  back_project(points (B, M, 3), ...) -> (B, M, V*C), channels [view 1 | view 2 | view 3]
Picture: python demo.py project [--samples 4]      Tests: the project.py section of test_all.py
"""
from typing import NamedTuple

import torch

from tokenizer import check_points

VIEWS = ((0, 1, 2), (2, 0, 1), (1, 2, 0))  # (row, column, depth) axes: (x,y,z), (z,x,y), (y,z,x)
SPLAT = 2             # a point paints the (2 * SPLAT + 1)^2 = 5 x 5 pixels around its cell
BICUBIC_A = -0.75     # PyTorch's bicubic kernel constant
MIN_EXTENT = 1e-12     # smallest projected extent of a cloud (in cloud units), so the cell size is never 0


class ViewGeometry(NamedTuple):
    pc_min: torch.Tensor   # (V*B, 2) smallest (row, col) coordinate of the cloud
    cell: torch.Tensor     # (V*B,) cloud units per pixel
    offset: torch.Tensor   # (V*B, 2) pixel shift that centres the splatted cloud
    views: tuple           # the (row, column, depth) axes of each view


def permute_views(xyz, views=VIEWS):
    """(B, N, 3) -> (V*B, N, 3): the cloud's coordinates as (row, column, depth) for each view."""
    return torch.cat([xyz[..., list(view)] for view in views])


def pixel_cells(rowcol, geometry):
    """(V*B, M, 2) coordinates -> (V*B, M, 2) integer-valued cells (float), before splatting."""
    return torch.floor((rowcol - geometry.pc_min[:, None]) / geometry.cell[:, None, None])


def project_depth_images(xyz, img_size=224, views=VIEWS):
    """Depth images (V*B, 3, S, S) in (0, 1) and the ViewGeometry to read them back."""
    check_points(xyz, 'xyz')
    pts = permute_views(xyz, views)                                   # (V*B, N, 3)
    VB, N, _ = pts.shape
    rowcol, depth = pts[..., :2], pts[..., 2]
    pc_min = rowcol.min(dim=1).values                                 # (V*B, 2)
    extent = (rowcol.max(dim=1).values - pc_min).max(dim=1).values    # (V*B,)
    # a cloud whose points share their two coordinates in a view (a line seen end-on) has no
    # extent there: give it a tiny one, so that it projects to a dot in the middle
    extent = extent.clamp_min(MIN_EXTENT)
    # the 3 free pixels: the splat reaches 2 beyond the cell range [0, S-3], then shifts by +1
    geometry = ViewGeometry(pc_min, extent / (img_size - 3), None, tuple(views))
    cells = pixel_cells(rowcol, geometry)                             # (V*B, N, 2)
    steps = torch.arange(-SPLAT, SPLAT + 1, device=xyz.device, dtype=xyz.dtype)
    splat = torch.cartesian_prod(steps, steps)                        # (25, 2), row offset major
    painted = (cells[:, :, None] + splat + 1).view(VB, -1, 2)         # (V*B, N*25, 2)
    middle = torch.floor((painted.max(dim=1).values + painted.min(dim=1).values) / 2)
    offset = img_size / 2 - middle - 1                                # (V*B, 2)
    # the authors move -1 to 0 and S to S-1; the painted range is exactly [-1, S], so clamp
    pixels = (painted + offset[:, None]).clamp(0, img_size - 1).long()
    flat = pixels[..., 0] * img_size + pixels[..., 1]                 # (V*B, N*25)
    values = depth[:, :, None].expand(-1, -1, len(splat)).reshape(VB, -1)
    summed = torch.zeros(VB, img_size * img_size, dtype=xyz.dtype, device=xyz.device)
    summed.scatter_add_(1, flat, values)                              # sum, not a z-buffer
    images = torch.sigmoid(summed).view(VB, 1, img_size, img_size).expand(-1, 3, -1, -1)
    return images, geometry._replace(offset=offset)


def point_pixels(points, geometry, img_size):
    """(B, M, 3) query points -> (V*B, M, 2) long pixel of each point's own cell in each view."""
    rowcol = permute_views(points, geometry.views)[..., :2]
    pixels = pixel_cells(rowcol, geometry) + 1 + geometry.offset[:, None]
    # points of the projected cloud always land inside; clamp others to the border
    return pixels.clamp(0, img_size - 1).long()


def bicubic_matrix(n_in, n_out, device=None):
    """U (n_out, n_in) with U @ f @ U.T == F.interpolate(f, n_out, mode='bicubic') for a map f.

    PyTorch's rule (align_corners=False): output pixel p reads source position
    (p + 0.5) * n_in / n_out - 0.5 through 4 taps with the cubic kernel A = -0.75,
    tap indices clamped to [0, n_in - 1] (clamped taps add up on the border cell).
    """
    def near(x):   # |x| <= 1
        return ((BICUBIC_A + 2) * x - (BICUBIC_A + 3)) * x * x + 1

    def far(x):    # 1 < |x| < 2
        return ((BICUBIC_A * x - 5 * BICUBIC_A) * x + 8 * BICUBIC_A) * x - 4 * BICUBIC_A

    src = (torch.arange(n_out, dtype=torch.float32, device=device) + 0.5) * (n_in / n_out) - 0.5
    first = torch.floor(src)
    t = src - first
    weights = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=1)       # (n_out, 4)
    taps = (first.long()[:, None] + torch.arange(-1, 3, device=device)).clamp(0, n_in - 1)
    return torch.zeros(n_out, n_in, device=device).scatter_add_(1, taps, weights)


def sample_upsampled(maps, pixels, img_size):
    """Read the bicubic upsampling of maps (V*B, C, h, w) to S x S at pixels (V*B, M, 2) -> (V*B, M, C)."""
    VB, C, h, w = maps.shape
    rows = bicubic_matrix(h, img_size, maps.device)[pixels[..., 0]]   # (V*B, M, h)
    cols = bicubic_matrix(w, img_size, maps.device)[pixels[..., 1]]   # (V*B, M, w)
    weights = (rows[..., :, None] * cols[..., None, :]).flatten(2)    # (V*B, M, h*w), 16 non-zero
    return weights.to(maps.dtype) @ maps.flatten(2).transpose(1, 2)   # (V*B, M, C)


def back_project(points, geometry, maps, img_size):
    """Teacher maps (V*B, C, h, w) read at points (B, M, 3) -> (B, M, V*C), views concatenated.

    In float32 even under bf16 autocast (--amp): the read-back saliency decides the mask (a sort).
    """
    check_points(points, 'points')
    B, M, _ = points.shape
    V = len(geometry.views)
    if maps.dim() != 4 or maps.shape[0] != V * B:
        raise ValueError(f'maps must be (V*B, C, h, w) = ({V * B}, C, h, w), got {tuple(maps.shape)}')
    with torch.autocast(points.device.type, enabled=False):
        values = sample_upsampled(maps.float(), point_pixels(points, geometry, img_size), img_size)
    return values.view(V, B, M, -1).permute(1, 2, 0, 3).reshape(B, M, -1)

