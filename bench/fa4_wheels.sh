#!/usr/bin/env bash
# Build the two carries that put FlashAttention-4 on a GPU machine of this workplace, whose
# runs may carry at most 64 MiB: .fa4a/ (the small wheels and the first half of the 92 MB
# nvidia-cutlass-dsl-libs-cu13 wheel) and .fa4b/ (the second half, diffusers, yunchang and
# install.sh). Run here, from the repo root; then, on one warm machine, two calls in a row:
#   run(carry=[".fa4a"]):  mkdir -p /tmp/fa4w && cp .fa4a/* /tmp/fa4w/
#   run(carry=[".fa4b"]):  . .fa4b/install.sh && python3 bench/...
# Versions: those measured in bench/RESULTS.md (Python 3.12, torch 2.11 cu130 image).
set -euo pipefail
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps $PLAT -d "$tmp" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
  nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
  apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5 \
  diffusers==0.42.1 yunchang==0.6.4 importlib-metadata==10.2.0
rm -rf .fa4a .fa4b && mkdir .fa4a .fa4b
grep -qx '/.fa4a/' .git/info/exclude || printf '/.fa4a/\n/.fa4b/\n' >> .git/info/exclude
big=$(ls "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl)
split -b 46M -d "$big" "$tmp/cu13part."
mv "$tmp/cu13part.00" .fa4a/ && mv "$tmp/cu13part.01" .fa4b/
mv "$tmp"/diffusers-*.whl "$tmp"/yunchang-*.whl "$tmp"/importlib_metadata-*.whl .fa4b/
rm "$big" && mv "$tmp"/*.whl .fa4a/
name=$(basename "$big")
cat > .fa4b/install.sh <<INSTALL
# GPU machine: '. .fa4b/install.sh' after a call that copied .fa4a/* into /tmp/fa4w on the same warm machine.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cp .fa4b/cu13part.01 .fa4b/*.whl /tmp/fa4w/ && cat /tmp/fa4w/cu13part.00 /tmp/fa4w/cu13part.01 > /tmp/fa4w/$name
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/fa4w/*.whl \\
  > /tmp/pip-fa4.log 2>&1 || { tail -5 /tmp/pip-fa4.log; false; }
# The DSL finds its own packages through a .pth file, which --target installs do not run.
export PYTHONPATH="/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages\${PYTHONPATH:+:\$PYTHONPATH}" PATH="/tmp/site/bin:\$PATH"
INSTALL
du -sh .fa4a .fa4b
