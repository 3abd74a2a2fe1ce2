//! The ctwatch build-and-run workflow. Each subcommand is a short function
//! over plain `cargo` / system commands, with no hidden state; everything it
//! needs is installed on first use (see `setup`).
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use setup::run;

#[derive(Parser)]
#[command(about = "ctwatch build, run and test workflow")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing prerequisites (nightly rust-src, bpf-linker, Debian tools).
    Setup,
    /// Build the eBPF object and `ctwatch`.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `ctwatch` as root with the given arguments.
    Run {
        #[arg(long)]
        release: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The whole test suite: unit tests, then host integration tests (root).
    Test,
    /// Integration tests inside QEMU VMs on Debian kernels.
    IntegrationTest {
        #[command(subcommand)]
        target: ItTarget,
    },
    /// Boot a Debian kernel with ctwatch inside, for a person.
    Vm {
        /// `major.minor`: 5.10, 6.1, 6.12 or 7.2.
        #[arg(long, default_value = "6.12")]
        kernel: String,
        /// Host directory available at /mnt/share in the guest.
        #[arg(long)]
        share: Option<PathBuf>,
        /// Command run under `sh -c` in the guest; none gives a shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ItTarget {
    /// Boot each kernel and run the suite inside.
    Vm {
        #[arg(long)]
        kernel: Vec<String>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// The eBPF object, always optimised: the verifier rejects debug builds.
fn build_ebpf() -> Result<PathBuf> {
    setup::ensure_build_tools()?;
    run(cargo()
        .args(["+nightly", "build", "--quiet", "-p", "conntrack-ebpf", "--features", "ebpf"])
        .args(["--bin", "ctwatch-ebpf", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core", "--release"])
        // rustup's proxy picks nightly from `+nightly`; drop the stable
        // toolchain that `cargo xtask` itself runs under.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO"))
    .context("building the eBPF object")?;
    Ok(root().join("target/bpfel-unknown-none/release/ctwatch-ebpf"))
}

fn build(release: bool) -> Result<PathBuf> {
    let obj = build_ebpf()?;
    let mut c = cargo();
    c.args(["build", "--quiet", "-p", "conntrack-user", "--bin", "ctwatch"])
        .env("CTWATCH_EBPF_OBJECT", &obj);
    if release {
        c.arg("--release");
    }
    run(&mut c).context("building ctwatch")?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("ctwatch"))
}

fn as_root(bin: &Path) -> Command {
    if setup::nix_is_root() {
        Command::new(bin)
    } else {
        let mut c = Command::new("sudo");
        c.arg(bin);
        c
    }
}

fn run_ctwatch(release: bool, args: &[String]) -> Result<()> {
    let bin = build(release)?;
    let status = as_root(&bin).args(args).status()?;
    std::process::exit(status.code().unwrap_or(1));
}

/// Builds the test binaries; returns (ctwatch, host test binaries).
fn build_tests() -> Result<PathBuf> {
    let ctwatch = build(false)?;
    run(cargo().args(["build", "--quiet", "-p", "ctwatch-tests", "--bins", "--tests"]))?;
    Ok(ctwatch)
}

fn test() -> Result<()> {
    setup::ensure_test_tools()?;
    let ctwatch = build_tests()?;
    eprintln!("xtask: unit tests");
    run(cargo().args(["test", "-p", "conntrack-user", "-p", "xtask", "-p", "conntrack-ebpf"])
        .env("CTWATCH_EBPF_OBJECT", root().join("target/bpfel-unknown-none/release/ctwatch-ebpf")))?;
    eprintln!("xtask: host integration tests (root, serial, tracepoint mode)");
    let mut c = cargo();
    c.args(["test", "-p", "ctwatch-tests", "--test", "host", "--", "--test-threads=1"])
        .env("CTWATCH_BIN", &ctwatch);
    if !setup::nix_is_root() {
        c.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    run(&mut c)?;
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => {
            setup::ensure_build_tools()?;
            setup::ensure_test_tools()?;
            vm::ensure_host_tools()
        }
        Cmd::Build { release } => build(release).map(|p| eprintln!("xtask: built {}", p.display())),
        Cmd::Run { release, args } => run_ctwatch(release, &args),
        Cmd::Test => test(),
        Cmd::IntegrationTest { target: ItTarget::Vm { kernel } } => integration_vm(&kernel),
        Cmd::Vm { kernel, share, command } => boot_vm(&kernel, share, command),
    }
}

fn integration_vm(kernels: &[String]) -> Result<()> {
    vm::ensure_host_tools()?;
    let _ = kernels;
    bail!("the VM suite is not wired yet")
}

fn boot_vm(kernel: &str, share: Option<PathBuf>, command: Vec<String>) -> Result<()> {
    vm::ensure_host_tools()?;
    let ctwatch = build(false)?;
    let opts = vm::VmOpts {
        kernels: vec![kernel.to_string()],
        files: vec![(ctwatch, "/bin/ctwatch".into())],
        share,
        command: (!command.is_empty()).then(|| command.join(" ")),
        env: vec![],
        timeout: if command.is_empty() {
            Duration::from_secs(24 * 3600)
        } else {
            Duration::from_secs(600)
        },
    };
    let results = vm::run_in_vms(&opts)?;
    let code = results.first().and_then(|r| r.exit_code).unwrap_or(1);
    std::process::exit(code);
}
