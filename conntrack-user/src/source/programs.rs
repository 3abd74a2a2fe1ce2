//! The kernel's own counters of the attached programs: the runs it skipped
//! (`recursion_misses`, a field since 5.12). A raw tracepoint's program is
//! skipped when it is already running on that CPU (an interrupt's softirq
//! freeing an skb inside a drop's run, say), counted from 6.2; before, it
//! ran nested instead. A kprobe's is skipped while any BPF program runs,
//! counted only from 6.7 (`Loaded::skips_counted`). No program sees the
//! event, so only this counter can report it. aya 0.14 reads the program
//! info but does not expose this field, so this is `bpf(2)` itself.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::programs::ProgramFd;
use aya_obj::generated::bpf_prog_info;

use crate::{kernel::loader::Loaded, source::maps::SourceError};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `union bpf_attr`'s `info` member.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The attached programs, by name and their own fds (shared with aya's).
pub(crate) struct Programs(Vec<(&'static str, ProgramFd)>);

impl Programs {
    pub(crate) fn of(loaded: &Loaded) -> Result<Self, SourceError> {
        let mut fds = Vec::new();
        for name in &loaded.attached {
            let fd = loaded.ebpf.program(name).and_then(|p| p.fd().ok()).ok_or(
                SourceError::Program {
                    name,
                    detail: "not loaded".into(),
                },
            )?;
            let fd = fd.try_clone().map_err(|e| SourceError::Program {
                name,
                detail: e.to_string(),
            })?;
            fds.push((*name, fd));
        }
        Ok(Programs(fds))
    }

    /// Runs skipped so far, summed over the programs (0 on kernels that
    /// do not count them, before 5.12).
    pub(crate) fn runs_skipped(&self) -> Result<u64, SourceError> {
        let mut sum = 0;
        for (name, fd) in &self.0 {
            sum += recursion_misses(fd.as_fd()).map_err(|e| SourceError::Program {
                name,
                detail: format!("reading its info: {e}"),
            })?;
        }
        Ok(sum)
    }
}

fn recursion_misses(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: plain integers; all zero is the kernel's "nothing asked".
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<bpf_prog_info>() as u32,
        info: std::ptr::addr_of_mut!(info) as u64,
    };
    // SAFETY: `attr.info` points at `info_len` writable bytes; every pointer
    // field of `info` is zero, so the kernel writes nothing elsewhere.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            std::ptr::addr_of_mut!(attr),
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(skipped_from(&info, attr.info_len))
}

/// The field, if the kernel's `bpf_prog_info` (it answers with its own
/// length) reaches it, else 0: such a kernel counts no skipped run.
fn skipped_from(info: &bpf_prog_info, kernel_len: u32) -> u64 {
    let end = std::mem::offset_of!(bpf_prog_info, recursion_misses) + 8;
    if kernel_len as usize >= end {
        info.recursion_misses
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shorter_kernel_struct_counts_nothing() {
        // SAFETY: as above.
        let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
        info.recursion_misses = 7;
        let end = std::mem::offset_of!(bpf_prog_info, recursion_misses) as u32 + 8;
        assert_eq!(skipped_from(&info, end), 7);
        assert_eq!(skipped_from(&info, end - 8), 0);
        // 5.10's struct ends at run_cnt, right before the field.
        let old = std::mem::offset_of!(bpf_prog_info, run_cnt) as u32 + 8;
        assert_eq!(skipped_from(&info, old), 0);
    }
}
