//! A `cp` shard as a participant of cross-shard transactions (`disk/txn.rs`): what each step
//! does to its locks, records and data, and how the shard's other writes and reads meet the
//! locks. Every step is applied as the state machine applies a log entry.

use std::sync::Arc;

use bytes::Bytes;
use capdb_storage::KeyspaceStore;
use capdb_storage::disk::{DiskEngine, RECORD_RETAIN_MS, TxnAnswer, TxnJob, WatchGuard};
use capdb_types::mutation::{Condition, ExpiryUpdate};
use capdb_types::txn::{LockMode, Outcome, Prepare, Refusal, ShardStep, TxnId};
use capdb_types::{Error, Hlc, Mutation, Reply, Timestamp};

const VALUE_MAX: usize = 1 << 20;
const TABLE: &str = "shard/9";
const NOW: u64 = 1_000_000;

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_string())
}

fn set(k: &str, v: &str) -> Mutation {
    Mutation::Set {
        key: b(k),
        value: b(v),
        condition: Condition::Always,
        expiry: ExpiryUpdate::Clear,
        return_old: false,
    }
}

fn incr(k: &str) -> Mutation {
    Mutation::IncrBy {
        key: b(k),
        delta: 1,
    }
}

fn get(k: &str) -> Mutation {
    Mutation::Exec {
        key: b(k),
        args: vec![b("capdb.get"), b(k)],
    }
}

fn id(seq: u64) -> TxnId {
    TxnId {
        origin: 1,
        epoch: 7,
        seq,
    }
}

fn open() -> (tempfile::TempDir, DiskEngine) {
    let dir = tempfile::tempdir().unwrap();
    let engine = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), VALUE_MAX).unwrap();
    (dir, engine)
}

/// A prepare of `commands`, locking `keys`, with a deadline well after [`NOW`].
fn prepare(commands: Vec<Mutation>, keys: &[(&str, LockMode)]) -> ShardStep<Mutation, WatchGuard> {
    ShardStep::Prepare(Prepare {
        anchor: 9,
        participants: vec![9, 10],
        commands,
        keys: keys.iter().map(|(k, m)| (b(k), *m)).collect(),
        guards: Vec::new(),
        deadline_ms: NOW + 2_000,
        committed_first: Vec::new(),
    })
}

/// Applies `step` of `txn` as the entry at log `index`, at `now_ms`.
async fn step_at(
    e: &DiskEngine,
    txn: TxnId,
    step: ShardStep<Mutation, WatchGuard>,
    index: u64,
    now_ms: u64,
) -> Result<TxnAnswer, Error> {
    let job = TxnJob {
        txn,
        step,
        timestamp: Timestamp(index),
        now_ms,
        index,
    };
    e.txn_step(TABLE, job, Vec::new(), None).await
}

async fn step(
    e: &DiskEngine,
    txn: TxnId,
    step: ShardStep<Mutation, WatchGuard>,
    index: u64,
) -> TxnAnswer {
    step_at(e, txn, step, index, NOW).await.unwrap()
}

/// Applies plain mutations as the entry at `index`.
async fn write(e: &DiskEngine, index: u64, mutations: Vec<Mutation>) -> Vec<Result<Reply, Error>> {
    let m = mutations
        .into_iter()
        .map(|m| (m, Timestamp(index), NOW, index))
        .collect();
    e.apply_replicated(TABLE, m, Vec::new(), Vec::new(), Vec::new(), Vec::new())
        .await
        .unwrap()
}

fn value(e: &DiskEngine, k: &str) -> Option<Bytes> {
    e.table(TABLE, false)
        .get(k.as_bytes(), NOW)
        .unwrap()
        .map(|v| v.data)
}

fn locked(e: &DiskEngine, k: &str) -> bool {
    e.table(TABLE, false)
        .write_locked(&[b(k)])
        .unwrap()
        .is_some()
}

