"""Object stores through fsspec, against a real S3-compatible server (moto's server mode) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

import qwen_vl_utils as q
from qwen_vl_utils import FetchPolicy, SourceNotAllowedError, SourceNotFoundError
from test_remote import small_blocks, textured_video  # noqa: F401 - small_blocks: an autouse fixture

from media import gradient, image_bytes

s3fs = pytest.importorskip("s3fs", reason="the 'remote' extra (fsspec, s3fs) is not installed")
boto3 = pytest.importorskip("boto3", reason="moto[server] is not installed")
pytest.importorskip("moto.server", reason="moto[server] is not installed")
torch = pytest.importorskip("torch")

S3 = FetchPolicy(allowed_schemes=("http", "https", "file", "data", "s3"))
PNG = image_bytes(gradient(120, 80), "PNG")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """``python -m moto.server`` on 127.0.0.1; with ``setup_actions``, every request after that many is
    authenticated (IAM), as a real store's are."""

    def __init__(self, setup_actions: int | None = None) -> None:
        self.port = _free_port()
        env = {**os.environ}
        if setup_actions is not None:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(setup_actions)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, service: str, key: str = "test", secret: str = "test"):
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=key,
            aws_secret_access_key=secret,
        )

    def use(self, monkeypatch, key: str = "test", secret: str = "test") -> None:
        """Point every S3 client of this process at this server, with these credentials (the environment, as a
        user would configure it)."""
        monkeypatch.setenv("AWS_ENDPOINT_URL", self.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3fs.S3FileSystem.clear_instance_cache()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    return textured_video(tmp_path_factory.mktemp("s3") / "v.mp4")


@pytest.fixture(scope="module")
def store(video_file):
    moto = Moto()
    s3 = moto.client("s3")
    s3.create_bucket(Bucket="media-bucket")
    s3.put_object(Bucket="media-bucket", Key="img/a.png", Body=PNG)
    s3.put_object(Bucket="media-bucket", Key="vid/v.mp4", Body=video_file.read_bytes())
    yield moto
    moto.close()


def test_s3_images_and_videos_equal_local_files(store, video_file, monkeypatch):
    store.use(monkeypatch)
    img = q.fetch_image({"image": "s3://media-bucket/img/a.png"}, policy=S3)
    assert np.array_equal(np.asarray(img), np.asarray(q.fetch_image({"image": PNG})))
    calls = []
    real = s3fs.core.S3File._fetch_range  # a spy on the ranged GETs: the real method still runs

    def spy(self, start, end):
        calls.append({"start": start, "end": end})
        return real(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", spy)
    s3fs.S3FileSystem.clear_instance_cache()
    got, meta = q.fetch_video(
        {"video": "s3://media-bucket/vid/v.mp4", "nframes": 4}, return_video_metadata=True, policy=S3
    )
    ref, ref_meta = q.fetch_video({"video": str(video_file), "nframes": 4}, return_video_metadata=True)
    assert meta["frames_indices"] == ref_meta["frames_indices"] and torch.equal(got, ref)
    size = video_file.stat().st_size
    assert len(calls) > 1 and all(c["end"] - c["start"] < size for c in calls), "ranged reads"
    assert sum(c["end"] - c["start"] for c in calls) < 0.7 * size, "a sparse plan reads part of the object"


def test_s3_through_process_vision_info_and_token_counts(store, monkeypatch):
    store.use(monkeypatch)
    q.set_fetch_policy(S3)
    try:
        content = [{"image": "s3://media-bucket/img/a.png"}, {"video": "s3://media-bucket/vid/v.mp4", "nframes": 4}]
        images, videos = q.process_vision_info([{"role": "user", "content": content}])
        factor = 28
        assert q.count_visual_tokens(content[0]) == (images[0].height // factor) * (images[0].width // factor)
        t, _, h, w = videos[0].shape
        assert q.count_visual_tokens(content[1]) == (t // 2) * (h // factor) * (w // factor)
    finally:
        q.set_fetch_policy(None)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_an_object_replaced_between_ranges_is_never_spliced(store, video_file, monkeypatch, api):
    """Ranged reads of an object that was overwritten mid-read mixed the two versions' bytes: now every range
    carries the first version's ETag (If-Match) and a range of another version is a typed error."""
    store.use(monkeypatch)
    s3 = store.client("s3")
    data = video_file.read_bytes()
    key = f"vid/changing-{api}.mp4"
    s3.put_object(Bucket="media-bucket", Key=key, Body=data)
    newer = bytearray(data)
    for i in range(len(newer) // 3, len(newer) - 1024, 4096):
        newer[i] ^= 0xFF
    real, reads = s3fs.core.S3File._fetch_range, []

    def replaced_after_the_first_range(self, start, end):
        reads.append(start)
        if len(reads) == 2:
            s3.put_object(Bucket="media-bucket", Key=key, Body=bytes(newer))
        return real(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", replaced_after_the_first_range)
    ele = {"video": f"s3://media-bucket/{key}", "nframes": 8}
    with pytest.raises(q.NetworkError, match="changed while it was read.*ETag"):
        q.fetch_video(ele, policy=S3) if api == "sync" else asyncio.run(q.afetch_video(ele, policy=S3))
    assert len(reads) >= 2


def test_s3_is_refused_unless_the_policy_allows_it(store, monkeypatch):
    store.use(monkeypatch)
    with pytest.raises(SourceNotAllowedError, match="'s3' is not allowed.*remote.*allowed_schemes"):
        q.fetch_image({"image": "s3://media-bucket/img/a.png"})
    monkeypatch.setenv("QWENVL_ALLOWED_SCHEMES", "s3,http,https")
    assert q.fetch_image({"image": "s3://media-bucket/img/a.png"}).size


def test_s3_missing_object_and_bucket(store, monkeypatch):
    store.use(monkeypatch)
    with pytest.raises(SourceNotFoundError, match="missing.png"):
        q.fetch_image({"image": "s3://media-bucket/missing.png"}, policy=S3)
    with pytest.raises(SourceNotFoundError, match="no-such-bucket"):
        q.fetch_video({"video": "s3://no-such-bucket/v.mp4"}, policy=S3)


def test_s3_access_denied(video_file, monkeypatch):
    moto = Moto(setup_actions=4)  # bucket, object, user, access key; then every request is authenticated
    try:
        s3, iam = moto.client("s3"), moto.client("iam")
        s3.create_bucket(Bucket="private-bucket")
        s3.put_object(Bucket="private-bucket", Key="a.png", Body=PNG)
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]  # a user with no permission at all
        moto.use(monkeypatch, key["AccessKeyId"], key["SecretAccessKey"])
        with pytest.raises(SourceNotAllowedError, match="denied access.*credentials"):
            q.fetch_image({"image": "s3://private-bucket/a.png"}, policy=S3)
    finally:
        moto.close()


def test_without_the_remote_extra_the_error_says_what_to_install():
    code = (
        "import sys; sys.modules['fsspec'] = None; sys.modules['s3fs'] = None\n"
        "import qwen_vl_utils as q\n"
        "p = q.FetchPolicy(allowed_schemes=('s3',))\n"
        "try:\n"
        "    q.fetch_image({'image': 's3://b/a.png'}, policy=p)\n"
        "except q.InvalidOptionError as e:\n"
        "    assert \"qwen-vl-utils[remote]\" in str(e), e; print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_s3_objects_are_cached_and_validated_by_etag(store, monkeypatch, tmp_path):
    store.use(monkeypatch)
    policy = S3.replace(media_cache=str(tmp_path / "cache"))
    first = q.fetch_image({"image": "s3://media-bucket/img/a.png"}, policy=policy)
    calls = []
    real = s3fs.core.S3File._fetch_range

    def spy(self, start, end):
        calls.append(self.path)
        return real(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", spy)
    s3fs.S3FileSystem.clear_instance_cache()
    again = q.fetch_image({"image": "s3://media-bucket/img/a.png"}, policy=policy)
    assert np.array_equal(np.asarray(first), np.asarray(again)) and calls == [], "served from the cache"
    store.client("s3").put_object(Bucket="media-bucket", Key="img/a.png", Body=image_bytes(gradient(30, 20), "PNG"))
    changed = q.fetch_image({"image": "s3://media-bucket/img/a.png"}, policy=policy)
    assert changed.size != first.size and len(calls) == 1, "a new ETag: fetched again"
    store.client("s3").put_object(Bucket="media-bucket", Key="img/a.png", Body=PNG)


def test_a_store_call_that_hangs_is_bounded_by_the_deadline_and_cancellable():
    """One store call cannot be interrupted: the caller stops waiting for it at the deadline or a cancel."""
    import asyncio

    import fsspec
    from fsspec.spec import AbstractFileSystem

    class SlowFS(AbstractFileSystem):  # a real filesystem class whose endpoint answers after 4 s
        protocol = "slowfs"

        def info(self, path, **kwargs):
            return {"name": path, "size": len(PNG), "type": "file"}

        def cat_file(self, path, start=None, end=None, **kwargs):
            time.sleep(4)
            return PNG[start:end]

    fsspec.register_implementation("slowfs", SlowFS, clobber=True)
    policy = FetchPolicy(allowed_schemes=("slowfs",), image_deadline=1.0)
    start = time.monotonic()
    with pytest.raises(q.FetchTimeoutError):
        q.fetch_image({"image": "slowfs://bucket/a.png"}, policy=policy)
    assert time.monotonic() - start < 2.0

    async def cancelled() -> float:
        task = asyncio.ensure_future(q.afetch_image({"image": "slowfs://bucket/a.png"}, policy=policy))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        t = time.monotonic()
        while q.aio.stats()["downloads"]:
            await asyncio.sleep(0.02)
        return time.monotonic() - t

    assert asyncio.run(cancelled()) < 0.5
