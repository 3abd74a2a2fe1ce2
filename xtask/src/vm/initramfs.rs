//! The guest's root file system: an uncompressed newc cpio, built fresh for
//! every boot (it holds the caller's files, so nothing of it is cached).
//!
//! - busybox (static) with its applet links, `/sbin/modprobe` among them;
//! - the netfilter modules and their dependencies, decompressed, with a
//!   `modules.dep` from `depmod -b`;
//! - nft, ip, bpftool and conntrack, each with its `ldd` libraries;
//! - `VmOpts::files`, and the share when there is no 9p to mount it;
//! - `/init` (see [`INIT`]), `/ctwatch/cmd` and `/ctwatch/env`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use super::host::{find_tool, is_dynamic_elf, require_tool};
use super::kernels::Kernel;
use super::VmOpts;

/// Modules `/init` loads, in this order, when the kernel has them as modules
/// (built-in ones need nothing). `modprobe` pulls their dependencies in.
const MODULES: [(&str, Need); 14] = [
    ("crc32c", Need::IfPresent),
    ("libcrc32c", Need::IfPresent), // gone in 7.x, nf_conntrack uses lib/crc32c
    ("nfnetlink", Need::IfPresent), // built in on 7.x
    ("nf_defrag_ipv4", Need::Required),
    ("nf_defrag_ipv6", Need::Required),
    ("nf_conntrack", Need::Required),
    ("veth", Need::Required),
    ("nf_tables", Need::Required),
    ("nft_ct", Need::Required),
    ("nft_counter", Need::IfPresent), // part of nf_tables since 5.13
    ("nf_conntrack_netlink", Need::Required),
    // `nft ... dnat`: the NAT core (one module for both families since
    // 5.1, so no nf_nat_ipv4 on any kernel here), the `type nat` chain,
    // the `dnat` expression.
    ("nf_nat", Need::Required),
    ("nft_chain_nat", Need::Required),
    ("nft_nat", Need::Required),
];

/// What a 9p share needs; all must be there (module or built in) to use it.
const NINEP_MODULES: [&str; 5] = ["virtio_pci", "netfs", "9pnet", "9pnet_virtio", "9p"];

#[derive(Clone, Copy, PartialEq)]
enum Need {
    Required,
    IfPresent,
}

/// The guest's skeleton.
const DIRS: &str = "bin sbin usr/bin usr/sbin etc proc sys dev tmp run root var mnt/share ctwatch";

/// Tools copied in from the host, with their libraries.
const HOST_TOOLS: [&str; 4] = ["nft", "ip", "bpftool", "conntrack"];

pub(crate) struct Image {
    pub initrd: PathBuf,
    /// The share is mounted over 9p (QEMU needs `-virtfs`), rather than copied.
    pub share_9p: bool,
}

