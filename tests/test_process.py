import json
import subprocess
import sys

import numpy as np
import pytest

import qwen_vl_utils as q
from qwen_vl_utils import InvalidOptionError, process_vision_info

from media import gradient, make_video

PUBLIC = [
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
    "QwenVLError",
    "SPATIAL_MERGE_SIZE",
    "SourceError",
    "SourceNotAllowedError",
    "SourceNotFoundError",
    "SourceTooLargeError",
    "VIDEO_MAX_TOKEN_NUM",
    "VIDEO_MIN_TOKEN_NUM",
    "VIDEO_READER_BACKENDS",
    "__version__",
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
