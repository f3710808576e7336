//! Config files are operator input: any bytes must yield a config or an error, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use proxy::config::{Config, File, Overrides};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = File::parse(Path::new("fuzz.toml"), text)
        && let Ok(cfg) = Config::resolve(file, Overrides::default())
    {
        let _ = cfg.require_interception();
    }
});
