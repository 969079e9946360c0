//! `bulkhead-rootfs`: provision a machine, build a host image, boot it under QEMU.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bulkhead_rootfs::image::{build_system_image, SystemDir};
use bulkhead_rootfs::kernel::plan::{KernelOverrides, SystemKernels};
use bulkhead_rootfs::kernel::{Cache, ChoiceOverride, Kernel, KernelChoice};
use bulkhead_rootfs::qemu::{Disk, Machine, Outcome, QemuConfig};
use bulkhead_rootfs::{efi, provision, workspace_dir, HOST_CMDLINE};
use clap::{Parser, Subcommand};

/// Exit statuses of `boot`.
mod status {
    pub const POWERED_OFF: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const KERNEL_PANIC: u8 = 2;
    pub const REBOOTED: u8 = 3;
    pub const TIMEOUT: u8 = 4;
    pub const QEMU_DIED: u8 = 5;
}

#[derive(Parser)]
#[command(
    name = "bulkhead-rootfs",
    about = "Provision a machine, build Bulkhead host images, and boot them under QEMU",
    after_help = "`boot` exit statuses: 0 the host powered off cleanly; 1 error; 2 kernel panic; \
                  3 the host rebooted; 4 timeout; 5 QEMU ended otherwise."
)]
struct Cli {
    /// Cache for kernels (default $BULKHEAD_CACHE, $XDG_CACHE_HOME/bulkhead or ~/.cache/bulkhead).
    #[arg(long, global = true)]
    cache: Option<PathBuf>,
    /// The Cargo workspace to build binaries from.
    #[arg(long, global = true)]
    workspace: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install QEMU and the module build tools from Debian's packages (as root), and
    /// download Debian kernels with their modules and headers into the cache (nothing of a
    /// kernel is installed): the default one (cloud, the build machine's own suite) and the
    /// one named by --flavour/--suite, or without them the tests' second kernel (cloud, the
    /// build machine's backports: 6.12 on Debian 12); also install what the tests need (weston,
    /// wl-clipboard, wayland-utils, xvfb). Idempotent.
    Provision {
        #[command(flatten)]
        kernel: ChoiceArgs,
    },
    /// Build the host initramfs for a system directory (system.toml + policy.d/).
    Build {
        /// The system directory.
        #[arg(long, default_value_os_t = default_system())]
        system: PathBuf,
        /// Output file (default target/bulkhead/<system>/host.cpio.gz).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write one EFI executable for real machines, `bulkhead.efi` beside the
        /// initramfs: a unified kernel image of Debian's systemd-stub (fetched by
        /// `provision`), the host kernel, the initramfs and the kernel command line
        /// (docs/real-hardware.md).
        #[arg(long)]
        efi: bool,
        /// The EFI image's whole kernel command line (default: the QEMU host's, plus
        /// --append).
        #[arg(long, requires = "efi")]
        cmdline: Option<String>,
        /// Extra kernel command line arguments for the EFI image.
        #[arg(long, default_value = "", requires = "efi")]
        append: String,
        #[command(flatten)]
        kernels: KernelArgs,
    },
    /// Provision if needed, build a system's host image and boot it under QEMU (TCG, q35,
    /// intel-iommu, edu); the console is shown; exits 0 only if the host powered off cleanly.
    Boot {
        /// The system directory.
        #[arg(long, default_value_os_t = default_system())]
        system: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Extra kernel command line arguments (e.g. `bulkhead.loglevel=debug`).
        #[arg(long, default_value = "")]
        append: String,
        /// Two NICs on one closed QEMU hub: one behind a PCIe root port for a net VM
        /// (0000:02:00.0) and a test peer's (0000:00:12.0). On by itself for a system whose
        /// policy grants a VM 0000:02:00.0 id=1af4:1041 (rootfs/examples/netvm).
        #[arg(long)]
        net_hub: bool,
        /// A screen: QEMU's bochs-display behind a PCIe root port (0000:02:00.0), for a GUI
        /// VM to own by VFIO; a picture of it (QMP screendump) is written to `display.png`
        /// after each picture the GUI VM sends. On by itself for a system whose policy
        /// grants a VM 0000:02:00.0 id=1234:1111 (the example desktop).
        #[arg(long)]
        display: bool,
        /// Boot the way a real machine does: UEFI firmware (Debian's OVMF) starts the
        /// system's EFI executable (`build --efi`) from an EFI system partition, instead of
        /// QEMU loading the kernel and initramfs itself.
        #[arg(long)]
        efi: bool,
        #[command(flatten)]
        kernels: KernelArgs,
    },
    /// Build (or find in the cache) the ext4 root filesystem for a guest that names these
    /// Debian packages, and print its path.
    GuestRoot {
        /// Debian package names, e.g. `weston wl-clipboard`.
        #[arg(required = true)]
        packages: Vec<String>,
    },
    /// Benchmarks, each run inside one QEMU boot against a real peer; the last line is
    /// `BENCH <name> key=value …`.
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Boot time to the guest's init and VMM memory beyond guest RAM: bulkhead-vmm against
    /// QEMU `-M microvm -accel kvm`, same kernel and initramfs, inside one L1 host.
    Vmm {
        /// Boots per VMM (interleaved).
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Another static bulkhead-vmm build to measure in the same boot, as NAME=PATH
        /// (repeatable), e.g. the binary from before a change.
        #[arg(long = "also-vmm", value_name = "NAME=PATH")]
        also_vmm: Vec<String>,
    },
    /// Networking: TCP throughput and round trips from an app VM through net-vm to the test
    /// peer, against net-vm itself to the peer (rootfs/examples/netvm, one boot).
    Net,
    /// Wayland: a shm client committing 640x480 frames with full damage through the proxies
    /// from an app VM, against the same client directly on weston in the GUI VM.
    Wayland {
        /// Frames per run.
        #[arg(long, default_value_t = 200)]
        frames: u32,
    },
    /// virtio_wl: SEND/RECV round trips (without and with an fd) between an L2 guest and an
    /// L1 echo against a socketpair on L1, and shared-memory bandwidth between two L2 guests
    /// against memcpy on L1, inside one L1 host.
    Wl {
        /// Round trips per kind.
        #[arg(long, default_value_t = 300)]
        rounds: u32,
        /// Size of the shared buffer in MiB.
        #[arg(long, default_value_t = 16)]
        shm_mib: u32,
        /// Write/read repetitions of the shared buffer (the best counts).
        #[arg(long, default_value_t = 4)]
        reps: u8,
        /// Another static bulkhead-vmm build whose writer guest joins the round trips, as
        /// NAME=PATH (repeatable), e.g. the binary from before a change.
        #[arg(long = "also-vmm", value_name = "NAME=PATH")]
        also_vmm: Vec<String>,
    },
}

