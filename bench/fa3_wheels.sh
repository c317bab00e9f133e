#!/usr/bin/env bash
# Build the carry that puts FlashAttention-3 (fa3-fwd, forward-only Hopper kernels, a torch
# stable-ABI wheel for CUDA 13) and SageAttention 1 on a GPU machine of this workplace, with what
# the benches need besides (diffusers for the anchor, yunchang). Run here, from the repo root; then:
#   run(carry=[".fa3"]):  . .fa3/install.sh && python3 bench/...
# With FlashAttention-4 in the same run (bench/fa4_wheels.sh), on one warm machine:
#   run(carry=[".fa4a"]): mkdir -p /tmp/fa4w && cp .fa4a/* /tmp/fa4w/
#   run(carry=[".fa3"]):  . .fa3/install.sh
#   run(carry=[".fa4b"]): . .fa4b/install.sh && python3 bench/...
# (installs go to /tmp/site, which stays while the machine is warm).
set -euo pipefail
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
rm -rf .fa3 && mkdir .fa3
grep -qx '/.fa3/' .git/info/exclude || printf '/.fa3/\n' >> .git/info/exclude
python3 -m pip download -q --no-deps $PLAT -d .fa3 fa3-fwd==0.0.3 sageattention==1.0.6 \
  diffusers==0.42.1 yunchang==0.6.4 importlib-metadata==10.2.0
cat > .fa3/install.sh <<'INSTALL'
# GPU machine: '. .fa3/install.sh' (fa3-fwd, sageattention, diffusers, yunchang into /tmp/site).
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .fa3/*.whl \
  > /tmp/pip-fa3.log 2>&1 || { tail -5 /tmp/pip-fa3.log; false; }
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
INSTALL
du -sh .fa3 && ls .fa3
