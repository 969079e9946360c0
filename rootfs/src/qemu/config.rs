//! A machine's description and its QEMU command line: q35 with an IOMMU and QEMU's `edu`
//! device, the net hub, disks with serials, QMP, a second serial port, UEFI firmware.

use std::path::{Path, PathBuf};

use super::cpu::{cpu_model, QemuVersion};
use super::Firmware;

/// A disk image given to the machine as a virtio-blk device with a serial (the emulated
/// host finds it as `/dev/disk/by-id/virtio-<serial>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    /// At most 20 bytes (virtio-blk's id field).
    pub serial: String,
    pub read_only: bool,
}

/// The QEMU id of the emulated host's screen ([`QemuConfig::display`]).
pub const DISPLAY_ID: &str = "screen0";

/// A QEMU machine description.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub qemu: PathBuf,
    /// `-cpu` (see [`cpu_model`]), and why it was chosen.
    pub cpu: String,
    pub cpu_reason: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub memory_mib: u32,
    pub smp: u32,
    /// q35 with `intel-iommu`, one `edu` device (00:03.0) and a `virtio-rng-pci` behind a
    /// PCIe root port (01:00.0: MSI-X, FLR).
    pub iommu_and_edu: bool,
    /// Two NICs on one QEMU network hub with nothing else on it, so no packet leaves the
    /// QEMU process: a `virtio-net-pci` alone behind a PCIe root port ([`NETVM_NIC`](super::NETVM_NIC): its
    /// own IOMMU group, for a net VM by VFIO) and one on the root bus ([`PEER_NIC`](super::PEER_NIC), for a
    /// test peer in its own network namespace). Only with `iommu_and_edu` (q35, the IOMMU).
    pub net_hub: bool,
    /// A screen: QEMU's `bochs-display` (1234:1111, a 16 MiB prefetchable framebuffer BAR 0
    /// and a 4 KiB register BAR 2, no reset of its own) alone behind a PCIe root port
    /// ([`DISPLAY_ID`], its own IOMMU group: for a GUI VM by VFIO), on the bus after the
    /// other root ports' (0000:02:00.0 without `net_hub`). `-display none` still: QMP's
    /// `screendump` ([`super::Qmp::screendump`]) reads it. Only with `iommu_and_edu`.
    pub display: bool,
    /// A second serial port (the guest's ttyS1) written to this file.
    pub second_serial: Option<PathBuf>,
    /// A QMP socket.
    pub qmp: Option<PathBuf>,
    /// Disks with serials (a host image's guest root filesystems).
    pub disks: Vec<Disk>,
    /// Boot through UEFI firmware (OVMF) from an EFI system partition instead of
    /// `-kernel`: `kernel`, `initrd` and `append` are then unused (the ESP's unified kernel
    /// image carries all three).
    pub firmware: Option<Firmware>,
    /// Extra raw arguments.
    pub extra: Vec<String>,
}

impl QemuConfig {
    /// The default Bulkhead host machine: 2 vCPUs, 2 GiB, q35 + intel-iommu + edu.
    pub fn host(kernel: &Path, initrd: &Path, append: &str) -> Self {
        let qemu = PathBuf::from("qemu-system-x86_64");
        let (cpu, cpu_reason) = cpu_model(QemuVersion::of(&qemu));
        Self {
            qemu,
            cpu,
            cpu_reason,
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            append: append.to_string(),
            memory_mib: 2048,
            smp: 2,
            iommu_and_edu: true,
            net_hub: false,
            display: false,
            second_serial: None,
            qmp: None,
            disks: Vec::new(),
            firmware: None,
            extra: Vec::new(),
        }
    }

    /// The default host machine booted by UEFI firmware from an ESP (see [`Firmware`]).
    pub fn host_firmware(firmware: Firmware) -> Self {
        let mut c = Self::host(Path::new(""), Path::new(""), "");
        c.firmware = Some(firmware);
        c
    }

