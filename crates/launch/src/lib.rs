//! The one way to start a local capdb node process: `capdb playground`, `capdb bench`, the
//! chaos harness and the integration tests all build a node's command line with
//! [`NodeCommand`], pick loopback ports with [`free_port`], and hold the process as a
//! [`LocalNode`], which kills it when dropped.
//!
//! **A node dies with its launcher**, however the launcher dies (`kill -9` included): on Linux
//! every node is started with a parent-death signal (`prctl(PR_SET_PDEATHSIG, SIGKILL)`), so
//! a killed playground, bench, harness or test binary leaves no node running. Two details:
//!
//! - The kernel sends that signal when the *thread* that forked the child exits, not the
//!   process. A node spawned from a tokio blocking thread (reclaimed after 10 s idle) or a
//!   test's thread would be killed when that thread ends. So every spawn happens on one
//!   dedicated thread of this crate that lives as long as the process ([`launch`]), whichever
//!   thread calls it.
//! - The launcher could die between `fork` and the `prctl`; the child then checks `getppid()`
//!   against the launcher's pid taken before the fork and exits if it was already reparented.
//!
//! A wrapper ([`NodeCommand::wrapper`]) such as `ip netns exec NS` gets the signal, and it
//! reaches the node because `ip netns exec` `execvp`s the node in the same process (and the
//! signal survives `execve` of binaries that are not set-uid/set-gid or file-capable). A
//! wrapper that forks instead (`sh -c` without `exec`, `sudo`) would protect only itself.
//! Elsewhere than Linux nodes start without the signal.
//!
//! This crate depends on std and libc only, never on another capdb crate: the chaos harness,
//! the CLI and the tests all use it, and it must stay a leaf that any of them can take.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// A loopback TCP port free right now and never handed out before by this process (the OS
/// may offer a just-released port again, and two nodes of one cluster must not share one).
pub fn free_port() -> io::Result<u16> {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
}

/// The command line of one `capdb server` process, `[WRAPPER...] BINARY server ARGS...`, the
/// arguments in the order the methods are called (`--node-id N`, `--data-dir D`, ...).
#[derive(Debug, Clone, Default)]
pub struct NodeCommand {
    wrapper: Vec<OsString>,
    binary: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    /// Log file (appended to), and whether stdout goes there too (else it is discarded).
    log: Option<(PathBuf, bool)>,
    own_group: bool,
}

impl NodeCommand {
    pub fn new(binary: impl Into<PathBuf>) -> NodeCommand {
        NodeCommand {
            binary: binary.into(),
            ..NodeCommand::default()
        }
    }

    /// Runs the node through a command that `exec`s it, e.g. `["ip", "netns", "exec", NS]`.
    pub fn wrapper<S: Into<OsString>>(mut self, argv: impl IntoIterator<Item = S>) -> Self {
        self.wrapper = argv.into_iter().map(Into::into).collect();
        self
    }

    fn flag(self, name: &str, value: impl Into<OsString>) -> Self {
        self.args([name.into(), value.into()])
    }

    pub fn node_id(self, id: u64) -> Self {
        self.flag("--node-id", id.to_string())
    }

    pub fn data_dir(self, dir: impl AsRef<Path>) -> Self {
        self.flag("--data-dir", dir.as_ref())
    }

    pub fn resp_addr(self, addr: impl ToString) -> Self {
        self.flag("--resp-addr", addr.to_string())
    }

    pub fn http_addr(self, addr: impl ToString) -> Self {
        self.flag("--http-addr", addr.to_string())
    }

    pub fn peer_addr(self, addr: impl ToString) -> Self {
        self.flag("--peer-addr", addr.to_string())
    }

    /// Founding member: `members` is `1=host:port,2=host:port,...`.
    pub fn initial_cluster(self, members: impl Into<OsString>) -> Self {
        self.flag("--initial-cluster", members)
    }

    /// Joins a running cluster through `seed`'s peer address.
    pub fn join(self, seed: impl Into<OsString>) -> Self {
        self.flag("--join", seed)
    }

