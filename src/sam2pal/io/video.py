"""Video collections: frames out of a video file, and videos out of frames.

SAM2's video predictor reads a folder of numbered frames (``00000.jpg``, ``00001.jpg``,
...; ordered by the integer value of the file stem), so a video is first split into
such a folder with `extract_frames`. A manifest CSV (``index,file,time_s``) goes with
every frames folder: ``index`` is the frame's position (0-based, what SAM2 calls the
frame index), ``file`` its file name in the folder and ``time_s`` its presentation time
in the source video, in seconds, so that results can be mapped back to the video.
Users who already have a folder of frames give it to `frames_from_dir` instead.

All the work is done by the ffmpeg program: ``$SAM2PAL_FFMPEG`` when set, else the
``ffmpeg`` on PATH, else the static binary shipped with the ``imageio-ffmpeg`` package.
Command lines are built with ffmpeg-python and run with `subprocess`; ffmpeg's stderr
is read to find the frame timestamps (the ``showinfo`` filter) and to turn a failure
into a one-line `InputError` that names the video.

Two ffmpeg behaviours matter here:

- Output frame rate: the image-sequence and null muxers duplicate or drop frames to
  make a constant frame rate unless told ``-fps_mode passthrough``; a variable frame
  rate video would otherwise give more files than it has frames.
- Input seeking (``-ss`` before ``-i``) decodes from the previous key frame and drops
  the frames before the seek point (exact), but restarts the timestamps at the seek
  point: frame times seen by the filters are "time since ``start``", so ``start`` is
  added back. Without seeking, times are relative to the start of the file (ffmpeg
  subtracts the container's start time), as a player shows them.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import functools
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import ffmpeg
import numpy as np

from sam2pal.errors import InputError
from sam2pal.io.atomic import atomic_dir, atomic_path, atomic_write
from sam2pal.io.images import list_images

MANIFEST_HEADER = ("index", "file", "time_s")
IMAGE_FORMATS = {"jpg": "jpg", "jpeg": "jpg", "png": "png"}

# codecs whose constant-quality setting is -crf
_CRF_CODECS = ("libx264", "libx265", "libvpx-vp9", "libaom-av1", "libsvtav1")
# container formats that understand -movflags +faststart (index at the front, for streaming)
_FASTSTART_SUFFIXES = (".mp4", ".m4v", ".mov")

_SHOWINFO_FRAME = re.compile(
    r"\[Parsed_showinfo_\d+ @ [^\]]*\]\s*n:\s*(\d+)\s+pts:\s*(\S+)\s+pts_time:\s*(\S+)"
)
_SHOWINFO_CONFIG = re.compile(
    r"\[Parsed_showinfo_\d+ @ [^\]]*\]\s*config in time_base:\s*(\d+)/(\d+)"
)
_SHOWINFO_SIZE = re.compile(r"\bs:(\d+)x(\d+)\b")
_LOG_PREFIX = re.compile(r"^(\[[^\]]*\]\s*)+")
_DURATION = re.compile(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)")
_VIDEO_STREAM = re.compile(r"Stream #\d+:\d+.*?: Video: (\S+?),?\s")
_ERROR_WORDS = (
    "error",
    "invalid",
    "not found",
    "no decoder",
    "matches no streams",
    "unsupported",
    "unknown",
    "could not",
    "cannot",
    "failed",
    "corrupt",
    "truncated",
    "no such file",
    "permission denied",
    "does not contain",
)
# lines that only repeat that something failed; the line before them says what
_GENERIC_LINES = (
    "error opening input file",
    "error opening input files",
    "conversion failed",
    "error binding filtergraph",
    "task finished with error",
    "terminating thread",
    "nothing was written",
    "error while opening encoder",
    "could not open encoder",
    "error sending frames",
    "no filtered frames for output stream",
    "error while filtering",
    "exiting normally",
)


@dataclass(frozen=True)
class FrameRow:
    """One frame of a frames folder: SAM2 frame index, file name, time in the video."""

    index: int
    file: str
    time_s: float | None


# -- the ffmpeg program ----------------------------------------------------------------


def ffmpeg_exe() -> str:
    """The ffmpeg program to run: $SAM2PAL_FFMPEG, else ffmpeg on PATH, else imageio-ffmpeg's.

    A system ffmpeg is preferred because it may have codecs (or hardware decoders) that
    the static imageio-ffmpeg binary lacks; the variable lets a user pick a build.
    """
    exe = os.environ.get("SAM2PAL_FFMPEG")
    if exe:
        return exe
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@functools.lru_cache(maxsize=8)
def _has_fps_mode(exe: str) -> bool:
    """Whether this ffmpeg knows -fps_mode (5.1 and later); older ones call it -vsync."""
    try:
        done = subprocess.run(
            [exe, "-hide_banner", "-h", "long"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return True  # the real run will report what is wrong
    return "-fps_mode" in done.stdout + done.stderr


def _passthrough() -> dict:
    """Output option that keeps every decoded frame once: no duplicates, no drops."""
    return {"fps_mode": "passthrough"} if _has_fps_mode(ffmpeg_exe()) else {"vsync": "passthrough"}


def _command(stream, extra_global: Iterable[str] = ()) -> list[str]:
    """Compile an ffmpeg-python graph to argv, global options first.

    ffmpeg-python appends global_args after the output file, where ffmpeg 7+ warns
    that trailing options may be ignored; they go right after the program instead.
    """
    args = stream.compile(cmd=ffmpeg_exe())
    return args[:1] + ["-hide_banner", "-nostdin", "-nostats", *extra_global] + args[1:]


def _clean(line: str) -> str:
    """An ffmpeg log line without its '[component @ 0x...]' prefixes, trimmed."""
    text = _LOG_PREFIX.sub("", line.strip()).strip()
    return text if len(text) <= 200 else text[:197] + "..."


def _useful_line(lines: Iterable[str]) -> str:
    """The line of ffmpeg's log that best says what went wrong.

    The first error-like line that is not one of ffmpeg's generic follow-ups
    ('Conversion failed!', 'Error opening input files: ...'); failing that, the first
    generic one; failing that, the last line.
    """
    cleaned = [_clean(line) for line in lines if line.strip()]
    generic = None
    for text in cleaned:
        low = text.lower()
        if not any(word in low for word in _ERROR_WORDS):
            continue
        if any(g in low for g in _GENERIC_LINES):
            generic = generic or text
            continue
        return text
    if generic:
        return generic
    return cleaned[-1] if cleaned else "no message"


def _duration(lines: Iterable[str]) -> float | None:
    for line in lines:
        m = _DURATION.search(line)
        if m:
            h, mi, s = m.groups()
            return int(h) * 3600 + int(mi) * 60 + float(s)
    return None


def _input_error(video, lines: list[str], what: str = "cannot read it") -> InputError:
    """Turn ffmpeg's log of a failed run on `video` into a one-line InputError."""
    text = "\n".join(lines)
    low = text.lower()
    detail = _useful_line(lines)
    if "no such file or directory" in low:
        reason = "video file not found"
    elif "permission denied" in low:
        reason = "permission denied"
    elif "invalid data found when processing input" in low:
        reason = "not a video file that ffmpeg can read"
    elif "matches no streams" in low or ("Input #" in text and not _VIDEO_STREAM.search(text)):
        reason = "has no video stream"
    elif "no decoder found" in low or re.search(r"decoder .*not found", low):
        codecs = [c for c in _VIDEO_STREAM.findall(text) if c != "none"]
        codec = f" ({codecs[0]})" if codecs else ""
        reason = f"its video codec{codec} cannot be decoded by this ffmpeg (SAM2PAL_FFMPEG picks another)"
    else:
        reason = f"ffmpeg {what}"
    return InputError(f"{video}: {reason} (ffmpeg: {detail})")


