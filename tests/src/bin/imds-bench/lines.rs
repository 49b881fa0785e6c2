//! `imds-bench lines PERF_DATA`: a `profile ... perf` recording read by the agent's own source
//! lines. perf's report names functions; the agent's request path is a few large async
//! functions into which nearly everything is inlined, so a function-level report says
//! "serve_connection" where the question is which line of it. Each sample goes to the
//! innermost frame that is a line of imds-agent/src, found with llvm-addr2line (inlined
//! frames included) in a build that carries line tables.

use std::{
    collections::{BTreeSet, HashMap},
    io::Write as _,
    process::Stdio,
};

use object::{Object as _, ObjectSegment as _};

use super::*;

/// Where the agent's own source lines are, in the paths the line tables hold.
const AGENT_SOURCE: &str = "/imds-agent/src/";

/// Where x86-64's kernel half of the address space begins.
const KERNEL_START: u64 = 0xffff_8000_0000_0000;

/// One recorded sample: its weight and its call chain, innermost frame first.
#[derive(Debug, PartialEq)]
struct Sample {
    period: u64,
    frames: Vec<Frame>,
}

#[derive(Debug, PartialEq)]
struct Frame {
    /// As perf script prints it: for a file-backed mapping, an offset into the file.
    address: u64,
    symbol: String,
    dso: String,
}

/// A source location llvm-addr2line gives for an address, innermost (inlined) first.
#[derive(Debug, Clone, PartialEq)]
struct Location {
    file: String,
    line: u64,
}

pub(crate) fn lines(perf_data: &Path, agent: Option<&Path>, top: usize) -> Result {
    let script = std::process::Command::new("perf")
        .args([
            "script",
            "--no-inline",
            "-F",
            "comm,tid,period,ip,sym,dso",
            "-i",
        ])
        .arg(perf_data)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("perf script: {e}"))?;
    if !script.status.success() {
        return Err(format!(
            "perf script -i {} failed: {}",
            perf_data.display(),
            script.status
        ));
    }
    let samples = parse_script(&String::from_utf8_lossy(&script.stdout));
    if samples.is_empty() {
        return Err(format!("{} holds no samples", perf_data.display()));
    }
    // The agent's mapping as perf names it; --agent reads another copy of the same build
    // (perf names the path the binary had when it was recorded).
    let dso = samples
        .iter()
        .flat_map(|sample| &sample.frames)
        .map(|frame| frame.dso.as_str())
        .find(|dso| Path::new(dso).file_name() == Some("imds-agent".as_ref()))
        .ok_or_else(|| format!("no sample of {} is in imds-agent", perf_data.display()))?
        .to_string();
    let binary = agent.map_or_else(|| PathBuf::from(&dso), Path::to_path_buf);
    let elf = std::fs::read(&binary).map_err(|e| format!("{}: {e}", binary.display()))?;
    let to_vaddr = file_offsets_to_addresses(&elf)
        .map_err(|e| format!("{}: not an ELF file: {e}", binary.display()))?;
    let offsets: BTreeSet<u64> = samples
        .iter()
        .flat_map(|sample| lookup_addresses(sample, &dso))
        .collect();
    let addresses: BTreeSet<u64> = offsets
        .iter()
        .filter_map(|&offset| to_vaddr(offset))
        .collect();
    let mut resolved = addr2line(&binary, &addresses)?;
    // One offset per address (a segment maps its file range one to one).
    let by_offset: HashMap<u64, Vec<Location>> = offsets
        .into_iter()
        .filter_map(|offset| Some((offset, resolved.remove(&to_vaddr(offset)?)?)))
        .collect();
    let table = attribute(&samples, &dso, &by_offset);
    if table.rows.iter().all(|row| row.line.is_none()) {
        return Err(format!(
            "no address of {} resolves to a line of imds-agent/src: the recorded build has no \
             line tables (build it with CARGO_PROFILE_RELEASE_DEBUG=line-tables-only, record \
             again, and pass it with --agent if it has moved)",
            binary.display()
        ));
    }
    print!("{}", table.render(top, &binary));
    Ok(())
}