/// One kernel choice on the command line.
#[derive(clap::Args)]
struct ChoiceArgs {
    /// Kernel flavour: `cloud` (linux-image-cloud-amd64) or `generic` (linux-image-amd64).
    #[arg(long)]
    flavour: Option<String>,
    /// Debian suite of the kernel: `system` (the build machine's apt sources), `backports`
    /// (its release's backports), or a suite name (`stable`, `bookworm-backports`, …).
    #[arg(long)]
    suite: Option<String>,
}

impl ChoiceArgs {
    fn parse(&self) -> Result<ChoiceOverride, String> {
        ChoiceOverride::parse(self.flavour.as_deref(), self.suite.as_deref())
            .map_err(|e| e.to_string())
    }
}

/// Kernel choices of a system on the command line, over its files' `[kernel]` tables.
#[derive(clap::Args)]
struct KernelArgs {
    /// The host's kernel flavour (`cloud`, `generic`); guests that choose none follow it.
    #[arg(long)]
    flavour: Option<String>,
    /// The host's kernel suite (`system`, `backports`, a suite name); guests that choose
    /// none follow it.
    #[arg(long)]
    suite: Option<String>,
    /// Every guest's kernel flavour, over the guests' own choices.
    #[arg(long)]
    guest_flavour: Option<String>,
    /// Every guest's kernel suite, over the guests' own choices.
    #[arg(long)]
    guest_suite: Option<String>,
}

impl KernelArgs {
    fn overrides(&self) -> Result<KernelOverrides, String> {
        let parse = |f: &Option<String>, s: &Option<String>| {
            ChoiceOverride::parse(f.as_deref(), s.as_deref()).map_err(|e| e.to_string())
        };
        Ok(KernelOverrides {
            host: parse(&self.flavour, &self.suite)?,
            guests: parse(&self.guest_flavour, &self.guest_suite)?,
        })
    }
}

