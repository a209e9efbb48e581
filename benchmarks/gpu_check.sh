#!/usr/bin/env bash
# The CUDA path, run for real (issue 25): the first step of a session lent a GPU machine.
#
#   bash benchmarks/gpu_check.sh              # GPU machine: the whole check (about 5-9 min)
#   bash benchmarks/gpu_check.sh --cpu-only   # anywhere: the CPU half, with the project's .venv
#   bash benchmarks/gpu_check.sh --install-only  # step 1 alone, GPU or not (checks the venv)
#
# 1. a fresh venv with onnxruntime-gpu and never onnxruntime beside it (the two packages
#    install into the same folder): the project goes in with --no-deps, then its
#    dependencies less onnxruntime, then onnxruntime-gpu;
# 2. the CUDA / IOBinding unit tests (tests/test_runtime.py, test_cuda_*);
# 3. one few-shot scan of samples/models/resnet_badnets.onnx (then `shapscan eval` of the
#    repaired model on samples/data/test.npz: the true trigger's ASR) and one data-free scan
#    of a 224x224 model from onnx's bundled light zoo, each on --device cuda and on
#    --device cpu, printed side by side (verdict, channels, ASR after repair, seconds).
#
# Without an NVIDIA GPU (nvidia-smi -L fails) it says so and runs the CPU half only.
# Environment:
#   OUT           results go here (table.md, tests.log, reports.tar.gz); default a temp dir
#   WHEELS        install offline from this folder of wheels (pip --no-index --find-links);
#                 it must hold onnxruntime-gpu, the project's dependencies, pytest,
#                 setuptools and wheel. onnxruntime-gpu 1.31.1 for CPython 3.12 (CUDA 13) is
#                 a 244 MiB wheel.
#   GPU_VENV      the venv to create (default /tmp/shapscan-gpu-venv)
#   MODEL_224     the 224x224 model (default onnx's light_inception_v2.onnx: 1,000 classes,
#                 BatchNormalization for the data-free synthesis, every op with a gradient
#                 rule; light_resnet50 and light_shufflenet use Sum, which has none yet)
#   SCAN_TIMEOUT  seconds each scan of the 224x224 model may take (default 150); a run that
#                 takes longer is reported as timed out, not waited for
#   MEM_CAP_GB    address-space cap of each --device cpu scan (default 8, the issue's cap;
#                 ulimit -v, which CUDA's address-space reservations do not survive, so the
#                 cuda scans run without it): a scan past it is inconclusive, not killed
set -uo pipefail
cd "$(dirname "$0")/.."

say() { echo "gpu_check: $*"; }
cpu_only=0
install_only=0
case "${1:-}" in
  --cpu-only) cpu_only=1 ;;
  --install-only) install_only=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--cpu-only | --install-only]" >&2; exit 4 ;;
esac
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
work=$(mktemp -d)
scan_timeout=${SCAN_TIMEOUT:-150}
mem_cap_kb=$(( ${MEM_CAP_GB:-8} * 1024 * 1024 ))

if [ "$cpu_only" = 0 ] && [ "$install_only" = 0 ] && ! nvidia-smi -L >/dev/null 2>&1; then
  say "no NVIDIA GPU found (nvidia-smi -L failed): running the CPU half only"
  cpu_only=1
fi

if [ "$cpu_only" = 1 ]; then
  devices="cpu"
  py=${PYTHON:-.venv/bin/python}
  [ -x "$py" ] || { say "no $py: create the project's venv first (README) or set PYTHON"; exit 2; }
else
  devices="cuda cpu"
  nvidia-smi -L 2>/dev/null
  venv=${GPU_VENV:-/tmp/shapscan-gpu-venv}
  python3 -m venv --clear "$venv" || { say "cannot create $venv"; exit 2; }
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  [ -n "${WHEELS:-}" ] && pip+=(--no-index --find-links "$WHEELS")
  python3 - > "$work/requirements.txt" <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(d for d in project["dependencies"] if not d.startswith("onnxruntime")))