#[tokio::test]
async fn a_prepare_answers_the_replies_and_locks_and_the_commit_applies_and_unlocks() {
    let (_d, e) = open();
    write(&e, 1, vec![set("a", "1")]).await;
    let yes = step(
        &e,
        id(1),
        prepare(vec![incr("a"), get("a")], &[("a", LockMode::Write)]),
        2,
    )
    .await;
    assert_eq!(yes.outcome, Outcome::Yes(Timestamp(2)));
    assert_eq!(
        yes.replies,
        Some(vec![Ok(Reply::Integer(2)), Ok(Reply::Bulk(b("2")))]),
        "the vote carries the replies"
    );
    assert_eq!(value(&e, "a"), Some(b("1")), "nothing applied at prepare");
    let again = step(
        &e,
        id(1),
        prepare(vec![incr("a"), get("a")], &[("a", LockMode::Write)]),
        3,
    )
    .await;
    assert_eq!(
        again, yes,
        "a repeated prepare answers the same and runs nothing"
    );
    assert!(locked(&e, "a"));
    let open = e.table(TABLE, false).open_txns(NOW).unwrap();
    assert_eq!((open.prepared, open.orphans.len()), (1, 0));

    let done = step(&e, id(1), ShardStep::Commit { ts: Timestamp(2) }, 4).await;
    assert_eq!(done.outcome, Outcome::Committed(Timestamp(2)));
    assert_eq!(done.replies, yes.replies);
    assert_eq!(value(&e, "a"), Some(b("2")));
    assert!(!locked(&e, "a"));
    assert_eq!(e.table(TABLE, false).open_txns(NOW).unwrap().prepared, 0);

    // A repeated commit (a lost answer) answers the same and applies nothing again.
    let again = step(&e, id(1), ShardStep::Commit { ts: Timestamp(2) }, 5).await;
    assert_eq!(again, done);
    assert_eq!(value(&e, "a"), Some(b("2")));
}

#[tokio::test]
async fn a_locked_key_refuses_plain_writes_whole_and_conflicting_prepares() {
    let (_d, e) = open();
    step(
        &e,
        id(1),
        prepare(vec![set("a", "t")], &[("a", LockMode::Write)]),
        1,
    )
    .await;
    // One entry with a free key and a locked one: refused whole, nothing applied.
    let replies = write(&e, 2, vec![set("free", "1"), set("a", "plain")]).await;
    assert!(
        replies.iter().all(|r| matches!(r, Err(Error::Locked(_)))),
        "{replies:?}"
    );
    assert_eq!(value(&e, "free"), None);
    // Another entry of the same batch, on free keys only, applies.
    assert_eq!(
        write(&e, 3, vec![set("free", "1")]).await,
        vec![Ok(Reply::Ok)]
    );
    // Another transaction wanting the key votes no and holds nothing.
    let no = step(
        &e,
        id(2),
        prepare(vec![set("a", "u")], &[("a", LockMode::Read)]),
        4,
    )
    .await;
    assert!(
        matches!(&no.outcome, Outcome::No(Refusal::Locked(c)) if c.holder == id(1)),
        "{no:?}"
    );
    // Aborting the first releases the key: plain writes go through again.
    let aborted = step(&e, id(1), ShardStep::Abort, 5).await;
    assert_eq!(aborted.outcome, Outcome::Aborted);
    assert_eq!(value(&e, "a"), None, "the staged write is dropped");
    assert_eq!(
        write(&e, 6, vec![set("a", "plain")]).await,
        vec![Ok(Reply::Ok)]
    );
}

#[tokio::test]
async fn read_locks_are_shared_and_let_plain_reads_through_but_not_writes() {
    let (_d, e) = open();
    write(&e, 1, vec![set("r", "v")]).await;
    let one = step(
        &e,
        id(1),
        prepare(vec![get("r")], &[("r", LockMode::Read)]),
        2,
    )
    .await;
    let two = step(
        &e,
        id(2),
        prepare(vec![get("r")], &[("r", LockMode::Read)]),
        3,
    )
    .await;
    assert!(matches!(one.outcome, Outcome::Yes(_)));
    assert!(matches!(two.outcome, Outcome::Yes(_)));
    assert!(!locked(&e, "r"), "a read lock keeps no reader waiting");
    let replies = write(&e, 4, vec![set("r", "w")]).await;
    assert!(matches!(replies[0], Err(Error::Locked(_))), "{replies:?}");
    let done = step(&e, id(1), ShardStep::Commit { ts: Timestamp(3) }, 5).await;
    assert_eq!(done.replies, Some(vec![Ok(Reply::Bulk(b("v")))]));
    step(&e, id(2), ShardStep::Commit { ts: Timestamp(3) }, 6).await;
    assert_eq!(write(&e, 7, vec![set("r", "w")]).await, vec![Ok(Reply::Ok)]);
}

