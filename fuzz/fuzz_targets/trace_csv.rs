//! The trace readers: the first byte picks openb's node or pod CSV or ElasticFlow's job CSV;
//! the rest is the file. Errors name the file, line and column; nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use topoplace_replay::traces::{elasticflow, openb};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    match which % 3 {
        0 => {
            let _ = openb::parse_nodes("fuzz.csv", text);
        }
        1 => {
            let _ = openb::parse_pods("fuzz.csv", text);
        }
        _ => {
            let _ = elasticflow::parse_jobs("fuzz.csv", text);
        }
    }
});
