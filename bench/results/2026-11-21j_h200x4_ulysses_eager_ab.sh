# Eager (compile off, the product default) A/B of the Ulysses all-to-all: stacked SeqAllToAll5D
# (prev, 6c67a74) vs per tensor SeqAllToAll4D (head), 14B 720p 4 GPUs FA3, alternated A B A B.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpe/*.whl > /tmp/pip-gpe.log 2>&1 || { tail -5 /tmp/pip-gpe.log; exit 2; }
export PYTHONPATH=/tmp/site
B="python3 bench/bench_forward.py --model 14b --attn fa3 --warmup 1 --iters 5 --check off --gpus 4 --out $OUT/fwd"
run() { tag=$1; echo "== $tag"; timeout $2 $B --impl ${3:-ours} --tag $tag > $OUT/$tag.log 2>&1; echo "exit $?"; grep -E "^\| 14b" $OUT/$tag.log | tail -1; }
for r in 1 2; do
  cp .gpe/prev_ulysses_ring.py wan_model/parallel/ulysses_ring.py; run stacked_$r 110
  cp .gpe/head_ulysses_ring.py wan_model/parallel/ulysses_ring.py; run pertensor_$r 110
done
run diffusers 110 diffusers
ls $OUT $OUT/fwd 2>/dev/null
