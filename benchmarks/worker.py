"""One benchmark measurement in a fresh process: ``python -P worker.py '<json spec>'``.

Standalone on purpose: it imports whichever ``qwen_vl_utils`` its interpreter has (this library, or
qwen-vl-utils 0.0.14 in a separate virtualenv), so both are timed by the same code. Prints one JSON line.
"""

import json
import os
import resource
import sys
import time


def _summary(video):
    """Per-frame means: enough to check that two implementations returned the same frames."""
    t = video.float()
    return [round(float(x), 3) for x in t.flatten(1).mean(1)]


def _peak_rss_mb() -> float:
    """This process's own high-water mark (ru_maxrss would include the parent's, inherited across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("backend"):
        os.environ["FORCE_QWENVL_VIDEO_READER"] = spec["backend"]  # 0.0.14 reads it at import
    import qwen_vl_utils
    from qwen_vl_utils import vision_process as vp

    ours = hasattr(qwen_vl_utils, "count_visual_tokens")
    # everything a call imports is imported before the clock starts, for both implementations alike
    import av  # noqa: F401
    import torch  # noqa: F401
    from PIL import Image

    Image.init()  # Pillow registers its format plugins on first use: import work, not decode work

    if spec.get("backend") in ("torchcodec", "decord"):
        __import__("torchcodec.decoders" if spec["backend"] == "torchcodec" else "decord")
    if ours and spec.get("backend"):
        from qwen_vl_utils.backends import load_backend

        load_backend(spec["backend"])
    result = {"ours": ours}
    start = time.perf_counter()
    if spec["case"] == "images":
        eles = [{"type": "image", "image": p, "max_pixels": spec["max_pixels"]} for p in spec["files"]]
        if spec.get("jpeg_draft"):
            for e in eles:
                e["jpeg_draft"] = True
        images, _ = vp.process_vision_info([{"role": "user", "content": eles}], image_patch_size=spec["patch"])
        result["seconds"] = time.perf_counter() - start
        result["peak_rss_mb"] = _peak_rss_mb()  # before the summary below allocates anything
        result["shapes"] = [list(im.size) for im in images]
        result["summary"] = [round(sum(im.resize((8, 8)).convert("L").getdata()) / 64, 3) for im in images]
    else:
        ele = {"video": spec["files"][0], **spec.get("ele", {})}
        kwargs = {}
        if ours and spec.get("dtype"):
            kwargs["dtype"] = spec["dtype"]
        video, meta = vp.fetch_video(ele, image_patch_size=spec["patch"], return_video_metadata=True, **kwargs)
        result["seconds"] = time.perf_counter() - start
        result["peak_rss_mb"] = _peak_rss_mb()  # before the summary below allocates anything
        result["shapes"] = list(video.shape)
        result["dtype"] = str(video.dtype)
        result["indices"] = [int(i) for i in meta["frames_indices"]]
        result["backend"] = meta.get("video_backend")
        result["summary"] = _summary(video)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
