#!/bin/bash
# The Vulkan backend on a real GPU (issue 19), as one short run for a lent GPU machine (GPU
# time comes in windows of minutes). From the repository root, with a release build and the
# firmware carried along (target/release/tessera, target/firmware/tessera-fw.elf) and, when
# the machine has no Vulkan loader, a copy of libvulkan.so.1 in target/vk/:
#
#   bash scripts/gpu-check.sh
#
# It prints what it finds and each step's output; it stops at the first step that fails.
set -u
BIN=${TESSERA_BIN:-target/release/tessera}
FW=${TESSERA_FIRMWARE:-target/firmware/tessera-fw.elf}
step() { echo; echo "== $*"; }

step "machine"
uname -r
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
for m in kvm_intel kvm_amd kvm_pvm; do [ -d /sys/module/$m ] && echo "KVM module: $m"; done
[ -e /dev/kvm ] || echo "no /dev/kvm: the VM steps will fail"

step "Vulkan driver and loader"
ls /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>/dev/null
if ! ldconfig -p | grep -q 'libvulkan.so.1 '; then
    if [ -e target/vk/libvulkan.so.1 ]; then
        export LD_LIBRARY_PATH=$PWD/target/vk${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        echo "loader: target/vk/libvulkan.so.1"
    else
        echo "no Vulkan loader (libvulkan.so.1) and none in target/vk/"; exit 1
    fi
fi

step "the GPU Tessera sees"
dir=$(mktemp -d)
"$BIN" serve --gpu vulkan,vram=2G --dir "$dir/s" >"$dir/log" 2>&1 &
server=$!
for _ in $(seq 50); do [ -S "$dir/s/control.sock" ] && break; sleep 0.1; done
"$BIN" vgpu --dir "$dir/s" types || { cat "$dir/log"; kill $server; exit 1; }
kill -INT $server; wait $server

step "conformance, in process"
timeout 120 "$BIN" vm --kernel "$FW" --memory 256M --cmdline run=conformance \
    --vgpu profile=256M --gpu vulkan 2>&1 | tail -3 || exit 1

step "bench scatter: gather/scatter vs a page table of device addresses"
timeout 120 "$BIN" --log-level warn bench scatter --gpu vulkan --mib 64 --runs 5 --json || exit 1

step "bench vgpu"
timeout 300 "$BIN" --log-level warn bench vgpu --gpu vulkan --runs 3 --json || exit 1
