//! The ctwatch build-and-run workflow. Each subcommand is a short function
//! over plain `cargo` / system commands, with no hidden state; everything it
//! needs is installed on first use (see `setup`).
mod bench;
mod fuzz;
mod hostlock;
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
    /// Install missing prerequisites (nightly rust-src, bpf-linker, cargo-fuzz, Debian tools).
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
    /// The whole test suite: unit tests, host integration tests (root,
    /// tracepoint mode), then the VM suite (kprobe mode on Debian kernels).
    Test {
        /// Kernels for the VM suite (default: all four; env CTWATCH_VM_KERNELS="6.1 6.12" also works).
        #[arg(long)]
        kernel: Vec<String>,
        /// Skip the VM suite (refused when CI=true).
        #[arg(long)]
        no_vm: bool,
    },
    /// Overhead and speed ratios, side by side; writes docs/benchmarks.md.
    Bench(bench::BenchArgs),
    /// Fuzz the decoders of untrusted input (cargo-fuzz, nightly).
    Fuzz {
        /// Time budget per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
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
    run(setup::nightly("cargo")
        .current_dir(root())
        .args([
            "build",
            "--quiet",
            "-p",
            "conntrack-ebpf",
            "--features",
            "ebpf",
        ])
        .args(["--bin", "ctwatch-ebpf", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core", "--release"]))
    .context("building the eBPF object")?;
    Ok(root().join("target/bpfel-unknown-none/release/ctwatch-ebpf"))
}

fn build(release: bool) -> Result<PathBuf> {
    let obj = build_ebpf()?;
    let mut c = cargo();
    c.args([
        "build",
        "--quiet",
        "-p",
        "conntrack-user",
        "--bin",
        "ctwatch",
    ])
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
    run(cargo().args([
        "build",
        "--quiet",
        "-p",
        "ctwatch-tests",
        "--bins",
        "--tests",
    ]))?;
    Ok(ctwatch)
}

/// Runs a test command, echoing its output, and sums libtest's
/// `test result:` lines.
fn run_tally(cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let mut text = String::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        text.push_str(&line);
        text.push('\n');
    }
    let status = child.wait()?;
    let (passed, failed) = tally(&text);
    if !status.success() {
        bail!("{cmd:?} failed ({passed} passed, {failed} failed)");
    }
    Ok((passed, failed))
}

fn test(kernels: &[String], no_vm: bool) -> Result<()> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if no_vm && ci {
        bail!("--no-vm is refused when CI=true: the VM suite must run in CI");
    }
    setup::ensure_test_tools()?;
    if !no_vm {
        vm::ensure_host_tools()?;
    }
    let ctwatch = build_tests()?;
    let obj = root().join("target/bpfel-unknown-none/release/ctwatch-ebpf");
    eprintln!("xtask: unit tests");
    let unit = run_tally(
        cargo()
            .args([
                "test",
                "-p",
                "conntrack-user",
                "-p",
                "xtask",
                "-p",
                "conntrack-ebpf",
            ])
            .env("CTWATCH_EBPF_OBJECT", &obj),
    )?;
    eprintln!(
        "xtask: fuzz smoke ({} s per target, no sanitizer)",
        fuzz::SMOKE_SECONDS
    );
    let fuzzed = fuzz::smoke(ci)?;
    eprintln!("xtask: host integration tests (root, serial, tracepoint mode)");
    let (_, _lock) = hostlock::take(hostlock::Wait::Yes)?;
    let mut c = cargo();
    c.args([
        "test",
        "-p",
        "ctwatch-tests",
        "--tests",
        "--",
        "--test-threads=1",
    ])
    .env("CTWATCH_BIN", &ctwatch)
    .env("CTWATCH_TEST_MODE", "tracepoint");
    if ci {
        // In CI a privileged test that cannot run is a failure, not a skip.
        c.env("CTWATCH_REQUIRE_PRIVILEGED", "1");
    }
    if !setup::nix_is_root() {
        c.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    let host = run_tally(&mut c)?;
    let mut vm_counts = (0, 0);
    if no_vm {
        eprintln!("xtask: VM suite skipped (--no-vm)");
    } else {
        let mut ks = kernels.to_vec();
        if ks.is_empty() {
            if let Ok(v) = std::env::var("CTWATCH_VM_KERNELS") {
                ks = v.split_whitespace().map(str::to_string).collect();
            }
        }
        eprintln!("xtask: VM suite (kprobe mode inside QEMU)");
        vm_counts = integration_vm(&ks)?;
    }
    let passed = unit.0 + fuzzed + host.0 + vm_counts.0;
    let failed = unit.1 + host.1 + vm_counts.1;
    println!("ctwatch: {passed} passed, {failed} failed");
    Ok(())
}

fn bench(args: &bench::BenchArgs) -> Result<()> {
    setup::ensure_test_tools()?;
    if args.no_build {
        // Whatever the last `cargo xtask build --release` left.
        return bench::bench(
            &root().join("target/release/ctwatch"),
            &root().join("target/release/ctpeer"),
            &root(),
            args,
        );
    }
    let ctwatch = build(true)?;
    run(cargo().args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "ctwatch-tests",
        "--bin",
        "ctpeer",
    ]))?;
    bench::bench(
        &ctwatch,
        &root().join("target/release/ctpeer"),
        &root(),
        args,
    )
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => {
            setup::ensure_build_tools()?;
            setup::ensure_test_tools()?;
            setup::ensure_fuzz_tools()?;
            vm::ensure_host_tools()
        }
        Cmd::Build { release } => build(release).map(|p| eprintln!("xtask: built {}", p.display())),
        Cmd::Run { release, args } => run_ctwatch(release, &args),
        Cmd::Test { kernel, no_vm } => test(&kernel, no_vm),
        Cmd::Bench(args) => bench(&args),
        Cmd::Fuzz { seconds, targets } => fuzz::run(&targets, seconds, "address"),
        Cmd::IntegrationTest {
            target: ItTarget::Vm { kernel },
        } => integration_vm(&kernel).map(|_| ()),
        Cmd::Vm {
            kernel,
            share,
            command,
        } => boot_vm(&kernel, share, command),
    }
}