/// The system's policy files, (name, contents) (none if the system cannot be read: `build`
/// has said why by then).
fn policy_files(system: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    SystemDir::load(system)
        .map(|sys| sys.policy_files)
        .unwrap_or_default()
}

fn default_system() -> PathBuf {
    workspace_dir().join("rootfs/examples/demo")
}

fn system_name(system: &std::path::Path) -> String {
    system
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "system".into())
}

/// Builds a system's host image with the kernels its files and `over` choose; with
/// `provision`, fetches those kernels first (quick when they are in the cache).
fn build(
    cache: &Cache,
    workspace: &std::path::Path,
    system: &std::path::Path,
    out: Option<PathBuf>,
    over: &KernelOverrides,
    provision: bool,
) -> Result<(SystemKernels, PathBuf, Vec<Disk>), String> {
    let sys = SystemDir::load(system).map_err(|e| e.to_string())?;
    let plan = sys.kernel_plan(over).map_err(|e| e.to_string())?;
    if provision {
        provision::provision(cache, &plan.choices(), false).map_err(|e| e.to_string())?;
    }
    let kernels = plan.resolve(cache).map_err(|e| e.to_string())?;
    let out = out.unwrap_or_else(|| {
        let mut name = system_name(system);
        let tag = over.tag();
        if !tag.is_empty() {
            name = format!("{name}-{tag}");
        }
        workspace
            .join("target/bulkhead")
            .join(name)
            .join("host.cpio.gz")
    });
    let disks = build_system_image(&kernels, cache.dir(), workspace, system, &out)
        .map_err(|e| e.to_string())?;
    let mut guests: Vec<String> = Vec::new();
    for (name, _) in &sys.guests {
        guests.push(format!("{name} {}", kernels.guest(name).abi));
    }
    eprintln!(
        "bulkhead-rootfs: wrote {} (host kernel {}{}{})",
        out.display(),
        kernels.host.abi,
        if guests.is_empty() { "" } else { "; guests: " },
        guests.join(", ")
    );
    for d in &disks {
        eprintln!(
            "bulkhead-rootfs: with disk {} (serial {})",
            d.path.display(),
            d.serial
        );
    }
    Ok((kernels, out, disks))
}

/// Writes the system's EFI executable (`bulkhead.efi` beside its initramfs `image`).
fn write_uki(
    cache: &Cache,
    kernels: &SystemKernels,
    image: &std::path::Path,
    cmdline: &str,
    system: &std::path::Path,
) -> Result<PathBuf, String> {
    let out = image
        .parent()
        .map(|d| d.join("bulkhead.efi"))
        .unwrap_or_else(|| PathBuf::from("bulkhead.efi"));
    let layout = efi::host_uki(
        cache,
        &kernels.host,
        image,
        cmdline,
        &system_name(system),
        &out,
    )
    .map_err(|e| e.to_string())?;
    for s in &layout.sections {
        log::debug!(
            "{}: {} at {:#x}, {:#x} bytes",
            out.display(),
            s.name,
            s.rva,
            s.virtual_size
        );
    }
    Ok(out)
}