pub(crate) fn build(kernel: &Kernel, opts: &VmOpts, nonce: &str, work: &Path) -> Result<Image> {
    let root = work.join("root");
    for dir in DIRS.split_whitespace() {
        std::fs::create_dir_all(root.join(dir))?;
    }
    std::os::unix::fs::symlink("../run", root.join("var/run"))?;

    let mut libs = BTreeSet::new();
    install_busybox(&root)?;
    for tool in HOST_TOOLS {
        let path = require_tool(tool)?;
        copy_in(&path, &root, &path.to_string_lossy(), &mut libs)?;
    }
    // Debian's busybox ash runs its own applets ahead of $PATH, so `ip`
    // would be busybox's: /bin/sh is the host's dash (Essential on Debian).
    if let Some(dash) = find_tool("dash") {
        copy_in(&dash, &root, "/bin/sh", &mut libs)?;
    }
    // A shell with line editing for interactive sessions.
    let login_shell = match find_tool("bash") {
        Some(bash) if opts.command.is_none() => {
            copy_in(&bash, &root, "/bin/bash", &mut libs)?;
            "/bin/bash"
        }
        _ => "/bin/sh",
    };

    let modules = ModuleTree::read(&kernel.modules_dir())?;
    let ninep = opts.share.is_some() && NINEP_MODULES.iter().all(|m| modules.has(m));
    let mut load = Vec::new();
    for (name, need) in MODULES {
        if modules.is_builtin(name) {
            continue;
        }
        if modules.dep.contains_key(&norm(name)) {
            load.push(name.to_string());
        } else if need == Need::Required {
            bail!(
                "kernel {} ({}) has no module {name}",
                kernel.mm,
                kernel.release
            );
        }
    }
    if ninep {
        load.extend(
            NINEP_MODULES
                .iter()
                .filter(|m| !modules.is_builtin(m))
                .map(|m| m.to_string()),
        );
    }
    modules.install(&load, &root, &kernel.release)?;

    for (host_path, guest) in &opts.files {
        copy_in(host_path, &root, guest, &mut libs)
            .with_context(|| format!("copying {} to {guest}", host_path.display()))?;
    }
    if let (Some(share), false) = (&opts.share, ninep) {
        copy_tree(share, &root.join("mnt/share"))?;
    }

    write_etc(&root)?;
    let mut init = INIT
        .replace("@NONCE@", nonce)
        .replace("@MODULES@", &load.join(" "))
        .replace("@SHELL@", login_shell);
    init = init.replace(
        "@SHARE@",
        if ninep {
            "m -t 9p -o trans=virtio,version=9p2000.L,msize=262144 ctwshare /mnt/share"
        } else {
            ":"
        },
    );
    write_file(&root.join("init"), &init, 0o755)?;
    if let Some(command) = &opts.command {
        write_file(&root.join("ctwatch/cmd"), command, 0o644)?;
    }
    let env: String = opts
        .env
        .iter()
        .map(|(k, v)| format!("export {k}={}\n", shell_quote(v)))
        .collect();
    write_file(&root.join("ctwatch/env"), &env, 0o644)?;

    let initrd = work.join("initrd.cpio");
    write_cpio(&root, &initrd)?;
    Ok(Image {
        initrd,
        share_9p: ninep,
    })
}

/// The guest's `/init`. `m` mounts and complains (on the console, with the
/// `ctwatch-vm:` prefix the host shows even before the start line).
const INIT: &str = r#"#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
m() { mount "$@" || echo "ctwatch-vm: mount $* failed"; }
m -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
m -t proc proc /proc
m -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
m -t devpts devpts /dev/pts
m -t tmpfs tmpfs /dev/shm
m -t debugfs debugfs /sys/kernel/debug
m -t tracefs tracefs /sys/kernel/tracing
m -t bpf bpf /sys/fs/bpf
m -t securityfs securityfs /sys/kernel/security
m -t tmpfs tmpfs /tmp
m -t tmpfs tmpfs /run
mkdir -p /run/netns /run/lock
hostname ctwatch-vm
ip link set lo up || echo "ctwatch-vm: lo did not come up"
ulimit -l unlimited
for mod in @MODULES@; do
  modprobe "$mod" || echo "ctwatch-vm: modprobe $mod failed"
done
@SHARE@
. /ctwatch/env
cd /
echo "CTWATCH-VM-START-@NONCE@ $(uname -r)"
if [ -f /ctwatch/cmd ]; then
  sh -c "$(cat /ctwatch/cmd)" </dev/null
  rc=$?
else
  setsid cttyhack @SHELL@ -l
  rc=$?
fi
echo
echo "CTWATCH-VM-EXIT-@NONCE@ $rc"
sync
poweroff -f
echo o >/proc/sysrq-trigger
sleep 10
"#;