class _LogReader:
    """Reads an ffmpeg stderr stream line by line, keeping showinfo frames and a bounded log.

    A long video gives one showinfo line per frame (plus side-data lines); those are
    parsed as they come rather than stored, and of the other lines only the first and
    the last few hundred are kept, so memory stays small for hour-long videos.
    """

    def __init__(self) -> None:
        self.frames: list[tuple[int, str, str]] = []  # (n, pts, pts_time)
        self.time_base: Fraction | None = None
        self.frame_times: list[float | None] = []
        self.size: tuple[int, int] | None = None
        self.head: list[str] = []
        self.tail: collections.deque[str] = collections.deque(maxlen=300)

    def feed(self, line: str) -> None:
        line = line.rstrip("\r\n")
        if "[Parsed_showinfo_" in line:
            m = _SHOWINFO_FRAME.search(line)
            if m:
                self._frame(*m.groups(), line)
                return
            m = _SHOWINFO_CONFIG.search(line)
            if m and int(m.group(2)) > 0:
                self.time_base = Fraction(int(m.group(1)), int(m.group(2)))
            return  # side data and other showinfo chatter
        if len(self.head) < 200:
            self.head.append(line)
        else:
            self.tail.append(line)

    def _frame(self, n: str, pts: str, pts_time: str, line: str) -> None:
        """Record one frame's time: pts x time base (exact), else the printed pts_time.

        Older ffmpeg prints pts_time with six significant digits only ('%.6g': 1234.57
        for 1234.5678 s), so the integer pts is used whenever the time base is known.
        """
        time_s: float | None
        if self.time_base is not None and re.fullmatch(r"-?\d+", pts):
            time_s = float(int(pts) * self.time_base)
        else:
            try:
                time_s = float(pts_time)
            except ValueError:  # NOPTS
                time_s = None
            if time_s is not None and not math.isfinite(time_s):
                time_s = None
        self.frames.append((int(n), pts, pts_time))
        self.frame_times.append(time_s)
        if self.size is None:
            m = _SHOWINFO_SIZE.search(line)
            if m:
                self.size = (int(m.group(1)), int(m.group(2)))

    @property
    def lines(self) -> list[str]:
        return self.head + list(self.tail)


