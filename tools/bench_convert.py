#!/usr/bin/env python
r"""Benchmark the converter's engines on one input: local processes against Spark; ONE JSON line.

WebDataset tars are cut from the embedded sample's real JPEGs (data/sample/train, every image
reused under new keys), then converted three ways into fresh folders, each timed end to end:
``convert(workers=N)``, ``convert_on_spark`` on ``local[N]``, and the same Spark job rerun into
its own output (every part reused: the price of resuming, i.e. the scan and the merge). The
per-task overhead of Spark is measured on its own, as the time per empty task of a job of
``--tasks`` tasks, on the same session. Spark's session start (a JVM) is reported apart, as it
is paid once per job, not per sample::

    python tools/bench_convert.py --tars 8 --samples-per-tar 250 --cores 2
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="bench_convert.py",
        description="Time the local converter (--workers N) against the Spark engine "
        "(local[N]) on the same generated tars; print one JSON line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tars", type=int, default=8, help="input tars generated")
    parser.add_argument("--samples-per-tar", type=int, default=250, help="samples in each tar")
    parser.add_argument(
        "--cores", type=int, default=2, help="--workers of the local run, N of local[N]"
    )
    parser.add_argument(
        "--tasks", type=int, default=64, help="empty Spark tasks timed for the per-task overhead"
    )
    parser.add_argument(
        "--sample", default=str(ROOT / "data" / "sample" / "train"), help="MDS source of images"
    )
    return parser


def _images(sample: str, cache: str) -> list[tuple[bytes, str]]:
    """(JPEG, caption) of every sample of the MDS dataset ``sample``."""
    from streaming import StreamingDataset

    dataset = StreamingDataset(remote=sample, local=cache, batch_size=1, shuffle=False)
    rows = [(bytes(dataset[i]["image"]), dataset[i]["caption"]) for i in range(len(dataset))]
    del dataset
    gc.collect()
    return rows


def _write_tars(folder: Path, rows: list[tuple[bytes, str]], tars: int, per_tar: int) -> list[str]:
    """``tars`` tars of ``per_tar`` samples each, images and captions cycled from ``rows``."""
    names = ["dog", "cat", "bird", "car", "tree", "boat"]
    paths = []
    for t in range(tars):
        path = folder / f"shard-{t:05d}.tar"
        with tarfile.open(path, "w") as archive:
            for i in range(per_tar):
                n = t * per_tar + i
                image, caption = rows[n % len(rows)]
                meta = {"caption": caption, "classes": names[: n % len(names)]}
                for ext, data in (("jpg", image), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{n:09d}.{ext}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def _timed(function: object, *args: object, **kwargs: object) -> tuple[float, dict]:
    started = time.perf_counter()
    result = function(*args, **kwargs)  # type: ignore[operator]
    return time.perf_counter() - started, result


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the input, run both engines, print the JSON line."""
    args = build_parser().parse_args(argv)
    from cabs_streaming.converter import convert, convert_on_spark
    from cabs_streaming.converter.spark import spark_session

    with tempfile.TemporaryDirectory(prefix="cabs-bench-convert-") as tmp:
        work = Path(tmp)
        rows = _images(args.sample, str(work / "cache"))
        tars = _write_tars(work, rows, args.tars, args.samples_per_tar)
        local_s, local = _timed(
            convert, tars, "webdataset", str(work / "local"), workers=args.cores, progress=False
        )
        conf = {
            "spark.ui.enabled": "false",
            "spark.ui.showConsoleProgress": "false",
            "spark.driver.host": "127.0.0.1",
            "spark.driver.bindAddress": "127.0.0.1",
            "spark.default.parallelism": str(args.cores),
            "spark.sql.shuffle.partitions": str(args.cores),
        }
        start_s, spark = _timed(spark_session, f"local[{args.cores}]", conf, "cabs-bench")
        spark.sparkContext.setLogLevel("ERROR")
        try:
            sc = spark.sparkContext
            sc.parallelize(range(args.cores), args.cores).count()  # start the Python workers
            empty_s, _ = _timed(sc.parallelize(range(args.tasks), args.tasks).count)
            spark_s, report = _timed(convert_on_spark, spark, tars, "webdataset", str(work / "s"))
            resume_s, _ = _timed(convert_on_spark, spark, tars, "webdataset", str(work / "s"))
        finally:
            spark.stop()
    assert report["written"] == local["written"], "the engines disagree"
    samples = local["read"]
    result = {
        "samples": samples,
        "tars": args.tars,
        "cores": args.cores,
        "local_workers_samples_per_s": round(samples / local_s, 1),
        "spark_local_samples_per_s": round(samples / spark_s, 1),
        "spark_over_local_time": round(spark_s / local_s, 2),
        "spark_session_start_s": round(start_s, 2),
        "spark_empty_task_overhead_ms": round(1000 * empty_s / args.tasks, 1),
        "spark_seconds_per_part": round(spark_s / args.tars, 3),
        "spark_rerun_all_parts_reused_s": round(resume_s, 2),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
