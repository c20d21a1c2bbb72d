"""Element keys: every key the library reads rejects wrong types, out-of-range values, NaN and infinity with an
InvalidOptionError naming the key and the value, through every public function; valid spellings keep working."""

import asyncio
import math

import numpy as np
import pytest
from PIL import Image

import qwen_vl_utils as q
from qwen_vl_utils import InvalidOptionError

from media import gradient, image_bytes, make_video

torch = pytest.importorskip("torch")

PNG = image_bytes(gradient(97, 61), "PNG")
NAN, INF = float("nan"), float("inf")

# values that are never a number: strings (also of numbers), bytes, containers, bools, complex, objects
NOT_NUMBERS = ["100", "x", b"1", [1], {"v": 1}, True, False, 1j, object()]
NON_FINITE = [NAN, INF, -INF, np.float64("nan")]

# key -> (element kind, values that must be refused beyond NOT_NUMBERS and NON_FINITE)
NUMBER_KEYS = {
    "min_pixels": ("both", [-1, -0.5]),  # 0 is a valid lower bound
    "max_pixels": ("both", [-1, 0, 0.0]),
    "total_pixels": ("video", [-1, 0]),
    "resized_height": ("both", [-1, 0, 0.5]),
    "resized_width": ("both", [-1, 0, 0.5]),
    "fps": ("video", [-1, 0, 0.0]),
    "nframes": ("video", [-2, 0]),
    "min_frames": ("video", [-1, -4]),  # 0: no floor
    "max_frames": ("video", [-1, 0, 1]),  # fewer than one temporal patch
    "video_start": ("video", [-1, -0.001]),  # 0: the start of the video
    "video_end": ("video", [-1, 0]),
    "sample_fps": ("frames", [-1, 0]),
    "raw_fps": ("frames", [-1, 0]),
}
OTHER_KEYS = {
    "dtype": ("video", ["float16", "int", "", 3, 0, -1, 1.5, NAN, INF, True, [np.uint8], float, np.int16]),
    "video_reader": ("video", ["nope", "", 3, 0, -1, NAN, INF, True, ["pyav"], b"pyav"]),
    "jpeg_draft": ("image", ["false", "yes", 1, 0, -1, NAN, INF, [True], None.__class__]),
    "timestamps": (
        "frames",
        ["0,1", 5, 0, -1, NAN, INF, True, [0, "1"], [0, NAN], [0, INF], [-1, 0], [1, 0], [0, True]],
    ),
}


def _cases():
    for key, (kind, extra) in NUMBER_KEYS.items():
        for value in [*NOT_NUMBERS, *NON_FINITE, *extra]:
            yield key, kind, value
    for key, (kind, values) in OTHER_KEYS.items():
        for value in values:
            yield key, kind, value


CASES = list(_cases())


def _case_id(case):
    key, _, value = case
    return f"{key}={value!r}"[:40]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return str(make_video(tmp_path_factory.mktemp("opts") / "v.mp4", frames=24, width=64, height=48))


def _element(kind, video, key, value):
    """An element of ``kind`` that reads ``key``; resized_* comes with a valid partner."""
    if kind == "image":
        ele = {"type": "image", "image": PNG}
    elif kind == "frames":
        ele = {"type": "video", "video": [PNG, PNG]}
    else:
        ele = {"type": "video", "video": video}
    partner = {"resized_height": "resized_width", "resized_width": "resized_height"}.get(key)
    if partner:
        ele[partner] = 100
    ele[key] = value
    return ele


def _fetch(ele):
    return q.fetch_image(ele) if "image" in ele else q.fetch_video(ele)


def _process(ele):
    return q.process_vision_info([{"role": "user", "content": [ele]}])


PUBLIC = {"fetch": _fetch, "process_vision_info": _process, "count_visual_tokens": q.count_visual_tokens}


def _expand(cases):
    for key, kind, value in cases:
        kinds = ("image", "video") if kind == "both" else (kind,)
        for k in kinds:
            for name in PUBLIC:
                yield pytest.param(key, k, value, name, id=f"{name}-{k}-{_case_id((key, k, value))}")


