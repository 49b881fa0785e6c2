//! The fake metadata services of the clouds other than EC2 and its copies, each as its
//! documentation says it behaves (shared/reference/imds-protocols.md A2-A4).

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;

use super::{USER_DATA, random_hex, reply};

fn json(body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = reply(StatusCode::OK, &body.to_string());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn listing(items: &[&str]) -> String {
    items.join("\n")
}

fn has_forwarding_header<B>(request: &Request<B>) -> bool {
    ["forwarded", "x-forwarded-for", "x-forwarded-host"]
        .iter()
        .any(|h| request.headers().contains_key(*h))
}

/// [`USER_DATA`] in base64, as OCI and Azure serve user data.
pub const USER_DATA_B64: &str = "IyEvYmluL2Jhc2gKZXhwb3J0IERCX1BBU1NXT1JEPWh1bnRlcjIK";
/// A marker in the instance principal's private key.
pub const OCI_PRIVATE_KEY: &str = "FAKE-OCI-INSTANCE-PRINCIPAL-KEY";
pub const OCI_INSTANCE_ID: &str = "ocid1.instance.oc1.eu-frankfurt-1.fakeinstance";

/// Oracle Cloud's metadata service (reference A4): `/opc/v2` requires `Authorization: Bearer
/// Oracle` (401 without); requests with forwarding headers are refused (400: the reference
/// says "rejects" without a code). This instance still serves the legacy `/opc/v1` tree
/// without the header, as one whose legacy endpoints were never disabled does: the agent
/// must close it itself.
pub fn oci<B>(request: &Request<B>) -> Response<Full<Bytes>> {
    if has_forwarding_header(request) {
        return reply(StatusCode::BAD_REQUEST, "");
    }
    let path = request.uri().path();
    let (key, legacy) = if let Some(rest) = path.strip_prefix("/opc/v2") {
        (rest, false)
    } else if let Some(rest) = path.strip_prefix("/opc/v1") {
        (rest, true)
    } else {
        return reply(StatusCode::NOT_FOUND, "");
    };
    let oracle = request
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v == "Bearer Oracle");
    if !legacy && !oracle {
        return reply(StatusCode::UNAUTHORIZED, "");
    }
    let document = serde_json::json!({
        "id": OCI_INSTANCE_ID,
        "displayName": "demo",
        "region": "eu-frankfurt-1",
        "canonicalRegionName": "eu-frankfurt-1",
        "shape": "VM.Standard.E4.Flex",
        "metadata": {"user_data": USER_DATA_B64, "ssh_authorized_keys": "ssh-ed25519 AAAAFAKE"},
    });
    match key.trim_end_matches('/') {
        "/instance" => json(&document),
        "/instance/id" => reply(StatusCode::OK, OCI_INSTANCE_ID),
        "/instance/region" => reply(StatusCode::OK, "eu-frankfurt-1"),
        "/instance/shape" => reply(StatusCode::OK, "VM.Standard.E4.Flex"),
        "/instance/metadata" => json(&document["metadata"]),
        "/instance/metadata/user_data" => reply(StatusCode::OK, USER_DATA_B64),
        "/identity/key.pem" => reply(
            StatusCode::OK,
            &format!("-----BEGIN PRIVATE KEY-----\n{OCI_PRIVATE_KEY}\n-----END PRIVATE KEY-----\n"),
        ),
        "/vnics" => json(&serde_json::json!([
            {"vnicId": "ocid1.vnic.oc1.fake", "privateIp": "10.0.0.2", "macAddr": "02:00:17:00:00:01"}
        ])),
        _ => reply(StatusCode::NOT_FOUND, ""),
    }
}

pub const DIGITALOCEAN_DROPLET_ID: &str = "2756294";

