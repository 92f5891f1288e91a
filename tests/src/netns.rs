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
        cut_off(&self.ns[0], cut)
    }
}

/// Drops all traffic of namespace `ns` but its loopback (nftables inside it), or
/// restores it. Established connections are not told: their packets vanish, as when a
/// datacenter's uplinks fail.
pub fn cut_off(ns: &str, cut: bool) -> anyhow::Result<()> {
    const TABLE: &str = "kkachi_cut";
    let nft = |args: &[&str]| {
        let mut all = vec!["ip", "netns", "exec", ns, "nft"];
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

/// Namespaces joined through a bridge that lives in a namespace of its own (nothing is
/// added to the host's network): one per datacenter, one per user.
#[derive(Debug)]
pub struct Bridged {
    core: String,
    /// The member namespaces, in the order asked for.
    pub ns: Vec<String>,
    /// Their addresses on the bridge.
    pub ips: Vec<String>,
    cut: Vec<bool>,
}

impl Bridged {
    /// Creates `{prefix}core` with a bridge, and `{prefix}{name}` for each of `names`,
    /// joined to it by a veth pair, on `10.214.{subnet}.0/24`.
    pub fn create(prefix: &str, subnet: u8, names: &[&str]) -> anyhow::Result<Self> {
        let net = Self {
            core: format!("{prefix}core"),
            ns: names.iter().map(|n| format!("{prefix}{n}")).collect(),
            ips: (0..names.len())
                .map(|i| format!("10.214.{subnet}.{}", i + 1))
                .collect(),
            cut: vec![false; names.len()],
        };
        net.remove();
        run(&["ip", "netns", "add", &net.core])?;
        run(&[
            "ip", "-n", &net.core, "link", "add", "br0", "type", "bridge",
        ])?;
        run(&["ip", "-n", &net.core, "link", "set", "br0", "up"])?;
        for (i, ns) in net.ns.iter().enumerate() {
            let (inner, outer) = (format!("{prefix}{i}m"), format!("{prefix}{i}c"));
            run(&["ip", "netns", "add", ns])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            run(&[
                "ip", "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ])?;
            run(&["ip", "link", "set", &inner, "netns", ns])?;
            run(&["ip", "link", "set", &outer, "netns", &net.core])?;
            run(&[
                "ip", "-n", &net.core, "link", "set", &outer, "master", "br0", "up",
            ])?;
            let cidr = format!("{}/24", net.ips[i]);
            run(&["ip", "-n", ns, "addr", "add", &cidr, "dev", &inner])?;
            run(&["ip", "-n", ns, "link", "set", &inner, "up"])?;
        }
        Ok(net)
    }

    /// Lets multicast through (LAN beacons): a route for it in every member, and the
    /// bridge flooding it to every port.
    pub fn multicast(&self) -> anyhow::Result<()> {
        run(&[
            "ip",
            "-n",
            &self.core,
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        for ns in &self.ns {
            let dev = self.member_dev(ns);
            run(&["ip", "-n", ns, "link", "set", &dev, "multicast", "on"])?;
            run(&["ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", &dev])?;
        }
        Ok(())
    }

    /// The name of member `ns`'s end of its link to the bridge.
    fn member_dev(&self, ns: &str) -> String {
        let i = self.ns.iter().position(|n| n == ns).expect("a member");
        let prefix = self.core.strip_suffix("core").expect("named by create");
        format!("{prefix}{i}m")
    }

    /// Cuts member `i` off from everyone (or restores it); nothing if it already is.
    pub fn cut(&mut self, i: usize, cut: bool) -> anyhow::Result<()> {
        if self.cut[i] != cut {
            cut_off(&self.ns[i], cut)?;
            self.cut[i] = cut;
        }
        Ok(())
    }

    /// Whether member `i` is cut off.
    pub fn is_cut(&self, i: usize) -> bool {
        self.cut[i]
    }

    fn remove(&self) {
        for ns in self.ns.iter().chain([&self.core]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Drop for Bridged {
    fn drop(&mut self) {
        self.remove();
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.remove();
    }
}
