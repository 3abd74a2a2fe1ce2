#![no_main]

use libfuzzer_sys::fuzz_target;

// The first byte picks the table kind, so one corpus covers both parsers.
fuzz_target!(|data: &[u8]| {
    if let Some((&kind, rest)) = data.split_first() {
        if let Ok(text) = std::str::from_utf8(rest) {
            let _ = ctwatch::decode::socket_table(text, kind & 1 == 1);
        }
    }
});
