"""The resize-and-re-encode step: geometry, every odd input mode, broken files, and fidelity of the draft() path."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from alexrepro.data.imaging import (
    MAX_PIXELS,
    UnreadableImage,
    decode_rgb,
    decode_rgb_planes,
    pillow_build,
    resize_obvious_way,
    resize_square_jpeg,
)

SIZE = 32


def _textured(width, height, seed=0):
    """Smooth gradients, an edge and noise: enough structure that resampling errors would show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    r = 255 * xx / max(width - 1, 1)
    g = 255 * yy / max(height - 1, 1)
    b = np.where(xx + yy > (width + height) / 2, 200.0, 40.0)
    pixels = np.stack([r, g, b], axis=2) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _encode(image, fmt="JPEG", **kwargs):
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _check_output(data, size=SIZE):
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    assert image.mode == "RGB"
    assert image.size == (size, size)
    return np.asarray(image)


@pytest.mark.parametrize("width,height", [(60, 45), (45, 60), (20, 12), (1200, 900), (33, 32)])
def test_output_is_square_rgb_jpeg_for_any_geometry(width, height):
    _check_output(resize_square_jpeg(_encode(_textured(width, height), quality=90), SIZE, 90))


def test_huge_image_is_scaled_down():
    data = _encode(_textured(2000, 1500), quality=85)
    _check_output(resize_square_jpeg(data, 256, 90), 256)


def _png_rgba():
    image = _textured(48, 40).convert("RGBA")
    alpha = np.full((40, 48), 255, np.uint8)
    alpha[:, :24] = 0  # left half fully transparent
    image.putalpha(Image.fromarray(alpha))
    return _encode(image, "PNG")


def _png_palette_transparent():
    image = _textured(48, 40).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encode(image, "PNG", transparency=0)


def _png_16bit():
    ramp = (np.arange(48 * 40, dtype=np.uint32).reshape(40, 48) * 34).astype(np.uint16)
    return _encode(Image.fromarray(ramp), "PNG")


ODD_FILES = {
    "cmyk jpeg": lambda: _encode(_textured(48, 40).convert("CMYK"), quality=90),
    "grayscale jpeg": lambda: _encode(_textured(48, 40).convert("L"), quality=90),
    "palette png": lambda: _encode(_textured(48, 40).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
    "palette png with transparency": _png_palette_transparent,
    "rgba png": _png_rgba,
    "la png": lambda: _encode(_textured(48, 40).convert("LA"), "PNG"),
    "16-bit grayscale png": _png_16bit,
    "1-bit png": lambda: _encode(_textured(48, 40).convert("1"), "PNG"),
    "gif": lambda: _encode(_textured(48, 40).convert("P"), "GIF"),
    "bmp": lambda: _encode(_textured(48, 40), "BMP"),
}


@pytest.mark.parametrize("kind", sorted(ODD_FILES))
def test_odd_modes_become_rgb(kind):
    data = ODD_FILES[kind]()
    _check_output(resize_square_jpeg(data, SIZE, 90))
    assert decode_rgb(data).shape[2] == 3


def test_png_named_jpeg_is_decoded_by_content(tmp_path):
    path = tmp_path / "n02105855_2933.JPEG"  # REFERENCE.md §5: a PNG saved as .JPEG in the train set
    path.write_bytes(_encode(_textured(50, 40), "PNG"))
    _check_output(resize_square_jpeg(path.read_bytes(), SIZE, 90))


def test_cmyk_colours_survive():
    red = Image.new("RGB", (40, 40), (220, 30, 30))
    out = decode_rgb(resize_square_jpeg(_encode(red.convert("CMYK"), quality=95), SIZE, 95))
    assert np.abs(out.reshape(-1, 3).mean(0) - [220, 30, 30]).max() < 12


def test_transparent_pixels_become_white():
    out = decode_rgb(resize_square_jpeg(_png_rgba(), 40, 95))
    assert out[:, :10].mean() > 245  # the transparent left half (after the centre crop: its first columns)


def test_16bit_is_rescaled_not_clipped():
    levels = np.array([[0, 257 * 64, 257 * 128, 65535]], np.uint16).repeat(4, 0)
    data = _encode(Image.fromarray(levels), "PNG")
    rgb = decode_rgb(data)
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 64, 128, 255])
    assert (rgb[..., 0] == rgb[..., 2]).all()


