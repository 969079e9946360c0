//! Binding a PCI function to vfio-pci, and releasing it again.
//!
//! The sequence (pid1.md §1.7): write `vfio-pci` to the function's `driver_override`;
//! if another driver has it, write the address to `driver/unbind`; write the address
//! to `bus/pci/drivers_probe`; then check that the `driver` link names vfio-pci and
//! that the group's `/dev/vfio/<group>` node exists. `new_id` is not used: it would
//! grab every device with the same IDs.
//!
//! Everything that can refuse (no IOMMU, missing device or group, vfio-pci not
//! loaded, a device the host needs) is checked before the first write, so a refusal
//! leaves the host as it was. A function is never unbound from vfio-pci except by
//! [`release`].
//!
//! On a real system the kernel acts synchronously inside each write. A
//! [`KernelHook`] is told about every write just after it is made; the real one
//! ([`RealKernel`]) has nothing to do, while tests on a fake sysfs tree use it to play
//! the kernel's part honestly between steps.

use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::path::Path;
use std::thread;
use std::time::Duration;

use crate::bdf::Bdf;
use crate::error::{Result, VfioError};
use crate::host_critical::host_critical_reason;
use crate::sysfs::{link_name, SysfsRoot, VFIO_PCI_DRIVER};

/// Options for [`bind_to_vfio_pci`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BindOptions {
    /// Pass through devices that only *look* like they back the console (serial and
    /// display controllers bound to a host driver, the boot VGA device). Never
    /// overrides the refusal of bridges or of devices holding mounted filesystems.
    pub force: bool,
    /// The policy's grant says `boot-display=take`: a display controller (class 0x03xx)
    /// may be taken although it is the boot VGA device or bound to a host display driver.
    /// Nothing else is skipped (serial consoles, bridges, mounted disks).
    pub boot_display: bool,
}

/// What [`bind_to_vfio_pci`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindReport {
    /// The function.
    pub bdf: Bdf,
    /// Its IOMMU group; the VMM opens `/dev/vfio/<group>`.
    pub group: u32,
    /// Whether any sysfs file was written (false when it was already bound).
    pub changed: bool,
    /// The host driver it was taken from, if any.
    pub previous_driver: Option<String>,
}

/// What [`release`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseReport {
    /// The function.
    pub bdf: Bdf,
    /// Whether it was bound to vfio-pci before the call.
    pub was_bound: bool,
    /// The driver the kernel chose for it afterwards, if any.
    pub new_driver: Option<String>,
}

/// Told about every sysfs write the binder makes, just after it is made.
pub trait KernelHook {
    /// `path` was just written with `value`. The real kernel has already acted; a
    /// fake plays its part here.
    fn written(&mut self, path: &Path, value: &str) -> Result<()>;

    /// Whether the device node `path` exists, waiting a little for it if the hook
    /// thinks that useful (udev creates nodes asynchronously; devtmpfs does not).
    fn node_appears(&mut self, path: &Path) -> bool;
}

/// The hook for a live system: the kernel has done its work when a write returns;
/// device nodes are waited for up to about two seconds.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealKernel;

impl KernelHook for RealKernel {
    fn written(&mut self, _path: &Path, _value: &str) -> Result<()> {
        Ok(())
    }

