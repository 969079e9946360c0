//! One VM: owns KVM, guest memory, the buses, the devices and the vCPUs; boots Linux and runs
//! until the guest powers off, reboots, crashes or is killed.

use std::io::Read;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::layout::{
    COM1_IRQ, COM1_PORT, GED_IRQ, I8042_COMMAND_PORT, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR,
    PCI_CONFIG_PORT, PCI_MMIO64_SIZE, PCI_MMIO64_START, PCI_MMIO_SIZE, PCI_MMIO_START, PM_PORT,
};
use crate::boot::{acpi, bzimage, long_mode, reset_vector};
use crate::control::ControlTarget;
use crate::devices::acpi::ged::PowerButton;
use crate::devices::acpi::power::{I8042Reset, PowerDevice};
use crate::devices::bus::Bus;
use crate::devices::legacy::serial::{self, SerialDevice, SerialOut};
use crate::devices::pci::bar_allocator::BarAllocator;
use crate::devices::pci::bus::{PciBus, PciConfigIo};
use crate::devices::virtio::blk::request::Disk;
use crate::devices::virtio::transport_pci::VirtioPciDevice;
use crate::devices::virtio::VirtioDevice;
use crate::vstate::exit::{ExitReason, ExitSignal};
use crate::vstate::irq_routing::IrqRouting;
use crate::vstate::memory::{self, GuestMemoryMmap};
use crate::vstate::memory_slots::MemorySlots;
use crate::vstate::vcpu::{Vcpu, VcpuBuses};