def _run_logged(args: list[str], stdout=subprocess.DEVNULL) -> tuple[int, _LogReader]:
    """Run ffmpeg, parsing its stderr as it streams; return (exit status, log)."""
    log = _LogReader()
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
    except FileNotFoundError as exc:
        raise InputError(f"{args[0]}: ffmpeg program not found (set SAM2PAL_FFMPEG)") from exc
    with proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.feed(line)
    return proc.returncode, log


def _check_video_file(video) -> Path:
    path = Path(video)
    if not path.exists():
        raise InputError(f"{video}: video file not found")
    if path.is_dir():
        raise InputError(f"{video}: is a folder, not a video file")
    return path


def _local(path: Path) -> str:
    """A local path for ffmpeg's command line.

    The 'file:' protocol prefix keeps names with a colon ('take:2.mp4' would be read as
    protocol 'take') or a leading dash from being misread.
    """
    return f"file:{path}"


def _video_input(path: Path, **input_kwargs):
    """ffmpeg-python stream of the first real video stream ('V' skips cover pictures)."""
    return ffmpeg.input(_local(path), **input_kwargs)["V:0"]


# -- manifests -------------------------------------------------------------------------


def _format_time(time_s: float | None) -> str:
    return "" if time_s is None else f"{round(float(time_s), 6):.6f}"


def write_manifest(manifest_csv, rows: list[FrameRow]) -> None:
    """Write the ``index,file,time_s`` manifest atomically (times to 6 decimals)."""
    with atomic_write(manifest_csv) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_HEADER)
        for row in rows:
            writer.writerow([row.index, row.file, _format_time(row.time_s)])