    fn node_appears(&mut self, path: &Path) -> bool {
        for _ in 0..40 {
            if path.exists() {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        path.exists()
    }
}

/// Binds `bdf` to vfio-pci on the live system; see the module docs.
pub fn bind_to_vfio_pci(root: &SysfsRoot, bdf: Bdf, options: BindOptions) -> Result<BindReport> {
    bind_to_vfio_pci_with(root, bdf, options, &mut RealKernel)
}

/// [`bind_to_vfio_pci`] with a chosen [`KernelHook`].
pub fn bind_to_vfio_pci_with(
    root: &SysfsRoot,
    bdf: Bdf,
    options: BindOptions,
    kernel: &mut dyn KernelHook,
) -> Result<BindReport> {
    root.require_iommu()?;
    let func = root.function(bdf)?;
    let group = func.iommu_group.ok_or_else(|| VfioError::NoGroup {
        bdf,
        path: func.path.join("iommu_group"),
    })?;
    let node = root.vfio_group_node(group);

    if func.is_bound_to_vfio_pci() {
        let mut changed = false;
        if func.driver_override.as_deref() != Some(VFIO_PCI_DRIVER) {
            // Keep it with vfio-pci should anything re-probe it later.
            write_attr(kernel, &func.path.join("driver_override"), VFIO_PCI_DRIVER)?;
            changed = true;
        }
        if !kernel.node_appears(&node) {
            return Err(VfioError::BindFailed {
                bdf,
                detail: format!("it is bound to vfio-pci but {} is missing", node.display()),
            });
        }
        return Ok(BindReport {
            bdf,
            group,
            changed,
            previous_driver: None,
        });
    }

    let vfio_dir = root.pci_driver_dir(VFIO_PCI_DRIVER);
    if !vfio_dir.is_dir() {
        return Err(VfioError::VfioPciMissing { path: vfio_dir });
    }
    let display_taken = options.boot_display && func.base_class() == 0x03;
    if let Some(reason) = host_critical_reason(root, &func, options.force || display_taken)? {
        return Err(VfioError::HostCritical { bdf, reason });
    }

    log::info!(
        "binding {bdf} ({:04x}:{:04x}, group {group}, driver {}) to vfio-pci",
        func.vendor,
        func.device,
        func.driver.as_deref().unwrap_or("none")
    );
    let address = bdf.to_string();
    write_attr(kernel, &func.path.join("driver_override"), VFIO_PCI_DRIVER)?;

    if let Some(old) = &func.driver {
        write_attr(kernel, &func.path.join("driver/unbind"), &address)?;
        if let Some(still) = link_name(&func.path.join("driver"))? {
            return Err(VfioError::BindFailed {
                bdf,
                detail: format!("still bound to {still} after unbinding it from {old}"),
            });
        }
    }

    write_attr(kernel, &root.drivers_probe_path(), &address)?;
    match link_name(&func.path.join("driver"))? {
        Some(d) if d == VFIO_PCI_DRIVER => {}
        other => {
            return Err(VfioError::BindFailed {
                bdf,
                detail: format!(
                    "after drivers_probe it is bound to {} instead of vfio-pci (see dmesg)",
                    other.as_deref().unwrap_or("no driver")
                ),
            })
        }
    }
    if !kernel.node_appears(&node) {
        return Err(VfioError::BindFailed {
            bdf,
            detail: format!("bound to vfio-pci but {} did not appear", node.display()),
        });
    }
    Ok(BindReport {
        bdf,
        group,
        changed: true,
        previous_driver: func.driver,
    })
}

/// Hands `bdf` back to the host: clears `driver_override`, unbinds it from vfio-pci
/// and lets the kernel probe a host driver for it. Refused with
/// [`VfioError::DeviceInUse`] while its group is open (a VMM still has it): the
/// kernel would block the unbind until the VMM let go.
pub fn release(root: &SysfsRoot, bdf: Bdf) -> Result<ReleaseReport> {
    release_with(root, bdf, &mut RealKernel)
}

/// [`release`] with a chosen [`KernelHook`].
pub fn release_with(
    root: &SysfsRoot,
    bdf: Bdf,
    kernel: &mut dyn KernelHook,
) -> Result<ReleaseReport> {
    let func = root.function(bdf)?;
    let was_bound = func.is_bound_to_vfio_pci();
    if was_bound {
        if let Some(group) = func.iommu_group {
            ensure_group_free(root, group)?;
        }
    }
    let address = bdf.to_string();
    if func.driver_override.is_some() {
        write_attr(kernel, &func.path.join("driver_override"), "\n")?;
    }
    if was_bound {
        log::info!("releasing {bdf} from vfio-pci");
        write_attr(kernel, &func.path.join("driver/unbind"), &address)?;
        write_attr(kernel, &root.drivers_probe_path(), &address)?;
    }
    Ok(ReleaseReport {
        bdf,
        was_bound,
        new_driver: link_name(&func.path.join("driver"))?,
    })
}

/// `Ok(())` when `/dev/vfio/<group>` can be opened now (it is then closed at once),
/// [`VfioError::DeviceInUse`] when the kernel answers EBUSY because another process
/// (a VMM) holds the group. A missing node is also `Ok`: nobody can hold it.
pub fn ensure_group_free(root: &SysfsRoot, group: u32) -> Result<()> {
    let node = root.vfio_group_node(group);
    match OpenOptions::new().read(true).write(true).open(&node) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(VfioError::DeviceInUse {
            what: node.display().to_string(),
            detail: "the IOMMU group is already open (held by a VMM)".to_string(),
        }),
        Err(e) => Err(VfioError::io(&node, e)),
    }
}

fn write_attr(kernel: &mut dyn KernelHook, path: &Path, value: &str) -> Result<()> {
    log::debug!("write {:?} to {}", value.trim_end(), path.display());
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| VfioError::io(path, e))?;
    // sysfs wants the whole value in one write.
    file.write_all(value.as_bytes())
        .map_err(|e| VfioError::io(path, e))?;
    drop(file);
    kernel.written(path, value)
}