def _truncated():
    data = _encode(_textured(200, 150), quality=90)
    return data[: len(data) // 2]


def _bomb():
    """A valid 1×1 PNG whose header claims more pixels than MAX_PIXELS (CRC fixed so only the size is wrong)."""
    data = bytearray(_encode(Image.new("RGB", (1, 1)), "PNG"))
    side = int(MAX_PIXELS**0.5) + 10
    ihdr = bytes(data[12:16]) + struct.pack(">II", side, side) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


BROKEN = {
    "empty": lambda: b"",
    "garbage": lambda: bytes(range(256)) * 8,
    "text": lambda: b"<html>404 not found</html>",
    "truncated jpeg": _truncated,
    "jpeg header only": lambda: _encode(_textured(64, 48), quality=90)[:300],
    "decompression bomb": _bomb,
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_files_raise_unreadable_with_a_reason(kind):
    with pytest.raises(UnreadableImage) as info:
        resize_square_jpeg(BROKEN[kind](), SIZE, 90)
    assert info.value.reason and "\n" not in info.value.reason
    with pytest.raises(UnreadableImage):
        decode_rgb(BROKEN[kind]())


def test_bomb_reason_says_bomb():
    with pytest.raises(UnreadableImage, match="bomb"):
        resize_square_jpeg(_bomb(), SIZE, 90)


def test_truncated_files_are_never_padded():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("width,height", [(1600, 1200), (500, 375), (300, 700)])
def test_draft_path_stays_close_to_a_full_decode_reference(width, height):
    """draft() + bilinear vs full decode + LANCZOS + crop: the same picture up to small resampling differences."""
    data = _encode(_textured(width, height, seed=1), quality=95)
    fast = decode_rgb(resize_square_jpeg(data, 256, 95)).astype(np.float64)
    reference = decode_rgb(resize_obvious_way(data, 256, 95)).astype(np.float64)
    assert np.abs(fast - reference).mean() < 4.0
    assert np.abs(fast.mean((0, 1)) - reference.mean((0, 1))).max() < 1.0  # no colour or brightness shift


def test_decode_rgb_returns_hwc_uint8():
    array = decode_rgb(_encode(_textured(40, 30), quality=90))
    assert array.shape == (30, 40, 3) and array.dtype == np.uint8


def test_pillow_build_names_the_build():
    build = pillow_build()
    assert build.startswith(("Pillow ", "Pillow-SIMD "))
    assert ("post" in build) == build.startswith("Pillow-SIMD")


@pytest.mark.peers
def test_bench_prepare_reports_steady_state_and_whole_run_figures():
    from alexrepro.bench.data import bench_prepare

    report = bench_prepare(images=4, workers=2, size=32, rounds=1)
    names = [row["name"] for row in report.rows]
    assert "prepare, 2 workers, steady state" in names
    assert {"prepare, 1 worker, whole run of 4", "prepare, 1 worker, whole run of 8"} <= set(names)
    assert "prepare (1 worker) / plain decode, per core, steady state" in report.ratios
    assert all(value > 0 for name, value in report.ratios.items() if name.startswith("whole run"))
    assert not any("{" in note for note in report.notes), report.notes  # every note's figures filled in
    # each installed peer writer fed by a process pool, timed beside prepare in the same run
    from alexrepro.bench.peers import WRITERS, installed

    for peer in WRITERS:
        rows = {f"{peer.name}, 1 worker, steady state", f"{peer.name}, 2 workers, whole run of 8"}
        assert (rows <= set(names)) == installed(peer), peer.name
        assert (f"whole run of 4: prepare / {peer.name}, 2 workers (wall clock)" in report.ratios) == installed(peer)
        per_cpu = f"whole run of 4: prepare / {peer.name}, 1 worker, per CPU-second"
        assert report.ratios.get(per_cpu, 1) > 0 and (per_cpu in report.ratios) == installed(peer)


def _cut_with_eoi(data):
    return data[: len(data) // 2] + b"\xff\xd9"


def _taller_header(data, extra_rows=64):
    sof = data.find(b"\xff\xc0")
    height = struct.unpack(">H", data[sof + 5 : sof + 7])[0]
    return data[: sof + 5] + struct.pack(">H", height + extra_rows) + data[sof + 7 :]


@pytest.mark.parametrize("damage", [_cut_with_eoi, _taller_header])
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("size", [SIZE, 256])  # a draft()-scaled decode and a full-size one
def test_jpeg_that_ends_early_is_rejected_not_grey(damage, mode, size):
    """libjpeg only warns ("premature end of data segment") and fills the rest with grey; Pillow drops the warning."""
    data = damage(_encode(_textured(300, 200).convert(mode), quality=90))
    with pytest.raises(UnreadableImage, match="premature end"):
        resize_square_jpeg(data, size, 90)
    with pytest.raises(UnreadableImage, match="premature end"):
        decode_rgb(data)


@pytest.mark.parametrize("colour", [(128, 128, 128), (127, 127, 127)])
def test_whole_jpeg_ending_in_flat_grey_is_kept(colour):
    """The second look at a suspect file must not reject a whole image whose last pixel is the fill grey."""
    image = _textured(120, 90)
    image.paste(colour, (60, 45, 120, 90))
    data = _encode(image, quality=95)
    _check_output(resize_square_jpeg(data, SIZE, 90))
    assert tuple(decode_rgb(data)[-1, -1]) == colour
    planes = decode_rgb_planes(memoryview(data))  # as stats passes it: a view into the shard, not bytes
    assert tuple(int(plane[-1, -1]) for plane in planes) == colour


def test_a_slice_of_a_shard_gets_the_same_second_look():
    """stats decodes memoryview slices of a shard read whole; the check for early ends must work on them too."""
    image = _textured(120, 90)
    image.paste((128, 128, 128), (60, 45, 120, 90))
    whole = _encode(image, quality=95)
    shard = memoryview(b"header" + whole + _cut_with_eoi(_encode(_textured(300, 200), quality=90)))
    red, green, blue = decode_rgb_planes(shard[6 : 6 + len(whole)])
    assert (red[-1, -1], green[-1, -1], blue[-1, -1]) == (128, 128, 128)
    with pytest.raises(UnreadableImage, match="premature end"):
        decode_rgb_planes(shard[6 + len(whole) :])
