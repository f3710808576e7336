//! The first bytes of every intercepted connection are untrusted: classification must never
//! panic, and a decision must be final (more bytes never change a `Done` verdict), which
//! `detect` relies on when it stops peeking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::detect::{Protocol, Verdict, classify, classify_final};

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    let fin = classify_final(data);
    match &whole {
        Verdict::Done(p) => assert_eq!(&fin, p),
        Verdict::NeedMore => assert_eq!(fin, Protocol::Opaque),
    }
    // Every prefix that was decided must have decided the same as the whole input. Checking
    // every prefix is quadratic: the short ones (headers, the TLS record header, the HTTP/2
    // preface) and a few proportional split points cover the invariant.
    let len = data.len();
    let splits = (0..=24).chain([len / 4, len / 2, len.saturating_sub(1)]);
    for k in splits {
        if let Some(prefix) = data.get(..k)
            && let Verdict::Done(p) = classify(prefix)
        {
            assert_eq!(
                whole,
                Verdict::Done(p),
                "a {k}-byte prefix decided otherwise"
            );
        }
    }
});
