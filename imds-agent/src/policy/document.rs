//! The document: a policy file, and the spec of the ImdsPolicy and ClusterImdsPolicy resources
//! (`kube`), whose schema is derived from these types. Spanned values carry their line and
//! column for error messages in files (unknown in API objects, which name the object instead).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{Action, Mode};

/// An IMDS policy: which callers it governs, and per request, ordered rules and a default.
#[derive(Debug, Clone, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Names the policy in denials and audit lines. Required in a file; in a resource the
    /// object's name is used instead (and this field is not part of its schema).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub name: Option<Spanned<String>>,
    /// Free text for people reading the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// enforce (default), or audit: a would-be denial is logged and counted, then allowed.
    #[serde(default)]
    pub mode: Mode,
    /// Which callers this policy governs (omitted: every caller it may govern).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callers: Option<SelectorDocument>,
    /// The decision when no rule matches a request.
    pub default: Action,
    /// In order; the first rule that matches decides for this policy.
    #[serde(default)]
    pub rules: Vec<RuleDocument>,
    /// AWS session tokens (IMDSv2) for the callers this policy selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokensDocument>,
}

/// IMDSv2 per workload, on AWS endpoints: stricter than the instance's own setting.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokensDocument {
    /// Requests without a session token get 401, as on an instance with HttpTokens=required,
    /// even where the instance still serves IMDSv1.
    #[serde(default)]
    pub required: bool,
    /// The longest token lifetime these callers get: a token request asking for more is sent
    /// on asking for this (the response's TTL header tells the SDK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 21600))]
    pub max_ttl_seconds: Option<u32>,
}

/// One rule: an action for requests with these methods to these paths.
#[derive(Debug, Clone, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleDocument {
    /// Names the rule in denials and audit lines.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    pub action: Action,
    /// HTTP methods (GET, HEAD, PUT, ...), or "*" for any.
    #[schemars(with = "Vec<String>")]
    pub methods: Spanned<Vec<Spanned<String>>>,
    /// Path patterns: `*` one segment, `**` any depth, `{a,b}` alternatives.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub paths: Vec<Spanned<String>>,
    /// Named path groups (credentials, user-data, instance-info, ...).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub groups: Vec<Spanned<String>>,
    /// Narrows the rule to some of the policy's callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callers: Option<SelectorDocument>,
    /// What of an allowed answer the callers get (allow rules only): some keys of user data,
    /// or a document without some of its fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<ViewDocument>,
}

/// A view of the answers a rule allows. `keys` keeps only these keys; `without` removes these
/// fields, and denies reading them (or anything below them) by their own paths.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ViewDocument {
    /// Keys of user data: names of `KEY=VALUE` lines, top-level keys of a JSON object, or
    /// dotted paths below them (`database.host`). User data in any other format (cloud-init
    /// MIME multipart, scripts, binary) is not served through a view.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub keys: Vec<Spanned<String>>,
    /// Fields of a JSON (or Hetzner's YAML) document, each named by its metadata path: for
    /// Azure's instance document, `/metadata/instance/compute/osProfile`; for a document
    /// served as a file, the file's path then the field's (`/metadata/v1.json/user_data`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub without: Vec<Spanned<String>>,
}

/// Which callers: every field given must match (AND); any of a field's values may (OR).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SelectorDocument {
    /// cgroup path patterns, relative to the enforced root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub cgroups: Vec<Spanned<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uids: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gids: Vec<u32>,
    /// systemd unit name patterns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub units: Vec<Spanned<String>>,
    /// Executable path patterns, each optionally pinned to the program's content:
    /// `PATTERN@sha256:<64 hex digits>`. A host process matches a path only while it runs
    /// the node's file at that path; a container's path is its own file system's, and only
    /// a digest says which program runs there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub executables: Vec<Spanned<String>>,
    /// Pod namespaces. An ImdsPolicy governs pods of its own namespace only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Pod labels, all of which must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    /// Container names in the pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<String>,
}