#[tokio::test]
async fn a_prevent_before_the_prepare_makes_the_prepare_vote_no() {
    let (_d, e) = open();
    let prevented = step(&e, id(1), ShardStep::Prevent, 1).await;
    assert_eq!(prevented.outcome, Outcome::No(Refusal::Prevented));
    let late = step(
        &e,
        id(1),
        prepare(vec![set("a", "t")], &[("a", LockMode::Write)]),
        2,
    )
    .await;
    assert_eq!(late.outcome, Outcome::No(Refusal::Prevented));
    assert!(!locked(&e, "a"));
    // A prevent after a YES vote reports the vote and changes nothing.
    step(
        &e,
        id(2),
        prepare(vec![set("b", "t")], &[("b", LockMode::Write)]),
        3,
    )
    .await;
    let seen = step(&e, id(2), ShardStep::Prevent, 4).await;
    assert_eq!(seen.outcome, Outcome::Yes(Timestamp(3)));
    assert!(locked(&e, "b"));
}

#[tokio::test]
async fn a_prepare_after_its_deadline_is_refused_and_a_commit_without_a_yes_is_a_violation() {
    let (_d, e) = open();
    let late = step_at(
        &e,
        id(1),
        prepare(vec![set("a", "t")], &[("a", LockMode::Write)]),
        1,
        NOW + 5_000,
    )
    .await
    .unwrap();
    assert_eq!(late.outcome, Outcome::No(Refusal::Prevented));
    let violation = step_at(&e, id(3), ShardStep::Commit { ts: Timestamp(1) }, 2, NOW).await;
    assert!(
        matches!(violation, Err(Error::InvalidInput(_))),
        "{violation:?}"
    );
    assert_eq!(value(&e, "a"), None);
}

#[tokio::test]
async fn a_prepared_transaction_past_its_deadline_is_an_orphan_with_its_participants() {
    let (_d, e) = open();
    step(
        &e,
        id(1),
        prepare(vec![set("a", "t")], &[("a", LockMode::Write)]),
        1,
    )
    .await;
    let open = e.table(TABLE, false).open_txns(NOW + 2_001).unwrap();
    assert_eq!(open.orphans.len(), 1);
    assert_eq!(open.orphans[0].txn, id(1));
    assert_eq!(open.orphans[0].participants, vec![9, 10]);
    assert_eq!(open.earliest_deadline_ms, Some(NOW + 2_000));
}

#[tokio::test]
async fn decided_records_are_dropped_after_their_retention() {
    let (_d, e) = open();
    step(
        &e,
        id(1),
        prepare(vec![set("a", "t")], &[("a", LockMode::Write)]),
        1,
    )
    .await;
    step(&e, id(1), ShardStep::Commit { ts: Timestamp(1) }, 2).await;
    // Within the retention a repeated commit still finds the record.
    let again = step(&e, id(1), ShardStep::Commit { ts: Timestamp(1) }, 3).await;
    assert_eq!(again.outcome, Outcome::Committed(Timestamp(1)));
    // Any step after the retention drops it (here another transaction's prevent); a commit
    // then finds nothing to commit.
    let later = NOW + RECORD_RETAIN_MS + 1;
    step_at(&e, id(2), ShardStep::Prevent, 4, later)
        .await
        .unwrap();
    let gone = step_at(&e, id(1), ShardStep::Commit { ts: Timestamp(1) }, 5, later).await;
    assert!(matches!(gone, Err(Error::InvalidInput(_))), "{gone:?}");
    assert_eq!(value(&e, "a"), Some(b("t")), "the committed write stays");
}

#[tokio::test]
async fn a_watch_guard_that_failed_votes_no() {
    let (_d, e) = open();
    // A watch point at 1 turns change recording on; a write at 2 changes the key.
    e.apply_replicated(
        TABLE,
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        vec![1],
    )
    .await
    .unwrap();
    write(&e, 2, vec![set("w", "changed")]).await;
    let ShardStep::Prepare(mut p) = prepare(vec![set("a", "t")], &[("a", LockMode::Write)]) else {
        unreachable!()
    };
    p.guards = vec![WatchGuard {
        key: b("w"),
        index: 1,
        since_ms: NOW,
        until_ms: NOW,
    }];
    let no = step(&e, id(1), ShardStep::Prepare(p.clone()), 3).await;
    assert!(
        matches!(&no.outcome, Outcome::No(Refusal::WatchFailed { key }) if key == "w"),
        "{no:?}"
    );
    assert!(!locked(&e, "a"));
    // Watched after the change: holds.
    p.guards[0].index = 2;
    let yes = step(&e, id(2), ShardStep::Prepare(p), 4).await;
    assert!(matches!(yes.outcome, Outcome::Yes(_)), "{yes:?}");
}

fn del(k: &str) -> Mutation {
    Mutation::Delete { key: b(k) }
}

