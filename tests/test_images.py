"""Discovery and safe decoding (cocatk.images): formats, modes, EXIF, corrupt files, guards, symlinks."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cocatk.errors import ImageError, UsageError
from cocatk.images import ImageDecodeError, find_images, image_extensions, load_image


def _rgb(w: int = 48, h: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


# ---- discovery ---------------------------------------------------------------------------------------------------
def test_find_images_recursive_skips_hidden_junk_and_other_files(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for rel in ["x.jpg", "a/y.PNG", "a/b/z.webp", "a/b/t.tiff", ".hidden/h.jpg", "a/._y.jpg", "a/.DS_Store"]:
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "a" / "Thumbs.db").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    found = sorted(p.relative_to(tmp_path).as_posix() for p in find_images([tmp_path]))
    assert found == ["a/b/t.tiff", "a/b/z.webp", "a/y.PNG", "x.jpg"]
    assert all(p.is_absolute() for p in find_images([tmp_path]))


def test_find_images_symlinks_skipped_unless_followed_with_cycle_guard(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "sub" / "p.png").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.jpg").write_bytes(b"x")
    os.symlink(real, real / "sub" / "loop")  # a cycle
    os.symlink(outside, real / "link")
    os.symlink(outside / "o.jpg", real / "file_link.jpg")
    plain = sorted(p.name for p in find_images([real]))
    assert plain == ["p.png"]
    followed = list(find_images([real], follow_symlinks=True))
    assert sorted(p.name for p in followed) == ["o.jpg", "p.png"]  # o.jpg reached twice, yielded once
    assert all(p == p.resolve() for p in followed)


def test_find_images_missing_root_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        list(find_images([tmp_path / "nope"]))


def test_heif_extensions_registered_when_plugin_installed() -> None:
    pytest.importorskip("pillow_heif")
    assert ".heic" in image_extensions()


# ---- formats and modes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_formats_decode_to_rgb(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"im.{fmt.lower()}"
    _rgb().save(path, fmt)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (48, 32)


def test_heic_decodes(tmp_path: Path) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    path = tmp_path / "im.heic"
    try:
        _rgb(64, 64).save(path, "HEIF")
    except Exception:  # pragma: no cover - a libheif build without an encoder
        pytest.skip("this pillow-heif cannot encode HEIF")
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (64, 64)


def test_alpha_is_composited_over_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "a.png")
    im = load_image(tmp_path / "a.png")
    assert im.getpixel((1, 1)) == (255, 255, 255)  # fully transparent -> white, not red or black
    assert im.getpixel((0, 0)) == (0, 0, 255)
    la = Image.new("LA", (4, 4), (0, 0))
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_and_other_modes(tmp_path: Path) -> None:
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    p.info["transparency"] = 0
    p.putpixel((0, 0), 0)
    p.save(tmp_path / "p.png", transparency=0)
    im = load_image(tmp_path / "p.png")
    assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((1, 1)) == (10, 20, 30)

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((1, 1))
    assert r > 200 and g < 60 and b < 60  # cyan-free, full magenta+yellow = red

    i16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    i16.save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    assert load_image(tmp_path / "i16.png").getpixel((0, 0)) == (255, 255, 255)  # not clipped garbage

    Image.new("1", (4, 4), 1).save(tmp_path / "b.bmp")
    assert load_image(tmp_path / "b.bmp").getpixel((0, 0)) == (255, 255, 255)


def test_animation_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    im = load_image(tmp_path / "a.gif")
    r, g, b = im.getpixel((4, 4))
    assert r > 200 and b < 50


def _exif_rotated(upright: Image.Image) -> Image.Image:
    """The stored pixels of a camera image whose EXIF orientation 6 says 'rotate 90 degrees clockwise'."""
    stored = upright.rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.info["exif"] = exif.tobytes()
    return stored


def test_exif_orientation_applied(tmp_path: Path) -> None:
    upright = _rgb(48, 32, seed=1)
    stored = _exif_rotated(upright)
    stored.save(tmp_path / "r.png", exif=stored.info["exif"])
    im = load_image(tmp_path / "r.png")
    assert im.size == (48, 32)
    assert np.array_equal(np.asarray(im), np.asarray(upright))


def test_exif_rotated_jpeg_embeds_like_upright_twin(tmp_path: Path, tiny_model) -> None:
    upright = _rgb(96, 64, seed=2).resize((96, 64))
    upright.save(tmp_path / "up.jpg", quality=98)
    stored = _exif_rotated(upright)
    stored.save(tmp_path / "rot.jpg", quality=98, exif=stored.info["exif"])
    unrotated = upright.rotate(90, expand=True)
    a, b, c = tiny_model.encode_images([load_image(tmp_path / "up.jpg"), load_image(tmp_path / "rot.jpg"), unrotated])
    assert float(a @ b) > 0.995
    assert float(a @ b) > float(a @ c) + 1e-4  # without the EXIF fix the embedding would be the rotated one's


# ---- failures ----------------------------------------------------------------------------------------------------
def test_failures_have_short_reasons(tmp_path: Path) -> None:
    buf = io.BytesIO()
    _rgb(256, 256).save(buf, "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image at all")
    _rgb(200, 100).save(tmp_path / "big.png")
    cases = {"trunc.jpg": "truncated", "zero.png": "empty file", "text.jpg": "not an image"}
    for name, reason in cases.items():
        with pytest.raises(ImageDecodeError) as e:
            load_image(tmp_path / name)
        assert e.value.reason == reason, name
        assert isinstance(e.value, ImageError)
    with pytest.raises(ImageDecodeError) as e:
        load_image(tmp_path / "big.png", max_megapixels=0.01)
    assert e.value.reason == "too large" and "MP" in e.value.detail
    assert load_image(tmp_path / "big.png", max_megapixels=0.03).size == (200, 100)


def test_decompression_bomb_is_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _rgb(200, 100).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError) as e:
        load_image(tmp_path / "bomb.png", max_megapixels=None)
    assert e.value.reason == "too large"


def test_mislabelled_but_valid_file_decodes(tmp_path: Path) -> None:
    _rgb().save(tmp_path / "really_png.jpg", "PNG")
    assert load_image(tmp_path / "really_png.jpg").size == (48, 32)


def test_jpeg_draft_decodes_near_model_size(tmp_path: Path) -> None:
    _rgb(1024, 768).save(tmp_path / "large.jpg", quality=90)
    im = load_image(tmp_path / "large.jpg", draft_size=32)
    assert im.size == (128, 96)  # 1/8 scale, both sides still >= 32
    im = load_image(tmp_path / "large.jpg", draft_size=224)
    assert min(im.size) >= 224 and im.size[0] < 1024
    assert load_image(tmp_path / "large.jpg").size == (1024, 768)


def test_bytes_source(tmp_path: Path) -> None:
    buf = io.BytesIO()
    _rgb().save(buf, "PNG")
    assert load_image(buf.getvalue()).size == (48, 32)
    with pytest.raises(ImageDecodeError):
        load_image(b"")
