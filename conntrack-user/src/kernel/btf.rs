//! Kernel facts from BTF: struct member offsets, struct sizes and enum values.
//!
//! Rust eBPF has no CO-RE relocations, so the programs cannot ask the kernel
//! where `sk_buff->_nfct` lives. Userspace reads the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`, plus the split BTF of modules such as
//! `/sys/kernel/btf/nf_conntrack`) at load time, resolves every offset and enum
//! value the programs need, and hands them over in the `CONFIG` global
//! ([`conntrack_ebpf::Config`], filled by [`resolve_layout`]).
//!
//! Lookups search vmlinux first, then each loaded module in the order it was
//! added; the first match wins.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
};

use btf_rs::{Btf, BtfSection, BtfType, Member, Type};
use conntrack_ebpf::Config;
use conntrack_ebpf::SKB_SPAN;

/// Where the running kernel exposes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Directory holding `vmlinux` and one split BTF file per loaded module.
pub const BTF_DIR: &str = "/sys/kernel/btf";

/// Longest typedef/const/volatile chain, and deepest nesting of anonymous
/// structs and unions, followed before giving up: real kernels need a handful,
/// the limits only stop malformed (cyclic) BTF from looping forever.
const MAX_CHAIN: usize = 32;
const MAX_ANON_DEPTH: usize = 16;

/// Why a kernel fact could not be read from BTF. Every message is one line
/// that says what is missing and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "kernel BTF not found at {}: ctwatch needs a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        .0.display()
    )]
    VmlinuxMissing(PathBuf),

    #[error(
        "module BTF not found at {}: load the module (modprobe {module}) or use a kernel \
         built with CONFIG_DEBUG_INFO_BTF_MODULES=y",
        path.display()
    )]
    ModuleMissing { module: String, path: PathBuf },

    #[error("cannot read BTF at {}: {cause}", path.display())]
    Read { path: PathBuf, cause: io::Error },

    #[error("invalid BTF in {}: {cause}: expected the kernel's vmlinux BTF", path.display())]
    Parse { path: PathBuf, cause: btf_rs::Error },

    #[error(
        "invalid BTF for module {module} in {}: {cause}: module BTF must be split BTF built \
         for the running kernel",
        path.display()
    )]
    ModuleParse {
        module: String,
        path: PathBuf,
        cause: btf_rs::Error,
    },

    #[error(
        "invalid module name {0:?}: expected a bare name as listed in {dir}, e.g. nf_conntrack",
        dir = BTF_DIR
    )]
    BadModuleName(String),

    #[error("corrupt BTF while resolving {what}: {cause}")]
    Corrupt { what: String, cause: btf_rs::Error },

    #[error("invalid member path {0:?}: expected type.member[.member...], e.g. sk_buff._nfct")]
    InvalidPath(String),

    #[error(
        "struct or union {name} not found in kernel BTF (searched {searched}): this kernel \
         lacks it; if a module defines it, load that module first"
    )]
    TypeNotFound { name: String, searched: String },

    #[error(
        "member {member} not found in {within} while resolving {path}: ctwatch does not \
         know this kernel's layout"
    )]
    MemberNotFound {
        path: String,
        member: String,
        within: String,
    },

    #[error("{path} is a bitfield: ctwatch only reads byte-aligned members")]
    Bitfield { path: String },

    #[error(
        "{member} is not a struct or union while resolving {path}: it has no members to \
         descend into"
    )]
    NotAStruct { path: String, member: String },

    #[error("enum {name} not found in kernel BTF (searched {searched})")]
    EnumNotFound { name: String, searched: String },

    #[error("enum {enum_name} has no variant {variant} on this kernel")]
    VariantNotFound { enum_name: String, variant: String },

    #[error(
        "kernel BTF has no SKB_DROP_REASON_NETFILTER_DROP in enum skb_drop_reason: the \
         tracepoint mode needs Linux 5.17+ (drop reasons); use the kprobe mode on this \
         kernel"
    )]
    NoDropReasons,

    #[error("unexpected kernel layout: {0}")]
    Layout(String),
}

/// One module's split BTF, on top of vmlinux.
struct ModuleBtf {
    name: String,
    path: PathBuf,
    btf: Btf,
}

/// The running kernel's BTF (vmlinux) plus the split BTF of some modules.
pub struct KernelBtf {
    vmlinux_path: PathBuf,
    vmlinux: Btf,
    modules: Vec<ModuleBtf>,
}

impl fmt::Debug for KernelBtf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelBtf")
            .field("vmlinux", &self.vmlinux_path)
            .field(
                "modules",
                &self.modules.iter().map(|m| &m.path).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// One BTF object to search: vmlinux, or the types a module adds on top of it.
struct Source<'a> {
    /// Resolves ids of this object and, for a module, of vmlinux too.
    btf: &'a Btf,
    /// The types this object defines itself (name lookups).
    section: &'a BtfSection,
}

impl Source<'_> {
    /// Types named `name` that this object defines, in id order.
    fn types_named(&self, name: &str) -> btf_rs::Result<Vec<Type>> {
        self.section
            .resolve_ids_by_name(name)?
            .into_iter()
            .map(|id| self.btf.resolve_type_by_id(id))
            .collect()
    }
}

impl KernelBtf {
    /// Loads the running kernel's BTF from [`VMLINUX_BTF`]. Add modules with
    /// [`KernelBtf::with_module`].
    pub fn load() -> Result<Self, BtfError> {
        Self::load_from(Path::new(VMLINUX_BTF), &[])
    }

