//! IP networks (`10.0.0.0/8`, `2001:db8::/32`, or a bare address) for allowlists and
//! trusted proxies. An IPv4-mapped address `::ffff:a.b.c.d` (as a dual-stack socket reports
//! it) is the IPv4 address, and a network written in that form (`::ffff:10.0.0.0/104`) is
//! the IPv4 network (`10.0.0.0/8`). Families never mix otherwise: an IPv6 network, even
//! `::/0`, contains no IPv4 client, so an entry meant for IPv6 never widens to IPv4 (a
//! `trusted_proxies: ["::/0"]` must not trust every IPv4 peer's `x-forwarded-for`).
//!
//! Parsing and containment are the `ipnet` crate's; this module adds only the mapped-address
//! rule, the bare-address-is-a-host rule and the network that matches nothing.

use std::net::IpAddr;

use ipnet::Ipv4Net;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    /// `None` matches no address at all (used when a stored list cannot be read).
    net: Option<ipnet::IpNet>,
}

impl IpNet {
    pub fn parse(s: &str) -> Result<Self, String> {
        let net = match s.split_once('/') {
            // ipnet's grammar has no spaces; a config may put them around either part.
            Some((a, p)) => {
                let (a, p) = (a.trim(), p.trim());
                format!("{a}/{p}").parse::<ipnet::IpNet>().map_err(|_| {
                    match a.parse::<IpAddr>() {
                        Ok(addr) => {
                            let max = if addr.is_ipv4() { 32 } else { 128 };
                            format!("{s:?}: prefix length must be 0..={max}")
                        }
                        Err(_) => not_an_address(s),
                    }
                })?
            }
            // A bare address is the single host.
            None => ipnet::IpNet::from(s.trim().parse::<IpAddr>().map_err(|_| not_an_address(s))?),
        };
        Ok(Self {
            net: Some(ipv4_if_mapped(net)),
        })
    }

    pub fn nothing() -> Self {
        Self { net: None }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // ipnet never matches across families, which is the rule we want once a mapped
        // client has become the IPv4 client.
        self.net.is_some_and(|net| net.contains(&canonical(ip)))
    }
}

fn not_an_address(s: &str) -> String {
    format!("{s:?} is not an IP address or CIDR")
}

/// Written as IPv4-mapped IPv6 with a prefix covering the mapped block, it is the IPv4
/// network (one spelling, one value).
fn ipv4_if_mapped(net: ipnet::IpNet) -> ipnet::IpNet {
    match net {
        ipnet::IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
            Some(v4) if v6.prefix_len() >= 96 => Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(ipnet::IpNet::V4)
                .unwrap_or(net),
            _ => net,
        },
        v4 => v4,
    }
}