/// Errors building or booting the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM VM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] bzimage::BootError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Boot structures.
    #[error(transparent)]
    LongMode(#[from] long_mode::LongModeError),
    /// A device could not be created or placed.
    #[error("device setup: {0}")]
    Device(String),
    /// Host resources (eventfds, threads).
    #[error("host resource: {0}")]
    Io(#[from] std::io::Error),
    /// Bad configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// The most vCPUs (ACPI processor UIDs and APIC IDs are one byte here).
pub const MAX_VCPUS: u8 = 64;

/// A VM that is built but not running.
pub struct Vm {
    vm_fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    mem_size: u64,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    routing: Arc<IrqRouting>,
    exit: Arc<ExitSignal>,
    vcpus: Vec<Vcpu>,
    serial: Arc<Mutex<SerialDevice>>,
    power_button: Arc<PowerButton>,
    pci: Arc<Mutex<PciBus>>,
    bars: BarAllocator,
    memory_slots: Arc<MemorySlots>,
    disks: Vec<Arc<Disk>>,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm(what, e)
}

impl Vm {
    /// Creates a VM with `mem_size` bytes of RAM, `vcpus` vCPUs, the in-kernel irqchip and PIT,
    /// COM1 writing to `serial_out`, the power-management devices and an empty PCI bus.
    pub fn new(
        kvm_sys: &Kvm,
        mem_size: u64,
        vcpus: u8,
        serial_out: SerialOut,
    ) -> Result<Self, VmError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(VmError::Config(format!(
                "vCPU count must be 1..={MAX_VCPUS}"
            )));
        }
        let vm_fd = Arc::new(kvm_sys.create_vm().map_err(kvm("KVM_CREATE_VM"))?);
        vm_fd
            .set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;

        let mem = memory::create_guest_memory(mem_size)?;
        memory::advise_huge_pages(&mem);
        let first_free_slot = memory::register_guest_memory(&vm_fd, &mem)?;
        let max_slots = u32::try_from(kvm_sys.get_nr_memslots()).unwrap_or(32);
        let memory_slots = Arc::new(MemorySlots::new(vm_fd.clone(), first_free_slot, max_slots));

        let io_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());
        let routing = Arc::new(IrqRouting::new(vm_fd.clone()));
        let exit = Arc::new(ExitSignal::new()?);

        let serial_irq = EventFd::new(EFD_NONBLOCK)?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm("KVM_IRQFD (COM1)"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, serial_out)));
        let dev_err = |e: crate::devices::bus::BusError| VmError::Device(e.to_string());
        io_bus
            .insert(serial.clone(), u64::from(COM1_PORT), 8)
            .map_err(dev_err)?;
        io_bus
            .insert(
                Arc::new(Mutex::new(PowerDevice::new(exit.clone()))),
                u64::from(PM_PORT),
                1,
            )
            .map_err(dev_err)?;
        io_bus
            .insert(
                Arc::new(Mutex::new(I8042Reset::new(exit.clone()))),
                u64::from(I8042_COMMAND_PORT),
                1,
            )
            .map_err(dev_err)?;
        let ged_irq = EventFd::new(EFD_NONBLOCK)?;
        vm_fd
            .register_irqfd(&ged_irq, GED_IRQ)
            .map_err(kvm("KVM_IRQFD (GED)"))?;

        let pci = Arc::new(Mutex::new(PciBus::new(mmio_bus.clone())));
        io_bus
            .insert(
                Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
                u64::from(PCI_CONFIG_PORT),
                8,
            )
            .map_err(dev_err)?;
        let bars = BarAllocator::new(PCI_MMIO_START, PCI_MMIO_SIZE)
            .and_then(|b| b.with_mmio64(PCI_MMIO64_START, PCI_MMIO64_SIZE))
            .map_err(|e| VmError::Device(e.to_string()))?;

        let vcpus = (0..vcpus)
            .map(|id| Vcpu::new(kvm_sys, &vm_fd, id, vcpus))
            .collect::<Result<Vec<_>, _>>()?;

        Ok(Self {
            vm_fd,
            mem,
            mem_size,
            io_bus,
            mmio_bus,
            routing,
            exit,
            vcpus,
            serial,
            power_button: Arc::new(PowerButton::new(ged_irq)),
            pci,
            bars,
            memory_slots,
            disks: Vec::new(),
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// vCPU `id`, before the VM starts.
    pub fn vcpu(&self, id: usize) -> Option<&Vcpu> {
        self.vcpus.get(id)
    }

    /// Run-time KVM memory slots (for devices that map host memory into the guest).
    pub fn memory_slots(&self) -> &Arc<MemorySlots> {
        &self.memory_slots
    }

    /// The GSI routing table (for devices that need MSI-X vectors).
    pub fn irq_routing(&self) -> &Arc<IrqRouting> {
        &self.routing
    }

    /// The BAR allocator (for PCI devices built outside `add_virtio_device`).
    pub fn bar_allocator(&mut self) -> &mut BarAllocator {
        &mut self.bars
    }

    /// Adds any PCI device (VFIO passthrough, ...) to bus 0.
    pub fn add_pci_device(
        &mut self,
        device: Arc<Mutex<dyn crate::devices::pci::device::PciDevice>>,
    ) -> Result<(), VmError> {
        self.pci
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add_device(device)
            .map(|_| ())
            .map_err(|e| VmError::Device(e.to_string()))
    }

    /// The port I/O bus (to add devices).
    pub fn io_bus(&self) -> &Arc<Bus> {
        &self.io_bus
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio_bus
    }

    /// Puts a virtio device on the PCI bus behind the virtio-pci transport.
    pub fn add_virtio_device(&mut self, device: Box<dyn VirtioDevice>) -> Result<(), VmError> {
        let name = device.name().to_string();
        let dev = VirtioPciDevice::new(device, self.mem.clone(), &mut self.bars, &self.routing)
            .map_err(|e| VmError::Device(format!("virtio-{name}: {e}")))?;
        self.pci
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add_device(Arc::new(Mutex::new(dev)))
            .map_err(|e| VmError::Device(e.to_string()))?;
        Ok(())
    }

    /// Adds a virtio-blk disk over `file`.
    pub fn add_disk(&mut self, file: std::fs::File, read_only: bool) -> Result<(), VmError> {
        let id = format!("bulkhead-disk{}", self.disks.len());
        let blk = crate::devices::virtio::blk::device::Block::new(file, read_only, &id)?;
        self.disks.push(blk.disk());
        self.add_virtio_device(Box::new(blk))
    }

    /// Writes the ACPI tables, loads the kernel and points vCPU 0 at its 64-bit entry.
    pub fn load_linux(
        &self,
        kernel: &mut std::fs::File,
        initramfs: Option<&mut std::fs::File>,
        cmdline: &str,
    ) -> Result<(), VmError> {
        let rsdp = acpi::write_acpi_tables(&self.mem, self.vcpus.len() as u8)?;
        long_mode::write_boot_structures(&self.mem)?;
        reset_vector::write_reset_stub(&self.mem)
            .map_err(|e| VmError::Device(format!("reset stub: {e}")))?;
        let k = bzimage::load_linux(&self.mem, self.mem_size, kernel, initramfs, cmdline, rsdp)?;
        log::info!(
            "bulkhead-vmm: kernel loaded, entry {:#x}, end {:#x}, initramfs {:?}",
            k.entry,
            k.kernel_end,
            k.initramfs
        );
        let boot = self
            .vcpus
            .first()
            .ok_or_else(|| VmError::Config("no vCPU".into()))?;
        boot.configure_long_mode(k.entry)?;
        Ok(())
    }

    /// Starts the vCPU threads and the serial input thread.
    pub fn start(self, serial_input: Option<Box<dyn Read + Send>>) -> Result<RunningVm, VmError> {
        if let Some(input) = serial_input {
            serial::spawn_input_thread(self.serial.clone(), input)?;
        }
        install_kick_handler();
        let buses = VcpuBuses {
            io: self.io_bus.clone(),
            mmio: self.mmio_bus.clone(),
            exit: self.exit.clone(),
        };
        let mut threads = Vec::new();
        for vcpu in self.vcpus {
            threads.push(vcpu.start(buses.clone())?);
        }
        log::info!("bulkhead-vmm: {} vCPU(s) started", threads.len());
        let devices = self
            .pci
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device_names();
        let control = Arc::new(ControlTarget::new(
            self.exit.clone(),
            self.power_button.clone(),
            threads.len() as u8,
            self.mem_size,
            devices,
        ));
        Ok(RunningVm {
            control,
            exit: self.exit,
            power_button: self.power_button,
            serial: self.serial,
            disks: self.disks,
            threads,
            _vm_fd: self.vm_fd,
            _mem: self.mem,
        })
    }
}

/// Signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int) {}

fn install_kick_handler() {
    // SAFETY: an all-zero sigaction is a valid value to fill in.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = kick_handler as *const () as usize;
    sa.sa_flags = 0; // no SA_RESTART: KVM_RUN returns EINTR
                     // SAFETY: installs a handler that does nothing, for a real-time signal we own.
    unsafe {
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
    }
}

/// A running VM.
pub struct RunningVm {
    control: Arc<ControlTarget>,
    exit: Arc<ExitSignal>,
    power_button: Arc<PowerButton>,
    serial: Arc<Mutex<SerialDevice>>,
    disks: Vec<Arc<Disk>>,
    threads: Vec<JoinHandle<()>>,
    _vm_fd: Arc<VmFd>,
    _mem: GuestMemoryMmap,
}

impl RunningVm {
    /// The exit signal (its eventfd becomes readable when the VM must stop).
    pub fn exit_signal(&self) -> &Arc<ExitSignal> {
        &self.exit
    }

    /// What the control socket acts on.
    pub fn control_target(&self) -> Arc<ControlTarget> {
        self.control.clone()
    }

    /// Presses the ACPI power button: the guest shuts itself down.
    pub fn press_power_button(&self) -> std::io::Result<()> {
        self.power_button.press()
    }

    /// Blocks until the VM must stop and returns why.
    pub fn wait(&self) -> ExitReason {
        loop {
            if let Some(r) = self.exit.reason() {
                return r;
            }
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(self.exit.eventfd()),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, -1) };
        }
    }

    /// Bytes of the guest's serial output dropped so far because its destination did not
    /// take them.
    pub fn serial_output_dropped(&self) -> u64 {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .output_dropped()
    }

    /// Stops the vCPUs (kicking them out of KVM_RUN), flushes serial output and disks.
    pub fn stop(mut self, reason: ExitReason) -> ExitReason {
        self.exit.request(reason);
        for t in self.threads.drain(..) {
            let mut tries = 0;
            while !t.is_finished() && tries < 1000 {
                // SAFETY: the thread is alive (not finished, not joined), so its pthread_t is
                // valid; the signal has a no-op handler.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
                std::thread::sleep(std::time::Duration::from_millis(1));
                tries += 1;
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                log::warn!("bulkhead-vmm: a vCPU thread did not stop");
            }
        }
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush();
        for d in &self.disks {
            if let Err(e) = d.file.sync_all() {
                log::error!("bulkhead-vmm: disk sync failed: {e}");
            }
        }
        self.exit.reason().unwrap_or(ExitReason::Killed)
    }
}
