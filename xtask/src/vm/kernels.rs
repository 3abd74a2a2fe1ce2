//! Debian cloud kernels, fetched with a private apt configuration and cached
//! unpacked under `cache_dir()/kernels/<major.minor>/`:
//!
//! ```text
//! vmlinuz  config  release  packages  lib/modules/<release>/  usr/lib/modules -> ../../lib/modules
//! ```
//!
//! `lib/modules/<release>` is the tree as shipped (compressed modules stay
//! compressed) plus the `modules.dep` that `depmod -b` wrote for it. A
//! complete entry is used as is: no network, not even `apt-get update`.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::host::{euid, require_tool};

/// One unpacked kernel in the cache.
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    /// `major.minor`, as asked for.
    pub mm: String,
    /// `uname -r`.
    pub release: String,
    pub dir: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    pub fn modules_dir(&self) -> PathBuf {
        self.dir.join("lib/modules").join(&self.release)
    }

    fn load(mm: &str, dir: &Path) -> Option<Self> {
        let release = std::fs::read_to_string(dir.join("release")).ok()?;
        let kernel = Self {
            mm: mm.to_string(),
            release: release.trim().to_string(),
            dir: dir.to_path_buf(),
        };
        let complete = kernel.vmlinuz().is_file()
            && kernel.modules_dir().join("modules.dep").is_file()
            && kernel.modules_dir().join("modules.builtin").is_file();
        complete.then_some(kernel)
    }
}

/// The Debian suites that carry each kernel line, best first.
fn suites(mm: &str) -> Option<&'static [&'static str]> {
    Some(match mm {
        "5.10" => &["bullseye", "bullseye-security"],
        "6.1" => &["bookworm", "bookworm-security"],
        "6.12" => &["trixie", "trixie-security", "bookworm-backports"],
        "7.2" => &["sid"],
        _ => return None,
    })
}

/// The cached kernel `mm` (e.g. `6.1`), downloading and unpacking it first if
/// the cache lacks it.
pub(crate) fn ensure_kernel(mm: &str) -> Result<Kernel> {
    let root = super::cache_dir().join("kernels");
    let dir = root.join(mm);
    if let Some(kernel) = Kernel::load(mm, &dir) {
        return Ok(kernel);
    }
    let suites = suites(mm).with_context(|| {
        format!(
            "no Debian suite known for kernel {mm:?}; known: {}",
            super::ALL_KERNELS.join(", ")
        )
    })?;
    require_tool("dpkg-deb")?;
    require_tool("depmod")?;

    eprintln!(
        "vm: kernel {mm}: reading package lists of {}",
        suites.join(" ")
    );
    let apt = Apt::new(&super::cache_dir().join("apt").join(mm), suites)?;
    apt.update()?;
    let candidates = apt.candidates(mm)?;
    if candidates.is_empty() {
        bail!(
            "no linux-image-{mm}.*-cloud-amd64-unsigned (or linux-binary-unsigned-{mm}.*) \
             package in {}",
            suites.join(", ")
        );
    }

    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let work = root.join(format!(".work-{mm}-{}", std::process::id()));
    let result = fetch_into(mm, &apt, &candidates, &work).and_then(|()| {
        if dir.exists() {
            // An incomplete leftover (or a concurrent run finished first).
            if let Some(kernel) = Kernel::load(mm, &dir) {
                return Ok(kernel);
            }
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing incomplete {}", dir.display()))?;
        }
        std::fs::rename(work.join("out"), &dir)
            .with_context(|| format!("moving the kernel into {}", dir.display()))?;
        Kernel::load(mm, &dir).with_context(|| format!("{} is incomplete", dir.display()))
    });
    let _ = std::fs::remove_dir_all(&work);
    if result.is_ok() {
        // The package lists only serve a fetch, and every fetch updates them.
        let _ = std::fs::remove_dir_all(&apt.dir);
        if let Some(parent) = apt.dir.parent() {
            let _ = std::fs::remove_dir(parent); // only if empty
        }
    }
    result
}