fn cmd(words: &str) -> Mutation {
    let args: Vec<Bytes> = words.split(' ').map(b).collect();
    Mutation::Exec {
        key: args.get(1).cloned().unwrap_or_default(),
        args,
    }
}

fn query(e: &DiskEngine, words: &str) -> Reply {
    let args: Vec<Bytes> = words.split(' ').map(b).collect();
    e.table(TABLE, false).query(&args, NOW, 0).unwrap()
}

/// What a set of reads answers on an engine: the state a test compares.
fn state(e: &DiskEngine) -> Vec<Reply> {
    [
        "HGETALL h",
        "HGETALL h2",
        "LRANGE l 0 -1",
        "ZRANGE z 0 -1 WITHSCORES",
        "SMEMBERS s",
        "capdb.get a",
        "capdb.exists h h2 l z s a",
    ]
    .iter()
    .map(|q| query(e, q))
    .collect()
}

/// The same commands, prepared then committed as a participant, answer (at the prepare) and
/// leave (after the commit) exactly what they answer and leave run at once as a single-shard
/// transaction: the overlay they run on at the prepare reads its own writes, ranges over
/// collections it changed, and moves collections with RENAME.
#[tokio::test]
async fn commands_run_at_prepare_answer_and_leave_what_running_them_at_once_does() {
    let setup = vec![
        cmd("HSET h f1 a f2 b f3 c"),
        cmd("RPUSH l x y z"),
        cmd("ZADD z 1 m1 2 m2 3 m3"),
        cmd("SADD s p q"),
        set("a", "10"),
    ];
    let scripts: Vec<Vec<Mutation>> = vec![
        vec![
            cmd("HDEL h f2"),
            cmd("HSET h f4 d f1 A"),
            cmd("HGETALL h"),
            cmd("HLEN h"),
            cmd("RENAME h h2"),
            cmd("HGETALL h2"),
            cmd("EXISTS h"),
        ],
        vec![
            cmd("LPOP l"),
            cmd("RPUSH l w v"),
            cmd("LRANGE l 0 -1"),
            cmd("LINDEX l -1"),
            cmd("LREM l 0 w"),
            cmd("LRANGE l 1 2"),
        ],
        vec![
            cmd("ZADD z 0 m0 5 m2"),
            cmd("ZREM z m1"),
            cmd("ZRANGE z 0 1"),
            cmd("ZRANGE z 0 -1 REV WITHSCORES"),
            cmd("ZRANGEBYSCORE z 1 10 LIMIT 0 1"),
            cmd("ZPOPMIN z"),
        ],
        vec![
            del("h"),
            cmd("HSET h n 1"),
            cmd("HGETALL h"),
            cmd("SADD s r"),
            cmd("SREM s p"),
            cmd("SMEMBERS s"),
            cmd("SMOVE s s2 q"),
            cmd("RENAME s2 s"),
            cmd("SCARD s"),
        ],
        vec![
            incr("a"),
            Mutation::Append {
                key: b("a"),
                data: b("x"),
            },
            get("a"),
            Mutation::GetDel { key: b("a") },
            del("l"),
            cmd("LPUSH l n"),
            cmd("LRANGE l 0 -1"),
            cmd("HSET l f v"),
        ],
    ];
    for (n, script) in scripts.into_iter().enumerate() {
        let (_d1, at_once) = open();
        let (_d2, prepared) = open();
        for e in [&at_once, &prepared] {
            write(e, 1, setup.clone()).await;
        }
        let expected = write(&at_once, 2, script.clone()).await;
        let failed = expected.iter().filter(|r| r.is_err()).count();
        assert!(failed <= 1, "script {n} is meant to run: {expected:?}");
        let keys: Vec<(&str, LockMode)> = ["h", "h2", "l", "z", "s", "s2", "a"]
            .iter()
            .map(|k| (*k, LockMode::Write))
            .collect();
        let yes = step(&prepared, id(1), prepare(script, &keys), 2).await;
        assert_eq!(yes.replies.as_ref(), Some(&expected), "script {n}: replies");
        assert_ne!(
            state(&prepared),
            state(&at_once),
            "script {n}: applied early"
        );
        step(&prepared, id(1), ShardStep::Commit { ts: Timestamp(2) }, 3).await;
        assert_eq!(state(&prepared), state(&at_once), "script {n}: state");
    }
}

