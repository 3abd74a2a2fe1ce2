//! The VM harness behind `cargo xtask vm` and `cargo xtask integration-test vm`.
//!
//! One boot = one Debian cloud kernel under QEMU (TCG), an initramfs holding
//! busybox, the netfilter modules, nft/ip/bpftool/conntrack and the caller's
//! files, and a generated `/init` that runs one command and powers off.
//!
//! The guest talks back over the serial console only. `/init` prints
//! `CTWATCH-VM-START-<nonce> <uname -r>` just before the command and
//! `CTWATCH-VM-EXIT-<nonce> <status>` after it; the nonce is fresh per boot,
//! so nothing the command prints can fake either line. Everything before the
//! start line (firmware, kernel, module loading) is kept off the terminal
//! unless the boot fails, and then it is printed whole.
//!
//! Environment: `CTWATCH_CACHE` moves the cache (see [`cache_dir`]);
//! `CTWATCH_VM_ACCEL` replaces QEMU's `-accel tcg` (e.g. `kvm` on machines
//! where KVM can run a stock kernel; here it cannot).
//!
//! - [`kernels`]: fetching and caching kernels with a private apt configuration.
//! - [`initramfs`]: building the guest's root file system.
//! - [`host`]: finding and installing the host tools.

mod host;
mod initramfs;
mod kernels;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

pub use host::ensure_host_tools;

/// The kernels booted when [`VmOpts::kernels`] is empty.
pub const ALL_KERNELS: [&str; 4] = ["5.10", "6.1", "6.12", "7.2"];

/// What to boot and what to run inside.
#[derive(Debug, Clone)]
pub struct VmOpts {
    /// `major.minor` of each kernel to boot, in order; empty means [`ALL_KERNELS`].
    pub kernels: Vec<String>,
    /// Host file (or directory) → absolute guest path. A dynamic ELF brings
    /// its `ldd` libraries along.
    pub files: Vec<(PathBuf, String)>,
    /// Host directory visible at `/mnt/share` in the guest: over 9p where the
    /// kernel has it, otherwise copied into the initramfs (guest writes are
    /// then lost). Debian's cloud kernels have no 9p, so today it is a copy.
    pub share: Option<PathBuf>,
    /// Run under `sh -c` in the guest; `None` gives an interactive shell on
    /// the serial console (stdin attached).
    pub command: Option<String>,
    /// Exported in the guest before the command runs.
    pub env: Vec<(String, String)>,
    /// Wall-clock bound per boot; QEMU is killed when it runs out.
    pub timeout: Duration,
}

/// How one boot ended.
#[derive(Debug, Clone)]
pub struct VmResult {
    /// `major.minor` as requested, e.g. `6.1`.
    pub kernel: String,
    /// `uname -r` of the booted kernel, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_release: String,
    /// The command's exit status; `None` on timeout, panic or a missing
    /// exit line.
    pub exit_code: Option<i32>,
    /// The command's console output (`\r\n` folded to `\n`); the whole
    /// console log instead when the guest never reached the command.
    pub output: String,
    pub timed_out: bool,
    pub panicked: bool,
}

/// `$CTWATCH_CACHE`, or `~/.cache/ctwatch`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CTWATCH_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache").join("ctwatch")
}

/// Ensures kernel packages are downloaded and unpacked (cached), builds the
/// initramfs, boots, returns results per kernel.
///
/// Errors are harness failures (no kernel, no QEMU, bad options); a guest
/// that fails, panics or times out is an `Ok` result with `exit_code: None`
/// or a non-zero code.
pub fn run_in_vms(opts: &VmOpts) -> Result<Vec<VmResult>> {
    validate(opts)?;
    let wanted: Vec<String> = if opts.kernels.is_empty() {
        ALL_KERNELS.iter().map(|k| k.to_string()).collect()
    } else {
        opts.kernels.clone()
    };
    let qemu = host::find_tool("qemu-system-x86_64").context(
        "qemu-system-x86_64 not found: install qemu-system-x86 (ensure_host_tools does it)",
    )?;

    // Fetch every kernel first, so a network problem shows before any boot.
    let kernels = wanted
        .iter()
        .map(|mm| kernels::ensure_kernel(mm))
        .collect::<Result<Vec<_>>>()?;

    let mut results = Vec::with_capacity(kernels.len());
    for kernel in &kernels {
        let work = WorkDir::new()?;
        let nonce = nonce();
        let image = initramfs::build(kernel, opts, &nonce, work.path())
            .with_context(|| format!("building the initramfs for kernel {}", kernel.mm))?;
        eprintln!(
            "vm: booting {} ({}){}",
            kernel.mm,
            kernel.release,
            if opts.command.is_none() {
                "; interactive shell, `exit` powers off, Ctrl-A X kills QEMU"
            } else {
                ""
            }
        );
        let started = Instant::now();
        let (result, reached_command) = boot(&qemu, kernel, &image, opts, &nonce)?;
        if !reached_command {
            // Nothing was streamed; the boot log is the only clue.
            eprintln!("vm: {} never reached the command; console log:", kernel.mm);
            eprintln!("{}", result.output);
        }
        report(&result, started.elapsed(), opts.timeout);
        results.push(result);
    }
    Ok(results)
}

