"""Augmentation as a choice among a few fixed views of each image, so a teacher's logits can
be computed once for every view and a student distilled on augmented images still sees the
teacher's answer for exactly the image it was shown ("consistent" teaching, Beyer et al.
2022), at the price of one lookup instead of a teacher forward pass per batch.

The augmentation is a shift of up to `pad` pixels in each direction (zero fill) and, for
natural images, a left-right flip: (2 pad + 1)^2 views, twice that with flips. View 0 of
`view_count` is not the identity; `IDENTITY` of a layout is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def view_count(pad: int = 1, flip: bool = False) -> int:
    return (2 * pad + 1) ** 2 * (2 if flip else 1)


def identity_view(pad: int = 1) -> int:
    """The view index of the unshifted, unflipped image."""
    return pad * (2 * pad + 1) + pad


def draw_views(n: int, generator: torch.Generator | None = None, pad: int = 1,
               flip: bool = False) -> torch.Tensor:
    """A random view per image: int64 [N]. The draws (dy, dx, then flips) are those
    `random_shift` has always made, so seeded runs train on the same images as before."""
    side = 2 * pad + 1
    dy = torch.randint(0, side, (n,), generator=generator)
    dx = torch.randint(0, side, (n,), generator=generator)
    views = dy * side + dx
    if flip:
        views = views + (torch.rand(n, generator=generator) < 0.5).long() * side * side
    return views


def apply_views(x: torch.Tensor, views: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """Image i shown as view `views[i]`. x: [N, C, H, W] -> [N, C, H, W], one gather."""
    n, c, h, w = x.shape
    side = 2 * pad + 1
    dev = x.device
    views = views.to(dev)
    shift, mirror = views % (side * side), views >= side * side
    dy, dx = shift // side, shift % side
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # [N, 1, H, 1]
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # [N, 1, 1, W]
    out = F.pad(x, (pad, pad, pad, pad))[torch.arange(n, device=dev)[:, None, None, None],
                                         torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    if bool(mirror.any()):
        out[mirror] = out[mirror].flip(-1)
    return out


def random_shift(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 1,
                 flip: bool = False) -> torch.Tensor:
    """Shift each image by up to `pad` pixels (zero fill), optionally flip left-right."""
    return apply_views(x, draw_views(len(x), generator, pad, flip), pad)


@torch.no_grad()
def logits_of_every_view(teacher: nn.Module, x: torch.Tensor, pad: int = 1, flip: bool = False,
                         batch_size: int = 1024) -> torch.Tensor:
    """The teacher's logits for every view of every image: float32 [V, N, K]."""
    teacher.eval()
    out = []
    for v in range(view_count(pad, flip)):
        views = torch.full((len(x),), v, dtype=torch.long)
        out.append(torch.cat([teacher(apply_views(x[i:i + batch_size], views[i:i + batch_size], pad)).float()
                              for i in range(0, len(x), batch_size)]))
    return torch.stack(out)
