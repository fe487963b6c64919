"""The release's interpolation-video schedule and frame layout, and an H.264 writer (imageio-ffmpeg).

Per pair of consecutive styles (prev, next): 31 frames with alpha in [0] + sigmoid(-5, -4.5, ..., 4.5) +
[1] * 10; the style code is lerp(z_prev, z_next, alpha) and the reference window slides from prev to
next. The last frame is held 10 more frames: (n_styles - 1) * 31 + 10 frames per face.
"""
import contextlib
import errno
import os
import subprocess
import threading
from fractions import Fraction

import numpy as np
import torch

from fileio import DISK_FULL_ERRNOS, atomic_path
from utils import img2ten

HOLD_FRAMES = 10


def interpolation_alphas(start=-5.0, end=5.0, step=0.5, len_tail=HOLD_FRAMES):
    """[0] + [sigmoid(x) for x in arange(start, end, step)] + [1] * len_tail (31 values by default)."""
    xs = np.arange(start, end, step)
    return [0.0] + [float(1.0 / (1 + np.exp(-x))) for x in xs] + [1.0] * len_tail


def sliding_window(prev, nxt, alpha):
    """prev stacked on next ([2H, W, 3] uint8), the H rows starting at int(H * alpha)."""
    h = prev.shape[0]
    top = int(h * alpha)
    return np.concatenate([prev, nxt], axis=0)[top:top + h]


def frame_to_uint8(t):
    """[3, H, W] in [-1, 1] -> uint8 [H, W, 3] as the release's videos: clamp(x*0.5+0.5, 0, 1) * 255, truncated."""
    t = torch.clamp(t.float().cpu() * 0.5 + 0.5, 0, 1)
    return (t.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)


def compose_frame(face, window, result):
    """[face | window | result] as one uint8 frame; the image panels go through the same float
    conversion as the release's (uint8 -> [-1, 1] -> uint8), so they match it to the bit."""
    return frame_to_uint8(torch.cat([img2ten(face)[0], img2ten(window)[0], result.float().cpu()], dim=2))


def write_mp4(path, frames, fps=30, crf=18):
    """Encode an iterable of uint8 [H, W, 3] RGB frames as H.264 (yuv420p) MP4, atomically.

    The file appears only when complete (temporary file + os.replace); returns the frame count. ffmpeg's
    exit code is checked (imageio-ffmpeg's writer does not look at it: a file ffmpeg could not finish, e.g.
    on a full disk, would be moved into place): a full disk is a fileio.DiskFullError naming ``path``, any
    other failure a RuntimeError with ffmpeg's message.
    """
    import imageio_ffmpeg

    count = 0
    with atomic_path(path, suffix=".tmp.mp4") as tmp:
        ffmpeg, messages = None, []
        try:
            for frame in frames:
                if ffmpeg is None:
                    ffmpeg = start_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe(), tmp, frame.shape, fps, crf, messages)
                try:
                    ffmpeg.stdin.write(np.ascontiguousarray(frame).data)
                except BrokenPipeError:  # ffmpeg stopped: its exit code and message say why
                    break
                count += 1
            if ffmpeg is None:
                raise ValueError(f"{path}: no frames to write")
            with contextlib.suppress(BrokenPipeError):
                ffmpeg.stdin.close()
            ffmpeg.wait()
        finally:
            if ffmpeg is not None:
                if ffmpeg.poll() is None:  # an error (or Ctrl-C) on the way: nothing to finish
                    ffmpeg.kill()
                    ffmpeg.wait()
                with contextlib.suppress(BrokenPipeError):  # (closed already unless an error ended the frames)
                    ffmpeg.stdin.close()
                ffmpeg.stderr_reader.join()
                ffmpeg.stderr.close()
        if ffmpeg.returncode:
            message = b"".join(messages).decode(errors="replace").strip().splitlines() or ["no message"]
            if any(os.strerror(code) in line for line in message for code in DISK_FULL_ERRNOS):
                raise OSError(errno.ENOSPC, f"ffmpeg: {message[-1]}", tmp)  # atomic_path: a DiskFullError
            raise RuntimeError(f"ffmpeg could not write {path} (exit code {ffmpeg.returncode}): {message[-1]}")
    return count


def start_ffmpeg(exe, path, shape, fps, crf, messages):
    """An ffmpeg process encoding raw RGB frames of ``shape`` from its stdin into ``path`` (H.264, yuv420p,
    sides rounded up to even), its stderr collected into ``messages`` by a thread (``stderr_reader``)."""
    h, w = shape[:2]
    even = ["-vf", f"scale={w + w % 2}:{h + h % 2}"] if w % 2 or h % 2 else []  # yuv420p needs even sides
    cmd = [exe, "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{w}x{h}", "-pix_fmt", "rgb24",
           "-r", str(Fraction(fps).limit_denominator()), "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p",
           *even, "-v", "error", "-crf", str(crf), "-movflags", "+faststart", path]
    ffmpeg = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ffmpeg.stderr_reader = threading.Thread(target=lambda: messages.extend(ffmpeg.stderr), daemon=True)
    ffmpeg.stderr_reader.start()
    return ffmpeg


def read_mp4(path):
    """Decode an MP4 to (uint8 frames [T, H, W, 3], fps, codec) with imageio-ffmpeg (for checks and tests)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(path)
    meta = reader.__next__()
    w, h = meta["size"]
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(h, w, 3) for f in reader]
    return np.stack(frames), meta["fps"], meta.get("codec", "")
