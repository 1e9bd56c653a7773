#!/usr/bin/env bash
# Build (and optionally push) the AnyFlow images with an immutable tag: v<version>-<gitsha>[-dirty].
#   images/build.sh                 build train + eval
#   images/build.sh --push          build and push; prints ANYFLOW_IMAGE / ANYFLOW_EVAL_IMAGE by digest
#   images/build.sh --print-tag     print the train image reference only
# Env: REGISTRY (default ghcr.io/anyflow), GIT_SHA (default: git rev-parse --short=12 HEAD),
#      ENGINE (default docker; e.g. "podman"), BUILD_FLAGS (extra flags for `build`).
# The eval image is built FROM the train image just built (same tag), adding VBench's own venv.
# Afterwards: export ANYFLOW_IMAGE=<printed train image> and run `anyflow compile/submit`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
registry="${REGISTRY:-ghcr.io/anyflow}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "${root}/pyproject.toml" | head -n 1)"
if [[ -z "${version}" ]]; then
  echo "build.sh: no 'version = \"…\"' line in ${root}/pyproject.toml" >&2
  exit 2
fi
if [[ -z "${GIT_SHA:-}" ]]; then
  GIT_SHA="$(git -C "${root}" rev-parse --short=12 HEAD)"
  if ! git -C "${root}" diff --quiet HEAD -- 2>/dev/null; then
    GIT_SHA="${GIT_SHA}-dirty"
  fi
fi
tag="v${version}-${GIT_SHA}"
train="${registry}/anyflow-train:${tag}"
eval_image="${registry}/anyflow-eval:${tag}"

case "${1:-}" in
  --print-tag) echo "${train}"; exit 0 ;;
  --push|"") ;;
  *) echo "build.sh: unknown option ${1}; use --push or --print-tag" >&2; exit 2 ;;
esac

read -r -a engine <<< "${ENGINE:-docker}"
read -r -a flags <<< "${BUILD_FLAGS:-}"
# ${flags[@]+"${flags[@]}"}: an empty array under `set -u` on bash < 4.4 (macOS) is otherwise an error
"${engine[@]}" build ${flags[@]+"${flags[@]}"} -f "${root}/images/train/Dockerfile" --build-arg VERSION="${version}" \
  --build-arg GIT_SHA="${GIT_SHA}" -t "${train}" "${root}"
"${engine[@]}" build ${flags[@]+"${flags[@]}"} -f "${root}/images/eval/Dockerfile" --build-arg VERSION="${version}" \
  --build-arg GIT_SHA="${GIT_SHA}" --build-arg TRAIN_IMAGE="${train}" -t "${eval_image}" "${root}"
if [[ "${1:-}" == "--push" ]]; then
  "${engine[@]}" push "${train}"
  "${engine[@]}" push "${eval_image}"
  # Pushed: pin by digest (KFP's cache key contains the image string; a digest can never move). A digest names
  # no repository to derive the eval image from, so both are printed.
  digest() { "${engine[@]}" inspect --format '{{index .RepoDigests 0}}' "$1"; }
  echo "export ANYFLOW_IMAGE=$(digest "${train}")"
  echo "export ANYFLOW_EVAL_IMAGE=$(digest "${eval_image}")"
  exit 0
fi
# Not pushed: the tag (the pipelines run evaluate steps on the eval image derived from it: components.eval_image_for).
echo "export ANYFLOW_IMAGE=${train}"
