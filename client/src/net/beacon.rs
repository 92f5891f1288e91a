//! Finding contacts on the local network (a LAN with no internet must still work),
//! without telling anyone else who we are.
//!
//! Every few seconds a beacon goes to a multicast group on every IPv4 interface: our
//! listening ports and one tag per contact that only that contact can recognise
//! ([`kkachi_protocol::lan`]). Beacons from others are matched against the tags our
//! contacts' beacons carry in this ten-minute slot (and the ones next to it, for
//! clock skew); a match names the contact, and the address the beacon came from is
//! where it listens. Strangers see random bytes that change every slot: unlike mDNS,
//! which announced the peer id in our card to every network we joined.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kkachi_protocol::lan::{
    BEACON_TAG_LEN, Beacon, BeaconTag, LanKey, MAX_BEACON_LEN, beacon_slot, beacons,
};
use kkachi_protocol::{Multiaddr, PeerId};
use libp2p::multiaddr::Protocol;
use parking_lot::RwLock;
use rand::Rng;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// The multicast group beacons go to (organisation-local scope).
pub(super) const GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 75, 75);
/// The UDP port beacons go to.
pub(super) const PORT: u16 = 47_575;
/// How often we send a beacon, give or take [`JITTER`] (so the rhythm does not link
/// one slot's beacons to the next).
const EVERY: Duration = Duration::from_secs(4);
const JITTER: Duration = Duration::from_millis(1500);
/// A contact whose beacons stopped this long ago has left the network.
const FORGET_AFTER: Duration = Duration::from_secs(15);
/// Source addresses kept per contact.
const MAX_ADDRS_PER_CONTACT: usize = 4;

/// What the beacon task shares with its handles.
#[derive(Debug, Default)]
pub(super) struct Shared {
    /// The LAN key we share with each contact (not blocked).
    pub(super) contacts: Vec<(PeerId, LanKey)>,
    /// Bumped whenever `contacts` changes.
    pub(super) generation: u64,
    /// The ports we listen on for contacts: TCP, QUIC (0: none).
    pub(super) ports: (u16, u16),
}

/// What the beacon task tells the network task.
#[derive(Debug)]
pub(super) enum Seen {
    /// A contact's beacons came from these addresses (each ends in its peer id): all
    /// of them, newest first.
    Found(PeerId, Vec<Multiaddr>),
    /// A contact's beacons stopped.
    Gone(PeerId),
}

/// What an expected tag stands for: whose it is, under which key and slot.
type Expected = HashMap<BeaconTag, (PeerId, LanKey, u64)>;

/// The tags each contact's beacons carry for us around `slot` (one slot either side,
/// for clock skew), with whom they name.
fn expected(contacts: &[(PeerId, LanKey)], slot: u64) -> Expected {
    let mut map = HashMap::with_capacity(contacts.len() * 3);
    for (peer, key) in contacts {
        for s in [slot.saturating_sub(1), slot, slot + 1] {
            map.insert(key.tag(peer, s), (*peer, key.clone(), s));
        }
    }
    map
}

/// The contacts a beacon from `from` names, with the ports each listens on: only
/// entries whose MAC binds them to that address (a replay from elsewhere names nobody).
fn recognise(beacon: &Beacon, from: IpAddr, expected: &Expected) -> Vec<(PeerId, (u16, u16))> {
    let mut found: Vec<(PeerId, (u16, u16))> = beacon
        .entries
        .iter()
        .filter_map(|e| {
            let tag: BeaconTag = e[..BEACON_TAG_LEN].try_into().expect("tag length");
            let (peer, key, slot) = expected.get(&tag)?;
            Some((*peer, key.open(e, peer, *slot, from)?))
        })
        .collect();
    found.sort();
    found.dedup_by_key(|(p, _)| *p);
    found
}

/// Where `peer` listens, by a beacon from `from` naming `ports`.
fn addresses(peer: PeerId, from: IpAddr, (tcp, quic): (u16, u16)) -> Vec<Multiaddr> {
    let mut addrs = Vec::new();
    if tcp != 0 {
        addrs.push(
            Multiaddr::from(from)
                .with(Protocol::Tcp(tcp))
                .with(Protocol::P2p(peer)),
        );
    }
    if quic != 0 {
        addrs.push(
            Multiaddr::from(from)
                .with(Protocol::Udp(quic))
                .with(Protocol::QuicV1)
                .with(Protocol::P2p(peer)),
        );
    }
    addrs
}

/// What we know of a contact seen on the LAN.
struct Sighting {
    last: Instant,
    /// Where its beacons came from, with their ports (newest last).
    from: Vec<(IpAddr, (u16, u16))>,
}

impl Sighting {
    /// Records a beacon from `from`; true if that is somewhere new.
    fn saw(&mut self, from: IpAddr, ports: (u16, u16)) -> bool {
        self.last = Instant::now();
        if let Some(i) = self.from.iter().position(|s| *s == (from, ports)) {
            let s = self.from.remove(i);
            self.from.push(s);
            return false;
        }
        if self.from.len() == MAX_ADDRS_PER_CONTACT {
            self.from.remove(0);
        }
        self.from.push((from, ports));
        true
    }

