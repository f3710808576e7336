//! `proxy ca ...` and `proxy identity ...`: the mesh's certificate authority and issuer.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use clap::Subcommand;
use proxy::identity::{self, SpiffeId, ca};

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create the mesh's trust anchor in DIR: ca.key (mode 0600, never printed), ca.crt and
    /// anchors.pem (the bundle nodes trust; copy it to every node). Refuses to replace an
    /// existing CA without --force.
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long, default_value_t = 365)]
        lifetime_days: u64,
        #[arg(long)]
        force: bool,
    },
    /// Start a trust-anchor rollover: a new CA signs from now on, and anchors.pem trusts
    /// both the new and the previous one until `retire-previous`.
    Rotate {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// End a rollover: stop trusting the previous CA (after every leaf it signed was renewed,
    /// at most one leaf lifetime after `rotate`).
    RetirePrevious {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Issue a certificate and a fresh key for IDENTITY into OUT (cert.pem, key.pem 0600),
    /// for clients outside the mesh and for tests. --not-after-secs may be negative to make
    /// an expired certificate.
    Issue {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(long)]
        identity: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity start, in seconds from now (negative: in the past).
        #[arg(long, default_value_t = -60, allow_hyphen_values = true)]
        not_before_secs: i64,
        /// Validity end, in seconds from now (negative: already expired).
        #[arg(long, default_value_t = 86400, allow_hyphen_values = true)]
        not_after_secs: i64,
    },
}

#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Run the issuer: HTTPS (TLS 1.3) on LISTEN, signing nodes' CSRs for the identities the
    /// nodes file allows each node's token. Runs until SIGTERM/SIGINT.
    Serve {
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        /// TOML: [[node]] name, token_sha256, identities = ["spiffe://td/ns/x/sa/*", ...].
        #[arg(long, value_name = "FILE")]
        nodes: PathBuf,
        /// Lifetime of issued leaf certificates, in seconds.
        #[arg(long, default_value_t = 86400)]
        lifetime_secs: u64,
    },
    /// Print the sha256 of a node token (read from stdin), for the nodes file.
    HashToken,
}

fn offset(now: SystemTime, secs: i64) -> SystemTime {
    let d = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        now + d
    } else {
        now.checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

pub fn ca(cmd: CaCommand) -> u8 {
    let result = match cmd {
        CaCommand::Init {
            dir,
            trust_domain,
            lifetime_days,
            force,
        } => ca::init(
            &dir,
            &trust_domain,
            Duration::from_secs(lifetime_days.saturating_mul(86400)),
            force,
        )
        .map(|s| s.to_string()),
        CaCommand::Rotate { dir } => ca::rotate(&dir).map(|s| s.to_string()),
        CaCommand::RetirePrevious { dir } => ca::retire_previous(&dir).map(|s| s.to_string()),
        CaCommand::Issue {
            dir,
            identity,
            out,
            not_before_secs,
            not_after_secs,
        } => {
            let id = match SpiffeId::parse(&identity) {
                Ok(id) => id,
                Err(e) => {
                    eprintln!("proxy: --identity {identity:?}: {e}");
                    return 2;
                }
            };
            let now = SystemTime::now();
            ca::issue(
                &dir,
                &id,
                offset(now, not_before_secs),
                offset(now, not_after_secs),
                &out,
            )
            .map(|s| s.to_string())
        }
    };
    match result {
        Ok(text) => {
            println!("{text}");
            0
        }
        Err(e) => {
            eprintln!("proxy: {e}");
            1
        }
    }
}

pub fn identity_cmd(cmd: IdentityCommand) -> u8 {
    match cmd {
        IdentityCommand::HashToken => {
            let mut token = String::new();
            if std::io::stdin().read_line(&mut token).is_err() || token.trim().is_empty() {
                eprintln!("proxy: give the token on standard input");
                return 2;
            }
            println!("{}", identity::token_hash(token.trim()));
            0
        }
        IdentityCommand::Serve {
            ca_dir,
            listen,
            nodes,
            lifetime_secs,
        } => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
                .with_writer(std::io::stderr)
                .try_init();
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("proxy: cannot start the runtime: {e}");
                    return 1;
                }
            };
            rt.block_on(async move {
                let (tx, rx) = tokio::sync::watch::channel(false);
                let issuer = match identity::issuer::Issuer::bind(
                    ca_dir,
                    listen,
                    nodes,
                    Duration::from_secs(lifetime_secs),
                )
                .await
                {
                    Ok(i) => i,
                    Err(e) => {
                        eprintln!("proxy: {e}");
                        return 1;
                    }
                };
                // Tests and scripts wait for this line.
                println!("issuer ready on {}", issuer.local_addr());
                let run = tokio::spawn(issuer.run(rx));
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(s) => s,
                        Err(e) => {
                            eprintln!("proxy: cannot install a SIGTERM handler: {e}");
                            return 1;
                        }
                    };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                let _ = tx.send(true);
                match run.await {
                    Ok(Ok(())) => 0,
                    Ok(Err(e)) => {
                        eprintln!("proxy: {e}");
                        1
                    }
                    Err(e) => {
                        eprintln!("proxy: issuer task failed: {e}");
                        1
                    }
                }
            })
        }
    }
}