    /// More `capdb server` arguments.
    pub fn args<S: Into<OsString>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Appends stdout and stderr to `path` (created if missing).
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some((path.into(), true));
        self
    }

    /// Appends stderr to `path` (created if missing) and discards stdout.
    pub fn stderr_log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some((path.into(), false));
        self
    }

    /// Puts the node in a process group of its own: a Ctrl-C at the terminal then reaches
    /// only the launcher, which stops the nodes itself.
    pub fn own_process_group(mut self) -> Self {
        self.own_group = true;
        self
    }

    /// The whole command line, program first.
    pub fn argv(&self) -> Vec<OsString> {
        let mut all = self.wrapper.clone();
        all.push(self.binary.clone().into());
        all.push("server".into());
        all.extend(self.args.iter().cloned());
        all
    }

    /// Starts the node (stdin from /dev/null) through [`launch`].
    pub fn spawn(&self) -> io::Result<LocalNode> {
        let argv = self.argv();
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some((path, with_stdout)) = &self.log {
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            if *with_stdout {
                cmd.stdout(log.try_clone()?);
            }
            cmd.stderr(log);
        }
        if self.own_group {
            cmd.process_group(0);
        }
        launch(cmd)
    }
}

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` with the parent-death signal, on the launcher thread (see the crate doc);
/// any thread may call it. The one place a node process (or a test's stand-in) is forked.
pub fn launch(mut cmd: Command) -> io::Result<LocalNode> {
    arm_parent_death(&mut cmd);
    // `None`: the launcher thread could not be started (the OS refused a thread).
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("capdb-launch".into())
            // Never returns: the sender lives in a static, so `rx` never closes.
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .ok()
            .map(|_| tx)
    });
    let gone = || io::Error::other("the capdb-launch thread could not start or is gone");
    let spawner = spawner.as_ref().ok_or_else(gone)?;
    let (reply, answer) = mpsc::channel();
    spawner.send((cmd, reply)).map_err(|_| gone())?;
    let child = answer.recv().map_err(|_| gone())??;
    Ok(LocalNode { child })
}

#[cfg(target_os = "linux")]
fn arm_parent_death(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    let kill = libc::SIGKILL as libc::c_ulong;
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed: it makes two raw syscalls (prctl, getppid) and reads errno; it does
    // not allocate, lock or touch anything shared with the parent's other threads.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, kill, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The launcher died before the prctl: we were already reparented. Fail the spawn
            // (std then exits the child) rather than run an orphan.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn arm_parent_death(_: &mut Command) {}

/// A running (or exited, not yet dropped) node process. Dropping it SIGKILLs and reaps it.
#[derive(Debug)]
pub struct LocalNode {
    child: Child,
}

impl LocalNode {
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if it has exited (reaping it), else `None`.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().ok().flatten().is_none()
    }

    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait()
    }

    /// Polls until it exits or `deadline` passes; `None` if it still runs.
    pub fn wait_until(&mut self, deadline: Instant) -> io::Result<Option<ExitStatus>> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (also when paused) and reap.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        let _ = self.child.kill();
        self.child.wait()
    }

    /// SIGTERM (a graceful shutdown), then waits up to `within` (zero: not at all); `None`
    /// if it still runs. Several nodes stop in parallel: `terminate(ZERO)` each, then
    /// [`LocalNode::wait_until`] a common deadline.
    pub fn terminate(&mut self, within: Duration) -> io::Result<Option<ExitStatus>> {
        self.signal("TERM")?;
        self.wait_until(Instant::now() + within)
    }

    /// SIGSTOP.
    pub fn pause(&mut self) -> io::Result<()> {
        self.signal("STOP")
    }

    /// SIGCONT.
    pub fn resume(&mut self) -> io::Result<()> {
        self.signal("CONT")
    }

    /// Sends a signal with kill(1) (no `unsafe` outside `pre_exec`). A no-op once reaped: the
    /// pid may belong to another process by then. Until reaped it cannot be reused.
    fn signal(&mut self, name: &str) -> io::Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let out = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "kill -{name} {}: {}",
                self.child.id(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