    fn addresses(&self, peer: PeerId) -> Vec<Multiaddr> {
        self.from
            .iter()
            .rev()
            .flat_map(|(ip, ports)| addresses(peer, *ip, *ports))
            .collect()
    }
}

/// The ports in our listen addresses: TCP and QUIC.
pub(super) fn ports_of(listen: &[Multiaddr]) -> (u16, u16) {
    let mut tcp = 0;
    let mut quic = 0;
    for addr in listen {
        let parts: Vec<Protocol<'_>> = addr.iter().collect();
        match parts.as_slice() {
            [Protocol::Ip4(_), Protocol::Tcp(p)] if tcp == 0 => tcp = *p,
            [Protocol::Ip4(_), Protocol::Udp(p), Protocol::QuicV1] if quic == 0 => quic = *p,
            _ => {}
        }
    }
    (tcp, quic)
}

fn receiver() -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(SockProtocol::UDP))?;
    // Every kkachi of this user on this host listens on the same port and gets every
    // beacon.
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT)).into())?;
    UdpSocket::from_std(socket.into())
}

fn sender() -> io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_nonblocking(true)?;
    socket.set_multicast_loop_v4(true)?;
    socket.set_multicast_ttl_v4(1)?;
    UdpSocket::from_std(socket)
}

/// Reads from `socket` if there is one; never ready otherwise.
async fn recv_from(socket: &Option<UdpSocket>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    match socket {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

fn next_send() -> tokio::time::Instant {
    let jitter = rand::thread_rng().gen_range(0..JITTER.as_millis() as u64 * 2);
    tokio::time::Instant::now() + EVERY - JITTER + Duration::from_millis(jitter)
}

/// Sends and reads beacons until `seen` is closed. Fails only if nothing can be sent
/// (then the LAN is not searched, and the caller says so); if beacons cannot be read
/// (the port taken by someone else), ours still go out, so contacts find us.
pub(super) async fn run(
    me: PeerId,
    shared: Arc<RwLock<Shared>>,
    seen: mpsc::Sender<Seen>,
) -> io::Result<()> {
    let send = sender()?;
    let recv = match receiver() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, port = PORT, "cannot listen for contacts' beacons on the local network; ours still go out");
            None
        }
    };
    let mut interfaces = if_watch::tokio::IfWatcher::new()?;
    // The addresses we send from (one per interface address; loopback left out: it is
    // no network, and the host's other interfaces loop our beacons back to it).
    let mut joined: HashSet<Ipv4Addr> = HashSet::new();
    let mut sightings: HashMap<PeerId, Sighting> = HashMap::new();
    let timer = tokio::time::sleep_until(tokio::time::Instant::now());
    tokio::pin!(timer);
    let mut buf = vec![0u8; MAX_BEACON_LEN + 1];
    let mut cache: Option<(u64, u64, Expected)> = None;
    loop {
        tokio::select! {
            event = interfaces.select_next_some() => match event {
                Ok(if_watch::IfEvent::Up(net)) => {
                    if let IpAddr::V4(addr) = net.addr()
                        && !addr.is_loopback()
                        && joined.insert(addr)
                    {
                        if let Some(recv) = &recv
                            && let Err(e) = recv.join_multicast_v4(GROUP, addr)
                        {
                            tracing::debug!(%addr, error = %e, "cannot listen for beacons on this interface");
                        }
                        // A new network: we tell it at once.
                        timer.as_mut().reset(tokio::time::Instant::now());
                    }
                }
                Ok(if_watch::IfEvent::Down(net)) => {
                    if let IpAddr::V4(addr) = net.addr()
                        && joined.remove(&addr)
                        && let Some(recv) = &recv
                    {
                        let _ = recv.leave_multicast_v4(GROUP, addr);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "interface watch failed"),
            },
            () = &mut timer => {
                timer.as_mut().reset(next_send());
                let slot = beacon_slot(crate::engine::now_ms() / 1000);
                let (keys, ports) = {
                    let s = shared.read();
                    (s.contacts.iter().map(|(_, k)| k.clone()).collect::<Vec<_>>(), s.ports)
                };
                if ports != (0, 0) {
                    for addr in &joined {
                        if let Err(e) = socket2::SockRef::from(&send).set_multicast_if_v4(addr) {
                            tracing::debug!(%addr, error = %e, "cannot send beacons on this interface");
                            continue;
                        }
                        let datagrams = beacons(&me, &keys, slot, (IpAddr::V4(*addr), ports), &mut rand::thread_rng());
                        for d in &datagrams {
                            let _ = send.send_to(&d.encode(), (GROUP, PORT)).await;
                        }
                    }
                }
                let gone: Vec<PeerId> = sightings
                    .iter()
                    .filter(|(_, s)| s.last.elapsed() > FORGET_AFTER)
                    .map(|(p, _)| *p)
                    .collect();
                for peer in gone {
                    // Never waits on the network task either: what does not fit now is
                    // told at the next period (the sighting stays until then).
                    match seen.try_send(Seen::Gone(peer)) {
                        Ok(()) => {
                            sightings.remove(&peer);
                        }
                        Err(mpsc::error::TrySendError::Full(_)) => {}
                        Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                    }
                }
            },
            read = recv_from(&recv, &mut buf) => {
                let Ok((n, from)) = read else { continue };
                let Ok(beacon) = Beacon::decode(&buf[..n]) else { continue };
                let slot = beacon_slot(crate::engine::now_ms() / 1000);
                let expected = {
                    let s = shared.read();
                    if cache.as_ref().is_none_or(|(at, generation, _)| *at != slot || *generation != s.generation) {
                        cache = Some((slot, s.generation, expected(&s.contacts, slot)));
                    }
                    &cache.as_ref().expect("just filled").2
                };
                for (peer, ports) in recognise(&beacon, from.ip(), expected) {
                    let sighting = sightings.entry(peer).or_insert_with(|| Sighting {
                        last: Instant::now(),
                        from: Vec::new(),
                    });
                    if !sighting.saw(from.ip(), ports) {
                        continue;
                    }
                    // Never waits on the network task (a busy one must not stop our
                    // beacons): what does not fit is told with the next beacon.
                    match seen.try_send(Seen::Found(peer, sighting.addresses(peer))) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            sighting.from.pop();
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kkachi_protocol::Identity;

    #[test]
    fn a_contacts_beacon_names_it_and_a_strangers_or_a_replay_names_nobody() {
        let (me, friend, stranger) = (
            Identity::generate(),
            Identity::generate(),
            Identity::generate(),
        );
        let ours = vec![(friend.peer_id(), me.lan_key_for(&friend.public()).unwrap())];
        let slot = 1000;
        let expected = expected(&ours, slot);
        let mut rng = rand::thread_rng();
        let home: IpAddr = "192.0.2.7".parse().unwrap();
        // The friend's beacon, one slot off (clock skew), names the friend and its ports.
        let theirs = [friend.lan_key_for(&me.public()).unwrap()];
        let b = &beacons(
            &friend.peer_id(),
            &theirs,
            slot + 1,
            (home, (4001, 4002)),
            &mut rng,
        )[0];
        assert_eq!(
            recognise(b, home, &expected),
            [(friend.peer_id(), (4001, 4002))]
        );
        // The same bytes replayed from another address name nobody.
        assert!(recognise(b, "192.0.2.66".parse().unwrap(), &expected).is_empty());
        // Two slots off: stale, nobody.
        let old = &beacons(
            &friend.peer_id(),
            &theirs,
            slot - 2,
            (home, (4001, 4002)),
            &mut rng,
        )[0];
        assert!(recognise(old, home, &expected).is_empty());
        // A stranger who holds our card announces itself to us: nobody we know.
        let s = [stranger.lan_key_for(&me.public()).unwrap()];
        let b = &beacons(&stranger.peer_id(), &s, slot, (home, (1, 2)), &mut rng)[0];
        assert!(recognise(b, home, &expected).is_empty());
        // Our own beacon, looped back, names nobody either.
        let mine = &beacons(
            &me.peer_id(),
            &[ours[0].1.clone()],
            slot,
            (home, (1, 2)),
            &mut rng,
        )[0];
        assert!(recognise(mine, home, &expected).is_empty());
    }

    #[test]
    fn sightings_keep_a_few_addresses_newest_first() {
        let peer = Identity::generate().peer_id();
        let first: IpAddr = "192.0.2.7".parse().unwrap();
        let second: IpAddr = "198.51.100.7".parse().unwrap();
        let mut s = Sighting {
            last: Instant::now(),
            from: Vec::new(),
        };
        assert!(s.saw(first, (4001, 4002)));
        assert!(!s.saw(first, (4001, 4002)), "nothing new");
        assert!(s.saw(second, (4001, 0)));
        let addrs = s.addresses(peer);
        assert_eq!(
            addrs.len(),
            3,
            "the newest first: TCP only, then TCP and QUIC"
        );
        assert_eq!(
            addrs[0],
            format!("/ip4/198.51.100.7/tcp/4001/p2p/{peer}")
                .parse::<Multiaddr>()
                .unwrap()
        );
        assert_eq!(
            addrs[2],
            format!("/ip4/192.0.2.7/udp/4002/quic-v1/p2p/{peer}")
                .parse::<Multiaddr>()
                .unwrap()
        );
        for i in 0..50u8 {
            s.saw(IpAddr::from([10, 0, 0, i]), (1, 0));
        }
        assert_eq!(s.from.len(), MAX_ADDRS_PER_CONTACT, "bounded");
    }

    #[test]
    fn ports_come_from_the_ipv4_listen_addresses() {
        let listen: Vec<Multiaddr> = [
            "/ip6/::1/tcp/9",
            "/ip4/10.0.0.2/tcp/4001",
            "/ip4/10.0.0.2/udp/4002/quic-v1",
            "/ip4/127.0.0.1/tcp/5000",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        assert_eq!(ports_of(&listen), (4001, 4002));
        assert_eq!(ports_of(&[]), (0, 0));
    }
}
