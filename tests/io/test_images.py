"""Reading specimen photos in the formats collections use, and naming outputs after them."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from sam2pal.errors import ImageReadError, InputError
from sam2pal.io import images
from sam2pal.io.images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    ImageAccessError,
    image_stem,
    list_images,
    read_image,
    read_image_size,
    unique_stems,
)

# EXIF orientation value -> the Pillow transpose that displays the photo upright
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def rgb_pattern(height=24, width=40, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def upright(array: np.ndarray, orientation: int) -> np.ndarray:
    """Reference: what a viewer shows for raw pixels with this EXIF orientation."""
    return np.asarray(Image.fromarray(array).transpose(EXIF_TRANSPOSE[orientation]))


def to8(values) -> np.ndarray:
    return np.rint(np.asarray(values, dtype=np.float64) / 257.0).astype(np.uint8)


def assert_shape_agrees(path, array):
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    assert array.flags.writeable and array.flags.c_contiguous
    assert read_image_size(path) == (array.shape[1], array.shape[0])


# -- orientation ----------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [6, 8])
def test_jpeg_exif_orientation_is_applied(tmp_path, orientation):
    raw = np.zeros((24, 40, 3), np.uint8)
    raw[:, :] = (0, 0, 255)
    raw[:8, :8] = (255, 0, 0)  # red block at the raw top-left corner
    path = tmp_path / f"specimen_o{orientation}.jpg"
    exif = Image.Exif()
    exif[274] = orientation
    Image.fromarray(raw).save(path, exif=exif, quality=95)

    got = read_image(path)
    assert got.shape == (40, 24, 3)
    assert_shape_agrees(path, got)
    # 6: rotated clockwise for display, so the raw top-left lands top-right; 8: bottom-left
    corner = got[2, -3] if orientation == 6 else got[-3, 2]
    assert corner[0] > 200 and corner[2] < 60
    expected = upright(raw, orientation).astype(int)
    assert np.abs(got.astype(int) - expected).mean() < 4


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_png_exif_orientation_matches_viewer(tmp_path, orientation):
    raw = rgb_pattern(5, 7)
    path = tmp_path / "o.png"
    exif = Image.Exif()
    exif[274] = orientation
    Image.fromarray(raw).save(path, exif=exif)
    got = read_image(path)
    assert np.array_equal(got, upright(raw, orientation))
    assert_shape_agrees(path, got)


def test_result_is_writable(tmp_path):
    path = tmp_path / "plain.png"
    Image.fromarray(rgb_pattern()).save(path)
    got = read_image(path)
    got[0, 0] = (1, 2, 3)  # overlays draw on the array
    assert got[0, 0].tolist() == [1, 2, 3]


# -- PNG ------------------------------------------------------------------------------


def test_png_gray_8bit_replicated(tmp_path):
    gray = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
    path = tmp_path / "gray8.png"
    Image.fromarray(gray).save(path)
    got = read_image(path)
    assert got.shape == (12, 20, 3)
    for channel in range(3):
        assert np.array_equal(got[..., channel], gray)


def test_png_gray_16bit_scaled_by_full_range(tmp_path):
    values = np.array([[0, 128, 129, 257, 385, 386, 32896, 51500, 65278, 65535]], np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    got = read_image(path)
    assert np.array_equal(got[..., 0], to8(values))
    assert got[0, 0, 0] == 0 and got[0, -1, 0] == 255


def test_png_rgb_16bit_full_precision(tmp_path):
    rgb = np.array(
        [[[0, 65535, 32896], [51500, 385, 386]], [[1000, 20000, 65000], [257, 514, 60000]]],
        np.uint16,
    )
    path = tmp_path / "rgb16.png"
    assert cv2.imwrite(str(path), rgb[..., ::-1])  # OpenCV writes BGR
    got = read_image(path)
    assert np.array_equal(got, to8(rgb))
    # 51500 / 257 rounds to 200, where keeping the high byte would give 201
    assert got[0, 1, 0] == 200


def test_png_rgba_flattened_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # transparent -> white
    rgba[0, 1] = (10, 20, 30, 255)  # opaque -> unchanged
    rgba[0, 2] = (0, 0, 0, 128)  # half transparent black -> mid gray
    rgba[1, :] = (200, 100, 50, 64)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    got = read_image(path).astype(int)
    assert got[0, 0].tolist() == [255, 255, 255]
    assert got[0, 1].tolist() == [10, 20, 30]
    expected = (rgba[..., :3].astype(float) * rgba[..., 3:] + 255.0 * (255 - rgba[..., 3:])) / 255
    assert np.abs(got - expected).max() <= 1
    assert 126 <= got[0, 2, 0] <= 128


def test_png_gray_alpha_flattened_on_white(tmp_path):
    la = Image.new("LA", (3, 2), (40, 0))
    la.putpixel((1, 0), (40, 255))
    path = tmp_path / "la.png"
    la.save(path)
    got = read_image(path)
    assert got[0, 0].tolist() == [255, 255, 255]
    assert got[0, 1].tolist() == [40, 40, 40]


def test_palette_png_with_and_without_transparency(tmp_path):
    palette = [0, 0, 0, 255, 0, 0, 0, 128, 255] + [0] * (256 * 3 - 9)
    indices = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    plain = Image.fromarray(indices, "P")
    plain.putpalette(palette)
    path = tmp_path / "palette.png"
    plain.save(path)
    got = read_image(path)
    assert got[0].tolist() == [[0, 0, 0], [255, 0, 0], [0, 128, 255]]

    transparent = tmp_path / "palette_trns.png"
    plain.save(transparent, transparency=0)
    assert Image.open(transparent).mode == "P"
    got = read_image(transparent)
    assert got[0].tolist() == [[255, 255, 255], [255, 0, 0], [0, 128, 255]]


def test_bilevel_png(tmp_path):
    bits = np.zeros((4, 6), bool)
    bits[1:3, 2:5] = True
    path = tmp_path / "bits.png"
    Image.fromarray(bits).save(path)
    assert Image.open(path).mode == "1"
    got = read_image(path)
    assert np.array_equal(got[..., 1], np.where(bits, 255, 0))


# -- TIFF -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, channels", [(np.uint8, 1), (np.uint16, 1), (np.uint8, 3), (np.uint16, 3)]
)
def test_tiff_gray_and_rgb_8_and_16_bit(tmp_path, dtype, channels):
    rng = np.random.default_rng(3)
    top = np.iinfo(dtype).max
    shape = (9, 13) if channels == 1 else (9, 13, 3)
    data = rng.integers(0, top, shape, endpoint=True).astype(dtype)
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, data, photometric="minisblack" if channels == 1 else "rgb")
    got = read_image(path)
    expected = data if dtype == np.uint8 else to8(data)
    if channels == 1:
        expected = np.repeat(expected[..., None], 3, axis=2)
    assert np.array_equal(got, expected)
    assert_shape_agrees(path, got)


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("channels", [1, 3])
def test_tiff_orientation_tag(tmp_path, orientation, channels):
    gray = np.arange(8 * 12, dtype=np.uint8).reshape(8, 12)
    data = gray if channels == 1 else np.stack([gray, 255 - gray, gray // 2], axis=2)
    path = tmp_path / "rotated.tif"
    tifffile.imwrite(
        path,
        data,
        photometric="minisblack" if channels == 1 else "rgb",
        extratags=[(274, "H", 1, orientation, True)],
    )
    got = read_image(path)
    raw_rgb = np.repeat(gray[..., None], 3, axis=2) if channels == 1 else data
    assert np.array_equal(got, upright(raw_rgb, orientation))
    assert_shape_agrees(path, got)


def test_compressed_tiff_orientation_tag(tmp_path):
    raw = rgb_pattern(6, 10, seed=4)
    path = tmp_path / "lzw.tif"
    Image.fromarray(raw).save(path, compression="tiff_lzw", tiffinfo={274: 6})
    got = read_image(path)
    assert np.array_equal(got, upright(raw, 6))
    assert_shape_agrees(path, got)


def test_float_tiff_scaling(tmp_path):
    unit = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    path = tmp_path / "unit.tif"
    tifffile.imwrite(path, unit)
    assert read_image(path)[0, :, 0].tolist() == [0, 64, 128, 255]

    wide = np.array([[0.0, 1.0, 2.0, 4.0]], np.float32)
    path = tmp_path / "wide.tif"
    tifffile.imwrite(path, wide)
    assert read_image(path)[0, :, 0].tolist() == [0, 64, 128, 255]

    rgb = np.zeros((2, 2, 3), np.float32)
    rgb[0, 0] = (1.0, 0.5, 0.0)
    path = tmp_path / "rgbf.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")  # a TIFF that Pillow cannot open
    got = read_image(path)
    assert got[0, 0].tolist() == [255, 128, 0]
    assert_shape_agrees(path, got)


# -- other formats --------------------------------------------------------------------


def test_grayscale_jpeg(tmp_path):
    gray = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (16, 1))
    path = tmp_path / "gray.jpg"
    Image.fromarray(gray).save(path, quality=95)
    assert Image.open(path).mode == "L"
    got = read_image(path)
    assert got.shape == (16, 32, 3)
    assert np.array_equal(got[..., 0], got[..., 2])
    assert np.abs(got[..., 0].astype(int) - gray).max() < 10


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(path)  # magenta ink only
    got = read_image(path)
    assert got.shape == (8, 8, 3)
    red, green, blue = got[4, 4].astype(int)
    assert red > 200 and green < 50 and blue > 200


@pytest.mark.parametrize("suffix, options", [(".bmp", {}), (".webp", {"lossless": True})])
def test_bmp_and_webp(tmp_path, suffix, options):
    raw = rgb_pattern(7, 9, seed=2)
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(raw).save(path, **options)
    assert np.array_equal(read_image(path), raw)


# -- failures -------------------------------------------------------------------------


def assert_read_error(path, fragment=""):
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot read image (")
    assert "\n" not in message
    assert fragment in message
    return message


def test_truncated_jpeg(tmp_path):
    whole = tmp_path / "whole.jpg"
    Image.fromarray(rgb_pattern(64, 64)).save(whole, quality=90)
    data = whole.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    assert_read_error(cut)
    assert read_image_size(cut) == (64, 64)  # the header alone is intact


def test_truncated_png(tmp_path):
    whole = tmp_path / "whole.png"
    Image.fromarray(rgb_pattern(64, 64)).save(whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) - 100])
    assert_read_error(cut, "truncated")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("specimen 12, drawer 4\n")
    assert_read_error(path, "not an image")
    with pytest.raises(ImageReadError, match="cannot read image"):
        read_image_size(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert_read_error(path, "empty file")
    with pytest.raises(ImageReadError, match="empty file"):
        read_image_size(path)


def retype_tiff_tag(data: bytes, tag: int, new_type: int) -> bytes:
    """A little-endian TIFF with the field type of `tag` in its first IFD changed."""
    out = bytearray(data)
    ifd = struct.unpack_from("<I", out, 4)[0]
    for k in range(struct.unpack_from("<H", out, ifd)[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack_from("<H", out, entry)[0] == tag:
            struct.pack_into("<H", out, entry + 2, new_type)
            return bytes(out)
    raise KeyError(tag)


@pytest.mark.parametrize(
    "tag, new_type", [(256, 2), (273, 12)]
)  # width as text, strip offsets as double
def test_corrupt_tiff_fields_are_bad_images(tmp_path, tag, new_type):
    """Decoders raise other exceptions than OSError on corrupt files (here Pillow's
    ValueError and TypeError): those are bad image files too."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgb_pattern(32, 40))
    path = tmp_path / "corrupt.tif"
    path.write_bytes(retype_tiff_tag(buffer.getvalue(), tag, new_type))
    message = assert_read_error(path)
    assert "\n" not in message


