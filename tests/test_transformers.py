"""The real client: transformers' Qwen3-VL video processor and Qwen2-VL image processor take our output as is."""

import pytest

import qwen_vl_utils as q

from media import gradient, load_script, make_video

torch = pytest.importorskip("torch")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install transformers)", exc_type=ImportError
)


@pytest.fixture(scope="module")
def video_processor():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2)


@pytest.fixture(scope="module")
def timestamps():
    """The processor's own timestamp computation (Qwen3VLProcessor._calculate_timestamps)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    proc = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    return lambda meta: proc._calculate_timestamps(list(meta["frames_indices"]), meta["fps"], 2)


def _metadata(video, meta):
    """transformers' VideoMetadata of a fetched video and the metadata dict it came with."""
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(
        total_num_frames=meta["total_num_frames"],
        fps=meta["fps"],
        frames_indices=list(meta["frames_indices"]),
        width=video.shape[3],
        height=video.shape[2],
    )


def _process(video_processor, video, meta):
    md = _metadata(video, meta)
    # transformers 5 does RGB conversion and normalisation with torchvision, which cannot load next to a CPU
    # torch; they change pixel values only, and this test checks the grid and the timestamps
    return video_processor(
        videos=[video],
        video_metadata=[md],
        do_resize=False,
        do_sample_frames=False,
        do_convert_rgb=False,
        do_rescale=False,
        do_normalize=False,
        return_metadata=True,
    )


@pytest.mark.parametrize(
    "extra",
    [{}, {"fps": 4}, {"video_start": 0.5, "video_end": 1.5}, {"nframes": 6, "max_pixels": 200 * 32 * 32}],
)
def test_qwen3_vl_video_grid_and_timestamps(tmp_path, video_processor, timestamps, extra):
    path = make_video(tmp_path / "v.mp4", frames=48, width=320, height=180)
    video, meta = q.fetch_video({"video": str(path), **extra}, image_patch_size=16, return_video_metadata=True)
    out = _process(video_processor, video, meta)
    t, _, h, w = video.shape
    assert out["video_grid_thw"].tolist() == [[t // 2, h // 16, w // 16]]
    assert out["pixel_values_videos"].shape[0] == (t // 2) * (h // 16) * (w // 16)
    ts = timestamps(meta)
    assert q.video.qwen3_timestamps(meta["frames_indices"], meta["fps"]) == pytest.approx(ts)
    expected = [(meta["frames_indices"][i] + meta["frames_indices"][i + 1]) / 2 / meta["fps"] for i in range(0, t, 2)]
    assert ts == pytest.approx(expected)
    if "video_start" in extra:
        assert ts[0] >= 0.5 - 1 / 24 and ts[-1] <= 1.5 + 1 / 24, "window timestamps are absolute"
    assert q.count_visual_tokens({"video": str(path), **extra}, 16) == t // 2 * (h // 32) * (w // 32)


def test_qwen3_vl_frame_list_timestamps(tmp_path, video_processor, timestamps):
    frames = [gradient(128, 96) for _ in range(4)]
    ele = {"video": frames, "timestamps": [0.0, 0.5, 2.0, 2.6]}
    video, meta = q.fetch_video(ele, image_patch_size=16, return_video_metadata=True)
    out = _process(video_processor, video, meta)
    assert out["video_grid_thw"].tolist()[0][0] == 2
    assert timestamps(meta) == pytest.approx([0.25, 2.3])
    video, meta = q.fetch_video({"video": frames, "sample_fps": 2.0}, 16, return_video_metadata=True)
    assert timestamps(meta) == pytest.approx([0.25, 1.25])


def test_qwen2_vl_image_processor(tmp_path):
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    except ImportError:  # transformers 5 without a loadable torchvision: the same processor on Pillow
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as Qwen2VLImageProcessor,
        )

    processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2)
    path = tmp_path / "i.png"
    gradient(333, 211).save(path)
    images, _ = q.process_vision_info(
        [{"role": "user", "content": [{"type": "image", "image": str(path)}]}], image_patch_size=16
    )
    out = processor(images=images, do_resize=False, return_tensors="pt")
    w, h = images[0].size
    assert out["image_grid_thw"].tolist() == [[1, h // 16, w // 16]]
    assert q.count_visual_tokens({"image": str(path)}, 16) == (h // 32) * (w // 32)


@pytest.mark.parametrize("window", [{}, {"video_start": 2.0, "video_end": 6.0}, {"video_start": 5.5}])
def test_qwen25_vl_second_per_grid_ts_and_qwen3_vl_timestamps_are_right_for_windows(tmp_path, window):
    """transformers 5's Qwen2.5-VL processor derives ``second_per_grid_ts`` from the metadata
    (``sampled_fps = len(frames_indices) / total_num_frames * fps``): with the whole file's frame count a window's
    rate came out halved (issue 26). The real processor is called on our output and metadata."""
    from test_dataset import TEMPLATE, make_tokenizer, real_processor

    path = make_video(tmp_path / "v.mp4", frames=240, width=160, height=96, fps=30)
    ele = {"video": str(path), **window}
    (video, meta), sample_fps = q.fetch_video(ele, return_video_metadata=True, return_video_sample_fps=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path / "tok")))
    md = _metadata(video, meta)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]}]
    kwargs = {"do_resize": False, "do_convert_rgb": False, "do_rescale": False, "do_normalize": False}
    kwargs.update(do_sample_frames=False, return_metadata=True)
    proc = real_processor(tok, 14)
    text = tok.apply_chat_template(messages, tokenize=False, chat_template=TEMPLATE)
    out = proc(text=[text], videos=[video], video_metadata=[md], **kwargs)
    assert out["second_per_grid_ts"][0] == pytest.approx(2 / sample_fps)
    start = window.get("video_start", 0.0)
    times = q.video.qwen3_timestamps(meta["frames_indices"], meta["fps"])
    assert times[0] >= start - 1 / 30  # Qwen3-VL's timestamps: absolute, from frames_indices / fps


