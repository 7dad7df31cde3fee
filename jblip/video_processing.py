"""Video input: frames from a video file (PyAV), a folder of frame images, an animated GIF or an
array, sampled uniformly to T frames, each frame preprocessed exactly as an image.

Sampling is HF's (`default_sample_indices_fn`): of N frames, frame i of T is number i * N // T;
asking for more frames than the video has is an error, as in HF. A file's N is the frame count
its stream declares (what HF's PyAV reader uses), or the decoded count when it declares none.
Preprocessing is `jblip.image_processing.ImageProcessor` per frame (PIL bicubic resize, rescale,
CLIP normalisation), which is what HF's `InstructBlipVideoImageProcessor` does to each frame.
"""
from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from jblip.image_processing import ImageError, ImageProcessor, load_image, to_rgb

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_NUM_FRAMES = 4  # what the InstructBLIP-Video processor lays out

VideoLike = Union[str, os.PathLike, np.ndarray, Sequence]


class VideoError(ValueError):
    """A video that cannot be read or used (unreadable, no frames, too few frames), naming it."""


def sample_indices(total: int, num_frames: int, name: str = "video") -> np.ndarray:
    """Uniformly spaced frame numbers: i * total // num_frames for i < num_frames."""
    if not isinstance(num_frames, (int, np.integer)) or isinstance(num_frames, bool) or num_frames < 1:
        raise VideoError(f"num_frames must be a positive integer, got {num_frames!r}")
    if total == 0:
        raise VideoError(f"{name} has no frames")
    if num_frames > total:
        raise VideoError(f"{name} has {total} frame(s), fewer than the {num_frames} asked for; "
                         "ask for fewer frames (--frames / num_frames)")
    return np.arange(num_frames, dtype=np.int64) * total // num_frames


def _pyav():
    try:
        import av
    except ImportError:
        raise VideoError("decoding video files needs PyAV: pip install 'jblip[video]' (or pass a folder of "
                         "frames, an animated GIF or an array)") from None
    return av


def _read_video_file(path: str, num_frames: int) -> list[np.ndarray]:
    av = _pyav()
    try:
        container = av.open(path)
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise VideoError(f"{path} is not a readable video file ({e})") from None
    with container:
        if not container.streams.video:
            raise VideoError(f"{path} holds no video stream (no frames to read)")
        stream = container.streams.video[0]
        total = int(stream.frames or 0)
        try:
            if total <= 0:  # no declared count (some containers): count by decoding once
                total = sum(1 for _ in container.decode(video=0))
                container.seek(0)
            wanted = set(sample_indices(total, num_frames, path).tolist())
            last, frames = max(wanted), {}
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
        except av.FFmpegError as e:
            raise VideoError(f"{path}: the video data cannot be decoded ({e})") from None
    if len(frames) < len(wanted):
        raise VideoError(f"{path} declares {total} frames but only {len(frames)} of the sampled ones could be "
                         "decoded; the file is truncated or its frame count is wrong")
    return [frames[i] for i in sorted(wanted)]


def _read_frame_folder(path: str, num_frames: int) -> list[Image.Image]:
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(FRAME_SUFFIXES) and not n.startswith("."))
    indices = sample_indices(len(names), num_frames, f"frame folder {path} (frames: {', '.join(FRAME_SUFFIXES)})")
    return [load_image(os.path.join(path, names[i])) for i in indices]


def _read_animation(image: Image.Image, path: str, num_frames: int) -> list[Image.Image]:
    frames = []
    for i in sample_indices(getattr(image, "n_frames", 1), num_frames, path):
        image.seek(int(i))
        frames.append(to_rgb(image.copy()))
    return frames


def _open_animation(path: str) -> Image.Image | None:
    """The file as a PIL animation (GIF, animated PNG / WebP), or None when it is not one."""
    try:
        image = Image.open(path)
    except (UnidentifiedImageError, OSError):
        return None
    if image.format == "GIF" or getattr(image, "is_animated", False):
        return image
    image.close()
    return None


def load_frames(video: VideoLike, num_frames: int = DEFAULT_NUM_FRAMES, name: str = "video") -> list:
    """`num_frames` uniformly sampled frames (PIL images or uint8 [H, W, 3] arrays) of one video:
    a video file, a folder of frame images (in name order), an animated GIF, a uint8 array
    [N, H, W, 3] or a list of frames (images or arrays)."""
    if isinstance(video, (str, os.PathLike)):
        path = os.fspath(video)
        if os.path.isdir(path):
            return _read_frame_folder(path, num_frames)
        if not os.path.exists(path):
            raise FileNotFoundError(f"video not found: {path}")
        if not os.path.isfile(path):
            raise VideoError(f"{path} is not a regular file (a pipe, socket or device); give a video file")
        animation = _open_animation(path)
        if animation is not None:
            with animation:
                try:
                    return _read_animation(animation, path, num_frames)
                except (OSError, EOFError) as e:
                    raise VideoError(f"{path}: the animation cannot be decoded ({e})") from None
        return _read_video_file(path, num_frames)
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] not in (3, 4) or video.dtype != np.uint8:
            raise VideoError(f"{name}: a video array must be uint8 [frames, height, width, 3]; got {video.dtype} "
                             f"{video.shape}" + (" (one image: give a list of frames, or a 4-D array)"
                                                if video.ndim == 3 else ""))
        return [video[i] for i in sample_indices(video.shape[0], num_frames, name)]
    if isinstance(video, (list, tuple)):
        return [video[i] for i in sample_indices(len(video), num_frames, name)]
    raise VideoError(f"{name}: expected a video file, a folder of frames, a uint8 array [frames, H, W, 3] "
                     f"or a list of frames; got {type(video).__name__}")


def as_video_list(videos) -> list:
    """`videos` as a list with one entry per video. A single 4-D array is refused: it could be
    one video or a batch of images, so it must come wrapped in a list."""
    if isinstance(videos, np.ndarray):
        if videos.ndim == 5:
            return list(videos)
        raise VideoError(f"videos must be a list of videos (or a 5-D uint8 array [videos, frames, H, W, 3]); got one "
                         f"{videos.ndim}-D array {videos.shape}" + (": for one video pass [array]" if videos.ndim == 4 else ""))
    if isinstance(videos, (str, os.PathLike)):
        return [videos]
    videos = list(videos)
    if not videos:
        raise VideoError("no videos given")
    return videos


class VideoProcessor:
    """Videos -> float32 [B, T, S, S, 3] pixel values: T sampled frames each, preprocessed as images."""

    def __init__(self, image_processor: ImageProcessor):
        self.image_processor = image_processor

    def __repr__(self):
        return f"VideoProcessor({self.image_processor})"

    def __call__(self, videos, num_frames: int = DEFAULT_NUM_FRAMES) -> np.ndarray:
        out = []
        for i, video in enumerate(as_video_list(videos)):
            name = os.fspath(video) if isinstance(video, (str, os.PathLike)) else f"video {i}"
            frames = load_frames(video, num_frames, name)
            try:
                out.append(np.stack([self.image_processor.preprocess_one(f, f"{name} frame {j}")
                                     for j, f in enumerate(frames)]))
            except ImageError as e:
                raise VideoError(str(e)) from None
        return np.stack(out)
