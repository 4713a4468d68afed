//! `tessera launch`: starts the ranks of a multi-process job on this node and supervises them.
//!
//! Each rank is a child process with `TESSERA_RANK`, `TESSERA_WORLD_SIZE`, `TESSERA_LOCAL_RANK`,
//! `TESSERA_MASTER_ADDR`, `TESSERA_MASTER_PORT` and `TESSERA_JOB_TOKEN` set (and torchrun's names
//! for programs that read those). Rank 0 hosts the rendezvous store. The children's stderr comes
//! through with a `[rank i]` prefix; stdout is passed through untouched (only rank 0 prints
//! results). When a rank fails (non-zero exit or killed by a signal), the others get a few seconds
//! to notice and exit with their own message, then are killed; the launcher exits naming the rank
//! that failed first, with that rank's exit status (128 + the signal for one killed by a signal,
//! as a shell reports it), as `mpirun` does. SIGINT, SIGTERM and SIGHUP sent to the launcher are
//! passed on to every rank (a rank that has not ended a few seconds later is killed), so that
//! stopping the launcher (a scheduler's `kill`, a closed terminal) stops the job instead of
//! orphaning it. Each rank leads a process group: what it starts is signalled and killed with it,
//! and ends with the job.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

#[derive(clap::Args, Debug)]
pub struct LaunchArgs {
    /// Ranks (processes) to start on this node.
    #[arg(long)]
    pub nproc_per_node: usize,
    /// Nodes in the job; start `tessera launch` on each, with its --node-rank.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, 0..nnodes; node 0 runs rank 0, which hosts the rendezvous store.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Host of node 0 as every node sees it. Default on one node: 127.0.0.1.
    #[arg(long)]
    pub master_addr: Option<String>,
    /// Port of the rendezvous store on node 0. Default: a free port on one node (below the
    /// ephemeral range), 29500 across nodes.
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Deadline in seconds of every rendezvous and collective wait (sets TESSERA_COMM_TIMEOUT_S).
    #[arg(long, allow_negative_numbers = true)]
    pub timeout: Option<f64>,
    /// Check that all ranks issue the same collectives with the same sizes, naming the first
    /// mismatch (sets TESSERA_COMM_CHECK=1).
    #[arg(long)]
    pub comm_check: bool,
    /// Secret shared by the ranks of this job (the same on every node). Default: TESSERA_JOB_TOKEN,
    /// else random on one node, else derived from the master address.
    #[arg(long)]
    pub job_token: Option<String>,
    /// The command every rank runs, after `--`; `tessera` means this binary.
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

/// A job to start on this node.
pub struct JobSpec {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub job_token: String,
    pub extra_env: Vec<(String, String)>,
    pub cmd: Vec<String>,
}

pub fn run(a: LaunchArgs) -> Result<()> {
    if a.nproc_per_node == 0 || a.nproc_per_node > MAX_LOCAL_RANKS {
        bail!(
            "--nproc-per-node must be between 1 and {MAX_LOCAL_RANKS}, got {}",
            a.nproc_per_node
        );
    }
    if a.nnodes == 0 {
        bail!("--nnodes must be at least 1");
    }
    let world = a.nproc_per_node.checked_mul(a.nnodes);
    if world.is_none_or(|w| w > tessera_comm::MAX_WORLD_SIZE) {
        bail!(
            "--nproc-per-node {} x --nnodes {} is more than {} ranks",
            a.nproc_per_node,
            a.nnodes,
            tessera_comm::MAX_WORLD_SIZE
        );
    }
    if a.node_rank >= a.nnodes {
        bail!(
            "--node-rank {} is not below --nnodes {}",
            a.node_rank,
            a.nnodes
        );
    }
    let master_addr = match (&a.master_addr, a.nnodes) {
        (Some(h), _) if h.trim().is_empty() => bail!("--master-addr is empty"),
        (Some(h), _) => h.trim().to_string(),
        (None, 1) => "127.0.0.1".to_string(),
        (None, _) => bail!("a job of several nodes needs --master-addr (the host of node 0)"),
    };
    let master_port = match (a.master_port, a.nnodes) {
        (Some(0), _) => bail!("--master-port must be a port number from 1 to 65535"),
        (Some(p), _) => p,
        (None, 1) => tessera_comm::rendezvous::free_port()?,
        (None, _) => 29500,
    };
    let mut extra_env = Vec::new();
    if let Some(t) = a.timeout {
        if !tessera_comm::timeout_in_range(t) {
            bail!(
                "--timeout must be a number of seconds from {} to below {:e}, got {t:?}",
                tessera_comm::MIN_TIMEOUT_S,
                tessera_comm::MAX_TIMEOUT_S
            );
        }
        extra_env.push(("TESSERA_COMM_TIMEOUT_S".into(), t.to_string()));
    }
    if a.comm_check {
        extra_env.push(("TESSERA_COMM_CHECK".into(), "1".into()));
    }
    let job_token = match (
        a.job_token,
        std::env::var("TESSERA_JOB_TOKEN").ok(),
        a.nnodes,
    ) {
        (Some(t), _, _) | (None, Some(t), _) => t,
        (None, None, 1) => format!("{:016x}", rand::random::<u64>()),
        (None, None, _) => format!("tessera-{master_addr}:{master_port}"),
    };
    if job_token.trim().is_empty() {
        bail!("the job token (--job-token or TESSERA_JOB_TOKEN) must not be empty");
    }
    run_job(JobSpec {
        nproc_per_node: a.nproc_per_node,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr,
        master_port,
        job_token,
        extra_env,
        cmd: a.cmd,
    })
}

struct Rank {
    rank: usize,
    pid: u32,
    child: Child,
    status: Option<ExitStatus>,
    last_line: Arc<Mutex<String>>,
    forward: Option<JoinHandle<()>>,
}

impl Rank {
    /// Kills the rank and what it started (its group) and waits for it.
    fn kill(&mut self) {
        self.status = kill_group(&mut self.child);
    }
}

/// Kills a started rank process and the group it leads, and waits for it.
fn kill_group(child: &mut Child) -> Option<ExitStatus> {
    signals::send(child.id(), signals::KILL);
    let _ = child.kill();
    child.wait().ok()
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => " (SIGHUP)",
        2 => " (SIGINT)",
        6 => " (SIGABRT)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        13 => " (SIGPIPE)",
        15 => " (SIGTERM)",
        _ => "",
    }
}

