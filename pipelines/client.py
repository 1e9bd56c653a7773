"""``kfp.Client`` construction and the errors users hit, turned into one clear sentence."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class KfpClientError(RuntimeError):
    """Talking to the KFP API failed; the message says why and what to do."""


#: Where a pod finds its projected service-account token for the KFP API (audience pipelines.kubeflow.org):
#: ``$KF_PIPELINES_SA_TOKEN_PATH`` or this default (kfp.client.KF_PIPELINES_SA_TOKEN_PATH).
SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_DEFAULT = "/var/run/secrets/kubeflow/pipelines/token"
#: Environment variable with the namespace of a multi-user KFP profile (below --namespace, above the kube context).
NAMESPACE_ENV = "ANYFLOW_NAMESPACE"
#: The namespace standalone KFP runs every pod in (the one it is installed in).
STANDALONE_NAMESPACE = "kubeflow"
#: Oldest KFP backend whose driver applies the pod security context of kfp-kubernetes (by our reading of the
#: backend source; older backends drop it silently, see docs/cluster.md).
MIN_BACKEND = (2, 16)


@dataclass(frozen=True)
class Backend:
    """What ``/apis/v1beta1/healthz`` told about the KFP backend (``None``: it did not say)."""

    multi_user: bool | None = None
    version: str | None = None


@dataclass(frozen=True)
class Connection:
    """A ``kfp.Client`` with the namespace the run's pods will run in."""

    client: Any
    namespace: str
    backend: Backend


def sa_token_path() -> str | None:
    """The projected KFP token file when running in a pod that has one, else ``None``."""
    path = os.environ.get(SA_TOKEN_ENV) or SA_TOKEN_DEFAULT
    return path if os.path.isfile(path) else None


def kube_context_namespace() -> str | None:
    """The namespace of the current kube context (``kubectl config set-context --current --namespace``)."""
    try:
        from kubernetes import config as kconfig

        # KUBECONFIG read now (the client's default path is fixed when it is first imported)
        _, active = kconfig.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG") or None)
    except Exception:  # no kubeconfig, or an unreadable one: there is simply no context namespace
        return None
    return ((active or {}).get("context") or {}).get("namespace") or None


def resolve_namespace(flag: str | None, multi_user: bool | None) -> str:
    """The namespace a run's pods (and so the S3 secret, the cache PVC, launched jobs) live in.

    Multi-user KFP: the user's profile namespace, from ``--namespace``, ``$ANYFLOW_NAMESPACE`` or the current
    kube context, in that order (an error names all three). Standalone KFP runs pods in the namespace it is
    installed in: ``--namespace``, ``$ANYFLOW_NAMESPACE``, else ``kubeflow``.
    """
    chosen = flag or os.environ.get(NAMESPACE_ENV) or None
    if multi_user:
        chosen = chosen or kube_context_namespace()
        if not chosen:
            raise KfpClientError(
                "this Kubeflow Pipelines is multi-user: runs live in your profile namespace; pass --namespace "
                f"<profile> (or set {NAMESPACE_ENV}, or a namespace in the current kube context).")
        return chosen
    return chosen or STANDALONE_NAMESPACE


def _version_tuple(text: str) -> tuple[int, ...] | None:
    parts = text.lstrip("v").split("-")[0].split(".")
    try:
        return tuple(int(p) for p in parts[:2])
    except ValueError:
        return None


def backend_warning(backend: Backend) -> str | None:
    """A sentence when the backend is known to be older than :data:`MIN_BACKEND`, else ``None``."""
    found = _version_tuple(backend.version or "")
    if found is None or found >= MIN_BACKEND:
        return None
    need = ".".join(map(str, MIN_BACKEND))
    return (f"the KFP backend is {backend.version}; anyflow needs >= {need}: older drivers drop the pods' security "
            "context (non-root user) silently. Upgrade Kubeflow Pipelines.")


