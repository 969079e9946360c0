#!/bin/sh
# The wl_smoke guest (or, with WL_SMOKE_L1_INIT=l1_faux.c and WL_SMOKE_GUEST_INIT=the
# wl_faux_accept example, the faux accept between two guests) as an L2 under bulkhead-vmm inside a QEMU-emulated L1 (TCG + nested
# SVM), for machines whose /dev/kvm cannot run Linux. Usage:
#   run_l1.sh VMM_BINARY KERNEL_ROOT
set -eu
here=$(cd "$(dirname "$0")" && pwd)
vmm=$1; kroot=$2
abi=$(ls "$kroot/lib/modules" | head -1)
work=$(mktemp -d)
[ -n "${WL_SMOKE_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
make -s -C "/usr/src/linux-headers-$abi" M="$here/.." modules >/dev/null 2>&1
inc="-I$here/../include/uapi"
mkdir -p "$work/l2/lib" "$work/l2/dev"
if [ -n "${WL_SMOKE_GUEST_INIT:-}" ]; then
  cp "$WL_SMOKE_GUEST_INIT" "$work/l2/init"   # e.g. bulkhead-wl's wl_smoke_rs example
else
  gcc -static -O2 -Wall -Werror $inc -o "$work/l2/init" "$here/wl_smoke.c"
fi
for m in virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci; do
  cp "$kroot/lib/modules/$abi/kernel/drivers/virtio/$m.ko" "$work/l2/lib/"
done
cp "$here/../virtio_wl.ko" "$work/l2/lib/"
mkdir -p "$work/l1/lib" "$work/l1/bin" "$work/l1/l2" "$work/l1/dev" "$work/l1/proc" "$work/l1/tmp" \
  "$work/l1/lib64" "$work/l1/lib/x86_64-linux-gnu"
python3 "$here/newc.py" "$work/l2" "$work/l1/l2/initramfs.cpio"
cp "$kroot"/boot/vmlinuz-* "$work/l1/l2/vmlinuz"
gcc -static -O2 -Wall $inc -o "$work/l1/init" "$here/${WL_SMOKE_L1_INIT:-l1_init.c}"
cp "$(dirname "$vmm")/bulkhead-vmmctl" "$work/l1/bin/" 2>/dev/null || true
cp "$vmm" "$work/l1/bin/bulkhead-vmm"
for l in $(ldd "$vmm" | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
  mkdir -p "$work/l1$(dirname "$l")"; cp "$l" "$work/l1$l"
done
cp "$kroot/lib/modules/$abi/kernel/virt/lib/irqbypass.ko" "$kroot/lib/modules/$abi/kernel/arch/x86/kvm/kvm.ko" \
  "$kroot/lib/modules/$abi/kernel/arch/x86/kvm/kvm-amd.ko" "$work/l1/lib/"
python3 "$here/newc.py" "$work/l1" "$work/l1.cpio"
timeout "${WL_SMOKE_TIMEOUT:-300}" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m 1024 \
  -nographic -no-reboot -kernel "$kroot"/boot/vmlinuz-* -initrd "$work/l1.cpio" \
  -append "console=ttyS0 panic=-1 quiet" > "$work/serial.log" 2>&1 || true
grep -E "L1:|wl-smoke|WL-SMOKE|wl-faux|WL-FAUX|wl-bench|virtio_wl|wl0|BUG|Oops|Call Trace|bulkhead-vmm: (WARN|ERROR)" "$work/serial.log" || tail -20 "$work/serial.log"
if [ "${WL_SMOKE_L1_INIT:-}" = l1_bench.c ]; then
  wl=$(sed -n 's/.*wl-bench: rtt_ns=\([0-9]*\) fd_rtt_ns=\([0-9]*\).*/\1 \2/p' "$work/serial.log")
  sp=$(sed -n 's/.*L1: socketpair rtt_ns=\([0-9]*\) fd_rtt_ns=\([0-9]*\).*/\1 \2/p' "$work/serial.log")
  [ -n "$wl" ] && [ -n "$sp" ] || exit 1
  set -- $wl $sp
  echo "BENCH wl rtt_ratio_vs_socketpair=$(awk "BEGIN{printf \"%.1f\", $1/$3}") fd_rtt_ratio_vs_socketpair=$(awk "BEGIN{printf \"%.1f\", $2/$4}") rtt_ns=$1 fd_rtt_ns=$2 socketpair_rtt_ns=$3 socketpair_fd_rtt_ns=$4"
elif [ -n "${WL_SMOKE_L1_INIT:-}" ]; then
  grep -q "WL-FAUX server OK" "$work/serial.log" && grep -q "WL-FAUX client OK" "$work/serial.log"
else
  grep -q "WL-SMOKE OK" "$work/serial.log" && grep -q "L1: peer ok" "$work/serial.log"
fi
