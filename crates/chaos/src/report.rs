//! The run's report: `report.json` (counts, availability per nemesis window, latency, the
//! verdict and its evidence) and `timeline.svg` (nemesis windows against operation outcomes).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value as Json, json};

use crate::check::CheckResult;
use crate::history::{F, Op, Record, Role, Stage};

/// A nemesis window as recorded in the history.
#[derive(Debug, Clone)]
pub struct WindowSpan {
    pub window: u32,
    pub fault: String,
    pub start_ns: u64,
    pub end_ns: u64,
}

pub fn windows(records: &[Record]) -> Vec<WindowSpan> {
    let mut open: BTreeMap<u32, WindowSpan> = BTreeMap::new();
    let mut done = Vec::new();
    let mut last = 0;
    for r in records {
        match r {
            Record::Op(e) => last = last.max(e.time_ns),
            Record::Nemesis(e) => {
                last = last.max(e.time_ns);
                if e.nemesis == "start" {
                    open.insert(
                        e.window,
                        WindowSpan {
                            window: e.window,
                            fault: e.fault.clone(),
                            start_ns: e.time_ns,
                            end_ns: u64::MAX,
                        },
                    );
                } else if let Some(mut w) = open.remove(&e.window) {
                    w.end_ns = e.time_ns;
                    done.push(w);
                }
            }
        }
    }
    for (_, mut w) in open {
        w.end_ns = last;
        done.push(w);
    }
    done.sort_by_key(|w| w.start_ns);
    done
}