/// DigitalOcean's metadata service (reference A4): no header required; the index without its
/// trailing slash is a 301 to it; `/metadata/v1.json` is everything, user data included.
pub fn digitalocean<B>(request: &Request<B>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path == "/metadata/v1" {
        let mut response = reply(StatusCode::MOVED_PERMANENTLY, "");
        response
            .headers_mut()
            .insert(header::LOCATION, HeaderValue::from_static("/metadata/v1/"));
        return response;
    }
    let body = match path {
        "/metadata/v1/" => listing(&[
            "id",
            "hostname",
            "user-data",
            "vendor-data",
            "public-keys",
            "region",
            "interfaces/",
            "dns/",
            "tags/",
        ]),
        "/metadata/v1.json" => {
            return json(&serde_json::json!({
                "droplet_id": DIGITALOCEAN_DROPLET_ID.parse::<u64>().expect("numeric"),
                "hostname": "demo-droplet",
                "region": "nyc3",
                "user_data": USER_DATA,
                "public_keys": ["ssh-ed25519 AAAAFAKE"],
            }));
        }
        "/metadata/v1/id" => DIGITALOCEAN_DROPLET_ID.into(),
        "/metadata/v1/hostname" => "demo-droplet".into(),
        "/metadata/v1/region" => "nyc3".into(),
        "/metadata/v1/user-data" => USER_DATA.into(),
        "/metadata/v1/vendor-data" => "#cloud-config\n".into(),
        "/metadata/v1/public-keys" => "ssh-ed25519 AAAAFAKE".into(),
        "/metadata/v1/interfaces/" => listing(&["private/", "public/"]),
        "/metadata/v1/interfaces/public/0/ipv4/address" => "203.0.113.20".into(),
        "/metadata/v1/tags/" => listing(&["demo"]),
        _ => return reply(StatusCode::NOT_FOUND, ""),
    };
    reply(StatusCode::OK, &body)
}

pub const HETZNER_INSTANCE_ID: &str = "48391210";

/// Hetzner Cloud's metadata service (reference A4): no header required; the whole metadata
/// as YAML at `/hetzner/v1/metadata`, each key below it, user data beside it.
pub fn hetzner<B>(request: &Request<B>) -> Response<Full<Bytes>> {
    let body = match request.uri().path().trim_end_matches('/') {
        "/hetzner/v1/metadata" => format!(
            "availability-zone: fsn1-dc14\nhostname: demo-server\ninstance-id: {HETZNER_INSTANCE_ID}\n\
             public-ipv4: 203.0.113.30\nregion: eu-central\npublic-keys:\n- ssh-ed25519 AAAAFAKE\n\
             vendor_data: '#cloud-config'\n"
        ),
        "/hetzner/v1/metadata/instance-id" => HETZNER_INSTANCE_ID.into(),
        "/hetzner/v1/metadata/hostname" => "demo-server".into(),
        "/hetzner/v1/metadata/region" => "eu-central".into(),
        "/hetzner/v1/metadata/availability-zone" => "fsn1-dc14".into(),
        "/hetzner/v1/metadata/public-ipv4" => "203.0.113.30".into(),
        "/hetzner/v1/metadata/private-networks" => {
            "- ip: 10.0.0.2\n  alias_ips: []\n  network_id: 1234\n".into()
        }
        "/hetzner/v1/metadata/public-keys" => "- ssh-ed25519 AAAAFAKE\n".into(),
        "/hetzner/v1/userdata" => USER_DATA.into(),
        _ => return reply(StatusCode::NOT_FOUND, ""),
    };
    reply(StatusCode::OK, &body)
}

pub const OPENSTACK_UUID: &str = "d8e02d56-2648-49a3-bf97-6be8f1204f38";
/// The marker in the (encrypted) admin password and in a vendordata enrolment secret.
pub const OPENSTACK_SECRET: &str = "FAKE-OPENSTACK-SECRET";

