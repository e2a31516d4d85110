//! The smallest strict HTTP/1.1 client UPnP needs (RFC 9112): one request per connection
//! (`Connection: close`), `http://` URLs only, no redirects, a cap on what is read and one
//! deadline for the whole exchange. Parsing of URLs and responses is sans-io and unit-tested;
//! [`request`] owns the socket.
//!
//! Hosts may be IPv6 literals in brackets (`http://[2001:db8::1]:5000/`, RFC 3986 §3.2.2), as
//! the router's IGDv2 WANIPv6FirewallControl service is reached over IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head (status line and headers) accepted.
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
    #[error("cannot send the request to {address}: {source}")]
    Send {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the response from {address}: {source}")]
    Receive {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no complete answer from {address} within {} ms", after.as_millis())]
    Timeout { address: String, after: Duration },
    #[error("the response from {address} is larger than {limit} bytes (refused)")]
    TooLarge { address: String, limit: usize },
    #[error("the response from {address} is not valid HTTP/1.x: {problem}")]
    Malformed {
        address: String,
        problem: &'static str,
    },
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

/// The parsed head of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    status: u16,
    content_length: Option<usize>,
    chunked: bool,
    /// Bytes of the head, including the blank line.
    len: usize,
}

/// Parses the head in `bytes` if it is complete (`Ok(None)` while more is needed).
fn parse_head(bytes: &[u8]) -> Result<Option<Head>, &'static str> {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if bytes.len() > MAX_HEAD_BYTES {
            Err("the response head is too long")
        } else {
            Ok(None)
        };
    };
    let head = std::str::from_utf8(&bytes[..end]).map_err(|_| "the head is not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err("no HTTP/1.x status line");
    }
    let status = parts
        .next()
        .and_then(|code| code.parse::<u16>().ok())
        .filter(|code| (100..600).contains(code))
        .ok_or("no status code")?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or("a header line without ':'")?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length = value.parse().map_err(|_| "a bad Content-Length")?;
            if content_length.is_some_and(|seen| seen != length) {
                return Err("conflicting Content-Length headers");
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    Ok(Some(Head {
        status,
        content_length,
        chunked,
        len: end + 4,
    }))
}

/// Decodes a chunked body (RFC 9112 §7.1); `Ok(None)` while incomplete.
fn decode_chunked(mut bytes: &[u8], limit: usize) -> Result<Option<Vec<u8>>, &'static str> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = bytes.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&bytes[..line_end]).map_err(|_| "a bad chunk size")?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "a bad chunk size")?;
        bytes = &bytes[line_end + 2..];
        if size == 0 {
            return Ok(Some(body));
        }
        if body.len().saturating_add(size) > limit {
            return Err("too large");
        }
        if bytes.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&bytes[..size]);
        if &bytes[size..size + 2] != b"\r\n" {
            return Err("a chunk without its CRLF");
        }
        bytes = &bytes[size + 2..];
    }
}

/// What `received` holds so far: `Ok(Some(..))` once the response is complete, with `eof`
/// saying the peer closed the connection.
fn parse_response(
    received: &[u8],
    eof: bool,
    limit: usize,
) -> Result<Option<(u16, Vec<u8>)>, &'static str> {
    let Some(head) = parse_head(received)? else {
        return if eof {
            Err("the connection closed before the head ended")
        } else {
            Ok(None)
        };
    };
    let body = &received[head.len..];
    if head.chunked {
        return match decode_chunked(body, limit)? {
            Some(body) => Ok(Some((head.status, body))),
            None if eof => Err("the connection closed inside a chunked body"),
            None => Ok(None),
        };
    }
    match head.content_length {
        Some(length) if length > limit => Err("too large"),
        Some(length) if body.len() >= length => Ok(Some((head.status, body[..length].to_vec()))),
        Some(_) if eof => Err("the connection closed before Content-Length bytes"),
        Some(_) => Ok(None),
        None if body.len() > limit => Err("too large"),
        None if eof => Ok(Some((head.status, body.to_vec()))),
        None => Ok(None),
    }
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
    request_from(None, url, method, headers, body, limit, timeout).await
}