    /// The arguments after the program name.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-accel".into(),
            "tcg,thread=multi".into(),
            "-cpu".into(),
            self.cpu.clone(),
            "-smp".into(),
            self.smp.to_string(),
            "-m".into(),
            self.memory_mib.to_string(),
        ];
        if self.iommu_and_edu {
            a.extend(
                [
                    "-machine",
                    "q35",
                    "-device",
                    "intel-iommu,intremap=on",
                    "-device",
                    "edu,addr=03.0",
                    // A device with MSI-X and a function reset (FLR), alone behind a PCIe
                    // root port (its own IOMMU group, bus 1): 0000:01:00.0 in the guest.
                    // iommu_platform=on: without it QEMU's virtio devices DMA to physical
                    // addresses, bypassing intel-iommu (and a VM's IOVAs).
                    "-device",
                    "pcie-root-port,id=rp1,chassis=1,addr=10.0",
                    "-device",
                    "virtio-rng-pci,bus=rp1,addr=00.0,iommu_platform=on",
                ]
                .map(String::from),
            );
        }
        if self.iommu_and_edu && self.net_hub {
            a.extend(
                [
                    "-device",
                    "pcie-root-port,id=rp2,chassis=2,addr=11.0",
                    "-netdev",
                    "hubport,id=netvm-nic,hubid=0",
                    "-device",
                    // iommu_platform=on: its DMA goes through intel-iommu (a VM's IOVAs).
                    "virtio-net-pci,netdev=netvm-nic,bus=rp2,addr=00.0,iommu_platform=on,mac=52:54:00:b0:00:01",
                    "-netdev",
                    "hubport,id=peer-nic,hubid=0",
                    "-device",
                    "virtio-net-pci,netdev=peer-nic,addr=12.0,mac=52:54:00:b0:00:02",
                ]
                .map(String::from),
            );
        }
        if self.iommu_and_edu && self.display {
            a.extend(
                [
                    "-device",
                    "pcie-root-port,id=rp3,chassis=3,addr=13.0",
                    "-device",
                ]
                .map(String::from),
            );
            a.push(format!(
                "bochs-display,id={DISPLAY_ID},bus=rp3,addr=00.0,xres=640,yres=480"
            ));
        }
        a.extend(
            [
                "-display",
                "none",
                "-vga",
                "none",
                "-nic",
                "none",
                "-monitor",
                "none",
                "-no-reboot",
                "-serial",
                "stdio",
            ]
            .map(String::from),
        );
        if let Some(p) = &self.second_serial {
            a.push("-serial".into());
            a.push(format!("file:{}", p.display()));
        }
        if let Some(p) = &self.qmp {
            a.push("-qmp".into());
            a.push(format!("unix:{},server=on,wait=off", p.display()));
        }
        for (i, d) in self.disks.iter().enumerate() {
            a.push("-drive".into());
            a.push(format!(
                "file={},format=raw,if=none,id=bhdisk{i}{}",
                d.path.display(),
                if d.read_only { ",readonly=on" } else { "" }
            ));
            a.push("-device".into());
            a.push(format!(
                "virtio-blk-pci,drive=bhdisk{i},serial={}",
                d.serial
            ));
        }
        match &self.firmware {
            None => a.extend([
                "-kernel".into(),
                self.kernel.display().to_string(),
                "-initrd".into(),
                self.initrd.display().to_string(),
                "-append".into(),
                self.append.clone(),
            ]),
            Some(fw) => a.extend([
                "-drive".into(),
                format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    fw.code.display()
                ),
                "-drive".into(),
                format!("if=pflash,format=raw,unit=1,file={}", fw.vars.display()),
                "-drive".into(),
                format!(
                    "file={},format=raw,if=none,id=esp,readonly=on",
                    fw.esp.display()
                ),
                // The only boot option: no time spent on PXE or the UEFI shell first.
                "-device".into(),
                "virtio-blk-pci,drive=esp,bootindex=0".into(),
            ]),
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    /// The command line as a shell would show it.
    pub fn command_line(&self) -> String {
        let mut s = self.qemu.display().to_string();
        for a in self.args() {
            s.push(' ');
            if a.contains(' ') {
                s.push('\'');
                s.push_str(&a);
                s.push('\'');
            } else {
                s.push_str(&a);
            }
        }
        s
    }
}