fn counts<'a>(ops: impl Iterator<Item = &'a Op>) -> Json {
    let (mut ok, mut fail, mut info) = (0u64, 0u64, 0u64);
    for op in ops {
        match op.outcome {
            Stage::Ok => ok += 1,
            Stage::Fail => fail += 1,
            _ => info += 1,
        }
    }
    let total = ok + fail + info;
    json!({
        "ops": total, "ok": ok, "fail": fail, "info": info,
        "availability": if total == 0 { Json::Null } else { json!((ok as f64 / total as f64 * 1000.0).round() / 1000.0) },
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// Builds `report.json`'s content.
pub fn build(records: &[Record], check: &CheckResult, run: Json) -> Result<Json, String> {
    let ops = crate::history::pair(records)?;
    let spans = windows(records);
    let completed_at = |op: &Op| op.complete_ns.unwrap_or(u64::MAX);
    let mut by_window = Vec::new();
    for w in &spans {
        let mut c = counts(
            ops.iter()
                .filter(|o| completed_at(o) >= w.start_ns && completed_at(o) < w.end_ns),
        );
        c["window"] = json!(w.window);
        c["fault"] = json!(w.fault);
        c["start_s"] = json!(w.start_ns as f64 / 1e9);
        c["end_s"] = json!(w.end_ns as f64 / 1e9);
        by_window.push(c);
    }
    let in_window = |op: &Op| {
        spans
            .iter()
            .any(|w| completed_at(op) >= w.start_ns && completed_at(op) < w.end_ns)
    };
    let quiet = counts(ops.iter().filter(|o| !in_window(o)));
    let mut latency: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for op in ops.iter().filter(|o| o.outcome == Stage::Ok) {
        if let Some(done) = op.complete_ns {
            let f = match op.f {
                F::Read => "read",
                F::Write => "write",
                F::Cas => "cas",
                F::Add => "add",
                F::Insert => "insert",
                F::Txn => "txn",
                F::Transfer => "transfer",
            };
            latency
                .entry(f.to_string())
                .or_default()
                .push((done - op.invoke_ns) as f64 / 1e6);
        }
    }
    let latency: BTreeMap<String, Json> = latency
        .into_iter()
        .map(|(f, mut v)| {
            v.sort_by(|a, b| a.total_cmp(b));
            let r = |x: f64| (x * 100.0).round() / 100.0;
            (
                f,
                json!({"count": v.len(), "p50": r(percentile(&v, 0.5)), "p90": r(percentile(&v, 0.9)), "p99": r(percentile(&v, 0.99)), "max": r(percentile(&v, 1.0))}),
            )
        })
        .collect();
    let mut by_workload = BTreeMap::new();
    for w in crate::history::Workload::ALL {
        let c = counts(ops.iter().filter(|o| o.workload == w));
        if c["ops"] != 0 {
            by_workload.insert(format!("{w:?}").to_lowercase(), c);
        }
    }
    // Which path writes took: proposed where they arrived (leader) or forwarded.
    let mut writes_by_role = BTreeMap::new();
    for role in [
        Some(Role::Leader),
        Some(Role::Follower),
        Some(Role::Other),
        None,
    ] {
        let c = counts(ops.iter().filter(|o| o.f != F::Read && o.role == role));
        if c["ops"] != 0 {
            let name = role.map_or("unknown".to_string(), |r| format!("{r:?}").to_lowercase());
            writes_by_role.insert(name, c);
        }
    }
    let all = counts(ops.iter());
    let mut report = json!({
        "valid": check.validity.to_json(),
        "ops": all["ops"], "ok": all["ok"], "fail": all["fail"], "info": all["info"],
        "problems": check.problems,
        "by_workload": by_workload,
        "writes_by_role": writes_by_role,
        "windows": by_window,
        "outside_windows": quiet,
        "latency_ms": latency,
        "checks": check.details,
    });
    if let (Some(r), Some(extra)) = (report.as_object_mut(), run.as_object()) {
        for (k, v) in extra {
            r.insert(k.clone(), v.clone());
        }
    }
    Ok(report)
}

/// Timeline: width of the drawing.
const W: f64 = 1200.0;
/// Timeline: left margin (labels), where time 0 is.
const LEFT: f64 = 60.0;
/// Timeline: width of the plot area.
const PLOT_W: f64 = W - LEFT - 20.0;
/// Timeline: time buckets (bars, and cells of the node rows).
const BUCKETS: usize = 300;
/// Timeline: top of the outcome bars.
const BAR_TOP: f64 = 40.0;
/// Timeline: height of the tallest outcome bar.
const BAR_H: f64 = 160.0;
/// Timeline: top of the first node row.
const ROW_TOP: f64 = BAR_TOP + BAR_H + 30.0;
/// Timeline: height of one node row.
const ROW_H: f64 = 18.0;

/// Draws the timeline: nemesis windows shaded behind a stacked bar chart of outcomes over
/// time, and one row per node coloured by the share of that node's operations that succeeded.
pub fn timeline_svg(records: &[Record], nodes: u32) -> Result<String, String> {
    let ops = crate::history::pair(records)?;
    let spans = windows(records);
    let end_ns = records
        .iter()
        .map(|r| match r {
            Record::Op(e) => e.time_ns,
            Record::Nemesis(e) => e.time_ns,
        })
        .max()
        .unwrap_or(1)
        .max(1);
    let height = ROW_TOP + nodes as f64 * ROW_H + 50.0;
    let (stacks, per_node) = outcome_buckets(&ops, nodes, end_ns);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="11">"##
    );
    let _ = writeln!(svg, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="16" font-size="13">Operations per {:.1} s (green ok, orange fail, red indeterminate); red bands: nemesis windows, blue: final heal and recovery</text>"##,
        end_ns as f64 / 1e9 / BUCKETS as f64
    );
    draw_windows(&mut svg, &spans, end_ns, height);
    draw_outcome_bars(&mut svg, &stacks);
    draw_node_rows(&mut svg, &per_node);
    draw_time_axis(&mut svg, end_ns, height);
    svg.push_str("</svg>\n");
    Ok(svg)
}

/// The timeline's x coordinate of time `ns`, in a run ending at `end_ns`.
fn timeline_x(ns: u64, end_ns: u64) -> f64 {
    LEFT + (ns as f64 / end_ns as f64) * PLOT_W
}

/// Completed operations per time bucket: (ok, fail, info) counts, and per node (ok, all).
fn outcome_buckets(ops: &[Op], nodes: u32, end_ns: u64) -> (Vec<[u32; 3]>, Vec<Vec<[u32; 2]>>) {
    let bucket_of =
        |ns: u64| ((ns as f64 / end_ns as f64) * BUCKETS as f64).min(BUCKETS as f64 - 1.0) as usize;
    let mut stacks = vec![[0u32; 3]; BUCKETS];
    let mut per_node = vec![vec![[0u32; 2]; BUCKETS]; nodes as usize];
    for op in ops {
        let Some(done) = op.complete_ns else { continue };
        let b = bucket_of(done);
        let kind = match op.outcome {
            Stage::Ok => 0,
            Stage::Fail => 1,
            _ => 2,
        };
        stacks[b][kind] += 1;
        if let Some(row) = per_node.get_mut(op.node as usize - 1) {
            row[b][1] += 1;
            if kind == 0 {
                row[b][0] += 1;
            }
        }
    }
    (stacks, per_node)
}

/// Shades the nemesis windows (numbered above the bars) over the whole `height`.
fn draw_windows(svg: &mut String, spans: &[WindowSpan], end_ns: u64, height: f64) {
    for w in spans {
        let (x0, x1) = (
            timeline_x(w.start_ns, end_ns),
            timeline_x(w.end_ns.min(end_ns), end_ns),
        );
        let _ = writeln!(
            svg,
            r##"<rect x="{x0:.1}" y="{BAR_TOP}" width="{:.1}" height="{:.1}" fill="{}" opacity="0.6"><title>window {}: {}</title></rect>"##,
            (x1 - x0).max(1.0),
            // Window 0 is the final heal and recovery, not a fault.
            if w.window == 0 { "#cfe3f5" } else { "#f4c7c3" },
            height - BAR_TOP - 40.0,
            w.window,
            escape(&w.fault)
        );
        let _ = writeln!(
            svg,
            r##"<text x="{x0:.1}" y="{:.1}" font-size="9" fill="#a33">{}</text>"##,
            BAR_TOP - 4.0,
            w.window
        );
    }
}

/// Draws one stacked bar of outcomes per time bucket, scaled to the busiest bucket.
fn draw_outcome_bars(svg: &mut String, stacks: &[[u32; 3]]) {
    let max = stacks
        .iter()
        .map(|s| s[0] + s[1] + s[2])
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let bw = PLOT_W / BUCKETS as f64;
    for (b, s) in stacks.iter().enumerate() {
        let mut y = BAR_TOP + BAR_H;
        for (k, color) in [(0, "#2e7d32"), (1, "#ef6c00"), (2, "#c62828")] {
            if s[k] == 0 {
                continue;
            }
            let h = s[k] as f64 / max * BAR_H;
            y -= h;
            let _ = writeln!(
                svg,
                r##"<rect x="{:.1}" y="{y:.1}" width="{:.2}" height="{h:.1}" fill="{color}"/>"##,
                LEFT + b as f64 * bw,
                bw
            );
        }
    }
    let _ = writeln!(
        svg,
        r##"<text x="4" y="{:.0}">{max:.0}</text><text x="4" y="{:.0}">0</text>"##,
        BAR_TOP + 10.0,
        BAR_TOP + BAR_H
    );
}

/// Draws one row per node, each bucket coloured by the share of its operations that
/// succeeded (blank when idle).
fn draw_node_rows(svg: &mut String, per_node: &[Vec<[u32; 2]>]) {
    let bw = PLOT_W / BUCKETS as f64;
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="{:.0}" font-size="13">Share of each node's operations that succeeded (green 100%, red 0%, blank idle)</text>"##,
        ROW_TOP - 8.0
    );
    for (n, row) in per_node.iter().enumerate() {
        let y = ROW_TOP + n as f64 * ROW_H;
        let _ = writeln!(
            svg,
            r##"<text x="4" y="{:.0}">node {}</text>"##,
            y + 13.0,
            n + 1
        );
        for (b, c) in row.iter().enumerate() {
            if c[1] == 0 {
                continue;
            }
            let share = c[0] as f64 / c[1] as f64;
            let red = (200.0 * (1.0 - share)) as u8 + 30;
            let green = (150.0 * share) as u8 + 40;
            let _ = writeln!(
                svg,
                r##"<rect x="{:.1}" y="{y:.1}" width="{:.2}" height="{:.1}" fill="rgb({red},{green},50)"/>"##,
                LEFT + b as f64 * bw,
                bw,
                ROW_H - 3.0
            );
        }
    }
}

/// Labels the time axis at the bottom, at most about a dozen ticks.
fn draw_time_axis(svg: &mut String, end_ns: u64, height: f64) {
    let axis_y = height - 30.0;
    let secs = end_ns as f64 / 1e9;
    let step = [1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
        .into_iter()
        .find(|s| secs / s <= 12.0)
        .unwrap_or(600.0);
    let mut t = 0.0;
    while t <= secs {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{axis_y:.0}" text-anchor="middle">{t:.0}s</text>"##,
            timeline_x((t * 1e9) as u64, end_ns)
        );
        t += step;
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