/// Downloads the newest candidate that actually downloads (some listed
/// .debs return 404) and unpacks it into `work/out`.
fn fetch_into(mm: &str, apt: &Apt, candidates: &[Candidate], work: &Path) -> Result<()> {
    let debs = work.join("debs");
    let mut failures = Vec::new();
    for cand in candidates {
        let _ = std::fs::remove_dir_all(&debs);
        std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
        eprintln!(
            "vm: kernel {mm}: downloading {} {}",
            cand.packages.join(" "),
            cand.version
        );
        match apt.download(&cand.specs(), &debs) {
            Ok(()) => {
                unpack(cand, &debs, &work.join("tree"), &work.join("out"))?;
                return Ok(());
            }
            Err(e) => {
                eprintln!("vm: kernel {mm}: {e:#}; trying the next version");
                failures.push(format!("{} {}: {e:#}", cand.packages[0], cand.version));
            }
        }
    }
    bail!(
        "no kernel {mm} package could be downloaded:\n  {}",
        failures.join("\n  ")
    )
}

fn unpack(cand: &Candidate, debs: &Path, tree: &Path, out: &Path) -> Result<()> {
    for entry in std::fs::read_dir(debs)? {
        let deb = entry?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(tree))?;
        }
    }
    // Older packages ship lib/modules/<rel> and boot/{vmlinuz,config}-<rel>;
    // newer ones usr/lib/modules/<rel>, sid's split packages keep vmlinuz
    // and config inside that directory too.
    let modules_parent = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| tree.join(p))
        .find(|p| p.is_dir())
        .context("the kernel package has no lib/modules directory")?;
    let releases: Vec<String> = std::fs::read_dir(&modules_parent)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let [release] = releases.as_slice() else {
        bail!("expected one kernel release in the package, found {releases:?}");
    };
    let moddir = out.join("lib/modules").join(release);
    std::fs::create_dir_all(out.join("lib/modules"))?;
    std::fs::rename(modules_parent.join(release), &moddir)?;

    let pick = |names: &[PathBuf]| names.iter().find(|p| p.is_file()).cloned();
    let vmlinuz = pick(&[
        tree.join(format!("boot/vmlinuz-{release}")),
        moddir.join("vmlinuz"),
        moddir.join("vmlinuz.unsigned"),
    ])
    .context("the kernel package has no vmlinuz")?;
    std::fs::rename(vmlinuz, out.join("vmlinuz"))?;
    if let Some(config) = pick(&[
        tree.join(format!("boot/config-{release}")),
        moddir.join("config"),
    ]) {
        std::fs::rename(config, out.join("config"))?;
    }
    // Whichever of /lib/modules and /usr/lib/modules this host's depmod
    // reads, it finds the tree.
    std::fs::create_dir_all(out.join("usr/lib"))?;
    std::os::unix::fs::symlink("../../lib/modules", out.join("usr/lib/modules"))?;
    run(Command::new("depmod").arg("-b").arg(out).arg(release))?;
    if !moddir.join("modules.dep").is_file() {
        bail!("depmod -b wrote no modules.dep for {release}");
    }
    std::fs::write(
        out.join("packages"),
        format!("{} {}\n", cand.packages.join(" "), cand.version),
    )?;
    std::fs::write(out.join("release"), format!("{release}\n"))?;
    std::fs::remove_dir_all(tree)?;
    Ok(())
}

/// One downloadable kernel: its packages, all at `version`.
#[derive(Debug, Clone, PartialEq)]
struct Candidate {
    packages: Vec<String>,
    version: String,
}

impl Candidate {
    fn specs(&self) -> Vec<String> {
        self.packages
            .iter()
            .map(|p| format!("{p}={}", self.version))
            .collect()
    }
}