/// OpenStack Nova's own tree (reference A4): `/openstack` lists versions; each version holds
/// `meta_data.json` (user metadata and keys), `user_data`, `network_data.json`, `password`
/// and vendor data. (Its EC2-compatible tree is served by the EC2 code, without tokens.)
pub fn openstack<B>(request: &Request<B>) -> Response<Full<Bytes>> {
    let path = request.uri().path().trim_end_matches('/');
    if path == "/openstack" {
        return reply(
            StatusCode::OK,
            &listing(&["2012-08-10", "2018-08-27", "latest"]),
        );
    }
    let Some((version, file)) = path
        .strip_prefix("/openstack/")
        .map(|rest| rest.split_once('/').unwrap_or((rest, "")))
    else {
        return reply(StatusCode::NOT_FOUND, "");
    };
    if !["2012-08-10", "2018-08-27", "latest"].contains(&version) {
        return reply(StatusCode::NOT_FOUND, "");
    }
    match file {
        "" => reply(
            StatusCode::OK,
            &listing(&[
                "meta_data.json",
                "network_data.json",
                "password",
                "user_data",
                "vendor_data.json",
                "vendor_data2.json",
            ]),
        ),
        "meta_data.json" => json(&serde_json::json!({
            "uuid": OPENSTACK_UUID,
            "name": "demo",
            "availability_zone": "nova",
            "meta": {"role": "db"},
            "public_keys": {"demo": "ssh-ed25519 AAAAFAKE"},
        })),
        "user_data" => reply(StatusCode::OK, USER_DATA),
        "network_data.json" => json(&serde_json::json!({
            "links": [{"id": "tap0", "type": "ovs", "ethernet_mac_address": "fa:16:3e:00:00:01"}],
            "networks": [{"id": "network0", "link": "tap0", "type": "ipv4_dhcp"}],
        })),
        "password" => reply(StatusCode::OK, OPENSTACK_SECRET),
        "vendor_data.json" => json(&serde_json::json!({})),
        "vendor_data2.json" => json(&serde_json::json!({"join": {"ipaotp": OPENSTACK_SECRET}})),
        _ => reply(StatusCode::NOT_FOUND, ""),
    }
}

pub const ALIBABA_INSTANCE_ID: &str = "i-bp1fakeinstance0001";
/// Prefix of every access key id of Alibaba's RAM role credentials.
pub const ALIBABA_ACCESS_KEY_PREFIX: &str = "STS.FAKE";

/// Alibaba ECS's tree (reference A4), EC2-shaped; tokens are checked by the EC2 code.
pub fn alibaba(role: &str, key: &str) -> Option<String> {
    let credentials = format!("/latest/meta-data/ram/security-credentials/{role}");
    Some(match key {
        "" => "latest".into(),
        "/latest" => listing(&["meta-data/", "user-data"]),
        "/latest/meta-data" => listing(&["instance-id", "ram/", "region-id", "zone-id"]),
        "/latest/meta-data/instance-id" => ALIBABA_INSTANCE_ID.into(),
        "/latest/meta-data/region-id" => "cn-hangzhou".into(),
        "/latest/meta-data/zone-id" => "cn-hangzhou-h".into(),
        "/latest/meta-data/ram" => "security-credentials/".into(),
        "/latest/meta-data/ram/security-credentials" => role.into(),
        k if k == credentials => serde_json::json!({
            "AccessKeyId": format!("{ALIBABA_ACCESS_KEY_PREFIX}{}", random_hex(8).to_uppercase()),
            "AccessKeySecret": random_hex(20),
            "SecurityToken": random_hex(40),
            "Expiration": "2099-01-01T00:00:00Z",
            "LastUpdated": "2026-01-01T00:00:00Z",
            "Code": "Success",
        })
        .to_string(),
        "/latest/user-data" => USER_DATA.into(),
        _ => return None,
    })
}

pub const VOLCENGINE_INSTANCE_ID: &str = "i-ye7fakeinstance0001";
pub const VOLCENGINE_ACCESS_KEY_PREFIX: &str = "AKTPFAKE";