fn validate(opts: &VmOpts) -> Result<()> {
    for (host_path, guest) in &opts.files {
        if !guest.starts_with('/') {
            bail!(
                "guest path {guest:?} for {} is not absolute",
                host_path.display()
            );
        }
        if !host_path.exists() {
            bail!("{} does not exist", host_path.display());
        }
    }
    if let Some(share) = &opts.share {
        if !share.is_dir() {
            bail!("share {} is not a directory", share.display());
        }
    }
    for (key, _) in &opts.env {
        let ok = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            bail!("environment variable name {key:?} is not a shell identifier");
        }
    }
    if opts.timeout.is_zero() {
        bail!("the VM timeout is zero");
    }
    Ok(())
}

fn report(result: &VmResult, elapsed: Duration, timeout: Duration) {
    let how = if result.timed_out {
        format!("TIMED OUT after {} s", timeout.as_secs())
    } else if result.panicked {
        "KERNEL PANIC".to_string()
    } else {
        match result.exit_code {
            Some(code) => format!("exit {code}"),
            None => "no exit line from the guest".to_string(),
        }
    };
    eprintln!(
        "vm: {} ({}): {how} in {:.1} s",
        result.kernel,
        result.kernel_release,
        elapsed.as_secs_f64()
    );
}

fn nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{:x}{n:x}", std::process::id(), nanos & 0xffff_ffff)
}

/// A scratch directory removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("ctwatch-vm-{}", nonce()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills QEMU if it is still running when dropped (early return, panic).
struct Qemu(Child);

impl Qemu {
    /// SIGTERM first, so QEMU restores the terminal, then SIGKILL.
    fn stop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.stop();
    }
}

fn boot(
    qemu: &Path,
    kernel: &kernels::Kernel,
    image: &initramfs::Image,
    opts: &VmOpts,
    nonce: &str,
) -> Result<(VmResult, bool)> {
    let interactive = opts.command.is_none();
    let accel = std::env::var("CTWATCH_VM_ACCEL").unwrap_or_else(|_| "tcg".to_string());
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", &accel, "-m", "1024", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"]);
    if let (Some(share), true) = (&opts.share, image.share_9p) {
        let mut spec = std::ffi::OsString::from("local,path=");
        spec.push(share);
        spec.push(",mount_tag=ctwshare,security_model=none,multidevs=remap");
        cmd.arg("-virtfs").arg(spec);
    }
    cmd.stdin(if interactive {
        Stdio::inherit()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());

    let mut child = Qemu(
        cmd.spawn()
            .with_context(|| format!("starting {}", qemu.display()))?,
    );
    let stdout = child.0.stdout.take().context("QEMU stdout")?;
    let start_tag = format!("CTWATCH-VM-START-{nonce}");
    let exit_tag = format!("CTWATCH-VM-EXIT-{nonce}");
    let reader = {
        let (start_tag, exit_tag) = (start_tag.clone(), exit_tag.clone());
        thread::spawn(move || relay(stdout, &start_tag, &exit_tag, interactive))
    };

    let deadline = Instant::now() + opts.timeout;
    let mut timed_out = false;
    loop {
        if child.0.try_wait()?.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            child.stop();
            break;
        }
        thread::sleep(Duration::from_millis(25));
    }
    drop(child);
    let log = reader
        .join()
        .map_err(|_| anyhow::anyhow!("console reader panicked"))?;
    let log = String::from_utf8_lossy(&log).replace("\r\n", "\n");
    let reached_command = log.contains(&start_tag);
    let result = parse_console(
        &log,
        &kernel.mm,
        &kernel.release,
        &start_tag,
        &exit_tag,
        timed_out,
    );
    Ok((result, reached_command))
}

