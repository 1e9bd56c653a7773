#!/usr/bin/env bash
# Acceptance on a real cluster: kind + KFP 2.17 standalone + Kubeflow Trainer v2.3 (docs/cluster.md).
# Each step prints what it checks and stops at the first failure (exit 1).
#
#   scripts/cluster-acceptance.sh [--dry-run] [--host URL] [--image IMAGE] [--namespace NS] [--bucket NAME]
#                                 [--kueue-queue NAME]
#
# Options (flags win over env): --host / $KFP_HOST (default http://localhost:8080, KFP's UI port-forward),
# --image / $ANYFLOW_IMAGE (the train image, loaded into kind), --namespace / $ANYFLOW_NAMESPACE (where KFP
# standalone runs pipeline pods; default kubeflow), --bucket / $ANYFLOW_BUCKET (default anyflow).
# S3 keys for the local MinIO: $ANYFLOW_S3_ACCESS_KEY / $ANYFLOW_S3_SECRET_KEY (default: random; an
# existing anyflow-s3 secret is kept). --kueue-queue / $ANYFLOW_KUEUE_QUEUE: a Kueue LocalQueue in NS (Kueue
# >= v0.17 with the trainer.kubeflow.org/trainjob integration, installed by you); without it that step is skipped.
# --dry-run prints every command and every object, touches no cluster.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${KFP_HOST:-http://localhost:8080}"
IMAGE="${ANYFLOW_IMAGE:-}"
NS="${ANYFLOW_NAMESPACE:-kubeflow}"
BUCKET="${ANYFLOW_BUCKET:-anyflow}"
KUEUE_QUEUE="${ANYFLOW_KUEUE_QUEUE:-}"
DRY_RUN=0
TIMEOUT_S="${ANYFLOW_ACCEPTANCE_TIMEOUT_S:-1800}"

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --host) HOST="$2"; shift ;;
    --image) IMAGE="$2"; shift ;;
    --namespace) NS="$2"; shift ;;
    --bucket) BUCKET="$2"; shift ;;
    --kueue-queue) KUEUE_QUEUE="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "cluster-acceptance: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$IMAGE" ]; then
  if [ "$DRY_RUN" = 1 ]; then IMAGE="<image>"; else
    echo "cluster-acceptance: set --image or ANYFLOW_IMAGE (the anyflow train image, loaded into kind)" >&2; exit 2
  fi
fi

STORE="s3://${BUCKET}/acceptance"
ENDPOINT="http://anyflow-minio.${NS}.svc.cluster.local:9000"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/anyflow-acceptance.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
ANYFLOW=(anyflow)
command -v anyflow >/dev/null 2>&1 || ANYFLOW=("${ROOT}/.venv/bin/anyflow")
KFP=(--host "$HOST" --namespace "$NS")
STEP=0

