//! Cgroup v2 ids to paths, and paths to the container or pod they belong to.
//!
//! The id the kernel reports (`bpf_get_current_cgroup_id`, a socket's
//! cgroup) is the kernfs node id of the cgroup directory, which on 64-bit
//! kernels is that directory's inode number under the cgroup2 mount. So the
//! tree is walked once, cached, and walked again on a miss at most once per
//! [`RESCAN`], which keeps a flood of events from short-lived cgroups to one
//! walk per interval.
//!
//! Container runtimes name their cgroups after the container id, and the
//! kubelet after the pod UID; those are recognised in the path. Pod and
//! container names are looked up best effort where the runtime leaves them
//! on disk (the kubelet's `/var/log/pods/<ns>_<name>_<uid>` directories,
//! docker's `config.v2.json`).
use super::cache::Cache;
use std::{
    collections::HashMap,
    fs,
    os::unix::fs::DirEntryExt,
    path::PathBuf,
    time::{Duration, Instant},
};

/// Minimum time between two walks of the cgroup tree (or of the pod list).
pub const RESCAN: Duration = Duration::from_secs(5);
/// Bounds on one walk, so a pathological tree cannot stall the caller.
const MAX_DEPTH: usize = 32;
const MAX_DIRS: usize = 200_000;

/// The runtime that made a container's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    Docker,
    Containerd,
    CriO,
    Podman,
    /// A kubepods cgroup whose runtime is not named in the path (cgroupfs driver).
    Unknown,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Podman => "podman",
            Runtime::Unknown => "container",
        }
    }
}

/// What a cgroup path says about its container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Container {
    /// Runtime and full container id, when the path names a container.
    pub container: Option<(Runtime, String)>,
    /// The pod UID (dashed form) for kubepods cgroups.
    pub pod_uid: Option<String>,
}

