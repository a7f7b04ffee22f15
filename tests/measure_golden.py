"""Golden values of `sam2pal.outputs.measure.measure_mask`, and the shapes they are measured on.

`tests/data/measure_golden.json` holds the measures of a fixed set of masks as the
reference implementation computed them: `measure.py` at commit `REFERENCE_COMMIT`, the
plain scikit-image one (`skeletonize`, `regionprops`, `measure.perimeter`, on the whole
mask at full resolution). The fast implementation must stay within 0.5 % of them
(tests/test_measure.py). The shapes:

* ``test/...``: the synthetic shapes of tests/test_measure.py (rectangles, rotated
  rectangles, discs, ellipses, arcs, sine and straight strokes, small boxes, lines);
* ``pieces/...``: masks of several pieces: pieces inside another's hole, many specks,
  pieces of the same size (which one is the largest);
* ``real/...``: the parts of 40 of the vendored NEON beetle part masks, at their size;
* ``real_x4/...``, ``real_x8/...``: the parts of some of them enlarged 4 and 8 times
  (nearest neighbour), the size of parts in a 12-megapixel photo;
* ``photo/...``: synthetic parts of a 4000 x 3000 photo (a beetle body of 2.3 million
  pixels, a body-sized band, curved antennae 20 to 40 px wide, a leg with a knee, a
  rectangle, discs, a body with specks, a ring with a blob in its hole).

Regenerate (slow: seconds per 12-megapixel shape with the reference implementation,
which is read from git)::

    .venv/bin/python tests/measure_golden.py
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.draw import disk, line

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
GOLDEN = TESTS / "data" / "measure_golden.json"
REAL_MASKS = ROOT / "src" / "sam2pal" / "data" / "neon_beetles_masks"
PARTS = {1: "head", 2: "pronotum", 3: "elytra", 4: "antenna", 5: "legs"}
PHOTO = (3000, 4000)  # rows, cols of a 12-megapixel photo
# the last commit whose measure.py is the plain scikit-image implementation
REFERENCE_COMMIT = "b4a8e3516583e147db9feb4f572951240b7606ac"

if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


# --------------------------------------------------------------------------------------
# the shapes of tests/test_measure.py
# --------------------------------------------------------------------------------------


def _test_shapes():
    """(name, build) of the synthetic shapes that tests/test_measure.py measures."""
    from test_measure import _box, arc_stroke, rasterise, rectangle, sine_stroke, straight_stroke

    out = []

    def add(name, build):
        out.append((f"test/{name}", build))

    def openings():
        rng = np.random.default_rng(3)
        return [ndi.binary_opening(rng.random((80, 90)) > 0.4, iterations=2) for _ in range(5)]

    for i in range(5):
        add(f"random_opening_{i}", lambda i=i: openings()[i])
    for w, h in [(1, 1), (1, 7), (5, 3), (20, 13), (64, 40), (3, 90)]:

        def rect(w=w, h=h):
            mask = np.zeros((h + 10, w + 10), bool)
            mask[4 : 4 + h, 6 : 6 + w] = True
            return mask

        add(f"pixel_rectangle_{w}x{h}", rect)
    for w, h in [(160, 160), (240, 160), (330, 200), (30, 20), (45, 45), (60, 25), (100, 40)]:
        for angle in np.arange(0.0, 90.1, 7.5):
            add(
                f"rotated_rectangle_{w}x{h}_{angle:g}deg",
                lambda w=w, h=h, a=float(angle): rectangle(w, h, a),
            )

    def disc(size, centre, radius):
        mask = np.zeros((size, size), bool)
        mask[disk((centre, centre), radius)] = True
        return mask

    add("disc_r45", lambda: disc(121, 60, 45))
    add("disc_r40", lambda: disc(121, 60, 40))

    def l_shape():
        mask = np.zeros((70, 70), bool)
        mask[5:65, 5:20] = True
        mask[50:65, 5:65] = True
        return mask

    add("l_shape", l_shape)

    def pieces(which):
        big = np.zeros((60, 200), bool)
        big[10:18, 10:110] = True
        small = np.zeros_like(big)
        small[40:50, 150:180] = True
        return {"big": big, "small": small, "both": big | small}[which]

    for which in ("big", "small", "both"):
        add(f"pieces_{which}", lambda which=which: pieces(which))
    add("arc_r40_150deg_t7", lambda: arc_stroke(40, 150, 7)[0])
    for radius in (30, 60, 120):
        for angle in (90, 180, 270):
            for thickness in (3, 7, 11, 15):
                if thickness > radius / 3:
                    continue
                add(
                    f"arc_r{radius}_{angle}deg_t{thickness}",
                    lambda r=radius, a=angle, t=thickness: arc_stroke(r, a, t)[0],
                )
    for amplitude, wavelength in ((10, 120), (20, 160), (20, 100)):
        for thickness in (3, 7, 11, 15):
            add(
                f"sine_a{amplitude}_w{wavelength}_t{thickness}",
                lambda a=amplitude, w=wavelength, t=thickness: sine_stroke(a, w, 300, t)[0],
            )
    for angle in np.arange(0.0, 90.1, 7.5):
        for length, thickness in ((60, 3), (60, 7), (60, 15), (150, 3), (150, 15)):
            add(
                f"straight_{length}_t{thickness}_{angle:g}deg",
                lambda n=length, a=float(angle), t=thickness: straight_stroke(n, a, t)[0],
            )

    def compact_rect():
        rect = np.zeros((80, 140), bool)
        rect[15:65, 20:120] = True
        return rect

    add("compact_rectangle_100x50", compact_rect)
    for h, w in [
        (4, 10),
        (10, 4),
        (3, 10),
        (4, 12),
        (6, 12),
        (8, 15),
        (15, 10),
        (2, 5),
        (2, 2),
        (5, 5),
        (1, 1),
        (1, 2),
        (2, 1),
        (1, 3),
        (3, 3),
        (8, 8),
        (15, 15),
        (40, 40),
    ]:
        add(f"box_{h}x{w}", lambda h=h, w=w: _box(h, w))
    for radius in (2, 3, 5, 10, 25):
        add(f"small_disc_r{radius}", lambda r=radius: disc(2 * r + 7, r + 3, r))

    def ellipse(major, minor, angle):
        t = np.linspace(0.0, 2 * np.pi, 720, endpoint=False)
        a = math.radians(angle)
        x, y = major / 2 * np.cos(t), minor / 2 * np.sin(t)
        outline = (
            np.stack([math.cos(a) * x - math.sin(a) * y, math.sin(a) * x + math.cos(a) * y], axis=1)
            + 0.3
        )
        return rasterise(outline)

    for major, minor in ((60, 24), (40, 30), (100, 50), (80, 12)):
        for angle in (0, 20, 45, 70, 90, 135):
            add(
                f"ellipse_{major}x{minor}_{angle}deg",
                lambda M=major, m=minor, a=angle: ellipse(M, m, a),
            )

    def one_pixel():
        mask = np.zeros((5, 5), bool)
        mask[2, 2] = True
        return mask

    def two_diagonal():
        mask = np.zeros((5, 5), bool)
        mask[1, 1] = mask[2, 2] = True
        return mask

    add("one_pixel", one_pixel)
    add("two_diagonal_pixels", two_diagonal)
    for n in (4, 10, 37):

        def row(n=n):
            mask = np.zeros((5, n + 4), bool)
            mask[2, 2 : 2 + n] = True
            return mask

        def diagonal(n=n):
            mask = np.zeros((n + 4, n + 4), bool)
            mask[np.arange(n) + 2, np.arange(n) + 2] = True
            return mask

        add(f"line_row_{n}", row)
        add(f"line_column_{n}", lambda row=row: row().T.copy())
        add(f"line_diagonal_{n}", diagonal)
        add(f"line_antidiagonal_{n}", lambda diagonal=diagonal: diagonal()[::-1].copy())
    for angle in range(0, 91, 5):

        def slanted(angle=angle):
            a = math.radians(angle)
            r1, c1 = round(40 * math.sin(a)), round(40 * math.cos(a))
            mask = np.zeros((50, 50), bool)
            rr, cc = line(3, 3, 3 + r1, 3 + c1)
            mask[rr, cc] = True
            return mask

        add(f"line_slanted_{angle}deg", slanted)
    return out


# --------------------------------------------------------------------------------------
# masks of several pieces
# --------------------------------------------------------------------------------------


def _ring(shape, centre, outer, inner) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    r2 = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2
    return (r2 < outer**2) & (r2 >= inner**2)


def _pieces_shapes():
    out = []

    def add(name, build):
        out.append((f"pieces/{name}", build))

    def ring_blob(blob_radius):
        mask = _ring((120, 120), (60, 60), 50, 30)
        mask[disk((60, 60), blob_radius)] = True
        return mask

    add("ring_with_small_blob", lambda: ring_blob(12))

    # the blob in the hole has more pixels than the thin ring around it
    def thin_ring_large_blob():
        mask = _ring((120, 120), (60, 60), 50, 46)
        mask[disk((60, 60), 27)] = True
        return mask

    add("thin_ring_with_large_blob", thin_ring_large_blob)

    def rings_in_rings():
        mask = _ring((160, 160), (80, 80), 75, 65) | _ring((160, 160), (80, 80), 55, 45)
        mask |= _ring((160, 160), (80, 80), 35, 25)
        mask[disk((80, 80), 10)] = True
        return mask

    add("rings_in_rings", rings_in_rings)

    def specks(n, size=(150, 200)):
        rng = np.random.default_rng(n)
        mask = np.zeros(size, bool)
        mask[60:70, 20:180] = True
        for r, c in zip(rng.integers(2, size[0] - 2, n), rng.integers(2, size[1] - 2, n)):
            if not mask[r - 2 : r + 3, c - 2 : c + 3].any():
                mask[r, c] = True
        return mask

    add("bar_with_10_specks", lambda: specks(10))
    add("bar_with_40_specks", lambda: specks(40))
    # more pieces than measure.py fills one by one
    add("bar_with_600_specks", lambda: specks(600, (300, 400)))

    def equal_pieces(second_left):
        mask = np.zeros((80, 120), bool)
        mask[10:20, 60:80] = True  # 20 x 10, compact, first in row order
        mask[50:54, second_left : second_left + 50] = True  # 50 x 4, a band, as many pixels
        return mask

    add("equal_pieces", lambda: equal_pieces(5))

    def equal_pieces_same_top_row():
        mask = np.zeros((80, 120), bool)
        mask[10:14, 60:110] = True  # 50 x 4, a band
        mask[10:20, 5:25] = True  # 20 x 10, compact, same top row, further left: first
        return mask

    add("equal_pieces_same_top_row", equal_pieces_same_top_row)
    return out


# --------------------------------------------------------------------------------------
# real masks
# --------------------------------------------------------------------------------------


def real_files(count: int = 40) -> list[str]:
    """`count` of the vendored label maps, spread evenly over the sorted list (so over
    all species folders)."""
    files = sorted(str(p.relative_to(REAL_MASKS)) for p in REAL_MASKS.rglob("*.png"))
    picks = np.linspace(0, len(files) - 1, count).round().astype(int)
    return [files[i] for i in picks]


#: enlarged 4 times / 8 times: 12-megapixel-sized parts (at most about 3000 x 4000)
ENLARGED = {
    4: [
        "advena/beetle_101_1204.png",
        "aestivus/beetle_1342_1039.png",
        "dubius/beetle_237_994.png",
        "goryi/beetle_1101_411.png",
        "lachrymosus/beetle_130_1069.png",
        "melanarius/beetle_109_374.png",
        "pensylvanicus/beetle_102_679.png",
        "torvus/beetle_118_1273.png",
    ],
    8: [
        "impunctatus/beetle_102_1118.png",
        "advena/beetle_100_475.png",
        "dubius/beetle_207_38.png",
        "grossus/beetle_1106_1250.png",
    ],
}


def _label_map(name: str) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(REAL_MASKS / name))


def enlarge(mask: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement: each pixel becomes a factor x factor block."""
    return np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)


