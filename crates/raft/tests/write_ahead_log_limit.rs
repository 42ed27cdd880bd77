//! The write-ahead log's limit, end to end: one node's Raft groups on a small log.
//!
//! Guards the wedge fixed in `Groups::snapshot_when_pinning`: a group gone idle after a bulk
//! load kept openraft's post-snapshot tail (`max_in_snapshot_log_to_keep` entries), too much to
//! copy forward, in the oldest segment; segments are reused oldest first, so once the other
//! groups had written up to the limit every write on the node waited forever. After a restart
//! the snapshot point is already the applied index: no snapshot, so no purge, followed an ask.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use capdb_cluster::{GroupId, MetaCommand, NodeInfo};
use capdb_raft::groups::default_raft_config;
use capdb_raft::{Groups, GroupsConfig};
use capdb_storage::disk::DiskEngine;
use capdb_storage::wal::WalConfig;
use capdb_types::mutation::{Condition, ExpiryUpdate};
use capdb_types::{Error, Hlc, KeyspaceName, KeyspaceSpec, Mode, Mutation};
use futures::StreamExt;

/// A small log: a segment's live entries are copied forward up to 16 KiB (a quarter), and a
/// group is asked to snapshot at a segment switch once 512 KiB (a quarter) is in use.
const WAL: WalConfig = WalConfig {
    segment_bytes: 64 << 10,
    bytes_max: 2 << 20,
};
/// Snapshots every 2,000 entries, keeping a tail of 100: the busy group purges its own log
/// well within the limit, while the idle group's tail of 100 entries of 1 KiB fills segments.
const SNAPSHOT_LOGS: u64 = 2_000;
/// Longest a write or a condition may take on a loaded machine (the wedge is forever).
const WAIT_MAX: Duration = Duration::from_secs(20);

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let since = Instant::now();
    while !done() {
        assert!(since.elapsed() < WAIT_MAX, "waited {WAIT_MAX:?} for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts node 1 alone on `dir` with a keyspace of two shards (created on the first start);
/// returns its groups and the shards' groups, both led here.
async fn start(dir: &Path) -> (Arc<Groups>, DiskEngine, [GroupId; 2]) {
    let hlc = Arc::new(Hlc::new());
    let engine = DiskEngine::open_with_wal(dir, hlc.clone(), 1 << 20, WAL).unwrap();
    let config = GroupsConfig {
        me: 1,
        initial_cluster: [(1, "127.0.0.1:1".to_string())].into(),
        join: Vec::new(),
        raft: Arc::new(default_raft_config(SNAPSHOT_LOGS).validate().unwrap()),
        unsafe_local_reads: false,
        apply_duplicates: false,
        unsafe_txn: false,
    };
    let groups = Groups::start(config, engine.clone(), hlc, Default::default())
        .await
        .unwrap();
    wait_until("a meta leader", || groups.leads_meta()).await;
    let name = KeyspaceName::new("bulk").unwrap();
    if !groups.cluster().keyspaces.contains_key(&name) {
        let node = NodeInfo {
            id: 1,
            peer_addr: "127.0.0.1:1".into(),
            resp_addr: String::new(),
            http_addr: String::new(),
            labels: Default::default(),
            draining: false,
        };
        groups
            .propose_meta(MetaCommand::UpsertNode(node))
            .await
            .unwrap();
        let spec = KeyspaceSpec::new(name.clone(), Mode::Cp, Some(1), Some(2), None, None).unwrap();
        let replicas = vec![vec![1], vec![1]];
        let create = MetaCommand::CreateKeyspace { spec, replicas };
        groups.propose_meta(create).await.unwrap();
    }
    let state = groups.cluster();
    let shards = &state.keyspaces[&name].shards;
    let ids = [shards[0].group, shards[1].group];
    groups.follow_map(&state).await.unwrap();
    wait_until("shard leaders", || ids.iter().all(|&g| groups.leads(g))).await;
    (groups, engine, ids)
}

/// Sets keys `{prefix}0..{prefix}{n - 1}` to values of `value_bytes`, 16 at a time. Each must be
/// applied within [`WAIT_MAX`]: one the router gives up on (its deadline is 3 s) is sent again.
async fn write(groups: &Groups, group: GroupId, prefix: &str, n: usize, value_bytes: usize) {
    let value = &Bytes::from(vec![b'v'; value_bytes]);
    let set = |key: String| async move {
        let mut last = None;
        let tries = async {
            loop {
                let set = Mutation::Set {
                    key: key.clone().into(),
                    value: value.clone(),
                    condition: Condition::Always,
                    expiry: ExpiryUpdate::Clear,
                    return_old: false,
                };
                let now_ms = capdb_types::unix_now_ms();
                match groups.write_mutations(group, vec![set], now_ms).await {
                    Ok(replies) => {
                        assert!(replies[0].is_ok(), "{replies:?}");
                        return;
                    }
                    Err(e @ (Error::Unavailable(_) | Error::OutcomeUnknown(_))) => last = Some(e),
                    Err(e) => panic!("set {key} in group {group}: {e}"),
                }
            }
        };
        if tokio::time::timeout(WAIT_MAX, tries).await.is_err() {
            panic!("set {key} in group {group} not applied in {WAIT_MAX:?}: {last:?}");
        }
    };
    futures::stream::iter(0..n)
        .for_each_concurrent(16, |i| set(format!("{prefix}{i}")))
        .await;
}

/// Group A loads 300 entries of ~1 KiB and goes idle: its tail (100 entries) is far more than
/// a segment's copy-forward share. Then group B writes until the log has written more than its
/// limit (so segments were reused), optionally after a restart of the node in between.
async fn bulk_load_then_write_elsewhere(restart: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (mut groups, mut engine, [a, b]) = start(dir.path()).await;
    write(&groups, a, "a", 300, 1_000).await;
    if restart {
        groups.shutdown().await;
        let closed = engine.closed();
        drop((groups, engine));
        let clean = tokio::task::spawn_blocking(move || closed.wait(WAIT_MAX));
        assert!(clean.await.unwrap(), "the engine closed");
        (groups, engine, _) = start(dir.path()).await;
    }
    let written = || engine.wal().stats().bytes.load(Ordering::Relaxed);
    let target = written() + WAL.bytes_max + WAL.bytes_max / 4;
    let mut round = 0;
    while written() < target {
        write(&groups, b, &format!("b{round}-"), 256, 200).await;
        round += 1;
    }
    assert!(engine.wal().file_bytes() <= WAL.bytes_max);
    groups.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_group_with_a_large_log_tail_does_not_wedge_the_write_ahead_log() {
    bulk_load_then_write_elsewhere(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_group_with_a_large_log_tail_does_not_wedge_the_write_ahead_log_after_a_restart() {
    bulk_load_then_write_elsewhere(true).await;
}
