"""One serving measurement in a fresh process: ``python -P serving_worker.py '<json spec>'``.

Runs the spec's requests concurrently on one event loop, either through this library's ``aprocess_vision_info``
(mode "async") or through ``asyncio.to_thread(process_vision_info)`` on the default executor (mode
"to_thread", what a service does with qwen-vl-utils 0.0.14). Prints one JSON line: total seconds, each
request's latency, peak RSS and the shapes of the first request's outputs (to check the runs agree).
"""

import asyncio
import json
import sys
import time


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _shapes(result) -> list:
    images, videos = result[:2]
    out = [list(im.size) for im in images or []]
    for v in videos or []:
        tensor = v[0] if isinstance(v, tuple) else v
        out.append(list(tensor.shape))
    return out


async def main(spec: dict) -> dict:
    import torch  # noqa: F401 - imported before the clock starts, for both alike

    import qwen_vl_utils
    from qwen_vl_utils import vision_process as vp

    latencies = [0.0] * len(spec["requests"])
    shapes: list = []

    async def one(i: int, content: list) -> None:
        start = time.perf_counter()
        conv = [{"role": "user", "content": content}]
        if spec["mode"] == "async":
            result = await qwen_vl_utils.aprocess_vision_info(conv, image_patch_size=spec["patch"])
        else:
            result = await asyncio.to_thread(vp.process_vision_info, conv, image_patch_size=spec["patch"])
        latencies[i] = time.perf_counter() - start
        if i == 0:
            shapes.extend(_shapes(result))
        del result  # a server answers and lets go of the tensors

    start = time.perf_counter()
    await asyncio.gather(*[one(i, c) for i, c in enumerate(spec["requests"])])
    total = time.perf_counter() - start
    return {"seconds": total, "latencies": latencies, "peak_rss_mb": _peak_rss_mb(), "shapes": shapes}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))))