fn run(cli: Cli) -> Result<u8, String> {
    let cache = cli
        .cache
        .map(Cache::new)
        .unwrap_or_else(Cache::default_location);
    let workspace = cli.workspace.unwrap_or_else(workspace_dir);
    match cli.command {
        Cmd::Provision { kernel } => {
            let over = kernel.parse()?;
            let second = if over.is_empty() {
                KernelChoice::second()
            } else {
                KernelChoice::default().with(&over)
            };
            let choices = [KernelChoice::default(), second];
            let kernels =
                provision::provision(&cache, &choices, true).map_err(|e| e.to_string())?;
            provision::ensure_packages(provision::TEST_PACKAGES).map_err(|e| e.to_string())?;
            for (c, k) in choices.iter().zip(&kernels) {
                eprintln!(
                    "bulkhead-rootfs: ready: {c}: {} at {} (headers in {})",
                    k.abi,
                    k.vmlinuz.display(),
                    k.headers_dir.display()
                );
            }
            Ok(0)
        }
        Cmd::Bench {
            which: BenchCmd::Vmm { runs, also_vmm },
        } => {
            provision::provision(&cache, &[KernelChoice::default()], false)
                .map_err(|e| e.to_string())?;
            let kernel = Kernel::current(&cache).map_err(|e| e.to_string())?;
            let also = also_vmm
                .iter()
                .map(|s| bulkhead_rootfs::bench::vmm::AlsoVmm::parse(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            let lines = bulkhead_rootfs::bench::bench_vmm(&kernel, &workspace, runs, &also)
                .map_err(|e| e.to_string())?;
            for l in lines {
                println!("{l}");
            }
            Ok(0)
        }
        Cmd::Bench {
            which: BenchCmd::Net,
        } => {
            provision::provision(&cache, &[KernelChoice::default()], false)
                .map_err(|e| e.to_string())?;
            let kernel = Kernel::current(&cache).map_err(|e| e.to_string())?;
            let lines = bulkhead_rootfs::bench::net::bench_net(&kernel, cache.dir(), &workspace)
                .map_err(|e| e.to_string())?;
            for l in lines {
                println!("{l}");
            }
            Ok(0)
        }
        Cmd::Bench {
            which: BenchCmd::Wayland { frames },
        } => {
            provision::provision(&cache, &[KernelChoice::default()], false)
                .map_err(|e| e.to_string())?;
            let kernel = Kernel::current(&cache).map_err(|e| e.to_string())?;
            let lines = bulkhead_rootfs::bench::wayland::bench_wayland(
                &kernel,
                cache.dir(),
                &workspace,
                frames,
            )
            .map_err(|e| e.to_string())?;
            for l in lines {
                println!("{l}");
            }
            Ok(0)
        }
        Cmd::Bench {
            which:
                BenchCmd::Wl {
                    rounds,
                    shm_mib,
                    reps,
                    also_vmm,
                },
        } => {
            provision::provision(&cache, &[KernelChoice::default()], false)
                .map_err(|e| e.to_string())?;
            let kernel = Kernel::current(&cache).map_err(|e| e.to_string())?;
            let also = also_vmm
                .iter()
                .map(|s| bulkhead_rootfs::bench::vmm::AlsoVmm::parse(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            let opts = bulkhead_rootfs::bench::wl::WlBenchOptions {
                rounds,
                shm_mib,
                reps,
                also,
            };
            let lines = bulkhead_rootfs::bench::bench_wl(&kernel, &workspace, &opts)
                .map_err(|e| e.to_string())?;
            for l in lines {
                println!("{l}");
            }
            Ok(0)
        }
        Cmd::GuestRoot { packages } => {
            let img = bulkhead_rootfs::guest_root::image_for(cache.dir(), &packages)
                .map_err(|e| e.to_string())?;
            println!("{}", img.path.display());
            Ok(0)
        }
        Cmd::Build {
            system,
            out,
            efi,
            cmdline,
            append,
            kernels,
        } => {
            let (kernels, image, _) = build(
                &cache,
                &workspace,
                &system,
                out,
                &kernels.overrides()?,
                false,
            )?;
            if efi {
                let cmdline = cmdline.unwrap_or_else(|| format!("{HOST_CMDLINE} {append}"));
                let uki = write_uki(&cache, &kernels, &image, cmdline.trim(), &system)?;
                eprintln!("bulkhead-rootfs: wrote {}", uki.display());
            }
            Ok(0)
        }
        Cmd::Boot {
            system,
            timeout,
            append,
            net_hub,
            display,
            efi,
            kernels,
        } => {
            // Install what is missing (QEMU, the kernels); quick when all is there.
            let over = kernels.overrides()?;
            let (kernels, image, disks) = build(&cache, &workspace, &system, None, &over, true)?;
            let cmdline = format!("{HOST_CMDLINE} {append}");
            let out_dir = image.parent().map(PathBuf::from).unwrap_or_default();
            let mut cfg = if efi {
                let uki = write_uki(&cache, &kernels, &image, cmdline.trim(), &system)?;
                let esp = out_dir.join("esp.img");
                efi::esp::write_esp(&uki, &esp).map_err(|e| e.to_string())?;
                let fw = efi::esp::Firmware::ovmf(&esp, &out_dir.join("ovmf-vars.fd"))
                    .map_err(|e| e.to_string())?;
                eprintln!(
                    "bulkhead-rootfs: booting {} from {} with {}",
                    uki.display(),
                    esp.display(),
                    fw.code.display()
                );
                QemuConfig::host_firmware(fw)
            } else {
                QemuConfig::host(&kernels.host.vmlinuz, &image, cmdline.trim())
            };
            cfg.disks = disks;
            // The emulated host's 0000:02:00.0 is the net hub's NIC or the screen, whichever
            // the policy grants a VM (by its `id=`).
            let policy = policy_files(&system);
            let grants = |id| bulkhead_rootfs::qemu::grants_device(&policy, "0000:02:00.0", id);
            cfg.net_hub = net_hub || grants("1af4:1041");
            cfg.display = !cfg.net_hub && (display || grants("1234:1111"));
            if cfg.display {
                // For the screendumps (a short path: a Unix socket's is limited).
                cfg.qmp = Some(
                    std::env::temp_dir().join(format!("bulkhead-boot-{}.qmp", std::process::id())),
                );
            }
            // The emulated host's second serial port: screenshots from a GUI VM, if any.
            let screens = out_dir.join("screens.bin");
            let _ = std::fs::remove_file(&screens);
            cfg.second_serial = Some(screens.clone());
            eprintln!("bulkhead-rootfs: {}", cfg.command_line());
            let mut m = Machine::spawn(&cfg, true).map_err(|e| e.to_string())?;
            let screen = out_dir.join("display.png");
            let _ = std::fs::remove_file(&screen);
            let mut qmp = if cfg.display {
                Some(m.qmp().map_err(|e| e.to_string())?)
            } else {
                None
            };
            // The screen as the GUI VM's picture was taken: QEMU's own screendump, right
            // when the screens service passed a picture on (the last one stays).
            let outcome = m.wait_end_watching(Duration::from_secs(timeout), |line| {
                let Some(q) = qmp.as_mut() else { return };
                let Some(name) = line.strip_prefix("screens: passed on png ") else {
                    return;
                };
                let name = name.split_whitespace().next().unwrap_or_default();
                match q.screendump(bulkhead_rootfs::qemu::DISPLAY_ID, &screen) {
                    Ok(()) => eprintln!(
                        "bulkhead-rootfs: the screen at picture {name}: {}",
                        screen.display()
                    ),
                    Err(e) => eprintln!("bulkhead-rootfs: screendump: {e}"),
                }
            });
            drop(qmp);
            if let Some(sock) = &cfg.qmp {
                let _ = std::fs::remove_file(sock);
            }
            match bulkhead_rootfs::screens::extract(&screens, &out_dir) {
                Ok(pictures) => {
                    for p in pictures {
                        eprintln!(
                            "bulkhead-rootfs: picture {}: {} ({}x{}, {} windows)",
                            p.name,
                            p.png.display(),
                            p.image.width,
                            p.image.height,
                            p.scene.windows().count()
                        );
                    }
                }
                Err(e) => eprintln!("bulkhead-rootfs: screenshots: {e}"),
            }
            Ok(match outcome {
                Ok(Outcome::PowerOff) => {
                    eprintln!("bulkhead-rootfs: the host powered off cleanly");
                    status::POWERED_OFF
                }
                Ok(Outcome::Reboot) => {
                    eprintln!("bulkhead-rootfs: the host rebooted (QEMU runs with -no-reboot)");
                    status::REBOOTED
                }
                Ok(Outcome::Panic(line)) => {
                    eprintln!("bulkhead-rootfs: kernel panic: {line}");
                    status::KERNEL_PANIC
                }
                Ok(Outcome::Other(code)) => {
                    eprintln!(
                        "bulkhead-rootfs: QEMU ended without a clean power-off (status {code:?})"
                    );
                    status::QEMU_DIED
                }
                Err(e) => {
                    eprintln!("bulkhead-rootfs: {e}");
                    status::TIMEOUT
                }
            })
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Cli::parse()) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("bulkhead-rootfs: error: {e}");
            ExitCode::from(status::ERROR)
        }
    }
}
