"""The Ceph RGW peer of the S3 benchmark (bench/rgw.py): its ceph.conf keeps everything in the
run's temp dir and on 127.0.0.1, and (slow) the cluster starts, serves S3 and leaves nothing."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import boto3
import pytest

from bench import rgw, s3_bench


def _config(tmp_path: Path, objectstore: str = "bluestore") -> rgw.RGWConfig:
    return rgw.RGWConfig(
        root=tmp_path, fsid="5b1e2f9c-3d1e-4f0a-9c61-0d6f6e1c2a77", mon_port=40001,
        rgw_port=40002, objectstore=objectstore,
    )  # fmt: skip


@pytest.mark.parametrize("objectstore", ["bluestore", "memstore"])
def test_conf_keeps_every_path_in_the_temp_dir(tmp_path: Path, objectstore: str) -> None:
    text = rgw.render_conf(_config(tmp_path, objectstore))
    paths = re.findall(r"=\s*(/\S*)", text)
    assert paths, text
    assert all(p.startswith(f"{tmp_path}/") for p in paths), paths
    for option in ("run_dir", "admin_socket", "log_file", "pid_file", "mon_data", "osd_data"):
        assert re.search(rf"^{option} = {re.escape(str(tmp_path))}/", text, re.M), option
    assert "mon_host = [v2:127.0.0.1:40001]" in text
    assert "rgw_frontends = beast endpoint=127.0.0.1:40002" in text
    assert f"osd_objectstore = {objectstore}" in text


def test_conf_makes_size_one_pools(tmp_path: Path) -> None:
    text = rgw.render_conf(_config(tmp_path))
    for line in ("osd_pool_default_size = 1", "osd_pool_default_min_size = 1",
                 "mon_allow_pool_size_one = true"):  # fmt: skip
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line


def test_unknown_objectstore_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="objectstore"):
        _config(tmp_path, "filestore")


@pytest.mark.skipif(shutil.which("ceph-conf") is None, reason="ceph-common is not installed")
def test_ceph_reads_the_conf_as_written(tmp_path: Path) -> None:
    """Ceph's own parser sees the values per daemon (a typo'd section or key would not)."""
    cfg = _config(tmp_path)
    cfg.conf_path.write_text(rgw.render_conf(cfg))

    def lookup(name: str, key: str) -> str:
        argv = ["ceph-conf", "-c", str(cfg.conf_path), "--name", name, "--lookup", key]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()

    assert lookup("osd.0", "bluestore_block_path") == f"{tmp_path}/osd.0.block"
    assert lookup("osd.0", "osd_pool_default_size") == "1"
    assert lookup("mon.a", "mon_data") == f"{tmp_path}/mon.a"
    assert lookup("client.rgw.bench", "rgw_frontends") == "beast endpoint=127.0.0.1:40002"
    assert lookup("client.rgw.bench", "log_file") == f"{tmp_path}/log/client.rgw.bench.log"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(bool(rgw.missing_binaries()), reason="Ceph is not installed")
def test_cluster_serves_s3_and_leaves_nothing_behind() -> None:
    with rgw.RGWCluster() as cluster:
        assert cluster.cfg is not None
        root = cluster.cfg.root
        client = s3_bench._client(
            cluster.endpoint, cluster.access_key, cluster.secret_key, unsigned_payload=True
        )
        client.create_bucket(Bucket="smoke")
        body = bytes(range(256)) * 4096 * 5  # 5 MiB: two RADOS objects
        client.put_object(Bucket="smoke", Key="k", Body=body)
        assert client.get_object(Bucket="smoke", Key="k")["Body"].read() == body
        procs = [daemon.proc for _, daemon in cluster._daemons]
        assert len(procs) == 3
        wrong = boto3.client(
            "s3", endpoint_url=cluster.endpoint, aws_access_key_id=cluster.access_key,
            aws_secret_access_key="wrong", region_name="us-east-1",
        )  # fmt: skip
        with pytest.raises(wrong.exceptions.ClientError, match="SignatureDoesNotMatch"):
            wrong.get_object(Bucket="smoke", Key="k")
    assert not root.exists()
    assert all(proc.poll() is not None for proc in procs)
