//! PCI passthrough at boot: every function the policy grants to a VM
//! (`grant <vm> device pci:<bdf> ...` in /etc/bulkhead/policy.d) is bound to vfio-pci
//! through the `bulkhead-vfio` crate, so it is ready before any VMM starts. The policy is
//! read with the `bulkhead-policy` crate (init has no parser of its own). Every failure is
//! logged loudly and never fatal: the host boots without that device.

use std::collections::BTreeMap;

use bulkhead_policy::{DeviceId, Policy, PolicyTree, Reset, RootDir, ValidateOptions};
use bulkhead_vfio::{bind_to_vfio_pci, Bdf, BindOptions, SysfsRoot};
use log::{debug, error, info, warn};

/// One PCI function to hand to vfio-pci, and who it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The function.
    pub bdf: bulkhead_policy::Bdf,
    /// The VMs granted it (more than one only with `shared=exclusive-run`).
    pub vms: Vec<String>,
    /// The vendor:device pin from the policy.
    pub id: DeviceId,
    /// Whether the function must have a reset method (required if any grant says so).
    pub reset: Reset,
    /// `boot-display=take` in every grant: the boot VGA device may go to the VM, and init
    /// stops using it for its console first.
    pub boot_display: bool,
}

/// The functions `policy` grants, one entry per function, sorted by address.
pub fn assignments(policy: &Policy) -> Vec<Assignment> {
    let mut by_bdf: BTreeMap<bulkhead_policy::Bdf, Assignment> = BTreeMap::new();
    for (vm, grant) in policy.all_devices() {
        by_bdf
            .entry(grant.bdf)
            .and_modify(|a| {
                if grant.reset == Reset::Required {
                    a.reset = Reset::Required;
                }
                a.boot_display &= grant.boot_display;
            })
            .or_insert_with(|| Assignment {
                bdf: grant.bdf,
                vms: Vec::new(),
                id: grant.id,
                reset: grant.reset,
                boot_display: grant.boot_display,
            })
            .vms
            .push(vm.to_string());
    }
    by_bdf.into_values().collect()
}

/// Loads and compiles the policy from its default directories.
pub fn load_policy() -> Result<Policy, String> {
    PolicyTree::load(&RootDir::defaults())
        .compile(&ValidateOptions::default())
        .map(|c| c.policy)
        .map_err(|diags| diags.to_string())
}

/// Why a granted function's identity does not match its pin, if it does not.
pub fn id_mismatch(id: &DeviceId, vendor: u16, device: u16) -> Option<String> {
    match id {
        DeviceId::Any => None,
        DeviceId::Pinned {
            vendor: v,
            device: d,
        } if *v == vendor && *d == device => None,
        DeviceId::Pinned { .. } => Some(format!(
            "it is {vendor:04x}:{device:04x} but the policy pins {id}"
        )),
    }
}

/// Why a function may not be handed to a VM for lack of a reset method, if so. Without one,
/// whatever a VM left in the device (keys, DMA programming, firmware state) reaches the next
/// VM, so `reset=required` (the default) refuses it; `reset=optional` lets it through with
/// a warning.
pub fn reset_refusal(reset: Reset, methods: &[String]) -> Option<String> {
    match (reset, methods.is_empty()) {
        (_, false) => None,
        (Reset::Required, true) => Some(
            "it has no reset method (sysfs reset_method is empty) and the policy requires one; \
             write reset=optional in its grant to accept that"
                .to_string(),
        ),
        (Reset::Optional, true) => None,
    }
}

/// The IOMMU groups granted to each VM (what its VMM is handed at start).
pub type VmGroups = BTreeMap<String, Vec<u32>>;

/// Binds every granted function to vfio-pci. Returns, for each VM, the IOMMU groups of the
/// functions bound for it.
pub fn bind_granted(sys: &SysfsRoot) -> VmGroups {
    let mut bound = VmGroups::new();
    let policy = match load_policy() {
        Ok(p) => p,
        Err(e) => {
            error!("policy rejected, no device bound to vfio-pci:\n{e}");
            return bound;
        }
    };
    let wanted = assignments(&policy);
    if wanted.is_empty() {
        debug!("the policy grants no PCI device");
        return bound;
    }
    for a in wanted {
        let who = a.vms.join(", ");
        let bdf = match Bdf::new(
            u32::from(a.bdf.domain),
            a.bdf.bus,
            a.bdf.device,
            a.bdf.function,
        ) {
            Ok(b) => b,
            Err(e) => {
                error!("cannot bind {} (for {who}): {e}", a.bdf);
                continue;
            }
        };
        match sys.function(bdf) {
            Ok(f) => {
                if let Some(why) = id_mismatch(&a.id, f.vendor, f.device) {
                    error!("not binding {bdf} to vfio-pci (for {who}): {why}");
                    continue;
                }
                if let Some(why) = reset_refusal(a.reset, &f.reset_methods) {
                    error!("not binding {bdf} to vfio-pci (for {who}): {why}");
                    continue;
                }
                if f.reset_methods.is_empty() {
                    warn!("{bdf} (for {who}) has no reset method: state a VM leaves in it is not cleared (reset=optional)");
                }
            }
            Err(e) => {
                error!("cannot bind {bdf} to vfio-pci (for {who}): {e}");
                continue;
            }
        }
        if a.boot_display {
            release_framebuffer_console(sys);
        }
        let options = BindOptions {
            boot_display: a.boot_display,
            ..BindOptions::default()
        };
        match bind_to_vfio_pci(sys, bdf, options) {
            Ok(report) => {
                info!(
                    "bound {bdf} to vfio-pci (group {}) for {who}{}",
                    report.group,
                    report
                        .previous_driver
                        .map(|d| format!(", taken from {d}"))
                        .unwrap_or_default()
                );
                for vm in &a.vms {
                    let groups = bound.entry(vm.clone()).or_default();
                    if !groups.contains(&report.group) {
                        groups.push(report.group);
                    }
                }
            }
            Err(e) => error!("cannot bind {bdf} to vfio-pci (for {who}): {e}"),
        }
    }
    bound
}

