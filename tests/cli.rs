//! The binary as a user meets it: the README's main command, the JSON contract, exit
//! codes and messages for bad input, and the converter on the real Lingjun trace.

use std::path::PathBuf;
use std::process::{Command, Output};

fn topoplace(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_topoplace")).args(args).output().expect("binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `plan --cluster CLUSTER --workload WORKLOAD -o json`, which must succeed, as JSON.
fn plan_json(cluster: &std::path::Path, workload: &std::path::Path) -> serde_json::Value {
    let output = topoplace(&[
        "plan",
        "--cluster",
        cluster.to_str().expect("utf-8"),
        "--workload",
        workload.to_str().expect("utf-8"),
        "-o",
        "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    serde_json::from_str(&stdout(&output)).expect("JSON")
}

fn testdata(path: &str) -> String {
    format!("{}/testdata/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("topoplace-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write temp file");
    path
}

/// The shared traces, or `None` (a skip) outside CI when they are not beside the checkout.
fn trace(path: &str) -> Option<PathBuf> {
    let full = topoplace_formats::convert::traces_dir().join(path);
    if full.exists() {
        return Some(full);
    }
    assert!(std::env::var_os("CI").is_none(), "CI must have the shared traces at {}", full.display());
    eprintln!("skipped: {} not found (set TOPOPLACE_TRACES)", full.display());
    None
}

#[test]
fn plan_without_arguments_plans_the_demo() {
    let output = topoplace(&["plan"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.starts_with("cluster demo (88 GPUs), workload demo: 7 of 8 gangs placed"), "{text}");
    assert!(text.contains("llama-3.1-405b") && text.contains("NOT PLACED"), "{text}");
}

#[test]
fn json_output_keeps_its_contract() {
    let output = topoplace(&["plan", "-o", "json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    let placements = json["placements"].as_array().expect("placements[]");
    assert_eq!(placements.len(), 7);
    let big = placements.iter().find(|p| p["gang"] == "llama-3.1-405b").expect("405b placed");
    let members = big["members"].as_array().expect("members[]");
    assert_eq!(members.len(), 2);
    for (index, member) in members.iter().enumerate() {
        assert_eq!(member["member"], index);
        assert!(member["node"].as_str().is_some_and(|n| n.starts_with("h200-")));
        assert_eq!(member["gpus"].as_array().map(Vec::len), Some(8));
    }
    let unplaced = json["unplaced"].as_array().expect("unplaced[]");
    assert_eq!(unplaced[0]["gang"], "llama-3.1-70b-1");
    assert!(unplaced[0]["reason"].as_str().is_some_and(|r| r.contains("46.9 GiB")));

    let yaml = topoplace(&["plan", "-o", "yaml"]);
    let parsed: serde_yaml_ng::Value = serde_yaml_ng::from_str(&stdout(&yaml)).expect("YAML");
    assert_eq!(parsed["placements"].as_sequence().map(Vec::len), Some(7));
}

#[test]
fn explain_shows_rejections_and_the_runner_up() {
    let output = topoplace(&["plan", "--explain"]);
    let text = stdout(&output);
    assert!(text.contains("runner-up: host dgx1-1"), "{text}");
    // The TP-4 gang may run over PCIe on the L40S hosts: they are scored candidates that
    // lose to the NVLinked V100 on connectivity, not rejected hosts.
    assert!(text.contains("#3 host l40s-0 (+3 equivalent hosts)"), "{text}");
    assert!(!text.contains("L40S: NVLink cannot"), "{text}");
}

/// The reported input: four 8-GPU hosts with 5, 2, 7 and 8 free GPUs. A 1-GPU pod scores the
/// three partly used hosts the same (9.00); it goes to the host with 2 free, and the
/// explanation shows the packs that decided.
#[test]
fn plan_breaks_equal_scores_by_packing_and_says_so() {
    let cluster = temp_file(
        "ties-cluster.yaml",
        "apiVersion: topoplace.io/v1alpha1\nkind: Cluster\nmetadata: {name: ties}\nspec:\n  nodes:\n  \
         - {name: a, gpu: {product: H100, count: 8}, allocated: [0, 1, 2]}\n  \
         - {name: b, gpu: {product: H100, count: 8}, allocated: [0, 1, 2, 3, 4, 5]}\n  \
         - {name: c, gpu: {product: H100, count: 8}, allocated: [0]}\n  \
         - {name: d, gpu: {product: H100, count: 8}}\n",
    );
    let workload = temp_file(
        "ties-workload.yaml",
        "apiVersion: topoplace.io/v1alpha1\nkind: Workload\nmetadata: {name: w}\nspec:\n  gangs:\n  - {name: pod1, gpusPerMember: 1}\n",
    );
    let output = topoplace(&[
        "plan",
        "--cluster",
        cluster.to_str().expect("utf-8"),
        "--workload",
        workload.to_str().expect("utf-8"),
        "--explain",
    ]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}{}", stderr(&output));
    assert!(text.contains("b:6"), "{text}");
    assert!(text.contains("runner-up: host a on a"), "{text}");
    assert!(text.contains("#1 host b: total 9.000") && text.contains("leaves 1 GPU(s) free on its hosts"), "{text}");
    assert!(
        text.contains("ties go to the tighter pack, then the candidate order; the runner-up leaves 4 GPU(s) free"),
        "{text}"
    );
}

#[test]
fn replay_generate_writes_a_trace_of_the_mix_that_replay_jobs_reads() {
    let source = temp_file(
        "gen-source.csv",
        "job_id,submission_time,duration,num_gpu\na,0,100,1\nb,10,200,8\nc,30,50,1\nd,60,400,16\n",
    );
    let out = std::env::temp_dir().join(format!("topoplace-cli-{}/generated.csv", std::process::id()));
    let (source, out_path) = (source.to_str().expect("utf-8"), out.to_str().expect("utf-8"));
    let args =
        ["replay", "generate", "--mix", "1=3,8=1", "--count", "400", "--seed", "5", "--from", source, "-o", out_path];
    let output = topoplace(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).starts_with("generated 400 jobs (1 GPU: "), "{}", stdout(&output));
    let text = std::fs::read_to_string(&out).expect("written");
    let rows: Vec<Vec<&str>> = text.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 400);
    let ones = rows.iter().filter(|r| r[3] == "1").count();
    assert!((240..=360).contains(&ones), "about 3 in 4 jobs of 1 GPU: {ones}");
    assert!(rows.iter().all(|r| matches!((r[3], r[2]), ("1", "100" | "50") | ("8", "200"))), "durations of that size");
    // The same seed writes the same file; `replay jobs` reads it.
    assert!(topoplace(&args).status.success());
    assert_eq!(std::fs::read_to_string(&out).expect("written"), text);
    let replay = topoplace(&["replay", "jobs", "--jobs", out_path, "--policy", "first-fit", "-o", "csv"]);
    if trace("lingjun-2023/topo.csv").is_some() {
        assert!(replay.status.success(), "{}", stderr(&replay));
    }
    let bad = topoplace(&["replay", "generate", "--mix", "1=78,2", "--from", source]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("--mix: mix entry `2`: not GPUS=WEIGHT"), "{}", stderr(&bad));
    let bad = topoplace(&["replay", "generate", "--mix", "1=1", "--offered-gpus", "0", "--from", source]);
    assert!(
        stderr(&bad).contains("--offered-gpus: offered GPUs: 0 is not a number in 0.001..=10000000"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn replay_generate_pods_writes_a_share_variant_that_replay_pods_reads() {
    let source = temp_file(
        "gen-pods-source.csv",
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\ncpu,8000,1024,0,0,\nhalf,4000,1024,1,500,T4\n\
         one,8000,1024,1,1000,\neight,64000,2048,8,1000,\n",
    );
    let nodes = temp_file("gen-pods-nodes.csv", "sn,cpu_milli,memory_mib,gpu,model\nn0,96000,262144,8,T4\n");
    let out = std::env::temp_dir().join(format!("topoplace-cli-{}/generated-pods.csv", std::process::id()));
    let (source, nodes, out_path) =
        (source.to_str().expect("utf-8"), nodes.to_str().expect("utf-8"), out.to_str().expect("utf-8"));
    let args = ["replay", "generate-pods", "--share-pct", "100", "--count", "300", "--from", source, "-o", out_path];
    let output = topoplace(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("sharing pods ask for 100.0 % of the GPU request"), "{}", stdout(&output));
    let text = std::fs::read_to_string(&out).expect("written");
    let rows: Vec<Vec<&str>> = text.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 300);
    // Every GPU pod is the 500 share, with its own CPU and accepted model; the rest are CPU-only.
    assert!(rows.iter().all(|r| r[3..] == ["1", "500", "T4"] || r[3..] == ["0", "0", ""]), "{text}");
    assert!(rows.iter().any(|r| r[3] == "0") && rows.iter().any(|r| r[3] == "1"));
    assert!(topoplace(&args).status.success());
    assert_eq!(std::fs::read_to_string(&out).expect("written"), text, "the same seed writes the same file");
    let replay = topoplace(&["replay", "pods", "--nodes", nodes, "--pods", out_path, "--policy", "fgd,topoplace"]);
    assert!(replay.status.success(), "{}", stderr(&replay));
    let bad = topoplace(&["replay", "generate-pods", "--share-pct", "101", "--from", source]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("--share-pct: share of GPU request 101 is not a number in 0..=100"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn bad_input_exits_2_naming_file_line_and_field() {
    let cluster = temp_file(
        "bad-cluster.yaml",
        "apiVersion: topoplace.io/v1alpha1\nkind: Cluster\nspec:\n  nodes:\n  - name: a\n    gpu: {product: H100, count: 8, nvlnk: all}\n",
    );
    let output = topoplace(&["plan", "--cluster", cluster.to_str().expect("utf-8")]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("bad-cluster.yaml:6:")
            && message.contains("unknown field `nvlnk`")
            && message.contains("(node `a`)"),
        "{message}"
    );

    let workload = temp_file(
        "bad-workload.yaml",
        "apiVersion: topoplace.io/v1alpha1\nkind: Workload\nspec:\n  gangs:\n  - name: w\n    gpusPerMember: 8\n    topology: {required: row}\n",
    );
    let output = topoplace(&["plan", "--workload", workload.to_str().expect("utf-8")]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("gang `w`: topology.required is `row`"), "{}", stderr(&output));

    let output = topoplace(&["plan", "--cluster", "/nonexistent/cluster.yaml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("/nonexistent/cluster.yaml: cannot read"), "{}", stderr(&output));

    let output = topoplace(&["plan", "--weights", "locality=x"]);
    assert_eq!(output.status.code(), Some(2));

    // Names are the caller's: a padding too wide for a format width is refused, and a name
    // longer than one is printed in the table all the same (it used to panic).
    let wide = temp_file(
        "wide-pattern.yaml",
        "apiVersion: topoplace.io/v1alpha1\nkind: Cluster\nspec:\n  nodeGroups:\n  - namePattern: \"n{index:070000}\"\n    count: 1\n    gpu: {product: H100, count: 8}\n",
    );
    let output = topoplace(&["plan", "--cluster", wide.to_str().expect("utf-8")]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("N at most 253"), "{}", stderr(&output));
    let name = "n".repeat(70_000);
    let long = temp_file(
        "long-node.yaml",
        &format!("apiVersion: topoplace.io/v1alpha1\nkind: Cluster\nspec:\n  nodes:\n  - name: {name}\n    gpu: {{product: H100, count: 8}}\n"),
    );
    let one = temp_file(
        "one-gpu.yaml",
        "apiVersion: topoplace.io/v1alpha1\nkind: Workload\nspec:\n  gangs:\n  - name: one\n    gpusPerMember: 1\n",
    );
    let output =
        topoplace(&["plan", "--cluster", long.to_str().expect("utf-8"), "--workload", one.to_str().expect("utf-8")]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains(&name));
    // A gang's name, and the replicas of a whole workload, have limits of their own.
    // `plan` on a workload of these gangs exits 2; its stderr.
    let refused = |file: &str, gangs: &str| {
        let path =
            temp_file(file, &format!("apiVersion: topoplace.io/v1alpha1\nkind: Workload\nspec:\n  gangs:\n{gangs}"));
        let output = topoplace(&["plan", "--workload", path.to_str().expect("utf-8")]);
        assert_eq!(output.status.code(), Some(2));
        stderr(&output)
    };
    let gang = "g".repeat(70_000);
    let error = refused("long-gang.yaml", &format!("  - name: {gang}\n    gpusPerMember: 1\n"));
    assert!(error.contains("70000 bytes, above the limit of 384"), "{error}");
    let many: String = (0..3).map(|i| format!("  - name: g{i}\n    replicas: 10000\n    gpusPerMember: 1\n")).collect();
    let error = refused("many-replicas.yaml", &many);
    assert!(error.contains("above the limit of 20000"), "{error}");
}

#[test]
fn a_workload_with_roles_plans_each_replica_whole_and_says_where() {
    let workload = testdata("workloads/roles.yaml");
    let output = topoplace(&["plan", "--workload", &workload, "-o", "json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(json["summary"]["placed"], 3);
    let placements = json["placements"].as_array().expect("placements[]");
    let rows = |gang: &str| placements.iter().filter(|p| p["gang"] == gang).collect::<Vec<_>>();
    // Prefill and decode share one leaf, the replica's region.
    let pd = rows("llama-70b-pd");
    let roles: Vec<&str> = pd.iter().filter_map(|p| p["role"].as_str()).collect();
    assert_eq!(roles.len(), 2, "{pd:?}");
    assert!(roles.contains(&"prefill") && roles.contains(&"decode"));
    assert!(pd.iter().all(|p| p["region"] == "leaf s1/r1"), "{pd:?}");
    // The finetune job's two slices are rows with their slice index; members 0-3 in all.
    let slices: Vec<u64> = rows("finetune").iter().filter_map(|p| p["slice"].as_u64()).collect();
    assert_eq!(slices, [0, 1]);
    let members: Vec<u64> = rows("finetune")
        .iter()
        .flat_map(|p| p["members"].as_array().expect("members").iter().filter_map(|m| m["member"].as_u64()))
        .collect();
    assert_eq!(members, [0, 1, 2, 3]);
    // The CPU-only leader is named as left to kube-scheduler.
    let replicas = json["replicas"].as_array().expect("replicas[]");
    let lws = replicas.iter().find(|r| r["gang"] == "lws-405b").expect("lws-405b");
    assert_eq!(lws["rolesWithoutGpus"], serde_json::json!(["leader"]));

    let table = stdout(&topoplace(&["plan", "--workload", &workload]));
    assert!(table.contains("llama-70b-pd/prefill") && table.contains("finetune/workers[1]"), "{table}");
    assert!(table.contains("left to kube-scheduler (no GPUs): leader"), "{table}");

    // With the exact solver, each replica is the exact model's placement, whole.
    let output = topoplace(&["plan", "--workload", &workload, "--solver", "exact", "-o", "json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(json["summary"]["placed"], 3, "{json}");
    let solvers: Vec<&str> = json["replicas"]
        .as_array()
        .expect("replicas[]")
        .iter()
        .filter_map(|r| r["solver"]["solver"].as_str())
        .collect();
    assert_eq!(solvers, ["exact/microlp"; 3], "{json}");
    let table = stdout(&topoplace(&["plan", "--workload", &workload, "--solver", "exact"]));
    assert!(table.contains("exact/microlp (model objective ") && table.contains("gap 0.00%)"), "{table}");
}

#[test]
fn the_readme_roles_example_places_whole_on_the_demo_cluster() {
    let readme = std::fs::read_to_string(format!("{}/docs/file-formats.md", env!("CARGO_MANIFEST_DIR")))
        .expect("docs/file-formats.md");
    let start = readme.find("  - name: llama-70b-pd\n    replicas: 2").expect("the file-format doc's roles example");
    let end = start + readme[start..].find("```").expect("the example's closing fence");
    let text = format!(
        "apiVersion: topoplace.io/v1alpha1\nkind: Workload\nmetadata: {{name: readme}}\nspec:\n  gangs:\n{}",
        &readme[start..end]
    );
    let path = temp_file("readme-roles.yaml", &text);
    let output = topoplace(&["plan", "--workload", &path.display().to_string(), "-o", "json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!((json["summary"]["placed"].as_u64(), json["summary"]["gangs"].as_u64()), (Some(3), Some(3)), "{json}");
}

#[test]
fn every_testdata_file_plans() {
    for cluster in ["demo.yaml", "mixed-memory.yaml", "dgx1-v100.yaml", "gb200-nvl72.yaml", "lingjun.yaml"] {
        let output = topoplace(&["plan", "--cluster", &testdata(&format!("clusters/{cluster}")), "-o", "json"]);
        assert!(output.status.success(), "{cluster}: {}", stderr(&output));
    }
}

#[test]
fn sizing_says_which_products_hold_a_model() {
    let output = topoplace(&["plan", "--size-model", "405B", "--dtype", "fp8", "--kv-cache", "60Gi", "-o", "json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    let rows = json["products"].as_array().expect("products[]");
    let h200 = rows.iter().find(|r| r["product"] == "H200").expect("H200 row");
    // (405 GB + 64.4 GB) x 1.1 = 516 GB: 4 H200s of 141 GB.
    assert_eq!(h200["min_gpus"], 4);
    let l40s = rows.iter().find(|r| r["product"] == "L40S").expect("L40S row");
    // 11 GPUs of 45 GiB: TP 4 inside each 4-GPU host, over PCIe, and 3 pipeline stages.
    assert_eq!(
        (l40s["min_gpus"].as_u64(), l40s["tensor_parallel"].as_u64(), l40s["pipeline_parallel"].as_u64()),
        (Some(11), Some(4), Some(3))
    );
    assert_eq!(l40s["note"], "L40S has no NVLink: tensor parallelism over PCIe; spans 3 hosts per replica");
    let h100 = rows.iter().find(|r| r["product"] == "H100-SXM5").expect("H100 row");
    assert_eq!((h100["min_gpus"].as_u64(), h100["tensor_parallel"].as_u64()), (Some(7), Some(8)));
}

#[test]
fn the_lingjun_cluster_file_is_the_converter_output_of_the_real_trace() {
    let Some(topo) = trace("lingjun-2023/topo.csv") else { return };
    let output = topoplace(&["convert", "lingjun", topo.to_str().expect("utf-8")]);
    assert!(output.status.success(), "{}", stderr(&output));
    let committed = std::fs::read_to_string(testdata("clusters/lingjun.yaml")).expect("committed file");
    assert_eq!(
        stdout(&output),
        committed,
        "regenerate with `topoplace convert lingjun ../shared/traces/lingjun-2023/topo.csv`"
    );
    let cluster = topoplace_formats::files::cluster::load("lingjun.yaml", &committed).expect("loads");
    assert_eq!(cluster.hosts.len(), 847);
    assert_eq!(cluster.domains[2].len(), 119, "racks are (PSW, ASW) pairs");
    assert_eq!(cluster.domains[1].len(), 3);
    assert_eq!(cluster.total_gpus(), 847 * 8);
}

#[test]
fn solvers_are_chosen_on_the_command_line_and_reported() {
    let exact = topoplace(&["plan", "--solver", "exact", "-o", "json"]);
    assert!(exact.status.success(), "{}", stderr(&exact));
    let json: serde_json::Value = serde_json::from_str(&stdout(&exact)).expect("JSON");
    assert_eq!(json["solver"], "exact");
    assert!(json["batchNote"].as_str().is_some_and(|n| n.contains("planned jointly")), "{}", json["batchNote"]);
    let placements = json["placements"].as_array().expect("placements[]");
    assert_eq!(placements.len(), 7, "the joint plan places as many gangs as greedy on the demo");
    assert!(placements.iter().all(|p| p["solver"]["solver"] == "exact-joint/microlp"));

    let auto = topoplace(&["plan", "--solver", "auto", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&auto)).expect("JSON");
    for placement in json["placements"].as_array().expect("placements[]") {
        let solver = &placement["solver"];
        if solver["solver"] == "exact/microlp" {
            assert_eq!(solver["gap"], 0.0);
            let (bound, objective) = (solver["bound"].as_f64(), solver["objective"].as_f64());
            assert!(
                bound.zip(objective).is_some_and(|(b, o)| (b - o).abs() <= 1e-9 * o.abs().max(1.0)),
                "bound {bound:?} and objective {objective:?} agree to rounding"
            );
        }
    }

    let bad = topoplace(&["plan", "--solver", "exact", "--backend", "cplex"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("unknown MILP backend `cplex`"), "{}", stderr(&bad));
}

const REPLAY_NODES: &str = "sn,cpu_milli,memory_mib,gpu,model\n\
                            n0,64000,262144,8,G2\nn1,32000,131072,2,T4\nn2,96000,262144,4,V100M16\n";
const REPLAY_PODS: &str = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n\
                           p0,8000,16384,1,500,\np1,4000,8192,1,1000,\np2,16000,32768,2,1000,V100M16|G2\n\
                           p3,2000,4096,0,0,\np4,6000,8192,1,250,T4\np5,12000,16384,4,1000,\n";

#[test]
fn replay_writes_one_csv_row_per_policy_seed_and_percent_and_an_svg() {
    let nodes = temp_file("replay-nodes.csv", REPLAY_NODES);
    let pods = temp_file("replay-pods.csv", REPLAY_PODS);
    let svg = std::env::temp_dir().join(format!("topoplace-replay-{}.svg", std::process::id()));
    let args = [
        "replay",
        "--nodes",
        nodes.to_str().unwrap(),
        "--pods",
        pods.to_str().unwrap(),
        "--seeds",
        "3",
        "-o",
        "csv",
        "--svg",
        svg.to_str().unwrap(),
    ];
    let output = topoplace(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("policy,seed,arrived_pct,allocation_pct"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 7 * 3 * 131);
    assert!(rows.iter().all(|r| r.len() == 4));
    assert_eq!((rows[0][0], rows[0][1], rows[0][2]), ("random", "42", "0"));
    assert_eq!((rows[131 * 3][0], rows.last().unwrap()[1], rows.last().unwrap()[2]), ("dotproduct", "44", "130"));
    for row in &rows {
        if let Ok(value) = row[3].parse::<f64>() {
            assert!((0.0..=100.0).contains(&value), "{row:?}");
        }
    }
    // No pod leaves: per run, allocation never falls as load arrives.
    for run in rows.chunks(131) {
        let values: Vec<f64> = run.iter().filter_map(|r| r[3].parse().ok()).collect();
        assert!(values.len() > 20, "{run:?}");
        assert!(values.windows(2).all(|w| w[0] <= w[1]), "{run:?}");
    }
    let chart = std::fs::read_to_string(&svg).expect("svg written");
    assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
    assert_eq!(chart.matches("<polyline").count(), 2 * 7, "one line per policy in each panel");
    assert!(chart.contains("topoplace") && chart.contains("fgd"));

    let table = stdout(&topoplace(&args[..args.len() - 4]));
    for policy in ["random", "dotproduct", "gpuclustering", "gpupacking", "bestfit", "fgd", "topoplace"] {
        assert!(table.lines().any(|l| l.starts_with(policy)), "{policy} missing from:\n{table}");
    }
}

#[test]
fn replay_refuses_bad_input_with_exit_2() {
    let nodes = temp_file("replay-nodes-ok.csv", REPLAY_NODES);
    let pods = temp_file("replay-pods-ok.csv", REPLAY_PODS);
    let bad_pods = temp_file("replay-pods-bad.csv", "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np0,1,1,1,x\n");
    let cases: [(Vec<&str>, &str); 4] = [
        (vec!["--policy", "fgd,best"], "unknown policy `best` (expected one of random, dotproduct"),
        (vec!["--seeds", "0"], "--seeds must be at least 1"),
        (vec!["--ratio=-1"], "load ratio -1 must be a number above 0"),
        (
            vec!["--pods", bad_pods.to_str().unwrap()],
            "replay-pods-bad.csv:2: column `gpu_milli`: `x` is not a whole number",
        ),
    ];
    for (extra, message) in cases {
        let mut args = vec!["replay", "--nodes", nodes.to_str().unwrap()];
        if !extra.contains(&"--pods") {
            args.extend(["--pods", pods.to_str().unwrap()]);
        }
        args.extend(extra);
        let output = topoplace(&args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains(message), "{args:?}: {}", stderr(&output));
    }
}

const JOB_TOPOLOGY: &str = "ip,DSW,PSW,ASW\nh1,G1,P1,S1\nh2,G1,P1,S1\nh3,G1,P1,S2\nh4,G1,P1,S2\nh5,G1,P2,S1\n";
const JOBS: &str = "job_id,submission_time,duration,num_gpu\na,100,600,8\nb,110,300,16\nc,120,60,1\nd,130,900,16\n";

#[test]
fn job_replay_reports_every_policy_in_json_csv_and_svg() {
    let topology = temp_file("job-topo.csv", JOB_TOPOLOGY);
    let jobs = temp_file("jobs.csv", JOBS);
    let svg = std::env::temp_dir().join(format!("topoplace-jobs-{}.svg", std::process::id()));
    let base = ["replay", "--jobs", jobs.to_str().unwrap(), "--topology", topology.to_str().unwrap()];
    let mut args = base.to_vec();
    args.extend(["-o", "json", "--svg", svg.to_str().unwrap(), "--queue", "best-effort-fifo"]);
    let output = topoplace(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    let results = report["results"].as_array().expect("results[]");
    let policies: Vec<&str> = results.iter().filter_map(|r| r["policy"].as_str()).collect();
    assert_eq!(policies, ["topoplace", "kueue-tas", "volcano-hypernode", "bestfit-nodes", "first-fit", "random"]);
    for result in results {
        for field in ["jobs", "multi_host_jobs", "multi_host_in_one_rack", "mean_queue_delay_s", "p95_queue_delay_s"] {
            assert!(result[field].is_number(), "{field} in {result}");
        }
        assert_eq!(result["jobs"], 4);
        assert_eq!(result["multi_host_jobs"], 2);
        assert!(result["gpu_utilisation"].as_f64().is_some_and(|u| u > 0.0 && u <= 1.0));
    }
    assert_eq!(results[0]["multi_host_in_one_rack"], 2, "topoplace puts both 2-host gangs in a rack");
    assert_eq!(results[0]["multi_host_spans_avoidable"], 0);
    assert!(results.iter().all(|r| r["span_spare_hosts_mean"].is_number()));
    let chart = std::fs::read_to_string(&svg).expect("svg written");
    assert!(chart.starts_with("<svg") && chart.contains("kueue-tas") && chart.trim_end().ends_with("</svg>"));

    let mut args = base.to_vec();
    args.extend(["-o", "csv", "--policy", "first-fit,kueue-tas", "--drain", "G1/P1/S2@200"]);
    let output = topoplace(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("policy,jobs,started,multi_host_jobs,multi_host_in_one_rack"));
    assert!(lines[0].ends_with(",multi_host_spans_avoidable,span_spare_hosts_mean"), "{text}");
    assert!(lines[1].starts_with("first-fit,4,4,2,"), "{text}");
}

#[test]
fn job_replay_refuses_bad_input_with_exit_2() {
    let topology = temp_file("job-topo-ok.csv", JOB_TOPOLOGY);
    let jobs = temp_file("jobs-ok.csv", JOBS);
    let odd = temp_file("jobs-odd.csv", "job_id,submission_time,duration,num_gpu\nx,1,1,12\n");
    let bad = temp_file("jobs-bad.csv", "job_id,submission_time,duration,num_gpu\nx,1,soon,8\n");
    let cases: [(Vec<&str>, &str); 6] = [
        (vec!["--policy", "kueue"], "unknown job policy `kueue` (expected one of topoplace, kueue-tas"),
        (vec!["--drain", "G1/P9/S1@5"], "drain `G1/P9/S1`: no domain path or host of the cluster is called that"),
        (vec!["--drain", "G1/P1/S1"], "expected TARGET@SECONDS"),
        (vec!["--load", "0"], "load factor 0 must be a finite number above 0"),
        (vec!["--jobs", odd.to_str().unwrap()], "job `x` asks for 12 GPUs"),
        (vec!["--jobs", bad.to_str().unwrap()], "jobs-bad.csv:2: column `duration`: `soon` is not a whole number"),
    ];
    for (extra, message) in cases {
        let mut args = vec!["replay", "--topology", topology.to_str().unwrap()];
        if !extra.contains(&"--jobs") {
            args.extend(["--jobs", jobs.to_str().unwrap()]);
        }
        args.extend(extra);
        let output = topoplace(&args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains(message), "{args:?}: {}", stderr(&output));
    }
    let output = topoplace(&["replay", "--jobs", jobs.to_str().unwrap(), "--pods", "x.csv"]);
    assert_eq!(output.status.code(), Some(2), "--pods belongs to the other mode");
}

#[test]
fn replay_subcommands_give_what_the_older_spellings_give_and_keep_their_flags_apart() {
    let nodes = temp_file("replay-sub-nodes.csv", REPLAY_NODES);
    let pods = temp_file("replay-sub-pods.csv", REPLAY_PODS);
    let trace = ["--nodes", nodes.to_str().unwrap(), "--pods", pods.to_str().unwrap(), "--seeds", "2", "-o", "csv"];
    let legacy = topoplace(&[&["replay"][..], &trace[..]].concat());
    let pods_run = topoplace(&[&["replay", "pods"][..], &trace[..]].concat());
    assert!(pods_run.status.success(), "{}", stderr(&pods_run));
    assert_eq!(stdout(&pods_run), stdout(&legacy), "`replay pods` is `replay` without --jobs");
    assert_eq!(stdout(&pods_run).lines().count(), 1 + 7 * 2 * 131);

    let topology = temp_file("job-sub-topo.csv", JOB_TOPOLOGY);
    let jobs = temp_file("jobs-sub.csv", JOBS);
    let job_flags = ["--jobs", jobs.to_str().unwrap(), "--topology", topology.to_str().unwrap(), "-o", "csv"];
    let legacy = topoplace(&[&["replay"][..], &job_flags[..]].concat());
    let jobs_run = topoplace(&[&["replay", "jobs"][..], &job_flags[..]].concat());
    assert!(jobs_run.status.success(), "{}", stderr(&jobs_run));
    assert_eq!(stdout(&jobs_run), stdout(&legacy), "`replay jobs` is `replay --jobs`");
    assert_eq!(stdout(&jobs_run).lines().count(), 1 + 6);

    // Each subcommand has only its own flags, and the older spelling does not mix with them.
    for args in [
        vec!["replay", "jobs", "--jobs", jobs.to_str().unwrap(), "--pods", "x.csv"],
        vec!["replay", "pods", "--topology", topology.to_str().unwrap()],
        vec!["replay", "--seeds", "2", "pods"],
    ] {
        let output = topoplace(&args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains("error:"), "{args:?}: {}", stderr(&output));
    }
}

/// Issue 22's inputs: a TP-2 model on a cluster of L40S nodes (no NVLink) is placed, on one
/// socket; a node of a product the table lacks is planned from its memory, with a warning.
#[test]
fn tensor_parallelism_runs_over_pcie_and_unknown_products_are_planned() {
    let cluster = temp_file(
        "l40s.yaml",
        "apiVersion: topoplace.io/v1alpha1\nkind: Cluster\nmetadata: {name: l40s}\nspec:\n  levels: [rack]\n  nodeGroups:\n  - names: [l40s-0, l40s-1]\n    labels: {rack: r1}\n    gpu: {product: NVIDIA-L40S, count: 8}\n    allocated: [0, 1, 2]\n  - names: [new-0]\n    labels: {rack: r1}\n    gpu: {product: NVIDIA-RTX-PRO-6000-CLI-Test, count: 4, memory: 97887}\n",
    );
    let workload = temp_file(
        "tp2.yaml",
        "apiVersion: topoplace.io/v1alpha1\nkind: Workload\nmetadata: {name: tp2}\nspec:\n  gangs:\n  - name: qwen-32b\n    gpusPerMember: 2\n    tensorParallel: 2\n    model: {parameters: 32B, dtype: bf16, kvCache: 8Gi}\n  - name: big-memory\n    gpusPerMember: 1\n    minGpuMemory: 90Gi\n",
    );
    let output = topoplace(&[
        "plan",
        "--cluster",
        cluster.to_str().expect("utf-8"),
        "--workload",
        workload.to_str().expect("utf-8"),
        "-o",
        "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output)
            .contains("warning: GPU product `NVIDIA-RTX-PRO-6000-CLI-Test` (1 node(s)) is not in the product table"),
        "{}",
        stderr(&output)
    );
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    let placements = json["placements"].as_array().expect("placements[]");
    let tp2 = placements.iter().find(|p| p["gang"] == "qwen-32b").expect("the TP-2 model is placed");
    assert_eq!(tp2["product"], "L40S");
    // GPUs 0-2 are taken: the lowest free pair (3, 4) would span the sockets.
    assert_eq!(tp2["members"][0]["gpus"], serde_json::json!([4, 5]), "one socket");
    let big = placements.iter().find(|p| p["gang"] == "big-memory").expect("placed on the unknown product");
    assert_eq!(big["product"], "NVIDIA-RTX-PRO-6000-CLI-Test");
    assert_eq!(big["members"][0]["node"], "new-0");
}

/// Issue 22: a 7B bf16 model goes to a MIG 2g.20gb device, not to a whole H100; a TP-4 70B
/// model never goes to a MIG node. The cluster file takes GFD's single-strategy product form.
#[test]
fn mig_devices_take_small_models_and_never_tensor_parallel_ones() {
    let text = "apiVersion: topoplace.io/v1alpha1\nkind: Cluster\nmetadata: {name: mig}\nspec:\n  levels: [rack]\n  nodes:\n  - name: h100-0\n    labels: {rack: r1}\n    gpu: {product: NVIDIA-H100-80GB-HBM3, count: 8}\n  - name: h100-mig\n    labels: {rack: r1}\n    gpu: {product: NVIDIA-H100-80GB-HBM3-MIG-2g.20gb, count: 24, memory: 19968}\n";
    let cluster = temp_file("mig.yaml", text);
    let workload = temp_file(
        "mig-workload.yaml",
        "apiVersion: topoplace.io/v1alpha1\nkind: Workload\nmetadata: {name: w}\nspec:\n  gangs:\n  - name: llama-7b\n    gpusPerMember: 1\n    model: {parameters: 7B, dtype: bf16, kvCache: 2Gi}\n  - name: llama-70b\n    gpusPerMember: 4\n    tensorParallel: 4\n    model: {parameters: 70B, dtype: bf16, kvCache: 10Gi}\n",
    );
    let workload = workload.to_str().expect("utf-8");
    let output =
        topoplace(&["plan", "--cluster", cluster.to_str().expect("utf-8"), "--workload", workload, "-o", "json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    let placements = json["placements"].as_array().expect("placements[]");
    let small = placements.iter().find(|p| p["gang"] == "llama-7b").expect("7B placed");
    assert_eq!(small["product"], "H100-SXM5-MIG-2g.20gb");
    assert_eq!(small["members"][0]["node"], "h100-mig");
    let big = placements.iter().find(|p| p["gang"] == "llama-70b").expect("70B placed");
    assert_eq!(big["members"][0]["node"], "h100-0");
    // Sizing counts whole GPUs only: one 8-GPU H100 host, not 24 devices of 19.5 GiB.
    let sizing = topoplace(&[
        "plan",
        "--cluster",
        cluster.to_str().expect("utf-8"),
        "--size-model",
        "70B",
        "--dtype",
        "bf16",
        "-o",
        "json",
    ]);
    let sizing: serde_json::Value = serde_json::from_str(&stdout(&sizing)).expect("JSON");
    let row = &sizing["products"][0];
    assert_eq!((row["gpus_per_host"].as_u64(), row["hosts_in_cluster"].as_u64()), (Some(8), Some(1)), "{row}");
    assert_eq!(row["tensor_parallel"], 2, "{row}");
    // With the whole H100 taken, the 70B model is refused, with the MIG node's reason.
    let taken = text.replace("count: 8}\n", "count: 8}\n    allocated: [0, 1, 2, 3, 4, 5, 6, 7]\n");
    assert_ne!(taken, text);
    let full = temp_file("mig-full.yaml", &taken);
    let output = topoplace(&["plan", "--cluster", full.to_str().expect("utf-8"), "--workload", workload, "--explain"]);
    let text = stdout(&output);
    assert!(
        text.contains("its GPUs are MIG slices, which take members of one GPU without tensor parallelism"),
        "{text}"
    );
    assert!(text.contains("NOT PLACED"), "{text}");
}

/// Issue 22: a time-sliced GPU of 4 replicas takes 4 one-replica pods and refuses the fifth;
/// replicas never take a member of several GPUs or a tensor-parallel one; a model whose floor
/// fits a replica takes one rather than a whole GPU.
#[test]
fn a_time_sliced_gpu_of_four_replicas_takes_four_pods_and_refuses_the_fifth() {
    let text = "apiVersion: topoplace.io/v1alpha1\nkind: Cluster\nmetadata: {name: shared}\nspec:\n  nodes:\n  - name: t4-shared\n    gpu: {product: Tesla-T4-SHARED, count: 1, replicas: 4, sharing: time-slicing}\n";
    let cluster = temp_file("shared.yaml", text);
    let cluster = cluster.to_str().expect("utf-8");
    let workload = temp_file(
        "shared-workload.yaml",
        "apiVersion: topoplace.io/v1alpha1\nkind: Workload\nmetadata: {name: w}\nspec:\n  gangs:\n  - name: notebook\n    replicas: 5\n    gpusPerMember: 1\n",
    );
    let output =
        topoplace(&["plan", "--cluster", cluster, "--workload", workload.to_str().expect("utf-8"), "-o", "json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    let placements = json["placements"].as_array().expect("placements[]");
    assert_eq!(placements.len(), 4, "{json}");
    let mut devices: Vec<u64> = placements
        .iter()
        .map(|p| {
            assert_eq!(
                (p["product"].as_str(), p["members"][0]["node"].as_str()),
                (Some("T4-SHARED"), Some("t4-shared"))
            );
            p["members"][0]["gpus"][0].as_u64().expect("a device")
        })
        .collect();
    devices.sort_unstable();
    assert_eq!(devices, [0, 1, 2, 3], "each replica given once");
    let refused = json["unplaced"].as_array().expect("unplaced[]");
    assert_eq!(refused.len(), 1, "{json}");
    assert!(refused[0]["reason"].as_str().is_some_and(|r| r.contains("T4-SHARED")), "{json}");
    // Whole GPUs beside the shared one: a pod that states no need takes a whole GPU (a replica
    // has a quarter of one); a model whose floor fits a replica takes the replica; a TP-2
    // member never takes replicas.
    let mixed = text.to_string() + "  - name: l4-0\n    gpu: {product: NVIDIA-L4, count: 3}\n";
    let mixed = temp_file("shared-mixed.yaml", &mixed);
    let workload = temp_file(
        "shared-mixed-workload.yaml",
        "apiVersion: topoplace.io/v1alpha1\nkind: Workload\nmetadata: {name: w}\nspec:\n  gangs:\n  - name: tiny\n    gpusPerMember: 1\n    model: {parameters: 1B, dtype: bf16, kvCache: 512Mi}\n  - name: any\n    gpusPerMember: 1\n  - name: tp2\n    replicas: 2\n    gpusPerMember: 2\n    tensorParallel: 2\n",
    );
    let json = plan_json(&mixed, &workload);
    let node_of = |gang: &str| {
        json["placements"].as_array().expect("placements[]").iter().find(|p| p["gang"] == gang).map(|p| {
            (
                p["members"][0]["node"].as_str().unwrap_or_default().to_string(),
                p["members"].as_array().map_or(0, Vec::len),
            )
        })
    };
    assert_eq!(node_of("tiny"), Some(("t4-shared".to_string(), 1)), "{json}");
    assert_eq!(node_of("any"), Some(("l4-0".to_string(), 1)), "{json}");
    assert_eq!(node_of("tp2-0"), Some(("l4-0".to_string(), 1)), "{json}");
    assert_eq!(node_of("tp2-1"), None, "{json}: the L4 has one GPU left, and replicas take no TP group");
    let output = topoplace(&[
        "plan",
        "--cluster",
        mixed.to_str().expect("utf-8"),
        "--workload",
        workload.to_str().expect("utf-8"),
        "--explain",
    ]);
    let text = stdout(&output);
    assert!(
        text.contains("its GPUs are shared replicas, which take members of one GPU without tensor parallelism"),
        "{text}"
    );
}

/// Issue 22: `mig: <profile>` in the workload file takes MIG devices of that profile, of any
/// GPU product, and nothing else; a shape or need it cannot have is refused at its line.
#[test]
fn a_gang_asking_for_a_mig_profile_takes_only_devices_of_that_profile() {
    let cluster = temp_file(
        "mig-profiles.yaml",
        "apiVersion: topoplace.io/v1alpha1\nkind: Cluster\nmetadata: {name: mig}\nspec:\n  nodes:\n  - name: h100-0\n    gpu: {product: NVIDIA-H100-80GB-HBM3, count: 8}\n  - name: h100-mig\n    gpu: {product: NVIDIA-H100-80GB-HBM3-MIG-2g.20gb, count: 24, memory: 19968}\n  - name: a100-mig\n    gpu: {product: NVIDIA-A100-SXM4-80GB-MIG-1g.10gb, count: 14, memory: 9728}\n",
    );
    let cluster = cluster.to_str().expect("utf-8");
    let workload = |gangs: &str| {
        temp_file(
            "mig-profiles-workload.yaml",
            &format!(
                "apiVersion: topoplace.io/v1alpha1\nkind: Workload\nmetadata: {{name: w}}\nspec:\n  gangs:\n{gangs}"
            ),
        )
    };
    let file = workload("  - name: small\n    replicas: 2\n    mig: 1g.10gb\n  - name: medium\n    mig: 2g.20gb\n  - name: large\n    mig: 3g.40gb\n");
    let output = topoplace(&["plan", "--cluster", cluster, "--workload", file.to_str().expect("utf-8"), "-o", "json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    let node_of = |gang: &str| {
        json["placements"].as_array().expect("placements[]").iter().find(|p| p["gang"] == gang).map(|p| {
            (
                p["members"][0]["node"].as_str().unwrap_or_default().to_string(),
                p["product"].as_str().unwrap_or_default().to_string(),
            )
        })
    };
    for small in ["small-0", "small-1"] {
        assert_eq!(node_of(small), Some(("a100-mig".into(), "A100-SXM4-80GB-MIG-1g.10gb".into())), "{json}");
    }
    assert_eq!(node_of("medium"), Some(("h100-mig".into(), "H100-SXM5-MIG-2g.20gb".into())), "{json}");
    assert_eq!(node_of("large"), None, "no 3g.40gb devices anywhere, and whole GPUs are not one: {json}");
    let output = topoplace(&["plan", "--cluster", cluster, "--workload", file.to_str().expect("utf-8"), "--explain"]);
    let text = stdout(&output);
    assert!(text.contains("not MIG devices of profile 3g.40gb, which the gang asks for"), "{text}");
    // Refused at the gang's line, naming what is wrong.
    for (gangs, expected) in [
        ("  - name: wide\n    gpusPerMember: 2\n    mig: 1g.10gb\n", "a member on a MIG device has one GPU"),
        ("  - name: both\n    mig: 1g.10gb\n    minGpuMemory: 8Gi\n", "give one of minGpuMemory, model and mig"),
        ("  - name: odd\n    mig: \"1g 10gb\"\n", "is not a MIG profile"),
    ] {
        let file = workload(gangs);
        let output = topoplace(&["plan", "--cluster", cluster, "--workload", file.to_str().expect("utf-8")]);
        assert_eq!(output.status.code(), Some(2), "{gangs}");
        let message = stderr(&output);
        assert!(message.contains(expected) && message.contains(":6:"), "{gangs}: {message}");
    }
}

/// Found by trying it: gangs with a floor that fits a MIG device took the devices that gangs
/// bound to that profile can only use, and the bound ones were refused though replicas sat
/// free. In a batch, a gang bound to one MIG profile goes before equals that are not.
#[test]
fn gangs_bound_to_a_mig_profile_are_not_stranded_by_flexible_ones() {
    let cluster = temp_file(
        "mig-starve.yaml",
        "apiVersion: topoplace.io/v1alpha1\nkind: Cluster\nmetadata: {name: s}\nspec:\n  nodes:\n  - name: mig\n    gpu: {product: A100-SXM4-40GB, count: 2, mig: 1g.5gb, memory: 4864}\n  - name: a10\n    gpu: {product: A10, count: 1, replicas: 2, sharing: mps}\n",
    );
    let workload = temp_file(
        "mig-starve-workload.yaml",
        "apiVersion: topoplace.io/v1alpha1\nkind: Workload\nmetadata: {name: w}\nspec:\n  gangs:\n  - name: tiny\n    replicas: 2\n    gpusPerMember: 1\n    minGpuMemory: 1Gi\n  - name: migg\n    replicas: 2\n    mig: 1g.5gb\n",
    );
    let json = plan_json(&cluster, &workload);
    let node_of = |gang: &str| {
        json["placements"]
            .as_array()
            .expect("placements[]")
            .iter()
            .find(|p| p["gang"] == gang)
            .map(|p| p["members"][0]["node"].as_str().unwrap_or_default().to_string())
    };
    for (gang, node) in [("migg-0", "mig"), ("migg-1", "mig"), ("tiny-0", "a10"), ("tiny-1", "a10")] {
        assert_eq!(node_of(gang).as_deref(), Some(node), "{gang}: {json}");
    }
}

/// Issue 22, GFD's mixed MIG strategy in the cluster file: a node's whole GPUs and its MIG
/// devices of each profile (`migDevices`) are separate pools of one node. A TP-4 replica takes
/// the whole GPUs, a 7B bf16 model and gangs asking for the profile take the MIG devices, and
/// no pool lends to another.
#[test]
fn a_mixed_mig_node_plans_whole_gpus_and_each_profile_apart() {
    let text = |body: &str| {
        format!("apiVersion: topoplace.io/v1alpha1\nkind: Cluster\nmetadata: {{name: mixed}}\nspec:\n  nodes:\n{body}")
    };
    let cluster = temp_file(
        "mixed-mig.yaml",
        &text("  - name: a100-mixed\n    gpu: {product: NVIDIA-A100-SXM4-80GB, count: 4}\n    migDevices:\n    - {profile: 2g.20gb, count: 3, memory: 19968}\n    - {profile: 1g.10gb, count: 2, memory: 9856, allocated: [0]}\n"),
    );
    let workload = temp_file(
        "mixed-mig-workload.yaml",
        "apiVersion: topoplace.io/v1alpha1\nkind: Workload\nmetadata: {name: w}\nspec:\n  gangs:\n  - name: tp4\n    gpusPerMember: 4\n    tensorParallel: 4\n  - name: chat-7b\n    gpusPerMember: 1\n    model: {parameters: 7B, dtype: bf16}\n  - name: slice\n    replicas: 3\n    mig: 2g.20gb\n  - name: tiny\n    replicas: 2\n    mig: 1g.10gb\n",
    );
    let json = plan_json(&cluster, &workload);
    let placed = |gang: &str| {
        json["placements"].as_array().expect("placements[]").iter().find(|p| p["gang"] == gang).map(|p| {
            (
                p["members"][0]["node"].as_str().unwrap_or_default().to_string(),
                p["product"].as_str().unwrap_or_default().to_string(),
            )
        })
    };
    let whole = ("a100-mixed".to_string(), "A100-SXM4-80GB".to_string());
    let two_g = ("a100-mixed".to_string(), "A100-SXM4-80GB-MIG-2g.20gb".to_string());
    let one_g = ("a100-mixed".to_string(), "A100-SXM4-80GB-MIG-1g.10gb".to_string());
    assert_eq!(placed("tp4"), Some(whole.clone()), "{json}");
    // The 7B model (about 16 GiB of weights) fits a 2g.20gb device and prefers it to a whole GPU.
    let mut on_two_g: Vec<&str> =
        ["chat-7b", "slice-0", "slice-1", "slice-2"].into_iter().filter(|g| placed(g) == Some(two_g.clone())).collect();
    on_two_g.sort();
    assert_eq!(on_two_g.len(), 3, "three 2g.20gb devices, four takers: {json}");
    // One 1g.10gb device is free (the other is allocated): one tiny gang, not two.
    let tiny: Vec<&str> = ["tiny-0", "tiny-1"].into_iter().filter(|g| placed(g) == Some(one_g.clone())).collect();
    assert_eq!(tiny.len(), 1, "{json}");
    // Alone, the 7B model (about 16 GiB of weights) prefers a 2g.20gb device to a whole A100,
    // and the 1g.10gb devices are too small for it.
    let alone = temp_file(
        "mixed-mig-7b.yaml",
        "apiVersion: topoplace.io/v1alpha1\nkind: Workload\nmetadata: {name: w}\nspec:\n  gangs:\n  - name: chat-7b\n    gpusPerMember: 1\n    model: {parameters: 7B, dtype: bf16}\n",
    );
    let json = plan_json(&cluster, &alone);
    let product = json["placements"][0]["product"].as_str().unwrap_or_default().to_string();
    assert_eq!(product, two_g.1, "{json}");
    // Refused at the node's line, naming the field.
    for (body, expected) in [
        (
            "  - name: x\n    gpu: {product: T4, count: 1, replicas: 2}\n    migDevices: [{profile: 1g.5gb, count: 1, memory: 4864}]\n",
            "spec.nodes[0].migDevices: MIG devices of the mixed strategy are cut from whole GPUs",
        ),
        (
            "  - name: x\n    gpu: {product: A100-SXM4-80GB, count: 0}\n    migDevices:\n    - {profile: 1g.10gb, count: 1, memory: 9856}\n    - {profile: 1g.10gb, count: 1, memory: 9856}\n",
            "spec.nodes[0].migDevices[1].profile: 1g.10gb is listed twice",
        ),
        (
            "  - name: x\n    gpu: {product: A100-SXM4-80GB, count: 0}\n    migDevices: [{profile: 1g.10gb, count: 1, memory: 200000}]\n",
            "spec.nodes[0].migDevices[0].memory",
        ),
        ("  - name: x\n    gpu: {product: A100-SXM4-80GB, count: 0}\n", "gpu.count 0 is out of range"),
    ] {
        let cluster = temp_file("mixed-mig-bad.yaml", &text(body));
        let output = topoplace(&["plan", "--cluster", cluster.to_str().expect("utf-8")]);
        assert_eq!(output.status.code(), Some(2), "{body}");
        let message = stderr(&output);
        assert!(message.contains(expected) && message.contains(":6"), "{body}: {message}");
    }
}
