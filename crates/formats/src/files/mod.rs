//! The YAML file formats (`kind: Cluster`, `kind: Workload`, apiVersion
//! `topoplace.io/v1alpha1`): parsed strictly (unknown fields are errors) and turned into
//! the core's [`ClusterSpec`] and [`Workload`]. Every error names the file, the line and
//! column, the field path and, where there is one, the node or gang.

pub mod cluster;
pub mod table;
pub mod workload;

use std::path::Path;

use thiserror::Error;

pub const API_VERSION: &str = "topoplace.io/v1alpha1";
/// Input files larger than this are refused before parsing.
pub const INPUT_FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// An input file that could not be used; `Display` is `file:line:column: message`.
#[derive(Debug, Error, PartialEq)]
#[error("{file}{}: {message}", location_suffix(*line, *column))]
pub struct FileError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

fn location_suffix(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!(":{line}:{column}"),
        (Some(line), None) => format!(":{line}"),
        _ => String::new(),
    }
}

impl FileError {
    pub fn new(file: &str, message: impl Into<String>) -> Self {
        FileError { file: file.to_string(), line: None, column: None, message: message.into() }
    }

    pub fn at_line(file: &str, line: Option<usize>, message: impl Into<String>) -> Self {
        FileError { file: file.to_string(), line, column: None, message: message.into() }
    }

    /// From a YAML error: its location, and its message without the location suffix
    /// (which `Display` already shows in front). When the failing field is inside an entry of
    /// one of the lists `spec.nodes`, `spec.nodeGroups` or `spec.gangs`, the entry's name is
    /// added, read from the error's path as data.
    fn from_yaml(file: &str, text: &str, error: &serde_path_to_error::Error<serde_yaml_ng::Error>) -> Self {
        let inner = error.inner();
        let location = inner.location();
        let mut message = inner.to_string();
        if let Some(cut) = message.rfind(" at line ") {
            message.truncate(cut);
        }
        if let Some((list, name)) = entry_of(text, error.path()) {
            message = format!("{message} ({} `{name}`)", list.trim_end_matches('s'));
        }
        FileError {
            file: file.to_string(),
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
            message,
        }
    }
}

/// Deserializes YAML `text`, keeping the path to a field that fails (see
/// [`FileError::from_yaml`]).
pub(crate) fn from_yaml_str<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T, FileError> {
    serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(text))
        .map_err(|error| FileError::from_yaml(file, text, &error))
}

/// The lists whose entries carry a `name` (or `namePattern`) to name in errors.
const NAMED_LISTS: [&str; 3] = ["nodes", "nodeGroups", "gangs"];

/// For a path `spec.LIST[i]...` into one of [`NAMED_LISTS`], the list and entry i's name.
fn entry_of(text: &str, path: &serde_path_to_error::Path) -> Option<(&'static str, String)> {
    use serde_path_to_error::Segment;
    let mut segments = path.iter();
    let (Some(Segment::Map { key: spec }), Some(Segment::Map { key: list }), Some(Segment::Seq { index })) =
        (segments.next(), segments.next(), segments.next())
    else {
        return None;
    };
    let list = NAMED_LISTS.into_iter().find(|named| spec == "spec" && list == named)?;
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).ok()?;
    let entry = value.get("spec")?.get(list)?.get(*index)?;
    let name = entry.get("name").or_else(|| entry.get("namePattern")).and_then(|n| n.as_str())?;
    Some((list, name.to_string()))
}

/// The 1-based lines that give `name`: as the value of a `name:` or `namePattern:` key
/// and, with `list_entries`, as a `- NAME` entry of a list (a node group's `names`).
pub fn lines_naming<'a>(text: &'a str, name: &'a str, list_entries: bool) -> impl Iterator<Item = usize> + 'a {
    let unquote = |value: &str| value.trim().trim_matches(|c| c == '"' || c == '\'').to_string();
    text.lines().enumerate().filter_map(move |(index, line)| {
        let after_dash = line.trim_start().strip_prefix("- ");
        let trimmed = after_dash.unwrap_or(line.trim_start()).trim_start();
        let keyed = ["name:", "namePattern:"].iter().any(|key| {
            trimmed.strip_prefix(key).is_some_and(|value| unquote(value.split(" #").next().unwrap_or("")) == name)
        });
        let listed = list_entries && after_dash.is_some_and(|value| unquote(value) == name);
        (keyed || listed).then_some(index + 1)
    })
}

/// The line of the `name:` (or `namePattern:`) entry whose value is `name`: where a
/// semantic error about that node or gang points.
pub fn line_of_name(text: &str, name: &str) -> Option<usize> {
    lines_naming(text, name, false).next()
}

/// Line of the `- NAME` entry in a `names:` list (nodes of a group).
pub fn line_of_list_entry(text: &str, value: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            line.trim_start()
                .strip_prefix("- ")
                .is_some_and(|v| v.trim().trim_matches(|c| c == '"' || c == '\'') == value)
        })
        .map(|index| index + 1)
}

/// Reads a file, refusing directories, missing files and files over the size limit.
pub fn read_input(path: &Path) -> Result<String, FileError> {
    let shown = path.display().to_string();
    let metadata = std::fs::metadata(path).map_err(|e| FileError::new(&shown, format!("cannot read: {e}")))?;
    if !metadata.is_file() {
        return Err(FileError::new(&shown, "is not a regular file"));
    }
    if metadata.len() > INPUT_FILE_BYTES_MAX {
        return Err(FileError::new(
            &shown,
            format!("is {} bytes, over the limit of {INPUT_FILE_BYTES_MAX}", metadata.len()),
        ));
    }
    std::fs::read_to_string(path).map_err(|e| FileError::new(&shown, format!("cannot read: {e}")))
}

/// Checks `apiVersion` and `kind` before the body is parsed, so a workload given as a
/// cluster says so instead of listing missing fields.
fn check_header(file: &str, text: &str, kind: &str) -> Result<(), FileError> {
    #[derive(serde::Deserialize)]
    struct Header {
        #[serde(rename = "apiVersion")]
        api_version: Option<String>,
        kind: Option<String>,
    }
    let header: Header = from_yaml_str(file, text)?;
    let line = |key: &str| text.lines().position(|l| l.starts_with(key)).map(|i| i + 1);
    match header.api_version.as_deref() {
        Some(API_VERSION) => {}
        Some(other) => {
            return Err(FileError::at_line(
                file,
                line("apiVersion:"),
                format!("apiVersion is `{other}`, expected `{API_VERSION}`"),
            ))
        }
        None => return Err(FileError::new(file, format!("apiVersion is missing (expected `{API_VERSION}`)"))),
    }
    match header.kind.as_deref() {
        Some(k) if k == kind => Ok(()),
        Some(other) => Err(FileError::at_line(file, line("kind:"), format!("kind is `{other}`, expected `{kind}`"))),
        None => Err(FileError::new(file, format!("kind is missing (expected `{kind}`)"))),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
}
