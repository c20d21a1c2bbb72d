import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import qwen_vl_utils as q
from qwen_vl_utils import InvalidOptionError, process_vision_info

from media import gradient, make_video

PUBLIC = [
    "audio_token_count",
    "fetch_audio",
    "process_audio_info",
    "process_mm_info",
    "AspectRatioError",
    "BackendFallbackWarning",
    "DecodeError",
    "FPS",
    "FPS_MAX_FRAMES",
    "FPS_MIN_FRAMES",
    "FRAME_FACTOR",
    "FetchPolicy",
    "FetchTimeoutError",
    "IMAGE_MAX_TOKEN_NUM",
    "IMAGE_MIN_TOKEN_NUM",
    "InvalidOptionError",
    "MAX_RATIO",
    "MODEL_SEQ_LEN",
    "NetworkError",
    "OverloadedError",
    "QwenVLError",
    "SPATIAL_MERGE_SIZE",
    "SourceError",
    "SourceNotAllowedError",
    "SourceNotFoundError",
    "SourceTooLargeError",
    "VideoChunk",
    "VIDEO_MAX_TOKEN_NUM",
    "VIDEO_MIN_TOKEN_NUM",
    "VIDEO_READER_BACKENDS",
    "__version__",
    "acount_visual_tokens",
    "afetch_image",
    "afetch_video",
    "aprocess_vision_info",
    "ceil_by_factor",
    "count_visual_tokens",
    "extract_vision_info",
    "fetch_image",
    "fetch_video",
    "floor_by_factor",
    "get_fetch_policy",
    "get_video_reader_backend",
    "process_vision_info",
    "round_by_factor",
    "set_fetch_policy",
    "smart_nframes",
    "smart_resize",
    "stream_video",
]


def test_public_api_is_pinned():
    assert sorted(q.__all__, key=str.lower) == sorted(PUBLIC, key=str.lower)
    for name in q.__all__:
        assert hasattr(q, name), name


def test_0014_module_path_and_constants():
    from qwen_vl_utils.vision_process import (  # noqa: F401 - the import itself is the test
        FPS_MAX_FRAMES,
        MODEL_SEQ_LEN,
        VIDEO_READER_BACKENDS,
        extract_vision_info,
        fetch_image,
        fetch_video,
        get_video_reader_backend,
        process_vision_info,
        smart_nframes,
        smart_resize,
    )

    assert (q.MAX_RATIO, q.SPATIAL_MERGE_SIZE, q.IMAGE_MIN_TOKEN_NUM, q.IMAGE_MAX_TOKEN_NUM) == (200, 2, 4, 16384)
    assert (q.VIDEO_MIN_TOKEN_NUM, q.VIDEO_MAX_TOKEN_NUM, q.FPS_MIN_FRAMES, q.FPS_MAX_FRAMES) == (128, 768, 4, 768)


