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
use kkachi_protocol::lan::{Beacon, BeaconTag, LanKey, MAX_BEACON_LEN, beacon_slot, beacons};
use kkachi_protocol::{Multiaddr, PeerId};
use libp2p::multiaddr::Protocol;
use parking_lot::RwLock;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// The multicast group beacons go to (organisation-local scope).
pub(super) const GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 75, 75);
/// The UDP port beacons go to.
pub(super) const PORT: u16 = 47_575;
/// How often we send a beacon.
const EVERY: Duration = Duration::from_secs(4);
/// A contact whose beacons stopped this long ago has left the network.
const FORGET_AFTER: Duration = Duration::from_secs(15);
/// Beacons read from the network per tick at most: a flood costs a bounded amount.
const MAX_READ_PER_TICK: usize = 4096;
/// Source addresses kept per contact: anyone on the LAN can replay a contact's beacon
/// from elsewhere (a dial there fails the handshake), so one replay must not hide the
/// contact's real address.
const MAX_ADDRS_PER_CONTACT: usize = 4;

/// What the beacon task shares with its handles.
#[derive(Debug, Default)]
pub(super) struct Shared {
    /// The LAN key we share with each contact (not blocked).
    pub(super) contacts: Vec<(PeerId, LanKey)>,
    /// The ports we listen on for contacts: TCP, QUIC (0: none).
    pub(super) ports: (u16, u16),
}

/// What the beacon task tells the network task.
#[derive(Debug)]
pub(super) enum Seen {
    /// A contact's beacons came from these addresses (each ends in its peer id): all
    /// of them, newest last.
    Found(PeerId, Vec<Multiaddr>),
    /// A contact's beacons stopped.
    Gone(PeerId),
}

/// The tags each contact's beacons carry for us around `slot`, with whom they name.
fn expected(contacts: &[(PeerId, LanKey)], slot: u64) -> HashMap<BeaconTag, PeerId> {
    let mut map = HashMap::with_capacity(contacts.len() * 3);
    for (peer, key) in contacts {
        for s in [slot.saturating_sub(1), slot, slot + 1] {
            map.insert(key.tag(peer, s), *peer);
        }
    }
    map
}

