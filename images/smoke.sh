#!/usr/bin/env bash
# Smoke-test a built train image the way a cluster runs it: as its non-root user, read-only root
# filesystem, no network, writable /tmp only. Runs the whole tiny pipeline (KFP local runner inside the
# image) twice and checks that the second run is served from the store cache.
#   images/smoke.sh IMAGE            e.g. images/smoke.sh ghcr.io/anyflow/anyflow-train:v0.1.0-<sha>
# Env: ENGINE (the engine command, e.g. docker or "podman --runtime runc"; default docker), ENGINE_RUN_FLAGS (extra flags for `run`).
set -euo pipefail

image="${1:?usage: images/smoke.sh IMAGE}"
read -r -a engine <<< "${ENGINE:-docker}"
read -r -a extra <<< "${ENGINE_RUN_FLAGS:-}"
run=("${engine[@]}" run --rm --network none --read-only --tmpfs /tmp:rw,size=4g,mode=1777 "${extra[@]}" "${image}")

fail() { echo "smoke: FAIL: $*" >&2; exit 1; }

uid="$("${run[@]}" id -u)"
[[ "${uid}" != "0" ]] || fail "the image runs as root"
echo "smoke: runs as uid ${uid}"

"${run[@]}" anyflow --help > /dev/null || fail "anyflow --help"
if "${run[@]}" sh -c 'touch /opt/anyflow/x' 2> /dev/null; then fail "the root filesystem is writable"; fi

log="$(mktemp)"
trap 'rm -f "${log}"' EXIT
# Both runs in one container: /tmp (the store) lives as long as the container.
"${run[@]}" sh -c 'anyflow run --workdir /tmp/runs > /tmp/first.log 2>&1 || { tail -40 /tmp/first.log; exit 1; }
                   tail -3 /tmp/first.log
                   anyflow run --workdir /tmp/runs 2>&1' > "${log}" || { cat "${log}"; fail "anyflow run"; }
grep -q "report.html: /tmp/runs/runs/" "${log}" || { cat "${log}"; fail "no report"; }
for stage in prepare_data train_teacher train_flowmap distill evaluate; do
  grep -q "\[anyflow\] ${stage}: reused cached artifact" "${log}" || fail "second run recomputed ${stage}"
done
echo "smoke: OK (${image}): non-root, read-only root, no network; anyflow run twice, second run all cached"
