//! Makes sure the build and test prerequisites exist, installing only what
//! is missing, so the README's commands work on a fresh machine and a
//! second run is quick and quiet.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

pub fn cmd_output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// A nightly tool through rustup, clear of the stable toolchain that
/// `cargo xtask` itself runs under (cargo exports it to its children).
pub fn nightly(tool: &str) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", tool])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("CARGO");
    c
}

/// Nightly's sysroot and the file name of its shared libLLVM.
fn nightly_llvm() -> Result<(PathBuf, String, u32)> {
    let sysroot = cmd_output(nightly("rustc").args(["--print", "sysroot"])).context(
        "the nightly toolchain is required for the eBPF build: rustup toolchain install nightly",
    )?;
    let sysroot = PathBuf::from(sysroot.trim());
    let lib = sysroot.join("lib");
    let soname = fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let vv = cmd_output(nightly("rustc").arg("-vV"))?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .context("cannot read nightly's LLVM version from `rustc +nightly -vV`")?;
    Ok((sysroot, soname, major))
}

fn ensure_rust_src() -> Result<()> {
    let installed = cmd_output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask: installing rust-src for nightly");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker must link nightly's own LLVM: rustc's bitcode is newer than
/// any distro LLVM here.
fn ensure_bpf_linker(cache: &Path) -> Result<()> {
    let (sysroot, soname, major) = nightly_llvm()?;
    if let Ok(path) = cmd_output(Command::new("sh").args(["-c", "command -v bpf-linker"])) {
        let ldd = cmd_output(Command::new("ldd").arg(path.trim())).unwrap_or_default();
        if ldd.contains(&soname) && !ldd.contains("not found") {
            return Ok(());
        }
        eprintln!("xtask: bpf-linker does not link {soname}; rebuilding it");
    }
    // bpf-linker's build script links `-lLLVM` from $LLVM_PREFIX/lib and
    // records that directory as rpath: give it links to nightly's library.
    let prefix = cache.join("llvm-prefix");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib)?;
    for name in ["libLLVM.so".to_string(), soname.clone()] {
        let link = lib.join(&name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(sysroot.join("lib").join(&soname), &link)?;
    }
    eprintln!(
        "xtask: building bpf-linker 0.13 against nightly's LLVM {major} (a few minutes, once)"
    );
    run(nightly("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "0.13.0",
            "--locked",
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
}

/// Everything the eBPF build needs.
pub fn ensure_build_tools() -> Result<()> {
    let cache = crate::vm::cache_dir();
    fs::create_dir_all(&cache)?;
    ensure_rust_src()?;
    ensure_bpf_linker(&cache)
}

/// Debian packages the host integration tests call.
pub fn ensure_test_tools() -> Result<()> {
    let wanted = [
        ("nft", "nftables"),
        ("ip", "iproute2"),
        ("bpftool", "bpftool"),
        ("conntrack", "conntrack"),
        ("tmux", "tmux"),
        ("curl", "curl"),
        // The real consumers of `serve`: tests/tests/consumers.rs.
        ("promtool", "prometheus"),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(tool, _)| !have(tool) && !Path::new(&format!("/usr/sbin/{tool}")).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    ensure_kubernetes_validate()
}

/// The manifest validator tests/tests/consumers.rs runs; PyPI only.
fn ensure_kubernetes_validate() -> Result<()> {
    if have("kubernetes-validate") {
        return Ok(());
    }
    let pip_ok = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !pip_ok {
        apt_install(&["python3-pip"])?;
    }
    eprintln!("xtask: installing kubernetes-validate (pip)");
    let pip = |extra: &[&str]| {
        let mut c = Command::new("python3");
        c.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(extra)
        .arg("kubernetes-validate");
        c
    };
    // Debian's own python3 refuses a system-wide pip install (PEP 668)
    // unless told; a pyenv or venv python takes the plain form.
    if run(&mut pip(&[])).is_err() {
        run(&mut pip(&["--break-system-packages"]))?;
    }
    // pyenv publishes new console scripts only through its shims.
    if !have("kubernetes-validate") && have("pyenv") {
        let _ = Command::new("pyenv").arg("rehash").status();
    }
    if !have("kubernetes-validate") {
        bail!("pip installed kubernetes-validate, but it is not on PATH");
    }
    Ok(())
}

pub fn apt_install(pkgs: &[&str]) -> Result<()> {
    eprintln!("xtask: installing {}", pkgs.join(" "));
    let sudo: &[&str] = if nix_is_root() { &[] } else { &["sudo"] };
    let apt = |args: &[&str]| {
        let mut c = Command::new(sudo.first().copied().unwrap_or("apt-get"));
        if !sudo.is_empty() {
            c.arg("apt-get");
        }
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(apt(&["-qq", "update"]).stdout(std::process::Stdio::null()))?;
    let mut c = apt(&["-y", "-qq", "--no-install-recommends", "install"]);
    c.args(pkgs).stdout(std::process::Stdio::null());
    run(&mut c)
}

pub fn nix_is_root() -> bool {
    cmd_output(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

/// What `cargo xtask fuzz` needs: nightly (sanitizer flags), a C++
/// compiler (libfuzzer-sys builds libFuzzer from source) and cargo-fuzz.
pub fn ensure_fuzz_tools() -> Result<()> {
    cmd_output(nightly("rustc").arg("-V"))
        .context("cargo-fuzz needs the nightly toolchain: rustup toolchain install nightly")?;
    if !have("c++") {
        apt_install(&["g++"])?;
    }
    if cmd_output(Command::new("cargo").args(["fuzz", "--version"])).is_ok() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz 0.13.2 (a few minutes, once)");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--version", "0.13.2", "--locked"]))
}
