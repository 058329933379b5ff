//! Readers of the public traces the replays use, into the replays' own types: `openb` (the
//! Alibaba GPU-sharing node and pod lists) and `elasticflow` (a job trace). Columns are found
//! by header name; errors give file:line and the column.

pub mod elasticflow;
pub mod openb;
