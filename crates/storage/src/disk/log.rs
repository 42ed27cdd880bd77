//! Support for Raft groups, part 1: log tables (u64 index -> bytes). Raft groups keep their
//! log in one ([`crate::layout::raft_log_table`]), and `ap` keeps its hinted-handoff queues in
//! the same shape ([`crate::layout::hint_table`]). Part 2, replicated state machines, is in
//! `replicated.rs`.

use capdb_types::Result;
use redb::{ReadableTable, TableError};

use super::ops::{Op, Output};
use super::{DiskEngine, io_err, log_def, writer};

impl DiskEngine {
    /// Queues a log append and returns once it is queued (ordered after every earlier write);
    /// `done` runs after the append is durable (or failed).
    pub async fn log_append(
        &self,
        table: &str,
        records: Vec<(u64, Vec<u8>)>,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Result<()> {
        let answer = self
            .enqueue(Op::LogAppend {
                table: table.to_string(),
                records,
            })
            .await?;
        tokio::spawn(async move {
            done(writer::answer(answer.await).and_then(Output::into_done));
        });
        Ok(())
    }

    /// Deletes log records `from..=to` (`None`: to the end) and waits until that is durable.
    pub async fn log_remove(&self, table: &str, from: u64, to: Option<u64>) -> Result<()> {
        self.submit(Op::LogRemove {
            table: table.to_string(),
            from,
            to,
        })
        .await?
        .into_done()
    }

    /// Log records with index in `from..to`, in order.
    pub fn log_read(&self, table: &str, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let txn = self.begin_read()?;
        let t = match txn.open_table(log_def(table)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(io_err(e)),
        };
        let mut out = Vec::new();
        for entry in t.range(from..to).map_err(io_err)? {
            let (k, v) = entry.map_err(io_err)?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// The first record of a log table.
    pub fn log_first(&self, table: &str) -> Result<Option<(u64, Vec<u8>)>> {
        let txn = self.begin_read()?;
        let t = match txn.open_table(log_def(table)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let first = t.first().map_err(io_err)?;
        Ok(first.map(|(k, v)| (k.value(), v.value().to_vec())))
    }

    /// The last record of a log table.
    pub fn log_last(&self, table: &str) -> Result<Option<(u64, Vec<u8>)>> {
        let txn = self.begin_read()?;
        let t = match txn.open_table(log_def(table)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let last = t.last().map_err(io_err)?;
        Ok(last.map(|(k, v)| (k.value(), v.value().to_vec())))
    }
}
