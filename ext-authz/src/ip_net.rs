//! IP networks (`10.0.0.0/8`, `2001:db8::/32`, or a bare address) for allowlists and
//! trusted proxies.

use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
    /// Matches no address at all (used when a stored list cannot be read).
    none: bool,
}

impl IpNet {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr_s, prefix_s) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_s {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Self {
            addr,
            prefix,
            none: false,
        })
    }

    pub fn nothing() -> Self {
        Self {
            addr: IpAddr::from([0, 0, 0, 0]),
            prefix: 32,
            none: true,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        if self.none {
            return false;
        }
        // An IPv4-mapped IPv6 peer (::ffff:a.b.c.d) is the IPv4 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.none {
            return f.write_str("none");
        }
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_and_single_addresses_match() {
        let n = IpNet::parse("10.0.0.0/8").unwrap();
        assert!(n.contains(ip("10.255.1.2")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(IpNet::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(!IpNet::parse("127.0.0.1").unwrap().contains(ip("127.0.0.2")));
        assert!(IpNet::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        let v6 = IpNet::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
    }

    #[test]
    fn mapped_ipv4_peer_matches_ipv4_net() {
        assert!(IpNet::parse("10.0.0.0/8")
            .unwrap()
            .contains(ip("::ffff:10.1.1.1")));
    }

    #[test]
    fn bad_input_is_rejected_and_nothing_matches_nothing() {
        assert!(IpNet::parse("10.0.0.0/33").is_err());
        assert!(IpNet::parse("hello").is_err());
        assert!(IpNet::parse("::/129").is_err());
        assert!(!IpNet::nothing().contains(ip("0.0.0.0")));
    }
}
