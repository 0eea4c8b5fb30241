from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile

from erde.runtime.core import preprocess as pp
from erde.runtime.common.errors import ImageError
from erde.runtime.core.manifest import Preprocessing
from erde.runtime.core.preprocess import list_images, load_image, preprocess, preprocess_one, resize, to_rgb

PRE = Preprocessing((8, 8), (0.5, 0.4, 0.3), (0.25, 0.2, 0.1))


def _png(path, img):
    img.save(path)
    return path


# --- load_image ------------------------------------------------------------------------------------------


def test_load_ok(tmp_path):
    img = load_image(_png(tmp_path / "a.png", Image.new("RGB", (5, 4), (10, 20, 30))))
    assert img.size == (5, 4) and img.getpixel((0, 0)) == (10, 20, 30)


def test_missing_empty_folder_and_not_an_image(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.png: no such file"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file"):
        load_image(tmp_path / "empty.jpg")
    (tmp_path / "notes.png").write_text("hello, not a picture")
    with pytest.raises(ImageError, match=r"notes\.png: not an image"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    rng = np.random.default_rng(0)
    path = tmp_path / f"cut.{fmt.lower()}"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.\w+: truncated or corrupt"):
        load_image(path)


def test_bomb_guard_checks_header_before_decoding(tmp_path, monkeypatch):
    path = _png(tmp_path / "big.png", Image.new("RGB", (30, 20)))
    monkeypatch.setattr(pp, "MAX_PIXELS", 500)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1))
    with pytest.raises(ImageError, match=r"big\.png: image is 30x20 = 0\.0 megapixels, more than the 0\.0005-megapixel"):
        load_image(path)
    assert not decoded


@pytest.mark.parametrize("size", [(10, 8), (20, 20)])  # Pillow warns above its limit, refuses above twice it
def test_pillow_bomb_warning_and_error_become_image_error(tmp_path, monkeypatch, size):
    path = _png(tmp_path / "b.png", Image.new("RGB", size))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60)
    with pytest.raises(ImageError, match=r"b\.png: image is too large"):
        load_image(path)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (6, 3), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "r.jpg").size == (3, 6)


# --- to_rgb -----------------------------------------------------------------------------------------------


def _px(img):
    assert img.mode == "RGB"
    return np.asarray(img)


def test_modes_gray_and_bilevel():
    assert _px(to_rgb(Image.new("L", (2, 2), 77)))[0, 0].tolist() == [77, 77, 77]
    assert _px(to_rgb(Image.new("1", (2, 2), 1)))[0, 0].tolist() == [255, 255, 255]
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(rgb) is rgb


def test_alpha_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    out = _px(to_rgb(rgba))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [10, 20, 30]
    half = _px(to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 128))))
    assert half[0, 0].tolist() == [127, 127, 127]
    la = _px(to_rgb(Image.new("LA", (1, 1), (0, 0))))
    assert la[0, 0].tolist() == [255, 255, 255]


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    assert _px(to_rgb(p)).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    p.info["transparency"] = 0  # index 0 is transparent
    assert _px(to_rgb(p)).tolist() == [[[255, 255, 255], [0, 0, 255]]]
    p.save(tmp_path / "t.png")  # and through a file, where Pillow reads the tRNS chunk
    reloaded = load_image(tmp_path / "t.png")
    assert reloaded.mode == "P" and _px(to_rgb(reloaded)).tolist() == [[[255, 255, 255], [0, 0, 255]]]


def test_cmyk():
    assert _px(to_rgb(Image.new("CMYK", (1, 1), (255, 0, 0, 0))))[0, 0].tolist() == [0, 255, 255]


def test_16_bit_scaled_not_clipped(tmp_path):
    a = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    expected = [0, 4, 128, 255]
    assert _px(to_rgb(img))[0, :, 0].tolist() == expected
    reloaded = load_image(_png(tmp_path / "g16.png", img))  # Pillow reads 16-bit PNG as I;16 (newer) or I (older)
    assert _px(to_rgb(reloaded))[0, :, 0].tolist() == expected


def test_32_bit_int_and_float_modes():
    i_small = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert i_small.mode == "I" and _px(to_rgb(i_small))[0, :, 0].tolist() == [0, 100, 255]
    i_wide = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert _px(to_rgb(i_wide))[0, :, 0].tolist() == [0, 255]
    f_unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert f_unit.mode == "F" and _px(to_rgb(f_unit))[0, :, 0].tolist() == [0, 128, 255]
    f_any = Image.fromarray(np.array([[-2.0, 0.0, 2.0]], dtype=np.float32))
    assert _px(to_rgb(f_any))[0, :, 0].tolist() == [0, 128, 255]


# --- resize and preprocess ------------------------------------------------------------------------------


def _bands(width=20, height=10):
    """Left quarter red, right quarter blue, middle green."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 4] = (255, 0, 0)
    a[:, width // 4: width - width // 4] = (0, 255, 0)
    a[:, width - width // 4:] = (0, 0, 255)
    return Image.fromarray(a)


def test_resize_rules():
    img = _bands(40, 10)
    stretched = np.asarray(resize(img, (8, 8), "stretch"))
    assert stretched.shape == (8, 8, 3)
    assert stretched[:, 0, 0].min() > 200 and stretched[:, -1, 2].min() > 200  # the side bands survive
    cropped = np.asarray(resize(img, (8, 8), "shorter-side-center-crop"))
    assert cropped.shape == (8, 8, 3)
    assert (cropped[:, :, 1] == 255).all() and (cropped[:, :, [0, 2]] == 0).all()  # only the green middle
    tall = np.asarray(resize(_bands(10, 30), (4, 6), "shorter-side-center-crop"))
    assert tall.shape == (4, 6, 3)
    with pytest.raises(ImageError, match="unknown resize rule"):
        resize(img, (8, 8), "fit")


def test_preprocess_normalises_exactly():
    out = preprocess([np.full((5, 7, 3), (51, 102, 204), np.uint8)], PRE)
    assert out.shape == (1, 3, 8, 8) and out.dtype == np.float32 and out.flags.c_contiguous
    expected = [(51 / 255 - 0.5) / 0.25, (102 / 255 - 0.4) / 0.2, (204 / 255 - 0.3) / 0.1]
    np.testing.assert_allclose(out[0].reshape(3, -1).mean(1), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[0].reshape(3, -1).std(1), 0, atol=1e-6)


def test_bgr_reverses_channels():
    img = np.random.default_rng(3).integers(0, 256, (9, 9, 3), dtype=np.uint8)
    same = Preprocessing((8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    bgr = Preprocessing((8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), channel_order="BGR")
    np.testing.assert_array_equal(preprocess_one(img, bgr), preprocess_one(img, same)[::-1])


def test_inputs_path_pil_array_agree(tmp_path):
    a = np.random.default_rng(4).integers(0, 256, (11, 13, 3), dtype=np.uint8)
    path = _png(tmp_path / "x.png", Image.fromarray(a))
    out = preprocess([path, str(path), Image.fromarray(a), a], PRE)
    for i in range(1, 4):
        np.testing.assert_array_equal(out[i], out[0])
    np.testing.assert_array_equal(preprocess(path, PRE), out[:1])  # a single path is one image


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 4), np.uint8), 42])
def test_bad_inputs(bad):
    with pytest.raises(ImageError):
        preprocess([bad], PRE)


def test_list_images(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.tiff", "._a.jpg", "notes.txt", "d.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.tiff", "d.webp"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError, match=r"empty: no image files"):
        list_images(empty)
    with pytest.raises(ImageError, match="no such folder"):
        list_images(tmp_path / "missing")