/// [`request`] from the local address `local` (the connection's source), when given.
// NOTE: miniupnpd opens an IPv6 pinhole only to the address the request came from (its
// PinholeVerification compares the two as text), and a host with several global IPv6 addresses
// (privacy addresses, RFC 8981) may otherwise send from another one (miniupnp issue 600).
pub async fn request_from(
    local: Option<IpAddr>,
    url: &HttpUrl,
    method: &str,
    headers: &[(&str, &str)],
    body: &str,
    limit: usize,
    timeout: Duration,
) -> Result<HttpResponse, HttpError> {
    let address = url.address();
    match tokio::time::timeout(timeout, exchange(local, url, method, headers, body, limit)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(HttpError::Timeout {
            address,
            after: timeout,
        }),
    }
}

async fn exchange(
    local: Option<IpAddr>,
    url: &HttpUrl,
    method: &str,
    headers: &[(&str, &str)],
    body: &str,
    limit: usize,
) -> Result<HttpResponse, HttpError> {
    let address = url.address();
    let connect_error = |source| HttpError::Connect {
        address: address.clone(),
        source,
    };
    let mut stream = match local {
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
            socket
                .connect(SocketAddr::new(remote, url.port))
                .await
                .map_err(connect_error)?
        }
    };
    let mut message = format!(
        "{method} {} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nUser-Agent: holepunch/{} UPnP/1.1\r\n",
        url.path,
        env!("CARGO_PKG_VERSION")
    );
    for (name, value) in headers {
        message.push_str(&format!("{name}: {value}\r\n"));
    }
    if method != "GET" || !body.is_empty() {
        message.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    message.push_str("\r\n");
    message.push_str(body);
    stream
        .write_all(message.as_bytes())
        .await
        .map_err(|source| HttpError::Send {
            address: address.clone(),
            source,
        })?;

    let mut received = Vec::new();
    let mut buf = [0u8; 8192];
    let malformed = |problem: &'static str| {
        if problem == "too large" {
            HttpError::TooLarge {
                address: address.clone(),
                limit,
            }
        } else {
            HttpError::Malformed {
                address: address.clone(),
                problem,
            }
        }
    };
    let (status, body) = loop {
        let read = stream
            .read(&mut buf)
            .await
            .map_err(|source| HttpError::Receive {
                address: address.clone(),
                source,
            })?;
        received.extend_from_slice(&buf[..read]);
        // Chunk framing costs a few bytes per chunk; the cap on the raw bytes keeps a
        // peer from sending endless framing.
        if received.len() > limit.saturating_mul(2).saturating_add(MAX_HEAD_BYTES) {
            return Err(malformed("too large"));
        }
        if let Some(done) = parse_response(&received, read == 0, limit).map_err(malformed)? {
            break done;
        }
    };
    if (300..400).contains(&status) {
        return Err(HttpError::Redirect { address, status });
    }
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

    #[test]
    fn responses_parse_by_length_chunks_or_close() {
        let by_length = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(
            parse_response(by_length, false, 100),
            Ok(Some((200, b"hello".to_vec())))
        );
        assert_eq!(parse_response(&by_length[..40], false, 100), Ok(None));
        let chunked = b"HTTP/1.1 500 Err\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked, false, 100),
            Ok(Some((500, b"abcde".to_vec())))
        );
        let close = b"HTTP/1.0 200 OK\r\n\r\nuntil eof";
        assert_eq!(parse_response(close, false, 100), Ok(None));
        assert_eq!(
            parse_response(close, true, 100),
            Ok(Some((200, b"until eof".to_vec())))
        );
    }

    #[test]
    fn bad_or_oversized_responses_are_refused() {
        let huge = b"HTTP/1.1 200 OK\r\nContent-Length: 10485760\r\n\r\n";
        assert_eq!(parse_response(huge, false, 65536), Err("too large"));
        let chunks = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffff\r\n";
        assert_eq!(parse_response(chunks, false, 65536), Err("too large"));
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc",
        ] {
            assert!(
                parse_response(bad, false, 100).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab", true, 100).is_err()
        );
        assert!(parse_response(b"HTTP/1.1 20", true, 100).is_err());
        assert!(parse_response(&[b'x'; MAX_HEAD_BYTES + 1], false, 100).is_err());
    }
}
