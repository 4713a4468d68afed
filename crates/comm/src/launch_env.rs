//! Whether this process is one rank of a multi-process job, read from its launcher's environment:
//! `tessera launch`, torchrun, Slurm `srun` or Open MPI `mpirun`.
//!
//! | launcher | rank / size / local rank | master address and port |
//! |---|---|---|
//! | `tessera launch` | `TESSERA_RANK`, `TESSERA_WORLD_SIZE`, `TESSERA_LOCAL_RANK` | `TESSERA_MASTER_ADDR`, `TESSERA_MASTER_PORT` |
//! | torchrun | `RANK`, `WORLD_SIZE`, `LOCAL_RANK` | `MASTER_ADDR`, `MASTER_PORT` (+1 when torchrun's agent hosts its own store there) |
//! | Open MPI | `OMPI_COMM_WORLD_RANK`, `..._SIZE`, `..._LOCAL_RANK` | `MASTER_ADDR` (default 127.0.0.1 when every rank is on one node), `MASTER_PORT` (default 29500) |
//! | Slurm | `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` | `MASTER_ADDR`, else the first host of `SLURM_STEP_NODELIST` / `SLURM_JOB_NODELIST`; `MASTER_PORT`, else 20000 + job id mod 20000 |
//!
//! The first launcher found in that order wins. `TESSERA_MASTER_ADDR`, `TESSERA_MASTER_PORT` and
//! `TESSERA_JOB_TOKEN` override what any launcher gives. The job token defaults to the launcher's
//! job id (`TORCHELASTIC_RUN_ID`, `SLURM_JOB_ID`, Open MPI's job id), so ranks of two jobs on the
//! same port cannot meet.

use crate::CommError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    Tessera,
    Torchrun,
    OpenMpi,
    Slurm,
}

/// This process's place in a multi-process job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    pub launcher: Launcher,
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub job_token: String,
}

fn bad(var: &str, v: &str, want: &str) -> CommError {
    CommError::Setup(format!("bad launch environment: {var}={v:?} is not {want}"))
}

