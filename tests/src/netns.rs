//! Network namespaces for LAN and partition scenarios. Everything created here is
//! named with a per-test prefix and removed on drop. Root only.

use std::path::Path;
use std::process::Command;

use anyhow::Context;

use crate::procs::User;

/// Why a namespace scenario cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref() != Some("0") {
        return Some("needs root (network namespaces)".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("needs the `ip` command (iproute2)".into());
    }
    None
}

/// Why a scenario that also cuts links with nftables cannot run here, if it cannot.
pub fn nft_unavailable() -> Option<String> {
    if let Some(why) = unavailable() {
        return Some(why);
    }
    match Command::new("nft").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`nft --version` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("needs the `nft` command (nftables): {e}")),
    }
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !o.status.success() {
        anyhow::bail!("{args:?}: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(())
}

/// Two namespaces joined by a veth pair on 10.x addresses private to them.
#[derive(Debug)]
pub struct Lan {
    /// Namespace names.
    pub ns: [String; 2],
    /// Their addresses.
    pub ips: [String; 2],
}

impl Lan {
    /// Creates `{prefix}a` and `{prefix}b` joined by a veth pair, multicast enabled.
    pub fn create(prefix: &str, subnet: u8) -> anyhow::Result<Self> {
        let lan = Self {
            ns: [format!("{prefix}a"), format!("{prefix}b")],
            ips: [format!("10.213.{subnet}.1"), format!("10.213.{subnet}.2")],
        };
        lan.remove();
        let (va, vb) = (format!("{prefix}va"), format!("{prefix}vb"));
        for ns in &lan.ns {
            run(&["ip", "netns", "add", ns])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        run(&[
            "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
        ])?;
        run(&["ip", "link", "set", &va, "netns", &lan.ns[0]])?;
        run(&["ip", "link", "set", &vb, "netns", &lan.ns[1]])?;
        for (i, v) in [va, vb].iter().enumerate() {
            let cidr = format!("{}/24", lan.ips[i]);
            run(&["ip", "-n", &lan.ns[i], "addr", "add", &cidr, "dev", v])?;
            run(&[
                "ip",
                "-n",
                &lan.ns[i],
                "link",
                "set",
                v,
                "up",
                "multicast",
                "on",
            ])?;
            // Multicast (LAN beacons) needs a route.
            run(&[
                "ip",
                "-n",
                &lan.ns[i],
                "route",
                "add",
                "224.0.0.0/4",
                "dev",
                v,
            ])?;
        }
        Ok(lan)
    }

    /// Alice in the first namespace and bob in the second, each listening on its LAN
    /// address, introduced to each other, with no relay.
    pub fn alice_and_bob(&self, root: &Path) -> (User, User) {
        let user = |i: usize, name: &str| {
            let listen = format!("/ip4/{}/tcp/0", self.ips[i]);
            User::with_env(root, name, Some(&self.ns[i]), &[("KKACHI_LISTEN", &listen)])
        };
        let (alice, bob) = (user(0, "alice"), user(1, "bob"));
        User::introduce(&alice, &bob);
        (alice, bob)
    }

    fn remove(&self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }

    /// Drops all traffic between the two namespaces (nftables in the first), or
    /// restores it. Loopback inside the namespace keeps working.
    pub fn cut(&self, cut: bool) -> anyhow::Result<()> {
        const TABLE: &str = "kkachi_cut";
        let nft = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", self.ns[0].as_str(), "nft"];
            all.extend_from_slice(args);
            run(&all)
        };
        if !cut {
            return nft(&["delete", "table", "inet", TABLE]);
        }
        nft(&["add", "table", "inet", TABLE])?;
        for (chain, hook, lo) in [("out", "output", "oif"), ("in", "input", "iif")] {
            let policy = format!("{{ type filter hook {hook} priority 0 ; policy drop ; }}");
            nft(&["add", "chain", "inet", TABLE, chain, &policy])?;
            nft(&["add", "rule", "inet", TABLE, chain, lo, "lo", "accept"])?;
        }
        Ok(())
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.remove();
    }
}
