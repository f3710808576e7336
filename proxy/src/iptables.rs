//! iptables interception: REDIRECT rules the proxy installs at start and removes at stop.
//!
//! Kept so the same proxy can be compared with and without eBPF. Rules live in the nat
//! table of the proxy's network namespace: PREROUTING jumps, for TCP arriving on the
//! configured workload interfaces, to a chain of our own that returns for traffic to this
//! node, excluded ports and excluded networks, and redirects the rest to the proxy port.
//! Note that any nat rule turns conntrack on for the whole namespace.

use std::{net::IpAddr, process::Command};

use tracing::{info, warn};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error(
        "{tool} is not installed or not runnable ({source}); install the iptables package (Debian: apt-get install iptables)"
    )]
    Missing {
        tool: &'static str,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Rule { command: String, stderr: String },
}

/// Installed rules; [`Rules::remove`] takes them out again.
pub struct Rules {
    chain: String,
    interfaces: Vec<String>,
    families: Vec<&'static str>,
}

impl Rules {
    pub fn chain_name(port: u16) -> String {
        format!("MESHPROXY-{port}")
    }

    /// Installs the rules for IPv4 and, if ip6tables works, IPv6. Leftovers of a proxy that
    /// crashed (same chain name) are removed first.
    pub fn install(cfg: &Config) -> Result<Rules, IptablesError> {
        let chain = Rules::chain_name(cfg.port);
        let mut families = vec!["iptables"];
        if Command::new("ip6tables").arg("--version").output().is_ok() {
            families.push("ip6tables");
        }
        let rules = Rules {
            chain,
            interfaces: cfg.iptables_interfaces.clone(),
            families,
        };
        rules.remove_quietly();
        for tool in rules.families.clone() {
            let v6 = tool == "ip6tables";
            let chain = rules.chain.as_str();
            let nat = |rule: String| {
                let words: Vec<&str> = rule.split_whitespace().collect();
                let mut args = vec!["-t", "nat"];
                args.extend(words);
                run(tool, &args)
            };
            nat(format!("-N {chain}"))?;
            // Traffic to this node itself (its own services, the proxy) is not intercepted.
            nat(format!("-A {chain} -m addrtype --dst-type LOCAL -j RETURN"))?;
            for port in &cfg.exclude_ports {
                nat(format!("-A {chain} -p tcp --dport {port} -j RETURN"))?;
            }
            let family_cidrs = cfg
                .exclude_cidrs
                .iter()
                .filter(|c| matches!(c.addr, IpAddr::V6(_)) == v6);
            for cidr in family_cidrs {
                nat(format!("-A {chain} -d {cidr} -j RETURN"))?;
            }
            let port = cfg.port;
            nat(format!("-A {chain} -p tcp -j REDIRECT --to-ports {port}"))?;
            // Interface names were validated (no spaces) by the config.
            for iface in &rules.interfaces {
                nat(format!("-A PREROUTING -i {iface} -p tcp -j {chain}"))?;
            }
        }
        info!(chain = %rules.chain, interfaces = ?rules.interfaces, "iptables REDIRECT rules installed");
        Ok(rules)
    }

    pub fn remove(self) {
        self.remove_quietly();
        info!(chain = %self.chain, "iptables rules removed");
    }

    /// Removes our jumps and chain; missing ones are fine.
    fn remove_quietly(&self) {
        for tool in &self.families {
            remove_chain(tool, &self.chain);
        }
    }
}

/// Deletes every PREROUTING jump to `chain`, then the chain. Used at stop and by `proxy clean`.
pub fn remove_chain(tool: &'static str, chain: &str) {
    let Ok(out) = Command::new(tool)
        .args(["-t", "nat", "-S", "PREROUTING"])
        .output()
    else {
        return;
    };
    let listing = String::from_utf8_lossy(&out.stdout);
    for line in listing.lines() {
        if let Some(rule) = line.strip_prefix("-A PREROUTING ")
            && rule.ends_with(&format!("-j {chain}"))
        {
            let mut args = vec!["-t", "nat", "-D", "PREROUTING"];
            args.extend(rule.split_whitespace());
            if let Err(e) = run(tool, &args) {
                warn!(error = %e, "removing an iptables jump failed");
            }
        }
    }
    let _ = Command::new(tool).args(["-t", "nat", "-F", chain]).output();
    let _ = Command::new(tool).args(["-t", "nat", "-X", chain]).output();
}

fn run(tool: &'static str, args: &[&str]) -> Result<(), IptablesError> {
    let out = Command::new(tool)
        .args(["-w", "5"])
        .args(args)
        .output()
        .map_err(|source| IptablesError::Missing { tool, source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(IptablesError::Rule {
            command: format!("{tool} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
