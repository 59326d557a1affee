"""S3 end to end against a real server (SeaweedFS on 127.0.0.1, see ``s3server.py``).

Conversion uploads an MDS dataset, ``ConceptStreamingDataset`` streams it back (vocabulary
included) and Composer writes its checkpoints there and loads one back, all through
``S3_ENDPOINT_URL`` and the standard ``AWS_*`` variables, as the README tells users to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from botocore.exceptions import ClientError
from helpers import sample_rows
from paths import ROOT, SAMPLE
from s3server import HOST, S3Server

from cabs_streaming.concepts import ConceptCounts, Vocabulary, decode_concepts
from cabs_streaming.config import load_config
from cabs_streaming.converter import convert
from cabs_streaming.dataset import ConceptStreamingDataset
from cabs_streaming.report import FIGURES, SUMMARY, concept_report, read_concepts
from cabs_streaming.train import build_trainer

pytestmark = pytest.mark.slow  # every test here talks to the S3 server

BUCKET = "cabs-test"
PREFIX = "mds/train"
COUNT = 12  # samples of the embedded sample uploaded, in 3 shards of at most 5
QUICKSTART = ROOT / "yamls" / "quickstart.yaml"


@pytest.fixture(scope="module")
def server(s3: S3Server) -> S3Server:
    """The session's S3 server (conftest.py: clients pointed at it) and this module's bucket."""
    s3.make_bucket(BUCKET)
    return s3


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The first samples of the embedded sample: real JPEGs with their captions and concepts."""
    vocabulary = Vocabulary.load(str(SAMPLE / "train"))
    rows = []
    for sample in sample_rows(COUNT, tmp_path_factory.mktemp("sample-cache")):
        rows.append(
            {
                "key": sample["key"],
                "caption": sample["caption"],
                "recaption": sample["recaption"],
                "concepts": [
                    vocabulary.name_of(int(c)) for c in decode_concepts(sample["concepts"])
                ],
                "image": bytes(sample["image"]),
            }
        )
    assert all(row["image"][:2] == b"\xff\xd8" for row in rows), "the sample holds JPEG files"
    assert len({row["key"] for row in rows}) == COUNT
    return rows


@pytest.fixture(scope="module")
def uploaded(
    server: S3Server, source: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """``source`` written as a JSONL manifest and converted straight into the bucket."""
    root = tmp_path_factory.mktemp("manifest")
    lines = []
    for i, row in enumerate(source):
        (root / f"{i}.jpg").write_bytes(row["image"])
        lines.append(
            {
                "image": f"{i}.jpg",
                "key": row["key"],
                "caption": row["caption"],
                "recaption": row["recaption"],
                "concepts": row["concepts"],
            }
        )
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return convert(
        [str(manifest)],
        "jsonl",
        f"s3://{BUCKET}/{PREFIX}",
        vocabulary=str(SAMPLE / "train"),  # keep the sample's concept ids
        max_samples_per_shard=5,
        progress=False,
    )


def test_server_listens_on_loopback_only(server: S3Server) -> None:
    assert server.pid is not None
    listening = [
        conn.laddr
        for conn in psutil.Process(server.pid).net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    ]
    assert listening, "weed mini listens on nothing"
    assert {addr.ip for addr in listening} == {HOST}
    assert {addr.port for addr in listening} >= {server.ports["s3"], server.ports["s3"] + 10000}


def test_credentials_are_required(server: S3Server) -> None:
    assert BUCKET in [b["Name"] for b in server.client().list_buckets()["Buckets"]]

    with pytest.raises(ClientError) as wrong_secret:
        server.client(secret_key="not-the-secret", attempts=1).list_objects_v2(Bucket=BUCKET)
    assert wrong_secret.value.response["Error"]["Code"] == "SignatureDoesNotMatch"

    with pytest.raises(ClientError) as unknown_key:
        server.client("nobody", "nothing", attempts=1).list_buckets()
    assert unknown_key.value.response["Error"]["Code"] == "InvalidAccessKeyId"

    with pytest.raises(ClientError) as wrong_write:
        server.client(secret_key="not-the-secret", attempts=1).put_object(
            Bucket=BUCKET, Key="intruder", Body=b"x"
        )
    assert wrong_write.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert "intruder" not in server.keys(BUCKET)


def test_convert_uploads_shards_index_vocabulary_and_report(
    server: S3Server, uploaded: dict[str, Any]
) -> None:
    assert uploaded["read"] == uploaded["written"] == COUNT
    assert sum(uploaded["skipped"].values()) == 0
    keys = server.keys(BUCKET, PREFIX + "/")
    shards = [f"{PREFIX}/shard.{i:05d}.mds" for i in range(3)]  # 12 samples, at most 5 a shard
    beside = ("index.json", "report.json", "vocabulary.json", "concept_counts.json")
    assert keys == sorted([*(f"{PREFIX}/{name}" for name in beside), *shards])

    client = server.client()

    def read(name: str) -> bytes:
        return client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}")["Body"].read()

    assert json.loads(read("report.json")) == uploaded
    index = json.loads(read("index.json"))
    assert [s["raw_data"]["basename"] for s in index["shards"]] == [
        k.split("/")[-1] for k in shards
    ]
    assert [s["samples"] for s in index["shards"]] == [5, 5, 2]
    vocabulary = Vocabulary.from_json(read("vocabulary.json"))
    assert vocabulary.names == Vocabulary.load(str(SAMPLE / "train")).names
    counts = ConceptCounts.from_json(read("concept_counts.json"))
    assert counts.samples.tolist() == uploaded["concepts"]["per_concept"]["samples"]
    assert counts.written == COUNT