/// The kernel package sets among `names` for kernel line `mm`, newest ABI
/// first: the unsigned cloud image (which holds the modules), or from sid on
/// the split linux-binary-unsigned + linux-modules + linux-base.
fn kernel_packages(names: &[String], mm: &str) -> Vec<(String, Vec<String>)> {
    let is_mm = |abi: &str| {
        abi.strip_prefix(mm)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
    };
    let has = |name: &String| names.contains(name);
    let mut found: Vec<(String, Vec<String>)> = Vec::new();
    for name in names {
        if let Some(abi) = name
            .strip_prefix("linux-image-")
            .and_then(|r| r.strip_suffix("-cloud-amd64-unsigned"))
            .filter(|abi| is_mm(abi))
        {
            found.push((abi.to_string(), vec![name.clone()]));
        } else if let Some(abi) = name
            .strip_prefix("linux-binary-unsigned-")
            .and_then(|r| r.strip_suffix("-cloud-amd64"))
            .filter(|abi| is_mm(abi))
        {
            let modules = format!("linux-modules-{abi}-cloud-amd64");
            let base = format!("linux-base-{abi}-cloud-amd64");
            if has(&modules) && has(&base) {
                found.push((abi.to_string(), vec![name.clone(), modules, base]));
            }
        }
    }
    found.sort_by(|a, b| deb_cmp(&b.0, &a.0));
    found.dedup_by(|a, b| a.0 == b.0);
    found
}

/// A private apt: its own sources.list, lists and cache, all under `dir`.
/// The machine's apt configuration files are read (proxies), its sources
/// are not.
struct Apt {
    dir: PathBuf,
    opts: Vec<String>,
}

impl Apt {
    fn new(dir: &Path, suites: &[&str]) -> Result<Self> {
        for sub in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let sources: String = suites
            .iter()
            .map(|suite| {
                let mirror = if suite.ends_with("-security") {
                    "http://security.debian.org/debian-security"
                } else {
                    "http://deb.debian.org/debian"
                };
                format!("deb {mirror} {suite} main\n")
            })
            .collect();
        std::fs::write(dir.join("sources.list"), sources)?;
        let d = |sub: &str| dir.join(sub).display().to_string();
        let mut opts = vec![
            format!("Dir::Etc::sourcelist={}", d("sources.list")),
            "Dir::Etc::sourceparts=/nonexistent".to_string(),
            format!("Dir::State::Lists={}", d("lists")),
            format!("Dir::Cache={}", d("cache")),
            "Acquire::Languages=none".to_string(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_string(),
            "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false".to_string(),
        ];
        if euid() == Some(0) {
            // Downloads land in directories the _apt sandbox user cannot
            // write; as root, skip the sandbox rather than warn about it.
            opts.push("APT::Sandbox::User=root".to_string());
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            opts,
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for opt in &self.opts {
            cmd.arg("-o").arg(opt);
        }
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    fn update(&self) -> Result<()> {
        run(self.command("apt-get").args(["-qq", "update"]))
            .with_context(|| format!("apt-get update for {}", self.dir.display()))
            .map(drop)
    }

    fn candidates(&self, mm: &str) -> Result<Vec<Candidate>> {
        let names = run(self.command("apt-cache").args(["pkgnames", "linux-"]))?;
        let names: Vec<String> = names.lines().map(str::to_string).collect();
        let mut out = Vec::new();
        for (_, packages) in kernel_packages(&names, mm) {
            let madison = run(self.command("apt-cache").arg("madison").arg(&packages[0]))?;
            let mut versions: Vec<String> = madison
                .lines()
                .filter_map(|l| l.split('|').nth(1))
                .map(|v| v.trim().to_string())
                .collect();
            versions.sort_by(|a, b| deb_cmp(b, a));
            versions.dedup();
            out.extend(versions.into_iter().map(|version| Candidate {
                packages: packages.clone(),
                version,
            }));
        }
        Ok(out)
    }

    fn download(&self, specs: &[String], into: &Path) -> Result<()> {
        let out = self
            .command("apt-get")
            .args(["-q", "download"])
            .args(specs)
            .current_dir(into)
            .output()
            .context("running apt-get download")?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let why = stderr
            .lines()
            .find(|l| l.starts_with("E:"))
            .unwrap_or("apt-get download failed");
        bail!("{}", why.trim_start_matches("E:").trim())
    }
}

/// Runs a command to completion; its stdout on success, an error with its
/// output otherwise.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}):\n{}{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Debian version ordering (epoch, upstream, revision; `~` sorts before
/// everything, digit runs compare as numbers).
pub(crate) fn deb_cmp(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, rest)) if e.bytes().all(|c| c.is_ascii_digit()) => {
                (e.parse().unwrap_or(0), rest)
            }
            _ => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((upstream, revision)) => (epoch, upstream, revision),
            None => (epoch, rest, ""),
        }
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| cmp_part(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| cmp_part(ra.as_bytes(), rb.as_bytes()))
}

