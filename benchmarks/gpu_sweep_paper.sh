#!/usr/bin/env bash
# The poster's configuration on one GPU: genfl-sweep --preset paper, MNIST, alpha in {IID, 0.1, 0.01},
# pre-trained and baseline, seed 0, every client process sharing the GPU.
#   bash benchmarks/gpu_sweep_paper.sh DATA_ROOT OUT [TIME_LIMIT_S [extra genfl-sweep options...]]
# TIME_LIMIT_S > 0 interrupts the sweep cleanly (SIGINT) after that many seconds; running the same
# command again resumes it: finished cells are skipped, an interrupted cell continues from its last
# finished round. Prints the GPU, the sweep's table and per-cell wall times.
set -uo pipefail
data_root=$1; out=$2; limit=${3:-0}; shift $(( $# < 3 ? $# : 3 ))
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
cmd=(python3 -m genfl_experiments.sweep.cli --dataset mnist --data-root "$data_root" --alphas iid,0.1,0.01
     --repeats 1 --seed 0 --preset paper --device cuda --parallel 4 --no-centralised --out "$out" "$@")
start=$(date +%s)
if [ "$limit" -gt 0 ]; then timeout -s INT -k 60 "$limit" "${cmd[@]}"; else "${cmd[@]}"; fi
rc=$?
echo "sweep exit code $rc, wall seconds: $(( $(date +%s) - start ))"
python3 - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
for marker in sorted(out.glob("runs/**/cell.json")):
    cell = json.loads(marker.read_text())
    summary = json.loads((marker.parent / "summary.json").read_text())
    per_phase = {}
    for r in summary["rounds"]:
        per_phase.setdefault(r["phase"], []).append(r["seconds"])
    phases = ", ".join(f"{p} {len(s)} rounds, median {statistics.median(s):.2f} s/round" for p, s in per_phase.items())
    final = summary.get("final") or {}
    print(f"{cell['key']:<28} {cell['seconds']:7.1f} s  {phases};  final client acc "
          f"{final.get('weighted_client_accuracy')}, test acc {final.get('test_accuracy')}")
PY
exit $rc
