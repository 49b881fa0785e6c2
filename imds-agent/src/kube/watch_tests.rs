//! The policy watch's reading of objects: one it cannot read is reported on its own and
//! stalls nothing, for a hand-made case and for any object the CRD schema in deploy/ admits.

use kube::api::DynamicObject;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::{
    crd::{ClusterImdsPolicy, ImdsPolicy},
    watch::{Report, ResourcePolicies},
};

fn object(kind: &str, namespace: Option<&str>, name: &str, spec: Value) -> DynamicObject {
    let mut metadata = json!({"name": name, "generation": 1});
    if let Some(namespace) = namespace {
        metadata["namespace"] = json!(namespace);
    }
    serde_json::from_value(json!({
        "apiVersion": "imds-agent.dev/v1alpha1",
        "kind": kind,
        "metadata": metadata,
        "spec": spec,
    }))
    .expect("a dynamic object")
}

/// A valid ImdsPolicy in `tenant`.
fn good() -> DynamicObject {
    object(
        "ImdsPolicy",
        Some("tenant"),
        "good",
        json!({"default": "deny", "rules": [{"name": "info", "action": "allow",
               "methods": ["GET"], "groups": ["instance-info"]}]}),
    )
}

fn in_force(resources: &ResourcePolicies) -> Vec<String> {
    resources
        .accepted()
        .iter()
        .map(|p| p.name().to_owned())
        .collect()
}

fn report_of<'a>(reports: &'a [Report], source: &str) -> &'a Report {
    reports
        .iter()
        .find(|r| r.source == source)
        .unwrap_or_else(|| panic!("no report for {source}"))
}

#[test]
fn an_object_out_of_the_agents_range_is_reported_and_the_others_apply() {
    let resources = ResourcePolicies::default();
    let unreadable = object(
        "ImdsPolicy",
        Some("tenant"),
        "huge-uid",
        json!({"default": "deny", "callers": {"uids": [4294967296u64]}}),
    );
    let reports = resources.relist::<ImdsPolicy>(&[unreadable, good()]);
    assert_eq!(reports.len(), 2);
    assert_eq!(report_of(&reports, "imdspolicies/tenant/good").error, None);
    let error = report_of(&reports, "imdspolicies/tenant/huge-uid")
        .error
        .clone()
        .expect("reported");
    assert!(
        error.contains("cannot be read") && error.contains("4294967296"),
        "{error}"
    );
    assert_eq!(in_force(&resources), ["imdspolicies/tenant/good"]);

    // An update of a valid object to one it cannot read: reported, the old version stays.
    let mut broken = good();
    broken.metadata.generation = Some(2);
    broken.data["spec"]["callers"] = json!({"gids": ["root"]});
    let report = resources
        .apply::<ImdsPolicy>(&broken)
        .expect("a new generation");
    assert!(report.error.is_some());
    assert_eq!(in_force(&resources), ["imdspolicies/tenant/good"]);
}

/// Values for a schema of deploy/crds.yaml: objects with their required properties and any
/// of the others, arrays of a few items, integers across their whole range (edges
/// included), strings from the policy language and outside it.
fn admitted(schema: &Value) -> BoxedStrategy<Value> {
    let value = admitted_non_null(schema);
    if schema["nullable"] == true {
        prop_oneof![1 => Just(Value::Null), 4 => value].boxed()
    } else {
        value
    }
}

fn admitted_non_null(schema: &Value) -> BoxedStrategy<Value> {
    if let Some(values) = schema["enum"].as_array() {
        return proptest::sample::select(values.clone()).boxed();
    }
    match schema["type"].as_str() {
        Some("object") => match schema["properties"].as_object() {
            Some(properties) => {
                let required: Vec<&str> = schema["required"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let fields: Vec<BoxedStrategy<Option<(String, Value)>>> = properties
                    .iter()
                    .map(|(name, property)| {
                        let key = name.clone();
                        let value = admitted(property).prop_map(move |v| Some((key.clone(), v)));
                        if required.contains(&name.as_str()) {
                            value.boxed()
                        } else {
                            prop_oneof![Just(None), value].boxed()
                        }
                    })
                    .collect();
                fields
                    .prop_map(|fields| Value::Object(fields.into_iter().flatten().collect()))
                    .boxed()
            }
            None => proptest::collection::btree_map(
                word(),
                admitted(&schema["additionalProperties"]),
                0..3,
            )
            .prop_map(|map| Value::Object(map.into_iter().collect()))
            .boxed(),
        },
        Some("array") => proptest::collection::vec(admitted(&schema["items"]), 0..4)
            .prop_map(Value::Array)
            .boxed(),
        Some("integer") => {
            let min = schema["minimum"].as_f64().unwrap_or(i64::MIN as f64) as i64;
            let max = schema["maximum"].as_f64().unwrap_or(i64::MAX as f64) as i64;
            prop_oneof![Just(min), Just(max), min..=max]
                .prop_map(Value::from)
                .boxed()
        }
        Some("boolean") => any::<bool>().prop_map(Value::Bool).boxed(),
        Some("string") => word().prop_map(Value::String).boxed(),
        other => panic!("schema type {other:?}: teach the generator"),
    }
}

fn word() -> BoxedStrategy<String> {
    prop_oneof![
        proptest::sample::select(vec![
            "",
            "/**",
            "/latest/meta-data/**",
            "/latest/meta-data/iam/*",
            "credentials",
            "instance-info",
            "token",
            "GET",
            "PUT",
            "*",
            "payments",
            "app",
            "default",
            "/system.slice/**",
            "nginx.service",
            "/usr/bin/curl",
            "a/../b",
            "%2f",
        ])
        .prop_map(str::to_owned),
        "[ -~]{0,16}",
        "\\PC{0,4}",
    ]
    .boxed()
}

/// The spec schema of each kind in deploy/crds.yaml.
fn spec_schemas() -> Vec<(String, Value)> {
    let crds: Vec<Value> = serde_saphyr::from_multiple(include_str!("../../../deploy/crds.yaml"))
        .expect("deploy/crds.yaml parses");
    crds.iter()
        .map(|crd| {
            let kind = crd["spec"]["names"]["kind"]
                .as_str()
                .expect("kind")
                .to_owned();
            let version = &crd["spec"]["versions"][0];
            let spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"].clone();
            (kind, spec)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any spec the schema admits, listed beside a valid object: it is applied or reported on
    /// its own, and the valid one applies.
    #[test]
    fn any_object_the_schema_admits_is_applied_or_reported_on_its_own(
        (kind, spec) in proptest::sample::select(spec_schemas())
            .prop_flat_map(|(kind, schema)| (Just(kind), admitted(&schema)))
    ) {
        let resources = ResourcePolicies::default();
        let (generated, source) = if kind == "ImdsPolicy" {
            let object = object(&kind, Some("tenant"), "generated", spec.clone());
            (resources.relist::<ImdsPolicy>(&[object, good()]), "imdspolicies/tenant/generated")
        } else {
            let object = object(&kind, None, "generated", spec.clone());
            resources.relist::<ImdsPolicy>(&[good()]);
            (resources.relist::<ClusterImdsPolicy>(&[object]), "clusterimdspolicies/generated")
        };
        let names = in_force(&resources);
        prop_assert!(names.iter().any(|n| n == "imdspolicies/tenant/good"), "{:?}", names);
        // The generated object: applied, or reported with a reason; never in force while
        // reported.
        let report = report_of(&generated, source);
        prop_assert_eq!(
            report.error.is_none(),
            names.iter().any(|n| n == source),
            "{:?}: {}", report.error, spec
        );
    }
}