step() { STEP=$((STEP + 1)); printf '\n== step %d: %s\n' "$STEP" "$*"; }
check() { printf 'check: %s\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; }
fail() { printf 'FAIL (step %d): %s\n' "$STEP" "$*" >&2; exit 1; }
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }
# run CMD...: print it, run it unless --dry-run
run() { show "$@"; [ "$DRY_RUN" = 1 ] || "$@"; }
# capture VAR PLACEHOLDER CMD...: print it; VAR = its stdout (--dry-run: PLACEHOLDER)
capture() {
  local var="$1" placeholder="$2"; shift 2
  show "$@"
  if [ "$DRY_RUN" = 1 ]; then printf -v "$var" '%s' "$placeholder"; return; fi
  local out; out="$("$@")" || fail "command failed: $*"
  printf '%s\n' "$out"
  printf -v "$var" '%s' "$out"
}
kfp_api() {  # kfp_api METHOD PATH: KFP REST API v2beta1 (standalone: no auth; $KFP_TOKEN if set)
  local auth=()
  [ -n "${KFP_TOKEN:-}" ] && auth=(-H "Authorization: Bearer ${KFP_TOKEN}")
  curl -fsS -X "$1" "${auth[@]}" "${HOST%/}/apis/v2beta1/$2"
}
run_id_of() { sed -n 's/^submitted run \([^ ]*\).*/\1/p' <<<"$1" | tail -1; }
# wait_run RUN_ID WANT: poll `anyflow status` until a terminal state; fail unless it is WANT
wait_run() {
  local id="$1" want="$2" state="" waited=0
  check "run $id reaches $want (timeout ${TIMEOUT_S}s)"
  show "${ANYFLOW[@]}" status "$id" "${KFP[@]}"
  [ "$DRY_RUN" = 1 ] && return 0
  while [ "$waited" -lt "$TIMEOUT_S" ]; do
    state="$("${ANYFLOW[@]}" status "$id" "${KFP[@]}" | awk 'NR==1 {print $2}')"
    case "$state" in
      SUCCEEDED|FAILED|CANCELED|SKIPPED) break ;;
    esac
    sleep 15; waited=$((waited + 15))
  done
  [ "$state" = "$want" ] || { "${ANYFLOW[@]}" status "$id" "${KFP[@]}" >&2 || true; fail "run $id ended $state, expected $want"; }
  ok "run $id $state"
}
store_cat_cmd() {  # store_cat_cmd KEY: STORE_CAT = the command that prints a store object, inside the MinIO pod
  STORE_CAT=(kubectl -n "$NS" exec deploy/anyflow-minio -- sh -c
    "mc --config-dir /tmp/mc alias set local http://127.0.0.1:9000 \"\$MINIO_ROOT_USER\" \"\$MINIO_ROOT_PASSWORD\" >/dev/null && mc --config-dir /tmp/mc cat local/${BUCKET}/acceptance/$1")
}
# store_cat KEY: print the command (the very one a user can paste) and run it
store_cat() { store_cat_cmd "$1"; show "${STORE_CAT[@]}" >&2; "${STORE_CAT[@]}"; }
trainjobs() { kubectl -n "$NS" get trainjobs.trainer.kubeflow.org -l app.kubernetes.io/part-of=anyflow -o name; }
# wait_new_trainjob BEFORE: the first TrainJob not in BEFORE (the names listed before the run)
wait_new_trainjob() {
  local before="$1" waited=0 name
  show kubectl -n "$NS" get trainjobs.trainer.kubeflow.org -l app.kubernetes.io/part-of=anyflow -o name
  if [ "$DRY_RUN" = 1 ]; then NEW_TRAINJOB="trainjob.trainer.kubeflow.org/TRAINJOB"; return; fi
  while [ "$waited" -lt 900 ]; do
    name="$(comm -13 <(sort <<<"$before") <(trainjobs | sort) | head -1)"
    [ -n "$name" ] && { NEW_TRAINJOB="$name"; ok "launched $name"; return; }
    sleep 10; waited=$((waited + 10))
  done
  fail "no TrainJob appeared within 900s"
}