    /// Loads `vmlinux` (stand-alone BTF) and each of `modules` as split BTF on
    /// top of it (e.g. `/sys/kernel/btf/nf_conntrack`). A module is named
    /// after its file name.
    pub fn load_from(vmlinux: &Path, modules: &[&Path]) -> Result<Self, BtfError> {
        let bytes = fs::read(vmlinux).map_err(|cause| match cause.kind() {
            io::ErrorKind::NotFound => BtfError::VmlinuxMissing(vmlinux.to_path_buf()),
            _ => BtfError::Read {
                path: vmlinux.to_path_buf(),
                cause,
            },
        })?;
        let mut kernel = Self::from_bytes(vmlinux, &bytes)?;
        for path in modules {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string());
            let bytes = fs::read(path).map_err(|cause| match cause.kind() {
                io::ErrorKind::NotFound => BtfError::ModuleMissing {
                    module: name.clone(),
                    path: path.to_path_buf(),
                },
                _ => BtfError::Read {
                    path: path.to_path_buf(),
                    cause,
                },
            })?;
            kernel.add_module(name, path, &bytes)?;
        }
        Ok(kernel)
    }

    /// Stand-alone BTF read from `path` (named in errors), with no module.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, BtfError> {
        let vmlinux = Btf::from_bytes(bytes).map_err(|cause| BtfError::Parse {
            path: path.to_path_buf(),
            cause,
        })?;
        Ok(KernelBtf {
            vmlinux_path: path.to_path_buf(),
            vmlinux,
            modules: Vec::new(),
        })
    }

    /// Adds `/sys/kernel/btf/<name>` if that module is loaded and has BTF;
    /// returns `self` unchanged if the file is absent (module built in, not
    /// loaded, or no module BTF) or the module is already there.
    pub fn with_module(self, name: &str) -> Result<Self, BtfError> {
        self.with_module_in(Path::new(BTF_DIR), name)
    }

    /// [`KernelBtf::with_module`] with another directory than [`BTF_DIR`].
    fn with_module_in(mut self, dir: &Path, name: &str) -> Result<Self, BtfError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(BtfError::BadModuleName(name.to_string()));
        }
        if name == "vmlinux" || self.modules.iter().any(|m| m.name == name) {
            return Ok(self);
        }
        let path = dir.join(name);
        match fs::read(&path) {
            Ok(bytes) => {
                self.add_module(name.to_string(), &path, &bytes)?;
                Ok(self)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(self),
            Err(cause) => Err(BtfError::Read { path, cause }),
        }
    }

    /// Adds `bytes` as module `name`'s split BTF (read from `path`, named in
    /// errors) on top of vmlinux.
    pub fn add_module(&mut self, name: String, path: &Path, bytes: &[u8]) -> Result<(), BtfError> {
        let btf =
            Btf::from_split_bytes(bytes, &self.vmlinux).map_err(|cause| BtfError::ModuleParse {
                module: name.clone(),
                path: path.to_path_buf(),
                cause,
            })?;
        self.modules.push(ModuleBtf {
            name,
            path: path.to_path_buf(),
            btf,
        });
        Ok(())
    }

    /// Names of the modules whose BTF is loaded, in search order.
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.modules.iter().map(|m| m.name.as_str())
    }

    /// Byte offset of a member path from the start of the outer type, walking
    /// anonymous structs/unions and nested named members: `sk_buff._nfct`,
    /// `net.ns.inum`, `sock.__sk_common.skc_net`, `net_device.nd_net`. The
    /// outer type is a struct or union, or a typedef of one (`possible_net_t`).
    /// Bitfield members are an error.
    pub fn member_offset(&self, path: &str) -> Result<u32, BtfError> {
        let mut parts = path.split('.');
        let root = parts.next().unwrap_or_default();
        let members: Vec<&str> = parts.collect();
        if root.is_empty() || members.is_empty() || members.iter().any(|m| m.is_empty()) {
            return Err(BtfError::InvalidPath(path.to_string()));
        }
        let corrupt = |cause| BtfError::Corrupt {
            what: path.to_string(),
            cause,
        };

        let (btf, mut current) = self.find_composite(root)?;
        let mut within = root.to_string();
        let mut bits: u64 = 0;
        for (i, name) in members.iter().enumerate() {
            let (offset, member) = find_member(btf, &current.members, name, 0, &mut Vec::new())
                .map_err(corrupt)?
                .ok_or_else(|| BtfError::MemberNotFound {
                    path: path.to_string(),
                    member: (*name).to_string(),
                    within: within.clone(),
                })?;
            within = format!("{within}.{name}");
            if member.bitfield_size().is_some_and(|n| n != 0) || offset % 8 != 0 {
                return Err(BtfError::Bitfield { path: within });
            }
            bits += u64::from(offset);
            if i + 1 < members.len() {
                let ty = btf.resolve_chained_type(&member).map_err(corrupt)?;
                current = match peel(btf, ty).map_err(corrupt)? {
                    Type::Struct(s) | Type::Union(s) => s,
                    _ => {
                        return Err(BtfError::NotAStruct {
                            path: path.to_string(),
                            member: within,
                        })
                    }
                };
            }
        }
        u32::try_from(bits / 8)
            .map_err(|_| BtfError::Layout(format!("{path} is beyond 4 GiB ({} bits)", bits)))
    }

    /// Size in bytes of a struct or union (or a typedef of one).
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        let (_, s) = self.find_composite(name)?;
        u32::try_from(s.size())
            .map_err(|_| BtfError::Layout(format!("{name} is larger than 4 GiB")))
    }

    /// Value of `variant` in enum `enum_name` (ENUM or ENUM64, or a typedef of
    /// one). Unsigned 64-bit values above `i64::MAX` come back wrapped.
    pub fn enum_value(&self, enum_name: &str, variant: &str) -> Result<i64, BtfError> {
        let corrupt = |cause| BtfError::Corrupt {
            what: format!("enum {enum_name}"),
            cause,
        };
        let mut seen_enum = false;
        for source in self.sources() {
            for ty in source.types_named(enum_name).map_err(corrupt)? {
                match peel(source.btf, ty).map_err(corrupt)? {
                    Type::Enum(e) => {
                        seen_enum = true;
                        for m in &e.members {
                            if source.btf.resolve_name(m).map_err(corrupt)? == variant {
                                return Ok(if e.is_signed() {
                                    i64::from(m.val() as i32)
                                } else {
                                    i64::from(m.val())
                                });
                            }
                        }
                    }
                    Type::Enum64(e) => {
                        seen_enum = true;
                        for m in &e.members {
                            if source.btf.resolve_name(m).map_err(corrupt)? == variant {
                                return Ok(m.val() as i64);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        if seen_enum {
            Err(BtfError::VariantNotFound {
                enum_name: enum_name.to_string(),
                variant: variant.to_string(),
            })
        } else {
            Err(BtfError::EnumNotFound {
                name: enum_name.to_string(),
                searched: self.searched(),
            })
        }
    }

    /// vmlinux first, then the modules in the order they were added.
    fn sources(&self) -> impl Iterator<Item = Source<'_>> {
        let vmlinux = Source {
            btf: &self.vmlinux,
            section: self.vmlinux.base(),
        };
        let modules = self.modules.iter().filter_map(|m| {
            Some(Source {
                btf: &m.btf,
                section: m.btf.split()?,
            })
        });
        std::iter::once(vmlinux).chain(modules)
    }

    /// "vmlinux" or "vmlinux, nf_conntrack", for error messages.
    fn searched(&self) -> String {
        std::iter::once("vmlinux")
            .chain(self.modules())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The struct or union named `name`, with the BTF that resolves its member
    /// types. A real struct/union wins over a typedef of the same name.
    fn find_composite(&self, name: &str) -> Result<(&Btf, btf_rs::Struct), BtfError> {
        let corrupt = |cause| BtfError::Corrupt {
            what: name.to_string(),
            cause,
        };
        for source in self.sources() {
            for ty in source.types_named(name).map_err(corrupt)? {
                if let Type::Struct(s) | Type::Union(s) = ty {
                    return Ok((source.btf, s));
                }
            }
        }
        for source in self.sources() {
            for ty in source.types_named(name).map_err(corrupt)? {
                if let Type::Typedef(_) = ty {
                    if let Type::Struct(s) | Type::Union(s) =
                        peel(source.btf, ty).map_err(corrupt)?
                    {
                        return Ok((source.btf, s));
                    }
                }
            }
        }
        Err(BtfError::TypeNotFound {
            name: name.to_string(),
            searched: self.searched(),
        })
    }
}

/// Strips typedefs and qualifiers (const, volatile, restrict, type tags).
fn peel(btf: &Btf, mut ty: Type) -> btf_rs::Result<Type> {
    for _ in 0..MAX_CHAIN {
        ty = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t)?,
            Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                btf.resolve_chained_type(t)?
            }
            Type::TypeTag(t) => btf.resolve_chained_type(t)?,
            _ => return Ok(ty),
        };
    }
    Err(btf_rs::Error::Format(format!(
        "type chain longer than {MAX_CHAIN} links"
    )))
}

/// Finds member `name` among `members`, then inside anonymous struct/union
/// members (as C does). Returns its bit offset from the start of `members`'
/// type and the member itself. `searched` holds the type ids of the
/// anonymous members already searched in this lookup.
fn find_member(
    btf: &Btf,
    members: &[Member],
    name: &str,
    depth: usize,
    searched: &mut Vec<u32>,
) -> btf_rs::Result<Option<(u32, Member)>> {
    let mut anonymous = Vec::new();
    for member in members {
        let member_name = btf.resolve_name(member)?;
        if member_name == name {
            return Ok(Some((member.bit_offset(), member.clone())));
        }
        if member_name.is_empty() {
            anonymous.push(member);
        }
    }
    if depth >= MAX_ANON_DEPTH {
        return Ok(None);
    }
    for container in anonymous {
        // Corrupt BTF can make an anonymous struct hold itself several times:
        // searching each type once keeps the walk linear, not exponential.
        if let Some(id) = container.get_type_id() {
            if searched.contains(&id) {
                continue;
            }
            searched.push(id);
        }
        if let Type::Struct(s) | Type::Union(s) = peel(btf, btf.resolve_chained_type(container)?)? {
            if let Some((offset, member)) = find_member(btf, &s.members, name, depth + 1, searched)?
            {
                // Corrupt BTF can put the container near the 32-bit limit.
                let offset = container.bit_offset().checked_add(offset).ok_or_else(|| {
                    btf_rs::Error::Format(format!("member {name} lies beyond 2^32 bits"))
                })?;
                return Ok(Some((offset, member)));
            }
        }
    }
    Ok(None)
}

/// Fills every field of [`Config`] that comes from BTF (`stream_new` is left
/// 0: it is the caller's choice, not a kernel fact). Fails on kernels without drop reasons (before 5.17):
/// use [`resolve_layout`] for the modes that do not need them.
#[cfg(test)]
pub fn resolve_config(btf: &KernelBtf) -> Result<Config, BtfError> {
    let reason = netfilter_drop_reason(btf)?;
    Ok(Config {
        reason_netfilter_drop: reason,
        ..resolve_layout(btf)?
    })
}

/// `SKB_DROP_REASON_NETFILTER_DROP` on this kernel.
pub fn netfilter_drop_reason(btf: &KernelBtf) -> Result<u32, BtfError> {
    let value = btf
        .enum_value("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP")
        .map_err(|e| match e {
            BtfError::EnumNotFound { .. } | BtfError::VariantNotFound { .. } => {
                BtfError::NoDropReasons
            }
            other => other,
        })?;
    u32::try_from(value)
        .map_err(|_| BtfError::Layout(format!("SKB_DROP_REASON_NETFILTER_DROP is {value}")))
}

/// Whether the kernel counts the kprobe runs it skips while another BPF
/// program runs on the CPU (in the program's `recursion_misses`). That
/// came in 6.7, in the series that also gave kprobe links their `missed`
/// count; that member is the sign, where a release number would miss
/// backports.
pub fn counts_kprobe_skips(btf: &KernelBtf) -> bool {
    btf.member_offset("bpf_link_info.perf_event.kprobe.missed")
        .is_ok()
}

/// Every struct offset of [`Config`], with `reason_netfilter_drop` left 0.
pub fn resolve_layout(btf: &KernelBtf) -> Result<Config, BtfError> {
    let off = |path: &str| btf.member_offset(path);
    let plus = |a: u32, b: u32, what: &str| {
        a.checked_add(b)
            .ok_or_else(|| BtfError::Layout(format!("{what} overflows")))
    };
    // possible_net_t is `struct { struct net *net; }` (empty without
    // CONFIG_NET_NS, which then fails here).
    let net_ptr = off("possible_net_t.net")?;
    let socket = off("socket_alloc.socket")?;
    let vfs_inode = off("socket_alloc.vfs_inode")?;
    let socket_to_inode = vfs_inode.checked_sub(socket).ok_or_else(|| {
        BtfError::Layout(format!(
            "socket_alloc.vfs_inode ({vfs_inode}) precedes socket_alloc.socket ({socket})"
        ))
    })?;
    let skb = [
        (off("sk_buff._nfct")?, 8),
        (off("sk_buff.sk")?, 8),
        (off("sk_buff.dev")?, 8),
        (off("sk_buff.head")?, 8),
        (off("sk_buff.network_header")?, 2),
        (off("sk_buff._skb_refdst")?, 8),
    ];
    // nf_conn lives in nf_conntrack's module BTF, which 5.10 does not have:
    // 0 tells the programs to skip what needs the layout (seeded-entry
    // frees, the clash netns) or to read the packet instead (new entries'
    // tuples) rather than read at a guessed offset. The three come
    // together or not at all: the free path reads the status wherever it
    // reads the tuple.
    let conn = (|| -> Result<(u32, u32, u32), BtfError> {
        let hash = off("nf_conn.tuplehash")?;
        let tuple = off("nf_conntrack_tuple_hash.tuple")?;
        let hash_size = btf.struct_size("nf_conntrack_tuple_hash")?;
        Ok((
            hash + tuple,
            hash + hash_size + tuple,
            off("nf_conn.status")?,
        ))
    })()
    .unwrap_or((0, 0, 0));
    Ok(Config {
        reason_netfilter_drop: 0,
        stream_new: 0,
        skb_span: skb_span(&skb),
        skb_nfct: off("sk_buff._nfct")?,
        skb_sk: off("sk_buff.sk")?,
        skb_dev: off("sk_buff.dev")?,
        skb_head: off("sk_buff.head")?,
        skb_network_header: off("sk_buff.network_header")?,
        skb_protocol: off("sk_buff.protocol")?,
        skb_iif: off("sk_buff.skb_iif")?,
        skb_refdst: off("sk_buff._skb_refdst")?,
        dst_dev: off("dst_entry.dev")?,
        dev_ifindex: off("net_device.ifindex")?,
        dev_nd_net: plus(off("net_device.nd_net")?, net_ptr, "net_device.nd_net.net")?,
        net_inum: off("net.ns.inum")?,
        sk_net: plus(
            off("sock.__sk_common.skc_net")?,
            net_ptr,
            "sock.__sk_common.skc_net.net",
        )?,
        sk_socket: off("sock.sk_socket")?,
        socket_to_inode,
        inode_ino: off("inode.i_ino")?,
        state_hook: off("nf_hook_state.hook")?,
        state_in: off("nf_hook_state.in")?,
        state_out: off("nf_hook_state.out")?,
        state_net: off("nf_hook_state.net")?,
        state_sk: off("nf_hook_state.sk")?,
        sk_state: off("sock.__sk_common.skc_state")?,
        conn_tuple: conn.0,
        conn_net: off("nf_conn.ct_net").map(|a| a + net_ptr).unwrap_or(0),
        hash_tuple: off("nf_conntrack_tuple_hash.tuple").unwrap_or(0),
        stream_budget: 0,
        first_budget: 0,
        count_cap: 0,
        _pad: 0,
        conn_reply_tuple: conn.1,
        conn_status: conn.2,
    })
}

/// Where one read of [`SKB_SPAN`] bytes covers every `(offset, size)` the
/// drop path reads, or `u32::MAX` when they are too far apart or one is
/// not naturally aligned (the program takes each field out of one aligned
/// word of the span).
fn skb_span(fields: &[(u32, u32)]) -> u32 {
    let start = fields.iter().map(|(o, _)| o & !7).min().unwrap_or(0);
    let end = fields.iter().map(|(o, n)| o + n).max().unwrap_or(0);
    let aligned = fields
        .iter()
        .all(|&(o, n)| matches!(n, 1 | 2 | 4 | 8) && o % n == 0);
    if aligned && (end - start) as usize <= SKB_SPAN {
        start
    } else {
        u32::MAX
    }
}

/// The running kernel's release (`uname -r`), or "unknown".
pub fn kernel_release() -> String {
    if let Ok(release) = fs::read_to_string("/proc/sys/kernel/osrelease") {
        let release = release.trim();
        if !release.is_empty() {
            return release.to_string();
        }
    }
    // /proc may not be mounted (early boot, minimal containers): ask uname(2).
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    // ----- A tiny BTF encoder, so the resolver is tested without a kernel. ---

    const KIND_INT: u32 = 1;
    const KIND_PTR: u32 = 2;
    const KIND_ARRAY: u32 = 3;
    const KIND_STRUCT: u32 = 4;
    const KIND_UNION: u32 = 5;
    const KIND_ENUM: u32 = 6;
    const KIND_TYPEDEF: u32 = 8;
    const KIND_VOLATILE: u32 = 9;
    const KIND_CONST: u32 = 10;
    const KIND_FUNC: u32 = 12;
    const KIND_FUNC_PROTO: u32 = 13;
    const KIND_ENUM64: u32 = 19;

    /// A member: name ("" = anonymous), type id, bit offset, bitfield size
    /// (0 = not a bitfield).
    type M<'a> = (&'a str, u32, u32, u32);

    /// Encodes little-endian BTF: header, type section, string section.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
        /// First string offset of this object (base string length for split BTF).
        str_start: u32,
    }

    impl Builder {
        fn base() -> Self {
            Builder {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
                str_start: 0,
            }
        }

        /// Split BTF on top of `base`: ids and string offsets continue it.
        fn split_of(base: &Builder) -> Self {
            Builder {
                types: Vec::new(),
                strings: vec![0],
                next_id: base.next_id,
                str_start: base.str_start + base.strings.len() as u32,
            }
        }

        fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let offset = self.str_start + self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            offset
        }

        fn words(&mut self, words: &[u32]) {
            for w in words {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
        }

        fn header(
            &mut self,
            name: &str,
            kind: u32,
            kind_flag: bool,
            vlen: u32,
            size_or_type: u32,
        ) -> u32 {
            let name_off = self.str(name);
            let info = (u32::from(kind_flag) << 31) | (kind << 24) | vlen;
            self.words(&[name_off, info, size_or_type]);
            let id = self.next_id;
            self.next_id += 1;
            id
        }

        fn int(&mut self, name: &str, size: u32, signed: bool) -> u32 {
            let id = self.header(name, KIND_INT, false, 0, size);
            self.words(&[(u32::from(signed) << 24) | (size * 8)]);
            id
        }

        fn ptr(&mut self, target: u32) -> u32 {
            self.header("", KIND_PTR, false, 0, target)
        }

        fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
            let id = self.header("", KIND_ARRAY, false, 0, 0);
            self.words(&[elem, index, n]);
            id
        }

        fn typedef(&mut self, name: &str, target: u32) -> u32 {
            self.header(name, KIND_TYPEDEF, false, 0, target)
        }

        fn qualifier(&mut self, kind: u32, target: u32) -> u32 {
            self.header("", kind, false, 0, target)
        }

        fn composite(&mut self, kind: u32, name: &str, size: u32, members: &[M]) -> u32 {
            let kind_flag = members.iter().any(|m| m.3 != 0);
            let encoded: Vec<[u32; 3]> = members
                .iter()
                .map(|&(n, ty, bit_off, bits)| {
                    let off = if kind_flag {
                        (bits << 24) | bit_off
                    } else {
                        bit_off
                    };
                    [self.str(n), ty, off]
                })
                .collect();
            let id = self.header(name, kind, kind_flag, members.len() as u32, size);
            for m in encoded {
                self.words(&m);
            }
            id
        }

        fn strukt(&mut self, name: &str, size: u32, members: &[M]) -> u32 {
            self.composite(KIND_STRUCT, name, size, members)
        }

        fn union(&mut self, name: &str, size: u32, members: &[M]) -> u32 {
            self.composite(KIND_UNION, name, size, members)
        }

        fn enum32(&mut self, name: &str, signed: bool, variants: &[(&str, i32)]) -> u32 {
            let encoded: Vec<[u32; 2]> = variants
                .iter()
                .map(|&(n, v)| [self.str(n), v as u32])
                .collect();
            let id = self.header(name, KIND_ENUM, signed, variants.len() as u32, 4);
            for v in encoded {
                self.words(&v);
            }
            id
        }

        fn enum64(&mut self, name: &str, signed: bool, variants: &[(&str, u64)]) -> u32 {
            let encoded: Vec<[u32; 3]> = variants
                .iter()
                .map(|&(n, v)| [self.str(n), v as u32, (v >> 32) as u32])
                .collect();
            let id = self.header(name, KIND_ENUM64, signed, variants.len() as u32, 8);
            for v in encoded {
                self.words(&v);
            }
            id
        }

        /// A global function `void name(void *)`.
        fn func(&mut self, name: &str, arg: u32) -> u32 {
            let arg_name = self.str("arg");
            let proto = self.header("", KIND_FUNC_PROTO, false, 1, 0);
            self.words(&[arg_name, arg]);
            self.header(name, KIND_FUNC, false, 1, proto)
        }

        fn bytes(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&0xeb9f_u16.to_le_bytes());
            out.push(1); // version
            out.push(0); // flags
            let type_len = self.types.len() as u32;
            let str_len = self.strings.len() as u32;
            for w in [24, 0, type_len, type_len, str_len] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A made-up kernel shaped like the real one where it matters (anonymous
    /// unions in sk_buff, struct_group, bitfields, typedef'd possible_net_t),
    /// with offsets chosen distinct so a wrong walk cannot pass by luck.
    struct MiniKernel {
        b: Builder,
        void_ptr: u32,
        ulong: u32,
        possible_net_t: u32,
        sk_buff: u32,
    }

    fn mini_kernel(drop_reasons: bool) -> MiniKernel {
        let mut b = Builder::base();
        let u8_ = b.int("unsigned char", 1, false);
        let u16_ = b.int("short unsigned int", 2, false);
        let u16_t = b.typedef("__u16", u16_);
        let be16 = b.typedef("__be16", u16_t);
        let int = b.int("int", 4, true);
        let uint = b.int("unsigned int", 4, false);
        let ulong = b.int("long unsigned int", 8, false);
        let void_ptr = b.ptr(0);
        let const_ptr = b.qualifier(KIND_CONST, void_ptr);
        let volatile_ulong = b.qualifier(KIND_VOLATILE, ulong);
        let volatile_u8 = b.qualifier(KIND_VOLATILE, u8_);

        let pnet_anon = b.strukt("", 16, &[("pad", ulong, 0, 0), ("net", void_ptr, 64, 0)]);
        let possible_net_t = b.typedef("possible_net_t", pnet_anon);

        // sk_buff
        let dev_union = b.union(
            "",
            8,
            &[("dev", void_ptr, 0, 0), ("dev_scratch", ulong, 0, 0)],
        );
        let list_anon = b.strukt(
            "",
            24,
            &[
                ("next", void_ptr, 0, 0),
                ("prev", void_ptr, 64, 0),
                ("", dev_union, 128, 0),
            ],
        );
        let rb_node = b.strukt("rb_node", 24, &[("rb_left", void_ptr, 64, 0)]);
        let head_union = b.union("", 24, &[("", list_anon, 0, 0), ("rbnode", rb_node, 0, 0)]);
        let refdst_anon = b.strukt(
            "",
            16,
            &[
                ("_skb_refdst", ulong, 0, 0),
                ("destructor", void_ptr, 64, 0),
            ],
        );
        let refdst_union = b.union(
            "",
            16,
            &[("", refdst_anon, 0, 0), ("_sk_redir", ulong, 0, 0)],
        );
        let cb = b.array(u8_, int, 48);
        // struct_group(headers, ...): bitfields then plain members.
        let headers = b.strukt(
            "",
            48,
            &[
                ("pkt_type", u8_, 0, 3),
                ("ignore_df", u8_, 3, 1),
                ("skb_iif", int, 128, 0),
                ("protocol", be16, 320, 0),
                ("transport_header", u16_t, 336, 0),
                ("network_header", u16_t, 352, 0),
            ],
        );
        let group = b.union("", 48, &[("", headers, 0, 0), ("headers", headers, 0, 0)]);
        let sk_buff = b.strukt(
            "sk_buff",
            240,
            &[
                ("", head_union, 0, 0),
                ("sk", void_ptr, 192, 0),
                ("cb", cb, 256, 0),
                ("", refdst_union, 640, 0),
                ("_nfct", volatile_ulong, 768, 0),
                ("len", uint, 832, 0),
                ("cloned", u8_, 864, 1),
                ("nohdr", u8_, 865, 1),
                ("", group, 896, 0),
                ("head", const_ptr, 1536, 0),
            ],
        );

        b.strukt(
            "dst_entry",
            64,
            &[("ops", void_ptr, 0, 0), ("dev", void_ptr, 64, 0)],
        );
        b.strukt(
            "net_device",
            512,
            &[
                ("name", void_ptr, 0, 0),
                ("ifindex", int, 1760, 0),
                ("nd_net", possible_net_t, 2048, 0),
            ],
        );
        let ns_common = b.strukt(
            "ns_common",
            24,
            &[
                ("stashed", void_ptr, 0, 0),
                ("ops", void_ptr, 64, 0),
                ("inum", uint, 128, 0),
            ],
        );
        b.strukt(
            "net",
            1024,
            &[("passive", int, 0, 0), ("ns", ns_common, 960, 0)],
        );
        let sock_common = b.strukt(
            "sock_common",
            136,
            &[
                ("skc_daddr", uint, 0, 0),
                ("skc_family", u16_, 128, 0),
                ("skc_state", volatile_u8, 144, 0),
                ("skc_reuse", u8_, 152, 4),
                ("skc_net", possible_net_t, 384, 0),
            ],
        );
        b.strukt(
            "sock",
            760,
            &[
                ("__sk_common", sock_common, 0, 0),
                ("sk_socket", void_ptr, 4800, 0),
            ],
        );
        let socket = b.strukt(
            "socket",
            128,
            &[("state", int, 0, 0), ("sk", void_ptr, 192, 0)],
        );
        let inode = b.strukt(
            "inode",
            600,
            &[("i_mode", u16_, 0, 0), ("i_ino", ulong, 512, 0)],
        );
        b.strukt(
            "socket_alloc",
            768,
            &[("socket", socket, 0, 0), ("vfs_inode", inode, 1536, 0)],
        );
        b.strukt(
            "nf_hook_state",
            48,
            &[
                ("hook", u8_, 0, 0),
                ("pf", u8_, 8, 0),
                ("in", void_ptr, 64, 0),
                ("out", void_ptr, 128, 0),
                ("sk", void_ptr, 192, 0),
                ("net", void_ptr, 256, 0),
                ("okfn", void_ptr, 320, 0),
            ],
        );
        if drop_reasons {
            b.enum32(
                "skb_drop_reason",
                false,
                &[
                    ("SKB_NOT_DROPPED_YET", 0),
                    ("SKB_DROP_REASON_NOT_SPECIFIED", 2),
                    ("SKB_DROP_REASON_NETFILTER_DROP", 12),
                ],
            );
        }
        b.enum32("signed_thing", true, &[("MINUS_ONE", -1), ("SEVEN", 7)]);
        b.enum64("wide_thing", false, &[("BIG", 1 << 40), ("SMALL", 3)]);
        let skb_ptr = b.ptr(sk_buff);
        b.func("kfree_skb", skb_ptr);
        // A struct named like a typedef elsewhere: the struct must win.
        let other = b.strukt("", 8, &[("y", int, 32, 0)]);
        b.typedef("dup", other);
        b.strukt("dup", 4, &[("x", int, 0, 0)]);
        // A struct with old-style (kind_flag 0) bitfield encoding.
        b.strukt("oldbits", 4, &[("a", uint, 0, 0), ("b", uint, 3, 0)]);
        MiniKernel {
            b,
            void_ptr,
            ulong,
            possible_net_t,
            sk_buff,
        }
    }

    /// Split BTF of a module on top of `k`, begun with the
    /// `nf_conntrack_tuple` every nf_conn layout holds: (builder, its id).
    fn conntrack_module(k: &MiniKernel) -> (Builder, u32) {
        let mut m = Builder::split_of(&k.b);
        let tuple = m.strukt("nf_conntrack_tuple", 40, &[("dst", k.ulong, 256, 0)]);
        (m, tuple)
    }

    /// An nf_conntrack-like module on top of `mini_kernel`.
    fn mini_module(k: &MiniKernel) -> Builder {
        let (mut m, tuple) = conntrack_module(k);
        m.strukt(
            "nf_conn",
            256,
            &[
                ("ct_general", k.ulong, 0, 0),
                ("tuple", tuple, 64, 0),
                ("ct_net", k.possible_net_t, 448, 0),
                ("status", k.ulong, 576, 0),
            ],
        );
        m.enum64("ip_conntrack_status", false, &[("IPS_CONFIRMED", 8)]);
        m.func("nf_conntrack_in", k.void_ptr);
        m.func("__nf_conntrack_alloc", k.void_ptr);
        let skb_ptr = m.ptr(k.sk_buff);
        m.func("nf_ct_skb_thing", skb_ptr);
        m
    }

    /// A scratch directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("ctwatch-btf-{}-{tag}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, bytes).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// `kernel` as `vmlinux` and, where given, `module` as `nf_conntrack`
    /// beside it, written to a scratch directory (returned, so later loads
    /// in the test can read it) and loaded together as the loader loads
    /// /sys/kernel/btf.
    fn kernel_from(kernel: &Builder, module: Option<&Builder>, tag: &str) -> (TempDir, KernelBtf) {
        let dir = TempDir::new(tag);
        let vmlinux = dir.write("vmlinux", &kernel.bytes());
        let module = module.map(|m| dir.write("nf_conntrack", &m.bytes()));
        let modules: Vec<&Path> = module.as_deref().into_iter().collect();
        let btf = KernelBtf::load_from(&vmlinux, &modules).unwrap();
        (dir, btf)
    }

    // ----- Member walking. ---------------------------------------------------

    /// `bpf_link_info` as 6.7 shaped it: `perf_event` in an anonymous
    /// union, `kprobe` in another inside it; before 6.7 `kprobe` had no
    /// `missed`.
    fn link_info(missed: bool) -> Builder {
        let mut b = Builder::base();
        let u32_ = b.int("unsigned int", 4, false);
        let u64_ = b.int("long long unsigned int", 8, false);
        let mut kprobe_members = vec![("offset", u32_, 0, 0), ("addr", u64_, 64, 0)];
        if missed {
            kprobe_members.push(("missed", u64_, 128, 0));
        }
        let kprobe = b.strukt("", 24, &kprobe_members);
        let uprobe = b.strukt("", 8, &[("offset", u32_, 0, 0)]);
        let which = b.union(
            "",
            24,
            &[("uprobe", uprobe, 0, 0), ("kprobe", kprobe, 0, 0)],
        );
        let perf_event = b.strukt("", 32, &[("type", u32_, 0, 0), ("", which, 64, 0)]);
        let raw_tp = b.strukt("", 8, &[("tp_name", u64_, 0, 0)]);
        let info = b.union(
            "",
            32,
            &[
                ("raw_tracepoint", raw_tp, 0, 0),
                ("perf_event", perf_event, 0, 0),
            ],
        );
        b.strukt(
            "bpf_link_info",
            48,
            &[("type", u32_, 0, 0), ("", info, 128, 0)],
        );
        b
    }

    #[test]
    fn kprobe_skips_are_counted_where_kprobe_links_count_misses() {
        let (_dir, new) = kernel_from(&link_info(true), None, "link-new");
        assert!(counts_kprobe_skips(&new));
        let (_dir, old) = kernel_from(&link_info(false), None, "link-old");
        assert!(!counts_kprobe_skips(&old));
    }

    #[test]
    fn nested_anonymous_unions_and_structs() {
        let (_dir, btf) = kernel_from(&mini_kernel(true).b, None, "anon");
        // union { struct { next; prev; union { dev; ... } } ; rbnode }
        assert_eq!(btf.member_offset("sk_buff.dev").unwrap(), 16);
        assert_eq!(btf.member_offset("sk_buff.sk").unwrap(), 24);
        assert_eq!(btf.member_offset("sk_buff._skb_refdst").unwrap(), 80);
        assert_eq!(btf.member_offset("sk_buff._nfct").unwrap(), 96);
        // struct_group: anonymous struct with bitfields, inside a union.
        assert_eq!(btf.member_offset("sk_buff.skb_iif").unwrap(), 112 + 16);
        assert_eq!(btf.member_offset("sk_buff.protocol").unwrap(), 112 + 40);
        assert_eq!(
            btf.member_offset("sk_buff.network_header").unwrap(),
            112 + 44
        );
        // The named twin of the struct_group.
        assert_eq!(
            btf.member_offset("sk_buff.headers.network_header").unwrap(),
            112 + 44
        );
        assert_eq!(btf.member_offset("sk_buff.head").unwrap(), 192);
        assert_eq!(btf.member_offset("sk_buff.rbnode.rb_left").unwrap(), 8);
    }

    #[test]
    fn nested_named_members_and_typedef_roots() {
        let (_dir, btf) = kernel_from(&mini_kernel(true).b, None, "named");
        assert_eq!(btf.member_offset("net.ns.inum").unwrap(), 120 + 16);
        assert_eq!(btf.member_offset("sock.__sk_common.skc_net").unwrap(), 48);
        assert_eq!(
            btf.member_offset("sock.__sk_common.skc_net.net").unwrap(),
            56
        );
        assert_eq!(btf.member_offset("net_device.nd_net").unwrap(), 256);
        assert_eq!(btf.member_offset("possible_net_t.net").unwrap(), 8);
        assert_eq!(btf.struct_size("possible_net_t").unwrap(), 16);
        assert_eq!(btf.struct_size("sk_buff").unwrap(), 240);
        // A struct wins over a typedef of the same name.
        assert_eq!(btf.struct_size("dup").unwrap(), 4);
    }

    #[test]
    fn missing_type_and_member_errors() {
        let (_dir, btf) = kernel_from(&mini_kernel(true).b, None, "missing");
        let err = btf.member_offset("sk_buff.nope").unwrap_err();
        assert!(
            matches!(&err, BtfError::MemberNotFound { member, within, .. }
            if member == "nope" && within == "sk_buff"),
            "{err:?}"
        );
        assert!(err.to_string().contains("sk_buff.nope"), "{err}");

        let err = btf.member_offset("net.ns.nope").unwrap_err();
        assert!(
            matches!(&err, BtfError::MemberNotFound { within, .. } if within == "net.ns"),
            "{err:?}"
        );

        let err = btf.member_offset("no_such_struct.x").unwrap_err();
        assert!(
            matches!(&err, BtfError::TypeNotFound { name, .. } if name == "no_such_struct"),
            "{err:?}"
        );
        assert!(err.to_string().contains("searched vmlinux"), "{err}");
        assert!(matches!(
            btf.struct_size("nope"),
            Err(BtfError::TypeNotFound { .. })
        ));

        // Descending into a scalar.
        let err = btf.member_offset("sk_buff._nfct.x").unwrap_err();
        assert!(
            matches!(&err, BtfError::NotAStruct { member, .. } if member == "sk_buff._nfct"),
            "{err:?}"
        );

        for bad in ["", "sk_buff", "sk_buff.", ".x", "sk_buff..dev"] {
            assert!(
                matches!(btf.member_offset(bad), Err(BtfError::InvalidPath(_))),
                "{bad:?}"
            );
        }
    }

    /// Found by the btf fuzz target: a member found inside an anonymous
    /// struct placed near bit 2^32 overflowed the offset sum.
    #[test]
    fn offset_past_4_gbit_is_corrupt_not_a_panic() {
        let mut b = Builder::base();
        let int = b.int("int", 4, true);
        let inner = b.strukt("", 16, &[("x", int, 64, 0)]);
        b.strukt("far", 16, &[("", inner, u32::MAX - 31, 0)]);
        let (_dir, btf) = kernel_from(&b, None, "far");
        let err = btf.member_offset("far.x").unwrap_err();
        assert!(
            matches!(&err, BtfError::Corrupt { what, .. } if what == "far.x"),
            "{err:?}"
        );
    }

    /// Found while fuzzing, by reading the walk: an anonymous struct that
    /// holds itself four times made one lookup take 4^16 steps (a 100-byte
    /// BTF hung the loader). Now each anonymous type is searched once.
    #[test]
    fn self_nested_anonymous_structs_end_quickly() {
        let mut b = Builder::base();
        let me = b.next_id;
        b.strukt("loop", 8, &[("", me, 0, 0); 8]);
        let (_dir, btf) = kernel_from(&b, None, "loop");
        let start = std::time::Instant::now();
        let err = btf.member_offset("loop.x").unwrap_err();
        assert!(matches!(err, BtfError::MemberNotFound { .. }), "{err:?}");
        assert!(start.elapsed().as_secs() < 5, "{:?}", start.elapsed());
    }

    #[test]
    fn bitfields_are_rejected() {
        let (_dir, btf) = kernel_from(&mini_kernel(true).b, None, "bitfield");
        // kind_flag encoding, at a byte boundary (size says bitfield).
        let err = btf.member_offset("sk_buff.cloned").unwrap_err();
        assert!(
            matches!(&err, BtfError::Bitfield { path } if path == "sk_buff.cloned"),
            "{err:?}"
        );
        // kind_flag encoding, inside an anonymous struct.
        assert!(matches!(
            btf.member_offset("sk_buff.pkt_type"),
            Err(BtfError::Bitfield { .. })
        ));
        assert!(matches!(
            btf.member_offset("sk_buff.ignore_df"),
            Err(BtfError::Bitfield { .. })
        ));
        // Old encoding: a bit offset that is not byte aligned.
        assert!(matches!(
            btf.member_offset("oldbits.b"),
            Err(BtfError::Bitfield { .. })
        ));
        assert_eq!(btf.member_offset("oldbits.a").unwrap(), 0);
        // Members next to bitfields (same kind_flag struct) still resolve.
        assert_eq!(btf.member_offset("sk_buff.len").unwrap(), 104);
        assert_eq!(btf.member_offset("sock.__sk_common.skc_state").unwrap(), 18);
        let err = btf.member_offset("sock.__sk_common.skc_reuse").unwrap_err();
        assert!(
            matches!(&err, BtfError::Bitfield { path } if path == "sock.__sk_common.skc_reuse"),
            "{err:?}"
        );
    }

    // ----- Enums. -------------------------------------------------------------

    #[test]
    fn enum_values() {
        let (_dir, btf) = kernel_from(&mini_kernel(true).b, None, "enum");
        assert_eq!(
            btf.enum_value("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP")
                .unwrap(),
            12
        );
        assert_eq!(btf.enum_value("signed_thing", "MINUS_ONE").unwrap(), -1);
        assert_eq!(btf.enum_value("signed_thing", "SEVEN").unwrap(), 7);
        assert_eq!(btf.enum_value("wide_thing", "BIG").unwrap(), 1 << 40);
        assert_eq!(btf.enum_value("wide_thing", "SMALL").unwrap(), 3);

        let err = btf
            .enum_value("skb_drop_reason", "SKB_DROP_REASON_NOPE")
            .unwrap_err();
        assert!(
            matches!(&err, BtfError::VariantNotFound { variant, .. } if variant == "SKB_DROP_REASON_NOPE"),
            "{err:?}"
        );
        let err = btf.enum_value("no_enum", "X").unwrap_err();
        assert!(
            matches!(&err, BtfError::EnumNotFound { name, .. } if name == "no_enum"),
            "{err:?}"
        );
        // A struct is not an enum.
        assert!(matches!(
            btf.enum_value("sk_buff", "X"),
            Err(BtfError::EnumNotFound { .. })
        ));
    }

    #[test]
    fn no_drop_reasons_names_the_kprobe_mode() {
        let (_dir, btf) = kernel_from(&mini_kernel(false).b, None, "noreason");
        let err = resolve_config(&btf).unwrap_err();
        assert!(matches!(err, BtfError::NoDropReasons), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("5.17") && msg.contains("kprobe"), "{msg}");
        // The offsets alone still resolve.
        assert_eq!(resolve_layout(&btf).unwrap().skb_nfct, 96);
    }

    // ----- The whole Config. --------------------------------------------------

    #[test]
    fn resolve_config_on_mini_kernel() {
        let (_dir, btf) = kernel_from(&mini_kernel(true).b, None, "config");
        let config = resolve_config(&btf).unwrap();
        let expected = Config {
            reason_netfilter_drop: 12,
            stream_new: 0,
            skb_nfct: 96,
            skb_sk: 24,
            skb_dev: 16,
            skb_head: 192,
            skb_network_header: 156,
            skb_protocol: 152,
            skb_iif: 128,
            skb_refdst: 80,
            dst_dev: 8,
            dev_ifindex: 220,
            dev_nd_net: 256 + 8,
            net_inum: 136,
            sk_net: 48 + 8,
            sk_socket: 600,
            socket_to_inode: 192,
            inode_ino: 64,
            state_hook: 0,
            state_in: 8,
            state_out: 16,
            state_net: 32,
            state_sk: 24,
            sk_state: 18,
            // The mini kernel has no nf_conn (like 5.10 without module BTF):
            // these stay 0 so the programs skip what needs them.
            conn_tuple: 0,
            conn_net: 0,
            hash_tuple: 0,
            stream_budget: 0,
            first_budget: 0,
            // dev (16) .. head (192 + 8) fit in one read from 16.
            skb_span: 16,
            count_cap: 0,
            ..Default::default()
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn skb_span_covers_every_field_or_gives_up() {
        assert_eq!(skb_span(&[(16, 8), (24, 8), (200, 8)]), 16);
        assert_eq!(skb_span(&[(18, 2), (264, 8)]), 16, "starts 8-aligned");
        assert_eq!(skb_span(&[(0, 8), (300, 8)]), u32::MAX);
        assert_eq!(skb_span(&[(16, 8), (27, 2)]), u32::MAX, "misaligned u16");
        assert_eq!(skb_span(&[(16, 8), (20, 8)]), u32::MAX, "misaligned u64");
    }

    /// nf_conn shaped like the kernel's: `tuplehash[2]` of 56-byte
    /// `nf_conntrack_tuple_hash` (list node, then the tuple), `status`, `ct_net`.
    fn conn_module(k: &MiniKernel, with_status: bool) -> Builder {
        let (mut m, tuple) = conntrack_module(k);
        let hash = m.strukt(
            "nf_conntrack_tuple_hash",
            56,
            &[("hnnode", k.ulong, 0, 0), ("tuple", tuple, 128, 0)],
        );
        let index = m.int("int", 4, true);
        let pair = m.array(hash, index, 2);
        let mut members = vec![
            ("ct_general", k.ulong, 0, 0),
            ("tuplehash", pair, 128, 0),
            ("ct_net", k.possible_net_t, 1088, 0),
        ];
        if with_status {
            members.push(("status", k.ulong, 1024, 0));
        }
        m.strukt("nf_conn", 192, &members);
        m
    }

    #[test]
    fn nf_conn_offsets_come_from_module_btf_together() {
        let kernel = mini_kernel(true);
        let with_status = conn_module(&kernel, true);
        let (_dir, btf) = kernel_from(&kernel.b, Some(&with_status), "conn");
        let c = resolve_layout(&btf).unwrap();
        assert_eq!(
            (c.conn_tuple, c.conn_reply_tuple, c.conn_status),
            (16 + 16, 16 + 56 + 16, 128)
        );
        assert_eq!((c.conn_net, c.hash_tuple), (136 + 8, 16));
        // Without the status the free path cannot tell confirmed entries:
        // none of the three is used then.
        let without = conn_module(&kernel, false);
        let (_dir, btf) = kernel_from(&kernel.b, Some(&without), "conn-nostatus");
        let c = resolve_layout(&btf).unwrap();
        assert_eq!((c.conn_tuple, c.conn_reply_tuple, c.conn_status), (0, 0, 0));
    }

    // ----- Files, modules, functions. -------------------------------------------

    #[test]
    fn split_module_btf_on_top_of_base() {
        let kernel = mini_kernel(true);
        let (dir, btf) = kernel_from(&kernel.b, Some(&mini_module(&kernel)), "split");
        assert_eq!(btf.modules().collect::<Vec<_>>(), ["nf_conntrack"]);

        // A module struct whose member types live in vmlinux.
        assert_eq!(btf.member_offset("nf_conn.status").unwrap(), 72);
        assert_eq!(btf.member_offset("nf_conn.tuple.dst").unwrap(), 8 + 32);
        assert_eq!(btf.member_offset("nf_conn.ct_net.net").unwrap(), 56 + 8);
        assert_eq!(btf.struct_size("nf_conntrack_tuple").unwrap(), 40);
        assert_eq!(
            btf.enum_value("ip_conntrack_status", "IPS_CONFIRMED")
                .unwrap(),
            8
        );
        // vmlinux types still resolve.
        assert_eq!(btf.member_offset("sk_buff._nfct").unwrap(), 96);

        // Without the module, its facts are missing, and the error says where
        // it looked.
        let bare = KernelBtf::load_from(&dir.0.join("vmlinux"), &[]).unwrap();
        let err = bare.member_offset("nf_conn.status").unwrap_err();
        assert!(matches!(err, BtfError::TypeNotFound { .. }), "{err:?}");
        let err = btf.member_offset("nf_conn2.status").unwrap_err();
        assert!(err.to_string().contains("vmlinux, nf_conntrack"), "{err}");
    }

    #[test]
    fn with_module_adds_present_and_skips_absent() {
        let kernel = mini_kernel(true);
        let (dir, _) = kernel_from(&kernel.b, Some(&mini_module(&kernel)), "with_module");
        // vmlinux alone, the module only found in the directory.
        let bare = || KernelBtf::load_from(&dir.0.join("vmlinux"), &[]).unwrap();

        let btf = bare().with_module_in(&dir.0, "not_loaded").unwrap();
        assert_eq!(btf.modules().count(), 0);
        let btf = btf.with_module_in(&dir.0, "nf_conntrack").unwrap();
        assert_eq!(btf.member_offset("nf_conn.status").unwrap(), 72);
        // Adding twice (or vmlinux) changes nothing.
        let btf = btf.with_module_in(&dir.0, "nf_conntrack").unwrap();
        let btf = btf.with_module_in(&dir.0, "vmlinux").unwrap();
        assert_eq!(btf.modules().collect::<Vec<_>>(), ["nf_conntrack"]);

        for bad in ["", "../etc", "a/b", ".."] {
            let err = bare().with_module_in(&dir.0, bad).unwrap_err();
            assert!(
                matches!(err, BtfError::BadModuleName(_)),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn file_errors_say_what_to_do() {
        let dir = TempDir::new("files");
        let err = KernelBtf::load_from(&dir.0.join("vmlinux"), &[]).unwrap_err();
        assert!(matches!(err, BtfError::VmlinuxMissing(_)), "{err:?}");
        assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF=y"), "{err}");

        let kernel = mini_kernel(true);
        let vmlinux = dir.write("vmlinux", &kernel.b.bytes());
        let missing = dir.0.join("nf_conntrack");
        let err = KernelBtf::load_from(&vmlinux, &[&missing]).unwrap_err();
        assert!(
            matches!(&err, BtfError::ModuleMissing { module, .. } if module == "nf_conntrack"),
            "{err:?}"
        );
        assert!(err.to_string().contains("modprobe nf_conntrack"), "{err}");

        let garbage = dir.write("garbage", b"not btf at all, not even close");
        let err = KernelBtf::load_from(&garbage, &[]).unwrap_err();
        assert!(matches!(err, BtfError::Parse { .. }), "{err:?}");
        // Messages are one line.
        assert!(!err.to_string().contains('\n'));
        let err = KernelBtf::load_from(&vmlinux, &[&garbage]).unwrap_err();
        assert!(
            matches!(&err, BtfError::ModuleParse { module, .. } if module == "garbage"),
            "{err:?}"
        );
    }

    #[test]
    fn kernel_release_is_not_empty() {
        let release = kernel_release();
        assert!(
            !release.is_empty() && !release.contains('\n'),
            "{release:?}"
        );
    }

    // ----- The host's own kernel. ---------------------------------------------------

    #[test]
    fn host_vmlinux_resolves_config() {
        if !Path::new(VMLINUX_BTF).exists() {
            crate::source::netns::testutil::skip_or_fail(
                "host_vmlinux_resolves_config",
                &format!(
                    "{VMLINUX_BTF} absent on kernel {} (no CONFIG_DEBUG_INFO_BTF)",
                    kernel_release()
                ),
            );
            return;
        }
        let btf = KernelBtf::load()
            .unwrap()
            .with_module("nf_conntrack")
            .unwrap();
        println!("kernel {}, BTF {:?}", kernel_release(), btf);
        let config = match resolve_config(&btf) {
            Ok(config) => config,
            Err(BtfError::NoDropReasons) => {
                eprintln!(
                    "kernel {} has no drop reasons; layout only",
                    kernel_release()
                );
                resolve_layout(&btf).unwrap()
            }
            Err(e) => panic!("{e}"),
        };
        println!("{config:#?}");
        if btf.struct_size("nf_conn").is_ok() {
            // Where nf_conn's layout is known, the entry offsets must be too.
            assert_ne!(config.conn_tuple, 0);
            assert_ne!(config.hash_tuple, 0);
            assert!(config.conn_tuple > config.hash_tuple);
        }

        let skb = btf.struct_size("sk_buff").unwrap();
        for (name, off) in [
            ("skb_nfct", config.skb_nfct),
            ("skb_sk", config.skb_sk),
            ("skb_dev", config.skb_dev),
            ("skb_head", config.skb_head),
            ("skb_network_header", config.skb_network_header),
            ("skb_protocol", config.skb_protocol),
            ("skb_iif", config.skb_iif),
            ("skb_refdst", config.skb_refdst),
        ] {
            assert!(off < skb, "{name} = {off} outside sk_buff ({skb} bytes)");
        }
        // Pointers and unsigned longs are 8-aligned, u16s 2-aligned, ints 4-aligned.
        for off in [
            config.skb_nfct,
            config.skb_sk,
            config.skb_dev,
            config.skb_head,
            config.skb_refdst,
        ] {
            assert_eq!(off % 8, 0);
        }
        assert_eq!(config.skb_network_header % 2, 0);
        assert_eq!(config.skb_protocol % 2, 0);
        assert_eq!(config.skb_iif % 4, 0);
        let state = btf.struct_size("nf_hook_state").unwrap();
        for off in [
            config.state_hook,
            config.state_in,
            config.state_out,
            config.state_net,
            config.state_sk,
        ] {
            assert!(off < state);
        }
        assert!(config.dev_nd_net < btf.struct_size("net_device").unwrap());
        assert!(config.net_inum < btf.struct_size("net").unwrap());
        assert!(config.sk_net < btf.struct_size("sock").unwrap());
        assert!(config.sk_socket < btf.struct_size("sock").unwrap());
        assert!(config.socket_to_inode >= btf.struct_size("socket").unwrap());
    }
}
