#!/bin/sh
# Boots edu_l1_check as /init of a QEMU guest with an emulated IOMMU and QEMU's edu
# device, and passes if the guest prints "EDU-CHECK PASS". A manual check of the
# vfio crate against a real kernel; needs qemu-system-x86_64, python3 and the Debian
# cloud kernel unpacked by `bulkhead-rootfs` (or KERNEL_ROOT pointing at an unpacked
# linux-image package). EDU_DEVICE_ARGS replaces `-device edu`, e.g.
# "-device pcie-root-port,id=rp1,chassis=1 -device edu,bus=rp1" puts it behind a
# root port, where the kernel can reset it with a secondary bus reset.
set -eu
here=$(cd "$(dirname "$0")/../.." && pwd)
kroot=${KERNEL_ROOT:-$(ls -d "$HOME"/.cache/bulkhead/kernel/*/root | tail -n 1)}
abi=$(basename "$(ls -d "$kroot"/lib/modules/*)")
target=${CARGO_TARGET_DIR:-$here/target}-static
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$target" \
    cargo build --quiet -p bulkhead-vfio --example edu_l1_check --release \
    --target x86_64-unknown-linux-gnu

mods="$kroot/lib/modules/$abi/kernel"
python3 - "$work/initrd" "$target/x86_64-unknown-linux-gnu/release/examples/edu_l1_check" \
    "$mods/virt/lib/irqbypass.ko" "$mods/drivers/vfio/vfio.ko" \
    "$mods/drivers/vfio/vfio_iommu_type1.ko" "$mods/drivers/vfio/vfio_virqfd.ko" \
    "$mods/drivers/vfio/pci/vfio-pci-core.ko" "$mods/drivers/vfio/pci/vfio-pci.ko" <<'PY'
import os, sys
out, init, mods = sys.argv[1], sys.argv[2], sys.argv[3:]
entries = [("proc", 0o40755, b""), ("sys", 0o40755, b""), ("dev", 0o40755, b""),
           ("modules", 0o40755, b""), ("init", 0o100755, open(init, "rb").read())]
entries += [("modules/" + os.path.basename(m), 0o100644, open(m, "rb").read()) for m in mods]
entries.append(("TRAILER!!!", 0, b""))
pad = lambda n: b"\0" * ((4 - n % 4) % 4)
with open(out, "wb") as f:
    for ino, (name, mode, data) in enumerate(entries, 1):
        n = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(n), 0]
        h = b"070701" + b"".join(b"%08x" % v for v in fields)
        f.write(h + n + pad(len(h) + len(n)) + data + pad(len(data)))
PY

timeout 300 qemu-system-x86_64 -accel tcg,thread=multi -M q35 -cpu max -smp 2 -m 512 \
    -nodefaults -display none -no-reboot -serial stdio \
    -device intel-iommu ${EDU_DEVICE_ARGS:--device edu} \
    -kernel "$kroot/boot/vmlinuz-$abi" -initrd "$work/initrd" \
    -append "console=ttyS0 intel_iommu=on panic=-1 loglevel=4" | tee "$work/console"
grep -q "EDU-CHECK PASS" "$work/console"
