//! The HTTP/1.1 client UPnP needs (RFC 9112), on hyper's HTTP/1 client connection (the
//! hyper kube's client already brings in): one request per connection (`Connection: close`),
//! `http://` URLs only, no redirects, a cap on the response head and body, and one deadline
//! for the whole exchange. URL parsing is sans-io and unit-tested; [`request`] owns the
//! socket.
//!
//! Hosts may be IPv6 literals in brackets (`http://[2001:db8::1]:5000/`, RFC 3986 §3.2.2), as
//! the router's IGDv2 WANIPv6FirewallControl service is reached over IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use tokio::net::TcpStream;

/// Largest response head (status line and headers) accepted: hyper's smallest read buffer.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Why an HTTP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0:?} is not an http:// URL with a host")]
    ParseUrl(String),
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no valid HTTP/1.x answer from {address}: {source}")]
    Exchange {
        address: String,
        #[source]
        source: hyper::Error,
    },
    #[error("no complete answer from {address} within {} ms", after.as_millis())]
    Timeout { address: String, after: Duration },
    #[error("the response from {address} is larger than {limit} bytes (refused)")]
    TooLarge { address: String, limit: usize },
    #[error("{address} answered with redirect {status} (redirects are not followed)")]
    Redirect { address: String, status: u16 },
}

/// An `http://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// A name, an IPv4 address, or an IPv6 address without brackets, written canonically
    /// (RFC 5952), so that two spellings of one address compare equal.
    pub host: String,
    pub port: u16,
    /// Starts with `/`; includes any query.
    pub path: String,
}

impl HttpUrl {
    pub fn parse(text: &str) -> Result<HttpUrl, HttpError> {
        let bad = || HttpError::ParseUrl(text.chars().take(200).collect());
        let text = text.trim();
        let rest = text
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case("http://"))
            .map(|_| &text[7..])
            .ok_or_else(bad)?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        let authority = authority.split('#').next().unwrap_or_default();
        // NOTE: an IPv6 literal is written in brackets (RFC 3986 §3.2.2); a zone ID
        // (`%25eth0`, RFC 6874) is refused: a link-local router address needs an interface,
        // which a URL from the network must not choose.
        let (host, port_text) = if let Some(rest) = authority.strip_prefix('[') {
            let (literal, after) = rest.split_once(']').ok_or_else(bad)?;
            let address: Ipv6Addr = literal.parse().map_err(|_| bad())?;
            let port_text = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(bad)?),
            };
            (address.to_string(), port_text)
        } else {
            let (host, port_text) = match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            };
            let host_ok = !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
            if !host_ok {
                return Err(bad());
            }
            (host.to_owned(), port_text)
        };
        let port = match port_text {
            Some(port) => port.parse::<u16>().map_err(|_| bad())?,
            None => 80,
        };
        if port == 0 || path.chars().any(|c| c.is_ascii_control() || c == ' ') {
            return Err(bad());
        }
        let path = path.split('#').next().unwrap_or("/").to_owned();
        Ok(HttpUrl { host, port, path })
    }

    /// `reference` resolved against this URL (RFC 3986 §5.2, the cases UPnP uses: absolute,
    /// absolute path, relative path).
    pub fn join(&self, reference: &str) -> Result<HttpUrl, HttpError> {
        let reference = reference.trim();
        if reference
            .get(..7)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"))
        {
            return HttpUrl::parse(reference);
        }
        if reference.contains("://") {
            return Err(HttpError::ParseUrl(reference.chars().take(200).collect()));
        }
        let path = if reference.starts_with('/') {
            reference.to_owned()
        } else {
            let dir = self.path.rsplit_once('/').map_or("", |(dir, _)| dir);
            format!("{dir}/{reference}")
        };
        HttpUrl::parse(&format!("http://{}{path}", self.address()))
    }

    /// The host as an IPv4 address, if it is one.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.host.parse().ok()
    }

    /// The host as an IPv6 address, if it is one.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.host.parse().ok()
    }

    /// The same port and path on another host: the router's description over IPv6 when
    /// discovery found it over IPv4 (miniupnpd serves both on one port).
    pub fn with_host(&self, host: IpAddr) -> HttpUrl {
        HttpUrl {
            host: host.to_string(),
            ..self.clone()
        }
    }

    /// `host:port`, with an IPv6 host in brackets: the `Host` header and the error messages.
    fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.address(), self.path)
    }
}

