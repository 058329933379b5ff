//! topoplace's file formats: the `Cluster` and `Workload` YAML files ([`files`]), CSV tables
//! with located errors ([`files::table`]), and converters from public cluster data
//! ([`convert`]). Everything here turns text into the engine's types, with errors that name
//! the file, line, column and field; nothing here decides a placement.

pub mod convert;
pub mod files;