/// Volcengine's service (100.96.0.96): an EC2-style tree with its own token headers, role
/// credentials under `volcstack/latest/iam/security_credentials/` (and the same under
/// `latest/iam/`, as some of its clients ask), and other `volcstack/` entries.
pub fn volcengine(role: &str, key: &str) -> Option<String> {
    let credentials = || {
        serde_json::json!({
            "AccessKeyId": format!("{VOLCENGINE_ACCESS_KEY_PREFIX}{}", random_hex(8).to_uppercase()),
            "SecretAccessKey": random_hex(20),
            "SessionToken": random_hex(40),
            "ExpiredTime": "2099-01-01T00:00:00+08:00",
            "CurrentTime": "2026-01-01T00:00:00+08:00",
        })
        .to_string()
    };
    let roles = [
        "/volcstack/latest/iam/security_credentials",
        "/latest/iam/security_credentials",
    ];
    Some(match key {
        "" => "latest\nvolcstack".into(),
        "/latest" => listing(&["meta-data/", "user-data"]),
        "/latest/meta-data" => listing(&["instance-id", "region-id", "zone-id"]),
        "/latest/meta-data/instance-id" => VOLCENGINE_INSTANCE_ID.into(),
        "/latest/meta-data/region-id" => "cn-beijing".into(),
        "/latest/meta-data/zone-id" => "cn-beijing-a".into(),
        "/latest/user-data" => USER_DATA.into(),
        "/volcstack/latest/site_name" => "Volcengine".into(),
        k if roles.contains(&k) => role.into(),
        k if roles.iter().any(|r| k == format!("{r}/{role}")) => credentials(),
        _ => return None,
    })
}

/// A marker of the VM's certificates in the WireServer's answer.
pub const WIRESERVER_CERTIFICATES: &str = "FAKE-PKCS7-CERTIFICATES";
/// A marker of the extension settings in the HostGAPlugin's answer.
pub const HOST_GA_PLUGIN_SETTINGS: &str = "FAKE-PROTECTED-SETTINGS";

/// Azure's WireServer and HostGAPlugin (168.63.129.16, ports 80 and 32526), as WALinuxAgent
/// asks them: the versions, the goal state, the certificates it names; the VM settings.
/// Their paths are no IMDS path, so one fake serves all three on every address.
fn wireserver(path: &str, query: &str) -> Option<Response<Full<Bytes>>> {
    let xml = |body: &str| reply(StatusCode::OK, body);
    Some(match (path, query) {
        ("/", "comp=versions") => {
            xml("<Versions><Preferred><Version>2012-11-30</Version></Preferred></Versions>")
        }
        ("/machine/" | "/machine", "comp=goalstate") => xml(
            "<GoalState><Incarnation>1</Incarnation><Container><RoleInstanceList><RoleInstance>\
             <Configuration><Certificates>http://168.63.129.16:80/machine/c/r?comp=certificates&amp;incarnation=1</Certificates>\
             </Configuration></RoleInstance></RoleInstanceList></Container></GoalState>",
        ),
        ("/machine/c/r", "comp=certificates&incarnation=1") => xml(&format!(
            "<CertificateFile><Data>{WIRESERVER_CERTIFICATES}</Data></CertificateFile>"
        )),
        ("/vmSettings", "") => json(&serde_json::json!({
            "extensionGoalStates": [{"name": "CustomScript", "settings": [{"protectedSettings": HOST_GA_PLUGIN_SETTINGS}]}]
        })),
        _ => return None,
    })
}

/// GCP's fake service account and its access token prefix.
pub const GCP_SERVICE_ACCOUNT: &str = "node@demo-project.iam.gserviceaccount.com";
pub const GCP_TOKEN_PREFIX: &str = "ya29.FAKE";
/// A GKE node's bootstrap secrets (kubelet credentials), in the instance attributes.
pub const GCP_KUBE_ENV: &str = "KUBELET_CERT: fake-cert\nKUBELET_KEY: fake-key\n";