def test_import_loads_no_optional_backend_or_torch():
    code = (
        "import sys, json, qwen_vl_utils\n"
        "print(json.dumps([m for m in ('torch', 'av', 'decord', 'torchcodec', 'torchvision', 'requests')"
        " if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == []


def test_model_seq_len_from_environment():
    code = "import qwen_vl_utils as q; print(q.MODEL_SEQ_LEN)"
    env = {"MODEL_SEQ_LEN": "32000", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.strip() == "32000"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("pv")
    paths = {}
    for i, size in enumerate([(300, 200), (64, 500), (128, 128)]):
        paths[f"img{i}"] = d / f"img{i}.png"
        gradient(*size).save(paths[f"img{i}"])
    paths["video"] = make_video(d / "v.mp4", frames=48)
    return paths


def _conv(*content):
    return [{"role": "user", "content": [*content, {"type": "text", "text": "Describe."}]}]


def test_single_conversation_images_and_video(media):
    conv = _conv(
        {"type": "image", "image": str(media["img0"])},
        {"type": "video", "video": str(media["video"]), "nframes": 4},
        {"type": "image", "image": str(media["img1"])},
    )
    images, videos, kwargs = process_vision_info(conv, return_video_kwargs=True)
    assert [im.size for im in images] == [q.fetch_image({"image": str(media[k])}).size for k in ("img0", "img1")]
    assert len(videos) == 1 and videos[0].shape[0] == 4
    assert kwargs == {"do_sample_frames": False, "fps": [pytest.approx(4 / 48 * 24)]}


def test_batched_conversations_keep_order(media):
    order = ["img2", "img0", "img1", "img0", "img2"]
    batch = [_conv({"type": "image", "image": str(media[k])}) for k in order]
    batch.append([{"role": "user", "content": "just text"}])
    images, videos = process_vision_info(batch)
    assert videos is None
    expected = [np.asarray(q.fetch_image({"image": str(media[k])})) for k in order]
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(images, expected))


def test_text_only_and_metadata_mode(media):
    assert process_vision_info([{"role": "user", "content": "hi"}]) == (None, None)
    assert process_vision_info(_conv()) == (None, None)
    conv = _conv({"type": "video", "video": str(media["video"])})
    images, videos, kwargs = process_vision_info(
        conv, return_video_kwargs=True, return_video_metadata=True, image_patch_size=16
    )
    assert images is None and kwargs == {"do_sample_frames": False}
    video, meta = videos[0]
    assert set(meta) == {"fps", "frames_indices", "total_num_frames", "video_backend"}
    assert video.shape[-1] % 32 == 0


def test_bad_elements_are_typed():
    with pytest.raises(InvalidOptionError, match="needs an 'image'"):
        process_vision_info(_conv({"type": "image"}))
    with pytest.raises(InvalidOptionError):
        process_vision_info("not a conversation")


def test_count_visual_tokens_matches_outputs(media):
    for patch in (14, 16):
        f = patch * 2
        ele = {"image": str(media["img0"])}
        img = q.fetch_image(ele, patch)
        assert q.count_visual_tokens(ele, patch) == (img.height // f) * (img.width // f)
        for vele in (
            {"video": str(media["video"])},
            {"video": str(media["video"]), "nframes": 6, "max_pixels": 160 * f * f},
            {"video": [str(media["img2"])] * 3},
        ):
            video = q.fetch_video(vele, patch)
            t, _, h, w = video.shape
            assert q.count_visual_tokens(vele, patch) == -(-t // 2) * (h // f) * (w // f)


# --- count_visual_tokens: every video form fetch_video accepts, without decoding -------------------------------


class Decoded(BaseException):
    """Not an Exception: no ``except Exception`` in the library can swallow it."""


@pytest.fixture
def no_decoding(monkeypatch):
    """Every way the library decodes or converts pixels raises while this is active: backends' reads, the frame
    reader and resizer, PIL's decoders (lazy opens and header reads still work), the RGB conversion, and the
    per-frame conversion of decoded arrays. The video probe (PyAV: headers, and one frame for the rotation) is
    allowed: it is what the count is computed from."""
    from PIL import ImageFile

    from qwen_vl_utils import backends, image, video

    def boom(*args, **kwargs):
        raise Decoded("pixels were decoded while counting tokens")

    for name in backends.BACKENDS:
        try:
            module = backends.load_backend(name)
        except InvalidOptionError:
            continue
        monkeypatch.setattr(module, "read", boom)
    for module, names in (
        (video, ("_read_frames", "_resize", "decode_rgb", "_array_frames", "array_to_pil", "_load_frame")),
        (image, ("decode_rgb", "to_rgb")),  # (a frame list's first frame may be an array: wrapping it is allowed)
    ):
        for name in names:
            monkeypatch.setattr(module, name, boom)
    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    monkeypatch.setattr(Image.Image, "load", boom)


def _expected_tokens(video, patch):
    f = patch * 2
    t, _, h, w = video.shape
    return -(-t // 2) * (h // f) * (w // f)


@pytest.fixture(scope="module")
def video_forms(media, server):
    import base64
    import io

    pytest.importorskip("torch")
    path = media["video"]
    data = path.read_bytes()
    decoded = q.fetch_video({"video": str(path), "nframes": 6}, 14, dtype="uint8")  # T,3,H,W uint8
    frames_png = [str(media["img2"])] * 3
    return {
        "path": str(path),
        "pathlib": path,
        "file_uri": path.as_uri(),
        "url": server.add_bytes("/count.mp4", data, "video/mp4"),
        "data_uri": "data:video/mp4;base64," + base64.b64encode(data).decode(),
        "bytes": data,
        "filelike": lambda: io.BytesIO(data),
        "frame_paths": frames_png,
        "frame_pils": [gradient(300, 200)] * 5,
        "frame_arrays": [np.asarray(gradient(300, 200))] * 2,
        "frame_bytes": [media["img0"].read_bytes()] * 4,
        "numpy_tchw": decoded.numpy(),
        "numpy_thwc": decoded.permute(0, 2, 3, 1).numpy(),
        "numpy_thw1": decoded[:, :1].permute(0, 2, 3, 1).contiguous().numpy(),
        "torch_tchw": decoded,
        "torch_thwc": decoded.permute(0, 2, 3, 1),
        "torch_odd": decoded[:5],  # padded to 6 frames
        "numpy_one": decoded[:1].numpy(),  # one frame: 2 out
    }


OPTION_SETS = {  # pixel budgets in tokens (f*f pixels each)
    "default": {},
    "max": {"max_pixels": 160},
    "min-max": {"min_pixels": 300, "max_pixels": 400},
    "resized": {"resized_height": 120, "resized_width": 90},
    "total": {"total_pixels": 20 * 4, "min_pixels": 4},
}


FORMS = [
    "path",
    "pathlib",
    "file_uri",
    "url",
    "data_uri",
    "bytes",
    "filelike",
    "frame_paths",
    "frame_pils",
    "frame_arrays",
    "frame_bytes",
    "numpy_tchw",
    "numpy_thwc",
    "numpy_thw1",
    "torch_tchw",
    "torch_thwc",
    "torch_odd",
    "numpy_one",
]


def _count_cases():
    """Every form with every option set and patch size; the default run takes a third of them."""
    for form in FORMS:
        for options in OPTION_SETS:
            for patch in (14, 16):
                quick = (patch, options) in ((16, "default"), (16, "total"), (14, "max"), (14, "resized"))
                marks = () if quick else (pytest.mark.slow,)
                yield pytest.param(form, options, patch, marks=marks, id=f"{form}-{options}-{patch}")


@pytest.mark.parametrize(("form", "options", "patch"), list(_count_cases()))
def test_count_visual_tokens_every_video_form(video_forms, form, options, patch, monkeypatch, request):
    value = video_forms[form]
    f = patch * 2
    options = {k: v if k.startswith("resized") else v * f * f for k, v in OPTION_SETS[options].items()}
    ele = {"type": "video", "video": value() if callable(value) else value, **options}
    expected = _expected_tokens(q.fetch_video(ele, patch), patch)
    ele = {**ele, "video": value() if callable(value) else value}
    request.getfixturevalue("no_decoding")
    assert q.count_visual_tokens(ele, patch) == expected


def test_count_rejects_what_fetch_video_rejects(monkeypatch):
    torch = pytest.importorskip("torch")
    for value in (
        np.zeros((0, 8, 8, 3), np.uint8),  # no frames
        np.zeros((2, 8, 8, 3), np.float32),  # not uint8
        torch.zeros((2, 8, 8, 3)),
        np.zeros((8, 8, 3), np.uint8),  # one image, not a video
        np.zeros((2, 8, 8, 2), np.uint8),  # two channels
        [],
    ):
        with pytest.raises(InvalidOptionError) as fetched:
            q.fetch_video({"video": value})
        with pytest.raises(InvalidOptionError) as counted:
            q.count_visual_tokens({"video": value})
        assert str(counted.value) == str(fetched.value)


def test_counting_does_not_decode_images(media, tmp_path, request):
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    gradient(300, 120).save(rotated, exif=exif)
    late_png = tmp_path / "exif.png"
    gradient(120, 300).save(late_png, exif=exif)
    cases = [
        ({"image": str(media["img0"])}, 14),
        ({"image": str(media["img1"]), "max_pixels": 50 * 32 * 32}, 16),
        ({"image": str(rotated)}, 14),
        ({"image": str(late_png), "min_pixels": 500 * 28 * 28}, 14),
        ({"image": media["img2"].read_bytes()}, 16),
    ]
    expected = []
    for ele, patch in cases:
        img = q.fetch_image(ele, patch)
        expected.append((img.height // (2 * patch)) * (img.width // (2 * patch)))
    request.getfixturevalue("no_decoding")
    assert [q.count_visual_tokens(ele, patch) for ele, patch in cases] == expected
    with pytest.raises(Decoded):  # the guard itself works
        q.fetch_image(cases[0][0])


@pytest.mark.slow
def test_missing_transformers_fails_the_run_under_require_backends(tmp_path):
    """CI sets QWENVL_REQUIRE_BACKENDS=1: a transformers that does not import fails the run instead of skipping
    the real-client tests (which is what happens without the variable)."""
    import os
    from pathlib import Path

    broken = tmp_path / "site" / "transformers"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('transformers is broken here (test)')\n")
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken.parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_transformers.py")]
    env.pop("QWENVL_REQUIRE_BACKENDS", None)
    relaxed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tests.parent)
    assert relaxed.returncode in (0, 5) and "1 skipped" in relaxed.stdout, relaxed.stdout[-2000:]  # 5: none ran
    strict = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "QWENVL_REQUIRE_BACKENDS": "1"},
        cwd=tests.parent,
    )
    assert strict.returncode == pytest.ExitCode.USAGE_ERROR, strict.stdout[-2000:]
    assert "transformers (the real-client tests)" in strict.stdout + strict.stderr