def read_manifest(manifest_csv) -> list[FrameRow]:
    """Read a frames manifest; the indices must run 0, 1, ..., n-1 in order.

    Raises InputError (one line, naming the file and the line) on a missing file, a
    wrong header, an index out of order, an empty file name or a bad time.
    """
    path = Path(manifest_csv)
    if not path.is_file():
        what = (
            "is a folder, not a frames manifest" if path.is_dir() else "frames manifest not found"
        )
        raise InputError(f"{manifest_csv}: {what}")
    rows: list[FrameRow] = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise InputError(
                f"{manifest_csv}: frames manifest is empty (expected header index,file,time_s)"
            )
        if [h.strip() for h in header] != list(MANIFEST_HEADER):
            raise InputError(
                f"{manifest_csv}: frames manifest header is {','.join(header)!r}, expected 'index,file,time_s'"
            )
        for record in reader:
            line = reader.line_num
            if not record or all(not v.strip() for v in record):
                continue
            if len(record) != 3:
                raise InputError(
                    f"{manifest_csv}: line {line}: expected 3 fields, got {len(record)}"
                )
            index_text, file, time_text = (v.strip() for v in record)
            try:
                index = int(index_text)
            except ValueError:
                raise InputError(
                    f"{manifest_csv}: line {line}: index {index_text!r} is not an integer"
                ) from None
            if index != len(rows):
                raise InputError(
                    f"{manifest_csv}: line {line}: index {index} out of order (expected {len(rows)}; "
                    "indices must be 0, 1, 2, ...)"
                )
            if not file:
                raise InputError(f"{manifest_csv}: line {line}: empty file name")
            time_s = None
            if time_text:
                try:
                    time_s = float(time_text)
                except ValueError:
                    raise InputError(
                        f"{manifest_csv}: line {line}: time_s {time_text!r} is not a number"
                    ) from None
                if not math.isfinite(time_s):
                    raise InputError(
                        f"{manifest_csv}: line {line}: time_s {time_text!r} is not finite"
                    )
            rows.append(FrameRow(index=index, file=file, time_s=time_s))
    return rows


# -- frames out of a video --------------------------------------------------------------


def _check_positive(name: str, value, integer: bool = False):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a number, got {value!r}")
    if integer and int(value) != value:
        raise InputError(f"{name} must be a whole number, got {value!r}")
    if not math.isfinite(float(value)) or value <= 0:
        raise InputError(f"{name} must be positive, got {value!r}")
    return int(value) if integer else float(value)


def _check_range(start, end) -> tuple[float | None, float | None]:
    if start is not None:
        if isinstance(start, bool) or not isinstance(start, (int, float, np.integer, np.floating)):
            raise InputError(f"start must be a number of seconds, got {start!r}")
        start = float(start)
        if not math.isfinite(start) or start < 0:
            raise InputError(f"start must be >= 0 seconds, got {start!r}")
    if end is not None:
        end = _check_positive("end", end)
        if end <= (start or 0.0):
            raise InputError(f"end ({end} s) must be after start ({start or 0.0} s)")
    return start, end


def _seconds(value: float) -> str:
    """A time for ffmpeg's command line, exact to the microsecond."""
    return f"{value:.6f}"


