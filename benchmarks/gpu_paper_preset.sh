#!/usr/bin/env bash
# Full paper configuration on one GPU: `genfl-launch --preset paper --compare --device cuda`.
#   bash benchmarks/gpu_paper_preset.sh DATA_ROOT OUT [extra genfl-launch options...]
# Used on the lent H200 (see the closing notes for the numbers). Prints per-stage wall times and the
# comparison table; OUT holds every summary.json, metrics.jsonl and log.
set -euo pipefail
data_root=$1; out=$2; shift 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
start=$(date +%s)
python3 -m genfl_experiments.launch --preset paper --compare --device cuda --dataset mnist \
  --data-root "$data_root" --alpha 0.1 --seed 0 --out "$out" "$@"
echo "wall seconds: $(( $(date +%s) - start ))"
python3 - "$out" <<'PY'
import json, sys, statistics
from pathlib import Path
out = Path(sys.argv[1])
for stage in ("cvae", "pretrained", "baseline"):
    s = json.loads((out / stage / "summary.json").read_text())
    for phase in ("cvae", "classifier"):
        secs = [r["seconds"] for r in s["rounds"] if r["phase"] == phase]
        if secs:
            print(f"{stage:>10} {phase:>10}: {len(secs)} rounds, median {statistics.median(secs):.2f} s/round, "
                  f"total {sum(secs):.1f} s; final {s['final']}")
    events = [json.loads(l) for l in (out / stage / "metrics.jsonl").read_text().splitlines()]
    for e in events:
        if e["event"] != "round":
            print(f"{stage:>10} {e['event']:>10}: {e}")
PY
