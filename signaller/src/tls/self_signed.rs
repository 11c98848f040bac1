//! LAN mode: a self-signed certificate for this machine's addresses, kept in a directory so
//! its fingerprint survives restarts.
//!
//! The directory holds `cert.pem`, `key.pem` (readable by the owner only) and `names.txt`,
//! the names and addresses the certificate was made for. When one of the machine's current
//! addresses is missing from `names.txt` (the laptop moved to another network), a new
//! certificate is generated, with a new fingerprint.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use super::{CertFiles, TlsError};

/// The certificate the server will use.
#[derive(Debug)]
pub(crate) struct SelfSigned {
    /// Its files.
    pub files: CertFiles,
    /// Whether it was made just now (else it was found in the directory).
    pub generated: bool,
}

/// Addresses other machines may reach this one on: every interface's, loopback excluded.
pub(crate) fn lan_addresses() -> Vec<IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces
            .into_iter()
            .map(|i| i.ip())
            .filter(|ip| !ip.is_loopback())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        Err(e) => {
            tracing::warn!("cannot list the network interfaces: {e}");
            Vec::new()
        }
    }
}

/// What the certificate must cover: `localhost`, the loopback addresses and `lan`.
pub(crate) fn names_for(lan: &[IpAddr]) -> BTreeSet<String> {
    let mut names = BTreeSet::from([
        "localhost".to_owned(),
        IpAddr::from(Ipv4Addr::LOCALHOST).to_string(),
        IpAddr::from(Ipv6Addr::LOCALHOST).to_string(),
    ]);
    names.extend(lan.iter().map(ToString::to_string));
    names
}

/// Reuses the certificate in `dir` if it covers `names`, else generates one there.
pub(crate) fn ensure(dir: &Path, names: &BTreeSet<String>) -> Result<SelfSigned, TlsError> {
    let files = CertFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    let names_file = dir.join("names.txt");
    let covered = std::fs::read_to_string(&names_file)
        .map(|text| {
            let have: BTreeSet<&str> = text.lines().map(str::trim).collect();
            names.iter().all(|n| have.contains(n.as_str()))
        })
        .unwrap_or(false);
    if covered {
        match super::load(&files) {
            Ok(_) => {
                return Ok(SelfSigned {
                    files,
                    generated: false,
                });
            }
            Err(e) => tracing::warn!(
                "the kept self-signed certificate is unusable ({e}); making a new one"
            ),
        }
    }
    let wanted: Vec<String> = names.iter().cloned().collect();
    let certified = rcgen::generate_simple_self_signed(wanted.clone())?;
    std::fs::create_dir_all(dir).map_err(|source| write_error(dir, source))?;
    write_file(
        &files.key,
        certified.signing_key.serialize_pem().as_bytes(),
        true,
    )?;
    write_file(&files.cert, certified.cert.pem().as_bytes(), false)?;
    write_file(&names_file, (wanted.join("\n") + "\n").as_bytes(), false)?;
    Ok(SelfSigned {
        files,
        generated: true,
    })
}

fn write_error(path: &Path, source: std::io::Error) -> TlsError {
    TlsError::Write {
        path: PathBuf::from(path),
        source,
    }
}

/// Writes a whole file; `private` ones are readable by the owner only (on Unix).
fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), TlsError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    options
        .open(path)
        .and_then(|mut f| f.write_all(contents))
        .map_err(|source| write_error(path, source))?;
    // `mode` only applies to a new file; an older key file may have been wider.
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| write_error(path, source))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "treecast-self-signed-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_certificate_is_kept_until_an_address_is_missing() {
        let dir = temp_dir("kept");
        let home: Vec<IpAddr> = vec!["192.168.1.20".parse().unwrap()];
        let first = ensure(&dir, &names_for(&home)).unwrap();
        assert!(first.generated);
        let der = |files: &CertFiles| super::super::load(files).unwrap().cert[0].to_vec();
        let original = der(&first.files);

        let again = ensure(&dir, &names_for(&home)).unwrap();
        assert!(!again.generated);
        assert_eq!(
            der(&again.files),
            original,
            "same certificate after a restart"
        );

        let moved: Vec<IpAddr> = vec!["10.0.0.7".parse().unwrap()];
        let elsewhere = ensure(&dir, &names_for(&moved)).unwrap();
        assert!(elsewhere.generated);
        assert_ne!(
            der(&elsewhere.files),
            original,
            "new address, new certificate"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "the key is private: {mode:o}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
