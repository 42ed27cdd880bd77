//! openraft's storage conformance suite, run against capdb's log store and state machine on the
//! real storage engine (one fresh redb file per sub-test).

use std::sync::Arc;

use capdb_raft::command::TypeConfig;
use capdb_raft::log_store::LogStore;
use capdb_raft::state_machine::{Kind, StateMachine};
use capdb_storage::disk::DiskEngine;
use capdb_types::Hlc;
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let io = |e: &dyn std::fmt::Display| {
            StorageError::write(TypeConfig::err_from_string(e.to_string()))
        };
        let dir = tempfile::tempdir().map_err(|e| io(&e))?;
        let engine =
            DiskEngine::open(dir.path(), Arc::new(Hlc::new()), 1 << 20).map_err(|e| io(&e))?;
        let log = LogStore::open(engine.clone(), 7)
            .await
            .map_err(|e| io(&e))?;
        let sm = StateMachine::open(
            engine,
            7,
            Kind::Data {
                table: "shard/7".into(),
            },
        )
        .map_err(|e| io(&e))?;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_store_and_state_machine_pass_openraft_suite() {
    Suite::test_all(Builder).await.unwrap();
}

/// A committed index saved past the end of the log this node kept (a storage failure let the
/// hint land without the entries it covers) reads back as unknown, not as a claim openraft
/// would try to re-apply from entries that are not there (the group could never start).
#[tokio::test]
async fn a_committed_index_past_the_kept_log_reads_as_unknown() {
    use openraft::storage::RaftLogStorage;
    let dir = tempfile::tempdir().unwrap();
    let engine = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), 1 << 20).unwrap();
    let mut log = LogStore::open(engine.clone(), 7).await.unwrap();
    log.save_committed(Some(openraft::testing::log_id::<TypeConfig>(1, 1, 5)))
        .await
        .unwrap();
    let saved = engine.meta_list("").unwrap();
    assert!(
        saved.iter().any(|(k, _)| k.ends_with("committed")),
        "the hint was stored: {saved:?}"
    );
    let mut reopened = LogStore::open(engine, 7).await.unwrap();
    assert_eq!(reopened.read_committed().await.unwrap(), None);
}

/// A log kept in redb by an earlier version (table `raftlog/{group}`) is moved into the
/// write-ahead log when the group opens: every entry above the purged watermark reads back,
/// the table is gone, and the entries survive a restart of the engine.
#[tokio::test]
async fn a_log_kept_in_redb_by_an_earlier_version_moves_into_the_write_ahead_log() {
    use openraft::storage::{RaftLogReader, RaftLogStorage};
    let dir = tempfile::tempdir().unwrap();
    let table = capdb_storage::layout::raft_log_table(7);
    let entries: Vec<_> = (1..=5)
        .map(|i| openraft::testing::blank_ent::<TypeConfig>(1, 1, i))
        .collect();
    {
        let engine = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), 1 << 20).unwrap();
        let records = entries
            .iter()
            .map(|e| (e.log_id.index, capdb_raft::log_store::encode_entry(e)))
            .collect();
        let (tx, rx) = tokio::sync::oneshot::channel();
        engine
            .log_append(&table, records, move |r| {
                let _ = tx.send(r);
            })
            .await
            .unwrap();
        rx.await.unwrap().unwrap();
        let closed = engine.closed();
        drop(engine);
        assert!(closed.wait(std::time::Duration::from_secs(10)));
    }
    for _ in 0..2 {
        let engine = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), 1 << 20).unwrap();
        let mut log = LogStore::open(engine.clone(), 7).await.unwrap();
        assert_eq!(log.try_get_log_entries(0..10).await.unwrap(), entries);
        assert_eq!(
            log.get_log_state().await.unwrap().last_log_id,
            Some(entries[4].log_id)
        );
        assert!(
            engine.log_last(&table).unwrap().is_none(),
            "the redb table is gone"
        );
        let closed = engine.closed();
        drop((log, engine));
        assert!(closed.wait(std::time::Duration::from_secs(10)));
    }
}
