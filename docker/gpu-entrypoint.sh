#!/bin/sh
# Entry point of the GPU images. Their `duplex` is the CUDA build, which links the NVIDIA
# driver's libcuda.so.1; the NVIDIA Container Toolkit mounts that library into the container
# only when it is started with a GPU (`docker run --gpus all`, compose's GPU reservation).
# Without it the CUDA build cannot even load, so the CPU build serves instead and says why.
set -eu
gpu_build=${DUPLEX_GPU_BUILD:-/usr/local/bin/duplex}
cpu_build=${DUPLEX_CPU_BUILD:-/usr/local/bin/duplex-cpu}
if loader_error=$("$gpu_build" --version 2>&1 >/dev/null); then
  exec "$gpu_build" "$@"
fi
echo "duplex: the CUDA build cannot start in this container: ${loader_error}" >&2
echo "duplex: start the container with a GPU (docker run --gpus all; the host needs the NVIDIA driver and the NVIDIA Container Toolkit). Running the CPU build meanwhile: without PersonaPlex weights it serves the echo engine; with them, the model far slower than real time." >&2
exec "$cpu_build" "$@"
