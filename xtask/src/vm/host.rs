//! Host tools: where they are, and installing the missing ones.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Each tool the harness runs (on the host or copied into the guest), with
/// the Debian package that ships it.
const TOOLS: [(&str, &str); 12] = [
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("cpio", "cpio"),
    ("depmod", "kmod"),
    ("modinfo", "kmod"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
    ("bpftool", "bpftool"),
    ("nft", "nftables"),
    ("ip", "iproute2"),
    ("conntrack", "conntrack"),
    ("dpkg-deb", "dpkg"),
];

/// Directories searched after `$PATH`: a non-root `$PATH` often lacks sbin.
const EXTRA_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The first executable called `name` on `$PATH`, then in the usual
/// sbin/bin directories.
pub(crate) fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

/// Like [`find_tool`], with an error that says how to get the tool.
pub(crate) fn require_tool(name: &str) -> Result<PathBuf> {
    find_tool(name).with_context(|| {
        let pkg = TOOLS
            .iter()
            .find(|(tool, _)| *tool == name)
            .map_or(name, |(_, pkg)| pkg);
        format!("`{name}` not found on this host: install the Debian package {pkg}")
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Whether the file is a dynamically linked program (has an ELF interpreter).
pub(crate) fn is_dynamic_elf(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    // ELF64 little-endian only (x86-64 hosts): walk the program headers for
    // PT_INTERP.
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    const PT_INTERP: u32 = 3;
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        bytes
            .get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap()) == PT_INTERP)
    })
}

/// Effective uid, from /proc (std has no getuid).
pub(crate) fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Installs what the harness needs on a fresh Debian machine, idempotently and
/// quietly. Does nothing (not even `apt-get update`) when every tool is there.
pub fn ensure_host_tools() -> Result<()> {
    let mut missing: Vec<&str> = Vec::new();
    for (tool, pkg) in TOOLS {
        let present = match find_tool(tool) {
            // A dynamically linked busybox cannot run inside the guest alone.
            Some(path) if tool == "busybox" => !is_dynamic_elf(&path),
            Some(_) => true,
            None => false,
        };
        if !present && !missing.contains(&pkg) {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("vm: installing {}", missing.join(" "));
    let sudo = match euid() {
        Some(0) => None,
        _ => Some(find_tool("sudo").with_context(|| {
            format!(
                "not root and no sudo: install as root: {}",
                missing.join(" ")
            )
        })?),
    };
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = match &sudo {
            Some(sudo) => {
                let mut c = Command::new(sudo);
                c.arg("apt-get");
                c
            }
            None => Command::new("apt-get"),
        };
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        let out = cmd.output().context("running apt-get")?;
        if !out.status.success() {
            bail!(
                "apt-get {} failed:\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    apt(&["-qq", "update"])?;
    let mut install = vec!["-qq", "-y", "--no-install-recommends", "install"];
    install.extend(&missing);
    apt(&install)?;
    for (tool, _) in TOOLS {
        require_tool(tool)?;
    }
    Ok(())
}