def test_the_readme_recipes_are_right_with_transformers_4_57(tmp_path):
    """transformers 4.57's own processors (run by ``scripts/transformers/recipes.py`` in a virtualenv of their
    own, recorded in ``tests/goldens/transformers/recipes-4.57.json``) were given what the README's recipes give
    them: the library still gives exactly that, and what those processors made of it is right: Qwen2.5-VL's
    ``second_per_grid_ts`` is ``temporal_patch_size / fps`` of the frames' real rate (from ``video_kwargs``:
    4.57 does not read metadata), and Qwen3-VL's timestamps are the frames' real times, windows included."""
    import json

    recipes = load_script("scripts/transformers/recipes.py")
    golden = json.loads(recipes.GOLDEN.read_text())
    assert golden["transformers"].startswith("4.57") and golden["video"] == recipes.VIDEO
    video = str(recipes.make_video(tmp_path / "v.mp4"))
    assert len(golden["cases"]) == len(recipes.CASES) * len(recipes.RECIPES)
    for case in golden["cases"]:
        frames, metadata, kwargs = recipes.fetch(video, case["recipe"], case["keys"])
        assert kwargs == pytest.approx(case["kwargs"]) and metadata == case["metadata"], case["case"]
        t, _, h, w = frames.shape
        patch = recipes.RECIPES[case["recipe"]]
        got = case["output"]
        assert got["video_grid_thw"] == [[t // 2, h // patch, w // patch]]
        if case["recipe"] == "qwen2.5-vl":
            assert got["second_per_grid_ts"] == pytest.approx([2 / kwargs["fps"][0]], rel=1e-6)
        else:
            times = q.video.qwen3_timestamps(metadata["frames_indices"], metadata["fps"])
            assert got["timestamps"] == [float(f"{x:.1f}") for x in times], case["case"]
            first = case["keys"].get("video_start", 0.0)
            assert got["timestamps"][0] >= first  # a window's times are the frames' own, not from 0
