//! Who am I? Reads rank, world size, local rank and rank 0's address from the environment that
//! started this process, trying in order:
//!
//! 1. our launcher or torchrun: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//!    `MASTER_ADDR`, `MASTER_PORT` (and `FUSELORA_JOB_TOKEN` from `fuselora launch`);
//! 2. mpirun: Open MPI's `OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}`, MPICH/Intel MPI's
//!    `PMI_RANK`/`PMI_SIZE` with `MPI_LOCALRANKID`/`MPI_LOCALNRANKS`, or PMIx's `PMIX_RANK` (its
//!    world size then comes from `SLURM_NTASKS`, as under `srun --mpi=pmix`);
//! 3. Slurm: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, tasks on this node from
//!    `SLURM_TASKS_PER_NODE` at `SLURM_NODEID`, rank 0's host = first of `SLURM_JOB_NODELIST`;
//! 4. otherwise a single process.
//!
//! Rank 0's address: `MASTER_ADDR` when set; else 127.0.0.1 when all ranks share one node; else
//! the first Slurm host; else unknown (the MPI path does not need it). Port: `MASTER_PORT`, else
//! 20000 + SLURM_JOB_ID mod 20000 under Slurm (so two jobs on a node do not collide), else 29500.

use crate::hostlist::{expand_hostlist, expand_tasks_per_node};
use crate::{Error, Result};
use std::collections::HashMap;

/// The port rank 0 serves on when nothing says otherwise (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Which environment the rank information came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `fuselora launch` or torchrun.
    Launcher,
    /// mpirun / mpiexec (or srun with PMI): MPI can be initialised.
    Mpi,
    /// srun without PMI.
    Slurm,
    /// Nothing: one process.
    Single,
}

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankInfo {
    /// Global rank, 0-based.
    pub rank: usize,
    /// Number of ranks in the job.
    pub world_size: usize,
    /// Rank among the processes on this node; also the GPU ordinal this rank binds.
    pub local_rank: usize,
    /// Number of ranks on this node.
    pub local_world_size: usize,
    /// Host of rank 0, where the rendezvous is served; `None` when unknown.
    pub master_addr: Option<String>,
    /// Port of the rendezvous at rank 0.
    pub master_port: u16,
    /// Shared by all ranks of this job and by no other job: the rendezvous refuses other tokens.
    pub job_token: String,
    /// Which environment said all this.
    pub source: Source,
}

impl RankInfo {
    /// A world of one process.
    pub fn single() -> RankInfo {
        RankInfo {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: Some("127.0.0.1".to_string()),
            master_port: DEFAULT_MASTER_PORT,
            job_token: "fuselora-single".to_string(),
            source: Source::Single,
        }
    }

    /// `host:port` of the rendezvous at rank 0.
    pub fn master_endpoint(&self) -> Result<String> {
        let nodes = self.world_size.div_ceil(self.local_world_size.max(1));
        let host = self
            .master_addr
            .as_ref()
            .ok_or(Error::NoMasterAddr { nodes })?;
        Ok(format!("{host}:{}", self.master_port))
    }
}

/// Reads this process's [`RankInfo`] from its environment.
pub fn detect() -> Result<RankInfo> {
    detect_from(&std::env::vars().collect())
}

/// Reads a [`RankInfo`] from `env` (variable name → value); see the module doc for the order.
pub fn detect_from(env: &HashMap<String, String>) -> Result<RankInfo> {
    let env = Env(env);
    let (source, rank, world_size, local) =
        if let (Some(rank), Some(world)) = (env.number("RANK")?, env.number("WORLD_SIZE")?) {
            let local = match env.number("LOCAL_RANK")? {
                Some(local_rank) => Some((local_rank, env.number_or("LOCAL_WORLD_SIZE", world)?)),
                None => None,
            };
            (Source::Launcher, rank, world, local)
        } else if let Some((rank, world)) = mpi_rank_and_size(&env)? {
            (
                Source::Mpi,
                rank,
                world,
                mpi_local(&env)?.or(slurm_local(&env)?),
            )
        } else if let (Some(rank), Some(world)) =
            (env.number("SLURM_PROCID")?, env.number("SLURM_NTASKS")?)
        {
            (Source::Slurm, rank, world, slurm_local(&env)?)
        } else {
            return Ok(RankInfo {
                job_token: env.job_token(None),
                ..RankInfo::single()
            });
        };
    // Without local information, assume every rank is on this node.
    let (local_rank, local_world_size) = local.unwrap_or((rank, world_size));
    check_ranks(rank, world_size, local_rank, local_world_size)?;
    let master_port = match env.number("MASTER_PORT")? {
        Some(port) => u16::try_from(port).map_err(|_| env.bad("MASTER_PORT", "not a port"))?,
        None => match env.number("SLURM_JOB_ID")? {
            Some(job) => (20000 + job % 20000) as u16,
            None => DEFAULT_MASTER_PORT,
        },
    };
    let master_addr = match env.get("MASTER_ADDR") {
        Some(addr) => Some(addr.to_string()),
        None if local_world_size == world_size => Some("127.0.0.1".to_string()),
        None => match env
            .get("SLURM_STEP_NODELIST")
            .or(env.get("SLURM_JOB_NODELIST"))
        {
            Some(list) => expand_hostlist(list)?.into_iter().next(),
            None => None,
        },
    };
    Ok(RankInfo {
        rank,
        world_size,
        local_rank,
        local_world_size,
        job_token: env.job_token(Some((master_addr.as_deref(), master_port))),
        master_addr,
        master_port,
        source,
    })
}

