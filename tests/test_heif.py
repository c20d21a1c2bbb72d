"""HEIC/HEIF (iPhone photos) through the optional pillow-heif decoder, and AVIF through Pillow: sniffed from the
bytes, decoded upright, counted, and a clear install hint when the extra is missing. Files written by the tests."""

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, features

import qwen_vl_utils as q
from qwen_vl_utils import DecodeError, fetch_image
from qwen_vl_utils.sources._resolve import sniff_media

from conftest import REQUIRE
from media import EXIF_STORED, exif_stored

if not REQUIRE:
    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif is not installed: pip install '.[heif]'")
else:  # CI: the heif extra must be installed, a missing one fails
    import pillow_heif

H, W = 64, 96


def _display() -> np.ndarray:
    """The upright picture: asymmetric blocks, so every flip and turn shows."""
    d = np.full((H, W, 3), 128, np.uint8)
    d[: H // 2, : W // 3] = (255, 0, 0)
    d[H // 2 :, 2 * W // 3 :] = (0, 0, 255)
    d[:8, :] = (0, 255, 0)
    return d


def _encode(fmt: str, orientation: int = 1) -> bytes:
    """HEIF through pillow-heif's own writer (its Pillow plugin is left unregistered: registering it is the
    library's job), AVIF through Pillow's."""
    stored, exif = exif_stored(_display(), orientation)
    buf = io.BytesIO()
    if fmt == "HEIF":
        pillow_heif.from_pillow(stored).save(buf, quality=95, exif=exif.tobytes())
    else:
        stored.save(buf, format=fmt, exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def _mean_diff(img: Image.Image, expected: np.ndarray) -> float:
    return float(np.abs(np.asarray(img, np.int16) - expected.astype(np.int16)).mean())


def test_heic_is_sniffed_as_an_image():
    data = _encode("HEIF")
    assert data[4:12] == b"ftypheic"
    assert sniff_media(data[:64]) == "image"
    with pytest.raises(DecodeError, match="still image"):
        q.fetch_video({"video": data})


@pytest.mark.parametrize("brand", [b"heic", b"heix", b"hevc", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"])
def test_every_heif_brand_is_an_image(brand):
    head = b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x00\x00mif1" + b"\x00" * 40
    assert sniff_media(head) == "image"
    assert sniff_media(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2") == "video"


@pytest.mark.parametrize("orientation", [1, *EXIF_STORED])
def test_heic_comes_out_upright(orientation):
    data = _encode("HEIF", orientation)
    ele = {"image": data, "min_pixels": 1, "max_pixels": 10**7}
    out = fetch_image(ele, image_patch_size=16)  # 96x64: already multiples of 32
    assert out.mode == "RGB" and out.size == (W, H)
    assert _mean_diff(out, _display()) < 3, "upright, and the right picture (lossy HEVC only)"
    assert q.count_visual_tokens(ele, 16) == (H // 32) * (W // 32)


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow build cannot read AVIF")
@pytest.mark.parametrize("orientation", [1, *EXIF_STORED])
def test_avif_comes_out_upright(orientation):
    data = _encode("AVIF", orientation)
    assert sniff_media(data[:64]) == "image"
    ele = {"image": data, "min_pixels": 1, "max_pixels": 10**7}
    out = fetch_image(ele, image_patch_size=16)
    assert out.size == (W, H)
    assert _mean_diff(out, _display()) < 6
    assert q.count_visual_tokens(ele, 16) == (H // 32) * (W // 32)


def test_heic_from_every_source_kind(tmp_path, server):
    data = _encode("HEIF", 6)
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(data)
    expected = np.asarray(fetch_image({"image": data}))
    for value in (
        str(path),
        path.as_uri(),
        server.add_bytes("/photo.heic", data, "image/heic"),
        "data:image/heic;base64," + base64.b64encode(data).decode(),
        io.BytesIO(data),
    ):
        assert np.array_equal(np.asarray(fetch_image({"image": value})), expected), value
    big = fetch_image({"image": data, "min_pixels": 500 * 28 * 28})  # resized like any image
    assert big.width % 28 == 0 and big.height % 28 == 0 and big.width * big.height >= 500 * 28 * 28
    images, _ = q.process_vision_info([{"role": "user", "content": [{"image": str(path)}, {"image": data}]}])
    assert all(np.array_equal(np.asarray(im), expected) for im in images)


def test_truncated_heic_is_a_decode_error():
    data = _encode("HEIF")
    for bad in (data[: len(data) // 2], data[:200]):
        with pytest.raises(DecodeError):
            fetch_image({"image": bad})


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_missing_extra_gives_the_install_hint(tmp_path):
    path = tmp_path / "IMG_0002.HEIC"
    path.write_bytes(_encode("HEIF"))
    code = f"""
import json, sys
sys.modules["pillow_heif"] = None  # as if the heif extra were not installed
import qwen_vl_utils as q
result = {{}}
for name, call in (("fetch", q.fetch_image), ("count", q.count_visual_tokens)):
    try:
        call({{"image": {str(path)!r}}})
        result[name] = "no error"
    except q.DecodeError as exc:
        result[name] = str(exc)
print(json.dumps(result))
"""
    result = _run(code)
    for name in ("fetch", "count"):
        assert "IMG_0002.HEIC" in result[name] and "HEIC/HEIF" in result[name], result
        assert "pip install 'qwen-vl-utils[heif]'" in result[name], result


def test_pillow_heif_is_loaded_only_when_a_heif_file_arrives(tmp_path):
    heic, png = tmp_path / "a.heic", tmp_path / "b.png"
    heic.write_bytes(_encode("HEIF"))
    Image.fromarray(_display()).save(png)
    code = f"""
import json, sys
import qwen_vl_utils as q
loaded = ["pillow_heif" in sys.modules]
q.fetch_image({{"image": {str(png)!r}}})
loaded.append("pillow_heif" in sys.modules)
q.fetch_image({{"image": {str(heic)!r}}})
loaded.append("pillow_heif" in sys.modules)
print(json.dumps(loaded))
"""
    assert _run(code) == [False, False, True]