/// Stops the kernel's framebuffer console (fbcon) on every virtual terminal, before a grant
/// with `boot-display=take` hands the boot display to a VM: the host's text console then no
/// longer draws on a screen a VM owns (init's own console is the serial line). Returns how
/// many consoles were unbound; failures are logged.
pub fn release_framebuffer_console(sys: &SysfsRoot) -> usize {
    let dir = sys.sys().join("class/vtconsole");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut released = 0;
    for e in entries.flatten() {
        let path = e.path();
        let name = std::fs::read_to_string(path.join("name")).unwrap_or_default();
        let bound = std::fs::read_to_string(path.join("bind")).unwrap_or_default();
        if !name.contains("frame buffer") || bound.trim() != "1" {
            continue;
        }
        match std::fs::write(path.join("bind"), "0") {
            Ok(()) => {
                info!(
                    "stopped the framebuffer console {} ({}) for a boot-display grant",
                    e.file_name().to_string_lossy(),
                    name.trim()
                );
                released += 1;
            }
            Err(err) => warn!(
                "cannot stop the framebuffer console {}: {err}",
                path.display()
            ),
        }
    }
    released
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(text: &str) -> Policy {
        PolicyTree::from_sources(&[("10-devices.policy".to_string(), text.as_bytes().to_vec())])
            .compile(&ValidateOptions::default())
            .unwrap()
            .policy
    }

    /// A shared boot display is taken only if every grant says so; a `boot-display=take`
    /// grant stops the framebuffer console and nothing else.
    #[test]
    fn boot_display_takes_need_every_grant_and_release_only_fbcon() {
        let p = compile(
            "version 1\n\
             grant gui-vm device pci:0000:00:02.0 id=any boot-display=take\n\
             grant a device pci:0000:00:05.0 id=any shared=exclusive-run boot-display=take\n\
             grant b device pci:0000:00:05.0 id=any shared=exclusive-run\n",
        );
        let a = assignments(&p);
        assert!(a[0].boot_display);
        assert!(!a[1].boot_display, "{:?}", a[1]);

        let dir = tempfile::tempdir().unwrap();
        let vt = dir.path().join("class/vtconsole");
        for (n, name, bind) in [
            ("vtcon0", "(S) dummy device", "0"),
            ("vtcon1", "(M) frame buffer device", "1"),
        ] {
            std::fs::create_dir_all(vt.join(n)).unwrap();
            std::fs::write(vt.join(n).join("name"), format!("{name}\n")).unwrap();
            std::fs::write(vt.join(n).join("bind"), format!("{bind}\n")).unwrap();
        }
        let sys = SysfsRoot::new(dir.path());
        assert_eq!(release_framebuffer_console(&sys), 1);
        let bind = |n: &str| std::fs::read_to_string(vt.join(n).join("bind")).unwrap();
        assert_eq!(bind("vtcon1").trim(), "0");
        assert_eq!(bind("vtcon0").trim(), "0");
        assert_eq!(release_framebuffer_console(&sys), 0, "already released");
    }

    #[test]
    fn grants_become_one_assignment_per_function() {
        let p = compile(
            "version 1\n\
             grant net-vm device pci:0000:00:05.0 id=any\n\
             grant edu-vm device pci:0000:00:03.0 id=1234:11e8\n",
        );
        let a = assignments(&p);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].bdf.to_string(), "0000:00:03.0");
        assert_eq!(a[0].vms, vec!["edu-vm"]);
        assert_eq!(
            a[0].id,
            DeviceId::Pinned {
                vendor: 0x1234,
                device: 0x11e8
            }
        );
        assert_eq!(a[1].vms, vec!["net-vm"]);
    }

    #[test]
    fn a_function_without_reset_is_refused_unless_the_policy_says_optional() {
        let none: Vec<String> = Vec::new();
        let flr = vec!["flr".to_string()];
        let why = reset_refusal(Reset::Required, &none).unwrap();
        assert!(
            why.contains("no reset method") && why.contains("reset=optional"),
            "{why}"
        );
        assert_eq!(reset_refusal(Reset::Optional, &none), None);
        assert_eq!(reset_refusal(Reset::Required, &flr), None);
        // The default of a grant is required; one grant saying required wins for a function
        // shared between VMs.
        let p = compile(
            "version 1\n\
             grant a-vm device pci:0000:00:03.0 id=any shared=exclusive-run reset=optional\n\
             grant b-vm device pci:0000:00:03.0 id=any shared=exclusive-run\n\
             grant c-vm device pci:0000:00:04.0 id=any reset=optional\n",
        );
        let a = assignments(&p);
        assert_eq!(a[0].reset, Reset::Required);
        assert_eq!(a[1].reset, Reset::Optional);
    }

    #[test]
    fn no_grants_no_assignments() {
        assert!(assignments(&compile("version 1\n")).is_empty());
    }

    #[test]
    fn id_pins() {
        let pin = DeviceId::Pinned {
            vendor: 0x1234,
            device: 0x11e8,
        };
        assert_eq!(id_mismatch(&pin, 0x1234, 0x11e8), None);
        assert!(id_mismatch(&pin, 0x8086, 0x11e8)
            .unwrap()
            .contains("8086:11e8"));
        assert_eq!(id_mismatch(&DeviceId::Any, 1, 2), None);
    }
}