def assert_access_error(path, fragment):
    """A file that cannot be read at all is not a bad image: another error, one line."""
    for reader in (read_image, read_image_size):
        with pytest.raises(ImageAccessError) as info:
            reader(path)
        assert not isinstance(info.value, ImageReadError)
        message = str(info.value)
        assert message.startswith(f"{path}: cannot read the file (") and fragment in message
        assert "\n" not in message


def test_missing_file_folder_and_broken_link_are_not_bad_images(tmp_path):
    assert_access_error(tmp_path / "absent.jpg", "file not found")
    folder = tmp_path / "x.jpg"
    folder.mkdir()
    assert_access_error(folder, "is a folder")
    link = tmp_path / "link.jpg"
    link.symlink_to(tmp_path / "moved_away.jpg")
    assert_access_error(link, "broken link")
    assert "moved_away.jpg" in str(pytest.raises(ImageAccessError, read_image, link).value)


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux /proc")
def test_input_output_error_is_not_a_bad_image(tmp_path):
    # reading /proc/self/mem at offset 0 fails with EIO, as a failing disk or a
    # disconnected network drive does
    link = tmp_path / "scan.tif"
    link.symlink_to("/proc/self/mem")
    assert_access_error(link, "Input/output error")


def read_as_unprivileged_user(path) -> str:
    """The error `read_image(path)` gives in a child process switched to user nobody
    (root reads every file, whatever its permissions)."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exec, so it needs no access to the interpreter's files
        status = 1
        try:
            os.close(reader)
            os.setgid(65534)
            os.setuid(65534)
            try:
                read_image(path)
                message = "read"
            except ImageAccessError as exc:
                message = f"{type(exc).__name__} {exc}"
            os.write(writer, message.encode())
            status = 0
        finally:
            os._exit(status)
    os.close(writer)
    with os.fdopen(reader, "rb") as handle:
        message = handle.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, message
    return message


def test_permission_denied_is_not_a_bad_image():
    folder = Path(tempfile.mkdtemp())  # outside pytest's private temporary folder
    path = folder / "locked.jpg"
    try:
        Image.fromarray(rgb_pattern()).save(path)
        read_image(path)
        path.chmod(0)
        if os.geteuid() != 0:
            assert_access_error(path, "permission denied")
        else:
            folder.chmod(0o755)
            message = read_as_unprivileged_user(path)
            assert message == f"ImageAccessError {path}: cannot read the file (permission denied)"
    finally:
        path.unlink(missing_ok=True)
        folder.rmdir()


def big_png(path, width: int, height: int) -> None:
    """An RGB PNG of zeros: a small file that decodes to width x height x 3 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