/// A custom instance attribute an application reads.
pub const GCP_APP_CONFIG: &str = "PORT=8080\n";

/// GCP's metadata server, as documented (reference A2): `Metadata-Flavor: Google` required on
/// /computeMetadata/v1 (403 without) and present on every response; `recursive=true` answers
/// a directory as JSON; the legacy v1beta1 tree answers without the header, as it did.
pub fn gcp<B>(request: &Request<B>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    // Go's url.ParseQuery, as the real server reads it: names and values percent-decoded.
    let recursive = request.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|p| unescape(p).is_some_and(|p| p.eq_ignore_ascii_case("recursive=true")))
    });
    let alt_json = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "alt=json"));
    let flavored = request
        .headers()
        .get("metadata-flavor")
        .is_some_and(|v| v == "Google");
    let with_flavor = |mut response: Response<Full<Bytes>>| {
        response
            .headers_mut()
            .insert("metadata-flavor", HeaderValue::from_static("Google"));
        response
    };
    let legacy = path.strip_prefix("/computeMetadata/v1beta1");
    let key = match (path.strip_prefix("/computeMetadata/v1"), legacy) {
        (_, Some(rest)) => rest,
        (Some(rest), None) if rest.is_empty() || rest.starts_with('/') => {
            if !flavored {
                return with_flavor(reply(
                    StatusCode::FORBIDDEN,
                    "Missing Metadata-Flavor:Google header.",
                ));
            }
            rest
        }
        // Detection (OnGCE) pings / and checks the response header.
        _ if path == "/" => return with_flavor(reply(StatusCode::OK, "computeMetadata/\n")),
        _ => return with_flavor(reply(StatusCode::NOT_FOUND, "")),
    };
    let account = "/instance/service-accounts/default";
    let body = match key.trim_end_matches('/') {
        "/instance/id" => "4520031799277581759".to_owned(),
        "/instance/zone" => "projects/1234/zones/us-central1-a".to_owned(),
        "/project/project-id" => "demo-project".to_owned(),
        "/instance/attributes/kube-env" => GCP_KUBE_ENV.to_owned(),
        "/instance/attributes/app-config" => GCP_APP_CONFIG.to_owned(),
        "/instance/attributes" if recursive => {
            serde_json::json!({"app-config": GCP_APP_CONFIG, "kube-env": GCP_KUBE_ENV}).to_string()
        }
        // A directory as JSON: its entries in an array (the agent must assume the names
        // a text listing would show are there).
        "/instance/attributes" if alt_json => r#"["app-config","kube-env"]"#.to_owned(),
        "/instance/attributes" => "app-config\nkube-env\n".to_owned(),
        "/instance/service-accounts" => format!("default/\n{GCP_SERVICE_ACCOUNT}/\n"),
        k if k == account && recursive => serde_json::json!({
            "aliases": ["default"],
            "email": GCP_SERVICE_ACCOUNT,
            "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
        })
        .to_string(),
        k if k == account => "aliases\nemail\nidentity\nscopes\ntoken\n".to_owned(),
        k if k == format!("{account}/email") => GCP_SERVICE_ACCOUNT.to_owned(),
        k if k == format!("{account}/token") => serde_json::json!({
            "access_token": format!("{GCP_TOKEN_PREFIX}{}", random_hex(16)),
            "expires_in": 3599,
            "token_type": "Bearer",
        })
        .to_string(),
        _ => return with_flavor(reply(StatusCode::NOT_FOUND, "")),
    };
    let mut response = with_flavor(reply(StatusCode::OK, &body));
    if body.starts_with(['{', '[']) {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    response
}

/// Percent-decodes, or `None` for an invalid escape.
fn unescape(text: &str) -> Option<String> {
    let mut out = Vec::new();
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        out.push(if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?
        } else {
            b
        });
    }
    String::from_utf8(out).ok()
}

