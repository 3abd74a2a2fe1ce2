#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|path: &str| {
    let _ = ctwatch::decode::cgroup_path(path);
});
