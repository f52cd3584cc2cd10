#!/usr/bin/env bash
# The first thing to run on a single GPU (or TPU host): at most ~8 minutes.
#
#   bash launch/device_check.sh              # installs jax for CUDA 12, then checks
#   WHEELS=.whl bash launch/device_check.sh  # offline: installs the wheels in .whl/ instead
#
# Full-depth random-weight Gemma-2-2b at the paper's settings (LoRA r64 on all
# linear layers, dropout 0.05, bf16 base, batch 5, gen_len 2, the TRL 0.9
# update): the predicted FLOPs, saved activations, memory and minutes, then 1
# and 5 learners trained for 20 episodes each, with seconds per episode,
# achieved MFU and peak device memory printed next to the predictions
# (launch/benchmark_scale.py). Exits non-zero if either program fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/moraljax_site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/moraljax_site:$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
else
  python3 -m pip install -q -e . "jax[cuda12]==$(python3 -c 'import re; print(re.search(r"jax==([0-9.]+)", open("setup.py").read()).group(1))')"
fi
python3 -c "import jax; print('devices:', jax.devices())"
start=$(date +%s)
python3 launch/benchmark_scale.py --model=gemma-2-2b --measure --learners=1,5 --episodes=20
echo "device check finished in $(( $(date +%s) - start )) s"
