//! BTF is read from a file at start-up: the parser must never panic, whatever the bytes, and
//! bytes after the sections the header names must not change an answer (the header alone
//! decides what is read).
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::ebpf::btf::member_offset;

fuzz_target!(|data: &[u8]| {
    // The seeds name these; the fuzzer's mutations of them reach the anonymous-member walk.
    for (strukt, member) in [("sock", "sk_user_data"), ("sk_psock", "msg_tot_len")] {
        if let Ok(offset) = member_offset(data, strukt, member) {
            let mut longer = data.to_vec();
            longer.extend_from_slice(&[0xff; 16]);
            assert_eq!(member_offset(&longer, strukt, member).ok(), Some(offset));
        }
    }
});