/// The contacts a beacon names.
fn recognise(beacon: &Beacon, expected: &HashMap<BeaconTag, PeerId>) -> Vec<PeerId> {
    let mut found: Vec<PeerId> = beacon
        .tags
        .iter()
        .filter_map(|t| expected.get(t).copied())
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Where `peer` listens, by a beacon from `from` carrying `ports`.
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
    // Every kkachi on this host listens on the same port and gets every beacon.
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

/// Sends and reads beacons until `seen` is closed. Fails only if the sockets cannot be
/// made (then the LAN is not searched, and the caller says so).
pub(super) async fn run(
    me: PeerId,
    shared: Arc<RwLock<Shared>>,
    seen: mpsc::Sender<Seen>,
) -> io::Result<()> {
    let recv = receiver()?;
    let send = sender()?;
    let mut interfaces = if_watch::tokio::IfWatcher::new()?;
    let mut joined: HashSet<Ipv4Addr> = HashSet::new();
    let mut last_seen: HashMap<PeerId, Sighting> = HashMap::new();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; MAX_BEACON_LEN + 1];
    let mut slot_cache: Option<(u64, usize, HashMap<BeaconTag, PeerId>)> = None;
    let mut read_this_tick = 0usize;
    // A beacon also goes out at once when an interface comes up or a contact shows up
    // somewhere new (so it finds us without waiting a whole period), at most this often.
    let mut last_sent: Option<Instant> = None;
    let send_soon = |tick: &mut tokio::time::Interval, last_sent: &Option<Instant>| {
        if last_sent.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            tick.reset_immediately();
        }
    };
    loop {
        tokio::select! {
            event = interfaces.select_next_some() => match event {
                Ok(if_watch::IfEvent::Up(net)) => {
                    if let IpAddr::V4(addr) = net.addr()
                        && joined.insert(addr)
                    {
                        if let Err(e) = recv.join_multicast_v4(GROUP, addr) {
                            tracing::debug!(%addr, error = %e, "cannot listen for beacons on this interface");
                        }
                        send_soon(&mut tick, &last_sent);
                    }
                }
                Ok(if_watch::IfEvent::Down(net)) => {
                    if let IpAddr::V4(addr) = net.addr()
                        && joined.remove(&addr)
                    {
                        let _ = recv.leave_multicast_v4(GROUP, addr);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "interface watch failed"),
            },
            _ = tick.tick() => {
                read_this_tick = 0;
                let now = crate::engine::now_ms() / 1000;
                let slot = beacon_slot(now);
                let (keys, ports) = {
                    let s = shared.read();
                    (s.contacts.iter().map(|(_, k)| k.clone()).collect::<Vec<_>>(), s.ports)
                };
                if ports != (0, 0) {
                    last_sent = Some(Instant::now());
                    let datagrams = beacons(&me, &keys, slot, ports, &mut rand::thread_rng());
                    for addr in &joined {
                        if let Err(e) = socket2::SockRef::from(&send).set_multicast_if_v4(addr) {
                            tracing::debug!(%addr, error = %e, "cannot send beacons on this interface");
                            continue;
                        }
                        for d in &datagrams {
                            let _ = send.send_to(&d.encode(), (GROUP, PORT)).await;
                        }
                    }
                }
                let gone: Vec<PeerId> = last_seen
                    .iter()
                    .filter(|(_, s)| s.last.elapsed() > FORGET_AFTER)
                    .map(|(p, _)| *p)
                    .collect();
                for peer in gone {
                    last_seen.remove(&peer);
                    if seen.send(Seen::Gone(peer)).await.is_err() {
                        return Ok(());
                    }
                }
            },
            read = recv.recv_from(&mut buf), if read_this_tick < MAX_READ_PER_TICK => {
                read_this_tick += 1;
                let Ok((n, from)) = read else { continue };
                let Ok(beacon) = Beacon::decode(&buf[..n]) else { continue };
                let slot = beacon_slot(crate::engine::now_ms() / 1000);
                let expected = {
                    let s = shared.read();
                    let stale = slot_cache
                        .as_ref()
                        .is_none_or(|(at, n, _)| *at != slot || *n != s.contacts.len());
                    if stale {
                        slot_cache = Some((slot, s.contacts.len(), expected(&s.contacts, slot)));
                    }
                    &slot_cache.as_ref().expect("just filled").2
                };
                let ports = (beacon.tcp_port, beacon.quic_port);
                for peer in recognise(&beacon, expected) {
                    let sighting = last_seen.entry(peer).or_insert_with(|| Sighting {
                        last: Instant::now(),
                        from: Vec::new(),
                    });
                    if sighting.saw(from.ip(), ports) {
                        send_soon(&mut tick, &last_sent);
                        if seen.send(Seen::Found(peer, sighting.addresses(peer))).await.is_err() {
                            return Ok(());
                        }
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
    fn a_contacts_beacon_names_it_and_a_strangers_names_nobody() {
        let (me, friend, stranger) = (
            Identity::generate(),
            Identity::generate(),
            Identity::generate(),
        );
        let ours = vec![(friend.peer_id(), me.lan_key_for(&friend.public()))];
        let slot = 1000;
        let expected = expected(&ours, slot);
        let mut rng = rand::thread_rng();
        // The friend's beacon, one slot off (clock skew), names the friend.
        let theirs = [friend.lan_key_for(&me.public())];
        let b = &beacons(&friend.peer_id(), &theirs, slot + 1, (4001, 4002), &mut rng)[0];
        assert_eq!(recognise(b, &expected), [friend.peer_id()]);
        // Two slots off: stale, nobody.
        let old = &beacons(&friend.peer_id(), &theirs, slot - 2, (4001, 4002), &mut rng)[0];
        assert!(recognise(old, &expected).is_empty());
        // A stranger who holds our card announces itself to us: nobody we know.
        let s = [stranger.lan_key_for(&me.public())];
        let b = &beacons(&stranger.peer_id(), &s, slot, (1, 2), &mut rng)[0];
        assert!(recognise(b, &expected).is_empty());
        // Our own beacon, looped back, names nobody either.
        let mine = &beacons(&me.peer_id(), &[ours[0].1.clone()], slot, (1, 2), &mut rng)[0];
        assert!(recognise(mine, &expected).is_empty());
    }

    #[test]
    fn a_replayed_beacon_does_not_hide_where_the_contact_really_is() {
        let peer = Identity::generate().peer_id();
        let real: IpAddr = "192.0.2.7".parse().unwrap();
        let replay: IpAddr = "192.0.2.66".parse().unwrap();
        let mut s = Sighting {
            last: Instant::now(),
            from: Vec::new(),
        };
        assert!(s.saw(real, (4001, 4002)));
        assert!(!s.saw(real, (4001, 4002)), "nothing new");
        assert!(s.saw(replay, (4001, 4002)));
        let addrs = s.addresses(peer);
        assert_eq!(addrs.len(), 4, "both sources, TCP and QUIC each");
        assert_eq!(
            addrs[2],
            format!("/ip4/192.0.2.7/tcp/4001/p2p/{peer}")
                .parse::<Multiaddr>()
                .unwrap()
        );
        assert_eq!(
            addrs[3],
            format!("/ip4/192.0.2.7/udp/4002/quic-v1/p2p/{peer}")
                .parse::<Multiaddr>()
                .unwrap()
        );
        // A flood of replays from many addresses keeps a bounded list.
        for i in 0..50u8 {
            s.saw(IpAddr::from([10, 0, 0, i]), (1, 0));
        }
        assert_eq!(s.from.len(), MAX_ADDRS_PER_CONTACT);
        // The contact's next beacon puts its address back.
        assert!(s.saw(real, (4001, 4002)));
        assert_eq!(s.from.last(), Some(&(real, (4001, 4002))));
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
