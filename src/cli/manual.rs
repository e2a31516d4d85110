//! Manual pages and shell completions, generated from the sources the program itself uses, so
//! they cannot drift: holepunch(8) and the bash, zsh and fish completions from the clap definition
//! that also prints `--help` ([`Cli`]), holepunch.toml(5) from the shipped, documented default
//! config `etc/holepunch.toml` (generated from the key declarations in `config::keys`; a test
//! fails when it drifts from them). The Debian package build calls them through the hidden `holepunch generate`.
//!
//! The pages are roff for man(7) (groff_man(7) subset); [`config_page`] is a pure renderer.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

use super::{Cli, EXIT_CODES_HELP};

/// The documented default config, the source of holepunch.toml(5).
pub const CONFIG_DOC: &str = include_str!("../../etc/holepunch.toml");

/// What went wrong while writing the generated files.
#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    #[error("cannot create the directory {path}: {source}; give a writable directory")]
    CreateDirectory { path: PathBuf, source: io::Error },
    #[error("cannot render holepunch(8): {source}")]
    RenderCommandPage { source: io::Error },
    #[error("cannot write {path}: {source}; check the directory is writable and has space")]
    WriteFile { path: PathBuf, source: io::Error },
}

/// holepunch(8): clap's rendering of the top-level help, every command's long help and
/// options, and the exit codes `--help` lists.
pub fn command_page() -> Result<Vec<u8>, ManualError> {
    let command = Cli::command();
    let man = clap_mangen::Man::new(command.clone())
        .section("8")
        .source(format!("holepunch {}", env!("CARGO_PKG_VERSION")))
        .manual("System Administration");
    let mut page = Vec::new();
    let render = |page: &mut Vec<u8>| -> io::Result<()> {
        man.render_title(page)?;
        man.render_name_section(page)?;
        man.render_synopsis_section(page)?;
        man.render_description_section(page)?;
        man.render_options_section(page)
    };
    render(&mut page).map_err(|source| ManualError::RenderCommandPage { source })?;
    let mut commands = String::from(".SH COMMANDS\n");
    for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        let about = sub
            .get_long_about()
            .or_else(|| sub.get_about())
            .map(|text| text.to_string())
            .unwrap_or_default();
        let _ = writeln!(
            commands,
            ".TP\n\\fBholepunch {}\\fR",
            roff_text(sub.get_name())
        );
        push_paragraphs(&mut commands, &about, ".IP");
        for arg in sub.get_arguments().filter(|arg| !arg.is_hide_set()) {
            let Some(long) = arg.get_long() else {
                continue;
            };
            let mut flag = format!("\\fB\\-\\-{}\\fR", roff_text(long));
            if let Some(short) = arg.get_short() {
                flag = format!("\\fB\\-{short}\\fR, {flag}");
            }
            if let Some(names) = arg
                .get_value_names()
                .filter(|_| arg.get_action().takes_values())
            {
                for name in names {
                    let _ = write!(flag, " \\fI{}\\fR", roff_text(name));
                }
            }
            let help = arg
                .get_long_help()
                .or_else(|| arg.get_help())
                .map(|text| text.to_string())
                .unwrap_or_default();
            let _ = writeln!(commands, ".RS\n.TP\n{flag}");
            push_paragraphs(&mut commands, &help, ".IP");
            commands.push_str(".RE\n");
        }
    }
    commands.push_str(".SH \"EXIT STATUS\"\n");
    for line in EXIT_CODES_HELP.lines().skip(1) {
        if let Some((code, meaning)) = line.trim().split_once("  ") {
            let _ = writeln!(
                commands,
                ".TP\n\\fB{}\\fR\n{}",
                code,
                roff_text(meaning.trim())
            );
        }
    }
    commands.push_str(
        ".SH FILES\n.TP\n/etc/holepunch.toml\nThe config file, see \\fBholepunch.toml\\fR(5).\n\
         .TP\n/etc/holepunch/kubeconfig\nThe kubeconfig (root's; the service gets a copy at start, \
         so restart it after a change). One that others can write is refused.\n\
         .TP\n/var/lib/holepunch/state.toml\nEvery mapping holepunch owns.\n\
         .TP\n/usr/lib/sysctl.d/60-holepunch.conf\nTurns on IPv4 forwarding for relay mode; \
         override it in /etc/sysctl.d/.\n\
         .TP\n/usr/share/holepunch/\nThe Kubernetes RBAC manifest and the kubeconfig recipe.\n\
         .SH SEE ALSO\n\\fBholepunch.toml\\fR(5), \\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1)\n",
    );
    page.extend_from_slice(commands.as_bytes());
    Ok(page)
}

