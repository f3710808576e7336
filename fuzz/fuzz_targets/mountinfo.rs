//! /proc/self/mountinfo is kernel output, but its mount points are user-chosen paths with
//! escapes: the parser must never panic on any text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = proxy::cgroup::find_cgroup2_mount(text);
    }
});