/// Paths of the `ctwatch-tests` integration test binaries, by target name.
fn test_binaries() -> Result<Vec<(String, PathBuf)>> {
    let out = setup::cmd_output(cargo().args([
        "test",
        "-p",
        "ctwatch-tests",
        "--tests",
        "--no-run",
        "--message-format=json",
    ]))?;
    let mut bins = Vec::new();
    for line in out.lines() {
        // Plain string matching keeps xtask free of a JSON dependency.
        if !line.contains("\"reason\":\"compiler-artifact\"")
            || !line.contains("\"kind\":[\"test\"]")
        {
            continue;
        }
        let field = |from: usize, name: &str| -> Option<String> {
            let key = format!("\"{name}\":\"");
            let start = line[from..].find(&key)? + from + key.len();
            let end = line[start..].find('"')? + start;
            Some(line[start..end].to_string())
        };
        let target = line.find("\"target\":").unwrap_or(0);
        if let (Some(name), Some(exe)) = (field(target, "name"), field(0, "executable")) {
            if name == "host" || name == "kernel_probes" {
                bins.push((name, PathBuf::from(exe)));
            }
        }
    }
    if bins.len() != 2 {
        bail!("could not find the host and kernel_probes test binaries (found {bins:?})");
    }
    Ok(bins)
}

/// One line per kernel: what ran and how it ended.
struct VmRow {
    kernel: String,
    release: String,
    mode: String,
    passed: u64,
    failed: u64,
    ok: bool,
    why: String,
}

/// Sums libtest's `test result:` lines.
fn tally(output: &str) -> (u64, u64) {
    let mut passed = 0;
    let mut failed = 0;
    for line in output.lines().filter(|l| l.contains("test result:")) {
        let num = |word: &str| -> u64 {
            line.split(';')
                .find(|p| p.trim_end().ends_with(word))
                .and_then(|p| p.split_whitespace().rev().nth(1))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        passed += num("passed");
        failed += num("failed");
    }
    (passed, failed)
}

/// Boots each kernel and runs the suite inside; returns (passed, failed).
fn integration_vm(kernels: &[String]) -> Result<(u64, u64)> {
    vm::ensure_host_tools()?;
    setup::ensure_test_tools()?;
    // Release: TCG emulation is slow enough without a debug build.
    let ctwatch = build(true)?;
    run(cargo().args(["build", "--quiet", "-p", "ctwatch-tests", "--bins"]))?;
    let bins = test_binaries()?;
    let mut files = vec![
        (ctwatch, "/bin/ctwatch".to_string()),
        (
            root().join("target/debug/ctpeer"),
            "/bin/ctpeer".to_string(),
        ),
    ];
    for (name, path) in &bins {
        files.push((path.clone(), format!("/bin/ctw-{name}")));
    }
    let opts = vm::VmOpts {
        kernels: kernels.to_vec(),
        files,
        share: None,
        command: Some(
            // The first line names the mode auto picks (ctwatch's banner).
            "/bin/ctwatch report --duration 0.2 >/dev/null && \
             /bin/ctw-kernel_probes --test-threads=1 && /bin/ctw-host --test-threads=1"
                .into(),
        ),
        env: vec![
            ("CTWATCH_BIN".into(), "/bin/ctwatch".into()),
            ("CTPEER_BIN".into(), "/bin/ctpeer".into()),
            ("CTWATCH_TEST_MODE".into(), "kprobe".into()),
            // Inside the VM nothing may skip for lack of privileges.
            ("CTWATCH_REQUIRE_PRIVILEGED".into(), "1".into()),
            ("RUST_BACKTRACE".into(), "1".into()),
        ],
        timeout: Duration::from_secs(900),
    };
    let results = vm::run_in_vms(&opts)?;
    let rows: Vec<VmRow> = results
        .iter()
        .map(|r| {
            let (passed, failed) = tally(&r.output);
            let mode = r
                .output
                .lines()
                .filter(|l| l.contains(" mode on kernel "))
                .find_map(|l| {
                    l.split("ctwatch: ")
                        .nth(1)?
                        .split(" mode on kernel")
                        .next()
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "-".into());
            let why = if r.timed_out {
                "timed out".to_string()
            } else if r.panicked {
                "kernel panic".to_string()
            } else if r.exit_code.is_none() {
                "no exit line".to_string()
            } else if passed == 0 {
                "no test ran".to_string()
            } else {
                String::new()
            };
            VmRow {
                kernel: r.kernel.clone(),
                release: r.kernel_release.clone(),
                mode,
                passed,
                failed,
                ok: r.exit_code == Some(0) && passed > 0 && failed == 0,
                why,
            }
        })
        .collect();
    println!(
        "\n{:<7} {:<32} {:<11} {:>7} {:>7}  result",
        "kernel", "release", "mode", "passed", "failed"
    );
    for r in &rows {
        println!(
            "{:<7} {:<32} {:<11} {:>7} {:>7}  {}{}",
            r.kernel,
            r.release,
            r.mode,
            r.passed,
            r.failed,
            if r.ok { "ok" } else { "FAILED" },
            if r.why.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.why)
            }
        );
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.kernel.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("VM suite failed on kernel(s) {}", failed.join(", "));
    }
    Ok((
        rows.iter().map(|r| r.passed).sum(),
        rows.iter().map(|r| r.failed).sum(),
    ))
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
