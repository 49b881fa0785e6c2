use proptest::prelude::*;

use super::*;

fn path(text: &str) -> CanonicalPath<'_> {
    CanonicalPath::parse(text).unwrap()
}

fn keys(keys: &[&str]) -> View {
    View::new(keys, &[]).unwrap()
}

const ENV: &str = "# app\nPORT=8080\nDB_HOST=db.internal\nDB_PASSWORD=hunter2\n";

#[test]
fn env_user_data_keeps_the_granted_lines() {
    let reduced = reduce(
        &keys(&["PORT", "DB_HOST"]),
        &path("/latest/user-data"),
        ENV.as_bytes(),
    )
    .unwrap();
    assert_eq!(reduced.body, b"PORT=8080\nDB_HOST=db.internal\n");
    assert_eq!(reduced.summary, "2 of 3 keys");
}

#[test]
fn azure_user_data_stays_base64() {
    let encoded = base64::engine::general_purpose::STANDARD.encode(ENV);
    let reduced = reduce(
        &keys(&["PORT"]),
        &path("/metadata/instance/compute/userData"),
        encoded.as_bytes(),
    )
    .unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(&reduced.body)
        .unwrap();
    assert_eq!(decoded, b"PORT=8080\n");
    assert_eq!(
        reduce(
            &keys(&["PORT"]),
            &path("/metadata/instance/compute/userData"),
            b"PORT=8080"
        ),
        Err(Unservable::NotBase64)
    );
}

#[test]
fn json_user_data_by_key_and_dotted_path() {
    let json = r#"{"region":"eu","database":{"host":"db","password":"p"},"token":"t"}"#;
    let reduced = reduce(
        &keys(&["region", "database.host", "missing"]),
        &path("/latest/user-data"),
        json.as_bytes(),
    )
    .unwrap();
    assert_eq!(
        String::from_utf8(reduced.body).unwrap(),
        r#"{"region":"eu","database":{"host":"db"}}"#
    );
    assert_eq!(reduced.summary, "2 of 3 keys");
}

#[test]
fn what_cannot_be_taken_apart_is_never_served_in_part() {
    let multipart = "Content-Type: multipart/mixed; boundary=\"b\"\nMIME-Version: 1.0\n\n--b\n\
                     Content-Type: text/x-shellscript\n\nPORT=1\n--b--\n";
    let view = keys(&["PORT"]);
    let at = path("/latest/user-data");
    assert_eq!(
        reduce(&view, &at, multipart.as_bytes()),
        Err(Unservable::Multipart)
    );
    assert_eq!(
        reduce(&view, &at, &[0x1f, 0x8b, 8, 0, 1, 2]),
        Err(Unservable::Binary)
    );
    assert!(matches!(
        reduce(&view, &at, b"#!/bin/bash\nexport PORT=1\necho started\n"),
        Err(Unservable::NotKeyed(_))
    ));
    assert!(matches!(
        reduce(&view, &at, b"#cloud-config\nwrite_files: []\n"),
        Err(Unservable::NotKeyed(_))
    ));
    assert_eq!(
        reduce(&keys(&["OTHER"]), &at, ENV.as_bytes()),
        Err(Unservable::NoKey("OTHER".into()))
    );
}

#[test]
fn a_document_loses_the_removed_fields_at_any_depth_of_the_request() {
    let view = View::new(
        &[],
        &[
            "/metadata/instance/compute/userData",
            "/metadata/instance/compute/osProfile",
            "/metadata/instance/network",
        ],
    )
    .unwrap();
    let document = r#"{"compute":{"location":"westeurope","osProfile":{"adminUsername":"a"},"userData":"UE9SVD0x","vmId":"v"},"network":{"interface":[]}}"#;
    let reduced = reduce(&view, &path("/metadata/instance"), document.as_bytes()).unwrap();
    assert_eq!(
        String::from_utf8(reduced.body).unwrap(),
        r#"{"compute":{"location":"westeurope","vmId":"v"}}"#
    );
    assert_eq!(reduced.summary, "3 fields removed");
    let compute = r#"{"location":"westeurope","osProfile":{},"userData":"x"}"#;
    let reduced = reduce(
        &view,
        &path("/metadata/instance/compute/"),
        compute.as_bytes(),
    )
    .unwrap();
    assert_eq!(reduced.body, br#"{"location":"westeurope"}"#);
    // A document the view cannot read is refused, not passed on.
    assert!(matches!(
        reduce(&view, &path("/metadata/instance"), b"[1,2]"),
        Err(Unservable::NotADocument(_))
    ));
}

#[test]
fn hetzner_yaml_stays_yaml() {
    let view = View::new(&[], &["/hetzner/v1/metadata/public-keys"]).unwrap();
    let yaml =
        "hostname: web-1\ninstance-id: 42\npublic-keys:\n- ssh-ed25519 AAAA\nregion: eu-central\n";
    let reduced = reduce(&view, &path("/hetzner/v1/metadata"), yaml.as_bytes()).unwrap();
    let text = String::from_utf8(reduced.body).unwrap();
    assert!(!text.contains("ssh-ed25519"), "{text}");
    assert_eq!(
        keys_of(text.as_bytes(), true).unwrap(),
        ["hostname", "instance-id", "region"]
    );
}

/// Env-format and JSON user data built from arbitrary keys and values.
fn user_data() -> impl Strategy<Value = String> {
    let key = "[A-Z_][A-Z0-9_]{0,6}";
    let value = "[ -~]{0,12}";
    prop_oneof![
        prop::collection::vec((key, value), 0..8).prop_map(|entries| {
            entries
                .iter()
                .map(|(k, v)| format!("{k}='{}'\n", v.replace('\'', "")))
                .collect::<String>()
        }),
        prop::collection::btree_map(key, value, 0..8)
            .prop_map(|map| serde_json::to_string(&map).unwrap()),
    ]
}

proptest! {
    /// A view never serves a key that the user data does not have or that it does not grant.
    #[test]
    fn a_view_only_ever_removes(data in user_data(), granted in prop::collection::vec("[A-Z_][A-Z0-9_]{0,6}", 1..4)) {
        let granted: Vec<&str> = granted.iter().map(String::as_str).collect();
        let view = View::new(&granted, &[]).unwrap();
        if let Ok(reduced) = reduce(&view, &path("/latest/user-data"), data.as_bytes()) {
            let before = keys_of(data.as_bytes(), false).unwrap();
            let after = keys_of(&reduced.body, false).unwrap();
            prop_assert!(!after.is_empty());
            for key in after {
                prop_assert!(before.contains(&key) && granted.contains(&key.as_str()), "{key}");
            }
        }
    }
}
