//! `capdb job run|status|result|cancel|list|lib`: MapReduce jobs over the HTTP API (issue 15).
//!
//! `capdb job run spec.json` submits the spec (an id is added when it has none, so a retry
//! after a lost answer is the same job), then shows its progress on one line (redrawn on a
//! terminal, a line a second otherwise): tasks and shards done, keys scanned, rate, ETA, and
//! the leading group of the newest partial result; at the end the result as a table (or, with
//! `--json`, as JSON). Ctrl-C cancels the job unless `--detach` was given.
//!
//! Exit codes: 0 done, 1 failed or cancelled, 2 a bad spec, 3 contact lost (the job runs on).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::{HttpClient, encode};

/// `capdb job ...`.
#[derive(clap::Subcommand)]
pub enum JobOp {
    /// Submit a job and follow it to its end.  Example: capdb job run spec.json
    Run {
        /// The job's spec (JSON); `-` reads it from standard input.
        spec: String,
        /// Submit, print the id and return (the job runs on).
        #[arg(long)]
        detach: bool,
        /// Print the result as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A job's state and progress.
    Status { id: String },
    /// A done job's result.
    Result {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job.
    Cancel { id: String },
    /// Every job's id.
    List,
    /// Lua libraries jobs and views name as "map": {"lua": "<library>.<function>"}.
    Lib {
        #[command(subcommand)]
        op: LibOp,
    },
}

/// `capdb job lib ...`.
#[derive(clap::Subcommand)]
pub enum LibOp {
    /// Load a library (its first line `#!lua name=<library>`, or --name).
    /// Example: capdb job lib load geo.lua
    Load {
        /// The code; `-` reads it from standard input.
        file: String,
        /// The library's name when the code has no `#!lua name=` line.
        #[arg(long)]
        name: Option<String>,
        /// Replace a library of that name.
        #[arg(long)]
        replace: bool,
    },
    /// Every library and the functions it defines.
    List,
    /// Delete a library (jobs and views already using it keep their copy).
    Delete { name: String },
}

/// How `capdb job` ended, for the exit code.
pub enum JobExit {
    Done,
    Failed(String),
    BadSpec(String),
    ContactLost(String),
}

impl JobExit {
    pub fn code(&self) -> i32 {
        match self {
            JobExit::Done => 0,
            JobExit::Failed(_) => 1,
            JobExit::BadSpec(_) => 2,
            JobExit::ContactLost(_) => 3,
        }
    }
}

/// How often `job run` looks at the job.
const POLL: Duration = Duration::from_millis(500);
/// How long `job run` keeps trying while the cluster does not answer.
const CONTACT_GRACE: Duration = Duration::from_secs(30);

pub async fn job(op: JobOp, client: &HttpClient) -> JobExit {
    match run(op, client).await {
        Ok(exit) => exit,
        Err(e) => JobExit::Failed(e),
    }
}

async fn run(op: JobOp, client: &HttpClient) -> Result<JobExit, String> {
    match op {
        JobOp::Run { spec, detach, json } => run_job(client, &spec, detach, json).await,
        JobOp::Status { id } => {
            let v = client
                .request("GET", &format!("/v1/jobs/{}", encode(&id)), None)
                .await?;
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(JobExit::Done)
        }
        JobOp::Result { id, json } => {
            let v = client
                .request("GET", &format!("/v1/jobs/{}/result", encode(&id)), None)
                .await?;
            print_result(&v["rows"], json);
            Ok(JobExit::Done)
        }
        JobOp::Cancel { id } => {
            let v = client
                .request("DELETE", &format!("/v1/jobs/{}", encode(&id)), None)
                .await?;
            println!(
                "{}",
                if v["cancelled"] == json!(true) {
                    "cancelled"
                } else {
                    "it had ended"
                }
            );
            Ok(JobExit::Done)
        }
        JobOp::List => {
            let v = client.request("GET", "/v1/jobs", None).await?;
            for id in v["jobs"].as_array().into_iter().flatten() {
                println!("{}", id.as_str().unwrap_or_default());
            }
            Ok(JobExit::Done)
        }
        JobOp::Lib { op } => library(op, client).await,
    }
}

/// A library's functions as the API lists them, comma-separated.
fn functions(list: &Value) -> String {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

async fn library(op: LibOp, client: &HttpClient) -> Result<JobExit, String> {
    match op {
        LibOp::Load {
            file,
            name,
            replace,
        } => {
            let code = if file == "-" {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
                    .map_err(|e| format!("reading standard input: {e}"))?;
                b
            } else {
                std::fs::read(&file).map_err(|e| format!("reading {file}: {e}"))?
            };
            let name = match name {
                Some(n) => n,
                None => {
                    let first = code.split(|b| *b == b'\n').next().unwrap_or_default();
                    String::from_utf8_lossy(first)
                        .split_whitespace()
                        .find_map(|p| p.strip_prefix("name=").map(str::to_string))
                        .ok_or("the code has no '#!lua name=<library>' first line: give --name")?
                }
            };
            let path = format!(
                "/v1/jobs/libraries/{}{}",
                encode(&name),
                if replace { "?replace=true" } else { "" }
            );
            let v = client.request("PUT", &path, Some(code)).await?;
            println!(
                "{}: {}",
                v["library"].as_str().unwrap_or_default(),
                functions(&v["functions"])
            );
        }
        LibOp::List => {
            let v = client.request("GET", "/v1/jobs/libraries", None).await?;
            for l in v["libraries"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{} bytes\t{}",
                    l["name"].as_str().unwrap_or_default(),
                    l["bytes"],
                    functions(&l["functions"])
                );
            }
        }
        LibOp::Delete { name } => {
            client
                .request(
                    "DELETE",
                    &format!("/v1/jobs/libraries/{}", encode(&name)),
                    None,
                )
                .await?;
            println!("deleted {name}");
        }
    }
    Ok(JobExit::Done)
}

async fn run_job(
    client: &HttpClient,
    path: &str,
    detach: bool,
    json: bool,
) -> Result<JobExit, String> {
    let text = if path == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| format!("cannot read the spec: {e}"))?
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?
    };
    let mut spec: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => return Ok(JobExit::BadSpec(format!("{path}: not JSON: {e}"))),
    };
    // An id of our own: resubmitting after a lost answer is then the same job.
    if spec.get("id").is_none_or(Value::is_null)
        && let Some(obj) = spec.as_object_mut()
    {
        let id = format!("cli-{}-{}", capdb_types::unix_now_ms(), std::process::id());
        obj.insert("id".into(), json!(id));
    }
    let body = spec.to_string().into_bytes();
    let submitted = match client.request("POST", "/v1/jobs", Some(body.clone())).await {
        Ok(v) => v,
        // Refused (a bad spec, no such keyspace, the id taken by another spec) says why.
        Err(e) if refused(&e) => return Ok(JobExit::BadSpec(e)),
        // Anything else may be a lost answer: the same id again is the same job.
        Err(_) => match client.request("POST", "/v1/jobs", Some(body)).await {
            Ok(v) => v,
            Err(e) if refused(&e) => return Ok(JobExit::BadSpec(e)),
            Err(e) => {
                return Ok(JobExit::ContactLost(format!(
                    "submit: {e} (the job may exist)"
                )));
            }
        },
    };
    let id = submitted["id"].as_str().unwrap_or_default().to_string();
    if detach {
        println!("{id}");
        return Ok(JobExit::Done);
    }
    eprintln!("job {id} submitted");
    let tty = std::io::stderr().is_terminal();
    let cancel = tokio::signal::ctrl_c();
    tokio::pin!(cancel);
    let started = Instant::now();
    let mut last_line = Instant::now() - Duration::from_secs(1);
    let mut lost_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = &mut cancel => {
                let _ = client.request("DELETE", &format!("/v1/jobs/{}", encode(&id)), None).await;
                eprintln!("\njob {id} cancelled");
                return Ok(JobExit::Failed("cancelled".into()));
            }
            _ = tokio::time::sleep(POLL) => {}
        }
        let status = match client
            .request("GET", &format!("/v1/jobs/{}", encode(&id)), None)
            .await
        {
            Ok(s) => {
                lost_since = None;
                s
            }
            Err(e) => {
                let since = *lost_since.get_or_insert_with(Instant::now);
                if since.elapsed() > CONTACT_GRACE {
                    return Ok(JobExit::ContactLost(format!("job {id}: {e} (it runs on)")));
                }
                continue;
            }
        };
        let state = status["state"].as_str().unwrap_or("?").to_string();
        let line = progress_line(&status, started.elapsed());
        if tty {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
        } else if last_line.elapsed() >= Duration::from_secs(1) {
            eprintln!("{line}");
            last_line = Instant::now();
        }
        match state.as_str() {
            "done" => {
                if tty {
                    eprintln!();
                }
                let v = client
                    .request("GET", &format!("/v1/jobs/{}/result", encode(&id)), None)
                    .await?;
                print_result(&v["rows"], json);
                return Ok(JobExit::Done);
            }
            "failed" | "cancelled" => {
                if tty {
                    eprintln!();
                }
                let reason = status["reason"].as_str().unwrap_or(&state).to_string();
                return Ok(JobExit::Failed(format!("job {id} {state}: {reason}")));
            }
            _ => {}
        }
    }
}