/// A job that failed: what the launcher says, and the status it exits with (the first failed
/// rank's).
#[derive(Debug)]
pub struct JobFailed {
    pub msg: String,
    pub status: i32,
}

impl std::fmt::Display for JobFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for JobFailed {}

/// A rank's failure (or the launcher's signal): whether a signal ended it, and what the launcher
/// says and exits with.
struct Failure {
    by_signal: bool,
    job: JobFailed,
}

impl Failure {
    fn new(by_signal: bool, msg: String, status: i32) -> Self {
        Failure {
            by_signal,
            job: JobFailed { msg, status },
        }
    }
}

/// Why a rank's exit is a failure, or `None` if it succeeded.
fn failure(r: &Rank, status: ExitStatus) -> Option<Failure> {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        return Some(Failure::new(
            true,
            format!(
                "rank {} (pid {}) was killed by signal {sig}{}",
                r.rank,
                r.pid,
                signal_name(sig)
            ),
            128 + sig,
        ));
    }
    match status.code() {
        Some(0) => None,
        code => {
            let status = code.unwrap_or(1);
            let code = code.map(|c| c.to_string()).unwrap_or_else(|| "?".into());
            let last = r.last_line.lock().map(|l| l.clone()).unwrap_or_default();
            let why = if last.is_empty() {
                String::new()
            } else {
                format!(": {last}")
            };
            Some(Failure::new(
                false,
                format!(
                    "rank {} (pid {}) exited with status {code}{why}",
                    r.rank, r.pid
                ),
                status,
            ))
        }
    }
}

/// The most ranks one node starts (far beyond its cores or GPUs; a larger count is a mistake
/// that would exhaust the machine's processes).
pub const MAX_LOCAL_RANKS: usize = 1024;

