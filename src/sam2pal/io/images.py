"""Reading specimen photos, listing image folders and naming outputs after images.

`read_image` gives every photo as an RGB uint8 array of shape (height, width, 3), upright:

- EXIF orientation is applied (the array is what an image viewer shows), for JPEG, PNG,
  WebP and TIFF (TIFF Orientation tag 274).
- Grayscale ('1', 'L', 16-bit) is replicated to the three channels; palette images are
  expanded to their colours.
- Transparency (RGBA, gray + alpha, palette or colour-key transparency) is flattened onto
  a white background: a transparent pixel becomes white, a half-transparent one is
  blended with white.
- 16-bit data (PNG, TIFF) is scaled to 8 bits over the full 16-bit range: value / 257,
  rounded, so 0 -> 0 and 65535 -> 255. Data that uses only part of the range (12-bit
  camera data stored in 16 bits, for instance) therefore comes out darker; it is not
  stretched.
- Floating-point TIFF: data within 0..1 is scaled by 255; other data is divided by its
  maximum first (negative values and NaN become 0). 32-bit integer data beyond the
  16-bit range is handled the same way.
- CMYK is converted to RGB.

The whole file is decoded, so a truncated or corrupt photo fails here rather than
later. Failures are of two kinds, because a run skips the first and stops on the second:

- A bad image file: empty, truncated, corrupt, not an image, a format or pixel type
  that cannot be read, or larger than the pixel limit below. Raises `ImageReadError`,
  ``<path>: cannot read image (<reason>)``. These are what the image decoders (Pillow,
  tifffile, OpenCV) report about a file's content.
- A file that cannot be read at all, whatever it holds: missing (a broken link, a file
  that vanished, a disconnected drive), no permission, a folder, an input/output error,
  or not enough memory to decode it. Raises `ImageAccessError`,
  ``<path>: cannot read the file (<reason>)``.

Any other exception is a fault in this program, not in the file: it is raised as it is,
with a note naming the file.

Pillow refuses images above `PIL.Image.MAX_IMAGE_PIXELS` pixels as possible
"decompression bombs" (it warns above that number and refuses above twice it). Museum
scans can be very large, so importing this module raises that bound to
`MAX_IMAGE_PIXELS` (one billion pixels: Pillow warns above 1e9 and refuses above 2e9);
a higher bound set elsewhere, or none, is left as it is.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sam2pal.errors import ImageReadError, InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")

MAX_IMAGE_PIXELS = 1_000_000_000

if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

_ORIENTATION_TAG = 274
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageAccessError(InputError):
    """An image file that cannot be read for a reason other than its content (missing,
    no permission, a folder, an input/output error, not enough memory): never skipped."""


class _Unsupported(Exception):
    """A decodable file whose content this module does not handle (the reason)."""


# Packages whose exceptions are about the file being decoded (see `_is_bad_file`).
_DECODER_PACKAGES = ("PIL", "tifffile", "imagecodecs", "cv2")


def _one_line(reason) -> str:
    reason = " ".join(str(reason).split()) or "unknown error"
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _raised_in_decoder(exc: BaseException) -> bool:
    """True when the innermost frame of `exc` is in an image decoder package."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return module.split(".")[0] in _DECODER_PACKAGES


