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
        let log = LogStore::open(engine.clone(), 7).map_err(|e| io(&e))?;
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
    let mut log = LogStore::open(engine.clone(), 7).unwrap();
    log.save_committed(Some(openraft::testing::log_id::<TypeConfig>(1, 1, 5)))
        .await
        .unwrap();
    let saved = engine.meta_list("").unwrap();
    assert!(
        saved.iter().any(|(k, _)| k.ends_with("committed")),
        "the hint was stored: {saved:?}"
    );
    let mut reopened = LogStore::open(engine, 7).unwrap();
    assert_eq!(reopened.read_committed().await.unwrap(), None);
}
