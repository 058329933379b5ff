//! The cluster file reader: YAML text to a validated cluster. Every error is a value naming the
//! file, line and field; nothing panics; a file that parses renders back to one that parses.
#![no_main]
use libfuzzer_sys::fuzz_target;
use topoplace_formats::files::cluster;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(spec) = cluster::parse("fuzz.yaml", text) {
        if let Ok(rendered) = cluster::render(&spec) {
            if let Err(error) = cluster::parse("rendered.yaml", &rendered) {
                panic!("a parsed cluster renders to a file that does not parse: {error}\n{rendered}");
            }
        }
        let _ = topoplace_engine::topology::Cluster::build(spec);
    }
});