/// Copies the console to stdout as it arrives and returns all of it.
///
/// Nothing is shown before the start line except `/init`'s own
/// `ctwatch-vm:` complaints; after it, lines pass through until the exit
/// line (interactive sessions pass raw bytes, prompts have no newline).
fn relay(mut from: impl Read, start_tag: &str, exit_tag: &str, interactive: bool) -> Vec<u8> {
    let mut all = Vec::new();
    let mut line = Vec::new();
    let mut started = false;
    let mut finished = false;
    let mut blanks = 0;
    // Interactive: how much of `all` has been written out.
    let mut shown = 0usize;
    let mut buf = [0u8; 8192];
    let stdout = std::io::stdout();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        all.extend_from_slice(&buf[..n]);
        let mut out = stdout.lock();
        if interactive && started {
            if !finished {
                let mut upto = all.len();
                let from = shown.saturating_sub(exit_tag.len());
                if let Some(at) = find(&all[from..], exit_tag.as_bytes()) {
                    // Up to the start of the exit line.
                    let at = from + at;
                    upto = all[..at]
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(at, |nl| nl + 1);
                    finished = true;
                }
                let _ = out.write_all(&all[shown.min(upto)..upto]);
                let _ = out.flush();
                shown = upto;
            }
            continue;
        }
        for &b in &buf[..n] {
            line.push(b);
            if b != b'\n' {
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\r', '\n']);
            if text.contains(exit_tag) {
                finished = true;
                // The last empty line is `/init`'s, not the command's.
                for _ in 1..blanks {
                    let _ = writeln!(out);
                }
            } else if started && !finished {
                if text.is_empty() {
                    blanks += 1;
                } else {
                    for _ in 0..std::mem::take(&mut blanks) {
                        let _ = writeln!(out);
                    }
                    let _ = writeln!(out, "{text}");
                }
            } else if text.contains(start_tag) {
                started = true;
            } else if !started && text.starts_with("ctwatch-vm:") {
                let _ = writeln!(out, "{text}");
            }
            line.clear();
        }
        if interactive && started {
            let _ = out.write_all(&line);
            line.clear();
            shown = all.len();
        }
        let _ = out.flush();
    }
    all
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_console(
    log: &str,
    mm: &str,
    release: &str,
    start_tag: &str,
    exit_tag: &str,
    timed_out: bool,
) -> VmResult {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.iter().position(|l| l.contains(start_tag));
    let exit = lines.iter().rposition(|l| l.contains(exit_tag));
    let kernel_release = start
        .and_then(|i| lines[i].split(start_tag).nth(1))
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .unwrap_or(release)
        .to_string();
    let code = exit.and_then(|i| {
        lines[i]
            .split(exit_tag)
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse::<i32>()
            .ok()
    });
    let panicked = log.contains("Kernel panic");
    let output = match start {
        Some(s) => {
            let end = exit.filter(|&e| e > s);
            let mut body = &lines[s + 1..end.unwrap_or(lines.len())];
            // `/init` echoes a newline before the exit line so that it starts
            // a line of its own; that empty line is not the command's.
            if let (Some(_), Some((&"", rest))) = (end, body.split_last()) {
                body = rest;
            }
            let mut out = body.join("\n");
            if !body.is_empty() {
                out.push('\n');
            }
            out
        }
        None => log.to_string(),
    };
    VmResult {
        kernel: mm.to_string(),
        kernel_release,
        exit_code: if timed_out || panicked { None } else { code },
        output,
        timed_out,
        panicked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: &str = "CTWATCH-VM-START-abc";
    const EXIT: &str = "CTWATCH-VM-EXIT-abc";

    #[test]
    fn parses_exit_code_and_output() {
        let log = format!(
            "SeaBIOS\nboot noise\n{START} 6.1.0-56-cloud-amd64\nhello\nworld\n\n{EXIT} 3\nreboot: Power down\n"
        );
        let r = parse_console(&log, "6.1", "x", START, EXIT, false);
        assert_eq!(r.exit_code, Some(3));
        assert_eq!(r.kernel_release, "6.1.0-56-cloud-amd64");
        assert_eq!(r.output, "hello\nworld\n");
        assert!(!r.panicked && !r.timed_out);
    }

    #[test]
    fn output_without_trailing_newline() {
        let log = format!("{START} r\nno newline\n{EXIT} 0\n");
        let r = parse_console(&log, "6.1", "x", START, EXIT, false);
        assert_eq!(r.output, "no newline\n");
        assert_eq!(r.exit_code, Some(0));
    }

    #[test]
    fn panic_and_missing_exit_line_fail() {
        let log = "boot\nKernel panic - not syncing: VFS\n";
        let r = parse_console(log, "5.10", "rel", START, EXIT, false);
        assert!(r.panicked);
        assert_eq!(r.exit_code, None);
        assert_eq!(r.kernel_release, "rel");
        assert_eq!(r.output, log);

        let log = format!("{START} r\npartial\n");
        let r = parse_console(&log, "5.10", "rel", START, EXIT, false);
        assert_eq!(r.exit_code, None);
        assert_eq!(r.output, "partial\n");
    }

    #[test]
    fn forged_exit_line_needs_the_nonce() {
        let log = format!("{START} r\nCTWATCH-VM-EXIT-zzz 0\n\n{EXIT} 7\n");
        let r = parse_console(&log, "6.12", "x", START, EXIT, false);
        assert_eq!(r.exit_code, Some(7));
    }

    #[test]
    fn timeout_discards_exit_code() {
        let log = format!("{START} r\n\n{EXIT} 0\n");
        let r = parse_console(&log, "7.2", "x", START, EXIT, true);
        assert!(r.timed_out);
        assert_eq!(r.exit_code, None);
    }
}
