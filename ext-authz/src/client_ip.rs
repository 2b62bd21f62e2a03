//! The caller's address: Envoy's downstream peer, or, when that peer is a trusted proxy,
//! the right-most `x-forwarded-for` entry that is not itself a trusted proxy. Entries a
//! client adds on the left are never believed.

use crate::ip_net::IpNet;
use std::net::IpAddr;

pub fn resolve(peer: Option<&str>, xff: Option<&str>, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer: IpAddr = peer?.parse().ok()?;
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(peer) {
        return Some(peer);
    }
    let Some(xff) = xff else { return Some(peer) };
    for hop in xff.rsplit(',').map(str::trim) {
        // An unreadable hop ends the walk: what lies left of it cannot be trusted.
        let Ok(ip) = hop.parse::<IpAddr>() else {
            return None;
        };
        if !is_trusted(ip) {
            return Some(ip);
        }
    }
    Some(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| IpNet::parse(n).unwrap()).collect()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_xff_says() {
        let ip = resolve(Some("203.0.113.9"), Some("10.0.0.1"), &nets(&["127.0.0.1"]));
        assert_eq!(ip, Some("203.0.113.9".parse().unwrap()));
    }

    #[test]
    fn trusted_peer_yields_rightmost_untrusted_hop() {
        let t = nets(&["127.0.0.0/8", "10.0.0.0/8"]);
        // Envoy appends the peer; a client prepends lies on the left.
        let ip = resolve(
            Some("127.0.0.1"),
            Some("6.6.6.6, 198.51.100.7, 10.0.0.3, 127.0.0.1"),
            &t,
        );
        assert_eq!(ip, Some("198.51.100.7".parse().unwrap()));
    }

    #[test]
    fn garbage_hop_gives_no_address_and_missing_peer_gives_none() {
        let t = nets(&["127.0.0.1"]);
        assert_eq!(
            resolve(Some("127.0.0.1"), Some("junk, 127.0.0.1"), &t),
            None
        );
        assert_eq!(resolve(None, None, &t), None);
        assert_eq!(
            resolve(Some("127.0.0.1"), None, &t),
            Some("127.0.0.1".parse().unwrap())
        );
    }
}
