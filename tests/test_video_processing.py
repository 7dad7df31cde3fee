"""Video input: frame sampling equal to HF's PyAV reader for a file written here, pixels equal to
HF's per-frame BLIP preprocessing (what InstructBlipVideoImageProcessor does), token ids equal
to InstructBlipVideoProcessor; folders, GIFs and arrays; one clear error per bad input."""
from functools import partial

import numpy as np
import pytest
from PIL import Image

from jblip.video_processing import VideoError, VideoProcessor, load_frames, sample_indices
from jblip.image_processing import ImageProcessor

av = pytest.importorskip("av")


def frames_array(n, h=20, w=24, seed=0):
    """n distinct uint8 frames: noise plus a brightness that names the frame."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 120, size=(n, h, w, 3))
    return (base + (np.arange(n) * 12)[:, None, None, None]).astype(np.uint8)


def write_video(path, frames, fps=10):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_sampling_of_a_video_file_equals_hf(tmp_path):
    from transformers.video_utils import default_sample_indices_fn, read_video_pyav
    path = tmp_path / "clip.mp4"
    write_video(path, frames_array(10, 32, 48))
    for t in (1, 4, 10):
        ref, meta = read_video_pyav(str(path), partial(default_sample_indices_fn, num_frames=t))
        ours = np.stack(load_frames(path, t))
        assert meta.total_num_frames == 10 and ours.shape == ref.shape and np.array_equal(ours, ref), t
    assert sample_indices(10, 4).tolist() == [0, 2, 5, 7]


def test_folder_gif_and_array_sample_the_same_frames(tmp_path):
    frames = frames_array(7)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"frame_{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    gif = tmp_path / "clip.gif"
    pil = [Image.fromarray(f).quantize(256, dither=Image.Dither.NONE) for f in frames]
    pil[0].save(gif, save_all=True, append_images=pil[1:], duration=50)
    want = frames[[0, 1, 3, 5]]
    assert np.array_equal(np.stack(load_frames(frames, 4)), want)
    assert np.array_equal(np.stack([np.asarray(f) for f in load_frames(tmp_path, 4)]), want)
    from_gif = np.stack([np.asarray(f) for f in load_frames(gif, 4)])
    expected = np.stack([np.asarray(pil[i].convert("RGB")) for i in (0, 1, 3, 5)])
    assert from_gif.shape == (4, 20, 24, 3) and np.array_equal(from_gif, expected)


def test_pixels_equal_hf_per_frame_preprocessing():
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    videos = [frames_array(6, seed=1), frames_array(4, 30, 17, seed=2)]
    ours = VideoProcessor(ImageProcessor(28))(videos, 4)
    hf = BlipImageProcessorPil(size={"height": 28, "width": 28})
    for v, video in enumerate(videos):
        frames = video[sample_indices(len(video), 4)]
        ref = hf(list(frames), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        assert ours.shape == (2, 4, 28, 28, 3) and np.abs(ours[v] - ref).max() == 0


def test_bad_videos_give_one_clear_error_each(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 10)
    with pytest.raises(VideoError, match="not a readable video"):
        load_frames(junk, 4)
    empty = tmp_path / "empty.mp4"  # a header and no frame: the container lists no video stream
    with av.open(str(empty), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        out.start_encoding()
    with pytest.raises(VideoError, match="holds no video stream"):
        load_frames(empty, 4)
    with pytest.raises(VideoError, match="has no frames"):
        load_frames(np.zeros((0, 16, 16, 3), np.uint8), 4)
    (tmp_path / "no_frames").mkdir()
    with pytest.raises(VideoError, match="has no frames"):
        load_frames(tmp_path / "no_frames", 4)
    short = tmp_path / "short.mp4"
    write_video(short, frames_array(3, 16, 16))
    with pytest.raises(VideoError, match="has 3 frame\\(s\\), fewer than the 4 asked for"):
        load_frames(short, 4)
    with pytest.raises(VideoError, match="for one video pass \\[array\\]"):
        VideoProcessor(ImageProcessor(28))(frames_array(4), 4)
    with pytest.raises(VideoError, match="one image"):
        load_frames(frames_array(1)[0], 1)