/// Rank and world size from mpirun's variables, if this process was started by one.
fn mpi_rank_and_size(env: &Env) -> Result<Option<(usize, usize)>> {
    for (rank, size) in [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("PMIX_RANK", "SLURM_NTASKS"),
    ] {
        if let (Some(rank), Some(size)) = (env.number(rank)?, env.number(size)?) {
            return Ok(Some((rank, size)));
        }
    }
    Ok(None)
}

/// Local rank and size from mpirun's variables.
fn mpi_local(env: &Env) -> Result<Option<(usize, usize)>> {
    for (rank, size) in [
        ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ] {
        if let (Some(rank), Some(size)) = (env.number(rank)?, env.number(size)?) {
            return Ok(Some((rank, size)));
        }
    }
    Ok(None)
}

/// Local rank and size from Slurm's variables.
fn slurm_local(env: &Env) -> Result<Option<(usize, usize)>> {
    let Some(local_rank) = env.number("SLURM_LOCALID")? else {
        return Ok(None);
    };
    let spec = env
        .get("SLURM_STEP_TASKS_PER_NODE")
        .or(env.get("SLURM_TASKS_PER_NODE"));
    let (Some(spec), Some(node)) = (spec, env.number("SLURM_NODEID")?) else {
        return Ok(None);
    };
    let counts = expand_tasks_per_node(spec)?;
    let count = counts.get(node).copied().ok_or_else(|| {
        env.bad(
            "SLURM_NODEID",
            &format!(
                "node {node} but the tasks-per-node list has {}",
                counts.len()
            ),
        )
    })?;
    Ok(Some((local_rank, count)))
}

fn check_ranks(rank: usize, world: usize, local_rank: usize, local_world: usize) -> Result<()> {
    let problem = if world == 0 {
        "the world size is 0".to_string()
    } else if rank >= world {
        format!("rank {rank} is not below the world size {world}")
    } else if local_world == 0 || local_rank >= local_world {
        format!("local rank {local_rank} is not below the local world size {local_world}")
    } else if local_world > world {
        format!("local world size {local_world} exceeds the world size {world}")
    } else {
        return Ok(());
    };
    Err(Error::Mismatch(format!(
        "inconsistent rank environment: {problem}; check the launcher's variables"
    )))
}

/// Read access to an environment map, treating empty values as unset.
struct Env<'a>(&'a HashMap<String, String>);

