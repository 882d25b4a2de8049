//! The flags of `fuselora launch`, shaped like torchrun's.

use crate::LaunchError;
use std::time::Duration;

/// `fuselora launch [flags] -- <fuselora command>`: start one rank per GPU on this node.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct LaunchArgs {
    /// Ranks to start on this node [default: the visible GPUs, or 1 without any].
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Nodes in the job; each runs its own `fuselora launch`.
    #[arg(long, value_name = "M", default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, 0..nnodes.
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub node_rank: usize,
    /// Host of rank 0 as the other nodes reach it [default: 127.0.0.1 on one node].
    #[arg(long, value_name = "A")]
    pub master_addr: Option<String>,
    /// Port of the rendezvous at rank 0.
    #[arg(long, value_name = "P", default_value_t = 29500)]
    pub master_port: u16,
    /// Secret shared by the ranks of this job so a stale process is refused; with --nnodes > 1
    /// give the same one on every node [default: $FUSELORA_JOB_TOKEN, or random on one node].
    #[arg(long, value_name = "TOKEN")]
    pub job_token: Option<String>,
    /// Seconds a rank gets to exit after SIGTERM before SIGKILL.
    #[arg(long, value_name = "S", default_value_t = 5.0)]
    pub grace_seconds: f64,
    /// The fuselora command every rank runs, e.g. `-- train config.toml`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

impl LaunchArgs {
    /// Checks the flags against each other; `visible_gpus` fills in `--nproc-per-node`.
    pub(crate) fn layout(&self, visible_gpus: usize) -> Result<Layout, LaunchError> {
        let bad = |message: String| Err(LaunchError::BadArgs(message));
        let nproc = self.nproc_per_node.unwrap_or(visible_gpus);
        if nproc == 0 {
            return bad("--nproc-per-node must be at least 1".to_string());
        }
        if self.nnodes == 0 {
            return bad("--nnodes must be at least 1".to_string());
        }
        if self.node_rank >= self.nnodes {
            return bad(format!(
                "--node-rank {} must be below --nnodes {}",
                self.node_rank, self.nnodes
            ));
        }
        if !(self.grace_seconds.is_finite() && self.grace_seconds >= 0.0) {
            return bad(format!(
                "--grace-seconds {} must be 0 or more",
                self.grace_seconds
            ));
        }
        let master_addr = match (&self.master_addr, self.nnodes) {
            (Some(addr), _) => addr.clone(),
            (None, 1) => "127.0.0.1".to_string(),
            (None, nodes) => {
                return bad(format!(
                    "--nnodes {nodes} needs --master-addr: the host of node 0 as the other nodes \
                     reach it"
                ))
            }
        };
        let job_token = match (&self.job_token, self.nnodes) {
            (Some(token), _) => token.clone(),
            (None, 1) => random_token(),
            (None, nodes) => {
                return bad(format!(
                    "--nnodes {nodes} needs --job-token (or FUSELORA_JOB_TOKEN): the same value \
                     on every node, e.g. --job-token \"$(date +%s)-$USER\""
                ))
            }
        };
        Ok(Layout {
            nproc_per_node: nproc,
            nnodes: self.nnodes,
            node_rank: self.node_rank,
            master_addr,
            master_port: self.master_port,
            job_token,
            grace: Duration::from_secs_f64(self.grace_seconds),
        })
    }
}

/// The resolved shape of the job as seen from this node.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Layout {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub job_token: String,
    pub grace: Duration,
}

impl Layout {
    /// Global rank of this node's `local_rank`-th process.
    pub fn rank(&self, local_rank: usize) -> usize {
        self.node_rank * self.nproc_per_node + local_rank
    }

    /// The variables rank `local_rank` starts with (torchrun's names, plus our job token).
    pub fn rank_env(&self, local_rank: usize) -> Vec<(&'static str, String)> {
        vec![
            ("RANK", self.rank(local_rank).to_string()),
            (
                "WORLD_SIZE",
                (self.nnodes * self.nproc_per_node).to_string(),
            ),
            ("LOCAL_RANK", local_rank.to_string()),
            ("LOCAL_WORLD_SIZE", self.nproc_per_node.to_string()),
            ("GROUP_RANK", self.node_rank.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
            ("FUSELORA_JOB_TOKEN", self.job_token.clone()),
        ]
    }
}

/// 128 bits from the standard library's randomly keyed hasher: unique per launch.
fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut token = String::new();
    for salt in 0..2u64 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(salt);
        hasher.write_u32(std::process::id());
        if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            hasher.write_u128(now.as_nanos());
        }
        token.push_str(&format!("{:016x}", hasher.finish()));
    }
    token
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        launch: LaunchArgs,
    }

    fn parse(line: &[&str]) -> Result<LaunchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("launch").chain(line.iter().copied())).map(|c| c.launch)
    }

    #[test]
    fn flags_and_the_command_after_the_separator() {
        let args = parse(&[
            "--nproc-per-node",
            "4",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--master-addr",
            "node0",
            "--master-port",
            "29611",
            "--job-token",
            "t1",
            "--",
            "train",
            "cfg.toml",
            "--max-steps",
            "3",
        ])
        .unwrap();
        assert_eq!(args.command, ["train", "cfg.toml", "--max-steps", "3"]);
        let layout = args.layout(8).unwrap();
        assert_eq!(layout.nproc_per_node, 4);
        assert_eq!(layout.rank(3), 7);
        let env = layout.rank_env(3);
        let get = |name: &str| env.iter().find(|(k, _)| *k == name).unwrap().1.clone();
        assert_eq!(get("RANK"), "7");
        assert_eq!(get("WORLD_SIZE"), "8");
        assert_eq!(get("LOCAL_RANK"), "3");
        assert_eq!(get("LOCAL_WORLD_SIZE"), "4");
        assert_eq!(get("MASTER_ADDR"), "node0");
        assert_eq!(get("MASTER_PORT"), "29611");
        assert_eq!(get("FUSELORA_JOB_TOKEN"), "t1");
        assert!(env.iter().all(|(k, _)| *k != "CUDA_VISIBLE_DEVICES"));
    }

    #[test]
    fn one_node_defaults_to_the_visible_gpus_localhost_and_a_fresh_token() {
        let args = parse(&["--", "train", "c.toml"]).unwrap();
        let (a, b) = (args.layout(3).unwrap(), args.layout(3).unwrap());
        assert_eq!(
            (a.nproc_per_node, a.master_addr.as_str(), a.master_port),
            (3, "127.0.0.1", 29500)
        );
        assert_eq!(a.job_token.len(), 32);
        assert_ne!(a.job_token, b.job_token);
        assert_eq!(a.grace, Duration::from_secs(5));
    }

    #[test]
    fn contradictions_are_refused_with_the_fix() {
        let cases: [(&[&str], &str); 4] = [
            (
                &["--nnodes", "2", "--job-token", "t", "--", "train"],
                "needs --master-addr",
            ),
            (
                &["--nnodes", "2", "--master-addr", "n0", "--", "train"],
                "needs --job-token",
            ),
            (
                &["--nnodes", "2", "--node-rank", "2", "--", "train"],
                "must be below --nnodes 2",
            ),
            (&["--nproc-per-node", "0", "--", "train"], "at least 1"),
        ];
        for (line, why) in cases {
            let err = parse(line).unwrap().layout(1).unwrap_err().to_string();
            assert!(err.contains(why), "{line:?}: {err}");
        }
        assert!(
            parse(&["--nproc-per-node", "2"]).is_err(),
            "the command is required"
        );
    }
}