/// Azure's managed identity's access token prefix.
pub const AZURE_TOKEN_PREFIX: &str = "eyFAKE";

/// Azure's instance document, with what a view must remove: user data (base64), the OS
/// profile, SSH public keys, tags, and the network section.
pub fn azure_instance(user_data: &str) -> serde_json::Value {
    use base64::Engine as _;
    serde_json::json!({
        "compute": {
            "azEnvironment": "AzurePublicCloud",
            "customData": "",
            "location": "westeurope",
            "name": "vm-1",
            "osProfile": {
                "adminUsername": "azureuser",
                "computerName": "vm-1",
                "disablePasswordAuthentication": "true"
            },
            "osType": "Linux",
            "publicKeys": [{
                "keyData": "ssh-ed25519 AAAAFAKEAZUREKEY",
                "path": "/home/azureuser/.ssh/authorized_keys"
            }],
            "resourceGroupName": "rg-fake",
            "subscriptionId": "00000000-0000-0000-0000-000000000000",
            "tags": "owner:team-a",
            "tagsList": [{"name": "owner", "value": "team-a"}],
            "userData": base64::engine::general_purpose::STANDARD.encode(user_data),
            "vmId": "02aab8a4-74ef-476e-8182-f6d2ba4166a6",
            "vmSize": "Standard_D2s_v5",
            "zone": "1"
        },
        "network": {
            "interface": [{
                "ipv4": {"ipAddress": [{"privateIpAddress": "10.0.0.4", "publicIpAddress": ""}]},
                "macAddress": "000D3A000001"
            }]
        }
    })
}

/// Azure's instance metadata service, as documented (reference A3): `Metadata: true` required
/// (400 without), `api-version` required (400 without), JSON answers below
/// `/metadata/instance` (a leaf only with `format=text`, 400 without), the managed identity's
/// token endpoint.
pub fn azure<B>(request: &Request<B>, user_data: &str) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let query = request.uri().query().unwrap_or("");
    if let Some(answer) = wireserver(path, query) {
        return answer;
    }
    if request
        .headers()
        .get("metadata")
        .is_none_or(|v| v != "true")
    {
        return reply(
            StatusCode::BAD_REQUEST,
            "{\"error\":\"Bad request. Required metadata header not specified\"}",
        );
    }
    if path == "/metadata/versions" {
        return json(&serde_json::json!({"apiVersions": ["2021-02-01"]}));
    }
    if !query.split('&').any(|p| p.starts_with("api-version=")) {
        return reply(
            StatusCode::BAD_REQUEST,
            "{\"error\":\"Bad request. api-version was not specified\"}",
        );
    }
    match path.trim_end_matches('/') {
        instance
            if instance == "/metadata/instance" || instance.starts_with("/metadata/instance/") =>
        {
            let document = azure_instance(user_data);
            let found = instance
                .split('/')
                .skip(3)
                .try_fold(&document, |node, key| match node {
                    serde_json::Value::Array(items) => items.get(key.parse::<usize>().ok()?),
                    _ => node.get(key),
                });
            let text = query.split('&').any(|p| p == "format=text");
            match found {
                None => reply(StatusCode::NOT_FOUND, ""),
                Some(serde_json::Value::String(leaf)) if text => reply(StatusCode::OK, leaf),
                Some(serde_json::Value::String(_)) => reply(
                    StatusCode::BAD_REQUEST,
                    "{\"error\":\"Bad request. Leaf nodes require format=text\"}",
                ),
                Some(node) => json(node),
            }
        }
        "/metadata/identity/oauth2/token" => json(&serde_json::json!({
            "access_token": format!("{AZURE_TOKEN_PREFIX}{}", random_hex(16)),
            "expires_in": "3599",
            "token_type": "Bearer",
            "resource": "https://management.azure.com/",
        })),
        _ => reply(StatusCode::NOT_FOUND, ""),
    }
}
