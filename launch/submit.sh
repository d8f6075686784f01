#!/usr/bin/env bash
# Submit a distmerge merge, or a whole zoo batch, to a Ray cluster with `ray job submit`.
#
#   launch/submit.sh [merge|batch] ADDRESS CONFIG [key=value ...]      (no subcommand: merge)
#   launch/submit.sh http://head:8265 configs/many_adapters_ray.yaml output.path=/shared/merged/nightly
#   launch/submit.sh batch http://head:8265 /shared/zoo/zoo_nightly.yaml --only support-bot
#
# The job's working_dir carries exactly the distmerge package and the config (or zoo file), so the cluster
# needs only torch, safetensors, omegaconf, pyyaml, tqdm and ray. Adapter paths, output.path and output_root
# must be absolute paths on storage every node sees. Environment:
#   DISTMERGE_SUBMISSION_ID  Ray submission id. batch default: distmerge-<zoo name>-<UTC date>, so a second
#                            trigger the same day finds the job and exits 0 instead of running it twice.
#   DISTMERGE_DRIVER_CPUS    CPUs the driver reserves (--entrypoint-num-cpus), default 1; 0 reserves none
#                            (a CPU-only cluster of <= 4 CPUs: set runtime.num_workers, see launch/README.md).
#   DISTMERGE_SUBMIT_FLAGS   extra `ray job submit` flags, e.g. "--no-wait".
set -euo pipefail
usage() { sed -n '2,/^[^#]/{/^#/p}' "$0" >&2; exit 2; }
command=merge
case "${1:-}" in merge|batch) command="$1"; shift ;; esac
[ $# -ge 2 ] || usage
address="$1"; config="$2"; shift 2
[ -f "$config" ] || { echo "config $config does not exist" >&2; exit 2; }

if [ "$command" = batch ]; then
  entrypoint=(python -m distmerge batch config.yaml defaults.runtime.executor=ray)  # runtime: under defaults
  name="$(basename -- "$config")"
  default_id="distmerge-${name%.*}-$(date -u +%F)"
  submission_id="${DISTMERGE_SUBMISSION_ID:-$(printf '%s' "$default_id" | LC_ALL=C tr '[:upper:]' '[:lower:]' \
    | LC_ALL=C tr -c 'a-z0-9-' '-' | tr -s '-' | sed 's/^-*//; s/-*$//')}"
else
  entrypoint=(python -m distmerge merge config.yaml runtime.executor=ray)
  submission_id="${DISTMERGE_SUBMISSION_ID:-}"
fi

id_flags=()
if [ -n "$submission_id" ]; then
  # The id is the guard against a double trigger: Ray refuses a second submission with it, and this
  # check turns "already there" into a line and exit 0 rather than an error.
  if status_out="$(ray job status --address "$address" "$submission_id" 2>&1)"; then
    state="$(printf '%s\n' "${status_out//"$submission_id"/}" \
      | grep -oiE 'pending|running|succeeded|failed|stopped' | head -n 1 | LC_ALL=C tr '[:lower:]' '[:upper:]' || true)"
    echo "submission $submission_id already exists on $address (${state:-status unknown}); not submitting" \
         "it again (set DISTMERGE_SUBMISSION_ID to submit under another id)"
    exit 0
  elif ! grep -qiE 'does not exist|not found' <<<"$status_out"; then
    echo "warning: could not ask $address about $submission_id ($(tail -n 1 <<<"$status_out")); submitting" \
         "anyway: Ray refuses a submission id that already exists" >&2
  fi
  id_flags=(--submission-id "$submission_id")
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
job_dir="$(mktemp -d "${TMPDIR:-/tmp}/distmerge-job.XXXXXX")"
trap 'rm -rf "$job_dir"' EXIT
cp -r "$root/distmerge" "$job_dir/distmerge"
find "$job_dir" -name __pycache__ -prune -exec rm -rf {} +
cp "$config" "$job_dir/config.yaml"
runtime_env=$(printf '{"working_dir": "%s", "env_vars": {"PYTHONUNBUFFERED": "1"}}' "$job_dir")
# The driver reserves its own CPU so the merge workers cannot starve it of the head node.
# shellcheck disable=SC2086
ray job submit --address "$address" ${id_flags[@]+"${id_flags[@]}"} --entrypoint-num-cpus "${DISTMERGE_DRIVER_CPUS:-1}" \
  --runtime-env-json "$runtime_env" ${DISTMERGE_SUBMIT_FLAGS:-} -- "${entrypoint[@]}" "$@"
