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
    let log_arg = log.to_str().ok_or("log path")?.to_owned();
    // The fake as it is (answers in microseconds), or taking `delay_ms` over every answer.
    let fake = |delay_ms: &str| {
        sandbox.spawn_fake_imds(
            &[
                "--provider",
                "gcp",
                "--request-log",
                &log_arg,
                "--answer-delay-ms",
                delay_ms,
            ],
            &[],
        )
    };
    let mut imds = fake("0");
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
    let address = "169.254.169.254:80";
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
         agent, side by side. The fake answers from memory in microseconds, faster than any\n\
         real metadata service; the last two rows have it sleep 1 ms before every answer\n\
         (`fake-imds --answer-delay-ms 1`; the runtime's timer makes that 1-2 ms), to show\n\
         what the cache spares callers when the service takes its time.\n"
    );
    let _ = writeln!(
        out,
        "| service answers in | clients | direct p50 / p99 | agent (cache) p50 / p99 | direct req/s | agent req/s | req/s ratio (target >= 1.0) | p50 ratio (target <= 1.0) |\n|---|---|---|---|---|---|---|---|"
    );
    // Upstream requests per 1,000 client reads through the agent, 16 clients at once: of
    // the fixed answer and of the dynamic one.
    let upstream_per_1000 = || -> Result<[f64; 2]> {
        let per_client = 1000 / 16 + 1;
        let mut counts = [0.0; 2];
        for (count, path) in counts.iter_mut().zip([FIXED, DYNAMIC]) {
            let before = received(path);
            let run = [
                "http",
                address,
                path,
                &per_client.to_string(),
                "16",
                "keepalive",
            ];
            child(&sandbox, "enforced/client", &run)?;
            *count = (received(path) - before) as f64 * 1000.0 / (per_client * 16) as f64;
        }
        Ok(counts)
    };
    let mut upstream = Vec::new();
    for (delay_ms, clients) in [("0", "1"), ("0", "16"), ("1", "1"), ("1", "16")] {
        if delay_ms != "0" && clients == "1" {
            upstream.push(upstream_per_1000()?);
            drop(imds);
            imds = fake(delay_ms);
        }
        let answers_in = if delay_ms == "0" {
            "microseconds (the fake)".to_owned()
        } else {
            format!("the fake + {delay_ms} ms sleep")
        };
        let (mut direct, mut through) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let run = ["http", address, FIXED, per_worker, clients, "keepalive"];
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
            "| {answers_in} | {clients} | {:.0} / {:.0} us | {:.0} / {:.0} us | {drps:.0} | {arps:.0} | {:.2} | {:.2} |",
            d50 / 1e3,
            d99 / 1e3,
            a50 / 1e3,
            a99 / 1e3,
            arps / drps,
            a50 / d50
        );
    }
    upstream.push(upstream_per_1000()?);
    let _ = writeln!(
        out,
        "\nUpstream requests per 1,000 client reads through the agent (16 keep-alive clients), \
         with the service answering in microseconds / in 1 ms: the instance id {:.1} / {:.1} \
         (served from memory after the first read, in this run already read above); an \
         instance attribute, which is never kept, {:.0} / {:.0} (identical reads in flight at \
         the same moment share one request).\n",
        upstream[0][0], upstream[1][0], upstream[0][1], upstream[1][1]
    );
    drop(agent);
    drop(imds);
    Ok(out)
}