def extract_frames(
    video,
    frames_dir,
    manifest_csv,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
    max_frames: int | None = None,
    max_size: int | None = None,
    image_format: str = "jpg",
    jpeg_quality: int = 2,
) -> list[FrameRow]:
    """Split `video` into ``frames_dir/00000.jpg, 00001.jpg, ...`` and write the manifest.

    The frames go to a temporary sibling folder that replaces ``frames_dir`` only when
    everything worked, so a failure leaves no half-written folder and re-extraction
    leaves no stale frames; the manifest is written last, also atomically.

    Args:
        video, frames_dir, manifest_csv: the video file, the frames folder, the manifest.
        fps: None keeps every decoded frame (ffmpeg neither duplicates nor drops any); a
            number resamples to that rate with ffmpeg's ``fps`` filter (each output frame
            is the source frame shown at that time; its time_s is on the new grid).
        start, end: cut the video (seconds): frames shown at ``start <= t < end``.
        max_frames: keep at most that many frames (the first ones).
        max_size: cap on the longer side in pixels (aspect kept, never enlarged).
        image_format, jpeg_quality: 'jpg' (``jpeg_quality``: ffmpeg's -q:v, 2 best .. 31
            worst) or 'png' (lossless).

    Returns:
        The manifest rows; time_s is each frame's presentation time in the source video,
        in seconds from the start of the file, read from ffmpeg's ``showinfo`` filter.

    Raises InputError naming the video when it is missing, not a video, has no video
    stream or an unsupported codec, or when no frame falls in the requested range.
    """
    ext = _check_image_format(image_format, jpeg_quality)
    fps = _check_positive("fps", fps)
    max_frames = _check_positive("max_frames", max_frames, integer=True)
    max_size = _check_positive("max_size", max_size, integer=True)
    start, end = _check_range(start, end)
    path = _check_video_file(video)
    stream = _extract_stream(path, fps, start, end, max_frames, max_size)

    frames_dir = Path(frames_dir)
    if frames_dir.exists() and not frames_dir.is_dir():
        raise InputError(f"{frames_dir}: exists and is not a folder (frames folder expected)")
    with atomic_dir(frames_dir) as tmp:
        out_kwargs = _frame_options(ext, jpeg_quality, max_frames)
        # the image muxer expands '%' in the whole name: a '%' in the folder is doubled
        pattern = _local(tmp).replace("%", "%%") + f"/%05d.{ext}"
        args = _command(stream.output(pattern, **out_kwargs))
        code, log = _run_logged(args)
        rows = _extracted_rows(video, tmp, ext, code, log, start, end)
        # the old manifest describes the old frames: drop it before they are replaced, so
        # that a failure between the two steps leaves no manifest rather than a wrong one
        with contextlib.suppress(FileNotFoundError):
            os.unlink(manifest_csv)
    write_manifest(manifest_csv, rows)
    return rows


def _check_image_format(image_format, jpeg_quality) -> str:
    """The file extension of `image_format` ('jpg' or 'png'), with a valid JPEG quality."""
    ext = IMAGE_FORMATS.get(str(image_format or "jpg").lower().lstrip("."))
    if ext is None:
        raise InputError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if (
        isinstance(jpeg_quality, bool)
        or not isinstance(jpeg_quality, (int, np.integer))
        or not 2 <= jpeg_quality <= 31
    ):
        raise InputError(
            f"jpeg_quality must be an integer 2 (best) .. 31 (worst), got {jpeg_quality!r}"
        )
    return ext


def _frame_options(ext: str, jpeg_quality: int, max_frames: int | None) -> dict:
    """ffmpeg's output options for the image files of `extract_frames`."""
    out_kwargs = {**_passthrough(), "start_number": 0}
    if max_frames is not None:
        out_kwargs["frames:v"] = max_frames
    if ext == "jpg":
        out_kwargs["q:v"] = int(jpeg_quality)
    return out_kwargs


def _extract_stream(path: Path, fps, start, end, max_frames, max_size):
    """ffmpeg's input and filters for `extract_frames`, ending in ``showinfo``."""
    input_kwargs = {}
    if start:
        input_kwargs["ss"] = _seconds(start)
    if end is not None:
        input_kwargs["to"] = _seconds(end)  # an input option: a time in the source video
    stream = _video_input(path, **input_kwargs)
    if fps is not None:
        stream = stream.filter("fps", fps=str(Fraction(fps).limit_denominator(1_000_000)))
    if max_size is not None:
        stream = stream.filter(
            "scale",
            f"min({max_size},iw)",
            f"min({max_size},ih)",
            force_original_aspect_ratio="decrease",
        )
    if max_frames is not None:
        # trim (not only -frames:v) so that showinfo sees exactly the frames written:
        # with -frames:v alone the filter graph has already passed on one frame more
        stream = stream.filter("trim", end_frame=max_frames)
    return stream.filter("showinfo")


