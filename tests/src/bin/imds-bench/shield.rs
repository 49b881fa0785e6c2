//! Section 8: the shield. Reads of an answer fixed for the instance's life (GCP's instance
//! id), straight from the fake service and through the agent, which serves it from memory;
//! and how many requests the service sees per 1,000 client reads, of that answer and of a
//! dynamic one that only coalescing can spare it.

use super::*;

const FIXED: &str = "/computeMetadata/v1/instance/id";
const DYNAMIC: &str = "/computeMetadata/v1/instance/attributes/app-config";

pub(crate) fn shield_only(rounds: usize) -> Result {
    print!("{}", shield(rounds, "1000")?);
    Ok(())
}

pub(crate) fn shield(rounds: usize, per_worker: &str) -> Result<String> {
    let sandbox = Sandbox::new("bench-shield").ok_or("cannot create the sandbox for section 8")?;
    let log = sandbox.work_dir.join("requests.log");
    let _imds = sandbox.spawn_fake_imds(
        &[
            "--provider",
            "gcp",
            "--request-log",
            log.to_str().ok_or("log path")?,
        ],
        &[],
    );
    let policies = sandbox.work_dir.join("policies");
    std::fs::create_dir_all(&policies).map_err(|e| e.to_string())?;
    std::fs::write(
        policies.join("bench.yaml"),
        format!(
            "name: bench\ndefault: deny\nrules:\n  - name: reads\n    action: allow\n    methods: [GET]\n    paths: [\"{FIXED}\", \"{DYNAMIC}\"]\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut args = vec!["--provider", "gcp"];
    args.extend_from_slice(&UNLIMITED);
    let agent = sandbox.start_agent("enforced", "agent", &[&policies], &args);
    let imds = "169.254.169.254:80";
    let received = |path: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.split(' ').nth(1) == Some(path))
            .count()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## 8. Shield: reads the metadata service does not have to answer\n\n\
         Keep-alive reads of GCP's instance id (fixed for the instance's life, so served from\n\
         the agent's memory after the first), straight from the fake service and through the\n\
         agent, side by side. The fake answers from memory in microseconds; a real metadata\n\
         service answers in hundreds of microseconds to milliseconds.\n"
    );
    let _ = writeln!(
        out,
        "| clients | direct p50 / p99 | agent (cache) p50 / p99 | direct req/s | agent req/s | req/s ratio (target >= 1.0) | p50 ratio (target <= 1.0) |\n|---|---|---|---|---|---|---|"
    );
    for clients in ["1", "16"] {
        let (mut direct, mut through) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let run = ["http", imds, FIXED, per_worker, clients, "keepalive"];
            direct.push(child(&sandbox, "outside", &run)?);
            through.push(child(&sandbox, "enforced/client", &run)?);
        }
        let column = |runs: &[Vec<f64>], i: usize| median(runs.iter().map(|r| r[i]).collect());
        let (d50, d99, drps) = (column(&direct, 0), column(&direct, 1), column(&direct, 2));
        let (a50, a99, arps) = (
            column(&through, 0),
            column(&through, 1),
            column(&through, 2),
        );
        let _ = writeln!(
            out,
            "| {clients} | {:.0} / {:.0} us | {:.0} / {:.0} us | {drps:.0} | {arps:.0} | {:.2} | {:.2} |",
            d50 / 1e3,
            d99 / 1e3,
            a50 / 1e3,
            a99 / 1e3,
            arps / drps,
            a50 / d50
        );
    }
    // Upstream requests per 1,000 client reads through the agent, 16 clients at once.
    let reads = 1000;
    let mut upstream = Vec::new();
    for path in [FIXED, DYNAMIC] {
        let before = received(path);
        child(
            &sandbox,
            "enforced/client",
            &[
                "http",
                imds,
                path,
                &(reads / 16 + 1).to_string(),
                "16",
                "keepalive",
            ],
        )?;
        let count = received(path) - before;
        upstream.push(count as f64 * 1000.0 / ((reads / 16 + 1) * 16) as f64);
    }
    let _ = writeln!(
        out,
        "\nUpstream requests per 1,000 client reads through the agent (16 keep-alive clients): \
         the instance id {:.1} (served from memory after the first read, in this run already \
         read above); an instance attribute, which is never kept, {:.0} (identical reads in \
         flight at the same moment share one request).\n",
        upstream[0], upstream[1]
    );
    drop(agent);
    Ok(out)
}
