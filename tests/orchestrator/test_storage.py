"""Files on S3 through a real S3 endpoint (moto's server on loopback), and local paths."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from methods import load_backbone_weights
from orchestrator import storage
from orchestrator.errors import UserError

BUCKET = "prunetune-test"


@pytest.fixture
def s3(s3_endpoint, monkeypatch, tmp_path):
    """The environment boto3 reads pointed at moto, a fresh bucket, and a per-test download cache."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(storage, "_CACHE", tmp_path / "cache")
    client = boto3.client("s3")
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)
    return client


def test_upload_then_fetch_round_trips(s3, tmp_path):
    data = bytes(range(256)) * 1000
    src = tmp_path / "blob.bin"
    src.write_bytes(data)
    uri = f"s3://{BUCKET}/runs/a/blob.bin"
    assert storage.upload(src, uri) == uri
    assert s3.get_object(Bucket=BUCKET, Key="runs/a/blob.bin")["Body"].read() == data  # really in the bucket
    assert storage.exists(uri)

    local = storage.fetch(uri)
    assert local.read_bytes() == data
    assert local.name == "blob.bin" and (tmp_path / "cache") in local.parents
    assert not list(local.parent.glob("*.part"))


def test_fetch_uses_the_cache(s3, tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(b"first")
    uri = f"s3://{BUCKET}/cached/w.bin"
    storage.upload(src, uri)
    first = storage.fetch(uri)
    s3.delete_object(Bucket=BUCKET, Key="cached/w.bin")
    second = storage.fetch(uri)  # served from the cache: the object is gone
    assert second == first and second.read_bytes() == b"first"
    assert not storage.exists(uri)


def test_same_file_name_under_two_keys_does_not_collide(s3, tmp_path):
    for i in range(2):
        src = tmp_path / f"src{i}"
        src.write_bytes(f"payload {i}".encode())
        storage.upload(src, f"s3://{BUCKET}/k{i}/model.pt")
    a, b = storage.fetch(f"s3://{BUCKET}/k0/model.pt"), storage.fetch(f"s3://{BUCKET}/k1/model.pt")
    assert a != b and a.read_bytes() == b"payload 0" and b.read_bytes() == b"payload 1"


@pytest.mark.parametrize("uri", [f"s3://{BUCKET}/no/such/key.pt", "s3://no-such-bucket-xyz/key.pt"])
def test_fetch_of_a_missing_object_names_the_uri(s3, tmp_path, uri):
    with pytest.raises(UserError) as e:
        storage.fetch(uri)
    msg = str(e.value)
    assert uri in msg and "\n" not in msg and "testing" not in msg
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]  # nothing half-written


def test_upload_to_a_missing_bucket_names_the_uri(s3, tmp_path):
    src = tmp_path / "x"
    src.write_bytes(b"x")
    with pytest.raises(UserError, match="s3://no-such-bucket-xyz/x"):
        storage.upload(src, "s3://no-such-bucket-xyz/x")


def test_backbone_weights_through_s3(s3, tmp_path, make_tiny_vit):
    """A dense state dict exported as the sweep does (under "model") loads after an S3 round trip."""
    src_model = make_tiny_vit(seed=1)
    path = tmp_path / "dense_backbone.pt"
    torch.save({"model": src_model.state_dict()}, path)
    uri = storage.upload(path, f"s3://{BUCKET}/sweep/pretrain_x/dense_backbone.pt")

    target = make_tiny_vit(seed=2)
    assert not torch.equal(target.blocks[0].attn.qkv.weight, src_model.blocks[0].attn.qkv.weight)
    load_backbone_weights(target, storage.fetch(uri))
    for (k, a), b in zip(src_model.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k


def test_local_paths(tmp_path):
    assert not storage.is_s3(str(tmp_path)) and storage.is_s3("s3://b/k") and not storage.is_s3(None)
    with pytest.raises(UserError, match="missing.pt"):
        storage.fetch(str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="does not exist"):
        storage.fetch(str(tmp_path))  # a folder is not a file
    src = tmp_path / "a.bin"
    src.write_bytes(b"abc")
    dest = tmp_path / "deep" / "er" / "b.bin"
    assert storage.upload(src, str(dest)) == str(dest)
    assert storage.fetch(str(dest)) == dest and dest.read_bytes() == b"abc"
    assert storage.exists(str(dest)) and not storage.exists(str(tmp_path / "nope"))


def test_join():
    assert storage.join("s3://bucket/runs/", "sweep", "x.pt") == "s3://bucket/runs/sweep/x.pt"
    assert storage.join("/data/runs", "sweep", "x.pt") == str(Path("/data/runs/sweep/x.pt"))
