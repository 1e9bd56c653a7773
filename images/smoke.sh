#!/usr/bin/env bash
# Smoke-test a built train image the way a cluster runs it: as its non-root user, read-only root
# filesystem, no network, writable /tmp and /cache only (the emptyDir / model-cache PVC of a pod). Runs the whole tiny pipeline (KFP local runner inside the
# image) twice and checks that the second run is served from the store cache.
#   images/smoke.sh IMAGE            e.g. images/smoke.sh ghcr.io/anyflow/anyflow-train:v0.1.0-<sha>
#   images/smoke.sh --eval IMAGE     the eval image: also runs VBench (evaluate.vbench=true) and checks
#                                    that temporal_flickering was scored through its /opt/vbench venv
# Env: ENGINE (the engine command, e.g. docker or "podman --runtime runc"; default docker), ENGINE_RUN_FLAGS
#      (extra flags for `run`), CACHE_MOUNT (how /cache -- the pod's model-cache PVC/emptyDir -- is mounted
#      writable for uid 1000; default docker's "--tmpfs /cache:rw,uid=1000,gid=1000"; podman:
#      "--mount type=tmpfs,destination=/cache,U=true").
set -euo pipefail

eval_mode=0
if [[ "${1:-}" == "--eval" ]]; then eval_mode=1; shift; fi
image="${1:?usage: images/smoke.sh [--eval] IMAGE}"
read -r -a engine <<< "${ENGINE:-docker}"
read -r -a extra <<< "${ENGINE_RUN_FLAGS:-}"
read -r -a cache <<< "${CACHE_MOUNT:---tmpfs /cache:rw,uid=1000,gid=1000}"
# ${a[@]+"${a[@]}"}: an empty array under `set -u` on bash < 4.4 (macOS) is otherwise an error
run=("${engine[@]}" run --rm --network none --read-only --tmpfs /tmp:rw,size=4g,mode=1777
     ${cache[@]+"${cache[@]}"} ${extra[@]+"${extra[@]}"} "${image}")

fail() { echo "smoke: FAIL: $*" >&2; exit 1; }

uid="$("${run[@]}" id -u)"
[[ "${uid}" != "0" ]] || fail "the image runs as root"
echo "smoke: runs as uid ${uid}"

"${run[@]}" anyflow --help > /dev/null || fail "anyflow --help"
# $HOME belongs to uid 1000, so only a read-only root filesystem can refuse this write
if "${run[@]}" sh -c 'touch "$HOME/x"' 2> /dev/null; then fail "the root filesystem is writable"; fi

log="$(mktemp)"
trap 'rm -f "${log}"' EXIT
# Both runs in one container: /tmp (the store) lives as long as the container.
# Only the second run's output goes to ${log} (the first run's tail goes to stderr).
"${run[@]}" sh -c 'anyflow run --workdir /tmp/runs > /tmp/first.log 2>&1 || { tail -40 /tmp/first.log; exit 1; }
                   tail -3 /tmp/first.log >&2
                   anyflow run --workdir /tmp/runs 2>&1' > "${log}" || { cat "${log}"; fail "anyflow run"; }
grep -q "report.html: /tmp/runs/runs/" "${log}" || { cat "${log}"; fail "no report"; }
for stage in prepare_data train_teacher train_flowmap distill evaluate; do
  grep -q "\[anyflow\] ${stage}: reused cached artifact" "${log}" || fail "second run recomputed ${stage}"
done
echo "smoke: OK (${image}): non-root, read-only root, no network; anyflow run twice, second run all cached"

if [[ "${eval_mode}" == 1 ]]; then
  # shellcheck disable=SC2016
  "${run[@]}" sh -c 'anyflow run --workdir /tmp/runs --set evaluate.vbench=true > /tmp/vbench.log 2>&1 \
                       || { tail -40 /tmp/vbench.log; exit 1; }
                     python - <<"PY"
import glob, json, sys
scores = []
for path in glob.glob("/tmp/runs/store/artifacts/evaluate/*/metrics.json"):
    for entry, res in (json.load(open(path)).get("vbench") or {}).items():
        dim = res.get("dimensions", {}).get("temporal_flickering", {})
        if dim.get("status") == "ok":
            scores.append((entry, dim["score"]))
if not scores:
    sys.exit("no VBench temporal_flickering score in any evaluate artifact")
print("smoke: VBench temporal_flickering", ", ".join(f"{e}={s:.4f}" for e, s in sorted(scores)))
PY' || fail "VBench in the eval image"
  echo "smoke: OK (${image}): VBench ran through \$ANYFLOW_VBENCH_PYTHON"
fi
