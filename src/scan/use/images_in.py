"""New images for a trained run: arrays, tensors and image files as uint8 (N, C, H, W) batches
shaped like the run's training images (same decoding, crop, size and channels)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from scan.core.errors import RunError
from scan.data import DataError, ImageDataset, imagefiles
from scan.data.imagefiles import IMAGE_EXTENSIONS, decode_images, list_files, over_pixel_limit, pixel_limit_hint

log = logging.getLogger("scan")


def as_image_tensor(x) -> torch.Tensor:
    """An image batch as uint8 (N, C, H, W), C in {1, 3}.

    numpy arrays are channels-last, (N, H, W) or (N, H, W, C); torch tensors channels-first,
    (N, H, W) or (N, C, H, W) (each library's convention). C may be 1, 3 or 4 (alpha dropped);
    floats must be in [0, 1].
    """
    channels_last = not isinstance(x, torch.Tensor)
    if channels_last:
        array = np.asarray(x)
        if array.dtype.kind not in "buif":   # objects, strings: torch's own error would not say what to pass
            raise RunError(f"images must be uint8 (0..255) or float in [0, 1], got a {array.dtype} array; "
                           f"image files are given as their folder or file paths")
        t = torch.as_tensor(array)
    else:
        t = x.detach().cpu()
    if t.ndim == 3:
        t = t.unsqueeze(1)
    elif t.ndim == 4 and channels_last:
        t = t.permute(0, 3, 1, 2)
    if t.ndim != 4 or t.shape[1] not in (1, 3, 4):
        layout = "(N, H, W) or (N, H, W, C)" if channels_last else "(N, H, W) or (N, C, H, W)"
        raise RunError(f"images must have shape {layout} with C = 1, 3 or 4, got {tuple(np.shape(x))}")
    t = t[:, :3]
    if t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
        # NaN would otherwise turn into black pixels without a word
        raise RunError("float images contain NaN or infinite values; replace them (e.g. np.nan_to_num) first")
    if t.is_floating_point():
        if t.numel() and (t.min() < 0 or t.max() > 1):
            raise RunError("float images must lie in [0, 1]; pass uint8 for 0..255 values")
        t = (t * 255).round()
    elif t.dtype != torch.uint8:
        raise RunError(f"images must be uint8 (0..255) or float in [0, 1], got {t.dtype}")
    return t.to(torch.uint8).contiguous()


def match_shape(images: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Convert grey <-> RGB to the run's channel count; the height and width must already match."""
    channels, size = shape[0], tuple(shape[1:])
    if tuple(images.shape[2:]) != size:
        raise RunError(f"images are {images.shape[2]}x{images.shape[3]} pixels, the model expects "
                       f"{size[0]}x{size[1]}; pass image files or folders to have them resized")
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    # ITU-R 601 luma, the weights Pillow uses for RGB -> L
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def load_image_paths(paths, shape: list[int]) -> ImageDataset:
    """Image files and folders (searched recursively) decoded like the training folder of a run.

    A file reached twice (given directly and through its folder, or by two spellings of its
    path) is read once, where it first appears.
    """
    seen: set[str] = set()
    parts = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path} does not exist (expected an image file or a folder of images)")
        files = [f for f in list_files(path) if f.suffix.lower() in IMAGE_EXTENSIONS] if path.is_dir() else [path]
        # realpath, not Path.resolve: a symbolic link to itself is skipped as unreadable, not a crash
        fresh = [f for f in files if os.path.realpath(f) not in seen]
        seen.update(os.path.realpath(f) for f in fresh)
        if not fresh:
            continue
        if path.is_dir():
            images = [(f, image) for f, image in zip(fresh, decode_images(fresh, shape[1])) if image is not None]
            if len(images) < len(fresh):
                kept = {f for f, _ in images}
                log.warning("%s: skipped %d unreadable image files%s", path, len(fresh) - len(images),
                            pixel_limit_hint([f for f in fresh if f not in kept]))
        else:
            images = [(path, decode_images([path], shape[1])[0])]
            if images[0][1] is None:
                if (size := over_pixel_limit(path)) is not None:
                    raise DataError(f"{path}: {size[0]}x{size[1]} is over the pixel limit of {imagefiles.MAX_IMAGE_PIXELS:,} "
                                    f"pixels (raise scan.data.imagefiles.MAX_IMAGE_PIXELS, or downscale it)")
                raise DataError(f"{path}: not a readable image (expected {'/'.join(sorted(IMAGE_EXTENSIONS))})")
        parts += images
    if not parts:
        raise DataError("no images given: pass image files or folders")
    tensor = torch.from_numpy(np.stack([image for _, image in parts]).transpose(0, 3, 1, 2).copy())
    return ImageDataset(match_shape(tensor, shape), None, None, [str(f) for f, _ in parts])
