#!/bin/sh
# Builds holepunch from this checkout, installs it with its systemd unit and the default
# config, and starts it. Run as root from anywhere: sudo packaging/install.sh
# (The Debian package, once built, is the better way on Debian and Ubuntu.)
set -eu
cd "$(dirname "$0")/.."

# The nftables code links libnftnl and libmnl: their headers and pkg-config are needed.
if command -v apt-get >/dev/null &&
    ! pkg-config --exists libnftnl libmnl 2>/dev/null; then
    apt-get install -y pkg-config libnftnl-dev libmnl-dev
fi
cargo build --release --locked
install -D -m 0755 target/release/holepunch /usr/local/bin/holepunch
sed 's#/usr/bin/holepunch#/usr/local/bin/holepunch#g' systemd/holepunch.service \
    >/etc/systemd/system/holepunch.service
if [ ! -e /etc/holepunch.toml ]; then
    install -D -m 0644 etc/holepunch.toml /etc/holepunch.toml
fi
# What the Debian package also ships (README "Packaging"): the system user the unit runs as,
# the directory for the kubeconfig, and IPv4 forwarding for relay mode.
install -D -m 0644 debian/holepunch.sysusers /etc/sysusers.d/holepunch.conf
systemd-sysusers /etc/sysusers.d/holepunch.conf
install -d -m 0755 /etc/holepunch
install -D -m 0644 packaging/sysctl/60-holepunch.conf /etc/sysctl.d/60-holepunch.conf
sysctl -q -p /etc/sysctl.d/60-holepunch.conf ||
    echo "could not enable IPv4 forwarding; relay mode needs it: sysctl -w net.ipv4.ip_forward=1" >&2
/usr/local/bin/holepunch check-config --config /etc/holepunch.toml >/dev/null

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now holepunch
    systemctl --no-pager status holepunch || true
    echo "holepunch is running: journalctl -u holepunch -f shows what it does."
else
    echo "systemd is not running here; start holepunch in the foreground with:"
    echo "  /usr/local/bin/holepunch run --config /etc/holepunch.toml"
fi
