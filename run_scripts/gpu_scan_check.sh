#!/usr/bin/env bash
# On a fresh GPU machine (no network): build mamba-ssm and causal-conv1d from their source packages for
# sm_90 (H100/H200) only, then run the scan/SSM tests and the scan benchmark. Logs go to $OUT.
#
#   here:  pip download --no-deps --no-binary :all: --no-build-isolation mamba-ssm==2.3.2.post1 -d .dev/
#          (MAMBA_SKIP_CUDA_BUILD=TRUE in front when there is no nvcc; likewise causal-conv1d with
#          CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE). .dev/ is git-ignored: carry it to the GPU machine.
#   there: bash run_scripts/gpu_scan_check.sh
# Build time on an H100 machine (16 cores): about 3 min for mamba-ssm, 7 min for causal-conv1d (in parallel).
# Wheels found in .dev/wheels/ (e.g. built by an earlier run) are installed instead of compiling; the sm_90
# wheels are 40 MB and 26 MB, too big to come back through $OUT.
# causal-conv1d is optional (it enables mamba-ssm's fused mamba_inner_fn path); its failure is not fatal.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_scan_check}
PY=${PYTHON:-python3}
BUILD=${BUILD_DIR:-/tmp/ssm_build}
export PYTHONUNBUFFERED=1 PIP_BREAK_SYSTEM_PACKAGES=1 TORCH_CUDA_ARCH_LIST=9.0
mkdir -p "$OUT" "$BUILD"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/env.txt"
nvcc --version | tail -2 | tee -a "$OUT/env.txt"

sm90_only() {  # keep only the sm_90 -gencode pair of a mamba-ssm / causal-conv1d setup.py
  $PY - "$1" <<'EOF'
import re, sys
path = sys.argv[1]
src = open(path).read()
pair = re.compile(r'cc_flag\.append\("-gencode"\)(\s*)cc_flag\.append\("arch=compute_(\w+),code=sm_\w+"\)')
out, n = pair.subn(lambda m: m.group(0) if m.group(2) == "90" else "pass", src)
assert out.count("arch=compute_90,code=sm_90") == 1, f"{path}: no sm_90 entry to keep"
open(path, "w").write(out)
print(f"{path}: {n} -gencode pairs, kept sm_90 only")
EOF
}

build() {  # name sdist force-build-variable max-jobs: build a wheel into $BUILD/wheels and install it
  local dir="$BUILD/$(basename "$2" .tar.gz)"
  tar xzf "$2" -C "$BUILD" && sm90_only "$dir/setup.py" || return 1
  (cd "$dir" && env "$3=TRUE" MAX_JOBS="$4" timeout 480 \
      $PY -m pip wheel -v --no-build-isolation --no-deps --no-index -w "$BUILD/wheels" . &&
      $PY -m pip install --no-deps --no-index "$BUILD"/wheels/"$1"-*.whl) > "$OUT/build_$1.log" 2>&1
  echo "$1: build exit $? after $((SECONDS - T0)) s"
}

install_or_build() {  # a wheel built earlier by this script (.dev/wheels/, carried) is used as is
  local whl=(.dev/wheels/"$1"-*.whl) src=(.dev/"$1"-*.tar.gz)
  if [ ${#whl[@]} -eq 1 ]; then
    $PY -m pip install --no-deps --no-index "${whl[0]}" > "$OUT/build_$1.log" 2>&1
    echo "$1: installed ${whl[0]} (exit $?)"
  elif [ ${#src[@]} -eq 1 ]; then
    build "$1" "${src[0]}" "$2" "$3"
  else
    echo "$1: no .dev/$1-*.tar.gz or .dev/wheels/$1-*.whl (see the header)"
  fi
}

T0=$SECONDS
shopt -s nullglob
install_or_build causal_conv1d CAUSAL_CONV1D_FORCE_BUILD 4 &
install_or_build mamba_ssm MAMBA_FORCE_BUILD 12 &
wait
tail -n 2 "$OUT"/build_*.log

# mamba_ssm/__init__.py also imports Mamba-2/3 modules and their optional dependencies; the scan
# interface needs none of them. If the package import fails for that reason, keep only the version.
probe="from mamba_ssm.ops.selective_scan_interface import selective_scan_fn"
if ! $PY -c "$probe" >> "$OUT/env.txt" 2>&1; then
  init=$($PY -c "import importlib.util; print(importlib.util.find_spec('mamba_ssm').origin)")
  echo "mamba_ssm import failed (see env.txt); trimming $init"
  echo '__version__ = "2.3.2.post1"' > "$init"
  $PY -c "$probe" >> "$OUT/env.txt" 2>&1 || echo "mamba_ssm still does not import"
fi
$PY -c "import causal_conv1d; print('causal_conv1d', causal_conv1d.__version__)" 2>&1 | tail -1

$PY -m pytest -q -rs tests/test_scan.py tests/test_ssm.py -s 2>&1 | tee "$OUT/pytest.log" | tail -25
$PY run_scripts/bench_scan.py --bf16 --stacks --scan-blocks 22 24 2>&1 | tee "$OUT/bench.txt"
# Where the torch backend spends its time: one Mamba layer, batch 64, 64 frames, forward + backward.
$PY - > "$OUT/profile.txt" 2>&1 <<'PYEOF'
import torch
from torch.profiler import ProfilerActivity, profile
from models.ssm import Mamba, set_ssm_backend
set_ssm_backend("torch")
layer, x = Mamba(768).cuda(), torch.randn(64, 64, 768, device="cuda", requires_grad=True)
step = lambda: layer(x).square().mean().backward()
for _ in range(3):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
PYEOF
cut -c1-200 "$OUT/profile.txt" | tail -32
echo "total $((SECONDS - T0)) s"
