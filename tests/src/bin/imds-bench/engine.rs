//! The policy engine at scale: compiling, selecting and deciding with 10,000 policies.

use super::*;

/// 10,000 policy files, one per team, each selecting its own cgroups, with a few rules.
pub(crate) fn policy_engine(dir: &Path, quick: bool) -> Result<String> {
    write_scale_policies(dir, INFO_BY_GROUP)?;
    let figures = EngineFigures::measure(dir, quick, if quick { 1 } else { 3 })?;
    let EngineFigures {
        compile_s,
        decide,
        select,
        allowed,
        decisions,
    } = figures;
    Ok(format!(
        "| measure | value | target |\n|---|---|---|\n\
         | compile 10,000 policy files | {compile_s:.2} s | <= 1 s |\n\
         | decision p50 / p99 (per request, caller's selection cached) | {} / {} ns | p99 <= 1 us |\n\
         | selection for a new caller p50 / p99 (scans all 10,000; then cached across the caller's connections until the policy changes) | {:.1} / {:.1} us | |\n\
         | ({allowed} of {decisions} decisions allowed) | | |\n\n",
        decide.p50,
        decide.p99,
        select.p50 as f64 / 1e3,
        select.p99 as f64 / 1e3
    ))
}

/// The scale policies' instance-info rule as users write it: the group, which covers every
/// provider's paths.
pub(crate) const INFO_BY_GROUP: &str = "groups: [instance-info]";

/// The same rule limited to AWS's paths (what the group held before it covered every
/// provider), written out: `engine` compares the two to show what the group's size costs.
pub(crate) fn info_aws_only() -> String {
    let paths: Vec<String> = imds_agent::policy::groups::patterns("instance-info")
        .expect("a known group")
        .iter()
        .filter(|p| p.starts_with("/latest/"))
        .map(|p| format!("\"{p}\""))
        .collect();
    format!("paths: [{}]", paths.join(", "))
}

/// 10,000 policies, one per team cgroup, each with a token rule, an instance-info rule
/// (`info_rule`) and one credentials path for one uid.
pub(crate) fn write_scale_policies(dir: &Path, info_rule: &str) -> Result {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    for i in 0..10_000 {
        let text = format!(
            "name: team-{i}\ncallers: {{cgroups: [\"/team-{i}/**\"]}}\ndefault: deny\nrules:\n  - name: token\n    action: allow\n    methods: [PUT]\n    groups: [token]\n  - name: info\n    action: allow\n    methods: [GET, HEAD]\n    {info_rule}\n  - name: creds\n    action: allow\n    methods: [GET]\n    paths: [\"/latest/meta-data/iam/security-credentials/role-{i}\"]\n    callers: {{uids: [{}]}}\n",
            1000 + i % 50
        );
        std::fs::write(dir.join(format!("team-{i:05}.yaml")), text).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Section 5's figures for one policy directory.
pub(crate) struct EngineFigures {
    pub(crate) compile_s: f64,
    pub(crate) decide: Stats,
    pub(crate) select: Stats,
    pub(crate) allowed: usize,
    pub(crate) decisions: usize,
}

impl EngineFigures {
    pub(crate) fn measure(dir: &Path, quick: bool, compiles: usize) -> Result<Self> {
        let mut compile = Vec::new();
        let mut set = None;
        for _ in 0..compiles {
            let start = Instant::now();
            set = Some(
                PolicySet::load(&[dir.to_owned()], Unmatched::Deny)
                    .map_err(|e| format!("{e:?}"))?,
            );
            compile.push(start.elapsed().as_secs_f64());
        }
        let set = set.ok_or("no compile rounds")?;
        let pods = PodDirectory::default();
        let workloads: Vec<Identity> = (0..1000)
            .map(|i| {
                Identity::for_cgroup(
                    &format!("/team-{}/pod-{i}", i * 10),
                    1000 + (i * 10) % 50,
                    0,
                    &pods,
                )
            })
            .collect();
        let mut select = Vec::with_capacity(workloads.len());
        let selections: Vec<_> = workloads
            .iter()
            .map(|w| {
                let start = Instant::now();
                let s = set.select(w);
                select.push(start.elapsed().as_nanos() as u64);
                s
            })
            .collect();
        let paths = [
            "/latest/meta-data/instance-id",
            "/latest/meta-data/placement/region",
            "/latest/meta-data/iam/security-credentials/role-10",
            "/latest/user-data",
        ];
        let paths: Vec<CanonicalPath<'_>> = paths
            .iter()
            .map(|p| CanonicalPath::parse(p).expect("valid"))
            .collect();
        let decisions = if quick { 200_000 } else { 1_000_000 };
        let mut samples = Vec::with_capacity(decisions);
        let mut allowed = 0usize;
        for i in 0..decisions {
            let w = i % workloads.len();
            let path = &paths[i % paths.len()];
            let start = Instant::now();
            let d = set.decide(&selections[w], &workloads[w], "GET", path);
            samples.push(start.elapsed().as_nanos() as u64);
            allowed += usize::from(d.action == imds_agent::policy::Action::Allow);
        }
        Ok(Self {
            compile_s: median(compile),
            decide: Stats::of(samples),
            select: Stats::of(select),
            allowed,
            decisions,
        })
    }
}

/// `engine [ROUNDS]`: section 5 alone, the instance-info rule written two ways in
/// alternating rounds (the group for every provider; AWS's paths only), so that a change to
/// the groups or the engine can be judged side by side without the whole suite.
pub(crate) fn engine(rounds: usize) -> Result {
    let dir = std::env::temp_dir().join(format!("imds-bench-engine-{}", std::process::id()));
    let aws_only = info_aws_only();
    let result = (|| {
        println!("variant\tcompile s\tdecide p50 ns\tdecide p99 ns\tselect p50 us\tallowed");
        for _ in 0..rounds {
            for (variant, rule) in [("group", INFO_BY_GROUP), ("aws-only", aws_only.as_str())] {
                let _ = std::fs::remove_dir_all(&dir);
                write_scale_policies(&dir, rule)?;
                let f = EngineFigures::measure(&dir, true, 1)?;
                println!(
                    "{variant}\t{:.2}\t{}\t{}\t{:.1}\t{}/{}",
                    f.compile_s,
                    f.decide.p50,
                    f.decide.p99,
                    f.select.p50 as f64 / 1e3,
                    f.allowed,
                    f.decisions
                );
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
