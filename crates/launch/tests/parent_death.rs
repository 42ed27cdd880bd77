//! A node dies with its launcher, even one killed with SIGKILL. This test binary runs itself
//! again as the launcher (`launcher` below, which does nothing unless `LAUNCHER` is set): it
//! starts `sleep 1000` through capdb-launch *from a thread that then exits*, checks the sleep
//! outlived that thread, and prints its pid. The test SIGKILLs the launcher and waits
//! (bounded) until the sleep is gone.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capdb_launch::NodeCommand;

const LAUNCHER: &str = "CAPDB_LAUNCH_TEST_LAUNCHER";

/// `sleep 1000` runs as `pid`: its command line is there (a zombie has none, another process
/// another one) and no SIGKILL is pending for it (bit 9 of the pending masks).
fn sleeper_alive(pid: u32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if cmdline != b"sleep\x001000\x00" {
        return false;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    !status.lines().any(|l| {
        (l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
            && u64::from_str_radix(l[7..].trim(), 16).is_ok_and(|mask| mask & (1 << 8) != 0)
    })
}

/// Bounded poll; `what` explains a timeout.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The intermediate launcher process (a no-op in a normal test run).
#[test]
fn launcher() {
    if std::env::var_os(LAUNCHER).is_none() {
        return;
    }
    // PR_SET_PDEATHSIG follows the forking *thread*: this spawn survives the thread's exit only
    // because capdb-launch forks on its own long-lived thread.
    let (node, thread) = std::thread::spawn(|| {
        let thread = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
        let mut sleep = Command::new("sleep");
        // Not holding the test's output pipes open, should it outlive us.
        sleep
            .arg("1000")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        (capdb_launch::launch(sleep).expect("start sleep"), thread)
    })
    .join()
    .unwrap();
    // The kernel sends the parent-death signal before it removes the exiting thread's task.
    let task = Path::new("/proc").join(thread);
    wait_for("the spawning thread's task is removed", || !task.exists());
    assert!(
        sleeper_alive(node.id()),
        "the node died with the thread that started it"
    );
    println!("SLEEPER {}", node.id());
    // Wait to be killed; bounded, should the test that started us be gone.
    std::thread::sleep(Duration::from_secs(120));
}

/// Kills the launcher if the test fails before it does.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills the sleep if the test fails because it outlived its launcher.
struct Orphan(u32);

impl Drop for Orphan {
    fn drop(&mut self) {
        if sleeper_alive(self.0) {
            let _ = Command::new("kill")
                .args(["-9", &self.0.to_string()])
                .status();
        }
    }
}

#[test]
fn a_node_dies_when_its_launcher_is_killed_with_sigkill() {
    let mut launcher = Guard(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "launcher", "--nocapture", "--test-threads=1"])
            .env(LAUNCHER, "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = BufReader::new(launcher.0.stdout.take().unwrap());
    // libtest may print "test launcher ... " on the same line.
    let pid: u32 = out
        .lines()
        .map_while(Result::ok)
        .find_map(|l| Some(l.split("SLEEPER ").nth(1)?.trim().parse().unwrap()))
        .expect("the launcher printed no pid (see its stderr above)");
    let _orphan = Orphan(pid);
    assert!(sleeper_alive(pid));
    launcher.0.kill().unwrap(); // SIGKILL
    launcher.0.wait().unwrap();
    wait_for(&format!("sleep {pid} dies after its launcher"), || {
        !sleeper_alive(pid)
    });
}

#[test]
fn the_command_line_keeps_its_order() {
    let cmd = NodeCommand::new("/bin/capdb")
        .wrapper(["ip", "netns", "exec", "ns-1"])
        .node_id(2)
        .data_dir("/d/node-2")
        .resp_addr("10.0.0.2:6379")
        .http_addr("10.0.0.2:8080")
        .peer_addr("10.0.0.2:7380")
        .initial_cluster("1=a:1,2=b:2")
        .args(["--label", "zone=z2"]);
    let argv: Vec<String> = cmd
        .argv()
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect();
    assert_eq!(
        argv.join(" "),
        "ip netns exec ns-1 /bin/capdb server --node-id 2 --data-dir /d/node-2 \
         --resp-addr 10.0.0.2:6379 --http-addr 10.0.0.2:8080 --peer-addr 10.0.0.2:7380 \
         --initial-cluster 1=a:1,2=b:2 --label zone=z2"
    );
    let join = NodeCommand::new("capdb").join("127.0.0.1:7001").argv();
    assert_eq!(join, ["capdb", "server", "--join", "127.0.0.1:7001"]);
}
