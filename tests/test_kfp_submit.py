"""``anyflow submit`` / ``schedule`` / ``runs`` / ``status`` with the real ``kfp.Client`` pointed at a local
recording HTTP server that answers the KFP v2beta1 endpoints the client calls (no KFP API server can run
here without a cluster). We assert on the requests the real client sends."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers.kfp_api import Recorder, serve

from anyflow import cli
from pipelines.compile import COMPILED_DIR

IMAGE = "registry.example/ml/anyflow-train@sha256:" + "ab" * 32


@pytest.fixture
def kfp_server() -> Iterator[tuple[str, Recorder]]:
    rec = Recorder()
    with serve(rec) as url:
        yield url, rec


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    monkeypatch.delenv("KFP_TOKEN", raising=False)


def _golden(name: str, image: str = IMAGE) -> tuple[dict, dict]:
    """The committed YAML with its placeholder image replaced by ``image`` (what ``--image`` must do and no more;
    an image pinned by digest is used for the evaluate steps too: ``components.eval_image_for``)."""
    from components import IMAGE_PLACEHOLDER

    text = (COMPILED_DIR / f"{name}.yaml").read_text()
    text = text.replace(IMAGE_PLACEHOLDER, image).replace(IMAGE_PLACEHOLDER.replace("-train", "-eval"), image)
    docs = list(yaml.safe_load_all(text))
    return docs[0], docs[1]


def test_submit_sends_compiled_spec_and_parameters(kfp_server, capsys) -> None:
    url, rec = kfp_server
    rc = cli.main(["submit", "--host", url, "--run-name", "nightly", "--experiment", "anyflow-exp",
                   "--store", "s3://bucket/anyflow", "--param", "finetune=true", "--image", IMAGE])
    assert rc == 0 and "submitted run run-123" in capsys.readouterr().out
    runs = [r for r in rec.requests if r["method"] == "POST" and r["path"].startswith("/apis/v2beta1/runs")]
    assert len(runs) == 1
    body = runs[0]["body"]
    spec, platform = _golden("anyflow-t2v")
    assert body["pipeline_spec"]["pipeline_spec"] == spec  # exactly the committed compiled pipeline
    assert body["pipeline_spec"]["platform_spec"] == platform
    assert body["runtime_config"]["parameters"] == {"preset": "tiny", "overrides_json": "{}",
                                                   "store": "s3://bucket/anyflow", "finetune": True}
    assert body["display_name"] == "nightly" and body["experiment_id"] == "exp-1"
    exp = [r for r in rec.requests if r["method"] == "POST" and r["path"].startswith("/apis/v2beta1/experiments")]
    assert exp[0]["body"]["display_name"] == "anyflow-exp"


def test_submit_unreachable_host_is_one_sentence(capsys) -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = cli.main(["submit", "--host", f"http://127.0.0.1:{port}", "--image", IMAGE])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(f"anyflow submit: error: cannot reach the KFP API at http://127.0.0.1:{port}")


def test_submit_missing_auth_then_token(kfp_server, capsys) -> None:
    url, rec = kfp_server
    rec.token = "s3cr3t"
    assert cli.main(["submit", "--host", url, "--image", IMAGE]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "refused the request (HTTP 401)" in err and "--existing-token" in err
    rec.requests.clear()
    assert cli.main(["submit", "--host", url, "--existing-token", "s3cr3t", "--image", IMAGE]) == 0
    assert all(r["auth"] == "Bearer s3cr3t" for r in rec.requests)


def test_schedule_creates_recurring_run_with_kfp_cron(kfp_server, capsys) -> None:
    url, rec = kfp_server
    rc = cli.main(["schedule", "--host", url, "--cron", "0 3 * * *", "--show", "2", "--run-name", "redistill",
                   "--image", IMAGE])
    out = capsys.readouterr().out
    assert rc == 0 and "KFP cron (seconds first): 0 0 3 * * *" in out and "created recurring run rr-7" in out
    assert out.count("next: ") == 2
    body = next(r for r in rec.requests if r["path"].startswith("/apis/v2beta1/recurringruns"))["body"]
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert body["display_name"] == "redistill" and int(body["max_concurrency"]) == 1 and body["no_catchup"] is True
    spec = body["pipeline_spec"].get("pipeline_spec", body["pipeline_spec"])
    assert spec == _golden("anyflow-t2v")[0]


def test_schedule_invalid_cron_needs_no_host(capsys) -> None:
    assert cli.main(["schedule", "--cron", "0 3 * *", "--dry-run"]) == 2
    assert "has 4 fields" in capsys.readouterr().err


def test_runs_and_status(kfp_server, capsys) -> None:
    url, _ = kfp_server
    assert cli.main(["runs", "--host", url]) == 0
    assert "run-123  RUNNING" in capsys.readouterr().out
    assert cli.main(["status", "run-123", "--host", url]) == 0
    assert "run-123  SUCCEEDED" in capsys.readouterr().out


def test_cli_errors_for_unknown_preset_and_pipeline(kfp_server, capsys, tmp_path: Path) -> None:
    url, _ = kfp_server
    assert cli.main(["submit", "--host", url, "--preset", "huge", "--image", IMAGE]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    assert cli.main(["compile", "--pipeline", "nope", "-o", str(tmp_path / "x.yaml")]) == 2
    assert "unknown pipeline 'nope'" in capsys.readouterr().err
    assert cli.main(["rerun", "--stage", "distill", "--from", f"dataset={tmp_path}", "--from",
                        f"teacher={tmp_path}", "--from", f"flowmap={tmp_path}"]) == 2
    assert "is not an anyflow artifact" in capsys.readouterr().err
    assert cli.main(["rerun", "--stage", "distil"]) == 2
    assert "unknown stage 'distil'" in capsys.readouterr().err


@pytest.mark.parametrize("code", ["EACCES", "EPERM", "EROFS", "ENOTDIR"])
def test_run_with_unwritable_workdir_is_one_sentence(code: str, capsys, monkeypatch, tmp_path: Path) -> None:
    # In the train image the root filesystem is read-only: `anyflow run` in the image's working folder
    # must say where it cannot write, not print a traceback (seen building the image). Which errno the
    # kernel gives depends on the user and the mount, so each is raised where the runner creates its folder.
    import errno
    import os

    import pipelines.local

    where = str(tmp_path / "runs" / "kfp-local")

    def refuse(workdir):
        num = getattr(errno, code)
        raise OSError(num, os.strerror(num), where)

    monkeypatch.setattr(pipelines.local, "init_local", refuse)
    assert cli.main(["run", "--workdir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"anyflow run: error: cannot write {where}: {os.strerror(getattr(errno, code))}"), err
    assert "--workdir" in err and "Traceback" not in err


def test_unwritable_real_path_and_other_os_errors(capsys, monkeypatch, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(["run", "--workdir", str(a_file / "runs")]) == 2  # a real ENOTDIR, no patching
    assert "Not a directory" in capsys.readouterr().err

    import pipelines.local

    def full(workdir):
        raise OSError(28, "No space left on device")  # not "unwritable": must not be reworded as such

    monkeypatch.setattr(pipelines.local, "init_local", full)
    with pytest.raises(OSError, match="No space left"):
        cli.main(["run", "--workdir", str(tmp_path / "runs")])


# --------------------------------------------------------------------------- cluster truths of the KFP commands


@pytest.fixture
def no_kube(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No kube context, no namespace variable, no pod token: each test adds what it needs."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("ANYFLOW_NAMESPACE", raising=False)
    monkeypatch.delenv("KFP_HOST", raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-token"))
    return tmp_path


def _experiment_bodies(rec: Recorder) -> list[dict]:
    return [r["body"] for r in rec.requests if r["method"] == "POST" and r["path"].startswith("/apis/v2beta1/experiments")]


def test_submit_refuses_the_placeholder_image(kfp_server, no_kube, capsys) -> None:
    url, rec = kfp_server
    assert cli.main(["submit", "--host", url]) == 2
    err = capsys.readouterr().err
    assert "needs the image its pods pull" in err and "--image" in err and "ANYFLOW_IMAGE" in err
    assert not [r for r in rec.requests if r["method"] == "POST"]  # refused before anything was sent
    assert cli.main(["rerun", "--stage", "prepare_data", "--host", url]) == 2
    assert "needs the image its pods pull" in capsys.readouterr().err


def test_compile_without_image_says_it_wrote_the_placeholder(tmp_path: Path, no_kube, capsys, monkeypatch) -> None:
    out = tmp_path / "p.yaml"
    assert cli.main(["compile", "--pipeline", "anyflow-rerun-prepare-data", "-o", str(out)]) == 0
    assert "placeholder image" in capsys.readouterr().err
    assert "unset-pass-image" in out.read_text()
    assert cli.main(["compile", "--pipeline", "anyflow-rerun-prepare-data", "-o", str(out), "--image", IMAGE]) == 0
    assert "placeholder" not in capsys.readouterr().err and "unset-pass-image" not in out.read_text()


def test_standalone_runs_in_kfps_namespace_and_flag_wins(kfp_server, no_kube, capsys, monkeypatch) -> None:
    url, _ = kfp_server
    assert cli.main(["submit", "--host", url, "--image", IMAGE]) == 0
    assert "namespace kubeflow" in capsys.readouterr().out
    monkeypatch.setenv("ANYFLOW_NAMESPACE", "ml-pipelines")
    assert cli.main(["submit", "--host", url, "--image", IMAGE]) == 0
    assert "namespace ml-pipelines" in capsys.readouterr().out
    assert cli.main(["submit", "--host", url, "--image", IMAGE, "--namespace", "other"]) == 0
    assert "namespace other" in capsys.readouterr().out


def test_multi_user_needs_a_profile_namespace(kfp_server, no_kube, capsys, monkeypatch) -> None:
    url, rec = kfp_server
    rec.multi_user = True
    assert cli.main(["submit", "--host", url, "--image", IMAGE]) == 2
    err = capsys.readouterr().err
    assert "multi-user" in err and "--namespace" in err and "ANYFLOW_NAMESPACE" in err and "kube context" in err
    assert not _experiment_bodies(rec)
    # the kube context's namespace (a real kubeconfig file read by the kubernetes client)
    kubeconfig = no_kube / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "team",
        "contexts": [{"name": "team", "context": {"cluster": "c", "user": "u", "namespace": "team-ctx"}}],
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}], "users": [{"name": "u", "user": {}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert cli.main(["submit", "--host", url, "--image", IMAGE]) == 0
    assert _experiment_bodies(rec)[-1]["namespace"] == "team-ctx"
    monkeypatch.setenv("ANYFLOW_NAMESPACE", "team-env")  # the variable beats the context
    assert cli.main(["submit", "--host", url, "--image", IMAGE]) == 0
    assert _experiment_bodies(rec)[-1]["namespace"] == "team-env"
    assert cli.main(["submit", "--host", url, "--image", IMAGE, "--namespace", "team-flag"]) == 0  # the flag beats both
    assert _experiment_bodies(rec)[-1]["namespace"] == "team-flag"


def test_in_pod_the_projected_token_is_sent(kfp_server, no_kube) -> None:
    # kfp.Client(host=...) applies no default credentials; a pod's projected token must be passed explicitly.
    url, rec = kfp_server
    token = no_kube / "token"
    token.write_text("pod-token\n")
    import os

    os.environ["KF_PIPELINES_SA_TOKEN_PATH"] = str(token)  # restored by the no_kube fixture's monkeypatch
    rec.token = "pod-token"
    assert cli.main(["submit", "--host", url, "--image", IMAGE]) == 0
    assert rec.requests and all(r["auth"] == "Bearer pod-token" for r in rec.requests)
    assert any(r["path"].startswith("/apis/v2beta1/runs") for r in rec.requests)


@pytest.mark.parametrize(("version", "warned"), [("2.14.0", True), ("2.16.0", False), ("2.17.0", False), (None, False)])
def test_old_backend_is_named(kfp_server, no_kube, capsys, version, warned) -> None:
    url, rec = kfp_server
    rec.version = version  # None: a backend without the v1beta1 healthz (v2beta1 is asked instead)
    assert cli.main(["submit", "--host", url, "--image", IMAGE]) == 0
    err = capsys.readouterr().err
    assert ("needs >= 2.16" in err) is warned, err


def test_kfp_host_from_the_environment_for_every_command(kfp_server, no_kube, capsys, monkeypatch, tmp_path) -> None:
    url, rec = kfp_server
    monkeypatch.setenv("KFP_HOST", url)
    assert cli.main(["runs"]) == 0
    assert "run-123  RUNNING" in capsys.readouterr().out
    assert cli.main(["status", "run-123"]) == 0
    assert "run-123  SUCCEEDED" in capsys.readouterr().out
    # rerun with KFP_HOST set goes to the cluster (it used to train locally on CPU)
    assert cli.main(["rerun", "--stage", "prepare_data", "--image", IMAGE, "--store", "s3://bkt/p"]) == 0
    assert any(r["path"].startswith("/apis/v2beta1/runs") and r["method"] == "POST" for r in rec.requests)
    assert not (tmp_path / "anyflow-runs").exists()


def test_flags_a_pipeline_does_not_declare_are_errors(kfp_server, no_kube, capsys) -> None:
    url, rec = kfp_server
    base = ["submit", "--host", url, "--image", IMAGE, "--pipeline", "anyflow-redistill"]
    required = ["--store", "s3://bkt/p", "--param", "source=s3://bkt/videos/", "--param", "teacher_uri=s3://bkt/t"]
    assert cli.main([*base, "--store", "s3://bkt/p"]) == 2  # source and teacher_uri are required
    err = capsys.readouterr().err
    assert "needs --param for source, teacher_uri" in err
    assert cli.main([*base, *required, "--preset", "wan2.1-t2v-1.3b"]) == 2
    assert "no parameter for --preset" in capsys.readouterr().err
    assert cli.main([*base, *required, "--set", "distill.train.steps=2"]) == 2
    assert "no parameter for --set" in capsys.readouterr().err
    assert not [r for r in rec.requests if r["method"] == "POST"]
    assert cli.main([*base, *required]) == 0
    run = next(r["body"] for r in rec.requests if r["method"] == "POST" and r["path"].startswith("/apis/v2beta1/runs"))
    assert run["runtime_config"]["parameters"] == {"store": "s3://bkt/p", "source": "s3://bkt/videos/",
                                                   "teacher_uri": "s3://bkt/t"}
