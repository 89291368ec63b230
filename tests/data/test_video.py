"""Video data: the moving-digits generator (deterministic, mass-preserving motion), the folder
loaders (frame folders, mp4/gif files, UCF-101 class layout) on files the tests write, corrupt
files, and the GIF/MP4/PNG writer."""
import numpy as np
import pytest
import torch
from PIL import Image

from nrdm.config import DataConfig
from nrdm.data import build_dataset, data_shape
from nrdm.data.video import VideoFolder, moving_digits
from nrdm.utils.video import save_video

iio = pytest.importorskip("imageio.v3")


def test_moving_digits_is_deterministic_and_moves_without_losing_ink():
    a = moving_digits(32, frames=6, image_size=20, digit_size=8, speed=1.5, seed=3)
    b = moving_digits(32, frames=6, image_size=20, digit_size=8, speed=1.5, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, moving_digits(32, frames=6, image_size=20, digit_size=8, speed=1.5, seed=4).images)
    assert not torch.equal(a.images, moving_digits(32, frames=6, image_size=20, digit_size=8, speed=1.5, seed=3,
                                                   split="test").images)
    assert a.images.shape == (32, 1, 6, 20, 20) and a.images.min() >= -1 and a.images.max() <= 1
    ink = ((a.images + 1) / 2).sum(dim=(1, 3, 4))                   # (N, F): one digit, integer shifts, no clipping
    torch.testing.assert_close(ink, ink[:, :1].expand_as(ink))
    assert (a.images[:, :, 1:] != a.images[:, :, :-1]).any(dim=(1, 3, 4)).float().mean() > 0.9   # it moves
    assert set(a.labels.tolist()) <= set(range(10)) and a.num_frames == 6


def test_moving_digits_through_the_config():
    cfg = DataConfig(name="moving-digits", image_size=16, frames=4, num_clips=40)
    train, test = build_dataset(cfg), build_dataset(DataConfig(**{**cfg.__dict__, "split": "test"}))
    assert len(train) == 40 and len(test) == 10 and train.images.shape[1:] == (1, 4, 16, 16)
    assert data_shape(cfg) == (1, 16, 10)
    with pytest.raises(ValueError, match="set data.frames"):
        build_dataset(DataConfig(name="moving-digits"))
    with pytest.raises(ValueError, match="needs a video dataset"):
        build_dataset(DataConfig(name="digits", frames=4))


def _frames(n, size=12):
    """n RGB frames whose brightness encodes the frame index (10, 30, 50, ...)."""
    return [np.full((size, size + 4, 3), 10 + 20 * i, dtype=np.uint8) for i in range(n)]


def test_frame_folders_give_strided_windows(tmp_path):
    for clip, n in (("a", 9), ("b", 5)):
        (tmp_path / clip).mkdir()
        for i, frame in enumerate(_frames(n)):
            Image.fromarray(frame).save(tmp_path / clip / f"{i:04d}.png")
    data = VideoFolder(tmp_path, image_size=8, frames=2, stride=2)
    # span 3: clip a (9 frames) -> windows at 0, 3, 6; clip b (5) -> 0
    assert len(data) == 4 and data.num_classes == 0
    clip, label = data[1]
    assert clip.shape == (3, 2, 8, 8) and label == 0
    brightness = ((clip + 1) * 127.5).mean(dim=(0, 2, 3))
    torch.testing.assert_close(brightness, torch.tensor([10. + 20 * 3, 10. + 20 * 5]), atol=1.0, rtol=0)


def test_video_files_and_ucf_layout(tmp_path):
    for cls, ext in (("ApplyEyeMakeup", ".mp4"), ("Biking", ".gif")):
        (tmp_path / cls).mkdir()
        frames = np.stack(_frames(8, size=16))
        if ext == ".gif":
            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp_path / cls / f"v{ext}", save_all=True, append_images=images[1:], duration=100, loop=0)
        else:
            iio.imwrite(tmp_path / cls / f"v{ext}", frames, fps=8, codec="libx264", macro_block_size=1)
    data = VideoFolder(tmp_path, image_size=8, frames=4)
    assert data.num_classes == 2 and len(data) == 4                  # two windows per 8-frame video
    assert [data[i][1] for i in range(4)] == [0, 0, 1, 1]
    clip, _ = data[3]                                                # gif, frames 4..7 (lossless)
    brightness = ((clip + 1) * 127.5).mean(dim=(0, 2, 3))
    torch.testing.assert_close(brightness, torch.tensor([90., 110., 130., 150.]), atol=1.0, rtol=0)
    assert data_shape(DataConfig(name="video-folder", root=str(tmp_path), frames=4, image_size=8)) == (3, 8, 2)


def test_corrupt_video_is_named_or_skipped(tmp_path):
    Image.fromarray(_frames(1)[0]).save(tmp_path / "fine.gif")      # a 1-frame gif is a valid video
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    with pytest.raises(ValueError, match=r"cannot read video .*broken\.mp4.*data\.skip_corrupt=true"):
        VideoFolder(tmp_path, image_size=8, frames=1)
    with pytest.warns(UserWarning, match="broken.mp4"):
        data = VideoFolder(tmp_path, image_size=8, frames=1, skip_corrupt=True)
    assert len(data) == 1


def test_save_video_writes_gif_mp4_and_frame_grid(tmp_path):
    videos = moving_digits(6, frames=5, image_size=12, digit_size=6).images
    paths = save_video(videos, tmp_path / "s.gif", nrow=3, scale=2, fps=5)
    gif, mp4 = iio.imread(paths["gif"], index=None), iio.imread(paths["mp4"], index=None)
    assert gif.shape[0] == 5 and mp4.shape[0] == 5 and mp4.shape[1] % 16 == 0 and mp4.shape[2] % 16 == 0
    strip = np.asarray(Image.open(paths["frames"]))
    assert strip.shape[:2] == (2 * (6 * 14 + 2), 2 * (5 * 14 + 2))   # 6 rows (samples) x 5 columns (frames)
    with pytest.raises(ValueError, match=r"expected videos \(N, C, F, H, W\)"):
        save_video(videos[:, :, 0], tmp_path / "x.gif")