impl Env<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    fn number(&self, name: &str) -> Result<Option<usize>> {
        self.get(name)
            .map(|v| v.parse().map_err(|_| self.bad(name, "not a whole number")))
            .transpose()
    }

    fn number_or(&self, name: &str, default: usize) -> Result<usize> {
        Ok(self.number(name)?.unwrap_or(default))
    }

    fn bad(&self, name: &str, why: &str) -> Error {
        Error::BadEnv {
            name: name.to_string(),
            value: self.0.get(name).cloned().unwrap_or_default(),
            why: why.to_string(),
        }
    }

    /// The launcher's token, else one built from the scheduler's job id, else from rank 0's
    /// address (enough to tell jobs apart that use different ports).
    fn job_token(&self, master: Option<(Option<&str>, u16)>) -> String {
        if let Some(token) = self.get("FUSELORA_JOB_TOKEN") {
            return token.to_string();
        }
        if let Some(job) = self.get("SLURM_JOB_ID") {
            let step = self.get("SLURM_STEP_ID").unwrap_or("0");
            return format!("slurm-{job}.{step}");
        }
        for name in [
            "OMPI_MCA_ess_base_jobid",
            "PMIX_NAMESPACE",
            "TORCHELASTIC_RUN_ID",
        ] {
            if let Some(id) = self.get(name) {
                return format!("{name}-{id}");
            }
        }
        match master {
            Some((addr, port)) => format!("fuselora-{}:{port}", addr.unwrap_or("?")),
            None => "fuselora-single".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn launcher_variables_come_first() {
        let info = detect_from(&env(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "10.0.0.7"),
            ("MASTER_PORT", "29611"),
            ("FUSELORA_JOB_TOKEN", "abc123"),
            // mpirun's and Slurm's variables lose to ours.
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
        ]))
        .unwrap();
        assert_eq!(
            info,
            RankInfo {
                rank: 5,
                world_size: 8,
                local_rank: 1,
                local_world_size: 4,
                master_addr: Some("10.0.0.7".to_string()),
                master_port: 29611,
                job_token: "abc123".to_string(),
                source: Source::Launcher,
            }
        );
        assert_eq!(info.master_endpoint().unwrap(), "10.0.0.7:29611");
    }

    #[test]
    fn open_mpi_on_one_node_defaults_rank_0_to_localhost() {
        let info = detect_from(&env(&[
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "2"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "3"),
            ("OMPI_MCA_ess_base_jobid", "4242"),
        ]))
        .unwrap();
        assert_eq!(info.source, Source::Mpi);
        assert_eq!((info.rank, info.world_size), (2, 3));
        assert_eq!((info.local_rank, info.local_world_size), (2, 3));
        assert_eq!(info.master_endpoint().unwrap(), "127.0.0.1:29500");
        assert_eq!(info.job_token, "OMPI_MCA_ess_base_jobid-4242");
    }

    #[test]
    fn mpich_hydra_variables_are_read() {
        let info = detect_from(&env(&[
            ("PMI_RANK", "3"),
            ("PMI_SIZE", "4"),
            ("MPI_LOCALRANKID", "1"),
            ("MPI_LOCALNRANKS", "2"),
        ]))
        .unwrap();
        assert_eq!(info.source, Source::Mpi);
        assert_eq!(
            (
                info.rank,
                info.world_size,
                info.local_rank,
                info.local_world_size
            ),
            (3, 4, 1, 2)
        );
        // Two nodes and nothing names rank 0's host.
        assert_eq!(info.master_addr, None);
        let err = info.master_endpoint().unwrap_err().to_string();
        assert!(
            err.contains("2 nodes") && err.contains("MASTER_ADDR"),
            "{err}"
        );
    }

    #[test]
    fn slurm_expands_the_node_list_and_tasks_per_node() {
        let info = detect_from(&env(&[
            ("SLURM_PROCID", "6"),
            ("SLURM_NTASKS", "7"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NODEID", "3"),
            ("SLURM_TASKS_PER_NODE", "2(x3),1"),
            ("SLURM_JOB_NODELIST", "gpu[07-09],big1"),
            ("SLURM_JOB_ID", "123456"),
        ]))
        .unwrap();
        assert_eq!(info.source, Source::Slurm);
        assert_eq!(
            (
                info.rank,
                info.world_size,
                info.local_rank,
                info.local_world_size
            ),
            (6, 7, 0, 1)
        );
        assert_eq!(info.master_addr.as_deref(), Some("gpu07"));
        assert_eq!(info.master_port, 23456); // 20000 + 123456 mod 20000
        assert_eq!(info.job_token, "slurm-123456.0");
    }

    #[test]
    fn srun_with_pmix_counts_as_mpi_with_slurm_locality() {
        let info = detect_from(&env(&[
            ("PMIX_RANK", "1"),
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "0"),
            ("SLURM_STEP_TASKS_PER_NODE", "2(x2)"),
            ("SLURM_STEP_NODELIST", "n[1-2]"),
        ]))
        .unwrap();
        assert_eq!(info.source, Source::Mpi);
        assert_eq!(
            (
                info.rank,
                info.world_size,
                info.local_rank,
                info.local_world_size
            ),
            (1, 4, 1, 2)
        );
        assert_eq!(info.master_addr.as_deref(), Some("n1"));
    }

    #[test]
    fn nothing_set_is_a_single_process() {
        let info = detect_from(&env(&[("PATH", "/usr/bin")])).unwrap();
        assert_eq!(info.source, Source::Single);
        assert_eq!((info.rank, info.world_size, info.local_rank), (0, 1, 0));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = detect_from(&env(&[("RANK", "one"), ("WORLD_SIZE", "2")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("RANK=\"one\""), "{err}");
        let err = detect_from(&env(&[("RANK", "2"), ("WORLD_SIZE", "2")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rank 2 is not below the world size 2"),
            "{err}"
        );
        let err = detect_from(&env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_PORT", "70000"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("MASTER_PORT=\"70000\""), "{err}");
    }
}