def _real_shapes():
    out = []
    for name in real_files():
        for value, part in PARTS.items():
            out.append((f"real/{name}/{part}", lambda n=name, v=value: _label_map(n) == v))
    for factor, names in ENLARGED.items():
        for name in names:
            for value, part in PARTS.items():
                out.append(
                    (
                        f"real_x{factor}/{name}/{part}",
                        lambda n=name, v=value, f=factor: enlarge(_label_map(n) == v, f),
                    )
                )
    return out


# --------------------------------------------------------------------------------------
# synthetic parts of a 12-megapixel photo
# --------------------------------------------------------------------------------------


def fill_polygon(poly_xy: np.ndarray, shape=PHOTO) -> np.ndarray:
    """Bool mask of a polygon in pixel-edge coordinates (pixel (r, c) is the square
    [c, c+1] x [r, r+1]), filled by OpenCV at 1/16 px precision."""
    mask = np.zeros(shape, np.uint8)
    pts = np.round((np.asarray(poly_xy, np.float64) - 0.5) * 16).astype(np.int32)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def band_polygon(centre_xy: np.ndarray, thickness) -> np.ndarray:
    """The outline of a band of (per sample) `thickness` around a densely sampled centre
    line, with flat ends."""
    thickness = np.broadcast_to(np.asarray(thickness, np.float64), (len(centre_xy),))
    tangent = np.gradient(centre_xy, axis=0)
    tangent /= np.hypot(tangent[:, 0], tangent[:, 1])[:, None]
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    half = (thickness / 2)[:, None]
    return np.concatenate([centre_xy + normal * half, (centre_xy - normal * half)[::-1]])


