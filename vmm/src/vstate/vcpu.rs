//! One vCPU: CPUID, boot registers, and the exit loop that dispatches port and MMIO accesses
//! to the buses. Each vCPU runs on its own thread.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::exit::{ExitReason, ExitSignal};
use crate::boot::long_mode;
use crate::devices::bus::Bus;

/// Errors configuring or running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: {what} failed: {err}")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// The operation.
        what: &'static str,
        /// The KVM error.
        err: kvm_ioctls::Error,
    },
    /// The thread could not be spawned.
    #[error("cannot spawn vCPU thread: {0}")]
    Spawn(std::io::Error),
}

/// Local APIC register offsets and delivery modes for LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// What the exit loop dispatches to.
#[derive(Clone)]
pub struct VcpuBuses {
    /// Port I/O.
    pub io: Arc<Bus>,
    /// MMIO.
    pub mmio: Arc<Bus>,
    /// Where a stop reason is reported.
    pub exit: Arc<ExitSignal>,
}

/// A vCPU, before it is started on its thread.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

fn kvm_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |err| VcpuError::Kvm { id, what, err }
}

/// Patches KVM's supported CPUID for vCPU `id` of `count`: APIC IDs, CPU count, hypervisor bit.
pub fn patch_cpuid(cpuid: &mut CpuId, id: u8, count: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count field is valid
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
}

impl Vcpu {
    /// Creates vCPU `id` of `count` with its CPUID and local APIC set up.
    pub fn new(kvm: &Kvm, vm: &VmFd, id: u8, count: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err(id, "KVM_CREATE_VCPU"))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err(id, "KVM_GET_SUPPORTED_CPUID"))?;
        patch_cpuid(&mut cpuid, id, count);
        if id == 0 && log::log_enabled!(log::Level::Trace) {
            for e in cpuid.as_slice() {
                log::trace!(
                    "bulkhead-vmm: cpuid {:#x}.{}: eax={:#x} ebx={:#x} ecx={:#x} edx={:#x}",
                    e.function,
                    e.index,
                    e.eax,
                    e.ebx,
                    e.ecx,
                    e.edx
                );
            }
        }
        fd.set_cpuid2(&cpuid)
            .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
        let mut lapic = fd.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
        Ok(Self { id, fd })
    }

    /// This vCPU's index (and APIC ID).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Puts the boot vCPU in 64-bit mode at `entry` (Linux 64-bit boot protocol).
    pub fn configure_long_mode(&self, entry: u64) -> Result<(), VcpuError> {
        let id = self.id;
        let sregs = self.fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
        self.fd
            .set_sregs(&long_mode::long_mode_sregs(sregs))
            .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&long_mode::long_mode_regs(entry))
            .map_err(kvm_err(id, "KVM_SET_REGS"))?;
        self.fd
            .set_fpu(&long_mode::initial_fpu())
            .map_err(kvm_err(id, "KVM_SET_FPU"))?;
        Ok(())
    }

    /// Puts the vCPU in real mode at physical address `entry` (below 64 KiB): for small test
    /// guests written as 16-bit machine code.
    pub fn configure_real_mode(&self, entry: u16) -> Result<(), VcpuError> {
        let id = self.id;
        let mut sregs = self.fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        self.fd
            .set_sregs(&sregs)
            .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
        let regs = kvm_bindings::kvm_regs {
            rip: u64::from(entry),
            rflags: 0x2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(kvm_err(id, "KVM_SET_REGS"))
    }

    /// Direct access to the vCPU fd (tests read registers through it).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs until the VM must stop; reports why through `buses.exit`.
    pub fn run(mut self, buses: &VcpuBuses) {
        let mut stats = ExitStats::default();
        if self.id == 0 {
            // Benchmarks take "exec → first KVM_RUN" from this line (`bench vmm`).
            let t = monotonic_now();
            log::info!(
                "bulkhead-vmm: vCPU 0: first KVM_RUN at CLOCK_MONOTONIC {}.{:09} s",
                t.as_secs(),
                t.subsec_nanos()
            );
        }
        loop {
            if buses.exit.reason().is_some() {
                stats.log(self.id);
                return;
            }
            match self.fd.run() {
                Ok(exit) => {
                    stats.count(&exit);
                    let shutdown = matches!(exit, VcpuExit::Shutdown);
                    if let Some(reason) = handle_exit(self.id, exit, buses) {
                        if shutdown {
                            self.log_state_at_shutdown();
                        }
                        buses.exit.request(reason);
                        stats.log(self.id);
                        return;
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    buses.exit.request(ExitReason::VmmError(format!(
                        "vCPU {}: KVM_RUN failed: {e}",
                        self.id
                    )));
                    return;
                }
            }
        }
    }

    /// A triple fault is either the guest's last-resort reset or a crash: the registers say
    /// which (and where), for whoever reads the log. On AMD, KVM re-initialises the vCPU at a
    /// shutdown intercept (the VMCB is undefined after it), so there is nothing to tell.
    fn log_state_at_shutdown(&self) {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) if r.rip == 0xfff0 && s.cs.selector == 0xf000 => log::warn!(
                "bulkhead-vmm: vCPU {}: KVM already reset the vCPU (AMD): its state at the \
                 fault is lost",
                self.id
            ),
            (Ok(r), Ok(s)) => log::warn!(
                "bulkhead-vmm: vCPU {} at shutdown: rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} \
                 cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} idt={:#x}/{:#x} gdt={:#x}/{:#x}",
                self.id,
                r.rip,
                r.rsp,
                r.rflags,
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector,
                s.idt.base,
                s.idt.limit,
                s.gdt.base,
                s.gdt.limit
            ),
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("bulkhead-vmm: vCPU {}: registers at shutdown: {e}", self.id)
            }
        }
    }

    /// Starts the exit loop on a thread named `vcpu<N>`.
    pub fn start(self, buses: VcpuBuses) -> Result<JoinHandle<()>, VcpuError> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Vcpu);
                let id = self.id;
                let exit = buses.exit.clone();
                // A bug in a device model must end the VM with an error, not hang it.
                let run = std::panic::AssertUnwindSafe(|| self.run(&buses));
                if std::panic::catch_unwind(run).is_err() {
                    exit.request(ExitReason::VmmError(format!("vCPU {id} thread panicked")));
                }
            })
            .map_err(VcpuError::Spawn)
    }
}

