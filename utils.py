"""Image <-> tensor conversion with the release's exact arithmetic (format notes, Sec. 6).

``cv2ten``/``ten2cv`` keep the release's names and BGR convention for code written against it;
``img2ten``/``ten2img`` are the RGB versions the scripts use. Tensors are [N, 3, H, W] RGB in [-1, 1].
Also the scripts' shared ``HelpFormatter``.
"""
import argparse

import numpy as np
import torch
from PIL import Image

from imageio_utils import save_image_atomic


def img2ten(img, device="cpu"):
    """RGB uint8 [H, W, 3] -> [1, 3, H, W] float32 in [-1, 1]; (x / 255 - 0.5) / 0.5 computed in float64."""
    x = np.asarray(img).transpose(2, 0, 1)[None]  # [1, 3, H, W]
    x = ((x / 255.0 - 0.5) / 0.5).astype(np.float32)
    return torch.from_numpy(x).to(device)


def cv2ten(img, device="cpu"):
    """BGR uint8 [H, W, 3] (as from cv2.imread) -> [1, 3, H, W] RGB float32 in [-1, 1] (release API)."""
    return img2ten(np.asarray(img)[:, :, ::-1], device)


def ten2img(t):
    """[N, 3, H, W] (or [3, H, W]) in [-1, 1] -> list of RGB uint8 [H, W, 3].

    The release's conversion: * 0.5 + 0.5, * 255, clamp to [0, 255], cast by truncation (not rounding).
    Unlike the release, the caller's tensor is left unchanged.
    """
    t = t.detach().float().cpu()
    if t.ndim == 3:
        t = t[None]
    t = ((t * 0.5 + 0.5) * 255).nan_to_num().clamp(0, 255)  # NaN -> 0 (style_transfer_folder skips such images)
    arr = t.permute(0, 2, 3, 1).numpy().astype(np.uint8)  # [N, H, W, 3]
    return list(arr)


def ten2cv(img_ten, bgr=True):
    """[1, 3, H, W] -> uint8 [H, W, 3], BGR for cv2.imwrite by default (release API and argument names, batch 1)."""
    img = ten2img(img_ten)[0]
    return np.ascontiguousarray(img[:, :, ::-1]) if bgr else img


def tile_rows(rows):
    """rows [N, cols, 3, H, W] in [-1, 1] -> one image [3, N*H, cols*W] in [0, 1]: sample n is row n."""
    n, cols, c, h, w = rows.shape
    grid = rows.float().permute(2, 0, 3, 1, 4).reshape(c, n * h, cols * w)
    return (grid.clamp(-1, 1) + 1) / 2


def save_grid(grid01, path):
    """[3, H, W] in [0, 1] -> PNG at `path`, written atomically (a sample grid of the trainers)."""
    save_image_atomic(Image.fromarray(ten2img(grid01 * 2 - 1)[0]), path)



class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with '(default: ...)' where it informs: not on switches (a store_false flag would read
    'default: True'), on options without a default, or where the help text already says its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.nargs == 0 or action.default is None or "default:" in text:
            return text
        return super()._get_help_string(action)