# workflow_json RUN_ID: the Argo Workflow KFP created for the run (label pipeline/runid: kubeflow/pipelines
# 2.17.0 backend/src/common/util/consts.go LabelKeyWorkflowRunId)
workflow_json() { kubectl -n "$NS" get workflows.argoproj.io -l "pipeline/runid=$1" -o json; }
# check_no_cache_hit RUN_ID: no KFP driver of the run decided "cached" (Argo output parameter cached-decision:
# 2.17.0 backend/src/v2/compiler/argocompiler/argo.go paramCachedDecision; the executor pod is skipped on true)
check_no_cache_hit() {
  show kubectl -n "$NS" get workflows.argoproj.io -l "pipeline/runid=$1" -o json
  [ "$DRY_RUN" = 1 ] && return 0
  workflow_json "$1" | python3 -c '
import json, sys
wf = json.load(sys.stdin)["items"][0]
hits = [n.get("displayName") for n in wf["status"]["nodes"].values()
        for p in (n.get("outputs") or {}).get("parameters", []) if p["name"] == "cached-decision" and p.get("value") == "true"]
drivers = sum(1 for n in wf["status"]["nodes"].values()
              for p in (n.get("outputs") or {}).get("parameters", []) if p["name"] == "cached-decision")
print(f"drivers: {drivers}, cache hits: {hits}")
sys.exit(0 if drivers and not hits else 1)' || fail "run $1 took a task from KFP's cache"
  ok "no task of run $1 came from KFP's cache"
}
# check_loop RUN_ID MIN_ITERATIONS MAX_ITERATIONS PARALLELISM: the run's ParallelFor (KFP 2.17.0 argocompiler
# dag.go iteratorTask: template parallelism = iteratorPolicy.parallelismLimit; withSequence over the driver's
# iteration count) ran MIN..MAX iterations, never more than PARALLELISM at once (Argo v4.0.5 operator.go
# checkParallelism); with 0 the loop node is Skipped ("Skipped, empty params", Argo v4.0.5 dag.go) and the run
# must still succeed
check_loop() {
  show kubectl -n "$NS" get workflows.argoproj.io -l "pipeline/runid=$1" -o json
  [ "$DRY_RUN" = 1 ] && return 0
  workflow_json "$1" | python3 -c '
import json, re, sys
from datetime import datetime
lo, hi, par = map(int, sys.argv[1:4])
wf = json.load(sys.stdin)["items"][0]
limits = {t["name"]: t.get("parallelism") for t in wf["spec"]["templates"] if t["name"].endswith("-iterator")}
its = [n for n in wf["status"]["nodes"].values() if re.match(r"iteration-iterations\(\d+", n.get("displayName", ""))]
ts = lambda v: datetime.strptime(v, "%Y-%m-%dT%H:%M:%SZ").timestamp()
events = sorted([(ts(n["startedAt"]), 1) for n in its] + [(ts(n["finishedAt"]), -1) for n in its], key=lambda e: (e[0], e[1]))
peak = now = 0
for _, d in events:
    now += d; peak = max(peak, now)
phases = sorted(n["phase"] for n in its)
print(f"iterator templates: {limits}; iterations: {len(its)} {phases}; most at once: {peak}")
good = list(limits.values()) == [par] and lo <= len(its) <= hi and peak <= par and set(phases) <= {"Succeeded"}
sys.exit(0 if good else 1)' "$2" "$3" "$4" || fail "run $1: the ParallelFor did not run $2..$3 iterations at most $4 at once"
  ok "run $1: ParallelFor $2..$3 iterations, at most $4 at once"
}
# check_fails_in RUN_ID WORD: a node whose Argo displayName contains WORD failed, and no prepare-partition or
# prepare-data (merge) node ran (KFP 2.17.0 argocompiler names a task's DAG node after the task)
check_fails_in() {
  show kubectl -n "$NS" get workflows.argoproj.io -l "pipeline/runid=$1" -o json
  [ "$DRY_RUN" = 1 ] && return 0
  workflow_json "$1" | python3 -c '
import json, sys
word = sys.argv[1]
wf = json.load(sys.stdin)["items"][0]
nodes = [(n.get("displayName", ""), n.get("phase")) for n in wf["status"]["nodes"].values()]
failed = [d for d, p in nodes if p in ("Failed", "Error") and word in d]
ran = [d for d, p in nodes if p == "Succeeded" and ("prepare-partition" in d or d.startswith("prepare-data"))]
print(f"failed {word} nodes: {failed}; partition/merge nodes that ran: {ran}")
sys.exit(0 if failed and not ran else 1)' "$2" || fail "run $1 did not fail in its $2 task before the partition pods"
  ok "run $1 failed in its $2 task; no partition or merge pod ran"
}

