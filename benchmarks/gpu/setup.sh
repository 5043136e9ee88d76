#!/usr/bin/env bash
# On the GPU machine (source it at the start of a device command): install the carried wheels
# and raretask itself without touching the image's torch, and keep NVLink multicast off.
# Usage there:  source benchmarks/gpu/setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/src
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 RARETASK_CACHE=/tmp/rtcache
python3 -c "import raretask, torch; print('raretask', raretask.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