/// Starts this node's ranks of `spec` and waits for them; an error names the rank that failed.
pub fn run_job(spec: JobSpec) -> Result<()> {
    let world = spec.nproc_per_node * spec.nnodes;
    let Some(program) = spec.cmd.first() else {
        bail!("nothing to launch: give the command after `--`");
    };
    let program = if program == "tessera" {
        std::env::current_exe().context("cannot find the tessera binary")?
    } else {
        program.into()
    };
    signals::catch();
    // Until it is dropped (the job's end, or a failed start).
    let adoption = signals::Adoption::start();
    let mut ranks: Vec<Rank> = Vec::new();
    for local in 0..spec.nproc_per_node {
        let rank = spec.node_rank * spec.nproc_per_node + local;
        let mut cmd = Command::new(&program);
        cmd.args(&spec.cmd[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped());
        let vars = [
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", world.to_string()),
            ("LOCAL_RANK", local.to_string()),
            ("LOCAL_WORLD_SIZE", spec.nproc_per_node.to_string()),
            ("MASTER_ADDR", spec.master_addr.clone()),
            ("MASTER_PORT", spec.master_port.to_string()),
            ("JOB_TOKEN", spec.job_token.clone()),
        ];
        for (k, v) in &vars {
            cmd.env(format!("TESSERA_{k}"), v);
            if *k != "JOB_TOKEN" {
                cmd.env(k, v);
            }
        }
        for (k, v) in &spec.extra_env {
            cmd.env(k, v);
        }
        // Each rank leads a process group of its own: a signal or a kill reaches what the rank
        // started too (`sh -c "tessera ..."`), which would otherwise live on, orphaned, holding
        // the rank's stderr (and so the launcher) open. Terminal signals reach the launcher
        // alone, which passes them on.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // A launcher killed outright (SIGKILL, the OOM killer) cannot pass anything on: the
        // kernel sends each rank SIGTERM when it dies (the rank itself, the leader of its group:
        // a `tessera` rank ends; what a shell rank started lives on), so a job does not run on
        // without its launcher.
        #[cfg(target_os = "linux")]
        {
            let launcher = std::process::id() as libc::pid_t;
            // SAFETY: between fork and exec only async-signal-safe calls (prctl, getppid, kill).
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The launcher died before the prctl: this process has another parent now.
                    if libc::getppid() != launcher {
                        libc::kill(libc::getpid(), libc::SIGTERM);
                    }
                    Ok(())
                });
            }
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                end_started(&mut ranks);
                bail!("cannot start rank {rank} ({}): {e}", program.display());
            }
        };
        let last_line = Arc::new(Mutex::new(String::new()));
        let forward = match child.stderr.take() {
            None => None,
            Some(err) => {
                let last = last_line.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("rank {rank} stderr"))
                    .spawn(move || forward_stderr(rank, err, &last));
                match spawned {
                    Ok(h) => Some(h),
                    Err(e) => {
                        // Out of threads: this rank and those started go; one line says why.
                        kill_group(&mut child);
                        end_started(&mut ranks);
                        bail!("cannot follow rank {rank}'s output: {e}");
                    }
                }
            }
        };
        ranks.push(Rank {
            rank,
            pid: child.id(),
            child,
            status: None,
            last_line,
            forward,
        });
    }
    supervise(ranks, &adoption)
}

/// Kills the ranks started so far (their groups) and waits for them: the job could not start.
fn end_started(ranks: &mut [Rank]) {
    ranks.iter_mut().for_each(Rank::kill);
}

fn forward_stderr(rank: usize, err: impl std::io::Read, last: &Mutex<String>) {
    let mut r = BufReader::new(err);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end();
                let _ = writeln!(std::io::stderr().lock(), "[rank {rank}] {text}");
                if !text.trim().is_empty() {
                    if let Ok(mut l) = last.lock() {
                        *l = text.to_string();
                    }
                }
            }
        }
    }
}

/// How long the other ranks get to exit on their own (with their own message) after one fails:
/// a rank's abort takes up to 2.3 s (2 s to pass its word to its peers, 0.3 s before it closes
/// its connections) and a loaded machine can slow it a few seconds more; only a hung rank waits
/// this long.
const GRACE: Duration = Duration::from_secs(10);