def _extracted_rows(video, folder: Path, ext: str, code: int, log: _LogReader, start, end):
    """The manifest rows of the frames ffmpeg wrote into `folder`, once they are checked
    against its log (exit `code`, frame numbers and times)."""
    written = {p.name for p in folder.iterdir()}
    if not written:
        _raise_if_unreadable(video, code, log)
        raise _no_frames(video, log, start, end)
    if code != 0:
        raise _input_error(video, log.lines, "failed while extracting frames")
    # %05d grows to six digits past 99999 frames: compare names, not sorted lists
    expected = [f"{i:05d}.{ext}" for i in range(len(written))]
    if written != set(expected) or len(written) != len(log.frames):
        raise InputError(
            f"{video}: ffmpeg wrote {len(written)} frame files but reported {len(log.frames)} "
            "frames; not writing a manifest that could be wrong"
        )
    if [n for n, _, _ in log.frames] != list(range(len(written))):
        raise InputError(f"{video}: ffmpeg reported frames out of order; not writing a manifest")
    offset = start or 0.0
    return [
        FrameRow(index=i, file=name, time_s=None if t is None else t + offset)
        for i, (name, t) in enumerate(zip(expected, log.frame_times))
    ]


def _raise_if_unreadable(video, code: int, log: _LogReader) -> None:
    """When ffmpeg failed for a reason other than an empty range, raise that reason."""
    text = "\n".join(log.lines).lower()
    empty_range = (
        "no filtered frames for output stream" in text
        or "nothing was written" in text
        or "output file is empty" in text
        or code == 0
    )
    if not empty_range or not _VIDEO_STREAM.search("\n".join(log.lines)):
        raise _input_error(video, log.lines, "failed while extracting frames")


def _no_frames(video, log: _LogReader, start, end) -> InputError:
    duration = _duration(log.lines)
    length = f" (the video is {duration:.3f} s long)" if duration is not None else ""
    if start is not None and duration is not None and start >= duration:
        return InputError(
            f"{video}: no frames extracted: start {start:g} s is at or beyond the end{length}"
        )
    if start is not None or end is not None:
        span = f"{start or 0:g} s .. {'end' if end is None else f'{end:g} s'}"
        return InputError(f"{video}: no frames extracted between {span}{length}")
    return InputError(
        f"{video}: no frames extracted: the video stream has no decodable frames{length}"
    )


# -- frames a user extracted -------------------------------------------------------------


def _natural_key(name: str):
    """'frame2.jpg' before 'frame10.jpg': digit runs compare as numbers."""
    parts = re.split(r"(\d+)", name)
    key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p.casefold()) for p in parts if p)
    return key, name


def _order_frames(folder, names: list[str]) -> list[str]:
    """SAM2's order (integer stems) when every stem is an integer, else natural sort."""
    stems = [os.path.splitext(n)[0] for n in names]
    if all(re.fullmatch(r"[0-9]+", s) for s in stems):
        by_number: dict[int, str] = {}
        for name, stem in zip(names, stems):
            other = by_number.setdefault(int(stem), name)
            if other != name:
                raise InputError(
                    f"{folder}: frames {other} and {name} have the same number; "
                    "frame order would be ambiguous"
                )
        return [by_number[k] for k in sorted(by_number)]
    return sorted(names, key=_natural_key)


