#!/usr/bin/env bash
# Submit a distmerge merge to a Ray cluster with `ray job submit`.
#
#   launch/submit.sh ADDRESS CONFIG [key=value ...]
#   launch/submit.sh http://head:8265 configs/many_adapters_ray.yaml output.path=/shared/merged/nightly
#
# The job's working_dir carries exactly the distmerge package and the config, so the cluster needs only
# torch, safetensors, omegaconf, pyyaml, tqdm and ray. Adapter paths and output.path must be absolute
# paths on storage every node sees. Extra `ray job submit` flags: DISTMERGE_SUBMIT_FLAGS="--no-wait".
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
address="$1"; config="$2"; shift 2
[ -f "$config" ] || { echo "config $config does not exist" >&2; exit 2; }
root="$(cd "$(dirname "$0")/.." && pwd)"
job_dir="$(mktemp -d "${TMPDIR:-/tmp}/distmerge-job.XXXXXX")"
trap 'rm -rf "$job_dir"' EXIT
cp -r "$root/distmerge" "$job_dir/distmerge"
find "$job_dir" -name __pycache__ -prune -exec rm -rf {} +
cp "$config" "$job_dir/config.yaml"
runtime_env=$(printf '{"working_dir": "%s", "env_vars": {"PYTHONUNBUFFERED": "1"}}' "$job_dir")
# shellcheck disable=SC2086
ray job submit --address "$address" --runtime-env-json "$runtime_env" ${DISTMERGE_SUBMIT_FLAGS:-} -- \
  python -m distmerge merge config.yaml runtime.executor=ray "$@"
