//! holepunch's IPv6 pinhole clients against a real router: miniupnpd 2.3.1 in the lab of
//! `tests/lab/router-lab up --ipv6` (prefix `hp6-`), whose firewall drops new inbound IPv6
//! unless a pinhole allows it. The clients (`router::upnp::pinhole::PinholeClient`, UPnP IGDv2
//! WANIPv6FirewallControl; `router::pcp::v6::Pcp6Client`, PCP MAP over IPv6) run on a thread
//! inside the LAN namespace; a client in the WAN namespace (2001:db8:ffff::1) sends real TCP and
//! UDP to the LAN host's global address 2001:db8:77::10. Needs root: the lab tier (as root:
//! `cargo test --features lab --test ipv6_lab`).

#[path = "support/lab.rs"]
mod lab;

use std::net::Ipv6Addr;
use std::time::Duration;

use holepunch::model::Protocol;
use holepunch::router::RouterError;
use holepunch::router::pcp::codec::Nonce;
use holepunch::router::pcp::v6::{Pcp6Client, PinholeMap};
use holepunch::router::upnp::http::HttpUrl;
use holepunch::router::upnp::pinhole::{
    PinholeClient, PinholeError, PinholeHealth, PinholeRequest,
};
use lab::{EchoServer, Lab, in_netns};

const PREFIX: &str = "hp6-";
const ROUTER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 1);
const LAN: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x10);
const NODE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x20);
const WAN_CLIENT: &str = "2001:db8:ffff::1";
const HTTP_TIMEOUT: Duration = Duration::from_secs(3);

/// The lab's echo server (tests/support/lab.rs) on `[ip]:port` in namespace `ns`.
fn echo(lab: &Lab, ns: &str, ip: Ipv6Addr, port: u16) -> EchoServer {
    lab.echo_server(ns, &ip.to_string(), port)
}

/// Whether the internet client reaches `[ip]:port` over `proto` and gets its line back with
/// its own address (no NAT in between).
fn reaches(lab: &Lab, proto: &str, ip: Ipv6Addr, port: u16) -> bool {
    let line = format!("hello {proto} {port}");
    let answer = lab.ask("wan", proto, &ip.to_string(), port, &line);
    if let Some(answer) = &answer {
        assert_eq!(*answer, format!("{WAN_CLIENT} {line}"), "the echo's answer");
    }
    answer.is_some()
}