def frames_from_dir(frames_dir, manifest_csv, fps: float | None = None) -> list[FrameRow]:
    """Manifest for a folder of frames the user extracted (the old tool's --video_dir).

    The images directly in the folder (IMAGE_EXTENSIONS, hidden files skipped) are
    ordered by the integer value of their stem when every stem is an integer (SAM2's
    convention: 0.jpg, 1.jpg, ..., 10.jpg), otherwise in natural order (frame2 before
    frame10). index = position in that order; time_s = index / fps when ``fps`` is
    given, else empty. Raises InputError when the folder holds no images.
    """
    fps = _check_positive("fps", fps)
    names = list_images(frames_dir, recursive=False)
    if not names:
        raise InputError(
            f"{frames_dir}: no images in the frames folder (expected 00000.jpg, 00001.jpg, ...)"
        )
    ordered = _order_frames(frames_dir, names)
    rows = [
        FrameRow(index=i, file=name, time_s=None if fps is None else i / fps)
        for i, name in enumerate(ordered)
    ]
    write_manifest(manifest_csv, rows)
    return rows


# -- whole-video helpers -----------------------------------------------------------------


def count_frames(video) -> int:
    """Number of video frames ffmpeg decodes from `video` (first video stream).

    Decodes the whole stream (no frame is dropped or duplicated), so it is exact but
    takes about as long as decoding the video.
    """
    path = _check_video_file(video)
    args = _command(
        _video_input(path).output("-", format="null", **_passthrough()),
        extra_global=("-progress", "pipe:1"),
    )
    log = _LogReader()
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as err:
        try:
            proc = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                errors="replace",
                check=False,
            )
        except FileNotFoundError as exc:
            raise InputError(f"{args[0]}: ffmpeg program not found (set SAM2PAL_FFMPEG)") from exc
        err.seek(0)
        for line in err:
            log.feed(line)
    counts = re.findall(r"^frame=\s*(\d+)\s*$", proc.stdout, flags=re.MULTILINE)
    if proc.returncode != 0 or not counts:
        raise _input_error(video, log.lines, "cannot decode it")
    return int(counts[-1])


def _frame_size(path: Path) -> tuple[int, int]:
    """(width, height) of the first decoded frame, as ffmpeg's filters see it (rotated)."""
    args = _command(
        _video_input(path).filter("showinfo").output("-", format="null", **{"frames:v": 1})
    )
    code, log = _run_logged(args)
    if code != 0 or log.size is None:
        if code == 0:
            raise InputError(f"{path}: the video stream has no decodable frames")
        raise _input_error(path, log.lines, "cannot decode it")
    return log.size


def read_video_frames(video) -> Iterator[np.ndarray]:
    """Yield the frames of `video` as RGB uint8 arrays (H, W, 3), one at a time.

    Every decoded frame once (no frame rate conversion); frames are scaled to the size
    of the first one should the stream change size midway. Stopping early (closing the
    generator) stops ffmpeg.
    """
    path = _check_video_file(video)
    width, height = _frame_size(path)
    args = _command(
        _video_input(path)
        .filter("scale", width, height)
        .output("pipe:", format="rawvideo", pix_fmt="rgb24", **_passthrough())
    )
    frame_bytes = width * height * 3
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as err:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        finished = False
        try:
            while True:
                data = proc.stdout.read(frame_bytes)
                if not data:
                    break
                if len(data) < frame_bytes:
                    raise InputError(f"{video}: ffmpeg stopped in the middle of a frame")
                yield np.frombuffer(data, np.uint8).reshape(height, width, 3).copy()
            finished = True
        finally:
            if not finished and proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            code = proc.wait()
        if finished and code != 0:
            err.seek(0)
            raise _input_error(video, err.read().splitlines(), "failed while decoding it")


# -- a video out of frames ----------------------------------------------------------------