fn write_etc(root: &Path) -> Result<()> {
    let etc = root.join("etc");
    write_file(
        &etc.join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\n",
        0o644,
    )?;
    write_file(&etc.join("group"), "root:x:0:\n", 0o644)?;
    write_file(
        &etc.join("hosts"),
        "127.0.0.1 localhost\n::1 localhost\n",
        0o644,
    )?;
    write_file(
        &etc.join("profile"),
        "export PS1='ctwatch-vm:\\w# '\n",
        0o644,
    )?;
    // Protocol and service names for nft, conntrack and ip, if the host has them.
    for name in ["protocols", "services", "ethertypes"] {
        let host = Path::new("/etc").join(name);
        if host.is_file() {
            std::fs::copy(&host, etc.join(name))?;
        }
    }
    Ok(())
}

fn install_busybox(root: &Path) -> Result<()> {
    let busybox = require_tool("busybox")?;
    if is_dynamic_elf(&busybox) {
        bail!(
            "{} is dynamically linked; install busybox-static",
            busybox.display()
        );
    }
    copy_file(&busybox, &root.join("bin/busybox"))?;
    let out = Command::new(&busybox)
        .arg("--list-full")
        .output()
        .context("running busybox --list-full")?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim().trim_start_matches('/');
        let name = applet.rsplit('/').next().unwrap_or(applet);
        // No applet that would shadow a real tool copied in (`ip`).
        if applet.is_empty() || name == "linuxrc" || name == "busybox" || HOST_TOOLS.contains(&name)
        {
            continue;
        }
        let link = root.join(applet);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if !link.exists() {
            std::os::unix::fs::symlink("/bin/busybox", &link)?;
        }
    }
    Ok(())
}

/// Copies a host file or directory to `guest` (absolute) under `root`; a
/// dynamic ELF brings the libraries `ldd` names, at the same paths.
fn copy_in(host: &Path, root: &Path, guest: &str, libs: &mut BTreeSet<PathBuf>) -> Result<()> {
    let dest = root.join(guest.trim_start_matches('/'));
    if host.is_dir() {
        return copy_tree(host, &dest);
    }
    copy_file(host, &dest)?;
    if !is_dynamic_elf(host) {
        return Ok(());
    }
    let out = Command::new("ldd")
        .arg(host)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {} failed: {}",
            host.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for lib in parse_ldd(&String::from_utf8_lossy(&out.stdout))? {
        if libs.insert(lib.clone()) {
            copy_file(&lib, &root.join(lib.strip_prefix("/").unwrap_or(&lib)))?;
        }
    }
    Ok(())
}

/// The library paths in `ldd` output (the loader included, the vDSO not).
fn parse_ldd(out: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in out.lines().map(str::trim) {
        let path = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    bail!("library {} not found on the host", name.trim());
                }
                target.split_whitespace().next().unwrap_or("")
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Copies a file's contents (following symlinks) and permissions, replacing
/// whatever is at `dest`, a busybox applet link included.
fn copy_file(src: &Path, dest: &Path) -> Result<()> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if dest.symlink_metadata().is_ok() {
        std::fs::remove_file(dest)?;
    }
    std::fs::copy(src, dest)
        .with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
    Ok(())
}

