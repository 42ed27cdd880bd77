//! Durability: every acknowledged write survives `kill -9`; corruption is reported, never
//! served; SIGTERM shuts down cleanly.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Server, http, json};
use redis::{Commands, RedisResult};

/// Writers record each write only after the server acknowledged it.
#[test]
fn acknowledged_writes_survive_kill_9() {
    let mut s = Server::start();
    let mut acked_total = 0;
    for round in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let counter_acked = Arc::new(Mutex::new(0i64));
        let mut threads = Vec::new();
        for t in 0..8 {
            let (url, stop, acked, counter_acked) = (
                s.redis_url(),
                stop.clone(),
                acked.clone(),
                counter_acked.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let Ok(mut c) = redis::Client::open(url).unwrap().get_connection() else {
                    return;
                };
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) && i % 7 == 0 {
                        // keep writing until the kill actually lands
                    }
                    let (k, v) = (
                        format!("r{round}:t{t}:{i}"),
                        format!("value-{round}-{t}-{i}"),
                    );
                    let r: RedisResult<()> = if t == 0 {
                        // One writer pipelines 16 writes per round trip.
                        let mut p = redis::pipe();
                        for j in 0..16 {
                            p.cmd("SET").arg(format!("{k}:{j}")).arg(&v).ignore();
                        }
                        p.query(&mut c)
                    } else {
                        c.set(&k, &v)
                    };
                    if r.is_err() {
                        return;
                    }
                    if t == 0 {
                        let mut a = acked.lock().unwrap();
                        for j in 0..16 {
                            a.push((format!("{k}:{j}"), v.clone()));
                        }
                    } else {
                        acked.lock().unwrap().push((k, v));
                    }
                    if t == 1 {
                        match c.incr::<_, _, i64>("counter", 1) {
                            Ok(n) => *counter_acked.lock().unwrap() = n,
                            Err(_) => return,
                        }
                    }
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(800 + round * 300));
        stop.store(true, Ordering::Relaxed);
        s.kill9(); // in the middle of the stream
        for t in threads {
            t.join().unwrap();
        }
        s.spawn();
        let acked = acked.lock().unwrap().clone();
        assert!(
            acked.len() > 100,
            "round {round}: only {} writes acknowledged before the kill",
            acked.len()
        );
        let mut c = s.client();
        for chunk in acked.chunks(500) {
            let keys: Vec<&String> = chunk.iter().map(|(k, _)| k).collect();
            let got: Vec<Option<String>> = c.mget(&keys).unwrap();
            for ((k, v), g) in chunk.iter().zip(got) {
                assert_eq!(
                    g.as_ref(),
                    Some(v),
                    "round {round}: acknowledged write {k} lost after kill -9"
                );
            }
        }
        let counter: i64 = c.get("counter").unwrap_or(0);
        assert!(
            counter >= *counter_acked.lock().unwrap(),
            "acknowledged INCR lost"
        );
        acked_total += acked.len();
    }
    eprintln!("verified {acked_total} acknowledged writes across 3 kill -9 cycles");
}