fn cmp_part(a: &[u8], b: &[u8]) -> Ordering {
    // Weight of a character in a non-digit run; the end of the run (a digit
    // or the end of the string) weighs 0, `~` less, letters before symbols.
    fn weight(c: Option<&u8>) -> i32 {
        match c {
            None => 0,
            Some(b'~') => -1,
            Some(c) if c.is_ascii_digit() => 0,
            Some(c) if c.is_ascii_alphabetic() => i32::from(*c),
            Some(c) => i32::from(*c) + 256,
        }
    }
    // The digit run at `from`, without leading zeros, and where it ends.
    fn digits(s: &[u8], from: usize) -> (usize, &[u8]) {
        let end = from + s[from..].iter().take_while(|c| c.is_ascii_digit()).count();
        let zeros = s[from..end].iter().take_while(|&&c| c == b'0').count();
        (end, &s[from + zeros..end])
    }
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        loop {
            let (wa, wb) = (weight(a.get(i)), weight(b.get(j)));
            if wa != wb {
                return wa.cmp(&wb);
            }
            if wa == 0 {
                break;
            }
            i += 1;
            j += 1;
        }
        let (ni, da) = digits(a, i);
        let (nj, db) = digits(b, j);
        match da.len().cmp(&db.len()).then_with(|| da.cmp(db)) {
            Ordering::Equal => {}
            other => return other,
        }
        (i, j) = (ni, nj);
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_versions() {
        use Ordering::*;
        assert_eq!(deb_cmp("5.10.262-1", "5.10.223-1"), Greater);
        assert_eq!(deb_cmp("5.10.0-9", "5.10.0-43"), Less);
        assert_eq!(deb_cmp("6.12.118+deb13", "6.12.118+deb12"), Greater);
        assert_eq!(deb_cmp("6.12.115+deb13.1", "6.12.115+deb13"), Greater);
        assert_eq!(deb_cmp("6.12.118+deb12", "6.12.99+deb13"), Greater);
        assert_eq!(deb_cmp("1.0~rc1-1", "1.0-1"), Less);
        assert_eq!(deb_cmp("1:0.1", "2.0"), Greater);
        assert_eq!(deb_cmp("7.2.13-1", "7.2.13-1"), Equal);
        assert_eq!(deb_cmp("1.0a", "1.0+"), Less);
        assert_eq!(deb_cmp("1.01", "1.1"), Equal);
    }

    #[test]
    fn picks_kernel_packages() {
        let names: Vec<String> = [
            "linux-image-6.1.0-47-cloud-amd64-unsigned",
            "linux-image-6.1.0-56-cloud-amd64-unsigned",
            "linux-image-6.1.0-56-cloud-amd64",
            "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
            "linux-image-6.1.0-9-cloud-amd64-unsigned",
            "linux-binary-unsigned-7.2.13+deb14-cloud-amd64",
            "linux-modules-7.2.13+deb14-cloud-amd64",
            "linux-base-7.2.13+deb14-cloud-amd64",
            "linux-binary-unsigned-7.2.9+deb14-cloud-amd64",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let abis: Vec<String> = kernel_packages(&names, "6.1")
            .into_iter()
            .map(|(abi, _)| abi)
            .collect();
        assert_eq!(abis, ["6.1.0-56", "6.1.0-47", "6.1.0-9"]);
        let sid = kernel_packages(&names, "7.2");
        // 7.2.9 lacks its modules and base packages.
        assert_eq!(sid.len(), 1);
        assert_eq!(
            sid[0].1,
            [
                "linux-binary-unsigned-7.2.13+deb14-cloud-amd64",
                "linux-modules-7.2.13+deb14-cloud-amd64",
                "linux-base-7.2.13+deb14-cloud-amd64"
            ]
        );
        assert_eq!(kernel_packages(&names, "6.12")[0].0, "6.12.117+deb12");
    }
}