/// perf script's text (`-F comm,tid,period,ip,sym,dso` with call chains): a header line per
/// sample, its frames indented below it, a blank line after.
fn parse_script(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut current: Option<Sample> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            samples.extend(current.take());
        } else if !line.starts_with([' ', '\t']) {
            samples.extend(current.take());
            // "comm tid period": comm may hold spaces, the period is the last field.
            let period = line
                .split_whitespace()
                .last()
                .and_then(|field| field.parse().ok())
                .unwrap_or(1);
            current = Some(Sample {
                period,
                frames: Vec::new(),
            });
        } else if let Some(sample) = &mut current
            && let Some(frame) = parse_frame(line.trim())
        {
            sample.frames.push(frame);
        }
    }
    samples.extend(current);
    samples
}

/// "a75403 hashbrown::raw::RawTable<T,A>::reserve_rehash (/path/imds-agent)".
fn parse_frame(line: &str) -> Option<Frame> {
    let (address, rest) = line.split_once(char::is_whitespace)?;
    let address = u64::from_str_radix(address, 16).ok()?;
    let rest = rest.trim();
    let (symbol, dso) = rest.strip_suffix(')')?.rsplit_once(" (")?;
    Some(Frame {
        address,
        symbol: symbol.to_string(),
        dso: dso.to_string(),
    })
}

/// The offsets of a sample's frames in the agent's file to look up: where it was for the
/// innermost frame, a return address minus one for the others (the call, not what follows it).
fn lookup_addresses<'a>(sample: &'a Sample, dso: &'a str) -> impl Iterator<Item = u64> + 'a {
    sample
        .frames
        .iter()
        .enumerate()
        .filter(move |(_, frame)| frame.dso == dso)
        .map(|(depth, frame)| frame.address - u64::from(depth > 0 && frame.address > 0))
}

/// perf prints offsets into the file; the line tables hold virtual addresses. A loaded
/// segment maps one onto the other.
fn file_offsets_to_addresses(elf: &[u8]) -> object::Result<impl Fn(u64) -> Option<u64>> {
    let file = object::File::parse(elf)?;
    let segments: Vec<(u64, u64, u64)> = file
        .segments()
        .map(|segment| {
            let (offset, size) = segment.file_range();
            (offset, offset + size, segment.address())
        })
        .collect();
    Ok(move |offset: u64| {
        segments
            .iter()
            .find(|(start, end, _)| (*start..*end).contains(&offset))
            .map(|(start, _, address)| offset - start + address)
    })
}

/// Every address's source locations, innermost first, from one llvm-addr2line run.
fn addr2line(binary: &Path, addresses: &BTreeSet<u64>) -> Result<HashMap<u64, Vec<Location>>> {
    let tool = ["llvm-addr2line-22", "llvm-addr2line"]
        .into_iter()
        .find(|tool| {
            std::process::Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        })
        .ok_or("llvm-addr2line is not installed (cargo xtask setup installs llvm-22)")?;
    let mut child = std::process::Command::new(tool)
        .args(["--inlining", "--output-style=JSON", "--exe"])
        .arg(binary)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{tool}: {e}"))?;
    let input: String = addresses.iter().map(|a| format!("{a:#x}\n")).collect();
    let mut stdin = child.stdin.take().ok_or("llvm-addr2line's stdin")?;
    // Written from a thread: the answers fill the pipe back while the questions are written.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child
        .wait_with_output()
        .map_err(|e| format!("{tool}: {e}"))?;
    writer
        .join()
        .map_err(|_| "llvm-addr2line's writer panicked")?
        .map_err(|e| format!("{tool}: {e}"))?;
    if !output.status.success() {
        return Err(format!("{tool} failed: {}", output.status));
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(parse_addr2line)
        .collect()
}

/// One line of llvm-addr2line's JSON: {"Address":"0x..","Symbol":[{"FileName":..,"Line":..}]}.
fn parse_addr2line(line: &str) -> Result<(u64, Vec<Location>)> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("llvm-addr2line's {line:?}: {e}"))?;
    let address = value["Address"]
        .as_str()
        .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .ok_or_else(|| format!("llvm-addr2line's {line:?}: no Address"))?;
    let locations = value["Symbol"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|symbol| {
            Some(Location {
                file: symbol["FileName"].as_str()?.to_string(),
                line: symbol["Line"].as_u64()?,
            })
        })
        .collect();
    Ok((address, locations))
}

/// The samples by the agent source line they are in.
struct Table {
    rows: Vec<Row>,
    total: u64,
    user: u64,
}