def _shown(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return repr(value)[:30]


@pytest.mark.parametrize(("key", "kind", "value", "function"), list(_expand(CASES)))
def test_bad_values_are_refused_naming_the_key_and_value(video, key, kind, value, function):
    ele = _element(kind, video, key, value)
    with pytest.raises(InvalidOptionError) as info:
        PUBLIC[function](ele)
    message = str(info.value)
    assert f"{key}=" in message, message
    assert _shown(value) in message, message
    assert "must be" in message, message


def test_every_key_the_library_reads_is_covered():
    """The table above is the list of keys in the README's element table (and image_patch_size below)."""
    import pathlib

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("## Elements", 1)[1].split("`f = image_patch_size", 1)[0]
    documented = {
        cell.strip("` ")
        for line in table.splitlines()
        if line.startswith("| `")
        for cell in line.split("|")[1].split(",")
    }
    assert documented == set(NUMBER_KEYS) | set(OTHER_KEYS)


@pytest.mark.parametrize("value", ["14", 14.5, 0, -14, NAN, INF, True, None, [14]])
@pytest.mark.parametrize("function", ["fetch_image", "fetch_video", "process_vision_info", "count_visual_tokens"])
def test_bad_image_patch_size(video, value, function):
    with pytest.raises(InvalidOptionError, match="image_patch_size") as info:
        if function == "fetch_image":
            q.fetch_image({"image": PNG}, value)
        elif function == "fetch_video":
            q.fetch_video({"video": video}, value)
        elif function == "process_vision_info":
            q.process_vision_info([{"role": "user", "content": [{"image": PNG}]}], image_patch_size=value)
        else:
            q.count_visual_tokens({"image": PNG}, value)
    assert _shown(value) in str(info.value)


def test_bad_call_arguments_are_typed(video):
    with pytest.raises(InvalidOptionError, match="dtype='int8'"):
        q.fetch_video({"video": video}, dtype="int8")
    with pytest.raises(InvalidOptionError, match="backend=3"):
        q.fetch_video({"video": video}, backend=3)
    with pytest.raises(InvalidOptionError, match="a video element must be a dict"):
        q.fetch_video(video)
    with pytest.raises(InvalidOptionError, match="an image element must be a dict"):
        q.fetch_image(PNG)


def test_bad_environment_values_are_typed(video, monkeypatch):
    monkeypatch.setenv("QWENVL_VIDEO_DTYPE", "half")
    with pytest.raises(InvalidOptionError, match="QWENVL_VIDEO_DTYPE='half'"):
        q.fetch_video({"video": video})
    monkeypatch.delenv("QWENVL_VIDEO_DTYPE")
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", "nope")
    with pytest.raises(InvalidOptionError, match="FORCE_QWENVL_VIDEO_READER='nope'.*available: .*pyav"):
        q.fetch_video({"video": video})


def test_lone_resized_side_is_refused(video):
    for ele in ({"image": PNG, "resized_height": 100}, {"video": video, "resized_width": 100}):
        with pytest.raises(InvalidOptionError, match="needs resized_(width|height) too"):
            _fetch(ele)
        with pytest.raises(InvalidOptionError, match="needs resized"):
            q.count_visual_tokens(ele)


def test_options_fail_before_any_download(server):
    hits = []

    def handler(req):
        hits.append(req.path)
        req.send_response(200)
        req.send_header("Content-Length", str(len(PNG)))
        req.end_headers()
        req.wfile.write(PNG)

    url = server.add("/opts.png", handler)
    with pytest.raises(InvalidOptionError):
        q.fetch_image({"image": url, "max_pixels": "x"})
    with pytest.raises(InvalidOptionError):
        q.fetch_video({"video": url, "fps": "x"})
    with pytest.raises(InvalidOptionError):
        asyncio.run(q.afetch_image({"image": url, "max_pixels": "x"}))
    with pytest.raises(InvalidOptionError):
        asyncio.run(q.afetch_video({"video": url, "fps": -1}))
    assert hits == [], "a bad option is refused before the source is fetched"


# --- valid spellings keep 0.0.14's outputs ---------------------------------------------------------------------


def _same_image(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_valid_image_spellings_give_the_same_output():
    base = q.fetch_image({"image": PNG, "min_pixels": 3136, "max_pixels": 40000})
    for ele in (
        {"min_pixels": 3136.0, "max_pixels": 40000.0},
        {"min_pixels": np.int64(3136), "max_pixels": np.float32(40000)},
        {"min_pixels": 3136, "max_pixels": 40000, "resized_height": None, "jpeg_draft": None},
        {"min_pixels": 3136, "max_pixels": 40000, "jpeg_draft": np.False_},
    ):
        assert _same_image(q.fetch_image({"image": PNG, **ele}), base), ele
    sized = q.fetch_image({"image": PNG, "resized_height": 100, "resized_width": 150})
    for h, w in ((100.0, 150.0), (np.int32(100), np.float64(150)), (100.9, 150.2)):  # truncated, as 0.0.14
        assert _same_image(q.fetch_image({"image": PNG, "resized_height": h, "resized_width": w}), sized), (h, w)
    # zero is a valid lower bound: the default budget's result for an image above it
    assert _same_image(q.fetch_image({"image": PNG, "min_pixels": 0}), q.fetch_image({"image": PNG}))


def test_valid_video_spellings_give_the_same_output(video):
    ref, meta = q.fetch_video({"video": video, "fps": 4, "min_frames": 2}, return_video_metadata=True)
    for extra in (
        {"fps": 4.0, "min_frames": 2.0},
        {"fps": np.float32(4), "min_frames": np.int64(2)},
        {"fps": 4, "min_frames": 2, "video_start": 0},
        {"fps": 4, "min_frames": 2, "nframes": None, "max_frames": None, "dtype": None, "video_reader": None},
        {"fps": 4, "min_frames": 2, "dtype": np.float32, "video_reader": " PyAV "},
        {"fps": 4, "min_frames": 2, "dtype": torch.float32},
        {"fps": 4, "min_frames": 0},  # 0: no floor; 1 s at 4 fps is already 4 frames
    ):
        out, m = q.fetch_video({"video": video, **extra}, return_video_metadata=True)
        assert torch.equal(out, ref) and m["frames_indices"] == meta["frames_indices"], extra
    assert q.fetch_video({"video": video, "dtype": "torch.UINT8"}).dtype == torch.uint8
    framed = q.fetch_video({"video": [PNG, PNG], "timestamps": [0, 0]}, return_video_metadata=True)[1]
    assert framed["frames_indices"] == [0, 0], "equal timestamps are non-decreasing"


def test_huge_video_frames_are_refused_before_decoding(tmp_path, monkeypatch):
    """min_pixels wins over every other video budget (as in 0.0.14): only the decompression-bomb limit stops
    {"min_pixels": 1e9} from allocating gigabytes for a server that takes untrusted messages."""
    from qwen_vl_utils import SourceTooLargeError
    from qwen_vl_utils.backends import _pyav

    from media import make_video

    path = make_video(tmp_path / "v.mp4", frames=24)
    monkeypatch.setattr(_pyav, "read", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
    for call in (q.fetch_video, q.count_visual_tokens):
        with pytest.raises(SourceTooLargeError, match="max_image_pixels"):
            call({"video": str(path), "min_pixels": 10**9})
    frames = [np.zeros((8, 8, 3), np.uint8)] * 2
    with pytest.raises(SourceTooLargeError, match="max_image_pixels"):
        q.fetch_video({"video": frames, "min_pixels": 10**9})


@pytest.mark.parametrize("key", ["fps", "sample_fps", "raw_fps"])
def test_rates_beyond_any_video_are_refused(key):
    frames = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(q.InvalidOptionError, match=f"{key}.*<= 1e"):
        q.fetch_video({"video": frames, key: 1e308})


# --- checked once, where the element enters ---------------------------------------------------------------------


class _Counting(dict):
    """An element that counts the reads of each key."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = {}

    def get(self, key, default=None):
        self.reads[key] = self.reads.get(key, 0) + 1
        return super().get(key, default)

    def __getitem__(self, key):
        self.reads[key] = self.reads.get(key, 0) + 1
        return super().__getitem__(key)


def _stream_first_chunk(ele):
    with q.stream_video(ele, 1.0) as stream:
        return next(stream)


ONCE_CALLS = {
    "fetch_video": lambda ele: q.fetch_video(ele, return_video_metadata=True),
    "fetch_image": q.fetch_image,
    "count_visual_tokens": q.count_visual_tokens,
    "process_vision_info": _process,
    "stream_video": _stream_first_chunk,
}


@pytest.mark.parametrize(
    ("call", "form", "keys"),
    [
        ("fetch_video", "file", {"fps": 4, "min_frames": 2, "max_pixels": 150000, "video_end": 0.9}),
        ("fetch_video", "frames", {"sample_fps": 3, "min_pixels": 3000, "max_pixels": 20000}),
        ("fetch_video", "array", {"fps": 3, "min_pixels": 3000, "max_pixels": 20000, "dtype": "uint8"}),
        ("count_visual_tokens", "file", {"nframes": 4, "total_pixels": 90000, "video_start": 0.1}),
        ("count_visual_tokens", "frames", {"fps": 3, "min_pixels": 3000, "max_pixels": 20000}),
        ("count_visual_tokens", "image", {"min_pixels": 3136, "max_pixels": 40000}),
        ("fetch_image", "image", {"min_pixels": 3136, "max_pixels": 40000, "jpeg_draft": False}),
        ("process_vision_info", "file", {"fps": 4, "max_pixels": 150000}),
        ("process_vision_info", "image", {"resized_height": 56, "resized_width": 84}),
        ("stream_video", "file", {"fps": 2, "max_pixels": 150000, "video_start": 0.0}),
    ],
)
def test_each_option_is_read_once_per_call(video, call, form, keys):
    """An element's options are checked where it enters and travel inward as checked values: each key is read
    exactly once per call (the video path read some keys six times: in fetch_video, decode_video, plan_frames,
    smart_nframes, video_frame_size and the frame-list metadata)."""
    sources = {
        "file": {"video": video},
        "frames": {"video": [PNG, PNG, PNG]},
        "array": {"video": np.zeros((3, 32, 48, 3), np.uint8)},
        "image": {"image": PNG},
    }
    ele = _Counting({"type": "image" if form == "image" else "video", **sources[form], **keys})
    ONCE_CALLS[call](ele)
    assert {key: ele.reads.get(key, 0) for key in keys} == dict.fromkeys(keys, 1)