fn supervise(mut ranks: Vec<Rank>, adoption: &signals::Adoption) -> Result<()> {
    let mut first_failure: Option<(Instant, Failure)> = None;
    let mut killed = 0;
    let rank_pids: Vec<u32> = ranks.iter().map(|r| r.pid).collect();
    let mut reaped_at = Instant::now();
    loop {
        // Orphans adopted during the job that have ended are reaped now and then, not left as
        // zombies until its end (the ranks themselves are waited for below).
        if reaped_at.elapsed() > Duration::from_secs(1) {
            adoption.living(&rank_pids);
            reaped_at = Instant::now();
        }
        // A signal to the launcher: passed on to every rank still running; the job then ends as
        // after a failure (a grace period, then the rest killed), naming the signal.
        if let Some(sig) = signals::take() {
            let mut told = 0;
            for r in ranks.iter().filter(|r| r.status.is_none()) {
                signals::send(r.pid, sig);
                told += 1;
            }
            if first_failure.is_none() {
                let msg =
                    format!("the launcher got signal {sig} and passed it on to {told} rank(s)");
                first_failure = Some((Instant::now(), Failure::new(true, msg, 128 + sig)));
            }
        }
        let mut failures_now = Vec::new();
        for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
            if let Ok(Some(st)) = r.child.try_wait() {
                r.status = Some(st);
                if let Some(f) = failure(r, st) {
                    failures_now.push(f);
                }
            }
        }
        // A rank killed by a signal is the root cause of the others' errors seen at the same time.
        failures_now.sort_by_key(|f| !f.by_signal);
        if first_failure.is_none() {
            if let Some(f) = failures_now.into_iter().next() {
                first_failure = Some((Instant::now(), f));
            }
        }
        if ranks.iter().all(|r| r.status.is_some()) {
            break;
        }
        if let Some((t, _)) = &first_failure {
            if t.elapsed() > GRACE {
                for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
                    r.kill();
                    killed += 1;
                }
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The job is over: what its ranks started and left behind goes too (their groups, and what
    // left the groups and was orphaned into the launcher's care: see `signals::Adoption`),
    // so that nothing outlives the job or holds a rank's stderr (and so the launcher) open past
    // it. After a failure at once; after a success asked first (SIGTERM), killed if still there
    // 2 s later. (Every rank has been waited for here, so the launcher's other children are
    // adopted ones.)
    if first_failure.is_none() {
        adoption.end_leftovers(&rank_pids, signals::TERM, Duration::from_secs(2));
    }
    adoption.end_leftovers(&rank_pids, signals::KILL, Duration::from_secs(2));
    for r in &mut ranks {
        if let Some(h) = r.forward.take() {
            let _ = h.join();
        }
    }
    match first_failure {
        None => Ok(()),
        Some((_, Failure { mut job, .. })) => {
            if killed > 0 {
                job.msg += &format!("; killed {killed} rank(s) that were still running");
            }
            Err(job.into())
        }
    }
}

/// The signals the launcher passes on to its ranks (unix; elsewhere nothing is caught).
mod signals {
    use std::sync::atomic::{AtomicI32, Ordering};

    /// The last signal caught and not yet passed on (0: none).
    static PENDING: AtomicI32 = AtomicI32::new(0);

    #[cfg(unix)]
    extern "C" fn on_signal(sig: libc::c_int) {
        // Async-signal-safe: one atomic store.
        PENDING.store(sig, Ordering::SeqCst);
    }

    /// Catches SIGINT, SIGTERM and SIGHUP from here on (they no longer end the launcher at once).
    pub fn catch() {
        #[cfg(unix)]
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
            unsafe {
                libc::signal(
                    sig,
                    on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
                );
            }
        }
    }

    /// The signal caught since the last call, if any.
    pub fn take() -> Option<i32> {
        match PENDING.swap(0, Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    pub const KILL: i32 = libc::SIGKILL;
    pub const TERM: i32 = libc::SIGTERM;

    /// Whether any process of the group a rank led still lives.
    pub fn group_alive(pid: u32) -> bool {
        #[cfg(unix)]
        // SAFETY: kill(2) with signal 0 only checks that the group exists.
        unsafe {
            libc::kill(-(pid as libc::pid_t), 0) == 0
        }
        #[cfg(not(unix))]
        {
            let _ = pid;
            false
        }
    }

    /// `sig` to the process group a rank leads (the rank and what it started; the group's id is
    /// the rank's pid, which the group keeps while any member lives).
    pub fn send(pid: u32, sig: i32) {
        #[cfg(unix)]
        // SAFETY: kill(2) on the process group of a child this process started; a group that is
        // gone is an error (ESRCH) and nothing else.
        unsafe {
            libc::kill(-(pid as libc::pid_t), sig);
        }
        #[cfg(not(unix))]
        let _ = (pid, sig);
    }

    /// The launcher as the reaper of its ranks' orphans (Linux: `PR_SET_CHILD_SUBREAPER`), from
    /// [`start`](Adoption::start) until dropped: what a rank started and detached from its group
    /// (`setsid`, a daemon's double fork) becomes the launcher's child when its parent ends,
    /// instead of init's, and so within reach of the end-of-job cleanup. The children the
    /// launcher had before (a program that `exec`ed it may have left some) are never touched.
    /// Elsewhere nothing is adopted.
    pub struct Adoption {
        before: std::collections::HashSet<u32>,
        was_reaper: bool,
    }

    impl Adoption {
        pub fn start() -> Adoption {
            let before = children().into_iter().collect();
            #[allow(unused_mut)]
            let mut was_reaper = false;
            #[cfg(target_os = "linux")]
            // SAFETY: prctl(2) with PR_GET/SET_CHILD_SUBREAPER reads or sets a flag of this
            // process; the GET form writes one int through the pointer given.
            unsafe {
                let mut flag: libc::c_int = 0;
                if libc::prctl(
                    libc::PR_GET_CHILD_SUBREAPER,
                    &mut flag as *mut libc::c_int as libc::c_ulong,
                    0,
                    0,
                    0,
                ) == 0
                {
                    was_reaper = flag != 0;
                }
                libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
            }
            Adoption { before, was_reaper }
        }

        /// The adopted orphans still living: the launcher's children other than `ranks` (the
        /// rank processes, which their `Child` waits for) and those it had before. Those that
        /// have ended are reaped on the way.
        pub fn living(&self, ranks: &[u32]) -> Vec<u32> {
            let mut out = Vec::new();
            for pid in children() {
                if ranks.contains(&pid) || self.before.contains(&pid) {
                    continue;
                }
                #[cfg(unix)]
                {
                    let mut st = 0;
                    // SAFETY: waitpid(2) on a child of this process, not blocking.
                    if unsafe { libc::waitpid(pid as libc::pid_t, &mut st, libc::WNOHANG) } != 0 {
                        continue;
                    }
                }
                out.push(pid);
            }
            out
        }

        /// `sig` to what the job left: the groups the ranks led (`ranks`: their pids) and the
        /// adopted orphans (each and the group it leads, if it leads one), again as long as any
        /// is left (a killed orphan's own children are adopted in turn), for at most `patience`.
        pub fn end_leftovers(&self, ranks: &[u32], sig: i32, patience: std::time::Duration) {
            let start = std::time::Instant::now();
            // SIGTERM is asked once of each (a process may take its time to end); SIGKILL each
            // round.
            let mut told = std::collections::HashSet::new();
            loop {
                let alive: Vec<u32> = ranks.iter().copied().filter(|&g| group_alive(g)).collect();
                let orphans = self.living(ranks);
                if alive.is_empty() && orphans.is_empty() {
                    return;
                }
                for &g in &alive {
                    if sig == KILL || told.insert(("group", g)) {
                        send(g, sig);
                    }
                }
                for &p in &orphans {
                    if sig == KILL || told.insert(("orphan", p)) {
                        #[cfg(unix)]
                        // SAFETY: kill(2) on an adopted child of this process (and on the group
                        // it leads, where it leads one; getpgid(2) only reads).
                        unsafe {
                            libc::kill(p as libc::pid_t, sig);
                            if libc::getpgid(p as libc::pid_t) == p as libc::pid_t {
                                libc::kill(-(p as libc::pid_t), sig);
                            }
                        }
                    }
                }
                if start.elapsed() >= patience {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }

    impl Drop for Adoption {
        fn drop(&mut self) {
            #[cfg(target_os = "linux")]
            if !self.was_reaper {
                // SAFETY: as in `start`.
                unsafe {
                    libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0);
                }
            }
        }
    }

    /// This process's children (Linux: from /proc; elsewhere none).
    fn children() -> Vec<u32> {
        #[cfg(target_os = "linux")]
        {
            let me = std::process::id();
            let Ok(dir) = std::fs::read_dir("/proc") else {
                return Vec::new();
            };
            dir.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
                .filter(|pid| {
                    let stat =
                        std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    // The fields after the command name's closing ")": state, ppid, ...
                    stat.rsplit(')')
                        .next()
                        .and_then(|rest| rest.split_whitespace().nth(1))
                        .and_then(|p| p.parse::<u32>().ok())
                        == Some(me)
                })
                .collect()
        }
        #[cfg(not(target_os = "linux"))]
        Vec::new()
    }
}