struct Row {
    /// "proxy/accept.rs:384"; None for samples with no line of the agent's in their chain.
    line: Option<String>,
    total: u64,
    user: u64,
    /// The innermost symbols of its samples in user space, by weight.
    leaves: Vec<(String, u64)>,
}

fn attribute(samples: &[Sample], dso: &str, lines: &HashMap<u64, Vec<Location>>) -> Table {
    let mut rows: HashMap<Option<String>, Row> = HashMap::new();
    let (mut total, mut user) = (0, 0);
    for sample in samples {
        let Some(leaf) = sample.frames.first() else {
            continue;
        };
        // Kernel addresses (the kernel's and its modules', which perf names by module) are
        // in the upper half; perf prints a user-space frame as an offset in its file.
        let in_user = leaf.address < KERNEL_START;
        let line = lookup_addresses(sample, dso)
            .filter_map(|offset| lines.get(&offset))
            .flatten()
            .find_map(|location| {
                let (_, path) = location.file.split_once(AGENT_SOURCE)?;
                Some(format!("{path}:{}", location.line))
            });
        let row = rows.entry(line.clone()).or_insert_with(|| Row {
            line,
            total: 0,
            user: 0,
            leaves: Vec::new(),
        });
        row.total += sample.period;
        total += sample.period;
        if in_user {
            row.user += sample.period;
            user += sample.period;
            match row.leaves.iter_mut().find(|(s, _)| *s == leaf.symbol) {
                Some((_, weight)) => *weight += sample.period,
                None => row.leaves.push((leaf.symbol.clone(), sample.period)),
            }
        }
    }
    let mut rows: Vec<Row> = rows.into_values().collect();
    for row in &mut rows {
        row.leaves
            .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    }
    rows.sort_by(|a, b| {
        (b.user, b.total)
            .cmp(&(a.user, a.total))
            .then_with(|| a.line.cmp(&b.line))
    });
    Table { rows, total, user }
}

