import base64
import io
import pathlib
import urllib.parse
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import qwen_vl_utils as q
from qwen_vl_utils import (
    AspectRatioError,
    DecodeError,
    FetchPolicy,
    InvalidOptionError,
    SourceNotFoundError,
    SourceTooLargeError,
    fetch_image,
)
from qwen_vl_utils._util import usable_cpus

from concurrency import track_decodes
from media import EXIF_STORED, exif_stored, gradient, image_bytes
from reference_0014 import fetch_image_0014


def _mean_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


# --- same pixels as 0.0.14 for ordinary inputs ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "RGBA", "I;16", "I"])
@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize(("min_tokens", "max_tokens"), [(4, 16384), (4, 8), (64, 256)])
def test_same_pixels_as_0014(tmp_path, mode, patch, min_tokens, max_tokens):
    img = gradient(311, 203, "RGBA" if mode == "RGBA" else "RGB")
    if mode in ("I;16", "I"):
        img = Image.fromarray(
            (np.asarray(img.convert("L"), np.uint16) * 257).astype(np.uint16 if mode == "I;16" else np.int32)
        )
    elif mode not in ("RGB", "RGBA"):
        img = img.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I") else "PNG"
    path = tmp_path / f"img.{fmt.lower()}"
    img.save(path, format=fmt)
    factor = patch * 2
    ele = {"image": str(path), "min_pixels": min_tokens * factor**2, "max_pixels": max_tokens * factor**2}
    ours = fetch_image(ele, image_patch_size=patch)
    ref = fetch_image_0014(Image.open(path), factor, ele["min_pixels"], ele["max_pixels"])
    assert ours.mode == "RGB"
    assert ours.size == ref.size
    assert ours.width % factor == 0 and ours.height % factor == 0
    assert np.array_equal(np.asarray(ours), np.asarray(ref))


def test_resized_height_width(tmp_path):
    path = tmp_path / "a.png"
    gradient(300, 200).save(path)
    out = fetch_image({"image": str(path), "resized_height": 100, "resized_width": 150}, image_patch_size=14)
    assert out.size == (140, 112)  # smart_resize(100, 150, 28) == (112, 140)


# --- fixes over 0.0.14 --------------------------------------------------------------------------------