MEMORY_CHECK = """
import resource, sys
from sam2pal.io.images import ImageAccessError, read_image
with open("/proc/self/statm") as handle:
    in_use = int(handle.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (in_use + 48 * 2**20, resource.RLIM_INFINITY))
try:
    read_image(sys.argv[1])
except ImageAccessError as exc:
    print(type(exc).__name__, exc)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_out_of_memory_is_not_a_bad_image(tmp_path):
    """A photo too large for the memory left stops the run: it is not a bad file."""
    path = tmp_path / "large_scan.png"
    big_png(path, 6000, 6000)  # 108 MB of pixels, in a 0.1 MB file
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_CHECK, str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        result.stdout.strip()
        == f"ImageAccessError {path}: cannot read the file (not enough memory to decode it)"
    )


def test_a_fault_in_the_reader_is_not_a_bad_image(tmp_path, monkeypatch):
    """An error raised by this program's own code (here a stand-in for a bug in the
    pixel conversion) propagates as it is, with a note naming the file."""
    path = tmp_path / "photo.png"
    Image.fromarray(rgb_pattern()).save(path)

    def faulty(img):
        raise KeyError("mode")

    monkeypatch.setattr(images, "_pil_to_rgb", faulty)
    with pytest.raises(KeyError) as info:
        read_image(path)
    assert not isinstance(info.value, InputError)
    assert any(str(path) in note for note in info.value.__notes__)


def png_header_only(width, height) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", 0)
        + b"IEND"
        + struct.pack(">I", zlib.crc32(b"IEND"))
    )


def test_large_scans_allowed_but_bombs_refused(tmp_path):
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= MAX_IMAGE_PIXELS
    assert MAX_IMAGE_PIXELS >= 1_000_000_000
    # a 300-megapixel scan is accepted by the size check (read_image_size opens it)
    big = tmp_path / "big.png"
    big.write_bytes(png_header_only(20000, 15000))
    assert read_image_size(big) == (20000, 15000)
    # a header claiming 50000 x 50000 pixels is refused with a clear message
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(50000, 50000))
    assert_read_error(bomb, "pixel limit")


# -- folders and names ----------------------------------------------------------------


def test_image_extensions_are_lower_case():
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}


def test_list_images(tmp_path):
    for name in ["b.JPG", "a.png", "c.tif", "notes.txt", ".hidden.jpg", "Z.TIFF", "x.webp"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "d.jpeg").write_bytes(b"")
    (tmp_path / "sub" / ".e.png").write_bytes(b"")
    (tmp_path / "sub" / "deeper" / "f.bmp").write_bytes(b"")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "g.jpg").write_bytes(b"")

    assert list_images(tmp_path) == ["Z.TIFF", "a.png", "b.JPG", "c.tif", "x.webp"]
    assert list_images(tmp_path, recursive=True) == [
        "Z.TIFF",
        "a.png",
        "b.JPG",
        "c.tif",
        "sub/d.jpeg",
        "sub/deeper/f.bmp",
        "x.webp",
    ]
    assert list_images(str(tmp_path / "sub")) == ["d.jpeg"]


def test_list_images_bad_folder(tmp_path):
    with pytest.raises(InputError, match="image folder not found") as info:
        list_images(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)
    afile = tmp_path / "a.jpg"
    afile.write_bytes(b"")
    with pytest.raises(InputError, match="not a folder"):
        list_images(afile)


def test_image_stem():
    assert image_stem("img_001.jpg") == "img_001"
    assert image_stem("drawer1/img_001.JPG") == "drawer1__img_001"
    assert image_stem("a/b/c.d.tif") == "a__b__c.d"


def test_unique_stems_resolves_collisions():
    names = ["a.jpg", "a.png", "b.jpg", "sub/a.jpg", "B.tif", "x/y.jpg", "x__y.jpg", "c.jpg"]
    stems = unique_stems(names)
    assert stems["a.jpg"] == "a.jpg"
    assert stems["a.png"] == "a.png"
    assert stems["sub/a.jpg"] == "sub__a"
    assert stems["c.jpg"] == "c"
    # 'b' and 'B' are the same file name on macOS and Windows disks
    assert {stems["b.jpg"], stems["B.tif"]} == {"b.jpg", "B.tif"}
    # both give 'x__y.jpg' even with their extension: the later one is numbered
    assert stems["x/y.jpg"] == "x__y.jpg"
    assert stems["x__y.jpg"] == "x__y.jpg__2"
    folded = [s.casefold() for s in stems.values()]
    assert len(folded) == len(set(folded)) == len(names)
    assert unique_stems(list(reversed(names))) == stems
    assert unique_stems(["only.jpg"]) == {"only.jpg": "only"}