/// A response: its status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// Sends one request and reads the response, all within `timeout`; bodies over `limit`
/// bytes are refused (and not read further), redirects are errors.
pub async fn request(
    url: &HttpUrl,
    method: &str,
    headers: &[(&str, &str)],
    body: &str,
    limit: usize,
    timeout: Duration,
) -> Result<HttpResponse, HttpError> {
    request_scoped(None, 0, url, method, headers, body, limit, timeout).await
}

/// [`request`] from the local address `local` (the connection's source), when given, to a
/// link-local IPv6 host on the interface with index `scope_id` (0: no scope). The URL carries
/// no zone (RFC 6874 zones are not sent in a `Host` header, and the IGD's own URLs never have
/// one), so the connection is dialled with the scope here.
// NOTE: miniupnpd opens an IPv6 pinhole only to the address the request came from (its
// PinholeVerification compares the two as text), and a host with several global IPv6 addresses
// (privacy addresses, RFC 8981) may otherwise send from another one (README.md, "IPv6").
#[allow(clippy::too_many_arguments)]
pub async fn request_scoped(
    local: Option<IpAddr>,
    scope_id: u32,
    url: &HttpUrl,
    method: &str,
    headers: &[(&str, &str)],
    body: &str,
    limit: usize,
    timeout: Duration,
) -> Result<HttpResponse, HttpError> {
    let address = url.address();
    let exchanged = exchange(local, scope_id, url, method, headers, body, limit);
    match tokio::time::timeout(timeout, exchanged).await {
        Ok(result) => result,
        Err(_elapsed) => Err(HttpError::Timeout {
            address,
            after: timeout,
        }),
    }
}