# check_cpu_merge RUN_ID CPU_REQUEST MEMORY_LIMIT: every pod of the merge task (the Argo DAG node "prepare-data": KFP
# 2.17.0 argocompiler dag.go names a container task "<task>-driver" + "<task>"; its "executor" child is the pod, or,
# with retries, a Retry node whose children "executor(0)", ... are: container.go retry-system-container-impl) asked
# for no GPU and for the platform's prepare_merge CPU request and memory limit (compared as quantities: the driver
# writes them from the task's resource fields, backend/src/v2/driver/driver.go). Pods found by Argo v4.0.5's label
# workflows.argoproj.io/workflow and annotation workflows.argoproj.io/node-id (workflow/common/common.go)
check_cpu_merge() {
  show kubectl -n "$NS" get pods -l "workflows.argoproj.io/workflow=WORKFLOW_OF_$1" -o json
  [ "$DRY_RUN" = 1 ] && return 0
  local wf="${WORK}/workflow-$1.json" name
  workflow_json "$1" >"$wf" || fail "no workflow for run $1"
  name="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["items"][0]["metadata"]["name"])' "$wf")"
  kubectl -n "$NS" get pods -l "workflows.argoproj.io/workflow=$name" -o json | python3 -c '
import json, re, sys
nodes = json.load(open(sys.argv[1]))["items"][0]["status"]["nodes"]
want_cpu, want_mem = sys.argv[2:4]
def qty(v):
    n, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(v)).groups()
    return float(n) * {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
                       "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[unit]
def pods_under(ids):
    out = set()
    for i in ids:
        n = nodes.get(i, {})
        out |= {i} if n.get("type") == "Pod" else pods_under(n.get("children", []))
    return out
merge = [i for i, n in nodes.items() if n.get("displayName") == "prepare-data"]
pod_ids = pods_under([c for i in merge for c in nodes[i].get("children", [])])
pods = [p for p in json.load(sys.stdin)["items"]
        if p["metadata"].get("annotations", {}).get("workflows.argoproj.io/node-id") in pod_ids]
names = [p["metadata"]["name"] for p in pods]
res = [c.get("resources", {}) for p in pods for c in p["spec"]["containers"] if c["name"] == "main"]
print(f"merge pods: {names}; main container resources: {res}; want cpu request {want_cpu}, memory limit {want_mem}")
good = [r for r in res if not any(k.startswith("nvidia.com/") or "gpu" in k for part in ("limits", "requests")
                                  for k in r.get(part, {}))
        and abs(qty(r.get("requests", {}).get("cpu", -1)) - qty(want_cpu)) < 1e-6 * qty(want_cpu)
        and abs(qty(r.get("limits", {}).get("memory", -1)) - qty(want_mem)) < 1e-6 * qty(want_mem)]
sys.exit(0 if res and len(good) == len(res) else 1)' "$wf" "$2" "$3" \
    || fail "run $1: no merge pod found, or one asked for a GPU or not for the prepare_merge profile's resources"
  ok "run $1: the merge pod ran without a GPU, on the prepare_merge profile"
}

echo "anyflow cluster acceptance: host=$HOST namespace=$NS image=$IMAGE store=$STORE dry-run=$DRY_RUN"

step "prerequisites (this script does not install them)"
cat <<'PRE'
Expected on the kind cluster (install them yourself first):
  kind create cluster --name anyflow
  export PIPELINE_VERSION=2.17.0
  kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=$PIPELINE_VERSION"
  kubectl wait --for condition=established --timeout=60s crd/applications.app.k8s.io
  kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=$PIPELINE_VERSION"
  kubectl apply --server-side -k "github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=v2.3.0"
  kubectl apply --server-side -k "github.com/kubeflow/trainer.git/manifests/overlays/runtimes?ref=v2.3.0"
  kind load docker-image "$ANYFLOW_IMAGE" --name anyflow
  kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80 &
PRE
check "KFP API server, Trainer CRD and the torch-distributed runtime are installed"
run kubectl -n "$NS" get deployment ml-pipeline workflow-controller
run kubectl get crd trainjobs.trainer.kubeflow.org
run kubectl get clustertrainingruntimes.trainer.kubeflow.org torch-distributed

step "S3 secret anyflow-s3 in $NS (kept if it exists: never overwritten)"
check "secret anyflow-s3 has AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
ACCESS="${ANYFLOW_S3_ACCESS_KEY:-anyflow-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')}"
SECRET="${ANYFLOW_S3_SECRET_KEY:-$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')}"
if [ "$DRY_RUN" = 1 ] || ! kubectl -n "$NS" get secret anyflow-s3 >/dev/null 2>&1; then
  printf '+ kubectl -n %q create secret generic anyflow-s3 --from-literal=AWS_ACCESS_KEY_ID=<access key> --from-literal=AWS_SECRET_ACCESS_KEY=<secret key>\n' "$NS"
  [ "$DRY_RUN" = 1 ] || kubectl -n "$NS" create secret generic anyflow-s3 \
    --from-literal=AWS_ACCESS_KEY_ID="$ACCESS" --from-literal=AWS_SECRET_ACCESS_KEY="$SECRET" >/dev/null
