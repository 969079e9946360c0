//! `bulkhead-rootfs`: provision a machine, build a host image, boot it under QEMU.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bulkhead_rootfs::image::build_system_image;
use bulkhead_rootfs::kernel::{Cache, Kernel};
use bulkhead_rootfs::qemu::{Machine, Outcome, QemuConfig};
use bulkhead_rootfs::{provision, workspace_dir, HOST_CMDLINE};
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
    /// Install QEMU from Debian's packages (as root) and download the current Debian cloud
    /// kernel and its modules into the cache; also install what the tests need (weston,
    /// wl-clipboard, wayland-utils, xvfb). Idempotent.
    Provision,
    /// Build the host initramfs for a system directory (system.toml + policy.d/).
    Build {
        /// The system directory.
        #[arg(long, default_value_os_t = default_system())]
        system: PathBuf,
        /// Output file (default target/bulkhead/<system>/host.cpio.gz).
        #[arg(long)]
        out: Option<PathBuf>,
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

fn default_system() -> PathBuf {
    workspace_dir().join("rootfs/examples/demo")
}

fn system_name(system: &std::path::Path) -> String {
    system
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "system".into())
}

fn build(
    cache: &Cache,
    workspace: &std::path::Path,
    system: &std::path::Path,
    out: Option<PathBuf>,
) -> Result<(Kernel, PathBuf), String> {
    let kernel = Kernel::current(cache).map_err(|e| e.to_string())?;
    let out = out.unwrap_or_else(|| {
        workspace
            .join("target/bulkhead")
            .join(system_name(system))
            .join("host.cpio.gz")
    });
    build_system_image(&kernel, workspace, system, &out).map_err(|e| e.to_string())?;
    eprintln!(
        "bulkhead-rootfs: wrote {} (kernel {})",
        out.display(),
        kernel.abi
    );
    Ok((kernel, out))
}

fn run(cli: Cli) -> Result<u8, String> {
    let cache = cli
        .cache
        .map(Cache::new)
        .unwrap_or_else(Cache::default_location);
    let workspace = cli.workspace.unwrap_or_else(workspace_dir);
    match cli.command {
        Cmd::Provision => {
            let k = provision::provision(&cache).map_err(|e| e.to_string())?;
            provision::ensure_packages(provision::TEST_PACKAGES).map_err(|e| e.to_string())?;
            eprintln!(
                "bulkhead-rootfs: ready: kernel {} at {}",
                k.abi,
                k.vmlinuz.display()
            );
            Ok(0)
        }
        Cmd::Bench {
            which: BenchCmd::Vmm { runs, also_vmm },
        } => {
            provision::provision(&cache).map_err(|e| e.to_string())?;
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
            which:
                BenchCmd::Wl {
                    rounds,
                    shm_mib,
                    reps,
                    also_vmm,
                },
        } => {
            provision::provision(&cache).map_err(|e| e.to_string())?;
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
        Cmd::Build { system, out } => build(&cache, &workspace, &system, out).map(|_| 0),
        Cmd::Boot {
            system,
            timeout,
            append,
        } => {
            // Install what is missing (QEMU, the kernel); quick when all is there.
            provision::provision(&cache).map_err(|e| e.to_string())?;
            let (kernel, image) = build(&cache, &workspace, &system, None)?;
            let cmdline = format!("{HOST_CMDLINE} {append}");
            let cfg = QemuConfig::host(&kernel.vmlinuz, &image, cmdline.trim());
            eprintln!("bulkhead-rootfs: {}", cfg.command_line());
            let mut m = Machine::spawn(&cfg, true).map_err(|e| e.to_string())?;
            let outcome = m.wait_end(Duration::from_secs(timeout));
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