def photo_ellipse(cx, cy, a, b, angle_deg, shape=PHOTO) -> np.ndarray:
    """Pixels whose centre lies inside an ellipse (semi-axes a, b, rotated)."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    x, y = cols + 0.5 - cx, rows + 0.5 - cy
    t = math.radians(angle_deg)
    u = x * math.cos(t) + y * math.sin(t)
    v = -x * math.sin(t) + y * math.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def photo_antenna_arc() -> np.ndarray:
    """A curved antenna: 95 degrees of a circle of radius 900 px (1492 px long), tapering
    from 40 to 20 px."""
    t = np.linspace(0.0, math.radians(95.0), 4000) + 0.4
    centre = np.stack([600 + 900 * np.cos(t), 400 + 900 * np.sin(t)], axis=1)
    return fill_polygon(band_polygon(centre, np.linspace(40.0, 20.0, len(t))))


def photo_antenna_wavy() -> np.ndarray:
    """A wavy antenna, 24 px wide, about 1500 px long."""
    x = np.linspace(0.0, 1400.0, 5000)
    y = 60 * np.sin(2 * np.pi * x / 700.0)
    a = math.radians(-28.0)
    centre = np.stack(
        [500 + math.cos(a) * x - math.sin(a) * y, 2200 + math.sin(a) * x + math.cos(a) * y], axis=1
    )
    return fill_polygon(band_polygon(centre, 24.0))


def photo_leg() -> np.ndarray:
    """A leg: femur (700 px, 70 to 55 px wide), a rounded knee, tibia (800 px, 40 to 30
    px wide) and tarsus (450 px, 18 px wide)."""
    pts = [np.array([800.0, 900.0])]
    segments = [(700, math.radians(20.0)), (800, math.radians(120.0)), (450, math.radians(95.0))]
    widths = [(70.0, 55.0), (40.0, 30.0), (18.0, 18.0)]
    centre, thick = [], []
    for (length, angle), (w0, w1) in zip(segments, widths):
        s = np.linspace(0.0, length, int(length * 2))
        start = pts[-1]
        seg = start + np.stack([s * math.cos(angle), s * math.sin(angle)], axis=1)
        centre.append(seg)
        thick.append(np.linspace(w0, w1, len(s)))
        pts.append(seg[-1])
    centre = np.concatenate(centre)
    thick = np.concatenate(thick)
    # round the joints: smooth the polyline over ~60 px
    centre = ndi.gaussian_filter1d(centre, 60.0, axis=0, mode="nearest")
    return fill_polygon(band_polygon(centre, thick))


def photo_rectangle(w: float = 1800.0, h: float = 900.0, angle: float = 30.0) -> np.ndarray:
    a = math.radians(angle)
    u, v = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
    c = np.array([2000.3, 1500.7])
    return fill_polygon(
        np.array(
            [
                c - u * w / 2 - v * h / 2,
                c + u * w / 2 - v * h / 2,
                c + u * w / 2 + v * h / 2,
                c - u * w / 2 + v * h / 2,
            ]
        )
    )


def photo_body_with_specks() -> np.ndarray:
    """The body and 60 specks (3 to 12 px across) around it, as a segmentation leaves
    them."""
    mask = photo_ellipse(2000.3, 1500.6, 1100.0, 665.0, 17.0)
    rng = np.random.default_rng(12)
    rows, cols = np.ogrid[: PHOTO[0], : PHOTO[1]]
    for r, c, radius in zip(
        rng.uniform(100, 2900, 60), rng.uniform(100, 3900, 60), rng.uniform(1.5, 6, 60)
    ):
        r0, c0 = int(r), int(c)
        window = (slice(r0 - 8, r0 + 9), slice(c0 - 8, c0 + 9))
        mask[window] |= (rows[window[0]] - r) ** 2 + (cols[:, window[1]] - c) ** 2 <= radius**2
    return mask


def photo_ring_with_blob() -> np.ndarray:
    """A ring (radii 700 and 640) with a disc in its hole: a piece inside another's
    hole."""
    return _ring(PHOTO, (1500, 2000), 700, 640) | photo_ellipse(2000.0, 1500.0, 400.0, 400.0, 0.0)


def photo_shapes():
    """(name, build) of the synthetic 12-megapixel parts (on a full 3000 x 4000 frame)."""
    return [
        # semi-axes 1100 x 665: 2.3 million pixels
        ("photo/body", lambda: photo_ellipse(2000.3, 1500.6, 1100.0, 665.0, 17.0)),
        # as many pixels, long enough (about six widths) to be measured along its centre line
        ("photo/body_band", lambda: photo_ellipse(2000.4, 1500.2, 1950.0, 330.0, 8.0)),
        ("photo/antenna_arc", photo_antenna_arc),
        ("photo/antenna_wavy", photo_antenna_wavy),
        ("photo/leg", photo_leg),
        ("photo/rectangle", photo_rectangle),
        ("photo/eye_disc", lambda: photo_ellipse(1200.2, 800.7, 150.0, 150.0, 0.0)),
        ("photo/disc", lambda: photo_ellipse(2000.5, 1500.5, 800.0, 800.0, 0.0)),
        ("photo/body_with_specks", photo_body_with_specks),
        ("photo/antenna_pair", lambda: photo_antenna_arc() | photo_antenna_wavy()),
        ("photo/ring_with_blob", photo_ring_with_blob),
        # about four times as long as wide: at the line between band and compact
        ("photo/bar_at_the_band_line_short", lambda: photo_rectangle(980.0, 250.0, 45.0)),
        ("photo/bar_at_the_band_line_long", lambda: photo_rectangle(1020.0, 250.0, 45.0)),
    ]


def shapes():
    """(name, build) of every golden shape; build() returns the bool mask."""
    return _test_shapes() + _pieces_shapes() + _real_shapes() + photo_shapes()


# --------------------------------------------------------------------------------------
# the golden file
# --------------------------------------------------------------------------------------


def load() -> dict:
    """{name: {measure: value (NaN for null)}} of the golden file."""
    data = json.loads(GOLDEN.read_text())
    return {
        name: {k: (math.nan if v is None else v) for k, v in values.items()}
        for name, values in data["shapes"].items()
    }


def _git(*args) -> str | None:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def reference_measure(commit: str = REFERENCE_COMMIT):
    """`measure_mask` of the reference implementation: measure.py at `commit`."""
    done = subprocess.run(
        ["git", "show", f"{commit}:src/sam2pal/outputs/measure.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"cannot read measure.py at {commit}: {done.stderr.strip()}")
    module = types.ModuleType("sam2pal_measure_reference")
    exec(compile(done.stdout, f"{commit}:src/sam2pal/outputs/measure.py", "exec"), module.__dict__)
    return module.measure_mask


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--commit", default=REFERENCE_COMMIT, help="the reference implementation's commit"
    )
    args = parser.parse_args(argv)
    measure_mask = reference_measure(args.commit)
    values, seconds = {}, {}
    for name, build in shapes():
        mask = build()
        start = time.perf_counter()
        result = measure_mask(mask)
        seconds[name] = round(time.perf_counter() - start, 3)
        values[name] = {k: (None if math.isnan(v) else v) for k, v in result.items()}
        print(f"{seconds[name]:8.3f} s  {name}", flush=True)
    data = {
        "about": "measure_mask values of the reference implementation (src/sam2pal/outputs/measure.py "
        "at reference_commit); regenerate with tests/measure_golden.py",
        "reference_commit": _git("rev-parse", args.commit),
        "generated_at_commit": _git("rev-parse", "HEAD"),
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds_per_shape": seconds,
        "shapes": values,
    }
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    tmp = GOLDEN.with_name(GOLDEN.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, GOLDEN)
    print(f"wrote {GOLDEN} ({len(values)} shapes)")


if __name__ == "__main__":
    main()