#[tokio::test]
async fn an_aborted_prepare_leaves_nothing_behind() {
    let (_d, e) = open();
    write(&e, 1, vec![cmd("HSET h f v"), set("a", "1")]).await;
    let before = state(&e);
    let yes = step(
        &e,
        id(1),
        prepare(
            vec![del("h"), cmd("RPUSH l x"), incr("a")],
            &[
                ("h", LockMode::Write),
                ("l", LockMode::Write),
                ("a", LockMode::Write),
            ],
        ),
        2,
    )
    .await;
    assert!(matches!(yes.outcome, Outcome::Yes(_)), "{yes:?}");
    let aborted = step(&e, id(1), ShardStep::Abort, 3).await;
    assert_eq!(aborted.outcome, Outcome::Aborted);
    assert_eq!(state(&e), before);
    assert!(!locked(&e, "h") && !locked(&e, "a"));
    // The collection id the aborted RPUSH took is not handed out again.
    write(&e, 4, vec![cmd("RPUSH l y")]).await;
    assert_eq!(
        query(&e, "LRANGE l 0 -1"),
        Reply::Array(vec![Reply::Bulk(b("y"))])
    );
}

/// A transaction takes its place in a shard's order at its prepare: a WATCH taken after the
/// prepare (before the commit is applied) does not count the commit as a change, one taken
/// before does.
#[tokio::test]
async fn a_commit_counts_as_a_change_at_its_prepare_for_watch() {
    let (_d, e) = open();
    let watch_point = |index| {
        e.apply_replicated(
            TABLE,
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            vec![index],
        )
    };
    watch_point(1).await.unwrap();
    step(
        &e,
        id(1),
        prepare(vec![set("a", "t")], &[("a", LockMode::Write)]),
        2,
    )
    .await;
    watch_point(3).await.unwrap();
    step(&e, id(1), ShardStep::Commit { ts: Timestamp(2) }, 4).await;
    let exec = |index: u64, watched_at: u64| {
        e.apply_replicated(
            TABLE,
            vec![(set("a", "u"), Timestamp(index), NOW, index)],
            Vec::new(),
            Vec::new(),
            vec![WatchGuard {
                key: b("a"),
                index: watched_at,
                since_ms: NOW,
                until_ms: NOW,
            }],
            Vec::new(),
        )
    };
    let before = exec(5, 1).await.unwrap();
    assert_eq!(
        before[0],
        Ok(Reply::NilArray),
        "watched before the prepare: aborts"
    );
    let after = exec(6, 3).await.unwrap();
    assert_eq!(after[0], Ok(Reply::Ok), "watched after the prepare: runs");
    assert_eq!(value(&e, "a"), Some(b("u")));
}

/// A prepare that names an earlier transaction as committed commits it first (if it is still
/// prepared here), so it does not meet that transaction's locks; a second commit of the
/// earlier one later changes nothing.
#[tokio::test]
async fn a_prepare_commits_the_earlier_transactions_it_knows_committed_before_it_votes() {
    let (_d, e) = open();
    write(&e, 1, vec![set("a", "1")]).await;
    let first = step(
        &e,
        id(1),
        prepare(vec![incr("a")], &[("a", LockMode::Write)]),
        2,
    )
    .await;
    assert!(matches!(first.outcome, Outcome::Yes(_)), "{first:?}");
    let conflicting = step(
        &e,
        id(2),
        prepare(vec![incr("a")], &[("a", LockMode::Write)]),
        3,
    )
    .await;
    assert!(
        matches!(conflicting.outcome, Outcome::No(Refusal::Locked(_))),
        "without the news it meets the lock: {conflicting:?}"
    );
    let ShardStep::Prepare(mut p) = prepare(vec![incr("a")], &[("a", LockMode::Write)]) else {
        unreachable!()
    };
    p.committed_first = vec![(id(1), Timestamp(2))];
    let second = step(&e, id(3), ShardStep::Prepare(p), 4).await;
    assert!(matches!(second.outcome, Outcome::Yes(_)), "{second:?}");
    assert_eq!(second.replies, Some(vec![Ok(Reply::Integer(3))]));
    assert_eq!(value(&e, "a"), Some(b("2")), "the first one is applied");
    let late = step(&e, id(1), ShardStep::Commit { ts: Timestamp(2) }, 5).await;
    assert_eq!(late.outcome, Outcome::Committed(Timestamp(2)));
    assert_eq!(value(&e, "a"), Some(b("2")), "applied once");
    step(&e, id(3), ShardStep::Commit { ts: Timestamp(4) }, 6).await;
    assert_eq!(value(&e, "a"), Some(b("3")));
}
