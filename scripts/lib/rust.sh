# shellcheck shell=bash
# Finding and running cargo from scripts that run as root (sudo make demo), sourced by
# scripts/dev-deps and scripts/demo. sudo resets PATH, so a rustup install in the invoking
# user's home is not on it: look there too, and run cargo as the user who owns it, so that
# their toolchain is used and target/ stays theirs.

# The oldest Rust that builds holepunch: Cargo.toml's rust-version (1.<minor>). The scripts
# that source this file run from the repository's root.
# shellcheck disable=SC2034 # used by scripts/dev-deps
RUST_MIN_MINOR=$(sed -n 's/^rust-version = "1\.\([0-9]*\).*/\1/p' Cargo.toml)

# Prints the path of a cargo binary: the one on PATH, else rustup's in $CARGO_HOME, in the
# sudo user's home, or in root's. Fails when there is none.
find_cargo() {
    local candidate home
    if candidate=$(command -v cargo); then
        echo "$candidate"; return 0
    fi
    for home in "${CARGO_HOME:-}" "${SUDO_USER:+$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo}" \
        "$HOME/.cargo"; do
        if [[ -n $home && -x $home/bin/cargo ]]; then
            echo "$home/bin/cargo"; return 0
        fi
    done
    return 1
}

# Runs a command as another user (runuser lives in /usr/sbin, which a user's PATH may lack).
as_user() {
    local user=$1; shift
    PATH=$PATH:/usr/sbin:/sbin runuser -u "$user" -- "$@"
}

# Sets cargo, cargo_owner and cargo_environment (HOME, PATH and the rustup homes of the user
# who owns the cargo binary; sudo may have left $HOME pointing elsewhere) for run_cargo and
# run_cargo_as_root.
cargo_setup() {
    local home cargo_home
    cargo=$(find_cargo) || { echo "cargo not found: run scripts/dev-deps" >&2; return 1; }
    cargo_owner=$(stat -c %U "$cargo")
    home=$(getent passwd "$cargo_owner" | cut -d: -f6)
    cargo_home=$(dirname "$(dirname "$cargo")")
    cargo_environment=(HOME="$home" PATH="$(dirname "$cargo"):/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        CARGO_HOME="${CARGO_HOME:-$cargo_home}" RUSTUP_HOME="${RUSTUP_HOME:-$home/.rustup}")
}

# Runs cargo with the arguments given, as the user who owns the cargo binary, with the
# rustup homes that go with it.
run_cargo() {
    cargo_setup || return 1
    if [[ $EUID -eq 0 && $cargo_owner != root ]]; then
        as_user "$cargo_owner" env "${cargo_environment[@]}" "$cargo" "$@"
    else
        env "${cargo_environment[@]}" "$cargo" "$@"
    fi
}

# Runs cargo as root (for tests that need root) with the toolchain of the user who owns
# cargo. Build first with run_cargo, so that what is compiled is theirs; whatever root still
# writes under target/ is given back to them afterwards.
run_cargo_as_root() {
    cargo_setup || return 1
    local status=0
    env "${cargo_environment[@]}" "$cargo" "$@" || status=$?
    if [[ $cargo_owner != root && -d target ]]; then
        find target -user root -exec chown "$cargo_owner:" {} + || true
    fi
    return "$status"
}

# Prints cargo's minor version (95 for "cargo 1.95.0 (...)"); fails, saying why, when cargo
# does not run.
cargo_minor_version() {
    local version
    version=$(run_cargo --version) || return 1
    echo "$version" | sed -n 's/^cargo 1\.\([0-9]*\)\..*/\1/p'
}

# Installs Rust (stable, with clippy and rustfmt) with rustup, for the user who ran sudo or
# else for root.
install_rust() {
    local user=${SUDO_USER:-root} home
    home=$(getent passwd "$user" | cut -d: -f6)
    echo "installing Rust with rustup for $user (into $home/.cargo) ..." >&2
    as_user "$user" env HOME="$home" sh -c \
        "curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y -q --profile default" >&2
}
