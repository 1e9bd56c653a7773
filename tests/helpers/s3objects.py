"""Read objects of the test S3 server (the ``s3_server`` fixture) with its plain boto3 client, by ``s3://`` URL."""

from __future__ import annotations

from typing import Any


def key(s3_server: Any, url: str) -> str:
    """The object key of ``url`` (``s3://<the test bucket>/KEY``)."""
    return url.split(f"s3://{s3_server.bucket}/", 1)[1]


def get(s3_server: Any, url: str) -> bytes:
    """The bytes of the object at ``url``."""
    return s3_server.client().get_object(Bucket=s3_server.bucket, Key=key(s3_server, url))["Body"].read()


def keys(s3_server: Any, prefix: str) -> list[str]:
    """The sorted keys of the objects under ``prefix/``."""
    resp = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=key(s3_server, prefix) + "/")
    return sorted(o["Key"] for o in resp.get("Contents", []))
