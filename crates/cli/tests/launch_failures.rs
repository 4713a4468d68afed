//! A multi-process job never hangs: a rank killed with SIGKILL in the middle of an all-reduce, a
//! rank that never joins and a mismatched collective each end the whole job with a non-zero exit
//! and a message naming the rank at fault, long before the deadline. Bad launch input is one clear
//! line, never a panic.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

/// A free port below the ephemeral range, as `tessera launch` picks one.
fn free_port() -> u16 {
    tessera_comm::rendezvous::free_port().unwrap()
}

/// Waits for `child` at most `limit` (killing it after), returning its exit code and stderr.
fn finish(mut child: Child, limit: Duration) -> (Option<i32>, String, Duration) {
    let start = Instant::now();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    let stderr = reader.join().unwrap();
    assert!(
        status.is_some(),
        "the job hung for {limit:?}; stderr:\n{stderr}"
    );
    (status.and_then(|s| s.code()), stderr, elapsed)
}

/// The fields of `/proc/<pid>/stat` after the ")" that closes the command name (state, ppid,
/// ...); none when the process is gone.
fn stat_fields(pid: u32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')')
        .next()
        .filter(|_| !stat.is_empty())
        .map(|rest| rest.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The pid of the child of `parent` whose environment says `TESSERA_RANK=rank`.
fn rank_pid(parent: u32, rank: usize) -> Option<u32> {
    let want = format!("TESSERA_RANK={rank}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let ppid: Option<u32> = stat_fields(pid).get(1).and_then(|p| p.parse().ok());
        if ppid != Some(parent) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if env.split(|b| *b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn kill_9_of_a_rank_mid_all_reduce_ends_the_job_naming_it() {
    let mut child = bin()
        .args([
            "launch",
            "--nproc-per-node",
            "3",
            "--timeout",
            "120",
            "--",
            "tessera",
            "bench",
            "comm",
            "--backend",
            "tcp",
            "--sizes",
            "4M",
            "--iters",
            "100000000",
            "--warmup",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Rank 0 prints the table header once every rank is connected; then all-reduces run back to
    // back, so a kill lands inside one.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 && !line.contains("size(B)") {
        line.clear();
    }
    std::thread::sleep(Duration::from_millis(500));
    let pid = rank_pid(child.id(), 1).expect("rank 1 is running");
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let (code, err, _) = finish(child, Duration::from_secs(60));
    // The killed rank's status as a shell reports it: 128 + SIGKILL.
    assert_eq!(code, Some(137), "{err}");
    // The launcher names the killed rank; the survivors name it too, each in its own words.
    assert!(
        err.contains(&format!("rank 1 (pid {pid}) was killed by signal 9")),
        "{err}"
    );
    for r in [0, 2] {
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with(&format!("[rank {r}] error")))
            .collect();
        assert!(
            lines.iter().any(|l| l.contains("rank 1")),
            "rank {r} does not name rank 1:\n{err}"
        );
    }
    // Detected from the closed connection, not by waiting out the 120 s deadline (which would
    // say "timed out"; `finish` gives the job 60 s).
    assert!(!err.contains("timed out"), "{err}");
}

#[test]
fn a_rank_that_never_joins_is_named() {
    // Two nodes of one rank each; node 1 is never started.
    let port = free_port().to_string();
    let child = launch_bench_comm(&[
        "--nnodes",
        "2",
        "--node-rank",
        "0",
        "--nproc-per-node",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        &port,
        "--timeout",
        "2",
    ])
    .args(["--backend", "tcp", "--sizes", "1K"])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let (code, err, _) = finish(child, Duration::from_secs(60));
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("rank(s) [1] never joined"), "{err}");
    assert!(
        err.lines()
            .last()
            .unwrap_or("")
            .starts_with("error: rank 0"),
        "{err}"
    );
}

fn mismatched_job(check: bool) -> String {
    let mut args = vec!["launch", "--nproc-per-node", "3", "--timeout", "60"];
    if check {
        args.push("--comm-check");
    }
    args.extend([
        "--",
        "tessera",
        "bench",
        "comm",
        "--backend",
        "tcp",
        "--sizes",
        "4K",
        "--fault-mismatch-rank",
        "2",
    ]);
    let child = bin()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, err, _) = finish(child, Duration::from_secs(60));
    assert_ne!(code, Some(0), "{err}");
    // Found by the check, not by waiting out the 120 s deadline (`finish` gives the job 60 s).
    assert!(!err.contains("timed out"), "{err}");
    err
}

#[test]
fn a_mismatched_collective_is_named() {
    let err = mismatched_job(false);
    assert!(err.contains("collective mismatch"), "{err}");
    assert!(
        err.contains("rank 2 issued all_reduce of 4100 bytes"),
        "{err}"
    );
}

#[test]
fn check_mode_names_the_first_mismatch_on_every_rank() {
    let err = mismatched_job(true);
    let want = "collective #0: rank 0 issued all_reduce of 4096 bytes (F32, Sum) but rank 2 issued all_reduce of 4100 bytes (F32, Sum)";
    for r in 0..3 {
        assert!(
            err.lines()
                .any(|l| l.starts_with(&format!("[rank {r}]")) && l.contains(want)),
            "rank {r}:\n{err}"
        );
    }
}

/// One line on stderr, a non-zero exit, naming `needle`.
fn fails_with(mut cmd: Command, needle: &str) {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(needle), "{err:?} does not name {needle:?}");
}

/// `tessera launch FLAGS -- tessera bench comm`.
fn launch_bench_comm(flags: &[&str]) -> Command {
    let mut c = bin();
    c.arg("launch")
        .args(flags)
        .args(["--", "tessera", "bench", "comm"]);
    c
}

#[test]
fn bad_launch_input_is_one_clear_line() {
    fails_with(
        launch_bench_comm(&["--nproc-per-node", "0"]),
        "--nproc-per-node must be between 1 and 1024, got 0",
    );
    fails_with(
        launch_bench_comm(&["--nproc-per-node", "1", "--nnodes", "2"]),
        "needs --master-addr",
    );
    let mut c = bin();
    c.args(["launch", "--nproc-per-node", "2", "--", "/no/such/program"]);
    fails_with(c, "cannot start rank 0");
    // Refused before any rank starts (one line, not a rank's and then the launcher's).
    let mut c = bin();
    c.args(["bench", "comm", "--backend", "tcp", "--nproc", "1"]);
    fails_with(c, "needs at least 2 ranks");
    let timeout = |t: &str| launch_bench_comm(&["--nproc-per-node", "1", "--timeout", t]);
    fails_with(timeout("-3"), "--timeout");
    // A deadline the ranks would refuse, found by the launcher before it starts them.
    fails_with(
        timeout("1e300"),
        "--timeout must be a number of seconds from 0.001 to below 1e9",
    );
    // One too short to be a deadline (every wait would end at once).
    fails_with(
        timeout("1e-300"),
        "--timeout must be a number of seconds from 0.001",
    );
    // More ranks than a job may have (here, more than a usize counts): not an overflow.
    let mut c = bin();
    c.args([
        "launch",
        "--nproc-per-node",
        "2",
        "--nnodes",
        "9223372036854775808",
        "--node-rank",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--",
        "true",
    ]);
    fails_with(c, "is more than 1048576 ranks");
}

fn as_rank(rank: usize, world: usize, port: u16) -> Command {
    let mut c = bin();
    c.args(["bench", "comm", "--backend", "tcp", "--sizes", "1K"])
        .env("TESSERA_RANK", rank.to_string())
        .env("TESSERA_WORLD_SIZE", world.to_string())
        .env("TESSERA_MASTER_ADDR", "127.0.0.1")
        .env("TESSERA_MASTER_PORT", port.to_string())
        .env("TESSERA_JOB_TOKEN", "job-a")
        .env("TESSERA_COMM_TIMEOUT_S", "1");
    c
}

#[test]
fn bad_rank_environment_is_one_clear_line() {
    let mut c = as_rank(0, 2, free_port());
    c.env("TESSERA_RANK", "abc");
    fails_with(c, "TESSERA_RANK=\"abc\" is not a non-negative integer");
    let mut c = as_rank(0, 2, free_port());
    c.env("TESSERA_RANK", "5");
    fails_with(c, "rank 5 is not a rank of a job of 2");
    // A world too large to list its ranks: refused, not an aborted allocation.
    let mut c = as_rank(0, 2, free_port());
    c.env("TESSERA_WORLD_SIZE", (1u64 << 41).to_string());
    fails_with(c, "a job of 2199023255552 ranks is more than 1048576");
    let mut c = as_rank(0, 2, free_port());
    c.env("TESSERA_COMM_TIMEOUT_S", "soon");
    fails_with(c, "TESSERA_COMM_TIMEOUT_S must be a number");
    // Rank 1 alone: nobody hosts the store.
    fails_with(
        as_rank(1, 2, free_port()),
        "cannot reach the rendezvous store",
    );
    let mut c = as_rank(1, 2, free_port());
    c.env("TESSERA_MASTER_ADDR", "no-such-host.invalid");
    fails_with(c, "cannot resolve master address");
}

#[test]
fn a_rank_with_another_jobs_token_is_turned_away() {
    let port = free_port();
    let mut r0 = as_rank(0, 2, port);
    r0.env("TESSERA_COMM_TIMEOUT_S", "10")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let r0 = r0.spawn().unwrap();
    let mut r1 = as_rank(1, 2, port);
    r1.env("TESSERA_JOB_TOKEN", "job-b")
        .env("TESSERA_COMM_TIMEOUT_S", "10");
    fails_with(r1, "wrong job token");
    let mut r0 = r0;
    let _ = r0.kill();
    let _ = r0.wait();
}

/// `tessera launch` of two ranks, each `sh -c script`; stdout dropped, stderr piped.
fn two_shell_ranks(script: &str) -> Command {
    let mut cmd = bin();
    cmd.args(["launch", "--nproc-per-node", "2", "--", "sh", "-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// The launcher exits with the status of the rank that failed first, as `mpirun` does; the other
/// rank, a shell waiting on a child of its own (which holds its stderr open), is ended with that
/// child (its process group), within the grace period.
#[test]
fn the_launcher_exits_with_the_failed_ranks_status() {
    let mut cmd = two_shell_ranks("[ \"$TESSERA_RANK\" = 1 ] && exit 3; sleep 300");
    let (code, err, _) = finish(cmd.spawn().unwrap(), Duration::from_secs(30));
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("rank 1") && err.contains("status 3"), "{err}");
}

/// A rank that succeeds but leaves a child running (which holds the rank's stderr) does not keep
/// the launcher: the job ends with its ranks, and the child with it.
#[test]
fn what_a_finished_rank_left_running_ends_with_the_job() {
    what_ranks_leave_ends_with_the_job("sleep 60 & echo $! > \"$LEFT_DIR/$TESSERA_RANK\"");
}

/// Two shell ranks run `script`, which writes the pid of what it leaves running to
/// `$LEFT_DIR/<rank>`: the job succeeds, and what each rank left has ended with it.
fn what_ranks_leave_ends_with_the_job(script: &str) {
    let mut cmd = two_shell_ranks(script);
    let dir = tempfile::tempdir().unwrap();
    cmd.env("LEFT_DIR", dir.path());
    let (code, err, _) = finish(cmd.spawn().unwrap(), Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    for rank in 0..2 {
        let pid = pid_in(&dir.path().join(rank.to_string()));
        let stat = stat_fields(pid);
        assert!(
            ended(&stat),
            "rank {rank}'s child {pid} still runs: {stat:?}"
        );
    }
}

/// The pid a test's shell wrote to `path`.
fn pid_in(path: &std::path::Path) -> u32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Whether the process whose `stat_fields` these are has ended: gone, or a zombie not yet reaped.
fn ended(stat: &[String]) -> bool {
    matches!(stat.first().map(String::as_str), None | Some("Z"))
}

/// What a rank detached from its process group (a daemon: a new session, its parent gone) is
/// adopted by the launcher and ends with the job too, though no signal to the rank's group reaches
/// it; before, it held the rank's stderr and so kept the launcher waiting as long as it lived.
#[test]
fn what_a_rank_detached_ends_with_the_job() {
    if Command::new("setsid").arg("true").status().is_err() {
        eprintln!("skipped: no setsid on this machine");
        return;
    }
    what_ranks_leave_ends_with_the_job(
        "setsid sh -c 'sleep 60 & echo $! > \"$LEFT_DIR/$TESSERA_RANK\"'; echo started >&2",
    );
}

/// A process the launcher did not start (a child of the shell that `exec`ed it) is not the job's:
/// the end-of-job cleanup leaves it running.
#[test]
fn a_child_the_launcher_inherited_is_not_the_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let side = dir.path().join("side");
    let script = format!(
        "sleep 60 >/dev/null 2>&1 & echo $! > '{}'; exec '{}' launch --nproc-per-node 1 -- true",
        side.display(),
        env!("CARGO_BIN_EXE_tessera")
    );
    let child = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, err, _) = finish(child, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    let pid = pid_in(&side);
    let stat = stat_fields(pid);
    let _ = Command::new("kill").arg(pid.to_string()).status();
    assert!(
        !ended(&stat),
        "the shell's own child {pid} was ended with the job: {stat:?}"
    );
}

/// SIGTERM to the launcher reaches every rank: the job ends within seconds naming the signal,
/// and no rank outlives the launcher (ranks that ignore stdin and print nothing: `sleep`).
#[test]
fn a_signal_to_the_launcher_ends_every_rank() {
    let mut cmd = bin();
    cmd.args(["launch", "--nproc-per-node", "2", "--", "sleep", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let launcher = child.id();
    // Both ranks started.
    let start = Instant::now();
    let pids = loop {
        let p: Vec<u32> = (0..2).filter_map(|r| rank_pid(launcher, r)).collect();
        if p.len() == 2 {
            break p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "ranks did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let ok = Command::new("kill")
        .args(["-TERM", &launcher.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let (code, err, _) = finish(child, Duration::from_secs(30));
    // 128 + SIGTERM, as a shell reports a job ended by it.
    assert_eq!(code, Some(143), "{err}");
    assert!(err.contains("got signal 15"), "{err}");
    for pid in pids {
        // Reaped by the launcher: gone (or, were the pid reused, no longer the launcher's child).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert_ne!(
            stat_fields(pid).get(1),
            Some(&launcher.to_string()),
            "rank {pid} outlived it"
        );
        assert!(
            !stat.contains("(sleep)"),
            "rank {pid} is still running: {stat}"
        );
    }
}

/// A rank whose peers finished and left says which one left and exits 1; it is not killed by
/// SIGPIPE while it tells the others to stop (its write to a peer's closed socket), which once
/// ended it silently with status 141 three times out of four.
#[test]
fn a_rank_left_alone_names_the_rank_that_left() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/hf/llama");
    let script = format!(
        "if [ $RANK = 1 ]; then t=8; else t=4; fi; exec {} generate --model {fixture} --prompt hi --max-tokens $t --tp 4",
        env!("CARGO_BIN_EXE_tessera")
    );
    for _ in 0..3 {
        let child = bin()
            .args(["launch", "--nproc-per-node", "4", "--", "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (code, err, _) = finish(child, Duration::from_secs(60));
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains("rank 1: lost rank 0: rank 0 closed its connection"),
            "{err}"
        );
        assert!(!err.contains("signal 13"), "{err}");
    }
}

/// A launcher whose own stderr reader has gone (`tessera launch ... 2>&1 | head -1`) goes on
/// supervising: its ranks run to their end and the job's status is theirs (it once died of
/// SIGPIPE at its first line and left the ranks running).
#[test]
fn a_launcher_whose_stderr_reader_is_gone_still_waits_for_its_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let done = dir.path().join("done");
    let script = format!(
        "echo start $RANK >&2; sleep 1; echo $RANK >> {}",
        done.display()
    );
    let mut child = two_shell_ranks(&script).spawn().unwrap();
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let mut ranks: Vec<String> = std::fs::read_to_string(&done)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    ranks.sort();
    assert_eq!(ranks, ["0", "1"]);
}

/// A launcher killed outright (SIGKILL: it can pass nothing on) does not leave its ranks running:
/// the kernel sends each SIGTERM when the launcher dies.
#[cfg(target_os = "linux")]
#[test]
fn ranks_end_when_their_launcher_is_killed_outright() {
    let mut child = bin()
        .args(["launch", "--nproc-per-node", "2", "--", "sleep", "300"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let pids: Vec<u32> = loop {
        let p: Vec<u32> = (0..2).filter_map(|r| rank_pid(child.id(), r)).collect();
        if p.len() == 2 || start.elapsed() > Duration::from_secs(20) {
            break p;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(pids.len(), 2, "the ranks did not start");
    child.kill().unwrap();
    child.wait().unwrap();
    for pid in pids {
        let start = Instant::now();
        while !ended(&stat_fields(pid)) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "rank pid {pid} outlived its launcher"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Two nodes started with different --nnodes: the node whose job size is not rank 0's says so at
/// once (it used to wait out the deadline for ranks that had connected and were dropped).
#[test]
fn nodes_of_different_job_sizes_are_named() {
    let port = free_port().to_string();
    let node = |nnodes: &str, node_rank: &str| {
        launch_bench_comm(&[
            "--nnodes",
            nnodes,
            "--node-rank",
            node_rank,
            "--nproc-per-node",
            "1",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            &port,
            "--job-token",
            "t",
            "--timeout",
            "5",
        ])
        .args(["--backend", "tcp", "--sizes", "1K"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let n0 = node("2", "0");
    let n1 = node("3", "1");
    let (code, err, _) = finish(n1, Duration::from_secs(30));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("rank 0 runs a job of 2 ranks, this rank one of 3"),
        "{err}"
    );
    // Node 0's rank waits for node 1's rank 1, which says in its place that its job differs.
    let (code, err, _) = finish(n0, Duration::from_secs(30));
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("rank 1 runs a job of 3 ranks, this rank one of 2"),
        "{err}"
    );
}

/// Something other than a tessera store on the master port is named as such, not as a store
/// that turned the rank away for no reason.
#[test]
fn a_foreign_service_on_the_master_port_is_named() {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        // As an HTTP server does: read the request, answer, close.
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 4];
            let _ = std::io::Read::read_exact(&mut s, &mut buf);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let mut c = as_rank(1, 2, port);
    c.env("TESSERA_COMM_TIMEOUT_S", "5");
    fails_with(c, "did not answer as a tessera rendezvous store");
    server.join().unwrap();
}

/// A one-node job's rendezvous port, picked by the launcher, lies below the system's ephemeral
/// range: a port probed free there could be taken by another process's outgoing connection before
/// rank 0 binds it (a CI run once failed so, "Address already in use").
#[test]
fn an_automatic_master_port_is_below_the_ephemeral_range() {
    let Some(low) = tessera_comm::rendezvous::ephemeral_port_start() else {
        return;
    };
    let out = bin()
        .args(["launch", "--nproc-per-node", "2", "--", "sh", "-c"])
        .arg("echo $TESSERA_MASTER_PORT")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let ports: Vec<u16> = text.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(ports.len(), 2, "{text}");
    assert_eq!(ports[0], ports[1], "{text}");
    assert!(ports[0] < low || low <= 10_000, "{text}: range from {low}");
}
