//! The top-level error: every lower layer's typed error folded in, each
//! with a one-line message that says what is missing and what to do.
//! Only commands return it; the stages below return their own.
//!
//! [`Error::exit_code`] is the one place a failure becomes an exit code, so
//! scripts and probes can tell a bad command line, a missing privilege and
//! an unsupported kernel from a failure at run time (README "Exit codes").
//! It reads the typed errors, never their text.
use std::io;

use crate::{
    aggregate::summary::SnapshotError,
    doctor::DoctorError,
    kernel::{btf::BtfError, loader::LoadError},
    session::SessionError,
    source::{
        counters::CountersError, ctnetlink::CtnetlinkError, maps::SourceError, netns::NetnsError,
    },
    views::http::ServeError,
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Counters(#[from] CountersError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Terminal(#[from] crate::views::top::draw::TerminalError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Doctor(#[from] DoctorError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("`ctwatch {what}` needs the kprobe mode, and on kernel {release} ctwatch runs in tracepoint mode (`ctwatch -v {what}` says why the kprobe mode is unavailable): use `ctwatch drops` or `ctwatch report` here")]
    NeedsKernelProbes { what: &'static str, release: String },
    #[error("`ctwatch top` needs a terminal and stdout is not one: use `ctwatch report --json` or `ctwatch drops` for pipes and files")]
    NotATerminal,
}

/// What kind of failure ended a run; its value is the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Failure {
    /// Something broke while running: a namespace vanished, a read failed,
    /// the port is taken. Retrying may help.
    Runtime = 1,
    /// The command line asks for something that cannot be: clap's own
    /// code for bad flags, and ctwatch's for values only it can check.
    Usage = 2,
    /// Not root, or a capability is missing.
    Privilege = 3,
    /// The kernel cannot do it: no BTF, no conntrack, no ring buffer, or
    /// it refuses the (forced) attach mode.
    Kernel = 4,
}

impl Error {
    pub(crate) fn exit_code(&self) -> u8 {
        self.failure() as u8
    }

    fn failure(&self) -> Failure {
        match self {
            Error::Session(e) => session(e),
            Error::Counters(e) => counters(e),
            Error::Netns(e) => netns(e),
            Error::Serve(e) => serve(e),
            Error::Terminal(_) => Failure::Runtime,
            Error::Snapshot(e) => snapshot(e),
            Error::Doctor(e) => doctor(e),
            Error::Io(e) => io_error(e),
            Error::NeedsKernelProbes { .. } => Failure::Kernel,
            Error::NotATerminal => Failure::Usage,
        }
    }
}

fn errno(code: Option<i32>) -> Failure {
    match code {
        Some(libc::EPERM | libc::EACCES) => Failure::Privilege,
        _ => Failure::Runtime,
    }
}

fn io_error(e: &io::Error) -> Failure {
    errno(e.raw_os_error())
}

fn session(e: &SessionError) -> Failure {
    match e {
        SessionError::Load(e) => load(e),
        SessionError::Source(e) => source(e),
        SessionError::Netns(e) => netns(e),
    }
}

fn load(e: &LoadError) -> Failure {
    match e {
        LoadError::Privileges(_) => Failure::Privilege,
        LoadError::Btf(e) => btf(e),
        // The kernel refused what it was given: a program, a map, a mode.
        LoadError::NoConntrack
        | LoadError::NoRingBuf(_)
        | LoadError::Load { .. }
        | LoadError::Probe { .. }
        | LoadError::Unavailable { .. }
        | LoadError::NoMode { .. } => Failure::Kernel,
        // A build without the eBPF object: nothing the kernel or the user did.
        LoadError::NoObject => Failure::Runtime,
    }
}

fn btf(e: &BtfError) -> Failure {
    match e {
        BtfError::Read { cause, .. } if errno(cause.raw_os_error()) == Failure::Privilege => {
            Failure::Privilege
        }
        BtfError::VmlinuxMissing(_)
        | BtfError::ModuleMissing { .. }
        | BtfError::Read { .. }
        | BtfError::Parse { .. }
        | BtfError::ModuleParse { .. }
        | BtfError::Corrupt { .. }
        | BtfError::TypeNotFound { .. }
        | BtfError::MemberNotFound { .. }
        | BtfError::Bitfield { .. }
        | BtfError::NotAStruct { .. }
        | BtfError::EnumNotFound { .. }
        | BtfError::VariantNotFound { .. }
        | BtfError::NoDropReasons
        | BtfError::Layout(_) => Failure::Kernel,
        // ctwatch's own lookups are malformed: a bug, not the kernel.
        BtfError::BadModuleName(_) | BtfError::InvalidPath(_) => Failure::Runtime,
    }
}

fn source(e: &SourceError) -> Failure {
    match e {
        SourceError::MissingMap(_) | SourceError::Map { .. } | SourceError::Program { .. } => {
            Failure::Runtime
        }
        SourceError::Io(e) => io_error(e),
    }
}

fn netns(e: &NetnsError) -> Failure {
    match e {
        // `--netns` names nothing that exists.
        NetnsError::NotFound { .. } => Failure::Usage,
        NetnsError::Open { source, .. } => io_error(source),
        NetnsError::Enter { source, .. } => errno(Some(*source as i32)),
        NetnsError::ProcUnreadable { .. }
        | NetnsError::Vanished { .. }
        | NetnsError::Thread { .. } => Failure::Runtime,
    }
}

fn counters(e: &CountersError) -> Failure {
    match e {
        CountersError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound => {
            Failure::Kernel
        }
        CountersError::Read { source, .. } => io_error(source),
        CountersError::Ctnetlink(e) => ctnetlink(e),
        CountersError::Netns(e) => netns(e),
        CountersError::Malformed { .. }
        | CountersError::NoCpuRows
        | CountersError::SysctlValue { .. } => Failure::Runtime,
    }
}

fn ctnetlink(e: &CtnetlinkError) -> Failure {
    match e {
        CtnetlinkError::Socket(e) | CtnetlinkError::Kernel { source: e, .. } => {
            match e.raw_os_error() {
                // No ctnetlink in this kernel (nf_conntrack_netlink absent).
                Some(libc::EOPNOTSUPP | libc::ENOENT | libc::EPROTONOSUPPORT) => Failure::Kernel,
                code => errno(code),
            }
        }
        CtnetlinkError::Decode(_) => Failure::Runtime,
        CtnetlinkError::Netns(e) => netns(e),
    }
}

fn serve(e: &ServeError) -> Failure {
    match e {
        ServeError::PermissionDenied { .. } => Failure::Privilege,
        // `--listen` names an address this host does not have.
        ServeError::AddrNotAvailable { .. } => Failure::Usage,
        ServeError::AddrInUse { .. } | ServeError::Bind { .. } => Failure::Runtime,
    }
}

fn snapshot(e: &SnapshotError) -> Failure {
    match e {
        SnapshotError::NotLoaded => Failure::Kernel,
        SnapshotError::Read { source, .. } => io_error(source),
        SnapshotError::Dump { source, .. } => ctnetlink(source),
        SnapshotError::Counters(e) => counters(e),
        SnapshotError::Netns(e) => netns(e),
    }
}

fn doctor(e: &DoctorError) -> Failure {
    match e {
        DoctorError::Unreadable { .. } => Failure::Runtime,
        DoctorError::Session(e) => session(e),
        DoctorError::Table(e) => snapshot(e),
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, path::PathBuf};

    use super::*;
    use crate::kernel::compat::Mode;

    fn os(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    fn load_error(e: LoadError) -> Error {
        Error::Session(SessionError::from(e))
    }

    #[test]
    fn missing_privilege_is_3_wherever_it_surfaces() {
        let path = PathBuf::from("/proc/1/ns/net");
        for e in [
            load_error(LoadError::Privileges("CAP_BPF".into())),
            Error::Netns(NetnsError::Enter {
                inum: 1,
                source: nix::Error::EPERM,
            }),
            Error::Netns(NetnsError::Open {
                path: path.clone(),
                source: os(libc::EACCES),
            }),
            Error::Counters(CountersError::Ctnetlink(CtnetlinkError::Socket(os(
                libc::EPERM,
            )))),
            Error::Snapshot(SnapshotError::Dump {
                inum: 1,
                source: CtnetlinkError::Kernel {
                    source: os(libc::EPERM),
                    hint: "",
                },
            }),
            Error::Serve(ServeError::PermissionDenied {
                addr: SocketAddr::from(([0, 0, 0, 0], 80)),
            }),
            load_error(LoadError::Btf(BtfError::Read {
                path,
                cause: os(libc::EACCES),
            })),
        ] {
            assert_eq!(e.failure(), Failure::Privilege, "{e}");
            assert_eq!(e.exit_code(), 3, "{e}");
        }
    }

    #[test]
    fn an_unsupported_kernel_is_4() {
        for e in [
            load_error(LoadError::Btf(BtfError::VmlinuxMissing(PathBuf::from(
                "/sys/kernel/btf/vmlinux",
            )))),
            load_error(LoadError::Btf(BtfError::NoDropReasons)),
            load_error(LoadError::NoConntrack),
            load_error(LoadError::NoRingBuf("5.4.0".into())),
            load_error(LoadError::Unavailable {
                mode: Mode::Kprobe,
                release: "6.18.0".into(),
                why: "no kprobes".into(),
            }),
            load_error(LoadError::Probe {
                mode: Mode::Kprobe,
                program: "p",
                purpose: "q",
                stage: "load",
                release: "6.18.0".into(),
                detail: "Operation not permitted".into(),
                hint: String::new(),
            }),
            load_error(LoadError::NoMode {
                release: "6.18.0".into(),
                tried: String::new(),
            }),
            Error::NeedsKernelProbes {
                what: "events",
                release: "6.18.0".into(),
            },
            Error::Snapshot(SnapshotError::NotLoaded),
            Error::Counters(CountersError::Ctnetlink(CtnetlinkError::Kernel {
                source: os(libc::EOPNOTSUPP),
                hint: "",
            })),
        ] {
            assert_eq!(e.failure(), Failure::Kernel, "{e}");
            assert_eq!(e.exit_code(), 4, "{e}");
        }
    }

    #[test]
    fn a_bad_argument_is_2_like_clap() {
        for e in [
            Error::Netns(NetnsError::NotFound {
                spec: "nope".into(),
            }),
            Error::NotATerminal,
            Error::Serve(ServeError::AddrNotAvailable {
                addr: SocketAddr::from(([192, 0, 2, 1], 9465)),
            }),
        ] {
            assert_eq!(e.failure(), Failure::Usage, "{e}");
            assert_eq!(e.exit_code(), 2, "{e}");
        }
    }

    #[test]
    fn failures_at_run_time_are_1() {
        for e in [
            Error::Netns(NetnsError::Vanished {
                inum: 4026532177,
                path: PathBuf::from("/proc/42/ns/net"),
            }),
            Error::Serve(ServeError::AddrInUse {
                addr: SocketAddr::from(([127, 0, 0, 1], 9465)),
            }),
            Error::Session(SessionError::Source(SourceError::MissingMap("EVENTS"))),
            Error::Counters(CountersError::NoCpuRows),
            Error::Counters(CountersError::Ctnetlink(CtnetlinkError::Kernel {
                source: os(libc::ENOBUFS),
                hint: "",
            })),
            Error::Io(os(libc::EIO)),
            load_error(LoadError::NoObject),
        ] {
            assert_eq!(e.failure(), Failure::Runtime, "{e}");
            assert_eq!(e.exit_code(), 1, "{e}");
        }
    }
}