impl Table {
    fn render(&self, top: usize, binary: &Path) -> String {
        let percent = |part: u64, whole: u64| 100.0 * part as f64 / whole.max(1) as f64;
        let mut out = format!(
            "{}: the samples by the line of imds-agent/src they are in (the innermost such \
             frame; all = with the kernel work under it, user = in user space)\n\
             user space: {:.1}% of all\n\n  all%  user%  line\n",
            binary.display(),
            percent(self.user, self.total),
        );
        for row in self.rows.iter().take(top) {
            let leaves: Vec<String> = row
                .leaves
                .iter()
                .take(3)
                .map(|(symbol, weight)| {
                    let symbol: String = symbol.chars().take(60).collect();
                    format!("{symbol} {:.0}%", percent(*weight, row.user))
                })
                .collect();
            let _ = writeln!(
                out,
                "{:6.1} {:6.1}  {:<32} {}",
                percent(row.total, self.total),
                percent(row.user, self.user),
                row.line.as_deref().unwrap_or("(no line of the agent's)"),
                leaves.join("; "),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "/build/target/release/imds-agent";

    fn script() -> String {
        format!(
            "imds-serve-1 23382     250000 \n\
             \t          a75403 hashbrown::raw::RawTable<T,A>::reserve_rehash ({AGENT})\n\
             \t          a04bf9 imds_agent::proxy::pipeline::handle::{{{{closure}}}} ({AGENT})\n\
             \n\
             imds serve 2 23383     100000 \n\
             \tffffffff81234567 tcp_sendmsg+0x17 ([kernel.kallsyms])\n\
             \t          a04c00 imds_agent::proxy::forward::exchange ({AGENT})\n\
             \t            1234 __libc_start_main (/usr/lib/x86_64-linux-gnu/libc.so.6)\n\
             \n\
             imds-serve-1 23382     50000 \n\
             \t          777777 memcpy (/usr/lib/x86_64-linux-gnu/libc.so.6)\n\
             \n\
             imds-serve-1 23382     20000 \n\
             \tffffffffc0a01234 nft_do_chain+0x54 ([nf_tables])\n\
             \t          a04c00 imds_agent::proxy::forward::exchange ({AGENT})\n\
             \n"
        )
    }

    #[test]
    fn perf_script_parses_into_samples_with_their_frames() {
        let samples = parse_script(&script());
        assert_eq!(samples.len(), 4);
        assert_eq!(samples[0].period, 250_000);
        assert_eq!(samples[1].period, 100_000, "a comm with a space");
        assert_eq!(
            samples[0].frames[0],
            Frame {
                address: 0xa75403,
                symbol: "hashbrown::raw::RawTable<T,A>::reserve_rehash".into(),
                dso: AGENT.into(),
            }
        );
        assert_eq!(samples[1].frames[0].dso, "[kernel.kallsyms]");
        assert_eq!(samples[1].frames.len(), 3);
    }

    #[test]
    fn return_addresses_are_looked_up_one_byte_back_and_other_files_not_at_all() {
        let samples = parse_script(&script());
        let first: Vec<u64> = lookup_addresses(&samples[0], AGENT).collect();
        assert_eq!(first, [0xa75403, 0xa04bf8]);
        let second: Vec<u64> = lookup_addresses(&samples[1], AGENT).collect();
        assert_eq!(
            second,
            [0xa04bff],
            "kernel and libc frames are not the agent's"
        );
    }

    fn location(file: &str, line: u64) -> Location {
        Location {
            file: file.into(),
            line,
        }
    }

    #[test]
    fn each_sample_goes_to_its_innermost_agent_line_with_its_weight() {
        let samples = parse_script(&script());
        let lines = HashMap::from([
            // The leaf is inlined library code: the agent's line is the next level out.
            (
                0xa75403,
                vec![
                    location("/cargo/hashbrown/src/raw.rs", 10),
                    location("/build/imds-agent/src/proxy/limits.rs", 42),
                ],
            ),
            (
                0xa04bf8,
                vec![location("/build/imds-agent/src/proxy/pipeline.rs", 7)],
            ),
            (
                0xa04bff,
                vec![location("/build/imds-agent/src/proxy/forward.rs", 294)],
            ),
        ]);
        let table = attribute(&samples, AGENT, &lines);
        assert_eq!(table.total, 420_000);
        assert_eq!(
            table.user, 300_000,
            "the kernel's samples are not user space, a kernel module's included"
        );
        let rows: Vec<(Option<&str>, u64, u64)> = table
            .rows
            .iter()
            .map(|row| (row.line.as_deref(), row.total, row.user))
            .collect();
        assert_eq!(
            rows,
            [
                (Some("proxy/limits.rs:42"), 250_000, 250_000),
                (None, 50_000, 50_000),
                (Some("proxy/forward.rs:294"), 120_000, 0),
            ]
        );
        assert_eq!(
            table.rows[0].leaves,
            [(
                "hashbrown::raw::RawTable<T,A>::reserve_rehash".to_string(),
                250_000
            )]
        );
        let text = table.render(10, Path::new(AGENT));
        assert!(text.contains("  59.5   83.3  proxy/limits.rs:42"), "{text}");
        assert!(text.contains("(no line of the agent's)"), "{text}");
    }

    #[test]
    fn addr2line_json_gives_the_locations_innermost_first() {
        let (address, locations) = parse_addr2line(
            r#"{"Address":"0x349573","ModuleName":"x","Symbol":[{"FileName":"/a/imds-agent/src/x.rs","Line":249,"FunctionName":"f"},{"FileName":"/b.rs","Line":3,"FunctionName":"g"}]}"#,
        )
        .unwrap();
        assert_eq!(address, 0x349573);
        assert_eq!(
            locations,
            [
                location("/a/imds-agent/src/x.rs", 249),
                location("/b.rs", 3)
            ]
        );
        assert!(parse_addr2line("not json").is_err());
    }

    #[test]
    fn file_offsets_map_onto_addresses_through_the_loaded_segments() {
        // This test binary: a segment loaded at an address other than its file offset.
        let elf = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let to_vaddr = file_offsets_to_addresses(&elf).unwrap();
        let file = object::File::parse(&*elf).unwrap();
        let executable = file
            .segments()
            .find(|segment| segment.address() != segment.file_range().0)
            .expect("a loaded segment placed apart from its file offset");
        let (offset, size) = executable.file_range();
        assert!(size > 0);
        assert_eq!(to_vaddr(offset + 1), Some(executable.address() + 1));
        assert_eq!(to_vaddr(u64::MAX), None);
        assert!(file_offsets_to_addresses(b"not an ELF file").is_err());
    }
}