def read_token_file(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace removed); :class:`KfpClientError` naming the file
    when it cannot be read or is empty."""
    try:
        token = Path(path).expanduser().read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise KfpClientError(f"cannot read the KFP token file {path} ({why}); pass a readable file to "
                             "--existing-token-file or set KFP_TOKEN.") from None
    if not token:
        raise KfpClientError(f"the KFP token file {path} is empty; write the bearer token into it.")
    return token


def connect(host: str | None, namespace: str | None = None, existing_token: str | None = None,
            cookies: str | None = None, ssl_ca_cert: str | None = None, verify_ssl: bool | None = None,
            existing_token_file: str | None = None) -> Connection:
    """A ``kfp.Client`` for ``host`` (or ``$KFP_HOST``) and the namespace its runs use.

    Credentials: ``existing_token``, else the token in ``existing_token_file``, else ``$KFP_TOKEN`` (a token on
    the command line is visible to other users in ``ps``; the file and the environment are not), else cookies,
    else — in a pod — the projected service-account token (``kfp.Client(host=...)`` ignores it unless passed as
    ``credentials=``).
    """
    import kfp

    host = host or os.environ.get("KFP_HOST")
    if not host:
        raise KfpClientError("no KFP host given; pass --host https://<kfp-endpoint> (or set KFP_HOST).")
    token = (existing_token or (read_token_file(existing_token_file) if existing_token_file else None)
             or os.environ.get("KFP_TOKEN") or None)
    credentials = None
    token_file = None if (token or cookies) else sa_token_path()
    if token_file:
        from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

        credentials = ServiceAccountTokenVolumeCredentials(path=token_file)
    header_token = token or (Path(token_file).read_text().strip() if token_file else None)
    backend = preflight(host, token=header_token, cookies=cookies, verify_ssl=verify_ssl is not False,
                        ca_file=ssl_ca_cert)
    warning = backend_warning(backend)
    if warning:
        print(f"anyflow: warning: {warning}", file=sys.stderr)
    ns = resolve_namespace(namespace, backend.multi_user)
    with friendly_errors(host):
        client = kfp.Client(host=host, namespace=ns, existing_token=token, cookies=cookies,
                            ssl_ca_cert=ssl_ca_cert, verify_ssl=verify_ssl, credentials=credentials)
    return Connection(client, ns, backend)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect (to a login page) is reported, not followed


def preflight(host: str, *, token: str | None = None, cookies: str | None = None, verify_ssl: bool = True,
              ca_file: str | None = None, timeout_s: float = 10.0) -> Backend:
    """GET the healthz endpoint once (the call ``kfp.Client`` makes first, but which it retries for 25 s on any
    error), turn refusal, auth walls and login redirects into one sentence, and return what it says.

    ``/apis/v1beta1/healthz`` (still served by KFP 2.x) carries ``multi_user`` and the backend's ``tag_name``;
    a backend without it is asked ``/apis/v2beta1/healthz`` (``multi_user`` only)."""
    for api in ("v1beta1", "v2beta1"):
        found = _healthz(host, api, token=token, cookies=cookies, verify_ssl=verify_ssl, ca_file=ca_file,
                         timeout_s=timeout_s)
        if found is not None:
            return found
    return Backend()


def _healthz(host: str, api: str, *, token: str | None, cookies: str | None, verify_ssl: bool,
             ca_file: str | None, timeout_s: float) -> Backend | None:
    url = host.rstrip("/") + f"/apis/{api}/healthz"
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if cookies:
        headers["Cookie"] = cookies
    context = None
    if url.startswith("https"):
        context = ssl.create_default_context(cafile=ca_file)
        if not verify_ssl:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout_s) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403) or 300 <= exc.code < 400:
            what = f"redirected to a login page (HTTP {exc.code})" if exc.code < 400 else f"refused the request (HTTP {exc.code})"
            raise KfpClientError(
                f"the KFP API at {host} {what}; pass --existing-token-file (or set KFP_TOKEN) or --cookies for your "
                "Kubeflow login."
            ) from None
        return None  # other statuses (404: an API version this backend lacks): ask the next / let kfp.Client report
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KfpClientError(
            f"cannot reach the KFP API at {host} ({type(reason).__name__}); check --host and that the endpoint "
            "(or 'kubectl port-forward svc/ml-pipeline-ui') is up."
        ) from None
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        return Backend()
    if not isinstance(doc, dict):
        return Backend()
    multi = doc.get("multi_user", doc.get("multiUser"))
    version = doc.get("tag_name") or doc.get("tagName")
    return Backend(multi_user=bool(multi) if multi is not None else None, version=str(version) if version else None)


def _root_cause(exc: BaseException) -> BaseException:
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
    return seen


@contextlib.contextmanager
def friendly_errors(host: str) -> Iterator[None]:
    """Map connection and HTTP errors from kfp / kfp_server_api to :class:`KfpClientError`."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    try:
        yield
    except ApiException as exc:
        if exc.status in (401, 403):
            raise KfpClientError(
                f"the KFP API at {host} refused the request (HTTP {exc.status}); pass --existing-token-file "
                "(or set KFP_TOKEN) or --cookies for your Kubeflow login."
            ) from None
        if exc.status == 404:
            raise KfpClientError(f"the KFP API at {host} has no such object or endpoint (HTTP 404): {exc.reason}.") from None
        raise KfpClientError(f"the KFP API at {host} answered HTTP {exc.status} {exc.reason}: {(exc.body or '')[:200]}") from None
    except (urllib3.exceptions.HTTPError, ConnectionError, OSError) as exc:
        cause = _root_cause(exc)
        raise KfpClientError(
            f"cannot reach the KFP API at {host} ({type(cause).__name__}); check --host and that the endpoint "
            "(or 'kubectl port-forward svc/ml-pipeline-ui') is up."
        ) from None