def test_streaming_dataset_reads_back_the_source_from_s3(
    server: S3Server, uploaded: dict[str, Any], source: list[dict[str, Any]], tmp_path: Path
) -> None:
    del server, uploaded  # the upload must have happened
    local = tmp_path / "cache"
    dataset = ConceptStreamingDataset(
        remote=f"s3://{BUCKET}/{PREFIX}",
        local=str(local),
        batch_size=4,
        shuffle=False,
        validate_hash="xxh64",
    )
    assert (local / "vocabulary.json").is_file(), "the vocabulary was downloaded beside index.json"
    sample_vocabulary = Vocabulary.load(str(SAMPLE / "train"))
    assert dataset.vocabulary.names == sample_vocabulary.names
    assert dataset.num_samples == COUNT
    assert dataset.concept_counts is not None and dataset.concept_counts.written == COUNT
    assert (local / "concept_counts.json").is_file(), "the counts were downloaded too"

    by_index = [dataset[i] for i in range(COUNT)]
    iterated = list(dataset)
    for rows in (by_index, iterated):
        assert [r["key"] for r in rows] == [s["key"] for s in source]
        assert [r["caption"] for r in rows] == [s["caption"] for s in source]
        assert [bytes(r["image"]) for r in rows] == [s["image"] for s in source]
        names = [[dataset.vocabulary.name_of(int(c)) for c in r["concepts"]] for r in rows]
        assert names == [s["concepts"] for s in source]
    assert sorted(p.name for p in local.glob("shard.*.mds")) == [
        f"shard.{i:05d}.mds" for i in range(3)
    ]
    del dataset, by_index, iterated


def test_concept_report_reads_the_dataset_from_s3(
    server: S3Server, uploaded: dict[str, Any], source: list[dict[str, Any]], tmp_path: Path
) -> None:
    del server, uploaded  # the upload must have happened
    remote = f"s3://{BUCKET}/{PREFIX}"
    data = read_concepts(remote, max_samples=7, progress=False)
    assert (data.samples, data.dataset_samples) == (7, COUNT)  # only the first 7 were read
    names = [
        [data.vocabulary.name_of(int(c)) for c in data.ids[data.offsets[i] : data.offsets[i + 1]]]
        for i in range(data.samples)
    ]
    assert names == [s["concepts"] for s in source[:7]]

    out = tmp_path / "report"
    summary = concept_report(remote, str(out), filter_ratio=0.5, batch_size=3, batches=2, seed=1)
    assert summary["samples"] == summary["dataset_samples"] == COUNT
    assert summary["instances"] == sum(len(s["concepts"]) for s in source)
    for name in FIGURES:
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name
    assert json.loads((out / SUMMARY).read_text()) == summary


