#!/usr/bin/env bash
# The project's GPU correctness checks, then its GPU figures, in one call of at most ~6 minutes:
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
# Writes $OUT/gpu.md (device, torch version, one table: correctness rows first, then speed, with
# the exact commands) and copies of the sub-results under $OUT. First the tests written for a GPU
# (they skip without CUDA): the Triton kernels against float64 on the device, real graph capture
# through run / pre-empt / resume, the nvJPEG decode race, no host sync on ordinary steps; then
# tests/ under CUDA; then the measurements. Every step runs under `timeout`; a step that fails
# prints why and the script goes on; steps that no longer fit the time budget (GPU_CHECK_BUDGET_S,
# default 360 s) are skipped, in order. Without CUDA each GPU step prints "skipped: no CUDA" (the
# correctness tests still run, and report their CUDA tests as skipped).
# Environment: PYTHON (default python), FMNIST_DIR (Fashion-MNIST for the demo recipe; default
# .fmnist/ when it exists). A GPU machine without the Debian package gets the data set carried
# along: `mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/* .fmnist/` here (git ignores
# it), then name `.fmnist` in the device call's carry list.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-360}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROWS="$WORK/rows.md"
: > "$ROWS"
START=$SECONDS

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  CUDA=1
else
  CUDA=0
fi

HEADER=$("$PY" - "$CUDA" <<'EOF' 2>&1
import datetime, platform, sys
try:
    import torch
    device = torch.cuda.get_device_name() if sys.argv[1] == "1" else "no CUDA device"
    version = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
except Exception as err:  # noqa: BLE001 - the report is still written
    device, version = "unknown", f"torch not importable ({err})"
print(f"Device: {device}; {version}; host {platform.node()}; "
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.")
EOF
)

write_report() {
  {
    echo "# GPU check"
    echo
    echo "Produced by \`OUT=DIR bash benchmarks/gpu_check.sh\` (one device call, every step bounded by \`timeout\`)."
    echo
    echo "$HEADER"
    echo
    echo "| check | result | command |"
    echo "|---|---|---|"
    cat "$ROWS"
  } > "$OUT/gpu.md"
}

row() {  # check | result | command
  printf '| %s | %s | `%s` |\n' "$1" "$2" "$3" >> "$ROWS"
  echo "== $1: $2"
  write_report
}

# run NAME TIMEOUT_S CMD...: bounded by its timeout and by what is left of the budget
run() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    echo "skipped: out of time budget" > "$WORK/$name.log"
    return 99
  fi
  [ "$limit" -gt "$((left - 5))" ] && limit=$((left - 5))
  echo "-- $name (at most ${limit} s): $*"
  timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "timed out after ${limit} s" >> "$WORK/$name.log"
  fi
  return "$rc"
}

why() {  # the reason a step gave no figure: the last line of its log, made table-safe
  tail -n 1 "$WORK/$1.log" 2>/dev/null | tr '|`' '/ ' | cut -c1-160
}

# median img/s (windows after the first two) and data-wait share from a run's metrics.jsonl
summary() {
  "$PY" - "$1" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl") if line.strip()]
train = [r for r in rows if r["kind"] == "train"]
kept = train[2:] if len(train) > 2 else train
evals = [r for r in rows if r["kind"] == "eval"]
rate = statistics.median(r["img_per_s"] for r in kept)
span = kept[-1]["elapsed_s"] - (train[1]["elapsed_s"] if len(train) > 2 else 0.0)
wait = sum(r["data_time_s"] for r in kept) / max(span, 1e-9)
text = f"{rate:,.0f} img/s (median of {len(kept)} windows), data wait {100 * min(wait, 1):.0f}% of the time"
if evals:
    text += f"; top-1 {evals[-1]['top1']:.2f}% at {train[-1]['elapsed_s']:.1f} s (evaluations included)"
print(text)
EOF
}

ratio_rows() {  # the trainer_overhead table, as "loop X img/s; trainer off A (a x), on B (b x)"
  "$PY" - "$1" <<'EOF'
import sys
cells = []
for line in open(sys.argv[1]):
    parts = [p.strip() for p in line.strip().strip("|").split("|")]
    if len(parts) == 4 and parts[1].replace(",", "").isdigit():
        label = parts[0].replace("`largebatch train`", "trainer").replace("minimal hand-written loop", "bare loop")
        cells.append(f"{label} {parts[1]} img/s ({parts[3]}x)")
print("; ".join(cells))
EOF
}