fi
if [ "$DRY_RUN" = 0 ]; then
  keys="$(kubectl -n "$NS" get secret anyflow-s3 -o jsonpath='{.data.AWS_ACCESS_KEY_ID}{" "}{.data.AWS_SECRET_ACCESS_KEY}')"
  [ "$(wc -w <<<"$keys")" -eq 2 ] || fail "secret anyflow-s3 lacks AWS_ACCESS_KEY_ID or AWS_SECRET_ACCESS_KEY"
  ok "secret anyflow-s3"
fi

step "apply the local overlay (standalone + anyflow-minio) in $NS"
OVERLAY="${ROOT}/manifests/overlays/local"
if [ "$NS" != kubeflow ]; then  # the local overlay says kubeflow: wrap it for another namespace
  OVERLAY="${WORK}/overlay"; mkdir -p "$OVERLAY"
  LOCAL_REL="$(python3 -c 'import os,sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "${ROOT}/manifests/overlays/local" "$OVERLAY")"
  cat >"${OVERLAY}/kustomization.yaml" <<KUST
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: ${NS}
resources:
  - ${LOCAL_REL}  # kustomize refuses absolute paths
replacements:
  - source: {kind: RoleBinding, name: anyflow-launcher, fieldPath: metadata.namespace}
    targets:
      - select: {kind: RoleBinding, name: anyflow-launcher}
        fieldPaths: ["subjects.[kind=ServiceAccount].namespace"]
        options: {create: true}
KUST
fi
check "the objects below render (kubectl kustomize) and apply"
show kubectl kustomize "$OVERLAY"
kubectl kustomize "$OVERLAY" >"${WORK}/objects.yaml" || fail "kubectl kustomize $OVERLAY failed"
cat "${WORK}/objects.yaml"
run kubectl apply -f "${WORK}/objects.yaml"
check "anyflow-minio is ready and bucket $BUCKET exists"
run kubectl -n "$NS" rollout status deployment/anyflow-minio --timeout=300s
run kubectl -n "$NS" exec deploy/anyflow-minio -- sh -c \
  "mc --config-dir /tmp/mc alias set local http://127.0.0.1:9000 \"\$MINIO_ROOT_USER\" \"\$MINIO_ROOT_PASSWORD\" && mc --config-dir /tmp/mc mb --ignore-existing local/${BUCKET}"
PLATFORM="${WORK}/platform.yaml"
sed "s#^s3_endpoint: .*#s3_endpoint: ${ENDPOINT}#" "${ROOT}/manifests/overlays/local/platform.yaml" >"$PLATFORM"
check "platform for the pipeline pods (s3_endpoint = the anyflow-minio Service):"
cat "$PLATFORM"

step "compile and run the tiny pipeline; wait for success"
check "anyflow-t2v compiles with the local platform and image"
run "${ANYFLOW[@]}" compile --pipeline anyflow-t2v --platform "$PLATFORM" --image "$IMAGE" --output "${WORK}/anyflow-t2v.yaml"
capture OUT "submitted run RUN_ID" "${ANYFLOW[@]}" submit "${KFP[@]}" --pipeline anyflow-t2v --preset tiny \
  --store "$STORE" --image "$IMAGE" --platform "$PLATFORM" --run-name anyflow-acceptance-tiny
RUN="$(run_id_of "$OUT")"; [ -n "$RUN" ] || fail "no run id in: $OUT"
wait_run "$RUN" SUCCEEDED

step "cached rerun of one stage (evaluate) from run $RUN"
capture OUT "submitted run RERUN_ID" "${ANYFLOW[@]}" rerun --stage evaluate --run "$RUN" --store "$STORE" \
  "${KFP[@]}" --preset tiny --image "$IMAGE" --platform "$PLATFORM" --run-name anyflow-acceptance-rerun
RERUN="$(run_id_of "$OUT")"; [ -n "$RERUN" ] || fail "no run id in: $OUT"
wait_run "$RERUN" SUCCEEDED
check "the rerun's evaluate record says cached (runs/$RERUN/evaluate.json)"
store_cat_cmd "runs/${RERUN}/evaluate.json"; show "${STORE_CAT[@]}"
if [ "$DRY_RUN" = 0 ]; then
  store_cat "runs/${RERUN}/evaluate.json" | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if d.get("cached") else 1)' \
    || fail "evaluate was recomputed, not taken from the cache"
  ok "evaluate cached"