def test_composer_checkpoints_go_to_s3_and_load_back(server: S3Server, tmp_path: Path) -> None:
    folder = f"s3://{BUCKET}/ckpt/{{run_name}}"
    common = [
        f"variables.data={SAMPLE}",
        "eval_data.zeroshot=null",
        "eval_data.retrieval=null",
        "train_data.num_workers=0",
        "progress_bar=false",
        f"run_folder={tmp_path}/{{run_name}}",
    ]
    # No "latest" pointer: Composer uploads it from a poller that checks every 30 s, and fit
    # would wait for it (about 30 s more); the checkpoints themselves are what is checked here.
    saving = ["max_duration=2ba", f"save_folder={folder}", "save_interval=1ba"]
    cfg = load_config(QUICKSTART, [*common, "run_name=s3run", *saving, "save_latest_filename=null"])
    trainer = build_trainer(cfg)
    trainer.fit()
    trainer.close()  # waits for the uploads
    weights = {k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()}
    del trainer

    keys = server.keys(BUCKET, "ckpt/s3run/")
    assert {"ckpt/s3run/ep0-ba1-rank0.pt", "ckpt/s3run/ep0-ba2-rank0.pt"} <= set(keys), keys
    # Composer's local copy (the newest only) and its staging folder live in the run folder.
    scratch = tmp_path / "s3run" / ".checkpoints" / "rank0"
    assert sorted(p.name for p in scratch.iterdir()) == ["checkpoints"]  # staging removed
    assert sorted(p.name for p in (scratch / "checkpoints").glob("*.pt")) == ["ep0-ba2-rank0.pt"]

    # Round trip: a fresh trainer loads the last checkpoint from the bucket through Composer.
    cfg = load_config(
        QUICKSTART,
        [
            *common,
            "run_name=from-s3run",
            "max_duration=3ba",
            "save_folder=null",
            f"load_path=s3://{BUCKET}/ckpt/s3run/ep0-ba2-rank0.pt",
        ],
    )
    resumed = build_trainer(cfg)
    assert int(resumed.state.timestamp.batch) == 2
    loaded = resumed.state.model.state_dict()
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    resumed.close()


def test_restart_keeps_the_data(server: S3Server) -> None:
    client = server.client()
    client.put_object(Bucket=BUCKET, Key="restart/probe", Body=b"kept across restarts")
    endpoint = server.endpoint_url
    server.restart()
    assert server.endpoint_url == endpoint
    body = server.client().get_object(Bucket=BUCKET, Key="restart/probe")["Body"].read()
    assert body == b"kept across restarts"


def test_an_upload_over_an_existing_checkpoint_is_not_blamed_on_s3(
    server: S3Server, tmp_path: Path
) -> None:
    """Composer refuses to overwrite a checkpoint object (``save_overwrite`` false); the error
    says that another run wrote it, not that S3 failed and autoresume will fix it."""
    from types import SimpleNamespace

    from composer.utils.remote_uploader import RemoteUploader

    from cabs_streaming.storage import CheckpointUploadGuard, StorageError, _upload_on_threads

    key = "taken/ep0-ba3-rank0.pt"
    server.client().put_object(Bucket=BUCKET, Key=key, Body=b"the other run's")
    uploader = RemoteUploader(remote_folder=f"s3://{BUCKET}/taken")
    _upload_on_threads(uploader, 1)
    local = tmp_path / "ep0-ba3-rank0.pt"
    local.write_bytes(b"this run's")
    upload = uploader.upload_file_async(key, local, overwrite=False)
    assert isinstance(upload.exception(timeout=60), FileExistsError)
    guard = CheckpointUploadGuard(uploader, f"s3://{BUCKET}/taken", attempts=10)
    with pytest.raises(StorageError) as err:
        guard.batch_end(SimpleNamespace(run_name="this-run"), None)
    message = str(err.value)
    assert message.startswith(f"a checkpoint of this run is already in s3://{BUCKET}/taken")
    assert "S3 is fine; another run with the same run_name wrote there" in message
    assert "Once S3 answers again" not in message
    body = server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert body == b"the other run's"
    uploader.upload_executor.shutdown()