gpu_step() {  # NAME LABEL TIMEOUT CMD...: a step that needs CUDA, with its sub-result file if any
  local name=$1 label=$2 limit=$3
  shift 3
  if [ "$CUDA" -eq 0 ]; then
    row "$label" "skipped: no CUDA" "$*"
    return 1
  fi
  run "$name" "$limit" "$@"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    row "$label" "failed (exit $rc): $(why "$name")" "$*"
    return 1
  fi
  return 0
}

pytest_summary() {  # the last line of a pytest log ("12 passed, 3 skipped in 40.1s"), table-safe
  grep -E "(passed|failed|skipped|error|no tests ran)" "$WORK/$1.log" | tail -n 1 | tr -d '=|`' | sed 's/^ *//' | cut -c1-160
}

# correctness first: NAME LABEL TIMEOUT PYTEST-ARGS...; runs with or without CUDA (CUDA tests skip)
test_step() {
  local name=$1 label=$2 limit=$3
  shift 3
  local cmd=("$PY" -m pytest -q -p no:cacheprovider "$@")
  run "$name" "$limit" "${cmd[@]}"
  local rc=$? result shown
  result=$(pytest_summary "$name")
  shown=$(printf '%q ' "${cmd[@]}")
  if [ "$rc" -eq 0 ]; then
    [ "$CUDA" -eq 0 ] && result="$result (no CUDA: its CUDA tests skipped)"
    row "$label" "ok: $result" "${shown% }"
  elif [ "$rc" -eq 99 ]; then
    row "$label" "skipped: out of time budget" "${shown% }"
  else
    row "$label" "FAILED (exit $rc): ${result:-$(why "$name")}" "${shown% }"
  fi
}

test_step t_triton "correctness: Triton kernels vs float64 (LARS 6 option sets, LAMB; fp32, bf16, fp16)" 90 \
  tests/test_optim_triton_cuda.py
test_step t_graphs "correctness: graph capture (run / pre-empt / resume, Triton, pin thread running)" 120 \
  tests/test_cuda_graph.py tests/test_cuda_sync.py -k "capture or triton_table or graph"
test_step t_decode "correctness: nvJPEG decode race, JPEG routing, GPU decode vs Pillow" 60 \
  tests/test_cuda_sync.py tests/test_data_jpeg_routing.py tests/test_data_batch_decode.py -k "decode or jpeg or pillow"
test_step t_sync "correctness: no host sync on ordinary steps, each data source (sync-debug error)" 90 \
  tests/test_cuda_sync.py -k "never_wait"
if [ "$CUDA" -eq 1 ]; then
  test_step t_suite "correctness: tests/ under CUDA (not slow)" 150 tests/ -m "not slow"
else
  row "correctness: tests/ under CUDA (not slow)" "skipped: no CUDA (on the CPU the suite is CI's)" \
    "$PY -m pytest -q tests/ -m 'not slow'"
fi

# (a) the optimizer step on the GPU
CMD=("$PY" benchmarks/optimizer_step.py --device cuda --out "$OUT/optimizer_step.md")
if gpu_step optimizer "optimizer step (LARS paths)" 60 "${CMD[@]}"; then
  row "optimizer step (LARS paths)" "see optimizer_step.md" "${CMD[*]}"
fi

# (b) the trainer against a bare loop: ResNet-50, synthetic, batch 256 and 32, eager (graphs off/on)
for B in 256 32; do
  CMD=("$PY" benchmarks/trainer_overhead.py --device cuda --model resnet50 --data synthetic --batch "$B"
       --steps 50 --window 10 --repeats 1 --out "$OUT/trainer_overhead_b$B.md")
  if gpu_step "overhead_b$B" "trainer vs bare loop, batch $B, eager" 75 "${CMD[@]}"; then
    row "trainer vs bare loop, batch $B, eager" "$(ratio_rows "$OUT/trainer_overhead_b$B.md")" "${CMD[*]}"
  fi
done

# (c) ResNet-50 through `largebatch train` on synthetic data (60 steps of 256)
CMD=("$PY" -m largebatch.cli train --model resnet50 --data synthetic --batch-size 256 --epochs 1
     --set data.options.num_train=15360 --set data.options.num_eval=0 --set eval_every=0 --set log_every=10
     --set checkpoint_every=1000000 --no-progress --overwrite --out "$WORK/runs/synthetic")
if gpu_step synthetic "ResNet-50, largebatch train, synthetic, batch 256" 60 "${CMD[@]}"; then
  row "ResNet-50, largebatch train, synthetic, batch 256" "$(summary "$WORK/runs/synthetic")" "${CMD[*]}"
fi