/// The completion script for `shell`, from the same definition as `--help`.
pub fn completion(shell: Shell) -> Vec<u8> {
    // clap_complete offers hidden commands too: complete a copy without them.
    let full = Cli::command();
    let mut visible = clap::Command::new("holepunch")
        .version(env!("CARGO_PKG_VERSION"))
        .args(full.get_arguments().cloned())
        .subcommands(
            full.get_subcommands()
                .filter(|sub| !sub.is_hide_set())
                .cloned(),
        );
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut visible, "holepunch", &mut script);
    script
}

/// holepunch.toml(5) from the documented config `doc` (the format of `etc/holepunch.toml`):
/// the leading comment is the description, `[section]` lines open sections, `# text` lines
/// document the key that follows, `key = value` is a default and `#key = value` an example of
/// a key that is unset by default. Lines indented under a key continue its value.
pub fn config_page(doc: &str, version: &str) -> String {
    let mut page = format!(
        ".TH HOLEPUNCH.TOML 5 \"\" \"holepunch {}\" \"File Formats\"\n\
         .SH NAME\nholepunch.toml \\- configuration of holepunch(8)\n\
         .SH SYNOPSIS\n/etc/holepunch.toml\n.SH DESCRIPTION\n",
        roff_text(version)
    );
    let mut prose: Vec<String> = Vec::new();
    let mut in_sections = false;
    // The key being documented: (name, value, unset by default, its prose).
    let mut pending: Option<(String, String, bool, Vec<String>)> = None;
    let flush = |page: &mut String, pending: &mut Option<(String, String, bool, Vec<String>)>| {
        if let Some((name, value, unset, text)) = pending.take() {
            let _ = writeln!(page, ".TP\n\\fB{}\\fR", roff_text(&name));
            push_paragraphs(page, &text.join(" "), ".IP");
            let shown = roff_text(&value);
            if unset {
                let _ = writeln!(page, "Unset by default. Example: \\fI{shown}\\fR");
            } else {
                let _ = writeln!(page, "Default: \\fI{shown}\\fR");
            }
        }
    };
    for line in doc.lines() {
        let trimmed = line.trim();
        // A commented-out header (`#[ha]`) is a section that is absent by default.
        let header = trimmed
            .strip_prefix('#')
            .filter(|rest| rest.starts_with('['))
            .unwrap_or(trimmed);
        if let Some(section) = header
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
        {
            flush(&mut page, &mut pending);
            if !in_sections {
                push_paragraphs(&mut page, &prose.join("\n"), ".PP");
                page.push_str(".SH SECTIONS AND KEYS\n");
                in_sections = true;
            }
            prose.clear();
            let _ = writeln!(page, ".SS \"[{}]\"", roff_text(section));
        } else if let Some(text) = trimmed.strip_prefix("# ") {
            flush(&mut page, &mut pending);
            prose.push(text.to_owned());
        } else if trimmed == "#" {
            flush(&mut page, &mut pending);
            prose.push(String::new());
        } else if let Some((name, value, unset)) = key_line(trimmed) {
            flush(&mut page, &mut pending);
            pending = Some((name, value, unset, std::mem::take(&mut prose)));
        } else if !trimmed.is_empty() && line.starts_with(char::is_whitespace) {
            // A value continued on the next line (long arrays).
            if let Some((_, value, _, _)) = pending.as_mut() {
                value.push(' ');
                value.push_str(trimmed);
            }
        }
    }
    flush(&mut page, &mut pending);
    if !in_sections {
        push_paragraphs(&mut page, &prose.join("\n"), ".PP");
    }
    page.push_str(
        ".SH FILES\n.TP\n/etc/holepunch.toml\nThe config file (a Debian conffile).\n\
         .SH SEE ALSO\n\\fBholepunch\\fR(8)\n",
    );
    page
}