/// The router's pinhole chain with each rule's userdata (`pinhole-<id> ts-<lease end>`).
fn pinhole_rules(lab: &Lab) -> String {
    let out = lab.exec(
        "rtr",
        &[
            "nft",
            "--debug=netlink",
            "list",
            "chain",
            "inet",
            "filter",
            "miniupnpd",
        ],
    );
    assert!(out.status.success(), "nft list: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// When miniupnpd will drop pinhole `unique_id` (seconds of its monotonic clock), as it wrote
/// it in the rule's userdata.
// NOTE: miniupnpd 2.3.1 (nftables) keeps a pinhole's UniqueID and lease end only in the
// rule's userdata, `pinhole-<id> ts-<end>: <description>`, which `nft list` shows only with
// --debug=netlink.
fn lease_end(lab: &Lab, unique_id: u16) -> u64 {
    let rules = pinhole_rules(lab);
    let tag = format!("pinhole-{unique_id} ts-");
    let start = rules
        .find(&tag)
        .unwrap_or_else(|| panic!("no {tag} in\n{rules}"))
        + tag.len();
    rules[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no lease end after {tag} in\n{rules}"))
}

/// Runs `body` on a thread in the LAN namespace with a runtime of its own.
fn in_lan<T: Send>(lab: &Lab, body: impl AsyncFnOnce() -> T + Send) -> T {
    in_netns(&lab.ns("lan"), || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(body())
    })
}

async fn pinhole_client() -> PinholeClient {
    let url = HttpUrl::parse(&format!("http://[{ROUTER}]:5000/rootDesc.xml")).unwrap();
    PinholeClient::discover(&url, LAN, HTTP_TIMEOUT)
        .await
        .expect("the lab router's WANIPv6FirewallControl service")
}

fn request(protocol: Protocol, address: Ipv6Addr, port: u16) -> PinholeRequest {
    PinholeRequest {
        protocol,
        internal_address: address,
        internal_port: port,
        lease_secs: 600,
    }
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn upnp_pinhole_lets_ipv6_tcp_and_udp_in_only_while_it_exists() {
    let lab = Lab::up_with(PREFIX, &["--ipv6"]);
    let _echo = echo(&lab, "lan", LAN, 18600);
    assert!(!reaches(&lab, "tcp", LAN, 18600), "open before any pinhole");
    assert!(!reaches(&lab, "udp", LAN, 18600), "open before any pinhole");

    in_lan(&lab, async || {
        let client = pinhole_client().await;
        assert_eq!(
            client.control_url(),
            "http://[2001:db8:77::1]:5000/ctl/IP6FCtl"
        );
        let status = client.firewall_status().await.expect("GetFirewallStatus");
        assert!(
            status.enabled && status.inbound_pinhole_allowed,
            "{status:?}"
        );

        let tcp = client
            .add(&request(Protocol::Tcp, LAN, 18600))
            .await
            .expect("AddPinhole tcp");
        let udp = client
            .add(&request(Protocol::Udp, LAN, 18600))
            .await
            .expect("AddPinhole udp");
        assert_ne!(tcp.unique_id, udp.unique_id);
        assert!(reaches(&lab, "tcp", LAN, 18600), "{}", pinhole_rules(&lab));
        assert!(reaches(&lab, "udp", LAN, 18600), "{}", pinhole_rules(&lab));

        // The optional actions answer for a pinhole that exists (miniupnpd 2.3.1 counts no
        // packets: 0 and "no traffic" even now), and say nothing for one that does not.
        assert!(client.packets(tcp.unique_id).await.is_some());
        assert!(
            !matches!(
                client.check_working(tcp.unique_id).await,
                PinholeHealth::Unknown(_)
            ),
            "CheckPinholeWorking for an existing pinhole"
        );

        // UpdatePinhole moves the lease end by the difference (read back from the router).
        let before = lease_end(&lab, tcp.unique_id);
        let updated = client
            .update(tcp.unique_id, 1800)
            .await
            .expect("UpdatePinhole");
        assert_eq!(updated.lease_secs, 1800);
        let after = lease_end(&lab, tcp.unique_id);
        let moved = after.saturating_sub(before);
        assert!(
            (1200..=1205).contains(&moved),
            "lease end {before} -> {after}: moved by {moved} s, expected 1200"
        );
        assert!(reaches(&lab, "tcp", LAN, 18600), "closed by the update");

        client
            .delete(tcp.unique_id)
            .await
            .expect("DeletePinhole tcp");
        client
            .delete(udp.unique_id)
            .await
            .expect("DeletePinhole udp");
        assert!(!reaches(&lab, "tcp", LAN, 18600), "open after delete");
        assert!(!reaches(&lab, "udp", LAN, 18600), "open after delete");
        // Gone is gone: deleting again is success (miniupnpd answers 402, not 704), updating
        // is NoSuchEntry, and the optional actions say nothing.
        client
            .delete(tcp.unique_id)
            .await
            .expect("DeletePinhole of a missing pinhole");
        match client.update(tcp.unique_id, 600).await {
            Err(PinholeError::NoSuchEntry { unique_id, .. }) => {
                assert_eq!(unique_id, tcp.unique_id)
            }
            other => panic!("UpdatePinhole of a missing pinhole: {other:?}"),
        }
        assert_eq!(client.packets(tcp.unique_id).await, None);
        assert!(matches!(
            client.check_working(tcp.unique_id).await,
            PinholeHealth::Unknown(_)
        ));
    });
    assert!(!pinhole_rules(&lab).contains("dport 18600"));
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn upnp_pinhole_is_gone_after_a_router_restart_and_adding_it_again_restores_it() {
    let lab = Lab::up_with(PREFIX, &["--ipv6"]);
    let _echo = echo(&lab, "lan", LAN, 18610);
    let client = in_lan(&lab, async || {
        let client = pinhole_client().await;
        client
            .add(&request(Protocol::Tcp, LAN, 18610))
            .await
            .expect("AddPinhole");
        client
    });
    assert!(reaches(&lab, "tcp", LAN, 18610));
    lab.restart_router();
    assert!(!reaches(&lab, "tcp", LAN, 18610), "open after the restart");
    let again = in_lan(&lab, async || {
        // Adding the same pinhole twice gives the same UniqueID (a renewal, not a second one).
        let first = client
            .add(&request(Protocol::Tcp, LAN, 18610))
            .await
            .expect("AddPinhole after the restart");
        let second = client
            .add(&request(Protocol::Tcp, LAN, 18610))
            .await
            .expect("AddPinhole again");
        assert_eq!(first.unique_id, second.unique_id);
        first
    });
    assert!(reaches(&lab, "tcp", LAN, 18610), "not restored");
    assert_eq!(pinhole_rules(&lab).matches("dport 18610").count(), 1);
    in_lan(&lab, async || client.delete(again.unique_id).await).expect("DeletePinhole");
    assert!(!reaches(&lab, "tcp", LAN, 18610));
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn upnp_secure_mode_refuses_another_hosts_pinhole_with_a_typed_error() {
    let lab = Lab::up_with(PREFIX, &["--ipv6"]);
    let _node = echo(&lab, "node", NODE, 18620);
    let _lan = echo(&lab, "lan", LAN, 18620);
    in_lan(&lab, async || {
        let client = pinhole_client().await;
        // The caller's own address is opened...
        let own = client
            .add(&request(Protocol::Tcp, LAN, 18620))
            .await
            .expect("AddPinhole for the caller's own address");
        assert!(reaches(&lab, "tcp", LAN, 18620));
        // ...another host's is refused (606), and so is a port below 1024.
        for refused in [
            request(Protocol::Tcp, NODE, 18620),
            request(Protocol::Tcp, LAN, 80),
        ] {
            match client.add(&refused).await {
                Err(err @ PinholeError::NotAuthorized { .. }) => {
                    let text = err.to_string();
                    assert!(text.contains("606"), "{text}");
                    assert!(text.contains("2001:db8:77::10"), "{text}");
                    assert!(text.contains("exposure.mode = \"relay\""), "{text}");
                }
                other => panic!("AddPinhole {refused:?}: {other:?}"),
            }
        }
        client.delete(own.unique_id).await.expect("DeletePinhole");
    });
    assert!(
        !reaches(&lab, "tcp", NODE, 18620),
        "the refused pinhole is open"
    );
}

fn pcp_client() -> Pcp6Client {
    Pcp6Client::new(ROUTER, LAN)
}

fn pcp_map(protocol: Protocol, port: u16, nonce: Nonce) -> PinholeMap {
    PinholeMap {
        protocol,
        internal_port: port,
        lifetime_secs: 600,
        nonce,
    }
}

#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn pcp_map_over_ipv6_opens_a_pinhole_and_lifetime_zero_with_its_nonce_closes_it() {
    let lab = Lab::up_with(PREFIX, &["--ipv6"]);
    let _echo = echo(&lab, "lan", LAN, 18630);
    assert!(!reaches(&lab, "tcp", LAN, 18630), "open before any MAP");
    assert!(!reaches(&lab, "udp", LAN, 18630), "open before any MAP");
    let (tcp, udp) = (Nonce([0x61; 12]), Nonce([0x62; 12]));
    in_lan(&lab, async || {
        let mut client = pcp_client();
        for (protocol, nonce) in [(Protocol::Tcp, tcp), (Protocol::Udp, udp)] {
            let grant = client
                .map(&pcp_map(protocol, 18630, nonce))
                .await
                .expect("PCP MAP over IPv6");
            assert_eq!(grant.external_address, LAN, "a firewall keeps the address");
            assert_eq!(grant.external_port, 18630);
            assert_eq!(grant.lifetime_secs, 600);
        }
    });
    assert!(reaches(&lab, "tcp", LAN, 18630), "{}", pinhole_rules(&lab));
    assert!(reaches(&lab, "udp", LAN, 18630), "{}", pinhole_rules(&lab));

    in_lan(&lab, async || {
        let mut client = pcp_client();
        // Another nonce does not own the pinhole: refused, and it stays open.
        let stranger = client
            .delete(&pcp_map(Protocol::Tcp, 18630, Nonce([0x66; 12])))
            .await;
        assert!(
            matches!(stranger, Err(RouterError::Refused { .. })),
            "delete with another nonce: {stranger:?}"
        );
        client
            .delete(&pcp_map(Protocol::Tcp, 18630, tcp))
            .await
            .expect("delete with the pinhole's nonce");
    });
    assert!(!reaches(&lab, "tcp", LAN, 18630), "open after delete");
    assert!(reaches(&lab, "udp", LAN, 18630), "the UDP pinhole went too");

    // A router restart loses the pinhole; the client sees the epoch start again (§8.5), and
    // the same MAP (same nonce) restores the pinhole.
    in_lan(&lab, async || {
        let mut client = pcp_client();
        client
            .map(&pcp_map(Protocol::Udp, 18630, udp))
            .await
            .expect("MAP (a renewal in place)");
        assert!(!client.take_restart(), "a restart seen before one happened");
        lab.restart_router();
        assert!(!reaches(&lab, "udp", LAN, 18630), "open after the restart");
        client
            .map(&pcp_map(Protocol::Udp, 18630, udp))
            .await
            .expect("MAP after the restart");
        assert!(client.take_restart(), "the restart went unnoticed");
    });
    assert!(reaches(&lab, "udp", LAN, 18630), "not restored");
    in_lan(&lab, async || {
        let mut client = pcp_client();
        client
            .delete(&pcp_map(Protocol::Udp, 18630, udp))
            .await
            .expect("delete");
        // Deleting what is gone is success.
        client
            .delete(&pcp_map(Protocol::Udp, 18630, udp))
            .await
            .expect("delete again");
    });
    assert!(!reaches(&lab, "udp", LAN, 18630), "open after delete");
}

/// miniupnpd 2.3.1 forgets an IPv6 pinhole's nonce when MAP renews it in place, and then
/// refuses to delete it (see `Pcp6Client::renew`); renewing by replacing keeps it deletable.
#[test]
#[cfg_attr(
    not(feature = "lab"),
    ignore = "lab tier: needs root and network namespaces; run it with `sudo make test`"
)]
fn pcp_ipv6_pinhole_renewed_by_replacing_stays_deletable_where_renewing_in_place_does_not() {
    let lab = Lab::up_with(PREFIX, &["--ipv6"]);
    let _in_place = echo(&lab, "lan", LAN, 18640);
    let _replaced = echo(&lab, "lan", LAN, 18641);
    let (in_place, replaced) = (Nonce([0x71; 12]), Nonce([0x72; 12]));
    let refused = in_lan(&lab, async || {
        let mut client = pcp_client();
        let first = pcp_map(Protocol::Tcp, 18640, in_place);
        client.map(&first).await.expect("MAP");
        client.map(&first).await.expect("renewal in place");
        let refused = client.delete(&first).await;

        let second = pcp_map(Protocol::Tcp, 18641, replaced);
        client.map(&second).await.expect("MAP");
        for _ in 0..2 {
            let grant = client.renew(&second).await.expect("renewal by replacing");
            assert_eq!(grant.external_port, 18641);
        }
        assert!(reaches(&lab, "tcp", LAN, 18641), "closed by the renewal");
        client.delete(&second).await.expect("delete after renewals");
        refused
    });
    assert!(
        matches!(&refused, Err(RouterError::Refused { reason, .. }) if reason.contains("NOT_AUTHORIZED")),
        "delete after a renewal in place: {refused:?}"
    );
    assert!(
        reaches(&lab, "tcp", LAN, 18640),
        "the refused delete closed it"
    );
    assert!(!reaches(&lab, "tcp", LAN, 18641), "open after delete");
}