def _is_bad_file(exc: BaseException) -> bool:
    """True when `exc` says the file's content is not a readable image.

    Operating-system errors carry an errno (no such file, permission denied, I/O
    error...); Pillow's decoder errors ("image file is truncated", "broken data
    stream", "decoder error") are OSErrors without one. Other exceptions count when a
    decoder raised them on the file's bytes (Pillow's own fuzzing sees SyntaxError,
    ValueError, EOFError, struct.error and more from corrupt files; tifffile raises
    TiffFileError, a ValueError); raised in this module they are a fault here.
    """
    import zlib

    if isinstance(exc, (_Unsupported, UnidentifiedImageError, Image.DecompressionBombError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno is None
    if isinstance(exc, MemoryError):
        return False
    if isinstance(exc, (zlib.error, struct.error)) or type(exc).__module__.split(".")[0] == "cv2":
        return True
    return _raised_in_decoder(exc)


def _fail(path, reason: str) -> ImageReadError:
    return ImageReadError(f"{path}: cannot read image ({_one_line(reason)})")


def _access_reason(exc: BaseException, path) -> str:
    if isinstance(exc, MemoryError):
        return "not enough memory to decode it"
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(path):
            return f"file not found: a broken link to {os.readlink(path)}"
        return "file not found: it was moved or deleted, or its drive is not connected"
    if isinstance(exc, IsADirectoryError):
        return "is a folder"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or str(exc) or type(exc).__name__


def _raise_for(exc: Exception, path):
    """Raise the error `read_image` and `read_image_size` give for `exc` (module docstring)."""
    if _is_bad_file(exc):
        raise _fail(path, _reason(exc)) from exc
    if isinstance(exc, (OSError, MemoryError)):
        raise ImageAccessError(
            f"{path}: cannot read the file ({_one_line(_access_reason(exc, path))})"
        ) from exc
    exc.add_note(f"(while reading the image {path})")
    raise exc


def _reason(exc: BaseException) -> str:
    """Why a bad image file cannot be read, in words."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file, or a format that cannot be read"
    if isinstance(exc, Image.DecompressionBombError):
        return f"larger than the {2 * (Image.MAX_IMAGE_PIXELS or 0):,}-pixel limit"
    return str(exc) or type(exc).__name__


# -- pixel conversions ----------------------------------------------------------------


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale any numeric array to uint8 (rules in the module docstring)."""
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    if values.dtype.kind == "f":
        data = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        data = np.clip(data, 0.0, None)
        top = float(data.max()) if data.size else 0.0
        if top > 1.0:
            data = data / top
        return np.round(data * 255.0).astype(np.uint8)
    if values.dtype.kind in "ui":
        if values.dtype.itemsize <= 2 and values.dtype.kind == "u":
            return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
        low = int(values.min()) if values.size else 0
        high = int(values.max()) if values.size else 0
        if values.dtype.itemsize == 1:  # int8
            return np.clip(values, 0, None).astype(np.uint8)
        if low >= 0 and high <= 65535:
            return ((values.astype(np.int64) + 128) // 257).astype(np.uint8)
        data = np.clip(values.astype(np.float64), 0.0, None)
        return np.round(data / max(high, 1) * 255.0).astype(np.uint8)
    raise _Unsupported(f"unsupported pixel type {values.dtype}")


def _flatten_on_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend uint8 colour (H, W, 3) over white with uint8 alpha (H, W)."""
    a = alpha.astype(np.uint32)[..., None]
    out = (color.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _channels_to_rgb(data: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1..4) numeric array -> RGB uint8; 2 and 4 channels carry alpha."""
    if data.ndim == 2:
        gray = _to_uint8(data)
        return np.repeat(gray[..., None], 3, axis=2)
    if data.ndim != 3:
        raise _Unsupported(f"unsupported array shape {data.shape}")
    channels = data.shape[2]
    if channels == 1:
        return _channels_to_rgb(data[..., 0])
    if channels == 2:
        gray = _to_uint8(data[..., 0])
        return _flatten_on_white(np.repeat(gray[..., None], 3, axis=2), _to_uint8(data[..., 1]))
    if channels == 3:
        return _to_uint8(data)
    if channels == 4:
        return _flatten_on_white(_to_uint8(data[..., :3]), _to_uint8(data[..., 3]))
    raise _Unsupported(f"unsupported number of channels ({channels})")


def _orient(array: np.ndarray, orientation) -> np.ndarray:
    """Apply an EXIF/TIFF orientation value (1-8) to an (H, W, ...) array."""
    if orientation == 2:
        array = array[:, ::-1]
    elif orientation == 3:
        array = array[::-1, ::-1]
    elif orientation == 4:
        array = array[::-1]
    elif orientation == 5:
        array = array.swapaxes(0, 1)
    elif orientation == 6:
        array = np.rot90(array, -1)
    elif orientation == 7:
        array = array[::-1, ::-1].swapaxes(0, 1)
    elif orientation == 8:
        array = np.rot90(array, 1)
    return np.ascontiguousarray(array)


# -- decoders -------------------------------------------------------------------------


def _magic(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(26)


def _tag(value, what: str) -> int:
    """A TIFF header value as an int; a malformed one makes the file a bad image."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _Unsupported(f"invalid {what} in the TIFF header") from None


def _check_pixels(width: int, height: int) -> None:
    """Pillow's decompression-bomb limit, for the files tifffile decodes."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > 2 * limit:
        raise Image.DecompressionBombError(f"{width} x {height} pixels")


def _read_tifffile(path) -> np.ndarray:
    """First page of a TIFF with tifffile, orientation tag applied, as RGB uint8."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.pages:
            raise _Unsupported("TIFF file without pages")
        page = tif.pages[0]
        _check_pixels(_tag(page.imagewidth, "width"), _tag(page.imagelength, "height"))
        data = page.asarray()
        axes = page.axes
        tag = page.tags.get(_ORIENTATION_TAG)
        orientation = _tag(tag.value, "orientation") if tag is not None else 1
        photometric = _tag(page.photometric, "photometric interpretation")
    if "S" in axes and axes.index("S") != len(axes) - 1:
        data = np.moveaxis(data, axes.index("S"), -1)
    data = np.squeeze(data) if data.ndim > 3 else data
    if photometric == 0:  # MINISWHITE: 0 is white
        if data.dtype == np.bool_:
            data = ~data
        elif data.dtype.kind == "u":
            data = np.iinfo(data.dtype).max - data
        else:
            raise _Unsupported("inverted (min-is-white) non-integer TIFF")
    elif photometric not in (1, 2):  # only gray and RGB reach this reader
        raise _Unsupported(f"unsupported TIFF photometric interpretation {photometric}")
    return _orient(_channels_to_rgb(data), orientation)


def _read_png16_color(path, orientation) -> np.ndarray:
    """16-bit colour PNG at full precision (Pillow keeps only the high byte)."""
    import cv2

    data = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise _Unsupported("16-bit PNG that OpenCV cannot decode")
    if data.ndim == 3 and data.shape[2] == 3:
        data = data[..., ::-1]
    elif data.ndim == 3 and data.shape[2] == 4:
        data = data[..., [2, 1, 0, 3]]
    return _orient(_channels_to_rgb(data), orientation)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A loaded, upright Pillow image -> RGB uint8."""
    mode = img.mode
    if mode in ("P", "L", "RGB") and "transparency" in img.info or mode in ("PA", "La", "RGBa"):
        img, mode = img.convert("RGBA"), "RGBA"
    if mode == "RGB":
        return np.asarray(img)
    if mode in ("RGBA", "LA"):
        return _channels_to_rgb(np.asarray(img))
    if mode == "P":
        return np.asarray(img.convert("RGB"))
    if mode in ("1", "L"):
        return _channels_to_rgb(np.asarray(img.convert("L")))
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _channels_to_rgb(np.asarray(img))
    try:
        return np.asarray(img.convert("RGB"))
    except (ValueError, OSError) as exc:
        raise _Unsupported(f"unsupported image mode {mode}") from exc


def _bits_per_sample(img: Image.Image) -> int:
    tags = getattr(img, "tag_v2", None)
    if tags is None:
        return 8
    bits = tags.get(258, 8)
    if isinstance(bits, (tuple, list)):
        return max(_tag(b, "bits per sample") for b in bits) if bits else 8
    return _tag(bits, "bits per sample")


def _tiff_tags(img: Image.Image) -> tuple[int, int, int, bool]:
    """(raw width, raw height, orientation, colour with more than 8 bits) of a TIFF."""
    tags = img.tag_v2
    width, height = _tag(tags.get(256), "width"), _tag(tags.get(257), "height")
    orientation = _tag(tags.get(_ORIENTATION_TAG, 1) or 1, "orientation")
    high_bit_color = img.mode in ("RGB", "RGBA", "LA") and _bits_per_sample(img) > 8
    return width, height, orientation, high_bit_color


def _read_tiff(path) -> np.ndarray:
    """TIFF: Pillow where it is exact, tifffile for the rest.

    tifffile reads (and this module orients) TIFFs that carry an orientation other than 1
    (Pillow's own handling of that tag differs between versions and mis-decodes some
    uncompressed single-channel files) and colour TIFFs with more than 8 bits per
    sample (Pillow keeps only their high byte). When tifffile lacks the codec of such
    a file (LZW and JPEG compression need the optional imagecodecs package), Pillow
    reads it after all.
    """
    tried_tifffile = None
    try:
        with Image.open(path) as img:
            _, _, orientation, high_bit_color = _tiff_tags(img)
    except Exception as exc:  # noqa: BLE001 - a TIFF that Pillow cannot open
        if not _is_bad_file(exc):
            raise
        try:
            return _read_tifffile(path)
        except Exception as other:  # noqa: BLE001
            if not _is_bad_file(other):
                raise
            raise exc from None
    if orientation != 1 or high_bit_color:
        try:
            return _read_tifffile(path)
        except Exception as exc:  # noqa: BLE001
            if not _is_bad_file(exc):
                raise
            tried_tifffile = exc
    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_rgb(ImageOps.exif_transpose(img))
    except Exception as exc:  # noqa: BLE001
        if tried_tifffile is not None or not _is_bad_file(exc):
            raise
        try:  # float RGB, some sample formats
            return _read_tifffile(path)
        except Exception as other:  # noqa: BLE001
            if not _is_bad_file(other):
                raise
            raise exc from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a photo as an upright RGB uint8 array (H, W, 3); see the module docstring.

    Raises ImageReadError ("<path>: cannot read image (<reason>)") for a bad image
    file and ImageAccessError ("<path>: cannot read the file (<reason>)") for a file
    that cannot be read at all.
    """
    return _read(path, None)[0]


def read_image_reduced(
    path: str | os.PathLike, min_side: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """Read a photo for a model that sees it at `min_side` x `min_side` pixels: returns
    (rgb, (height, width)), where (height, width) is the photo's upright size, as
    `read_image` gives it, and rgb the upright photo, decoded at a reduced size where
    the format allows it cheaply (JPEG's DCT scaling by 1/2, 1/4 or 1/8, keeping at
    least `min_side` pixels on each side) and at full size otherwise. A 12-megapixel
    JPEG for a 1024-pixel model decodes at half size, four times fewer pixels.

    Raises as `read_image`.
    """
    return _read(path, int(min_side))


def _read(path, draft_side: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    size = None
    try:
        magic = _magic(path)
        if not magic:
            raise _Unsupported("empty file (0 bytes)")
        if magic[:4] in _TIFF_MAGIC:
            rgb = _read_tiff(path)
        else:
            with Image.open(path) as img:
                if draft_side and img.format == "JPEG":
                    full = img.size
                    img.draft(None, (draft_side, draft_side))
                    if img.size != full:
                        size = full  # (width, height) before the EXIF orientation
                img.load()
                if (
                    len(magic) >= 26
                    and magic.startswith(_PNG_MAGIC)
                    and magic[24] == 16
                    and magic[25] in (2, 4, 6)  # RGB, gray + alpha, RGBA
                ):
                    rgb = _read_png16_color(path, img.getexif().get(_ORIENTATION_TAG, 1))
                else:
                    stored = img.size
                    rgb = _pil_to_rgb(ImageOps.exif_transpose(img))
                    if size is not None and rgb.shape[:2] != (stored[1], stored[0]):
                        size = (size[1], size[0])  # turned by a quarter
    except Exception as exc:  # noqa: BLE001 - sorted by _raise_for (MemoryError included)
        _raise_for(exc, path)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise _fail(path, f"unexpected decoded shape {rgb.shape} {rgb.dtype}")
    # arrays viewing Pillow's buffer are read-only; callers may draw on the result
    if not (rgb.flags.writeable and rgb.flags.c_contiguous):
        rgb = np.array(rgb, order="C")
    return rgb, (rgb.shape[0], rgb.shape[1]) if size is None else (size[1], size[0])


def _png_exif_after_data(path) -> bool:
    """True when a PNG has its eXIf chunk after the image data (rare but allowed)."""
    with open(path, "rb") as handle:
        handle.seek(8)
        seen_data = False
        while True:
            head = handle.read(8)
            if len(head) < 8:
                return False
            length, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                return seen_data
            if kind == b"IEND":
                return False
            seen_data = seen_data or kind == b"IDAT"
            handle.seek(length + 4, os.SEEK_CUR)


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of a photo after EXIF orientation, from its header where possible.

    Agrees with the shape of `read_image` (width = shape[1], height = shape[0]).
    Raises ImageReadError or ImageAccessError as `read_image` does. A truncated file
    whose header is intact is not detected here (only `read_image` decodes the pixels).
    """
    try:
        magic = _magic(path)
        if not magic:
            raise _Unsupported("empty file (0 bytes)")
        if magic[:4] in _TIFF_MAGIC:
            try:
                with Image.open(path) as img:
                    width, height, orientation, _ = _tiff_tags(img)
            except Exception as exc:  # noqa: BLE001
                if not _is_bad_file(exc):
                    raise
                import tifffile

                try:
                    with tifffile.TiffFile(path) as tif:
                        page = tif.pages[0]
                        height, width = (
                            _tag(page.imagelength, "height"),
                            _tag(page.imagewidth, "width"),
                        )
                        tag = page.tags.get(_ORIENTATION_TAG)
                        orientation = _tag(tag.value, "orientation") if tag is not None else 1
                except Exception as other:  # noqa: BLE001
                    if not _is_bad_file(other):
                        raise
                    raise exc from None
        else:
            with Image.open(path) as img:
                width, height = img.size
                if (
                    img.format == "PNG"
                    and "exif" not in img.info
                    and not _png_exif_after_data(path)
                ):
                    # Pillow's PNG getexif() decodes the whole image to look for a late
                    # eXIf chunk; there is none, so read the orientation from what the
                    # header gave (XMP) without decoding.
                    exif = Image.Image.getexif(img)
                else:
                    exif = img.getexif()
                orientation = exif.get(_ORIENTATION_TAG, 1)
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        return int(width), int(height)
    except Exception as exc:  # noqa: BLE001 - sorted by _raise_for (MemoryError included)
        _raise_for(exc, path)


# -- folders and output names ---------------------------------------------------------


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[str]:
    """Image files in `folder`, as sorted relative POSIX paths ('drawer1/img_001.jpg').

    A file is an image when its extension is in IMAGE_EXTENSIONS, in any letter case.
    Hidden files and folders (name starting with '.') are skipped. With recursive=True
    subfolders are searched too (symbolic links to folders are not followed).
    Raises InputError when the folder does not exist or is not a folder.
    """
    root = Path(folder)
    if not root.exists():
        raise InputError(f"{folder}: image folder not found")
    if not root.is_dir():
        raise InputError(f"{folder}: not a folder (an image folder was expected)")
    found: list[str] = []
    if not recursive:
        with os.scandir(root) as entries:
            for entry in entries:
                if (
                    not entry.name.startswith(".")
                    and _is_image_name(entry.name)
                    and entry.is_file()
                ):
                    found.append(entry.name)
        return sorted(found)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.startswith(".") or not _is_image_name(name):
                continue
            if not os.path.isfile(os.path.join(dirpath, name)):
                continue
            found.append((rel / name).as_posix() if rel.parts else name)
    return sorted(found)


def _parts(file_name: str) -> list[str]:
    return [
        p for p in PurePosixPath(str(file_name).replace("\\", "/")).parts if p not in (".", "/")
    ]


def image_stem(file_name: str) -> str:
    """The name outputs of an image are named after: 'drawer1/img_001.jpg' -> 'drawer1__img_001'.

    The file name without its extension, subfolders joined with '__'. Use
    `unique_stems` for a collection: it resolves the names that would collide.
    """
    parts = _parts(file_name)
    if not parts:
        raise InputError(f"{file_name!r}: not an image file name")
    last = parts[-1]
    stem, ext = os.path.splitext(last)
    parts[-1] = stem if stem else last
    return "__".join(parts)


def _full_name(file_name: str) -> str:
    return "__".join(_parts(file_name))


def unique_stems(file_names) -> dict[str, str]:
    """Map each file name to a stem for output names, so that no two outputs collide.

    Usually the stem is `image_stem(file_name)`. File names that would share a stem
    ('a.jpg' and 'a.png') keep their extension instead ('a.jpg', 'a.png'). Stems are
    compared ignoring letter case, because 'A' and 'a' are the same file name on macOS
    and Windows disks. In the rare case that a name still collides (say 'x/a.jpg' and
    'x__a.jpg'), the later one in sorted order gets '__2', '__3', ... appended. The
    result does not depend on the order of `file_names`.
    """
    names = sorted(set(str(f) for f in file_names))
    stems = {name: image_stem(name) for name in names}
    groups: dict[str, list[str]] = {}
    for name, stem in stems.items():
        groups.setdefault(stem.casefold(), []).append(name)
    result: dict[str, str] = {}
    for members in groups.values():
        for name in members:
            result[name] = _full_name(name) if len(members) > 1 else stems[name]
    first_pass = {stem.casefold() for stem in result.values()}
    taken: set[str] = set()
    for name in names:
        stem = result[name]
        if stem.casefold() in taken:
            n = 2
            while f"{stem}__{n}".casefold() in taken | first_pass:
                n += 1
            stem = result[name] = f"{stem}__{n}"
        taken.add(stem.casefold())
    return result
