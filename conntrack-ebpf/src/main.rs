//! ctwatch kernel programs. One file per kernel hook under `probes/`; the
//! shared decoding and map helpers live in `common.rs`.
#![no_std]
#![no_main]

mod common;
mod probes;
mod skb;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program; the verifier rejects real panics.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
