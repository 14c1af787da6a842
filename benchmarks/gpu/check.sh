#!/usr/bin/env bash
# The GPU check of sims: one script, <= 5 minutes on one H200 (see README.md beside this file).
#
#   benchmarks/gpu/check.sh              # the real run (CUDA): JSONs + summary.md into $OUT, else benchmarks/results/gpu/
#   benchmarks/gpu/check.sh --dry-run    # every section at toy size on the CPU, same schema (CI: tests/test_gpu_check.py)
#   benchmarks/gpu/check.sh --cpu        # the CPU figures: CIFAR-10 DDPM++ vs diffusers, compile speed-up (batch 8)
#
# Options: --budget SECONDS (whole run, default 300; dry run 600; cpu 4800), --sections a,b,c, --out DIR,
# and any of check.py's run options after --  (e.g. -- --batch 256).
# Each section's JSON is written as soon as it finishes (and after every row), so a run cut off
# still returns its figures; a crashed Python process is restarted for the sections left.
set -u
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
MODE=gpu
BUDGET=
SECTIONS=
OUTDIR=${OUT:-}
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) MODE=dry-run ;;
    --cpu) MODE=cpu ;;
    --budget) BUDGET=$2; shift ;;
    --sections) SECTIONS=$2; shift ;;
    --out) OUTDIR=$2; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) echo "check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$BUDGET" ]; then
  case "$MODE" in gpu) BUDGET=300 ;; dry-run) BUDGET=600 ;; cpu) BUDGET=4800 ;; esac
fi
if [ -z "$OUTDIR" ]; then
  case "$MODE" in
    gpu) OUTDIR=$ROOT/benchmarks/results/gpu ;;
    dry-run) OUTDIR=$ROOT/benchmarks/results/gpu-dry-run ;;
    cpu) OUTDIR=$ROOT/benchmarks/results/gpu-cpu ;;
  esac
fi
mkdir -p "$OUTDIR"
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

# 1. What the machine lacks, from the cp312 wheels in .whl/ (never from a registry).
NOTE=""
if [ -d "$ROOT/.whl" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  MISSING=$("$PY" - "$ROOT/.whl" <<'EOF'
import importlib.util, pathlib, sys
names = {"torch_fidelity": "torch_fidelity", "antlr4_python3_runtime": "antlr4", "pyyaml": "yaml"}
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    dist = whl.name.split("-")[0].lower()
    if importlib.util.find_spec(names.get(dist, dist)) is None:
        print(whl)
EOF
)
  if [ -n "$MISSING" ]; then
    SITE=${SIMS_SITE:-/tmp/sims-site}
    # shellcheck disable=SC2086
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $MISSING; then
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
      NOTE="installed from .whl into $SITE: $(for f in $MISSING; do basename "$f"; done | tr '\n' ' ')"
    else
      NOTE="pip install from .whl failed for: $(for f in $MISSING; do basename "$f"; done | tr '\n' ' ')"
    fi
  else
    NOTE="every package in .whl is already importable; nothing installed"
  fi
else
  NOTE="no .whl folder: nothing installed (sections needing diffusers / torch-fidelity report not built or a stand-in)"
fi
echo "install: $NOTE"
export SIMS_GPU_INSTALL_NOTE="$NOTE"

# 2. Sections in order of value, each under its cap and the run's deadline (check.py).
for f in train pytest sampling compile adm fd loader; do rm -f "$OUTDIR/$f.json"; done
rm -f "$OUTDIR/summary.md"
DEADLINE=$((START + BUDGET - 10))   # 10 s for the summary
ARGS=(run --mode "$MODE" --out "$OUTDIR" --deadline "$DEADLINE")
[ -n "$SECTIONS" ] && ARGS+=(--sections "$SECTIONS")
RC=1
for attempt in 1 2 3; do
  LEFT=$((DEADLINE - $(date +%s)))
  [ "$LEFT" -le 5 ] && break
  timeout --signal=TERM --kill-after=5 "$LEFT" "$PY" "$ROOT/benchmarks/gpu/check.py" "${ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
  RC=$?
  [ "$RC" -eq 0 ] && break
  [ "$RC" -eq 2 ] && break   # usage error / no CUDA: retrying will not help
  echo "check.sh: check.py exited with $RC (attempt $attempt); starting it again for the sections left" >&2
done

# 3. The summary table (one Markdown file) from whatever JSONs exist.
"$PY" "$ROOT/benchmarks/gpu/check.py" summary --out "$OUTDIR"
echo "check.sh: $MODE run in $(( $(date +%s) - START )) s; files in $OUTDIR:"
ls "$OUTDIR"
exit "$RC"
