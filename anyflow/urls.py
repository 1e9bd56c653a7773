"""What an artifact or store location may look like, checked before any work starts.

A location is a local folder (a plain path or ``file://PATH``) or ``s3://BUCKET[/PREFIX]`` (``s3a://`` too).
Anything else that starts like a URL (``s3:/x``, ``s3://``, ``S3//x``-style typos, ``gs://``) is refused with
one sentence instead of silently becoming a local folder named ``s3:`` (which is what a path join makes of
it). Data *sources* (``data.source``: ``procedural:n=…``, indexes, tars) are not locations and are not
checked here.
"""

from __future__ import annotations

import argparse
import re

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
#: ``s3//…`` / ``S3//…`` (the colon left out). A folder really named ``s3`` is still a path: ``s3/x``, ``./s3//x``.
_NO_COLON = re.compile(r"^(s3a?)//", re.IGNORECASE)
#: S3 bucket naming rules (3–63 characters: lowercase letters, digits, dots and hyphens; starts and ends with a
#: letter or digit), which MinIO, Ceph and SeaweedFS enforce as well.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class LocationError(ValueError):
    """A malformed store or artifact location; the message says what a valid one looks like."""


def check_url(url: str, what: str = "location") -> str:
    """``url`` unchanged if it is a local path, ``file://PATH`` or ``s3://BUCKET[/PREFIX]``; else LocationError."""
    u = str(url)
    if not u.strip():
        raise LocationError(f"{what} is empty: give a folder or s3://BUCKET/PREFIX.")
    typo = _NO_COLON.match(u)
    if typo is not None:  # ``s3//bucket/x``: a path join would make it the local folder ./s3/bucket/x
        scheme = typo.group(1).lower()
        raise LocationError(f"{what} {u!r} looks like an S3 URL without its colon: write {scheme}://BUCKET/PREFIX.")
    m = _SCHEME.match(u)
    if m is None:
        return u  # a local path
    scheme, rest = m.group(1), u[m.end():]
    if scheme.lower() == "file":
        if not rest.startswith("//") or not rest[2:]:
            raise LocationError(f"{what} {u!r} is not a file URL: write file:///ABSOLUTE/PATH or just the path.")
        return u
    if scheme in ("s3", "s3a"):
        if not rest.startswith("//"):
            raise LocationError(f"{what} {u!r} is not an S3 URL: write {scheme}://BUCKET/PREFIX (two slashes).")
        bucket = rest[2:].split("/", 1)[0]
        if not bucket:
            raise LocationError(f"{what} {u!r} names no bucket: write {scheme}://BUCKET/PREFIX.")
        if not _BUCKET.match(bucket):
            raise LocationError(f"{what} {u!r}: {bucket!r} is not a valid S3 bucket name (3-63 characters: "
                                "lowercase letters, digits, dots, hyphens).")
        return u
    raise LocationError(f"{what} {u!r}: unsupported scheme {scheme!r}; use s3://BUCKET/PREFIX or a local folder.")


def url_argument(value: str) -> str:
    """``argparse`` type of a store/artifact location: a malformed one is a usage error (exit 2) before any work."""
    try:
        return check_url(value)
    except LocationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def role_url_argument(value: str) -> str:
    """``argparse`` type of ``ROLE=URL`` (``--in``, ``--from``): the URL part checked like :func:`url_argument`."""
    role, sep, url = value.partition("=")
    if not sep or not role:
        raise argparse.ArgumentTypeError(f"{value!r}: expected ROLE=URL, e.g. dataset=s3://bucket/prefix")
    url_argument(url)
    return value