fn copy_tree(src: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    let status = Command::new("cp")
        .arg("-a")
        .arg(src.join("."))
        .arg(dest)
        .status()
        .context("running cp")?;
    if !status.success() {
        bail!("cp -a {} {} failed", src.display(), dest.display());
    }
    Ok(())
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn write_cpio(root: &Path, dest: &Path) -> Result<()> {
    let out = std::fs::File::create(dest)?;
    let mut find = Command::new("find")
        .args([".", "-mindepth", "1", "-print0"])
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()
        .context("running find")?;
    let list = find.stdout.take().context("find stdout")?;
    let cpio = Command::new(require_tool("cpio")?)
        .args(["--null", "--quiet", "-o", "-H", "newc", "-R", "0:0"])
        .current_dir(root)
        .stdin(list)
        .stdout(out)
        .status()
        .context("running cpio")?;
    let found = find.wait()?;
    if !cpio.success() || !found.success() {
        bail!("building {} failed", dest.display());
    }
    Ok(())
}

/// Module name as the kernel sees it: `-` and `_` are the same.
fn norm(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    norm(base.split(".ko").next().unwrap_or(base))
}

/// A kernel's `modules.dep` and `modules.builtin`.
struct ModuleTree {
    dir: PathBuf,
    /// name → (path relative to the tree, its dependencies' paths).
    dep: BTreeMap<String, (String, Vec<String>)>,
    builtin: BTreeSet<String>,
}

impl ModuleTree {
    fn read(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .with_context(|| format!("reading {}", dir.join(name).display()))
        };
        let mut dep = BTreeMap::new();
        for line in read("modules.dep")?.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_whitespace().map(str::to_string).collect();
            dep.insert(module_name(path), (path.to_string(), deps));
        }
        let builtin = read("modules.builtin")?.lines().map(module_name).collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            dep,
            builtin,
        })
    }

    fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&norm(name))
    }

    fn has(&self, name: &str) -> bool {
        self.is_builtin(name) || self.dep.contains_key(&norm(name))
    }

    /// Copies `names` and everything they depend on into the guest tree,
    /// decompressed, and runs `depmod -b` there.
    fn install(&self, names: &[String], root: &Path, release: &str) -> Result<()> {
        let dest = root.join("lib/modules").join(release);
        std::fs::create_dir_all(&dest)?;
        let mut files = BTreeSet::new();
        for name in names {
            let (path, deps) = &self.dep[&norm(name)];
            files.insert(path.clone());
            files.extend(deps.iter().cloned());
        }
        for rel in &files {
            let src = self.dir.join(rel);
            let (stem, tool) = if let Some(s) = rel.strip_suffix(".xz") {
                (s, Some("xz"))
            } else if let Some(s) = rel.strip_suffix(".zst") {
                (s, Some("zstd"))
            } else if let Some(s) = rel.strip_suffix(".gz") {
                (s, Some("gzip"))
            } else {
                (rel.as_str(), None)
            };
            let out = dest.join(stem);
            std::fs::create_dir_all(out.parent().unwrap_or(&dest))?;
            match tool {
                None => copy_file(&src, &out)?,
                Some(tool) => {
                    let status = Command::new(require_tool(tool)?)
                        .args(["-d", "-c", "-q"])
                        .arg(&src)
                        .stdout(std::fs::File::create(&out)?)
                        .status()
                        .with_context(|| format!("running {tool}"))?;
                    if !status.success() {
                        bail!("{tool} -d {} failed", src.display());
                    }
                }
            }
        }
        for name in [
            "modules.builtin",
            "modules.builtin.modinfo",
            "modules.order",
        ] {
            if self.dir.join(name).is_file() {
                std::fs::copy(self.dir.join(name), dest.join(name))?;
            }
        }
        // As in the cache: let depmod find the tree under either prefix.
        let usr_modules = root.join("usr/lib/modules");
        if usr_modules.symlink_metadata().is_err() {
            std::fs::create_dir_all(root.join("usr/lib"))?;
            std::os::unix::fs::symlink("../../lib/modules", &usr_modules)?;
        }
        let status = Command::new(require_tool("depmod")?)
            .arg("-b")
            .arg(root)
            .arg(release)
            .status()
            .context("running depmod")?;
        if !status.success() || !dest.join("modules.dep").is_file() {
            bail!("depmod -b {} {release} failed", root.display());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibelf.so.1 => /lib/x86_64-linux-gnu/libelf.so.1 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let libs = parse_ldd(out).unwrap();
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libelf.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn module_names() {
        assert_eq!(
            module_name("kernel/net/netfilter/nf_conntrack.ko.xz"),
            "nf_conntrack"
        );
        assert_eq!(
            module_name("kernel/crypto/crc32c-cryptoapi.ko"),
            "crc32c_cryptoapi"
        );
        assert_eq!(module_name("kernel/fs/9p/9p.ko.zst"), "9p");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