def test_exif_orientation_applied(tmp_path):
    img = gradient(120, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    path = tmp_path / "o.jpg"
    img.save(path, exif=exif, quality=95)
    out = fetch_image({"image": str(path), "min_pixels": 1, "max_pixels": 10**8}, image_patch_size=14)
    assert out.height > out.width  # upright: portrait
    expected = img.transpose(Image.Transpose.ROTATE_270).resize(out.size, Image.Resampling.BICUBIC)
    assert _mean_diff(out, expected) < 4  # JPEG noise only
    assert q.count_visual_tokens({"image": str(path)}) == (out.height // 28) * (out.width // 28)


def _upright() -> np.ndarray:
    """112x56 (multiples of 28: no resize), asymmetric in both directions, so every flip and turn shows."""
    d = np.full((56, 112, 3), 90, np.uint8)
    d[:20, :30] = (250, 10, 10)
    d[36:, 80:] = (10, 10, 250)
    d[:, 50:54] = (10, 250, 10)
    return d


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", sorted(EXIF_STORED))
def test_every_exif_orientation_comes_out_upright(tmp_path, orientation, fmt):
    from PIL import ImageOps

    stored, exif = exif_stored(_upright(), orientation)
    path = tmp_path / f"o{orientation}.{fmt.lower()}"
    stored.save(path, format=fmt, exif=exif, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    # the table above, against Pillow's own reading of the EXIF rules
    shown = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    lossy = fmt in ("JPEG", "WEBP")
    assert shown.shape == _upright().shape and (lossy or np.array_equal(shown, _upright()))
    ele = {"image": str(path), "min_pixels": 4 * 28 * 28, "max_pixels": 16384 * 28 * 28}
    out = fetch_image(ele)
    assert out.size == (112, 56), "upright size, no resize"
    if lossy:
        assert _mean_diff(out, _upright()) < 4
    else:
        assert np.array_equal(np.asarray(out), _upright())
    assert q.count_visual_tokens(ele) == (56 // 28) * (112 // 28)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGBA", "PNG"), ("LA", "PNG"), ("PA", "PNG"), ("P", "PNG"), ("RGBA", "WEBP"), ("RGBA", "TIFF"), ("RGB", "PNG")],
)
def test_transparency_composited_on_white(tmp_path, mode, fmt):
    size = (56, 56)
    rgba = Image.new("RGBA", size, (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 28, 56))  # opaque blue left half
    if mode == "RGBA":
        img, kwargs = rgba, {"lossless": True} if fmt == "WEBP" else {}
    elif mode == "LA":
        img, kwargs = rgba.convert("LA"), {}
    elif mode == "PA":
        img, kwargs = rgba.convert("PA"), {}
    elif mode == "P":  # palette with a transparency key
        img = Image.new("P", size, 1)
        img.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
        img.paste(0, (0, 0, 28, 56))
        kwargs = {"transparency": 1}
    else:  # RGB with a tRNS colour key
        img = Image.new("RGB", size, (255, 0, 0))
        img.paste((0, 0, 255), (0, 0, 28, 56))
        kwargs = {"transparency": (255, 0, 0)}
    source = img  # Pillow cannot write PA files: that mode is tested as an in-memory image
    if mode != "PA":
        source = str(tmp_path / f"t.{fmt.lower()}")
        img.save(source, format=fmt, **kwargs)
    out = np.asarray(fetch_image({"image": source, "min_pixels": 56 * 56, "max_pixels": 56 * 56}))
    assert out[28, 45].tolist() == [255, 255, 255], "transparent area must be white"
    left = out[28, 5].tolist()
    expected = [29, 29, 29] if mode == "LA" else [0, 0, 255]  # LA is grayscale: blue's luminance is 29
    assert max(abs(a - b) for a, b in zip(left, expected)) < 40, f"opaque area must keep its colour, got {left}"


def test_animated_first_frame(tmp_path):
    frames = [Image.new("RGB", (56, 56), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    for fmt in ("GIF", "WEBP", "PNG"):
        path = tmp_path / f"anim.{fmt.lower()}"
        frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
        out = np.asarray(fetch_image({"image": str(path)}))
        assert out[10, 10, 0] > 200 and out[10, 10, 1] < 60, fmt


def test_decompression_bomb_is_typed(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (4000, 3000)).save(path)  # 12 MP, cheap to write
    with pytest.raises(SourceTooLargeError, match="bomb.png"):
        fetch_image({"image": str(path)}, policy=FetchPolicy(max_image_pixels=10_000_000))
    # the default limit (Pillow's error threshold) from the header: an IHDR that claims 50000x50000
    data = bytearray(image_bytes(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = (50000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    with pytest.raises(SourceTooLargeError, match="decompression"):
        fetch_image({"image": bytes(data)})


def test_extreme_ratio_is_typed(tmp_path):
    path = tmp_path / "thin.png"
    Image.new("RGB", (2010, 10)).save(path)
    with pytest.raises(AspectRatioError, match="thin.png"):
        fetch_image({"image": str(path)})


def test_truncated_and_garbage_images(tmp_path, h264):
    good = image_bytes(gradient(200, 200), "PNG")
    for data in (good[: len(good) // 2], b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 10):
        with pytest.raises(DecodeError):
            fetch_image({"image": data})
    with pytest.raises(DecodeError, match="looks like a video"):
        fetch_image({"image": str(h264)})
    with pytest.raises(DecodeError, match="empty"):
        fetch_image({"image": b""})


# --- every source kind --------------------------------------------------------------------------------


@pytest.fixture
def png(tmp_path) -> tuple:
    img = gradient(97, 61)
    path = tmp_path / "dir with space" / "pic 1%.png"
    path.parent.mkdir()
    img.save(path)
    return img, path


def _sources(img, path, server):
    data = path.read_bytes()
    url = server.add_bytes("/pic.png", data, "image/png")
    b64 = base64.b64encode(data).decode()
    arr = np.asarray(img)
    import torch

    return {
        "path": str(path),
        "pathlib": path,
        "file_uri": pathlib.Path(path).as_uri(),
        "http": url,
        "data_uri": f"data:image/png;base64,{b64}",
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
        "filelike": io.BytesIO(data),
        "pil": img,
        "numpy_hwc": arr,
        "torch_chw": torch.from_numpy(arr).permute(2, 0, 1).contiguous(),
        "torch_hwc": torch.from_numpy(arr.copy()),
    }


def test_every_source_kind_gives_the_same_image(png, server):
    img, path = png
    pytest.importorskip("torch")
    expected = np.asarray(fetch_image({"image": str(path)}))
    for kind, value in _sources(img, path, server).items():
        out = fetch_image({"image": value})
        assert np.array_equal(np.asarray(out), expected), kind
    url = server.url("/pic.png")
    assert np.array_equal(np.asarray(fetch_image({"image_url": url})), expected)
    assert np.array_equal(np.asarray(fetch_image({"type": "image_url", "image_url": {"url": url}})), expected)


def test_grayscale_array_and_misnamed_extension(tmp_path):
    gray = np.tile(np.arange(64, dtype=np.uint8), (40, 1))
    assert fetch_image({"image": gray}).mode == "RGB"
    path = tmp_path / "actually_png.jpg"
    gradient().save(path, format="PNG")
    assert fetch_image({"image": str(path)}).mode == "RGB"


def test_source_errors_name_the_input(tmp_path):
    with pytest.raises(SourceNotFoundError, match="missing.png"):
        fetch_image({"image": str(tmp_path / "missing.png")})
    with pytest.raises(FileNotFoundError):  # a builtin still catches it
        fetch_image({"image": "file://" + urllib.parse.quote(str(tmp_path / "missing.png"))})
    with pytest.raises(InvalidOptionError, match="dtype"):
        fetch_image({"image": np.zeros((10, 10, 3), np.float32)})
    with pytest.raises(InvalidOptionError, match="binary mode"), open(tmp_path / "t.txt", "w+") as f:
        fetch_image({"image": f})
    with pytest.raises(InvalidOptionError, match="no 'image'"):
        fetch_image({"type": "image"})
    long_b64 = "data:image/png;base64," + "A" * 100_001
    with pytest.raises(DecodeError) as info:
        fetch_image({"image": long_b64})
    assert len(str(info.value)) < 400, "the message must not carry the whole base64 string"


def test_jpeg_draft_is_opt_in(tmp_path):
    path = tmp_path / "big.jpg"
    gradient(2000, 1500).save(path, quality=92)
    ele = {"image": str(path), "max_pixels": 256 * 28 * 28}
    exact = fetch_image(ele)
    draft = fetch_image({**ele, "jpeg_draft": True})
    assert exact.size == draft.size
    assert 0 < _mean_diff(exact, draft) < 3


def test_decodes_in_flight_are_bounded_by_the_cores(tmp_path, monkeypatch):
    """No more CPU-bound decodes at once than slots (memory, page faults), whatever the number of callers."""
    from qwen_vl_utils import image as image_module

    assert image_module._DECODE_SLOTS.stats()["capacity"] == usable_cpus()  # by default
    q.set_fetch_policy(max_concurrent_decodes=2)  # the policy's limit governs them
    decodes = track_decodes(monkeypatch)
    paths = []
    for i in range(12):
        paths.append(str(tmp_path / f"{i}.png"))
        gradient(64 + 32 * i, 48).save(paths[-1])
    try:
        with ThreadPoolExecutor(6) as callers:  # concurrent callers: the slots are process-wide
            images = list(callers.map(lambda p: fetch_image({"image": p}), paths))
    finally:
        q.set_fetch_policy(None)
    assert [im.width for im in images] == [fetch_image({"image": p}).width for p in paths]
    assert decodes.peak == 2


def test_colon_in_a_local_file_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gradient().save("notes:v2.png")
    assert fetch_image({"image": "notes:v2.png"}).mode == "RGB"
