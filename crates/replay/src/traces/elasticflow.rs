//! The job traces of microsoft/elasticflow-traces (`clusterNN.csv`:
//! `job_id,submission_time,duration,num_gpu`, seconds and GPUs) into the job replay's
//! [`TraceJob`]s. Columns are found by header name; every error names the file, the line
//! and the column, and a job id used twice names both lines.

use std::collections::HashMap;

use crate::jobs::TraceJob;
use topoplace_formats::files::table::Table;
use topoplace_formats::files::FileError;

pub const JOB_COLUMNS: [&str; 4] = ["job_id", "submission_time", "duration", "num_gpu"];

pub fn parse_jobs(file: &str, text: &str) -> Result<Vec<TraceJob>, FileError> {
    let table = Table::read(file, text, &JOB_COLUMNS)?;
    let mut jobs = Vec::with_capacity(table.records.len());
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for (line, record) in &table.records {
        let id = table.name(*line, record, "job_id")?;
        if let Some(earlier) = first_line.insert(id.clone(), *line) {
            return Err(FileError::at_line(file, Some(*line), format!("job `{id}` is already on line {earlier}")));
        }
        let gpus: u32 = table.number(*line, record, "num_gpu")?;
        if gpus == 0 {
            return Err(FileError::at_line(file, Some(*line), format!("job `{id}`: column `num_gpu` is 0")));
        }
        jobs.push(TraceJob {
            submit_s: table.number(*line, record, "submission_time")?,
            duration_s: table.number(*line, record, "duration")?,
            gpus,
            id,
        });
    }
    if jobs.is_empty() {
        return Err(FileError::new(file, "no jobs"));
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_read_by_header_name() {
        let text = "num_gpu,job_id,duration,submission_time\n8,a,100,5\n64,b,7,6\n";
        let jobs = parse_jobs("c.csv", text).unwrap();
        let shape: Vec<(&str, u64, u64, u32)> =
            jobs.iter().map(|j| (j.id.as_str(), j.submit_s, j.duration_s, j.gpus)).collect();
        assert_eq!(shape, vec![("a", 5, 100, 8), ("b", 6, 7, 64)]);
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let header = "job_id,submission_time,duration,num_gpu\n";
        let error = parse_jobs("c.csv", &format!("{header}a,1,2,8\nb,1,-2,8\n")).unwrap_err();
        assert_eq!(error.to_string(), "c.csv:3: column `duration`: `-2` is not a whole number >= 0");
        let error = parse_jobs("c.csv", &format!("{header}a,1,2,8\na,3,2,8\n")).unwrap_err();
        assert_eq!(error.to_string(), "c.csv:3: job `a` is already on line 2");
        let error = parse_jobs("c.csv", &format!("{header}a,1,2,0\n")).unwrap_err();
        assert_eq!(error.to_string(), "c.csv:2: job `a`: column `num_gpu` is 0");
        let error = parse_jobs("c.csv", "job_id,submission_time,num_gpu\na,1,2\n").unwrap_err();
        assert!(error.to_string().starts_with("c.csv:1: missing column `duration`"), "{error}");
        let error = parse_jobs("c.csv", header).unwrap_err();
        assert_eq!(error.to_string(), "c.csv: no jobs");
    }
}