# (b, compiled) the same comparison under torch.compile
for B in 256 32; do
  CMD=("$PY" benchmarks/trainer_overhead.py --device cuda --model resnet50 --data synthetic --batch "$B"
       --steps 50 --window 10 --repeats 1 --compile --out "$OUT/trainer_overhead_b${B}_compile.md")
  if gpu_step "overhead_b${B}_compile" "trainer vs bare loop, batch $B, torch.compile" 150 "${CMD[@]}"; then
    row "trainer vs bare loop, batch $B, torch.compile" \
      "$(ratio_rows "$OUT/trainer_overhead_b${B}_compile.md")" "${CMD[*]}"
  fi
done

# (e) the demo recipe on the GPU: top-1 and training seconds
FM=()
[ -z "${FMNIST_DIR:-}" ] && [ -d .fmnist ] && FMNIST_DIR=.fmnist
[ -n "${FMNIST_DIR:-}" ] && FM=(--data-dir "$FMNIST_DIR")
CMD=("$PY" -m largebatch.cli demo --no-progress --out "$WORK/runs/demo" "${FM[@]}")
if gpu_step demo "demo recipe (Fashion-MNIST, batch 8192)" 90 "${CMD[@]}"; then
  row "demo recipe (Fashion-MNIST, batch 8192)" "$(summary "$WORK/runs/demo")" "${CMD[*]}"
fi

# (d) a JPEG folder made on the spot: 4,096 train JPEGs of 500x400 in 10 classes; decode on GPU vs CPU
JPEGS="$WORK/jpegs"
cat > "$WORK/make_jpegs.py" <<'EOF'
import os, sys
from multiprocessing import Pool
import numpy as np
from PIL import Image
root = sys.argv[1]
def one(job):
    split, cls, i = job
    rng = np.random.default_rng([cls, i, split == "val"])
    small = rng.integers(0, 256, (20, 25, 3), dtype=np.uint8)  # smooth content: photo-like file sizes
    img = Image.fromarray(small).resize((500, 400), Image.BICUBIC)
    noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (400, 500, 3)), 0, 255)
    d = os.path.join(root, split, f"class{cls}")
    os.makedirs(d, exist_ok=True)
    Image.fromarray(noisy.astype(np.uint8)).save(os.path.join(d, f"{i}.jpg"), quality=90)
jobs = [("train", c, i) for c in range(10) for i in range(410)] + [("val", c, i) for c in range(10) for i in range(10)]
with Pool(os.cpu_count()) as pool:
    pool.map(one, jobs, chunksize=64)
total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(root) for f in fs)
print(f"{len(jobs)} JPEGs, {total / len(jobs) / 1024:.0f} KB each on average")
EOF
if [ "$CUDA" -eq 0 ]; then
  row "JPEG folder (4,100 x 500x400), decode=gpu and decode=cpu" "skipped: no CUDA" "make_jpegs in benchmarks/gpu_check.sh"
elif run make_jpegs 60 "$PY" "$WORK/make_jpegs.py" "$JPEGS"; then
  echo "   $(tail -n 1 "$WORK/make_jpegs.log")"
  for DEC in gpu cpu; do
    CMD=("$PY" -m largebatch.cli train --model resnet50 --data imagefolder --data-dir "$JPEGS" --batch-size 256
         --epochs 2 --set "data.options.decode=$DEC" --set eval_every=0 --set log_every=4
         --set checkpoint_every=1000000 --no-progress --overwrite --out "$WORK/runs/jpeg_$DEC")
    if gpu_step "jpeg_$DEC" "ResNet-50 from JPEGs, decode=$DEC, batch 256" 75 "${CMD[@]}"; then
      row "ResNet-50 from JPEGs, decode=$DEC, batch 256" "$(summary "$WORK/runs/jpeg_$DEC")" "${CMD[*]}"
    fi
  done
else
  row "JPEG folder (4,100 x 500x400)" "failed: $(why make_jpegs)" "make_jpegs in benchmarks/gpu_check.sh"
fi

# (f) the data pipeline's own benchmark, where it has a GPU mode
CMD=("$PY" benchmarks/data_throughput.py --device cuda --only-imagefolder --out "$OUT/data_throughput.md")
if ! "$PY" benchmarks/data_throughput.py --help 2>/dev/null | grep -q -- "--device"; then
  row "data pipeline throughput" "skipped: data_throughput.py has no --device option" "${CMD[*]}"
elif gpu_step data "data pipeline throughput" 45 "${CMD[@]}"; then
  row "data pipeline throughput" "see data_throughput.md" "${CMD[*]}"
fi

# logs of every step, for what failed
tail -n 20 "$WORK"/*.log > "$OUT/gpu_check.log" 2>/dev/null
write_report
echo "wrote $OUT/gpu.md in $((SECONDS - START)) s"