impl LaunchEnv {
    /// The launch environment of this process, or `None` when it was started on its own.
    pub fn from_env() -> Result<Option<LaunchEnv>, CommError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`LaunchEnv::from_env`], reading variables through `get` (for tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>, CommError> {
        let num = |var: &str| -> Result<Option<usize>, CommError> {
            match get(var) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|_| bad(var, &v, "a non-negative integer")),
            }
        };
        let port = |var: &str| -> Result<Option<u16>, CommError> {
            match get(var) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .map(Some)
                    .ok_or_else(|| bad(var, &v, "a port number (1-65535)")),
            }
        };
        let need = |var: &str, launcher: &str| -> Result<usize, CommError> {
            num(var)?.ok_or_else(|| {
                CommError::Setup(format!(
                    "bad launch environment: {launcher} variables are set but {var} is missing"
                ))
            })
        };

        let (launcher, rank, world_size, local_rank, addr, mut master_port, token);
        if get("TESSERA_RANK").is_some() {
            launcher = Launcher::Tessera;
            rank = need("TESSERA_RANK", "tessera launch")?;
            world_size = need("TESSERA_WORLD_SIZE", "tessera launch")?;
            local_rank = num("TESSERA_LOCAL_RANK")?.unwrap_or(0);
            addr = get("TESSERA_MASTER_ADDR");
            master_port = None;
            token = None;
        } else if get("RANK").is_some() && get("WORLD_SIZE").is_some() {
            launcher = Launcher::Torchrun;
            rank = need("RANK", "torchrun")?;
            world_size = need("WORLD_SIZE", "torchrun")?;
            local_rank = num("LOCAL_RANK")?.unwrap_or(0);
            addr = get("MASTER_ADDR");
            let p = port("MASTER_PORT")?;
            // torchrun's agent serves its own store on MASTER_PORT; take the next one.
            let agent_store =
                get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
            master_port = match p {
                Some(p) if agent_store => match p.checked_add(1) {
                    Some(next) => Some(next),
                    // TESSERA_MASTER_PORT, read below, gives it.
                    None if get("TESSERA_MASTER_PORT").is_some() => None,
                    None => {
                        return Err(CommError::Setup(
                            "bad launch environment: torchrun's agent store holds MASTER_PORT \
                             65535, which leaves no next port for tessera's; set \
                             TESSERA_MASTER_PORT"
                                .into(),
                        ))
                    }
                },
                p => p,
            };
            token = get("TORCHELASTIC_RUN_ID").map(|id| format!("torchrun-{id}"));
        } else if get("OMPI_COMM_WORLD_RANK").is_some() {
            launcher = Launcher::OpenMpi;
            rank = need("OMPI_COMM_WORLD_RANK", "Open MPI")?;
            world_size = need("OMPI_COMM_WORLD_SIZE", "Open MPI")?;
            local_rank = num("OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(0);
            let one_node = num("OMPI_COMM_WORLD_LOCAL_SIZE")? == Some(world_size);
            addr = get("MASTER_ADDR").or_else(|| one_node.then(|| "127.0.0.1".to_string()));
            master_port = Some(port("MASTER_PORT")?.unwrap_or(29500));
            token = get("OMPI_MCA_ess_base_jobid")
                .or_else(|| get("PMIX_NAMESPACE"))
                .map(|id| format!("ompi-{id}"));
        } else if get("SLURM_PROCID").is_some() {
            launcher = Launcher::Slurm;
            rank = need("SLURM_PROCID", "Slurm")?;
            world_size = match num("SLURM_STEP_NUM_TASKS")? {
                Some(n) => n,
                None => need("SLURM_NTASKS", "Slurm")?,
            };
            local_rank = num("SLURM_LOCALID")?.unwrap_or(0);
            addr = match get("MASTER_ADDR") {
                Some(a) => Some(a),
                None => match get("SLURM_STEP_NODELIST").or_else(|| get("SLURM_JOB_NODELIST")) {
                    Some(list) => Some(first_slurm_host(&list)?),
                    None => None,
                },
            };
            let job = num("SLURM_JOB_ID")?;
            master_port = match port("MASTER_PORT")? {
                Some(p) => Some(p),
                None => job.map(|j| 20000 + (j % 20000) as u16),
            };
            token = job.map(|j| format!("slurm-{j}.{}", get("SLURM_STEP_ID").unwrap_or_default()));
        } else {
            return Ok(None);
        }

        if world_size == 0 || rank >= world_size {
            return Err(CommError::Setup(format!(
                "bad launch environment: rank {rank} is not a rank of a job of {world_size}"
            )));
        }
        if world_size > crate::MAX_WORLD_SIZE {
            return Err(CommError::Setup(format!(
                "bad launch environment: a job of {world_size} ranks is more than {}",
                crate::MAX_WORLD_SIZE
            )));
        }
        if let Some(p) = port("TESSERA_MASTER_PORT")? {
            master_port = Some(p);
        }
        // A job of one rank meets no one (`process_world` connects only when there are more):
        // it needs no rendezvous address, as torchrun's own single-process runs do not.
        let alone = world_size == 1;
        let addr = addr.or_else(|| alone.then(|| "127.0.0.1".to_string()));
        let master_port = master_port.or(alone.then_some(29500));
        let master_addr = get("TESSERA_MASTER_ADDR").or(addr).ok_or_else(|| {
            CommError::Setup(format!(
                "bad launch environment: {launcher:?} gives no master address; set MASTER_ADDR \
                 (or TESSERA_MASTER_ADDR) to rank 0's host"
            ))
        })?;
        if master_addr.trim().is_empty() {
            return Err(CommError::Setup(
                "bad launch environment: the master address is empty".into(),
            ));
        }
        let master_port = master_port.ok_or_else(|| {
            CommError::Setup(format!(
                "bad launch environment: {launcher:?} gives no master port; set MASTER_PORT (or \
                 TESSERA_MASTER_PORT)"
            ))
        })?;
        let job_token = get("TESSERA_JOB_TOKEN")
            .or(token)
            .unwrap_or_else(|| format!("tessera-{master_addr}:{master_port}"));
        Ok(Some(LaunchEnv {
            launcher,
            rank,
            world_size,
            local_rank,
            master_addr: master_addr.trim().to_string(),
            master_port,
            job_token,
        }))
    }
}

/// The first host of a Slurm host list: `node[01-04,07],gpu5` -> `node01`,
/// `rack[1-2]-n[3-4]` -> `rack1-n3`.
pub fn first_slurm_host(list: &str) -> Result<String, CommError> {
    let err = || {
        CommError::Setup(format!(
            "bad launch environment: cannot read Slurm node list {list:?}"
        ))
    };
    let mut out = String::new();
    let mut chars = list.trim().chars();
    while let Some(c) = chars.next() {
        match c {
            ',' => break,
            '[' => {
                let mut inner = String::new();
                loop {
                    match chars.next() {
                        Some(']') => break,
                        Some(ch) => inner.push(ch),
                        None => return Err(err()),
                    }
                }
                let first = inner.split([',', '-']).next().unwrap_or("");
                if first.is_empty() {
                    return Err(err());
                }
                out.push_str(first);
            }
            ']' => return Err(err()),
            c => out.push(c),
        }
    }
    if out.is_empty() {
        return Err(err());
    }
    Ok(out)
}