fi

step "forced rerun of evaluate (--force): KFP's cache off for the rerun's tasks, evaluate computed anew"
capture OUT "submitted run FORCE_RUN_ID" "${ANYFLOW[@]}" rerun --stage evaluate --run "$RUN" --store "$STORE" --force \
  "${KFP[@]}" --preset tiny --image "$IMAGE" --platform "$PLATFORM" --run-name anyflow-acceptance-force
FRUN="$(run_id_of "$OUT")"; [ -n "$FRUN" ] || fail "no run id in: $OUT"
wait_run "$FRUN" SUCCEEDED
check "every KFP driver of run $FRUN decided cached-decision=false (compiled enableCache false; 2.17.0 driver container.go)"
check_no_cache_hit "$FRUN"
check "the forced evaluate record says computed, not cached (runs/$FRUN/evaluate.json)"
store_cat_cmd "runs/${FRUN}/evaluate.json"; show "${STORE_CAT[@]}"
if [ "$DRY_RUN" = 0 ]; then
  store_cat "runs/${FRUN}/evaluate.json" | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(1 if d.get("cached") else 0)' \
    || fail "evaluate was taken from the store's cache despite --force"
  ok "evaluate recomputed"
fi

step "partitioned prepare_data: ParallelFor over the fingerprint task's list, 2 pods at once, a merge-only task; then an empty list"
PLATFORMP="${WORK}/platform-partitions.yaml"
cp "$PLATFORM" "$PLATFORMP"
# distinctive merge resources (the local platform's defaults apply to every other stage) and a retry, so that
# check_cpu_merge tells the prepare_merge profile from any other and finds the pod under Argo's Retry node
printf 'partition_parallelism: 2\nprepare_fanout: true\nstages:\n  prepare_merge: {cpu_request: 300m, memory_limit: 3Gi, retries: 1}\n' >>"$PLATFORMP"
check "platform with partition_parallelism 2 and prepare_fanout (the merge task only merges, on the prepare_merge profile):"
cat "$PLATFORMP"
for pass in 1 2 3; do
  SIZE=4; WANT=SUCCEEDED
  [ "$pass" = 3 ] && { SIZE=0; WANT=FAILED; }
  capture OUT "submitted run PARTITIONS${pass}_RUN_ID" "${ANYFLOW[@]}" rerun --stage prepare_data --store "$STORE" \
    "${KFP[@]}" --preset tiny --set "data.partition_size=${SIZE}" --set data.source=procedural:n=16,seed=7 \
    --image "$IMAGE" --platform "$PLATFORMP" --run-name "anyflow-acceptance-partitions-${pass}"
  PRUN="$(run_id_of "$OUT")"; [ -n "$PRUN" ] || fail "no run id in: $OUT"
  wait_run "$PRUN" "$WANT"
  if [ "$pass" = 1 ]; then
    check "pass 1: the 4 partitions of 16 clips each ran in a prepare_partition iteration, at most 2 at once"
    check_loop "$PRUN" 4 4 2
    check "pass 1: the merge pod ran on the CPU-only prepare_merge profile"
    check_cpu_merge "$PRUN" 300m 3Gi
  elif [ "$pass" = 2 ]; then
    check "pass 2: every partition is in the store: the list is empty, no iteration runs and the merge still runs"
    check_loop "$PRUN" 0 0 2
  else
    check "pass 3: data.partition_size=0 under prepare_fanout fails in the fingerprint task, before any partition pod"
    check_fails_in "$PRUN" fingerprint
  fi
done

step "schedule anyflow-redistill (KFP recurring run, every minute), see it fire once, disable it"
TEACHER="TEACHER_URI"
store_cat_cmd "runs/${RUN}/train_teacher.json"; show "${STORE_CAT[@]}"
if [ "$DRY_RUN" = 0 ]; then
  TEACHER="$(store_cat "runs/${RUN}/train_teacher.json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["uri"])')" \
    || fail "no train_teacher record for run $RUN"