/// CLOCK_MONOTONIC now (the clock another process on this host can compare with).
pub fn monotonic_now() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass, which lives for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    std::time::Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Exit counts, logged when the vCPU stops (to see where an L2 boot spends its exits).
#[derive(Default)]
struct ExitStats {
    io: u64,
    mmio: u64,
    other: u64,
}

impl ExitStats {
    fn count(&mut self, exit: &VcpuExit<'_>) {
        match exit {
            VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => self.io += 1,
            VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => self.mmio += 1,
            _ => self.other += 1,
        }
    }

    fn log(&self, id: u8) {
        log::debug!(
            "bulkhead-vmm: vCPU {id}: exits to the VMM: {} port I/O, {} MMIO, {} other",
            self.io,
            self.mmio,
            self.other
        );
    }
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], reg: usize, mode: u32) {
    let Some(bytes) = regs.get_mut(reg..reg + 4) else {
        return;
    };
    let mut v = [0u8; 4];
    for (d, s) in v.iter_mut().zip(bytes.iter()) {
        *d = *s as u8;
    }
    let val = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
    for (d, s) in bytes.iter_mut().zip(val.to_le_bytes()) {
        *d = s as std::os::raw::c_char;
    }
}

/// Handles one exit. Returns a reason when the VM must stop.
fn handle_exit(id: u8, exit: VcpuExit<'_>, buses: &VcpuBuses) -> Option<ExitReason> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.io.read(u64::from(port), data) {
                data.fill(0xff);
            }
            None
        }
        VcpuExit::IoOut(port, data) => {
            buses.io.write(u64::from(port), data);
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                data.fill(0xff);
            }
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            buses.mmio.write(addr, data);
            None
        }
        VcpuExit::Hlt => Some(ExitReason::Poweroff),
        VcpuExit::Shutdown => {
            log::info!("bulkhead-vmm: vCPU {id}: triple fault (reset)");
            Some(ExitReason::Reboot)
        }
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::Poweroff),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(ExitReason::Reboot),
            other => Some(ExitReason::GuestCrash(format!(
                "vCPU {id}: system event {other}"
            ))),
        },
        VcpuExit::FailEntry(reason, cpu) => Some(ExitReason::GuestCrash(format!(
            "vCPU {id}: KVM entry failed (reason {reason:#x}, cpu {cpu})"
        ))),
        VcpuExit::InternalError => Some(ExitReason::GuestCrash(format!(
            "vCPU {id}: KVM internal error"
        ))),
        VcpuExit::Intr => None,
        other => {
            log::warn!("bulkhead-vmm: vCPU {id}: unhandled exit {other:?}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_gets_apic_id_and_count() {
        let mut cpuid = CpuId::new(2).unwrap();
        cpuid.as_mut_slice()[0].function = 1;
        cpuid.as_mut_slice()[1].function = 0xb;
        patch_cpuid(&mut cpuid, 3, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_eq!(e[1].edx, 3);
    }

    #[test]
    fn lvt_mode_is_set_in_bits_8_to_10() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lvt_mode(&mut regs, APIC_LVT1, APIC_MODE_NMI);
        assert_eq!(regs[APIC_LVT1 + 1] as u8, 0x4);
    }
}