/// Whether the policy files (name, contents) grant some VM the PCI function `bdf` pinned to
/// `id` (`grant <vm> device pci:<bdf> id=<id> …`), read with the policy language's own
/// parser: how `boot` knows a system wants the net hub's NIC or the screen in the emulated
/// host's 0000:02:00.0. Lines that do not parse grant nothing (init reports them).
pub fn grants_device(policy_files: &[(String, Vec<u8>)], bdf: &str, id: &str) -> bool {
    use bulkhead_policy::ast::Item;
    use bulkhead_policy::{Action, Effect};
    policy_files.iter().any(|(name, bytes)| {
        let (file, _) = bulkhead_policy::parse::parse_bytes(name, name, bytes);
        file.lines.iter().any(|l| {
            matches!(&l.item, Item::Rule(r) if r.effect == Effect::Grant
                && matches!(&r.action, Action::Device { bdf: b, id: Some(i), .. }
                    if b.to_string() == bdf && i.to_string() == id))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_machine_has_iommu_edu_and_nested_virtualisation() {
        let mut c = QemuConfig::host(Path::new("/k"), Path::new("/i"), "console=ttyS0 quiet");
        c.qmp = Some(PathBuf::from("/tmp/q.sock"));
        c.second_serial = Some(PathBuf::from("/tmp/s1"));
        c.disks.push(Disk {
            path: PathBuf::from("/c/root.ext4"),
            serial: "bh-0123456789ab".into(),
            read_only: true,
        });
        let line = c.command_line();
        for want in [
            "-accel tcg,thread=multi",
            "-machine q35",
            "-device intel-iommu,intremap=on",
            "-device edu,addr=03.0",
            "-device pcie-root-port,id=rp1,chassis=1,addr=10.0",
            "-device virtio-rng-pci,bus=rp1,addr=00.0,iommu_platform=on",
            "-no-reboot",
            "-serial stdio",
            "-serial file:/tmp/s1",
            "-qmp unix:/tmp/q.sock,server=on,wait=off",
            "-append 'console=ttyS0 quiet'",
            "-drive file=/c/root.ext4,format=raw,if=none,id=bhdisk0,readonly=on",
            "-device virtio-blk-pci,drive=bhdisk0,serial=bh-0123456789ab",
        ] {
            assert!(line.contains(want), "{want:?} missing from {line}");
        }
    }

    #[test]
    fn a_screen_is_a_bochs_display_alone_behind_its_own_root_port_and_only_when_asked() {
        let mut c = QemuConfig::host(Path::new("/k"), Path::new("/i"), "quiet");
        assert!(!c.command_line().contains("bochs-display"));
        c.display = true;
        let line = c.command_line();
        for want in [
            "-device pcie-root-port,id=rp3,chassis=3,addr=13.0",
            "-device bochs-display,id=screen0,bus=rp3,addr=00.0,xres=640,yres=480",
            // No window: QMP's screendump reads it.
            "-display none",
        ] {
            assert!(line.contains(want), "{want:?} missing from {line}");
        }
    }

    #[test]
    fn the_net_hub_adds_two_nics_on_one_closed_hub_and_only_when_asked() {
        let mut c = QemuConfig::host(Path::new("/k"), Path::new("/i"), "quiet");
        let plain = c.command_line();
        assert!(!plain.contains("virtio-net-pci") && !plain.contains("-netdev"));
        assert!(plain.contains("-nic none"), "no default NIC");
        c.net_hub = true;
        let line = c.command_line();
        for want in [
            "-device pcie-root-port,id=rp2,chassis=2,addr=11.0",
            "-netdev hubport,id=netvm-nic,hubid=0",
            "virtio-net-pci,netdev=netvm-nic,bus=rp2,addr=00.0,iommu_platform=on",
            "-netdev hubport,id=peer-nic,hubid=0",
            "virtio-net-pci,netdev=peer-nic,addr=12.0",
            "-nic none",
        ] {
            assert!(line.contains(want), "{want:?} missing from {line}");
        }
        // Nothing but the two hub ports: no user, tap, socket or bridge backend.
        for backend in [
            "user", "tap,", "socket", "stream", "dgram", "bridge", "vde", "l2tpv3",
        ] {
            assert!(!line.contains(&format!("-netdev {backend}")), "{line}");
        }
        assert_eq!(line.matches("-netdev ").count(), 2);
    }

    #[test]
    fn a_firmware_boot_has_ovmf_and_the_esp_and_no_kernel() {
        let fw = Firmware {
            code: PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd"),
            vars: PathBuf::from("/t/vars.fd"),
            esp: PathBuf::from("/t/esp.img"),
        };
        let line = QemuConfig::host_firmware(fw).command_line();
        for want in [
            "-drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "-drive if=pflash,format=raw,unit=1,file=/t/vars.fd",
            "-drive file=/t/esp.img,format=raw,if=none,id=esp,readonly=on",
            "-device virtio-blk-pci,drive=esp,bootindex=0",
            "-machine q35",
            "-device intel-iommu,intremap=on",
            "-no-reboot",
        ] {
            assert!(line.contains(want), "{want:?} missing from {line}");
        }
        for never in ["-kernel", "-initrd", "-append"] {
            assert!(!line.contains(never), "{never} in {line}");
        }
    }

    #[test]
    fn a_grant_of_the_slot_with_its_id_is_found_and_nothing_else() {
        let files = |text: &str| vec![("10-base.policy".to_string(), text.as_bytes().to_vec())];
        let p = files(
            "version 1\n# grant x device pci:0000:02:00.0 id=1234:1111\n\
             grant gui-vm  device pci:0000:02:00.0 id=1234:1111 reset=optional\n",
        );
        assert!(grants_device(&p, "0000:02:00.0", "1234:1111"));
        assert!(!grants_device(&p, "0000:02:00.0", "1af4:1041"));
        assert!(!grants_device(&p, "0000:03:00.0", "1234:1111"));
        assert!(!grants_device(
            &files("version 1\ngrant a connect pci:0000:02:00.0 id=1234:1111\n"),
            "0000:02:00.0",
            "1234:1111"
        ));
        assert!(!grants_device(
            &files("version 1\n# grant a device pci:0000:02:00.0 id=1234:1111\n"),
            "0000:02:00.0",
            "1234:1111"
        ));
        assert!(!grants_device(
            &files("version 1\ndeny a device pci:0000:02:00.0\n"),
            "0000:02:00.0",
            "1234:1111"
        ));
        // The two examples `boot` runs: the desktop takes the screen, netvm the NIC.
        let example = |name: &str| {
            crate::image::SystemDir::load(
                &crate::workspace_dir().join("rootfs/examples").join(name),
            )
            .unwrap()
            .policy_files
        };
        let (demo, netvm) = (example("demo"), example("netvm"));
        assert!(grants_device(&demo, "0000:02:00.0", "1234:1111"));
        assert!(!grants_device(&demo, "0000:02:00.0", "1af4:1041"));
        assert!(grants_device(&netvm, "0000:02:00.0", "1af4:1041"));
        assert!(!grants_device(&netvm, "0000:02:00.0", "1234:1111"));
    }
}
