//! Network hosts for the nodes: one Linux network namespace per node, all plugged into a
//! bridge that lives in its own namespace, plus a veth from the harness's namespace so clients
//! reach every node. Faults are nftables rules inside each node's namespace that drop packets
//! *from* chosen peers (Jepsen's convention: each side drops what it receives from the other),
//! so client traffic from the harness is never cut, only node-to-node links.
//!
//! Everything created is named with the run's prefix and removed by [`Topology::destroy`],
//! which `Drop` also calls, so an interrupted or panicking run leaves nothing behind;
//! `capdb chaos clean` removes leftovers of runs that were killed outright.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;

use crate::HarnessError;

/// Runs a command, turning a failure into a harness error that shows the command and stderr.
pub(crate) fn sh(program: &str, args: &[&str]) -> Result<(), HarnessError> {
    sh_stdin(program, args, None)
}

fn sh_stdin(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), HarnessError> {
    use std::io::Write;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| HarnessError(format!("cannot run {program}: {e} (is it installed?)")))?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())
            .map_err(|e| HarnessError(format!("{program}: writing stdin: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| HarnessError(format!("{program}: {e}")))?;
    if !out.status.success() {
        return Err(HarnessError(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Per-node link faults currently in force.
#[derive(Debug, Default, Clone)]
struct Faults {
    /// Peers whose packets this node drops.
    blocked: BTreeSet<u32>,
    /// Peers whose packets this node drops with this probability (per mille).
    lossy: BTreeMap<u32, u32>,
}

pub struct Topology {
    prefix: String,
    nodes: u32,
    net: [u8; 2],
    faults: Mutex<BTreeMap<u32, Faults>>,
    destroyed: Mutex<bool>,
}

impl Topology {
    /// Creates the bridge, one namespace per node (1-based) and the harness's link.
    pub fn create(run_id: u32, nodes: u32) -> Result<Topology, HarnessError> {
        assert!((1..=50).contains(&nodes), "1 to 50 nodes");
        let topo = Topology {
            prefix: format!("cx{run_id}"),
            nodes,
            net: [200 + ((run_id / 250) % 50) as u8, (run_id % 250) as u8],
            faults: Mutex::default(),
            destroyed: Mutex::new(false),
        };
        // A previous run with the same id that was killed outright may have left these.
        topo.remove_leftovers();
        if let Err(e) = topo.build() {
            topo.destroy();
            return Err(e);
        }
        Ok(topo)
    }

    fn build(&self) -> Result<(), HarnessError> {
        let p = &self.prefix;
        let br = format!("{p}br");
        sh("ip", &["netns", "add", &br])?;
        sh("ip", &["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        sh("ip", &["-n", &br, "link", "set", "br0", "up"])?;
        let plug = |inside: &str, outside: &str, ns: Option<&str>, addr: &str| {
            sh(
                "ip",
                &[
                    "link", "add", inside, "type", "veth", "peer", "name", outside,
                ],
            )?;
            sh("ip", &["link", "set", outside, "netns", &br])?;
            sh("ip", &["-n", &br, "link", "set", outside, "master", "br0"])?;
            sh("ip", &["-n", &br, "link", "set", outside, "up"])?;
            match ns {
                Some(ns) => {
                    sh("ip", &["link", "set", inside, "netns", ns])?;
                    sh("ip", &["-n", ns, "addr", "add", addr, "dev", inside])?;
                    sh("ip", &["-n", ns, "link", "set", inside, "up"])?;
                    sh("ip", &["-n", ns, "link", "set", "lo", "up"])
                }
                None => {
                    sh("ip", &["addr", "add", addr, "dev", inside])?;
                    sh("ip", &["link", "set", inside, "up"])
                }
            }
        };
        for i in 1..=self.nodes {
            let ns = self.namespace(i);
            sh("ip", &["netns", "add", &ns])?;
            plug(
                &format!("{p}v{i}"),
                &format!("{p}b{i}"),
                Some(&ns),
                &format!("{}/24", self.ip(i)),
            )?;
        }
        plug(
            &format!("{p}h"),
            &format!("{p}hb"),
            None,
            &format!("{}/24", self.harness_ip()),
        )?;
        Ok(())
    }

    pub fn nodes(&self) -> u32 {
        self.nodes
    }

    /// The namespace node `i` runs in.
    pub fn namespace(&self, i: u32) -> String {
        format!("{}n{i}", self.prefix)
    }

    pub fn ip(&self, i: u32) -> Ipv4Addr {
        assert!(i >= 1 && i <= self.nodes);
        Ipv4Addr::new(10, self.net[0], self.net[1], i as u8)
    }

    /// The harness's own address on the bridge (clients connect from here).
    pub fn harness_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net[0], self.net[1], 254)
    }

    /// Cuts links so that node `a` and node `b` can talk only if `connected(a, b)`; loss rules
    /// are kept. Applies to every node.
    pub fn set_links(&self, connected: impl Fn(u32, u32) -> bool) -> Result<(), HarnessError> {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        for me in 1..=self.nodes {
            let f = faults.entry(me).or_default();
            f.blocked = (1..=self.nodes)
                .filter(|&other| other != me && !connected(me, other))
                .collect();
        }
        let snapshot = faults.clone();
        drop(faults);
        for me in 1..=self.nodes {
            self.apply(me, snapshot.get(&me).cloned().unwrap_or_default())?;
        }
        Ok(())
    }

    /// Drops this share (per mille) of packets node `me` receives from each peer in `from`.
    pub fn set_loss(&self, me: u32, from: &[u32], per_mille: u32) -> Result<(), HarnessError> {
        let f = {
            let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
            let f = faults.entry(me).or_default();
            f.lossy = from.iter().map(|&p| (p, per_mille.min(1000))).collect();
            f.clone()
        };
        self.apply(me, f)
    }

    /// Removes every link fault.
    pub fn heal(&self) -> Result<(), HarnessError> {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for me in 1..=self.nodes {
            self.apply(me, Faults::default())?;
        }
        Ok(())
    }

    /// Replaces node `me`'s nftables table with one that enforces `f` (atomically: one
    /// `nft -f` transaction).
    fn apply(&self, me: u32, f: Faults) -> Result<(), HarnessError> {
        let mut script = String::from("table inet capdbchaos\ndelete table inet capdbchaos\n");
        if !f.blocked.is_empty() || !f.lossy.is_empty() {
            script.push_str("table inet capdbchaos {\n chain input {\n  type filter hook input priority 0; policy accept;\n");
            for p in &f.blocked {
                script.push_str(&format!("  ip saddr {} drop\n", self.ip(*p)));
            }
            for (p, per_mille) in &f.lossy {
                script.push_str(&format!(
                    "  ip saddr {} numgen random mod 1000 < {per_mille} drop\n",
                    self.ip(*p)
                ));
            }
            script.push_str(" }\n}\n");
        }
        sh_stdin(
            "ip",
            &["netns", "exec", &self.namespace(me), "nft", "-f", "-"],
            Some(&script),
        )
    }

    fn remove_leftovers(&self) {
        let _ = sh("ip", &["link", "del", &format!("{}h", self.prefix)]);
        for i in 1..=self.nodes {
            let _ = sh("ip", &["netns", "del", &self.namespace(i)]);
        }
        let _ = sh("ip", &["netns", "del", &format!("{}br", self.prefix)]);
    }

    /// Deletes the namespaces (which deletes their links); idempotent. Processes inside must
    /// have been stopped first.
    pub fn destroy(&self) {
        let mut done = self.destroyed.lock().unwrap_or_else(|p| p.into_inner());
        if !*done {
            self.remove_leftovers();
            *done = true;
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// Removes every namespace and link any chaos run left behind (`capdb chaos clean`).
pub fn clean_all() -> Result<Vec<String>, HarnessError> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map_err(|e| HarnessError(format!("cannot run ip: {e}")))?;
    let mut removed = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let is_ours = name.strip_prefix("cx").is_some_and(|rest| {
            let digits = rest.trim_start_matches(|c: char| c.is_ascii_digit());
            digits.len() < rest.len()
                && (digits == "br"
                    || digits
                        .strip_prefix('n')
                        .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit())))
        });
        if is_ours {
            sh("ip", &["netns", "del", name])?;
            removed.push(name.to_string());
        }
    }
    Ok(removed)
}
