"""serve.storage: both backends behind one interface.

The S3 backend talks over HTTP to a real S3-compatible server (moto in server mode, the
``moto_s3_endpoint`` / ``s3_bucket`` / ``s3_env`` fixtures of ``tests/fixtures_s3.py``, loaded by
``conftest.py``); nothing in-process is patched.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest

from fixtures_s3 import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY
from serve.config import StorageConfig
from serve.storage import (
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    Storage,
    StorageError,
    StoredObject,
    job_key,
    job_prefix,
    make_storage,
)
from serve.storage import s3 as s3_module
from serve.storage.base import SignedURLError

PREFIX = "svd-serve"
BAD_KEYS = ["../x", "a/../../x", "/abs/x", "a//b", "a/./b", "a/b/", "", "a\x00b", "a\\b", "t/j/\n"]


def _s3_config(endpoint: str, bucket: str, **kw) -> StorageConfig:
    kw.setdefault("region", "us-east-1")
    return StorageConfig(backend="s3", bucket=bucket, endpoint_url=endpoint, prefix=PREFIX, **kw)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return make_storage(StorageConfig(backend="local", local_dir=str(tmp_path / "root"), prefix=PREFIX))
    _, bucket = request.getfixturevalue("s3_bucket")
    return make_storage(_s3_config(request.getfixturevalue("moto_s3_endpoint"), bucket))


@pytest.fixture
def s3(s3_bucket, moto_s3_endpoint):
    """``(S3Storage, raw boto3 client, bucket)``."""
    client, bucket = s3_bucket
    return S3Storage(_s3_config(moto_s3_endpoint, bucket)), client, bucket


def _assert_clean_message(exc: BaseException, *must_contain: str) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, msg
    assert TEST_ACCESS_KEY_ID not in msg and TEST_SECRET_ACCESS_KEY not in msg, msg
    for part in must_contain:
        assert part in msg, msg
    return msg


# ------------------------------------------------------------------------------ both backends
def test_round_trip(storage):
    key = job_key("acme", "job-1", "clip.mp4")
    data = bytes(range(256)) * 5 + b"tail"
    assert not storage.exists(key)

    stored = storage.put(key, data, content_type="video/mp4")
    assert stored == StoredObject(key=key, size=len(data), content_type="video/mp4")
    assert storage.exists(key)
    assert storage.size(key) == len(data)
    assert storage.get(key) == data

    chunks = list(storage.iter_chunks(key, chunk_size=100))
    assert b"".join(chunks) == data
    assert all(0 < len(c) <= 100 for c in chunks) and len(chunks) == -(-len(data) // 100)

    storage.put(key, b"v2", content_type="video/mp4")  # overwrite
    assert storage.get(key) == b"v2" and storage.size(key) == 2

    empty = job_key("acme", "job-1", "empty.bin")
    storage.put(empty, b"", content_type="application/octet-stream")
    assert storage.get(empty) == b"" and storage.size(empty) == 0 and list(storage.iter_chunks(empty)) == []

    storage.delete(key)
    assert not storage.exists(key)
    storage.delete(key)  # missing is fine
    assert storage.ping()


def test_missing_object(storage):
    key = job_key("acme", "job-1", "nope.mp4")
    for call in (storage.get, storage.size, storage.iter_chunks):
        with pytest.raises(ObjectNotFound) as info:
            call(key)  # iter_chunks raises on the call itself, before any response starts
        assert info.value.key == key and isinstance(info.value, StorageError)
    assert storage.exists(key) is False
    # A "folder" is not an object.
    storage.put(job_key("acme", "job-1", "a.bin"), b"x", content_type="application/octet-stream")
    assert not storage.exists("acme/job-1")
    with pytest.raises(ObjectNotFound):
        storage.get("acme/job-1")


def test_delete_prefix_is_scoped_to_one_job(storage):
    keys = {
        job_key("acme", "job1", "clip.mp4"): b"1",
        job_key("acme", "job1", "image.png"): b"2",
        job_key("acme", "job10", "clip.mp4"): b"3",  # shares the string prefix "acme/job1"
        job_key("other", "job1", "clip.mp4"): b"4",
    }
    for key, data in keys.items():
        storage.put(key, data, content_type="application/octet-stream")

    assert storage.delete_prefix(job_prefix("acme", "job1")) == 2
    assert not storage.exists("acme/job1/clip.mp4") and not storage.exists("acme/job1/image.png")
    assert storage.get("acme/job10/clip.mp4") == b"3"
    assert storage.get("other/job1/clip.mp4") == b"4"
    assert storage.delete_prefix("acme/job1/") == 0  # trailing slash accepted; nothing left
    assert storage.delete_prefix("acme") == 1
    assert storage.get("other/job1/clip.mp4") == b"4"
    with pytest.raises(ValueError):
        storage.delete_prefix("")  # never "everything"
    with pytest.raises(ValueError):
        storage.delete_prefix("../other")


@pytest.mark.parametrize("key", BAD_KEYS)
def test_backends_reject_malformed_keys(storage, key):
    with pytest.raises(ValueError):
        storage.put(key, b"x", content_type="text/plain")
    for call in (storage.get, storage.exists, storage.size, storage.delete, storage.presigned_url):
        with pytest.raises(ValueError):
            call(key)


# ------------------------------------------------------------------------------------ keys
def test_job_key_layout():
    assert job_key("acme", "0b5c-1.a_b", "clip.mp4") == "acme/0b5c-1.a_b/clip.mp4"
    assert job_key("A" * 128, "j", "name with spaces é.mp4") == f"{'A' * 128}/j/name with spaces é.mp4"
    assert job_prefix("acme", "job1") == "acme/job1"


BAD_IDS = ["../x", "a/b", "", "\x00", "..", ".", "-lead", ".hidden", "a b", "A" * 129, "a\\b", "é"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_job_key_rejects_bad_ids(bad):
    with pytest.raises(ValueError):
        job_key(bad, "job", "clip.mp4")
    with pytest.raises(ValueError):
        job_key("acme", bad, "clip.mp4")
    with pytest.raises(ValueError):
        job_prefix(bad, "job")


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "\x00", "..", ".", "a\\b", "a\nb", "x\x7f", "n" * 256])
def test_job_key_rejects_bad_names(bad):
    with pytest.raises(ValueError):
        job_key("acme", "job", bad)


def test_job_key_rejects_non_strings():
    with pytest.raises(ValueError):
        job_key("acme", "job", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        job_key(1, "job", "x")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- local
def _all_files(top):
    return sorted(p for p in top.rglob("*") if p.is_file() or p.is_symlink())


def test_local_layout_and_atomic_writes(tmp_path):
    storage = LocalStorage(tmp_path / "root", prefix=PREFIX)
    key = job_key("acme", "job1", "clip.mp4")
    storage.put(key, b"data", content_type="video/mp4")
    path = tmp_path / "root" / PREFIX / "acme" / "job1" / "clip.mp4"
    assert storage.local_path(key) == path.resolve()
    assert path.read_bytes() == b"data"
    assert _all_files(tmp_path) == [path]  # no temporary files left behind
    assert storage.presigned_url(key, filename="clip.mp4") is None


def test_local_failed_write_keeps_the_old_object(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path / "root")
    key = job_key("acme", "job1", "clip.mp4")
    storage.put(key, b"old", content_type="video/mp4")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StorageError, match="No space left"):
        storage.put(key, b"new", content_type="video/mp4")
    monkeypatch.undo()
    assert storage.get(key) == b"old"
    assert _all_files(tmp_path) == [storage.local_path(key)]


def test_local_never_writes_outside_its_root(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_bytes(b"keep")
    storage = LocalStorage(root, prefix=PREFIX)
    storage.put(job_key("acme", "job1", "ok.bin"), b"ok", content_type="application/octet-stream")
    # A symlink planted inside the root that points outside it.
    (root / PREFIX / "acme" / "evil").symlink_to(outside, target_is_directory=True)
    (root / PREFIX / "acme" / "job1" / "link.txt").symlink_to(outside / "victim.txt")

    for key in [*BAD_KEYS, "acme/evil/x.bin", "acme/evil/victim.txt", "acme/job1/link.txt"]:
        with pytest.raises(ValueError):
            storage.put(key, b"pwned", content_type="text/plain")
        with pytest.raises(ValueError):
            storage.get(key)
        with pytest.raises(ValueError):
            storage.delete(key)
    with pytest.raises(ValueError):
        storage.delete_prefix("acme/evil")
    with pytest.raises(ValueError):
        storage.local_path("../../outside/victim.txt")

    # Deleting the tenant removes the symlinks themselves, never what they point to.
    assert storage.delete_prefix("acme") == 2  # ok.bin and the link.txt symlink
    assert (outside / "victim.txt").read_bytes() == b"keep"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert not (root / PREFIX / "acme").exists()


def test_local_ping(tmp_path):
    assert LocalStorage(tmp_path / "new" / "dir").ping()
    (tmp_path / "file").write_bytes(b"")
    assert not LocalStorage(tmp_path / "file").ping()


# ---------------------------------------------------------------------------------------- S3
def test_make_storage_picks_the_backend(tmp_path, moto_s3_endpoint, s3_env):
    assert isinstance(make_storage(StorageConfig(backend="local", local_dir=str(tmp_path))), LocalStorage)
    s3 = make_storage(_s3_config(moto_s3_endpoint, "b"))
    assert isinstance(s3, S3Storage)
    again = pickle.loads(pickle.dumps(s3))  # Ray ships it between processes
    assert isinstance(again, S3Storage) and again.config == s3.config


def test_s3_objects_live_under_the_prefix(s3):
    storage, client, bucket = s3
    key = job_key("acme", "job1", "clip.mp4")
    storage.put(key, b"data", content_type="video/mp4")
    head = client.head_object(Bucket=bucket, Key=f"{PREFIX}/{key}")
    assert head["ContentLength"] == 4 and head["ContentType"] == "video/mp4"
    assert "ServerSideEncryption" not in head


def test_s3_presigned_url_downloads_with_the_filename(s3):
    storage, _, bucket = s3
    key = job_key("acme", "job1", "clip.mp4")
    data = os.urandom(3000)
    storage.put(key, data, content_type="video/mp4")

    url = storage.presigned_url(key, filename="my clip.mp4")
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == [str(storage.config.presign_expiry_s)]
    assert TEST_SECRET_ACCESS_KEY not in url
    resp = httpx.get(url)
    assert resp.status_code == 200, resp.text
    assert resp.content == data
    assert resp.headers["content-disposition"] == 'attachment; filename="my clip.mp4"'
    assert resp.headers["content-type"] == "video/mp4"

    # Non-ASCII names get an RFC 5987 filename*; quotes cannot break out of the header value.
    url = storage.presigned_url(key, filename='é"vil.mp4', content_type="application/octet-stream")
    resp = httpx.get(url)
    assert resp.status_code == 200 and resp.content == data
    assert resp.headers["content-disposition"] == "attachment; filename=\"evil.mp4\"; filename*=UTF-8''%C3%A9%22vil.mp4"
    assert resp.headers["content-type"] == "application/octet-stream"

    plain = httpx.get(storage.presigned_url(key))
    assert plain.status_code == 200 and "content-disposition" not in plain.headers


def test_s3_presign_expiry_follows_config(s3_bucket, moto_s3_endpoint):
    _, bucket = s3_bucket
    storage = S3Storage(_s3_config(moto_s3_endpoint, bucket, presign_expiry_s=120))
    url = storage.presigned_url(job_key("acme", "job1", "clip.mp4"))
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["120"]


def test_s3_sse_aes256_is_recorded(s3_bucket, moto_s3_endpoint):
    client, bucket = s3_bucket
    storage = S3Storage(_s3_config(moto_s3_endpoint, bucket, server_side_encryption="AES256"))
    key = job_key("acme", "job1", "clip.mp4")
    storage.put(key, b"secret", content_type="video/mp4")
    assert client.head_object(Bucket=bucket, Key=f"{PREFIX}/{key}")["ServerSideEncryption"] == "AES256"
    assert storage.get(key) == b"secret"


def test_s3_sse_kms_sends_the_key_id(s3_bucket, moto_s3_endpoint):
    client, bucket = s3_bucket
    kms_key = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"
    storage = S3Storage(
        _s3_config(moto_s3_endpoint, bucket, server_side_encryption="aws:kms", kms_key_id=kms_key)
    )
    key = job_key("acme", "job1", "clip.mp4")
    storage.put(key, b"secret", content_type="video/mp4")
    head = client.head_object(Bucket=bucket, Key=f"{PREFIX}/{key}")
    assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == kms_key


def test_s3_custom_endpoint_uses_path_style(s3_bucket, moto_s3_endpoint):
    _, bucket = s3_bucket
    port = urlsplit(moto_s3_endpoint).port
    endpoint = f"http://localhost:{port}"  # a host name: virtual-host style would prepend the bucket
    storage = S3Storage(_s3_config(endpoint, bucket))
    sent: list[str] = []
    storage.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.url))

    key = job_key("acme", "job1", "clip.mp4")
    storage.put(key, b"data", content_type="video/mp4")
    assert storage.get(key) == b"data" and storage.exists(key)
    assert storage.delete_prefix(job_prefix("acme", "job1")) == 1
    assert sent
    for url in sent:
        parts = urlsplit(url)
        assert parts.netloc == f"localhost:{port}" and parts.path.startswith(f"/{bucket}"), url

    url = storage.presigned_url(key)
    assert url.startswith(f"{endpoint}/{bucket}/{PREFIX}/acme/job1/clip.mp4?")


def test_s3_delete_prefix_batches(s3, monkeypatch):
    storage, client, bucket = s3
    monkeypatch.setattr(s3_module, "_DELETE_BATCH", 2)
    calls: list[int] = []
    storage.client.meta.events.register(
        "provide-client-params.s3.DeleteObjects", lambda params, **_: calls.append(len(params["Delete"]["Objects"]))
    )
    for i in range(5):
        storage.put(job_key("acme", "job1", f"f{i}.bin"), b"x", content_type="application/octet-stream")
    storage.put(job_key("acme", "job2", "keep.bin"), b"x", content_type="application/octet-stream")
    assert storage.delete_prefix(job_prefix("acme", "job1")) == 5
    assert calls == [2, 2, 1]
    left = client.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/")["Contents"]
    assert [o["Key"] for o in left] == [f"{PREFIX}/acme/job2/keep.bin"]


def test_s3_wrong_bucket_is_a_readable_storage_error(moto_s3_endpoint, s3_env, caplog):
    bucket = "svd-no-such-bucket"
    storage = S3Storage(_s3_config(moto_s3_endpoint, bucket))
    key = job_key("acme", "job1", "clip.mp4")
    calls = [
        lambda: storage.put(key, b"x", content_type="video/mp4"),
        lambda: storage.get(key),
        lambda: storage.iter_chunks(key),
        lambda: storage.size(key),
        lambda: storage.exists(key),  # HEAD's bare 404 must not read as "no such object"
        lambda: storage.delete_prefix("acme/job1"),
    ]
    for call in calls:
        with pytest.raises(StorageError) as info:
            call()
        assert not isinstance(info.value, ObjectNotFound)
        _assert_clean_message(info.value, bucket, "NoSuchBucket")
    with caplog.at_level(logging.DEBUG, logger="serve.storage"):
        assert storage.ping() is False
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("serve.storage"))
    assert bucket in ours
    assert TEST_ACCESS_KEY_ID not in ours and TEST_SECRET_ACCESS_KEY not in ours


def test_s3_unreachable_endpoint_is_a_storage_error(s3_env):
    storage = S3Storage(_s3_config("http://127.0.0.1:9", "bucket"))  # nothing listens on port 9
    with pytest.raises(StorageError) as info:
        storage.get(job_key("acme", "job1", "clip.mp4"))
    assert not isinstance(info.value, ObjectNotFound)
    _assert_clean_message(info.value, "s3://bucket/svd-serve/acme/job1/clip.mp4")
    assert storage.ping() is False


# ------------------------------------------------------------------------------- signed URLs
def _signed_parts(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    return unquote(parts.path), {k: v[0] for k, v in parse_qs(parts.query).items()}


def _verify(storage: Storage, url: str, **changes) -> None:
    path, query = _signed_parts(url)
    query.update(changes)
    key = path.removeprefix("/files/")
    storage.verify_signed_url(key, expires=int(query["expires"]), signature=query["signature"],
                              filename=query.get("filename"), content_type=query.get("content_type"))


def test_local_signed_url_verifies_and_expires(tmp_path, monkeypatch):
    monkeypatch.delenv("SVD_SERVE_URL_SIGNING_KEY", raising=False)
    storage = LocalStorage(tmp_path / "root", prefix=PREFIX)
    key = job_key("acme", "job1", "my clip.mp4")
    url = storage.signed_url(key, base_url="https://svd.example.com/", expires_s=300, filename="my clip.mp4",
                             content_type="video/mp4")
    path, query = _signed_parts(url)
    assert url.startswith("https://svd.example.com/files/acme/job1/my%20clip.mp4?")
    assert path == "/files/acme/job1/my clip.mp4" and query["filename"] == "my clip.mp4"
    assert 299 <= int(query["expires"]) - time.time() <= 301
    _verify(storage, url)
    for changes in ({"signature": query["signature"][::-1]}, {"expires": str(int(query["expires"]) + 1)},
                    {"filename": "x.mp4"}, {"content_type": "text/html"}, {"signature": ""}):
        with pytest.raises(SignedURLError) as info:
            _verify(storage, url, **changes)
        assert info.value.reason == "invalid", changes
    with pytest.raises(SignedURLError):
        storage.verify_signed_url(job_key("acme", "job2", "my clip.mp4"), expires=int(query["expires"]),
                                  signature=query["signature"], filename="my clip.mp4", content_type="video/mp4")
    old = storage.signed_url(key, base_url="http://x", expires_s=10, now=time.time() - 11)
    with pytest.raises(SignedURLError) as info:
        _verify(storage, old)
    assert info.value.reason == "expired"
    for bad in BAD_KEYS:
        with pytest.raises(ValueError):
            storage.signed_url(bad, base_url="http://x", expires_s=10)
    with pytest.raises(ValueError):
        storage.signed_url(key, base_url="http://x", expires_s=0)


def test_local_signing_key_file_is_created_once_private_and_shared(tmp_path, monkeypatch):
    monkeypatch.delenv("SVD_SERVE_URL_SIGNING_KEY", raising=False)
    root = tmp_path / "root"
    first = LocalStorage(root, prefix=PREFIX)
    key = job_key("acme", "job1", "clip.mp4")
    first.put(key, b"x", content_type="video/mp4")
    assert not (root / ".url-signing-key").exists()  # only a process that signs needs it
    url = first.signed_url(key, base_url="http://a", expires_s=60)
    key_file = root / ".url-signing-key"
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_bytes()) >= 32
    assert sorted(p.name for p in root.iterdir()) == [".url-signing-key", PREFIX]  # outside the objects
    # Another process (a second ingress replica) on the same directory verifies it.
    _verify(LocalStorage(root, prefix=PREFIX), url)
    assert pickle.loads(pickle.dumps(first))._signing_key is None  # the key never travels
    # Another directory, another key.
    with pytest.raises(SignedURLError):
        _verify(LocalStorage(tmp_path / "elsewhere", prefix=PREFIX), url)


def test_local_signing_key_from_the_configured_environment_variable(tmp_path, monkeypatch, caplog):
    secret = "s" * 40
    monkeypatch.setenv("MY_URL_KEY", secret)
    storage = LocalStorage(tmp_path / "a", signing_key_env="MY_URL_KEY")
    url = storage.signed_url(job_key("acme", "job1", "clip.mp4"), base_url="http://a", expires_s=60)
    _verify(LocalStorage(tmp_path / "b", signing_key_env="MY_URL_KEY"), url)  # any directory, same key
    assert not (tmp_path / "a" / ".url-signing-key").exists()
    with pytest.raises(SignedURLError):
        _verify(LocalStorage(tmp_path / "a"), url)  # the default variable is not set: the key file's key

    monkeypatch.setenv("MY_URL_KEY", "short")
    with caplog.at_level(logging.DEBUG), pytest.raises(StorageError) as info:
        LocalStorage(tmp_path / "c", signing_key_env="MY_URL_KEY").signed_url(
            job_key("acme", "job1", "clip.mp4"), base_url="http://a", expires_s=60)
    assert "MY_URL_KEY" in str(info.value) and "short" not in str(info.value).replace("shorter", "")
    assert secret not in caplog.text

    assert StorageConfig().url_signing_key_env == "SVD_SERVE_URL_SIGNING_KEY"
    with pytest.raises(ValueError):
        StorageConfig(url_signing_key_env="not a name")


def test_local_signing_key_file_readable_by_others_is_warned_about(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("SVD_SERVE_URL_SIGNING_KEY", raising=False)
    root = tmp_path / "root"
    root.mkdir()
    (root / ".url-signing-key").write_text("k" * 64)
    os.chmod(root / ".url-signing-key", 0o644)
    with caplog.at_level(logging.WARNING, logger="serve.storage"):
        LocalStorage(root).signed_url(job_key("acme", "job1", "clip.mp4"), base_url="http://a", expires_s=60)
    assert "chmod 600" in caplog.text and "k" * 64 not in caplog.text


def test_s3_signed_url_is_its_presigned_url(s3):
    storage, _, _ = s3
    key = job_key("acme", "job1", "clip.mp4")
    storage.put(key, b"data", content_type="video/mp4")
    url = storage.signed_url(key, base_url="http://ignored", expires_s=60, filename="clip.mp4")
    assert httpx.get(url).content == b"data"
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == [str(storage.config.presign_expiry_s)]
    with pytest.raises(SignedURLError):
        storage.verify_signed_url(key, expires=int(time.time()) + 60, signature="x")
