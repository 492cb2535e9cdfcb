# Shrinks the carried wheel folder (.whl from ../shared/gpu/make-carry.sh) from ~58 to ~20 MB, leaving room under
# the 64 MiB carry limit for compile caches (.gpu_assets/compile_cache_*.tar.xz): bitsandbytes ships one library
# per CUDA version, and the GPU image's torch is built for CUDA 13, so only its libbitsandbytes_cuda13x.so stays.
#   bash benchmarks/slim_wheels.sh [.whl]
set -euo pipefail
dir=${1:-.whl}
for wheel in "$dir"/bitsandbytes-*.whl; do
  zip -q -d "$wheel" 'bitsandbytes/libbitsandbytes_cuda1[0-2]*.so' 'bitsandbytes/libbitsandbytes_rocm*.so' || true
done
du -sh "$dir"