#[test]
fn acknowledged_collection_writes_survive_kill_9() {
    let mut s = Server::start();
    let stop = Arc::new(AtomicBool::new(false));
    // Per writer: the acknowledged operations, in order.
    let acked: Arc<Mutex<Vec<Vec<String>>>> = Arc::new(Mutex::new(vec![Vec::new(); 4]));
    let mut threads = Vec::new();
    for t in 0..4usize {
        let (url, stop, acked) = (s.redis_url(), stop.clone(), acked.clone());
        threads.push(std::thread::spawn(move || {
            let Ok(mut c) = redis::Client::open(url).unwrap().get_connection() else {
                return;
            };
            for i in 0.. {
                if stop.load(Ordering::Relaxed) && i > 1_000_000 {
                    return;
                }
                let item = format!("i{i}");
                let r: RedisResult<i64> = match t {
                    0 => c.hset("h", &item, i),
                    1 => c.rpush("l", &item),
                    2 => c.sadd("s", &item),
                    _ => c.zadd("z", &item, i),
                };
                if r.is_err() {
                    return;
                }
                acked.lock().unwrap()[t].push(item);
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(1200));
    stop.store(true, Ordering::Relaxed);
    s.kill9();
    for t in threads {
        t.join().unwrap();
    }
    s.spawn();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.iter().all(|a| a.len() > 20),
        "too few writes acknowledged before the kill: {:?}",
        acked.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let mut c = s.client();
    let hash: std::collections::HashMap<String, i64> = c.hgetall("h").unwrap();
    for (i, f) in acked[0].iter().enumerate() {
        assert_eq!(hash.get(f), Some(&(i as i64)), "acknowledged HSET {f} lost");
    }
    let list: Vec<String> = c.lrange("l", 0, -1).unwrap();
    assert!(
        list.len() >= acked[1].len() && list[..acked[1].len()] == acked[1][..],
        "acknowledged RPUSHes lost or out of order: {} acknowledged, {} stored",
        acked[1].len(),
        list.len()
    );
    let set: std::collections::HashSet<String> = c.smembers("s").unwrap();
    for m in &acked[2] {
        assert!(set.contains(m), "acknowledged SADD {m} lost");
    }
    for (i, m) in acked[3].iter().enumerate() {
        let score: Option<i64> = c.zscore("z", m).unwrap();
        assert_eq!(score, Some(i as i64), "acknowledged ZADD {m} lost");
    }
}

/// Flips a bit in every copy of `marker` in `path`; returns how many.
fn flip_marker(path: &std::path::Path, marker: &str) -> usize {
    let mut bytes = std::fs::read(path).unwrap();
    let mut flipped = 0;
    let mut i = 0;
    while let Some(pos) = bytes[i..]
        .windows(marker.len())
        .position(|w| w == marker.as_bytes())
    {
        let at = i + pos + marker.len() / 2;
        bytes[at] ^= 0x01;
        flipped += 1;
        i = at;
    }
    if flipped > 0 {
        std::fs::write(path, &bytes).unwrap();
    }
    flipped
}

fn corrupt_file(path: &std::path::Path, marker: &str) {
    assert!(
        flip_marker(path, marker) > 0,
        "the value was not found in the data file"
    );
}

/// Flips `marker` wherever the node stored it: the database file and the write-ahead log.
fn corrupt_everywhere(data_dir: &std::path::Path, marker: &str) {
    let mut files = vec![data_dir.join("capdb.redb")];
    for e in std::fs::read_dir(data_dir.join("wal")).unwrap() {
        files.push(e.unwrap().path());
    }
    let flipped: usize = files.iter().map(|f| flip_marker(f, marker)).sum();
    assert!(flipped > 0, "the value was not found in the data files");
}

/// After a crash, a corrupt value is never served: either recovery finds the damage (in the
/// write-ahead log: an acknowledged frame that fails its check, followed by valid ones; in the
/// database: a damaged page) and the node refuses to start with a clear error, or it falls back
/// to an older state, or the value's own checksum refuses it.
#[test]
fn corruption_after_a_crash_is_never_served() {
    let mut s = Server::start();
    let marker = "CRASH-CORRUPTION-TARGET-0123456789-abcdefghijklmnopqrstuvwxyz";
    let _: () = s.client().set("victim", marker).unwrap();
    // A later write after the checkpoint interval: the database commit carrying it is durable,
    // so the value is in both files, and its log record is no longer the last one.
    std::thread::sleep(capdb_storage::disk::CHECKPOINT_INTERVAL + Duration::from_millis(200));
    let _: () = s.client().set("after", "x").unwrap();
    s.kill9();
    corrupt_everywhere(&s.data_dir(), marker);
    match s.try_spawn() {
        Err(log) => assert!(log.to_lowercase().contains("corrupt"), "{log}"),
        Ok(()) => {
            let got: RedisResult<Option<String>> = s.client().get("victim");
            match got {
                Ok(v) => assert_eq!(v, None, "damaged bytes were served"),
                Err(e) => assert!(e.to_string().to_lowercase().contains("corrupt"), "{e}"),
            }
        }
    }
}

/// In a cleanly closed file each value's own checksum catches the flip at read time.
#[test]
fn corrupt_values_are_reported_never_served() {
    let mut s = Server::start();
    let marker = "CORRUPTION-TARGET-0123456789-abcdefghijklmnopqrstuvwxyz-0123456789";
    {
        let mut c = s.client();
        let _: () = c.set("victim", marker).unwrap();
        for i in 0..100 {
            let _: () = c.set(format!("healthy{i}"), "fine").unwrap();
        }
    }
    let status = s.sigterm();
    assert!(status.success());
    assert!(s.log().contains("clean_close=true"), "{}", s.log());
    corrupt_file(&s.data_dir().join("capdb.redb"), marker);
    s.spawn();
    let mut c = s.client();
    let e: RedisResult<Option<String>> = c.get("victim");
    let msg = e
        .expect_err("a corrupt value must not be served")
        .to_string();
    assert!(msg.to_lowercase().contains("corrupt"), "{msg}");
    assert_eq!(
        c.get::<_, String>("healthy7").unwrap(),
        "fine",
        "other keys keep serving"
    );
    let (status, body) = http(s.http, "GET", "/v1/kv/default/victim", &[], None).unwrap();
    assert_eq!(status, 500);
    assert_eq!(json(&body)["error"]["code"], "corruption");
    let (_, metrics) = http(s.http, "GET", "/metrics", &[], None).unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        !metrics.contains("capdb_storage_corruptions 0"),
        "{metrics}"
    );
    // An operator can repair the key by overwriting it.
    let _: () = c.set("victim", "repaired").unwrap();
    assert_eq!(c.get::<_, String>("victim").unwrap(), "repaired");
}

#[test]
fn sigterm_finishes_in_flight_work_and_exits_zero() {
    let mut s = Server::start();
    let url = s.redis_url();
    let writer = std::thread::spawn(move || {
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        let mut acked = 0;
        loop {
            let r: RedisResult<()> = c.set(format!("g{acked}"), acked);
            if r.is_err() {
                return acked;
            }
            acked += 1;
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let status = s.sigterm();
    assert_eq!(status.code(), Some(0), "{}", s.log());
    assert!(s.log().contains("shutdown complete"));
    let acked = writer.join().unwrap();
    s.spawn();
    let mut c = s.client();
    for i in 0..acked {
        assert_eq!(
            c.get::<_, Option<i64>>(format!("g{i}")).unwrap(),
            Some(i),
            "write {i} acknowledged before SIGTERM was lost"
        );
    }
}