/// `key = value` (set) or `#key = value` (unset by default): (name, value, unset).
fn key_line(line: &str) -> Option<(String, String, bool)> {
    let (unset, body) = match line.strip_prefix('#') {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    let (name, value) = body.split_once(" = ")?;
    let is_key = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    is_key.then(|| (name.to_owned(), value.trim().to_owned(), unset))
}

/// Paragraphs separated by empty lines become roff text separated by `between` (`.PP`, or
/// `.IP` to stay indented under a `.TP` item).
fn push_paragraphs(page: &mut String, text: &str, between: &str) {
    let mut first = true;
    for paragraph in text.split("\n\n") {
        let joined = paragraph
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if joined.is_empty() {
            continue;
        }
        if !first {
            page.push_str(between);
            page.push('\n');
        }
        first = false;
        page.push_str(&roff_text(&joined));
        page.push('\n');
    }
}

/// Text safe inside a roff line: backslashes and minus signs escaped, and no line starting
/// with a control character (`.` or `'`).
fn roff_text(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

/// Writes holepunch.8 and holepunch.toml.5 into `dir`; returns the files written.
pub fn write_manuals(dir: &Path) -> Result<Vec<PathBuf>, ManualError> {
    create_dir(dir)?;
    let config = config_page(CONFIG_DOC, env!("CARGO_PKG_VERSION"));
    write_all(
        dir,
        [
            ("holepunch.8", command_page()?),
            ("holepunch.toml.5", config.into_bytes()),
        ],
    )
}

/// Writes the bash (`holepunch`), zsh (`_holepunch`) and fish (`holepunch.fish`) completions
/// into `dir`, named as bash-completion, zsh and fish look them up; returns the files written.
pub fn write_completions(dir: &Path) -> Result<Vec<PathBuf>, ManualError> {
    create_dir(dir)?;
    write_all(
        dir,
        [
            ("holepunch", completion(Shell::Bash)),
            ("_holepunch", completion(Shell::Zsh)),
            ("holepunch.fish", completion(Shell::Fish)),
        ],
    )
}

fn create_dir(dir: &Path) -> Result<(), ManualError> {
    fs::create_dir_all(dir).map_err(|source| ManualError::CreateDirectory {
        path: dir.to_owned(),
        source,
    })
}

fn write_all<const N: usize>(
    dir: &Path,
    files: [(&str, Vec<u8>); N],
) -> Result<Vec<PathBuf>, ManualError> {
    let mut written = Vec::with_capacity(N);
    for (name, contents) in files {
        let path = dir.join(name);
        fs::write(&path, contents).map_err(|source| ManualError::WriteFile {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_page_documents_set_and_unset_keys_under_their_sections() {
        let doc = "# holepunch config.\n#\n# Second paragraph.\n\n[router]\n\
                   # Lease asked for, in seconds.\nlease_seconds = 3600\n\
                   # Router address (unset: the default route).\n#address = \"192.168.1.1\"\n\
                   [ports]\n# Never opened.\ndeny = [\"22\",\n        \"25\"]\n";
        let page = config_page(doc, "9.9.9");
        assert!(page.starts_with(".TH HOLEPUNCH.TOML 5 \"\" \"holepunch 9.9.9\""));
        let description = page
            .find("holepunch config.\n.PP\nSecond paragraph.")
            .unwrap();
        let router = page.find(".SS \"[router]\"").unwrap();
        let lease = page
            .find(".TP\n\\fBlease_seconds\\fR\nLease asked for, in seconds.\nDefault: \\fI3600\\fR")
            .unwrap();
        let address = page
            .find("\\fBaddress\\fR\nRouter address (unset: the default route).\nUnset by default. Example: \\fI\"192.168.1.1\"\\fR")
            .unwrap();
        let ports = page.find(".SS \"[ports]\"").unwrap();
        let deny = page.find("Default: \\fI[\"22\", \"25\"]\\fR").unwrap();
        assert!(description < router && router < lease && lease < address);
        assert!(address < ports && ports < deny);

        // A commented-out section is still a section: its keys are not filed under the
        // section before it.
        let page = config_page(
            "[log]\n# Level.\nlevel = \"info\"\n#[ha]\n# The Lease.\n#lease_name = \"holepunch\"\n",
            "0",
        );
        let ha = page.find(".SS \"[ha]\"").unwrap();
        let level = page.find("\\fBlevel\\fR").unwrap();
        let lease_name = page
            .find("\\fBlease_name\\fR\nThe Lease.\nUnset by default.")
            .unwrap();
        assert!(level < ha && ha < lease_name, "{page}");
    }

    #[test]
    fn config_page_covers_every_key_of_the_shipped_file() {
        let page = config_page(CONFIG_DOC, "0");
        let mut keys = 0;
        for line in CONFIG_DOC.lines() {
            if let Some((name, _, _)) = key_line(line.trim()) {
                keys += 1;
                let entry = format!(".TP\n\\fB{}\\fR\n", roff_text(&name));
                assert!(page.contains(&entry), "holepunch.toml(5) lacks {name}");
            }
        }
        assert!(keys >= 20, "only {keys} keys found in etc/holepunch.toml");
        for section in [
            "kubernetes",
            "router",
            "exposure",
            "ports",
            "state",
            "log",
            "ha",
        ] {
            assert!(page.contains(&format!(".SS \"[{section}]\"")), "{section}");
        }
        // No prose line may start a roff request by accident.
        for line in page.lines() {
            assert!(!line.starts_with('\''), "{line}");
        }
    }

    #[test]
    fn roff_text_escapes_what_roff_would_interpret() {
        assert_eq!(roff_text("a-b\\c"), "a\\-b\\ec");
        assert_eq!(roff_text(".hidden"), "\\&.hidden");
        assert_eq!(roff_text("'quoted"), "\\&'quoted");
    }

    #[test]
    fn command_page_has_every_visible_command_and_not_the_hidden_one() {
        let page = String::from_utf8(command_page().unwrap()).unwrap();
        assert!(page.contains(".TH holepunch 8"), "{}", &page[..80]);
        assert!(page.contains(".SH \"EXIT STATUS\"\n.TP\n\\fB0\\fR\nsuccess\n"));
        for command in [
            "run",
            "plan",
            "status",
            "check\\-config",
            "cleanup",
            "version",
        ] {
            assert!(
                page.contains(&format!("\\fBholepunch {command}\\fR")),
                "holepunch(8) lacks {command}"
            );
        }
        assert!(page.contains("\\fB\\-\\-from\\-file\\fR \\fIFILE\\fR"));
        assert!(!page.contains("generate"), "the hidden command leaked");
    }

    #[test]
    fn completions_know_the_commands_but_not_the_hidden_one() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = String::from_utf8(completion(shell)).unwrap();
            // fish names long options without the dashes (`-l config`).
            let option = if shell == Shell::Fish {
                "-l config"
            } else {
                "--config"
            };
            for command in ["check-config", "cleanup", option] {
                assert!(script.contains(command), "{shell} lacks {command}");
            }
            assert!(
                !script.contains("generate"),
                "{shell}: hidden command leaked"
            );
        }
    }
}