async fn exchange(
    local: Option<IpAddr>,
    scope_id: u32,
    url: &HttpUrl,
    method: &str,
    headers: &[(&str, &str)],
    body: &str,
    limit: usize,
) -> Result<HttpResponse, HttpError> {
    let address = url.address();
    let failed = |source: hyper::Error| HttpError::Exchange {
        address: address.clone(),
        source,
    };
    let connect_error = |source| HttpError::Connect {
        address: address.clone(),
        source,
    };
    let stream = match local {
        None => TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(connect_error)?,
        Some(local) => {
            // Bound to `local`, the router must be an address of the same family.
            let remote: IpAddr = url.host.parse().map_err(|_| {
                connect_error(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a request from a given local address needs an address as the host",
                ))
            })?;
            let socket = match local {
                IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
            }
            .map_err(connect_error)?;
            socket
                .bind(SocketAddr::new(local, 0))
                .map_err(connect_error)?;
            let remote = match remote {
                // NOTE: RFC 4007 §6: a link-local address means something only with its
                // zone; the socket address carries it (sin6_scope_id), the URL does not.
                IpAddr::V6(v6) if scope_id != 0 => {
                    SocketAddr::V6(std::net::SocketAddrV6::new(v6, url.port, 0, scope_id))
                }
                other => SocketAddr::new(other, url.port),
            };
            socket.connect(remote).await.map_err(connect_error)?
        }
    };
    // NOTE: header names go out in title case (`Soapaction`, `Content-Type`): RFC 9110 §5.1
    // makes them case-insensitive, and title case is the closest hyper writes to the
    // `SOAPAction` of UPnP Device Architecture 1.1 §3.2.1 for routers that compare bytes.
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .title_case_headers(true)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES.max(limit))
        .handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(failed)?;
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(url.path.as_str())
        .header(hyper::header::HOST, address.as_str())
        .header(hyper::header::CONNECTION, "close")
        .header(
            hyper::header::USER_AGENT,
            concat!("holepunch/", env!("CARGO_PKG_VERSION"), " UPnP/1.1"),
        );
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    // The URL's path passed `HttpUrl::parse` and the headers are holepunch's own, so the
    // builder has nothing to refuse; a refusal is still an error, not a panic.
    let request = builder
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .map_err(|_| HttpError::ParseUrl(url.to_string()))?;

    let response = async {
        let response = sender.send_request(request).await.map_err(failed)?;
        let status = response.status().as_u16();
        if (300..400).contains(&status) {
            return Err(HttpError::Redirect {
                address: address.clone(),
                status,
            });
        }
        let too_large = || HttpError::TooLarge {
            address: address.clone(),
            limit,
        };
        // A Content-Length over the cap is refused before any of the body is read.
        if usize::try_from(response.body().size_hint().lower()).map_or(true, |n| n > limit) {
            return Err(too_large());
        }
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(source) => failed(*source),
                // The only other error is `Limited`'s: the cap was reached.
                Err(_) => too_large(),
            })?
            .to_bytes();
        Ok((status, body))
    };
    // The connection is driven here rather than spawned, so that the deadline in [`request`]
    // ends it too; once the answer is read, dropping it closes the socket.
    let mut connection = std::pin::pin!(connection);
    let mut response = std::pin::pin!(response);
    let (status, body) = tokio::select! {
        biased;
        done = &mut response => done?,
        ended = &mut connection => {
            ended.map_err(failed)?;
            response.await?
        }
    };
    // NOTE: measured on miniupnpd 2.3.1 (nftables): a mapping description of 64 bytes or more
    // comes back as its first 64 bytes plus 6 bytes of stray memory, often not UTF-8. Those
    // bytes become U+FFFD rather than failing the whole call.
    let body = String::from_utf8_lossy(&body).into_owned();
    Ok(HttpResponse { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_join() {
        let base = HttpUrl::parse("http://192.168.77.1:5000/rootDesc.xml").unwrap();
        assert_eq!(
            base,
            HttpUrl {
                host: "192.168.77.1".into(),
                port: 5000,
                path: "/rootDesc.xml".into()
            }
        );
        assert_eq!(base.ipv4(), Some(Ipv4Addr::new(192, 168, 77, 1)));
        assert_eq!(
            base.join("/ctl/IPConn").unwrap().to_string(),
            "http://192.168.77.1:5000/ctl/IPConn"
        );
        assert_eq!(
            HttpUrl::parse("HTTP://router/a/b.xml")
                .unwrap()
                .join("ctl")
                .unwrap()
                .to_string(),
            "http://router:80/a/ctl"
        );
        assert_eq!(base.join("http://10.0.0.1:80/x").unwrap().host, "10.0.0.1");
        assert_eq!(HttpUrl::parse("http://h:1?q").unwrap().path, "/?q");
        for bad in [
            "",
            "https://h/",
            "ftp://h/",
            "http://",
            "http://:80/",
            "http://h:0/",
            "http://h:99999/",
            "http://user@h/",
            "http://[::1/",
            "http://[fe80::1%25eth0]/",
            "http://[::1]x/",
            "http://[h]/",
            "http://::1/",
            "http://h/a b",
            "http://h/\r\nX: y",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad:?}");
        }
        assert!(base.join("file:///etc/passwd").is_err());
    }

    #[test]
    fn ipv6_literals_are_bracketed_and_canonical() {
        let url = HttpUrl::parse("http://[2001:DB8:77:0::1]:5000/rootDesc.xml").unwrap();
        assert_eq!(url.host, "2001:db8:77::1");
        assert_eq!(url.port, 5000);
        assert_eq!(url.ipv6(), Some("2001:db8:77::1".parse().unwrap()));
        assert_eq!(url.ipv4(), None);
        assert_eq!(url.to_string(), "http://[2001:db8:77::1]:5000/rootDesc.xml");
        assert_eq!(url.address(), "[2001:db8:77::1]:5000");
        assert_eq!(
            url.join("/ctl/IP6FCtl").unwrap().to_string(),
            "http://[2001:db8:77::1]:5000/ctl/IP6FCtl"
        );
        assert_eq!(HttpUrl::parse("http://[::1]/").unwrap().port, 80);
        let v4 = HttpUrl::parse("http://192.168.77.1:5000/rootDesc.xml").unwrap();
        assert_eq!(
            v4.with_host("2001:db8:77::1".parse().unwrap()).to_string(),
            "http://[2001:db8:77::1]:5000/rootDesc.xml"
        );
    }

    /// A one-shot server on loopback: sends `answer` to the first connection (after reading
    /// its request head and body), then closes it, or keeps it open for `hold`. Returns its
    /// URL and, once done, the request it read.
    async fn serve_once(
        answer: Vec<u8>,
        hold: Duration,
    ) -> (HttpUrl, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // The head, then as many body bytes as Content-Length says.
            loop {
                let n = socket.read(&mut buf).await.expect("read");
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if body.len() >= length {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            let _ = socket.write_all(&answer).await;
            tokio::time::sleep(hold).await;
            String::from_utf8_lossy(&request).into_owned()
        });
        let url = HttpUrl::parse(&format!("http://127.0.0.1:{port}/ctl/IPConn")).expect("url");
        (url, task)
    }

    async fn ask(answer: &[u8], limit: usize) -> Result<HttpResponse, HttpError> {
        let (url, _task) = serve_once(answer.to_vec(), Duration::ZERO).await;
        request(&url, "GET", &[], "", limit, Duration::from_secs(5)).await
    }

    #[tokio::test]
    async fn a_request_goes_out_as_upnp_expects_and_answers_are_read_by_length_chunks_or_close() {
        let (url, task) = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            Duration::ZERO,
        )
        .await;
        let headers = [("SOAPAction", "\"urn:x#AddPortMapping\"")];
        let response = request(&url, "POST", &headers, "<x/>", 100, Duration::from_secs(5))
            .await
            .expect("answer");
        assert_eq!(
            response,
            HttpResponse {
                status: 200,
                body: "hello".into()
            }
        );
        let sent = task.await.expect("server");
        assert!(sent.starts_with("POST /ctl/IPConn HTTP/1.1\r\n"), "{sent}");
        for line in [
            format!("Host: {}:{}", url.host, url.port),
            "Connection: close".to_owned(),
            "Soapaction: \"urn:x#AddPortMapping\"".to_owned(),
            "Content-Length: 4".to_owned(),
        ] {
            assert!(
                sent.contains(&format!("\r\n{line}\r\n")),
                "{line:?} in {sent}"
            );
        }
        assert!(sent.ends_with("\r\n\r\n<x/>"), "{sent}");

        let chunked = b"HTTP/1.1 500 Err\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n";
        let response = ask(chunked, 100).await.expect("chunked answer");
        assert_eq!((response.status, response.body.as_str()), (500, "abcde"));
        let until_close = b"HTTP/1.0 200 OK\r\n\r\nuntil eof";
        let response = ask(until_close, 100).await.expect("answer until close");
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, "until eof")
        );
        // Bytes that are not UTF-8 (miniupnpd's stray memory) do not fail the call.
        let stray = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\na\xffb";
        assert_eq!(ask(stray, 100).await.expect("answer").body, "a\u{fffd}b");
    }

    #[tokio::test]
    async fn oversized_redirecting_broken_or_silent_answers_are_refused() {
        let started = std::time::Instant::now();
        let huge = b"HTTP/1.1 200 OK\r\nContent-Length: 10485760\r\n\r\nxx";
        assert!(
            matches!(
                ask(huge, 65536).await,
                Err(HttpError::TooLarge { limit: 65536, .. })
            ),
            "a 10 MB Content-Length"
        );
        let mut chunks = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..40 {
            chunks.extend_from_slice(b"10\r\n0123456789abcdef\r\n");
        }
        assert!(matches!(
            ask(&chunks, 512).await,
            Err(HttpError::TooLarge { limit: 512, .. })
        ));
        let until_close = [&b"HTTP/1.0 200 OK\r\n\r\n"[..], &[b'x'; 2000]].concat();
        assert!(matches!(
            ask(&until_close, 512).await,
            Err(HttpError::TooLarge { .. })
        ));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );

        let redirect =
            b"HTTP/1.1 302 Found\r\nLocation: http://10.0.0.1/\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(
            ask(redirect, 100).await,
            Err(HttpError::Redirect { status: 302, .. })
        ));
        let long_head = [
            &b"HTTP/1.1 200 OK\r\nX-Long: "[..],
            &[b'a'; MAX_HEAD_BYTES + 1],
            b"\r\n\r\n",
        ]
        .concat();
        for bad in [
            &b"SSH-2.0-OpenSSH_9.2\r\n\r\n"[..],
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab",
            b"HTTP/1.1 20",
            &long_head,
        ] {
            let result = ask(bad, 100).await;
            assert!(
                matches!(result, Err(HttpError::Exchange { .. })),
                "{}: {result:?}",
                String::from_utf8_lossy(&bad[..bad.len().min(60)])
            );
        }

        // Silence: one deadline for the whole exchange.
        let (url, _task) = serve_once(Vec::new(), Duration::from_secs(30)).await;
        let started = std::time::Instant::now();
        let result = request(&url, "GET", &[], "", 100, Duration::from_millis(300)).await;
        assert!(
            matches!(result, Err(HttpError::Timeout { .. })),
            "{result:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // And the normal case on the same kind of server answers.
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(ask(ok, 100).await.expect("answer").body, "ok");
    }
}