EOF
  # --no-deps: the project's dependencies name onnxruntime, which must never sit beside
  # onnxruntime-gpu (whichever installs last overwrites the other's files); pip then warns
  # that shapscan requires onnxruntime: expected
  "${pip[@]}" --no-deps -e . \
    && "${pip[@]}" -r "$work/requirements.txt" 'onnxruntime-gpu>=1.17' pytest \
    || { say "installing onnxruntime-gpu and the project failed (offline? set WHEELS)"; exit 2; }
  py=$venv/bin/python
  if "$py" -m pip show onnxruntime >/dev/null 2>&1; then
    say "onnxruntime (the CPU build) is installed beside onnxruntime-gpu: refusing to go on"
    exit 2
  fi
  # the CUDA provider loads libcudart, cuBLAS and cuDNN: take them from the nvidia-* pip
  # packages of the machine's own python3 when it has them (a fresh venv does not)
  nvidia=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])" 2>/dev/null)
  if [ -n "$nvidia" ]; then
    libs=$(ls -d "$nvidia"/*/lib 2>/dev/null | paste -sd: -)
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi
cli=("$py" -c "from scanner.cli import run; run()")
"$py" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
if [ "$install_only" = 1 ]; then
  "$py" -m pip list 2>/dev/null | grep -i '^onnxruntime'
  say "venv ready: $py"
  exit 0
fi

say "CUDA / IOBinding unit tests (skipped without a GPU)"
# the sessions, IOBinding and resident feeds; not the whole module: onnxruntime-gpu can lag
# the CPU build (1.31.1 against 1.32.0 when written), and a test model built at onnx's
# newest IR version is then refused for a reason that is not the CUDA path
"$py" -m pytest tests/test_runtime.py -k "cuda or runner or resident" -q -rs \
  -p no:cacheprovider 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}

model_224=${MODEL_224:-$("$py" -c "import onnx, os; print(os.path.join(os.path.dirname(onnx.__file__), 'backend/test/data/light/light_inception_v2.onnx'))")}
: > "$work/times.tsv"
for device in $devices; do
  if [ "$device" = cpu ]; then ulimit -v "$mem_cap_kb"; fi  # the cuda scans ran first
  say "resnet_badnets, few-shot, --device $device"
  start=$SECONDS
  "${cli[@]}" scan samples/models/resnet_badnets.onnx --data samples/data/fewshot.npz \
    --device "$device" --out "$work/resnet_badnets.$device.onnx" \
    --report "$work/resnet_badnets.$device.json" --quiet
  printf 'resnet_badnets\t%s\t%s\t%s\n' "$device" $? $((SECONDS - start)) >> "$work/times.tsv"
  if [ -f "$work/resnet_badnets.$device.onnx" ]; then
    "${cli[@]}" eval "$work/resnet_badnets.$device.onnx" --data samples/data/test.npz \
      --zoo samples/zoo.json --zoo-entry resnet_badnets --device "$device" --json \
      > "$work/resnet_badnets.$device.eval.json"
  fi
  name=$(basename "$model_224" .onnx)
  say "$name, data-free, --device $device (at most $scan_timeout s)"
  start=$SECONDS
  timeout "$scan_timeout" "${cli[@]}" scan "$model_224" --data-free --device "$device" \
    --out "$work/$name.$device.onnx" --report "$work/$name.$device.json" --quiet
  printf '%s\t%s\t%s\t%s\n' "$name" "$device" $? $((SECONDS - start)) >> "$work/times.tsv"
done

"$py" - "$work" "$scan_timeout" <<'EOF' | tee "$out/table.md"
import json, sys
from pathlib import Path

work, limit = Path(sys.argv[1]), int(sys.argv[2])
rows, channels = [], {}
for line in (work / "times.tsv").read_text().splitlines():
    model, device, code, seconds = line.split("\t")
    report = work / f"{model}.{device}.json"
    result = json.loads(report.read_text())["results"][0] if report.is_file() else None
    verdict = targets = zeroed = ran_on = "-"
    if code == "124":
        verdict = f"timed out (> {limit} s)"
    elif result is not None:
        verdict, ran_on = result["verdict"], result["device"]
        det, rep = result["detection"] or {}, result["repair"] or {}
        targets = ",".join(map(str, det.get("flagged_targets", []))) or "-"
        if result["repair"] is not None:
            channels[model, device] = sorted((c["layer"], c["channel"])
                                             for c in rep.get("pruned", []))
            zeroed = str(len(channels[model, device]))
    ev = work / f"{model}.{device}.eval.json"
    asr = acc = "-"
    if ev.is_file() and ev.read_text().strip():
        e = json.loads(ev.read_text())
        acc = f"{100 * e['clean_acc']:.1f}"
        asr = "-" if e.get("asr") is None else f"{100 * e['asr']:.1f}"
    rows.append([model, device, ran_on, code, verdict, targets, zeroed, asr, acc, seconds])
for row in rows:
    model, device = row[0], row[1]
    same = "-"
    if device != "cpu" and (model, device) in channels and (model, "cpu") in channels:
        same = "y" if channels[model, device] == channels[model, "cpu"] else "n"
    row.insert(7, same)
head = ["model", "--device", "ran on", "exit", "verdict", "targets", "channels zeroed",
        "same channels as cpu", "test ASR after repair %", "test acc after repair %", "s"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for row in rows:
    print("| " + " | ".join(row) + " |")
EOF
tar -czf "$out/reports.tar.gz" -C "$work" .
say "results in $out (table.md, tests.log, reports.tar.gz)"
rm -rf "$work"
exit "$tests_rc"
