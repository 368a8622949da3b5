//! The client's address: the socket peer, unless the peer is a trusted
//! proxy, in which case the rightmost untrusted hop of `X-Forwarded-For`.
//! Headers from untrusted peers are ignored, so clients cannot spoof it.

use std::net::IpAddr;

use ipnet::IpNet;

pub fn client_ip<'a>(
    peer: Option<IpAddr>,
    forwarded_for: impl Iterator<Item = &'a str>,
    trusted_proxies: &[IpNet],
) -> Option<IpAddr> {
    let peer = peer?;
    let is_trusted = |ip: &IpAddr| trusted_proxies.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let hops: Vec<IpAddr> = forwarded_for
        .flat_map(|header| header.split(','))
        .filter_map(|hop| parse_hop(hop.trim()))
        .collect();
    // Walk from the nearest hop outwards; the first one we do not trust is
    // the client as far as anyone we trust can tell.
    Some(
        hops.iter()
            .rev()
            .find(|hop| !is_trusted(hop))
            .copied()
            .unwrap_or(peer),
    )
}

/// A hop is an address, possibly with a port (`1.2.3.4:5678`, `[::1]:80`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Ok(socket) = hop.parse::<std::net::SocketAddr>() {
        return Some(socket.ip());
    }
    hop.rsplit_once(':').and_then(|(ip, _port)| ip.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let found = client_ip(
            Some(ip("203.0.113.9")),
            ["1.1.1.1"].into_iter(),
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(found, Some(ip("203.0.113.9")));
    }

    #[test]
    fn behind_trusted_proxies_the_rightmost_untrusted_hop_is_the_client() {
        let trusted = nets(&["10.0.0.0/8"]);
        let found = client_ip(
            Some(ip("10.0.0.2")),
            ["6.6.6.6, 198.51.100.7", "10.0.0.1"].into_iter(),
            &trusted,
        );
        // 6.6.6.6 was written by the client itself and is not believed.
        assert_eq!(found, Some(ip("198.51.100.7")));
    }

    #[test]
    fn garbage_hops_are_skipped_and_ports_are_stripped() {
        let trusted = nets(&["127.0.0.1/32"]);
        let found = client_ip(
            Some(ip("127.0.0.1")),
            ["198.51.100.7:4711, nonsense"].into_iter(),
            &trusted,
        );
        assert_eq!(found, Some(ip("198.51.100.7")));
    }

    #[test]
    fn a_trusted_peer_without_the_header_is_the_client() {
        let found = client_ip(
            Some(ip("127.0.0.1")),
            std::iter::empty(),
            &nets(&["127.0.0.1/32"]),
        );
        assert_eq!(found, Some(ip("127.0.0.1")));
    }
}
