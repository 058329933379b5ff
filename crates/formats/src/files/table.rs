//! A CSV file read as a table: columns found by header name, every record with its line,
//! and typed cells whose errors name the file, the line and the column. Shared by the
//! trace readers.

use std::str::FromStr;

use super::FileError;

/// Rows of a CSV as (line, field by column name) with the header checked.
pub struct Table<'a> {
    pub file: &'a str,
    columns: Vec<(String, usize)>,
    pub records: Vec<(usize, csv::StringRecord)>,
}

impl<'a> Table<'a> {
    pub fn read(file: &'a str, text: &str, required: &[&str]) -> Result<Self, FileError> {
        let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(text.as_bytes());
        let header = reader.headers().map_err(|e| FileError::at_line(file, Some(1), e.to_string()))?.clone();
        let columns: Vec<(String, usize)> =
            header.iter().enumerate().map(|(index, name)| (name.trim().to_string(), index)).collect();
        for name in required {
            if !columns.iter().any(|(column, _)| column == name) {
                return Err(FileError::at_line(
                    file,
                    Some(1),
                    format!("missing column `{name}` (the header must name {})", required.join(", ")),
                ));
            }
        }
        let mut records = Vec::new();
        for record in reader.records() {
            let record = record.map_err(|e| {
                let line = e.position().map(|p| p.line() as usize);
                FileError::at_line(file, line, e.to_string())
            })?;
            let line = record.position().map_or(0, |p| p.line() as usize);
            records.push((line, record));
        }
        Ok(Table { file, columns, records })
    }

    pub fn text<'r>(&self, record: &'r csv::StringRecord, column: &str) -> Option<&'r str> {
        let index = self.columns.iter().find(|(name, _)| name == column)?.1;
        record.get(index).map(str::trim)
    }

    pub fn name(&self, line: usize, record: &csv::StringRecord, column: &str) -> Result<String, FileError> {
        match self.text(record, column) {
            Some(name) if !name.is_empty() => Ok(name.to_string()),
            _ => Err(FileError::at_line(self.file, Some(line), format!("column `{column}`: empty name"))),
        }
    }

    pub fn number<T: FromStr>(&self, line: usize, record: &csv::StringRecord, column: &str) -> Result<T, FileError> {
        let text = self.text(record, column).unwrap_or("");
        text.parse().map_err(|_| {
            FileError::at_line(self.file, Some(line), format!("column `{column}`: `{text}` is not a whole number >= 0"))
        })
    }
}
