"""Shared fixtures: a real S3 API server (moto server mode on 127.0.0.1) and a fresh prefix per test.

``s3_server`` (session): starts ``moto.server`` as a subprocess, creates a bucket, and sets fake AWS
credentials, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``, ``ANYFLOW_CACHE_DIR`` (a session temp dir) and
``ANYFLOW_S3_RETRY_BASE=0.02`` (fast retry backoff) for the session; ``.client()`` is a plain boto3 client.
``s3_prefix`` (function): a fresh ``s3://<bucket>/<test-name>-<uuid>`` URL.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(_TESTS))
if str(_TESTS.parent) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(1, str(_TESTS.parent))
from s3server import FAKE_ENV, MotoServer  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs on 2 pytest-xdist workers (pyproject addopts) on 2 cores: one compute thread each (and in the
    # processes they start), or each worker's torch takes every core and the two fight over them.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    if "torch" in sys.modules:  # already imported by a plugin: its thread pool would not read the variable
        sys.modules["torch"].set_num_threads(1)


#: The longest test files, longest first (per-file seconds of a full run on 2 workers, 2026-12-07; then
#: test_kfp_local took over the whole-pipeline runs of test_export and test_run_records, one shared run, and
#: test_export's comparisons share one diffusers interpreter: their places re-estimated from per-file ``-n 0``
#: times). They are collected first and, with ``--no-loadscope-reorder`` (pyproject addopts), handed out first:
#: by default pytest-xdist's loadfile queues files by test count, so these few-test, long files started last and
#: one worker ran them alone for minutes at the end. Files not listed keep their order after them.
LONGEST_FIRST = (
    "test_train_resize.py", "test_kfp_local.py", "test_training_quality.py", "test_redistill.py",
    "test_preemption.py", "test_train_zero.py", "test_hangs_and_leaks.py", "test_far_training.py", "test_export.py",
    "test_cli_names.py", "test_component_torchrun.py", "test_train_sharding.py", "test_train_resume_ranks.py",
    "test_eval_batching.py", "test_fault_campaign.py", "test_stages.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest files first (LONGEST_FIRST); a stable sort, so tests keep their order inside a file."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _no_leftover_s3_endpoint() -> Iterator[None]:
    """A test that runs the CLI with ``--s3-endpoint`` sets the storage layer's endpoint for the whole process
    (``storage.configure``, which wins over the environment); reset it after every test, so a later test in the same
    worker that points ``ANYFLOW_S3_ENDPOINT`` elsewhere really talks to that endpoint."""
    yield
    from anyflow import storage

    storage.configure(s3_endpoint=None)


@dataclass
class S3Server:
    """What ``s3_server`` yields."""

    endpoint: str
    bucket: str
    server: MotoServer

    def client(self) -> Any:
        """A plain boto3 client for this server (independent of anyflow.storage)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = MotoServer().start()
    env = {**FAKE_ENV, "AWS_ENDPOINT_URL": server.endpoint,
           "ANYFLOW_CACHE_DIR": str(tmp_path_factory.mktemp("anyflow-cache"))}
    saved = {k: os.environ.get(k) for k in [*env, "ANYFLOW_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"]}
    for k in ("ANYFLOW_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        os.environ.pop(k, None)
    os.environ.update(env)
    info = S3Server(endpoint=server.endpoint, bucket="anyflow-test", server=server)
    try:
        info.client().create_bucket(Bucket=info.bucket)
        yield info
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_prefix(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^a-zA-Z0-9_-]+", "-", request.node.name)[:60].strip("-")
    return f"s3://{s3_server.bucket}/{name}-{uuid.uuid4().hex[:8]}"


# Stage fixtures (tiny preset artifacts shared by the stage, resume and CLI tests).
from pipeline_fixtures import tiny_chain, tiny_store  # noqa: E402, F401
