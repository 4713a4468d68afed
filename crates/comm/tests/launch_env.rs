//! Each launcher's environment is read into the same `LaunchEnv`; wrong values are one clear error.

use std::collections::HashMap;

use tessera_comm::launch_env::first_slurm_host;
use tessera_comm::{LaunchEnv, Launcher};

fn parse(vars: &[(&str, &str)]) -> Result<Option<LaunchEnv>, String> {
    let m: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    LaunchEnv::from_vars(|k| m.get(k).cloned()).map_err(|e| e.to_string())
}

#[test]
fn no_launcher_means_a_single_process() {
    assert_eq!(parse(&[("PATH", "/bin")]), Ok(None));
}

#[test]
fn tessera_launch() {
    let e = parse(&[
        ("TESSERA_RANK", "3"),
        ("TESSERA_WORLD_SIZE", "4"),
        ("TESSERA_LOCAL_RANK", "1"),
        ("TESSERA_MASTER_ADDR", "10.0.0.1"),
        ("TESSERA_MASTER_PORT", "29511"),
        ("TESSERA_JOB_TOKEN", "secret"),
        // torchrun's names are set too by tessera launch; tessera's win.
        ("RANK", "0"),
        ("WORLD_SIZE", "4"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(
        e,
        LaunchEnv {
            launcher: Launcher::Tessera,
            rank: 3,
            world_size: 4,
            local_rank: 1,
            master_addr: "10.0.0.1".into(),
            master_port: 29511,
            job_token: "secret".into(),
        }
    );
}

#[test]
fn torchrun() {
    let vars = [
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_RUN_ID", "abc"),
    ];
    let e = parse(&vars).unwrap().unwrap();
    assert_eq!(e.launcher, Launcher::Torchrun);
    assert_eq!((e.rank, e.world_size, e.local_rank), (5, 8, 1));
    assert_eq!((e.master_addr.as_str(), e.master_port), ("node0", 29500));
    assert_eq!(e.job_token, "torchrun-abc");
    // torchrun's agent hosts its own store on MASTER_PORT: tessera's goes on the next port.
    let mut v = vars.to_vec();
    v.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
    assert_eq!(parse(&v).unwrap().unwrap().master_port, 29501);
    // MASTER_PORT 65535 has no next port: an error, not port 1 (unless TESSERA_MASTER_PORT
    // gives one).
    let mut top = v.clone();
    top[4] = ("MASTER_PORT", "65535");
    let e = parse(&top).unwrap_err().to_string();
    assert!(e.contains("leaves no next port"), "{e}");
    top.push(("TESSERA_MASTER_PORT", "40000"));
    assert_eq!(parse(&top).unwrap().unwrap().master_port, 40000);
    // TESSERA_MASTER_PORT overrides.
    v.push(("TESSERA_MASTER_PORT", "40000"));
    assert_eq!(parse(&v).unwrap().unwrap().master_port, 40000);
}

#[test]
fn open_mpi() {
    let e = parse(&[
        ("OMPI_COMM_WORLD_RANK", "2"),
        ("OMPI_COMM_WORLD_SIZE", "4"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "2"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
        ("OMPI_MCA_ess_base_jobid", "77"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(e.launcher, Launcher::OpenMpi);
    assert_eq!((e.rank, e.world_size, e.local_rank), (2, 4, 2));
    // One node: loopback and the default port.
    assert_eq!(
        (e.master_addr.as_str(), e.master_port),
        ("127.0.0.1", 29500)
    );
    assert_eq!(e.job_token, "ompi-77");
    // Across nodes Open MPI names no master: the user must.
    let err = parse(&[
        ("OMPI_COMM_WORLD_RANK", "2"),
        ("OMPI_COMM_WORLD_SIZE", "4"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
    ])
    .unwrap_err();
    assert!(err.contains("set MASTER_ADDR"), "{err}");
}

#[test]
fn slurm() {
    let e = parse(&[
        ("SLURM_PROCID", "6"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "2"),
        ("SLURM_JOB_NODELIST", "gpu[003-004,010],login1"),
        ("SLURM_JOB_ID", "123456"),
        ("SLURM_STEP_ID", "0"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(e.launcher, Launcher::Slurm);
    assert_eq!((e.rank, e.world_size, e.local_rank), (6, 8, 2));
    assert_eq!(e.master_addr, "gpu003");
    assert_eq!(e.master_port, 20000 + (123456 % 20000) as u16);
    assert_eq!(e.job_token, "slurm-123456.0");
    // srun's step size wins over the allocation's, MASTER_* over the derived ones.
    let e = parse(&[
        ("SLURM_PROCID", "1"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_STEP_NUM_TASKS", "2"),
        ("SLURM_JOB_NODELIST", "a1"),
        ("MASTER_ADDR", "b2"),
        ("MASTER_PORT", "1234"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(
        (e.world_size, e.master_addr.as_str(), e.master_port),
        (2, "b2", 1234)
    );
}

#[test]
fn slurm_host_lists() {
    assert_eq!(first_slurm_host("node[01-04,07],gpu5").unwrap(), "node01");
    assert_eq!(first_slurm_host("gpu5,node[1-2]").unwrap(), "gpu5");
    assert_eq!(first_slurm_host("rack[1-2]-n[3-4]").unwrap(), "rack1-n3");
    assert!(first_slurm_host("node[01-").is_err());
    assert!(first_slurm_host("").is_err());
}

#[test]
fn bad_values_are_one_clear_error() {
    let err = parse(&[
        ("RANK", "x"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "1"),
    ])
    .unwrap_err();
    assert_eq!(
        err,
        "bad launch environment: RANK=\"x\" is not a non-negative integer"
    );
    let err = parse(&[
        ("RANK", "2"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "1"),
    ])
    .unwrap_err();
    assert!(err.contains("rank 2 is not a rank of a job of 2"), "{err}");
    let err = parse(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "99999"),
    ])
    .unwrap_err();
    assert!(
        err.contains("MASTER_PORT=\"99999\" is not a port number"),
        "{err}"
    );
    let err = parse(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).unwrap_err();
    assert!(err.contains("no master address"), "{err}");
    let err = parse(&[("TESSERA_RANK", "0")]).unwrap_err();
    assert!(err.contains("TESSERA_WORLD_SIZE is missing"), "{err}");
}

/// A job of one rank (`RANK=0 WORLD_SIZE=1`, or Slurm's one task on a node list it does not
/// give) needs no rendezvous address: it meets no one. Two ranks still do.
#[test]
fn a_job_of_one_rank_needs_no_master_address() {
    let e = parse(&[("RANK", "0"), ("WORLD_SIZE", "1")])
        .unwrap()
        .unwrap();
    assert_eq!((e.rank, e.world_size), (0, 1));
    let e = parse(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")])
        .unwrap()
        .unwrap();
    assert_eq!((e.launcher, e.world_size), (Launcher::Slurm, 1));
    let err = parse(&[("RANK", "0"), ("WORLD_SIZE", "2")]).unwrap_err();
    assert!(err.contains("no master address"), "{err}");
}
