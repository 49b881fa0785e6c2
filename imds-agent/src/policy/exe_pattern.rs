//! `executables` entries: a path pattern, optionally pinned to the program's content
//! (`/usr/bin/aws@sha256:<64 hex digits>`).

use super::{CanonicalPath, PathPattern};
use crate::identity::executable::{ExeOrigin, Executable, parse_sha256};

#[derive(Debug, Clone)]
pub struct ExePattern {
    pub path: PathPattern,
    sha256: Option<[u8; 32]>,
}

impl ExePattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (pattern, sha256) = match text.rsplit_once("@sha256:") {
            Some((pattern, hex)) => {
                let digest = parse_sha256(hex).ok_or_else(|| {
                    format!("sha256:{hex}: a digest is 64 lowercase hexadecimal digits")
                })?;
                (pattern, Some(digest))
            }
            None if text.contains('@') => {
                return Err("'@' may only introduce a digest: PATTERN@sha256:<hex>".into());
            }
            None => (text, None),
        };
        let path = PathPattern::parse(pattern).map_err(|e| e.to_string())?;
        Ok(Self { path, sha256 })
    }

    /// With a digest, the content decides whatever the path names; without one, the path,
    /// for a host process only while it runs the node's file there.
    pub fn matches(&self, path: &CanonicalPath<'_>, exe: &Executable) -> bool {
        if !self.path.matches(path) {
            return false;
        }
        match self.sha256 {
            Some(pinned) => exe.sha256 == Some(pinned),
            None => exe.origin != ExeOrigin::NotTheNodeFile,
        }
    }

    pub fn pins_digest(&self) -> bool {
        self.sha256.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn exe(path: &str, origin: ExeOrigin, sha256: Option<[u8; 32]>) -> Executable {
        Executable {
            path: path.into(),
            origin,
            sha256,
        }
    }

    #[test]
    fn a_path_counts_for_the_node_file_or_a_container_and_a_digest_for_the_content() {
        let by_path = ExePattern::parse("/usr/bin/aws").unwrap();
        let pinned = ExePattern::parse(&format!("/usr/bin/aws@sha256:{DIGEST}")).unwrap();
        let anywhere = ExePattern::parse(&format!("/**@sha256:{DIGEST}")).unwrap();
        let path = CanonicalPath::parse("/usr/bin/aws").unwrap();
        let digest = parse_sha256(DIGEST);
        let other = Some([7u8; 32]);

        let node = exe("/usr/bin/aws", ExeOrigin::NodeFile, None);
        let container = exe("/usr/bin/aws", ExeOrigin::Container, None);
        let substituted = exe("/usr/bin/aws", ExeOrigin::NotTheNodeFile, None);
        assert!(by_path.matches(&path, &node));
        assert!(by_path.matches(&path, &container));
        assert!(
            !by_path.matches(&path, &substituted),
            "a file mounted over the path"
        );

        assert!(!pinned.matches(&path, &node), "no digest read");
        for origin in [
            ExeOrigin::NodeFile,
            ExeOrigin::Container,
            ExeOrigin::NotTheNodeFile,
        ] {
            assert!(pinned.matches(&path, &exe("/usr/bin/aws", origin, digest)));
            assert!(!pinned.matches(&path, &exe("/usr/bin/aws", origin, other)));
        }
        let elsewhere = CanonicalPath::parse("/opt/aws/bin/aws").unwrap();
        assert!(!pinned.matches(
            &elsewhere,
            &exe("/opt/aws/bin/aws", ExeOrigin::NodeFile, digest)
        ));
        assert!(anywhere.matches(
            &elsewhere,
            &exe("/opt/aws/bin/aws", ExeOrigin::NodeFile, digest)
        ));
        assert!(pinned.pins_digest() && !by_path.pins_digest());
    }

    #[test]
    fn malformed_entries_say_what_is_wrong() {
        for (bad, says) in [
            ("/usr/bin/aws@sha256:abc", "64 lowercase"),
            ("/usr/bin/aws@md5:abc", "'@' may only"),
            ("usr/bin/aws", ""),
        ] {
            let error = ExePattern::parse(bad).expect_err(bad);
            assert!(error.contains(says), "{bad}: {error}");
        }
    }
}