fi
capture OUT "created recurring run RECURRING_RUN_ID" "${ANYFLOW[@]}" schedule "${KFP[@]}" --cron "* * * * *" \
  --pipeline anyflow-redistill --max-concurrency 1 --run-name anyflow-acceptance-redistill \
  --image "$IMAGE" --platform "$PLATFORM" --store "$STORE" \
  --param source=procedural:n=16,seed=1 --param "teacher_uri=${TEACHER}"
RR="$(sed -n 's/^created recurring run \([^ ]*\).*/\1/p' <<<"$OUT" | tail -1)"; [ -n "$RR" ] || fail "no recurring run id in: $OUT"
check "recurring run $RR starts a run within 180s"
show curl -fsS -X GET "${HOST%/}/apis/v2beta1/runs?namespace=${NS}&page_size=100&sort_by=created_at%20desc"
FIRED="SCHEDULED_RUN_ID"
if [ "$DRY_RUN" = 0 ]; then
  FIRED=""
  for _ in $(seq 1 18); do
    FIRED="$(kfp_api GET "runs?namespace=${NS}&page_size=100&sort_by=created_at%20desc" | RR="$RR" python3 -c \
      'import json,os,sys; print(next((r["run_id"] for r in json.load(sys.stdin).get("runs", []) if r.get("recurring_run_id") == os.environ["RR"]), ""))')"
    [ -n "$FIRED" ] && break; sleep 10
  done
  [ -n "$FIRED" ] || fail "recurring run $RR did not fire within 180s"
  ok "fired run $FIRED"
fi
show curl -fsS -X POST "${HOST%/}/apis/v2beta1/recurringruns/${RR}:disable"
[ "$DRY_RUN" = 1 ] || kfp_api POST "recurringruns/${RR}:disable" >/dev/null || fail "cannot disable recurring run $RR"
wait_run "$FIRED" SUCCEEDED
show curl -fsS -X DELETE "${HOST%/}/apis/v2beta1/recurringruns/${RR}"
[ "$DRY_RUN" = 1 ] || kfp_api DELETE "recurringruns/${RR}" >/dev/null || fail "cannot delete recurring run $RR"

step "2-node CPU TrainJob (gloo): train_teacher with num_nodes 2, gpus 0"
PLATFORM2="${WORK}/platform-2node.yaml"
cp "$PLATFORM" "$PLATFORM2"
printf 'stages:\n  train_teacher:\n    num_nodes: 2\n    gpus: 0\n' >>"$PLATFORM2"
check "platform for the multi-node stage:"
cat "$PLATFORM2"
BEFORE=""; [ "$DRY_RUN" = 1 ] || BEFORE="$(trainjobs)"
capture OUT "submitted run TRAINJOB_RUN_ID" "${ANYFLOW[@]}" rerun --stage train_teacher --run "$RUN" --store "$STORE" \
  "${KFP[@]}" --preset tiny --image "$IMAGE" --platform "$PLATFORM2" --run-name anyflow-acceptance-2node
TJRUN="$(run_id_of "$OUT")"; [ -n "$TJRUN" ] || fail "no run id in: $OUT"
check "the run launches a TrainJob with numNodes 2 and no GPU request"
wait_new_trainjob "$BEFORE"
run kubectl -n "$NS" get "$NEW_TRAINJOB" -o 'jsonpath={.spec.trainer.numNodes}{" "}{.spec.trainer.resourcesPerNode}{"\n"}'
if [ "$DRY_RUN" = 0 ]; then
  [ "$(kubectl -n "$NS" get "$NEW_TRAINJOB" -o jsonpath='{.spec.trainer.numNodes}')" = 2 ] || fail "$NEW_TRAINJOB is not 2 nodes"
  ! kubectl -n "$NS" get "$NEW_TRAINJOB" -o json | grep -q 'nvidia.com/gpu' || fail "$NEW_TRAINJOB asks for GPUs"
fi
wait_run "$TJRUN" SUCCEEDED

step "cancel a run mid-stage: its TrainJob is deleted"
BEFORE=""; [ "$DRY_RUN" = 1 ] || BEFORE="$(trainjobs)"
capture OUT "submitted run CANCEL_RUN_ID" "${ANYFLOW[@]}" rerun --stage train_teacher --run "$RUN" --store "$STORE" \
  "${KFP[@]}" --preset tiny --set teacher.train.steps=100000 --image "$IMAGE" --platform "$PLATFORM2" \
  --run-name anyflow-acceptance-cancel