impl Container {
    /// The container id shortened the way `docker ps` prints it.
    pub fn short_id(&self) -> Option<&str> {
        self.container
            .as_ref()
            .map(|(_, id)| &id[..id.len().min(12)])
    }
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A pod UID as the kubelet spells it in cgroup names: dashes (cgroupfs
/// driver) or underscores (systemd driver, where `-` separates slice levels).
fn pod_uid(s: &str) -> Option<String> {
    let uid = s.replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    ok.then_some(uid)
}

/// A container from one path component: `docker-<id>.scope`,
/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`, or a
/// bare 64-hex id (cgroupfs driver).
fn container_of(component: &str) -> Option<(Runtime, String)> {
    if is_container_id(component) {
        return Some((Runtime::Unknown, component.to_string()));
    }
    let stem = component.strip_suffix(".scope").unwrap_or(component);
    const PREFIXES: &[(&str, Runtime)] = &[
        ("cri-containerd-", Runtime::Containerd),
        ("crio-conmon-", Runtime::CriO),
        ("crio-", Runtime::CriO),
        ("docker-", Runtime::Docker),
        ("libpod-conmon-", Runtime::Podman),
        ("libpod-", Runtime::Podman),
    ];
    PREFIXES.iter().find_map(|(p, rt)| {
        let id = stem.strip_prefix(p)?;
        is_container_id(id).then(|| (*rt, id.to_string()))
    })
}

/// Reads the container and pod a cgroup path belongs to, if any. The
/// innermost container component wins (a container's cgroup may have
/// children, e.g. a systemd inside it).
pub fn parse_path(path: &str) -> Option<Container> {
    let mut out = Container::default();
    let mut parent_is_docker = false;
    for comp in path.split('/').filter(|c| !c.is_empty()) {
        if out.pod_uid.is_none() {
            // systemd: kubepods-burstable-pod<uid>.slice, kubepods-pod<uid>.slice;
            // cgroupfs: pod<uid>.
            let stem = comp.strip_suffix(".slice").unwrap_or(comp);
            if let Some(i) = stem.rfind("pod") {
                let before = &stem[..i];
                if before.is_empty() || before.starts_with("kubepods") {
                    out.pod_uid = pod_uid(&stem[i + 3..]);
                }
            }
        }
        if out.container.is_none() {
            if let Some((rt, id)) = container_of(comp) {
                // cgroupfs-driver docker: /docker/<id>.
                let rt = if rt == Runtime::Unknown && parent_is_docker {
                    Runtime::Docker
                } else {
                    rt
                };
                out.container = Some((rt, id));
            }
        }
        parent_is_docker = comp == "docker";
    }
    (out.container.is_some() || out.pod_uid.is_some()).then_some(out)
}

/// The cgroup v2 path in a `/proc/PID/cgroup` file: the `0::` line.
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

/// `<namespace>_<name>_<uid>` directory names under the kubelet's pod log
/// directory → UID to `namespace/name`. Kubernetes names cannot hold `_`.
pub fn parse_pod_dirs<'a>(names: impl IntoIterator<Item = &'a str>) -> HashMap<String, String> {
    names
        .into_iter()
        .filter_map(|n| {
            let mut parts = n.splitn(3, '_');
            let (ns, name, uid) = (parts.next()?, parts.next()?, parts.next()?);
            let uid = pod_uid(uid)?;
            Some((uid, format!("{ns}/{name}")))
        })
        .collect()
}

/// Docker's name for a container, from its `config.v2.json` (`"Name":"/web"`).
pub fn parse_docker_config(json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let name = v.get("Name")?.as_str()?.trim_start_matches('/');
    (!name.is_empty()).then(|| name.to_string())
}

/// Where [`Cgroups`] looks; tests point these at fixtures.
#[derive(Debug, Clone)]
pub struct Roots {
    /// The cgroup2 mount; `None` when the host has none (v1 only).
    pub cgroup2: Option<PathBuf>,
    pub proc: PathBuf,
    pub pod_logs: PathBuf,
    pub docker: PathBuf,
}

impl Roots {
    /// The host's: the cgroup2 mount at /sys/fs/cgroup, or at
    /// /sys/fs/cgroup/unified on hybrid (v1 + v2) hosts.
    pub fn host() -> Self {
        let cgroup2 = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| {
                nix::sys::statfs::statfs(p)
                    .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
            });
        Roots {
            cgroup2,
            proc: "/proc".into(),
            pod_logs: "/var/log/pods".into(),
            docker: "/var/lib/docker/containers".into(),
        }
    }
}

/// Cached cgroup id → path and path → container label lookups.
#[derive(Debug)]
pub struct Cgroups {
    roots: Roots,
    by_id: HashMap<u64, String>,
    walked_at: Option<Instant>,
    pods: HashMap<String, String>,
    pods_at: Option<Instant>,
    docker_names: Cache<String, Option<String>>,
    /// Processes move between cgroups: their labels age like every name.
    pid_labels: Cache<u32, Option<String>>,
}

impl Default for Cgroups {
    fn default() -> Self {
        Self::new(Roots::host())
    }
}

impl Cgroups {
    pub fn new(roots: Roots) -> Self {
        Self {
            roots,
            by_id: HashMap::new(),
            walked_at: None,
            pods: HashMap::new(),
            pods_at: None,
            docker_names: Cache::default(),
            pid_labels: Cache::default(),
        }
    }

    fn due(at: Option<Instant>) -> bool {
        at.is_none_or(|t| t.elapsed() >= RESCAN)
    }

    /// Walks the cgroup2 tree, recording every directory's inode. Paths are
    /// kept relative to the mount, as `/proc/PID/cgroup` prints them.
    fn walk(&mut self) {
        self.walked_at = Some(Instant::now());
        let Some(root) = self.roots.cgroup2.clone() else {
            return;
        };
        let mut by_id = HashMap::new();
        if let Ok(m) = fs::metadata(&root) {
            by_id.insert(std::os::unix::fs::MetadataExt::ino(&m), "/".to_string());
        }
        let mut stack = vec![(root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = e.path();
                let rel = path
                    .strip_prefix(&root)
                    .map(|p| format!("/{}", p.display()))
                    .unwrap_or_default();
                // kernfs reports the node id as d_ino: no stat needed.
                by_id.insert(e.ino(), rel);
                if depth + 1 < MAX_DEPTH && by_id.len() < MAX_DIRS {
                    stack.push((path, depth + 1));
                }
            }
            if by_id.len() >= MAX_DIRS {
                log::warn!(
                    "cgroup tree has over {MAX_DIRS} directories; names past that are not resolved"
                );
                break;
            }
        }
        self.by_id = by_id;
    }

    /// The cgroup path of a cgroup v2 id, walking the tree again on a miss
    /// (rate-limited).
    pub fn path_of(&mut self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if !self.by_id.contains_key(&id) && Self::due(self.walked_at) {
            self.walk();
        }
        self.by_id.get(&id).cloned()
    }

    /// The cgroup v2 path of a process.
    pub fn path_of_pid(&self, pid: u32) -> Option<String> {
        let text = fs::read_to_string(self.roots.proc.join(format!("{pid}/cgroup"))).ok()?;
        parse_proc_cgroup(&text)
    }

    fn pod_name(&mut self, uid: &str) -> Option<String> {
        if !self.pods.contains_key(uid) && Self::due(self.pods_at) {
            self.pods_at = Some(Instant::now());
            let names: Vec<String> = fs::read_dir(&self.roots.pod_logs)
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().to_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            self.pods = parse_pod_dirs(names.iter().map(String::as_str));
        }
        self.pods.get(uid).cloned()
    }

    fn docker_name(&mut self, id: &str) -> Option<String> {
        let config = self.roots.docker.join(id).join("config.v2.json");
        self.docker_names.get_or(id.to_string(), || {
            fs::read_to_string(config)
                .ok()
                .and_then(|j| parse_docker_config(&j))
        })
    }

    /// A short label for a cgroup path: `pod ns/name`, `docker web`,
    /// `containerd 3f2a1b9c8d7e`; `None` outside containers.
    pub fn label_of_path(&mut self, path: &str) -> Option<String> {
        let c = parse_path(path)?;
        if let Some(uid) = &c.pod_uid {
            let pod = self
                .pod_name(uid)
                .unwrap_or_else(|| format!("uid {}", &uid[..8]));
            return Some(match c.short_id() {
                Some(id) => format!("pod {pod} {id}"),
                None => format!("pod {pod}"),
            });
        }
        let (rt, id) = c.container.as_ref()?;
        let shown = match rt {
            Runtime::Docker => self.docker_name(id),
            _ => None,
        }
        .unwrap_or_else(|| id[..12].to_string());
        Some(format!("{} {shown}", rt.name()))
    }

    /// Label of the container a cgroup id belongs to.
    pub fn label_of_id(&mut self, id: u64) -> Option<String> {
        let path = self.path_of(id)?;
        self.label_of_path(&path)
    }

    /// Label of the pod or container that owns a network namespace, from
    /// the processes in it: the pod (without a container id) when every one
    /// of them is that pod's, as its containers all share the namespace; a
    /// container when every one is that container's. `None` when any of them runs outside
    /// containers: that is the host's namespace, which hostNetwork pods and
    /// `--network host` containers share, and naming one of them would
    /// blame it for the whole node. `None` too when containers of different
    /// pods or runtimes share it. Processes gone meanwhile are skipped.
    pub fn label_of_netns(&mut self, pids: impl IntoIterator<Item = u32>) -> Option<String> {
        let mut owner: Option<(String, Container)> = None;
        for pid in pids {
            let Some(path) = self.path_of_pid(pid) else {
                continue;
            };
            let c = parse_path(&path)?;
            match &owner {
                None => owner = Some((path, c)),
                Some((_, o)) if o.pod_uid.is_some() && o.pod_uid == c.pod_uid => {}
                Some((_, o)) if o.pod_uid.is_none() && o.container == c.container => {}
                Some(_) => return None,
            }
        }
        self.label_of_path(&owner?.0)
            .map(|l| pod_of(&l).to_string())
    }

    /// Label of the container a process runs in (cached for a while).
    pub fn label_of_pid(&mut self, pid: u32) -> Option<String> {
        if let Some(l) = self.pid_labels.fresh(&pid) {
            return l.clone();
        }
        let label = self.path_of_pid(pid).and_then(|p| self.label_of_path(&p));
        self.pid_labels.put(pid, label.clone());
        label
    }
}

/// The pod a label from [`Cgroups::label_of_path`] belongs to: `pod
/// ns/name` without its container id, since a pod's containers share one
/// namespace and one answer to "which pod?"; any other label whole.
pub fn pod_of(label: &str) -> &str {
    match label.strip_prefix("pod ").and_then(|rest| rest.find(' ')) {
        Some(end) => &label[.."pod ".len() + end],
        None => label,
    }
}

/// A fixture layout on disk for tests: `Roots` under one temporary directory.
#[cfg(test)]
fn fixture_roots(dir: &std::path::Path) -> Roots {
    Roots {
        cgroup2: Some(dir.join("cgroup")),
        proc: dir.join("proc"),
        pod_logs: dir.join("pods"),
        docker: dir.join("docker"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a1b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a";
    const UID: &str = "5b3c8e2a-1f4d-4c6b-9a7e-2d8f0b1c3e5a";

    #[test]
    fn kubepods_systemd_driver_containerd() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        );
        let c = parse_path(&p).unwrap();
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert_eq!(c.container, Some((Runtime::Containerd, ID.to_string())));
        assert_eq!(c.short_id(), Some("3f2a1b9c8d7e"));
    }

    #[test]
    fn kubepods_guaranteed_and_crio() {
        let p = format!(
            "/kubepods.slice/kubepods-pod{}.slice/crio-{ID}.scope",
            UID.replace('-', "_")
        );
        let c = parse_path(&p).unwrap();
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert_eq!(c.container.unwrap().0, Runtime::CriO);
    }

    #[test]
    fn kubepods_cgroupfs_driver() {
        let c = parse_path(&format!("/kubepods/besteffort/pod{UID}/{ID}")).unwrap();
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert_eq!(c.container, Some((Runtime::Unknown, ID.to_string())));
        // The pod's own cgroup, without a container below it.
        let c = parse_path(&format!("/kubepods/burstable/pod{UID}")).unwrap();
        assert_eq!((c.pod_uid.as_deref(), c.container), (Some(UID), None));
    }

    #[test]
    fn docker_both_drivers_and_podman() {
        let c = parse_path(&format!("/system.slice/docker-{ID}.scope")).unwrap();
        assert_eq!(c.container, Some((Runtime::Docker, ID.to_string())));
        assert_eq!(c.pod_uid, None);
        let c = parse_path(&format!("/docker/{ID}")).unwrap();
        assert_eq!(c.container, Some((Runtime::Docker, ID.to_string())));
        let c = parse_path(&format!(
            "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
        ))
        .unwrap();
        assert_eq!(c.container, Some((Runtime::Podman, ID.to_string())));
    }

    #[test]
    fn ordinary_paths_are_not_containers() {
        for p in [
            "/",
            "",
            "/init.scope",
            "/system.slice/sshd.service",
            "/user.slice/user-0.slice/session-3.scope",
            "/system.slice/docker.service",
            // Too short to be an id, and a "pod" that is not a UID.
            "/system.slice/docker-3f2a1b9c.scope",
            "/podcast.slice/podman.service",
            "/kubepods.slice/kubepods-podnotauid.slice",
        ] {
            assert_eq!(parse_path(p), None, "{p}");
        }
    }

    #[test]
    fn proc_cgroup_v2_line() {
        let text = "12:memory:/foo\n0::/system.slice/docker-abc.scope\n";
        assert_eq!(
            parse_proc_cgroup(text).as_deref(),
            Some("/system.slice/docker-abc.scope")
        );
        assert_eq!(parse_proc_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn pod_dirs_and_docker_names() {
        let m = parse_pod_dirs([
            format!("default_web-7d9f_{UID}").as_str(),
            "junk",
            "a_b_notauid",
        ]);
        assert_eq!(m.len(), 1);
        assert_eq!(m[UID], "default/web-7d9f");
        assert_eq!(
            parse_docker_config(r#"{"Name":"/nginx","Id":"x"}"#).as_deref(),
            Some("nginx")
        );
        assert_eq!(parse_docker_config("{not json"), None);
        assert_eq!(parse_docker_config(r#"{"Name":"/"}"#), None);
    }

    #[test]
    fn ids_resolve_through_a_walk_and_labels_name_pods() {
        let dir = std::env::temp_dir().join(format!("ctwatch-cg-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let roots = fixture_roots(&dir);
        let uid_us = UID.replace('-', "_");
        let pod_dir = roots.cgroup2.clone().unwrap().join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_us}.slice"
        ));
        let ctr = pod_dir.join(format!("cri-containerd-{ID}.scope"));
        fs::create_dir_all(&ctr).unwrap();
        let docker = roots
            .cgroup2
            .clone()
            .unwrap()
            .join(format!("system.slice/docker-{ID}.scope"));
        fs::create_dir_all(&docker).unwrap();
        fs::create_dir_all(roots.pod_logs.join(format!("shop_cart-5c_{UID}"))).unwrap();
        fs::create_dir_all(roots.docker.join(ID)).unwrap();
        fs::write(
            roots.docker.join(ID).join("config.v2.json"),
            r#"{"Name":"/redis"}"#,
        )
        .unwrap();
        fs::create_dir_all(roots.proc.join("42")).unwrap();
        fs::write(
            roots.proc.join("42/cgroup"),
            format!("0::/system.slice/docker-{ID}.scope\n"),
        )
        .unwrap();

        let ino =
            |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
        let mut cg = Cgroups::new(roots);
        assert_eq!(
            cg.label_of_id(ino(&ctr)).as_deref(),
            Some("pod shop/cart-5c 3f2a1b9c8d7e")
        );
        assert!(cg
            .path_of(ino(&pod_dir))
            .unwrap()
            .ends_with(&format!("pod{uid_us}.slice")));
        assert_eq!(
            cg.label_of_id(ino(&docker)).as_deref(),
            Some("docker redis")
        );
        assert_eq!(cg.label_of_pid(42).as_deref(), Some("docker redis"));
        assert_eq!(cg.label_of_pid(43), None, "no such process");
        assert_eq!(cg.path_of(0), None);
        // A miss right after a walk does not walk again.
        let before = cg.walked_at;
        assert_eq!(cg.path_of(u64::MAX), None);
        assert_eq!(cg.walked_at, before);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_pod_is_its_label_without_the_container() {
        assert_eq!(pod_of("pod shop/cart-5c 3f2a1b9c8d7e"), "pod shop/cart-5c");
        assert_eq!(pod_of("pod shop/cart-5c"), "pod shop/cart-5c");
        assert_eq!(pod_of("docker redis"), "docker redis");
        assert_eq!(pod_of("containerd 3f2a1b9c8d7e"), "containerd 3f2a1b9c8d7e");
    }

    #[test]
    fn a_namespace_is_a_containers_only_if_all_its_processes_are() {
        let dir = std::env::temp_dir().join(format!("ctwatch-cgns-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let roots = fixture_roots(&dir);
        fs::create_dir_all(roots.pod_logs.join(format!("shop_cart-5c_{UID}"))).unwrap();
        let pod = |ctr: &str| {
            format!(
                "0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{ctr}.scope\n",
                UID.replace('-', "_")
            )
        };
        let other_id = ID.replace('3', "4");
        for (pid, cgroup) in [
            (1, "0::/init.scope\n".to_string()),
            (10, pod(ID)),
            (11, pod(&other_id)),
            (20, format!("0::/system.slice/docker-{ID}.scope\n")),
            (21, format!("0::/system.slice/docker-{other_id}.scope\n")),
        ] {
            fs::create_dir_all(roots.proc.join(pid.to_string())).unwrap();
            fs::write(roots.proc.join(format!("{pid}/cgroup")), cgroup).unwrap();
        }
        let mut cg = Cgroups::new(roots);
        // A pod's namespace: its containers (pause and app) share it, and a
        // process gone meanwhile (99) changes nothing.
        assert_eq!(
            cg.label_of_netns([10, 99, 11]).as_deref(),
            Some("pod shop/cart-5c")
        );
        assert_eq!(
            cg.label_of_netns([20]).as_deref(),
            Some("docker 3f2a1b9c8d7e")
        );
        // The host's namespace, which a hostNetwork pod shares: nobody's.
        assert_eq!(cg.label_of_netns([1, 10]), None);
        assert_eq!(cg.label_of_netns([10, 1]), None);
        // Two containers of different owners: neither's.
        assert_eq!(cg.label_of_netns([20, 21]), None);
        assert_eq!(cg.label_of_netns([10, 20]), None);
        assert_eq!(cg.label_of_netns([99]), None, "no process left");
        let _ = fs::remove_dir_all(&dir);
    }
}