/// An IPv4-mapped IPv6 address is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.net {
            None => f.write_str("none"),
            // `addr/prefix`, host bits kept as written, so it parses back equal.
            Some(net) => write!(f, "{net}"),
        }
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
    fn an_ipv4_mapped_network_is_the_ipv4_network() {
        let n = IpNet::parse("::ffff:10.0.0.0/104").unwrap();
        assert_eq!(n, IpNet::parse("10.0.0.0/8").unwrap());
        assert!(n.contains(ip("10.1.2.3")));
        assert!(n.contains(ip("::ffff:10.1.2.3")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(!IpNet::parse("::/0").unwrap().contains(ip("10.1.2.3")));
        assert!(!IpNet::parse("::/0")
            .unwrap()
            .contains(ip("::ffff:10.1.2.3")));
        assert!(IpNet::parse("::/0").unwrap().contains(ip("2001:db8::1")));
        assert!(!IpNet::parse("2001:db8::/32")
            .unwrap()
            .contains(ip("10.1.2.3")));
        assert!(!IpNet::parse("0.0.0.0/0")
            .unwrap()
            .contains(ip("2001:db8::1")));
    }

    #[test]
    fn bad_input_is_rejected_and_nothing_matches_nothing() {
        assert!(IpNet::parse("10.0.0.0/33").is_err());
        assert!(IpNet::parse("hello").is_err());
        assert!(IpNet::parse("::/129").is_err());
        assert!(!IpNet::nothing().contains(ip("0.0.0.0")));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use std::net::{Ipv4Addr, Ipv6Addr};

        fn any_ip() -> impl Strategy<Value = IpAddr> {
            prop_oneof![
                any::<u32>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
                any::<u128>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
                // IPv4-mapped addresses, and addresses near the mapped block's edges.
                any::<u32>().prop_map(|b| IpAddr::V6(Ipv4Addr::from(b).to_ipv6_mapped())),
                (any::<u32>(), 0u128..4).prop_map(|(b, hi)| IpAddr::V6(Ipv6Addr::from(
                    (0xfffe + hi) << 32 | u128::from(b)
                ))),
            ]
        }

        /// A valid network: an address and a prefix length its family allows.
        fn any_net() -> impl Strategy<Value = (IpAddr, u8)> {
            any_ip().prop_flat_map(|a| {
                let max: u8 = if a.is_ipv4() { 32 } else { 128 };
                (Just(a), 0..=max)
            })
        }

        /// The reference: a network written IPv4-mapped with a prefix of at least 96 is the
        /// IPv4 network; a mapped client is the IPv4 client; families never mix; then the
        /// first `prefix` bits agree (bit by bit, written out by hand here).
        fn reference(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
            let mapped = |a: Ipv6Addr| {
                let o = a.octets();
                o[..10].iter().all(|b| *b == 0) && o[10] == 0xff && o[11] == 0xff
            };
            let (net_v4, net_bits, prefix) = match net {
                IpAddr::V4(v4) => (true, u128::from(u32::from(v4)) << 96, u32::from(prefix)),
                IpAddr::V6(v6) if mapped(v6) && prefix >= 96 => {
                    (true, u128::from(v6) << 96, u32::from(prefix) - 96)
                }
                IpAddr::V6(v6) => (false, u128::from(v6), u32::from(prefix)),
            };
            let (ip_v4, ip_bits) = match ip {
                IpAddr::V4(v4) => (true, u128::from(u32::from(v4)) << 96),
                IpAddr::V6(v6) if mapped(v6) => (true, u128::from(v6) << 96),
                IpAddr::V6(v6) => (false, u128::from(v6)),
            };
            net_v4 == ip_v4
                && (0..prefix).all(|i| (net_bits >> (127 - i)) & 1 == (ip_bits >> (127 - i)) & 1)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn parse_never_panics(s in "\\PC{0,60}") {
                let _ = IpNet::parse(&s);
            }

            #[test]
            fn parse_never_panics_on_near_cidrs(s in "[0-9a-fA-F:./ +-]{0,50}") {
                let _ = IpNet::parse(&s);
            }

            #[test]
            fn display_parses_back_to_the_same_network((addr, prefix) in any_net()) {
                let net = IpNet::parse(&format!("{addr}/{prefix}")).unwrap();
                prop_assert_eq!(IpNet::parse(&net.to_string()), Ok(net));
            }

            #[test]
            fn containment_equals_the_u128_reference((addr, prefix) in any_net(), ip in any_ip()) {
                let net = IpNet::parse(&format!("{addr}/{prefix}")).unwrap();
                prop_assert_eq!(net.contains(ip), reference(addr, prefix, ip), "{} {}", net, ip);
            }

            #[test]
            fn a_network_contains_its_own_address((addr, prefix) in any_net()) {
                let net = IpNet::parse(&format!("{addr}/{prefix}")).unwrap();
                // Except an IPv6 network wider than the mapped block starting at a mapped
                // address: the address is IPv4, and families never mix.
                let v6_wider_than_mapped = matches!(addr, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() && prefix < 96);
                prop_assert_eq!(net.contains(addr), !v6_wider_than_mapped);
            }

            #[test]
            fn a_bare_address_is_a_single_host(a in any_ip(), b in any_ip()) {
                let net = IpNet::parse(&a.to_string()).unwrap();
                let same = |x: IpAddr| match x {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(x),
                    v4 => v4,
                };
                prop_assert_eq!(net.contains(b), same(a) == same(b));
            }
        }
    }
}