def _check_frame(path, i: int, frame, shape=None) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(
            f"{path}: frame {i} must be an RGB uint8 array (H, W, 3), got {arr.dtype} {arr.shape}"
        )
    if shape is not None and arr.shape != shape:
        raise InputError(
            f"{path}: frame {i} is {arr.shape[1]}x{arr.shape[0]}, the first frame "
            f"{shape[1]}x{shape[0]}; all frames must have the same size"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(f"{path}: frame {i} is empty")
    return np.ascontiguousarray(arr)


def write_video(
    frames: Iterable[np.ndarray], path, fps: float, crf: int = 23, codec: str = "libx264"
) -> int:
    """Encode RGB uint8 frames (H, W, 3, all the same size) into a video; return the count.

    Frames are streamed into ffmpeg's stdin one at a time (never all in memory) and
    encoded H.264 (``codec`` libx264 by default), yuv420p, ``crf`` quality (0 lossless
    luma .. 51 worst; codecs without -crf get -q:v 2), with the index at the front of
    MP4/MOV files (+faststart). Odd widths or heights are padded to even on the right
    and bottom (yuv420p needs even sizes). The container follows the file extension;
    the video is written to a temporary file that is renamed to `path` at the end.

    Args:
        frames: RGB uint8 frames, H x W x 3, all the same size.
        path: the video file to write.
        fps: frames per second; crf: the quality; codec: ffmpeg's video encoder.

    Returns:
        The number of frames written.
    """
    fps = _check_positive("fps", fps)
    if isinstance(crf, bool) or not isinstance(crf, (int, np.integer)) or not 0 <= crf <= 63:
        raise InputError(f"crf must be an integer 0..51 (63 for AV1/VP9), got {crf!r}")
    path = Path(path)
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise InputError(f"{path}: no frames to write")
    first = _check_frame(path, 0, first)
    height, width = first.shape[:2]
    rate = Fraction(fps).limit_denominator(1_000_000)

    out_kwargs = _encoder_options(codec, crf, path)
    with (
        atomic_path(path) as tmp,
        tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as err,
    ):
        stream = ffmpeg.input(
            "pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=str(rate)
        )
        if width % 2 or height % 2:
            stream = stream.filter("pad", "ceil(iw/2)*2", "ceil(ih/2)*2", 0, 0)
        args = _command(
            stream.output(_local(tmp), **out_kwargs), extra_global=("-y", "-loglevel", "error")
        )
        args.remove("-nostdin")  # the frames come in on stdin
        try:
            proc = subprocess.Popen(
                args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err
            )
        except FileNotFoundError as exc:
            raise InputError(f"{args[0]}: ffmpeg program not found (set SAM2PAL_FFMPEG)") from exc
        count, code = _feed_frames(proc, path, first, iterator)
        if code != 0:
            err.seek(0)
            detail = _useful_line(err.read().splitlines())
            raise InputError(f"{path}: ffmpeg could not encode the video (ffmpeg: {detail})")
    return count


def _encoder_options(codec: str, crf: int, path: Path) -> dict:
    """ffmpeg's output options for `write_video`: codec, yuv420p, quality, faststart."""
    out_kwargs: dict = {"vcodec": codec, "pix_fmt": "yuv420p"}
    if codec in _CRF_CODECS:
        out_kwargs["crf"] = int(crf)
        if codec == "libvpx-vp9":
            out_kwargs["b:v"] = 0  # constant quality needs the bitrate cap off
    else:
        out_kwargs["q:v"] = 2
    if path.suffix.lower() in _FASTSTART_SUFFIXES:
        out_kwargs["movflags"] = "+faststart"
    return out_kwargs


def _feed_frames(proc, path: Path, first: np.ndarray, iterator) -> tuple[int, int]:
    """Write `first` and then the frames of `iterator` (each checked) to ffmpeg's stdin
    and wait for it to finish; returns (frames written, ffmpeg's exit code). ffmpeg is
    killed if anything goes wrong meanwhile."""
    assert proc.stdin is not None
    count = 0
    try:
        frame = first
        while frame is not None:
            try:
                proc.stdin.write(frame.tobytes())
            except BrokenPipeError:
                break  # ffmpeg quit; its log says why
            count += 1
            frame = next(iterator, None)
            if frame is not None:
                frame = _check_frame(path, count, frame, first.shape)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        with contextlib.suppress(BrokenPipeError, OSError):
            proc.stdin.close()
    return count, code