/// Whether an HTTP error is a refusal of the request itself (a 4xx other than 429).
fn refused(e: &str) -> bool {
    e.rsplit_once("HTTP ")
        .and_then(|(_, code)| code.trim_end_matches(')').parse::<u16>().ok())
        .is_some_and(|code| (400..500).contains(&code) && code != 429)
}

/// `[######....] 5/8 tasks  3/4 shards  6.2M keys  1.1M keys/s  ETA 4s  top c17=51234 (partial)`.
fn progress_line(status: &Value, elapsed: Duration) -> String {
    let done = status["tasks_done"].as_u64().unwrap_or(0);
    let total = status["tasks_total"].as_u64().unwrap_or(0);
    let keys = status["keys_scanned"].as_u64().unwrap_or(0);
    let latest = &status["latest"];
    let keys = latest["keys_scanned"]
        .as_str()
        .and_then(|k| k.parse::<u64>().ok())
        .map_or(keys, |k| k.max(keys));
    let width = 10usize;
    let filled = (done * width as u64)
        .checked_div(total)
        .unwrap_or(0)
        .min(width as u64) as usize;
    let bar: String = "#".repeat(filled) + &".".repeat(width - filled);
    let rate = keys as f64 / elapsed.as_secs_f64().max(0.001);
    let eta = if done > 0 && done < total {
        let per = elapsed.as_secs_f64() / done as f64;
        format!("  ETA {:.0}s", per * (total - done) as f64)
    } else {
        String::new()
    };
    let shards = match (
        latest["shards_done"].as_str(),
        latest["shards_total"].as_str(),
    ) {
        (Some(d), Some(t)) => format!("  {d}/{t} shards"),
        _ => String::new(),
    };
    let top = latest["result"]["groups"]
        .get(0)
        .map(|row| {
            let group = row["group"].to_string();
            let first = row
                .as_object()
                .and_then(|o| o.iter().find(|(k, _)| k.as_str() != "group"))
                .map(|(k, v)| format!(" {k}={v}"))
                .unwrap_or_default();
            format!("  top {group}{first} (partial)")
        })
        .unwrap_or_default();
    format!(
        "[{bar}] {done}/{total} tasks{shards}  {} keys  {}/s{eta}  {}{top}",
        human(keys as f64),
        human(rate),
        status["state"].as_str().unwrap_or("?")
    )
}

fn human(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.1}G", n / 1e9),
        n if n >= 1e6 => format!("{:.1}M", n / 1e6),
        n if n >= 1e3 => format!("{:.1}k", n / 1e3),
        n => format!("{n:.0}"),
    }
}

/// The result rows as a table (columns: group, then each reducer), or as JSON.
pub(crate) fn print_result(rows: &Value, json: bool) {
    let rows = rows.as_array().cloned().unwrap_or_default();
    if json {
        println!("{}", Value::Array(rows));
        return;
    }
    let mut columns: Vec<String> = vec!["group".into()];
    for r in &rows {
        for k in r.as_object().into_iter().flat_map(|o| o.keys()) {
            if !columns.contains(k) {
                columns.push(k.clone());
            }
        }
    }
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| cell(&r[c])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            table
                .iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(&columns));
    for r in &table {
        println!("{}", line(r));
    }
    println!("({} rows)", rows.len());
}