CRUN="$(run_id_of "$OUT")"; [ -n "$CRUN" ] || fail "no run id in: $OUT"
wait_new_trainjob "$BEFORE"
check "terminating run $CRUN deletes $NEW_TRAINJOB within 180s"
show curl -fsS -X POST "${HOST%/}/apis/v2beta1/runs/${CRUN}:terminate"
[ "$DRY_RUN" = 1 ] || kfp_api POST "runs/${CRUN}:terminate" >/dev/null || fail "cannot terminate run $CRUN"
run kubectl -n "$NS" wait --for=delete "$NEW_TRAINJOB" --timeout=180s

step "Kueue: a 2-node TrainJob labelled with the LocalQueue is admitted as one workload (skipped without --kueue-queue)"
if [ -z "$KUEUE_QUEUE" ]; then
  check "skipped: no --kueue-queue / ANYFLOW_KUEUE_QUEUE (needs Kueue >= v0.17 with trainer.kubeflow.org/trainjob)"
else
  run kubectl -n "$NS" get localqueues.kueue.x-k8s.io "$KUEUE_QUEUE"
  PLATFORMQ="${WORK}/platform-kueue.yaml"
  cp "$PLATFORM2" "$PLATFORMQ"
  printf 'kueue_queue: %s\n' "$KUEUE_QUEUE" >>"$PLATFORMQ"
  check "platform for the queued multi-node stage:"
  cat "$PLATFORMQ"
  BEFORE=""; [ "$DRY_RUN" = 1 ] || BEFORE="$(trainjobs)"
  capture OUT "submitted run KUEUE_RUN_ID" "${ANYFLOW[@]}" rerun --stage train_teacher --run "$RUN" --store "$STORE" \
    "${KFP[@]}" --preset tiny --set teacher.train.steps=3 --image "$IMAGE" --platform "$PLATFORMQ" \
    --run-name anyflow-acceptance-kueue
  QRUN="$(run_id_of "$OUT")"; [ -n "$QRUN" ] || fail "no run id in: $OUT"
  wait_new_trainjob "$BEFORE"
  check "$NEW_TRAINJOB carries kueue.x-k8s.io/queue-name=$KUEUE_QUEUE in metadata.labels (what Kueue reads:"
  check "  kubernetes-sigs/kueue jobframework QueueNameForObject) and a Workload owned by it is admitted"
  run kubectl -n "$NS" get "$NEW_TRAINJOB" -o 'jsonpath={.metadata.labels.kueue\.x-k8s\.io/queue-name}{"\n"}'
  show kubectl -n "$NS" get workloads.kueue.x-k8s.io -o json
  if [ "$DRY_RUN" = 0 ]; then
    [ "$(kubectl -n "$NS" get "$NEW_TRAINJOB" -o 'jsonpath={.metadata.labels.kueue\.x-k8s\.io/queue-name}')" = "$KUEUE_QUEUE" ] \
      || fail "$NEW_TRAINJOB has no queue label $KUEUE_QUEUE"
    admitted=""
    for _ in $(seq 1 30); do
      admitted="$(kubectl -n "$NS" get workloads.kueue.x-k8s.io -o json | TJ="${NEW_TRAINJOB##*/}" python3 -c '
import json, os, sys
for w in json.load(sys.stdin)["items"]:
    if any(o.get("kind") == "TrainJob" and o.get("name") == os.environ["TJ"] for o in w["metadata"].get("ownerReferences", [])):
        if any(c["type"] == "Admitted" and c["status"] == "True" for c in w.get("status", {}).get("conditions", [])):
            print(w["metadata"]["name"])')"
      [ -n "$admitted" ] && break; sleep 10
    done
    [ -n "$admitted" ] || fail "no admitted Kueue Workload owned by $NEW_TRAINJOB within 300s"
    ok "workload $admitted admitted"
  fi
  wait_run "$QRUN" SUCCEEDED
fi

printf '\nALL CHECKS PASSED%s\n' "$([ "$DRY_RUN" = 1 ] && echo ' (dry run: nothing was run)')"
