# Shrinks a folder of wheels for a GPU machine (WHEELS_DIR of gpu_setup.sh) from ~58 to ~20 MB: bitsandbytes
# ships one library per CUDA version, and a torch built for CUDA 13 needs only libbitsandbytes_cuda13x.so.
#   bash benchmarks/slim_wheels.sh [.whl]
set -euo pipefail
dir=${1:-.whl}
for wheel in "$dir"/bitsandbytes-*.whl; do
  zip -q -d "$wheel" 'bitsandbytes/libbitsandbytes_cuda1[0-2]*.so' 'bitsandbytes/libbitsandbytes_rocm*.so' || true
done
du -sh "$dir"
