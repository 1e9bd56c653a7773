"""``kfp.Client`` construction and the errors users hit, turned into one clear sentence."""

from __future__ import annotations

import contextlib
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any


class KfpClientError(RuntimeError):
    """Talking to the KFP API failed; the message says why and what to do."""


def make_client(host: str | None, namespace: str = "kubeflow", existing_token: str | None = None,
                cookies: str | None = None, ssl_ca_cert: str | None = None, verify_ssl: bool | None = None) -> Any:
    """A ``kfp.Client`` from the standard options (token also from ``$KFP_TOKEN``)."""
    import kfp

    host = host or os.environ.get("KFP_HOST")
    if not host:
        raise KfpClientError("no KFP host given; pass --host https://<kfp-endpoint> (or set KFP_HOST).")
    token = existing_token or os.environ.get("KFP_TOKEN") or None
    preflight(host, token=token, cookies=cookies, verify_ssl=verify_ssl is not False, ca_file=ssl_ca_cert)
    with friendly_errors(host):
        return kfp.Client(host=host, namespace=namespace, existing_token=token, cookies=cookies,
                          ssl_ca_cert=ssl_ca_cert, verify_ssl=verify_ssl)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect (to a login page) is reported, not followed


def preflight(host: str, *, token: str | None = None, cookies: str | None = None, verify_ssl: bool = True,
              ca_file: str | None = None, timeout_s: float = 10.0) -> None:
    """GET ``/apis/v2beta1/healthz`` once (the call ``kfp.Client`` makes first, but which it retries for
    25 s on any error) and turn refusal, auth walls and login redirects into one sentence."""
    url = host.rstrip("/") + "/apis/v2beta1/healthz"
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
        with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout_s):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403) or 300 <= exc.code < 400:
            what = f"redirected to a login page (HTTP {exc.code})" if exc.code < 400 else f"refused the request (HTTP {exc.code})"
            raise KfpClientError(
                f"the KFP API at {host} {what}; pass --existing-token (or set KFP_TOKEN) or --cookies for your "
                "Kubeflow login."
            ) from None
        return  # other statuses: let kfp.Client report them
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KfpClientError(
            f"cannot reach the KFP API at {host} ({type(reason).__name__}); check --host and that the endpoint "
            "(or 'kubectl port-forward svc/ml-pipeline-ui') is up."
        ) from None


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
                f"the KFP API at {host} refused the request (HTTP {exc.status}); pass --existing-token "
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
