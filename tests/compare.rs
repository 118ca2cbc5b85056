//! End-to-end tests of `compare-losses`: the real binary on small synthetic
//! CIFAR-10 files, CPU only.

mod util;

use std::path::Path;
use std::process::Output;

use util::*;

/// 500 training images at batch 4: 125 steps, a loss line every 25.
const STEPS: usize = 125;

/// Runs `compare-losses` on `data` with a short, seeded recipe; `extra`
/// adds flags. One thread: the numbers are then the same on every run,
/// and the test stays fast on a busy machine.
fn compare(data: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "compare-losses",
        "--device",
        "cpu",
        "--data-dir",
        s(data),
        "--seed",
        "7",
        "--epochs",
        "1",
        "--lr",
        "0.01",
        "--log-every",
        "25",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// The CSV's header and its rows, each a dtype and the numbers after it;
/// an empty cell (a step without a divergence record) reads as NaN.
fn read_csv(path: &Path) -> (String, Vec<(String, Vec<f64>)>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default().to_string();
    let rows = lines
        .map(|l| {
            let mut cells = l.split(',');
            let dtype = cells.next().unwrap_or_default().to_string();
            let numbers = cells
                .map(|v| match v {
                    "" => f64::NAN,
                    v => v.parse::<f64>().unwrap_or_else(|e| panic!("{e}: {l}")),
                })
                .collect();
            (dtype, numbers)
        })
        .collect();
    (header, rows)
}

/// The CSV's columns after the dtype.
const STEP: usize = 0;
const EPOCH: usize = 1;
const LOSS_A: usize = 2;
const LOSS_A_REV: usize = 3;
const LOSS_B: usize = 4;
const LOSS_C: usize = 5;
const PARAM_AB: usize = 6;
const PARAM_A_REV: usize = 7;

/// The JSON events of a `--json` run, checked to parse.
fn events(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn prints_the_tables_and_writes_the_csv_and_the_chart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synthetic(&data, 500, 200, 1, None);
    let csv = dir.path().join("losses.csv");
    let png = dir.path().join("losses.png");
    let text = ok(&compare(&data, &["--csv", s(&csv), "--plot", s(&png)]));

    // Step 0: the four losses and one gradient row per parameter.
    assert!(
        text.contains("Step 0: the first mini-batch, from the shared initial weights"),
        "{text}"
    );
    assert!(text.contains("  loss A "), "{text}");
    assert!(text.contains("   A' "), "{text}");
    assert!(text.contains("max|gA-gA'|"), "{text}");
    for (name, _) in tch_cifar::nets::tutorial::PARAMETERS {
        assert!(
            text.contains(&format!("\n  {name:<14}")),
            "no row for {name}: {text}"
        );
    }
    // The running losses at the --log-every cadence.
    assert!(
        text.contains("Running loss, mean over 25 mini-batches"),
        "{text}"
    );
    assert!(text.contains("weight A-B  weight A-A'"), "{text}");
    for step in (25..=STEPS).step_by(25) {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("  [1, {step:5}]")))
            .unwrap_or_else(|| panic!("step {step}: {text}"));
        // Four running losses, then two loss and two weight differences.
        assert_eq!(line.split_whitespace().count(), 2 + 4 + 4, "{line}");
    }
    // The test set, the agreement and the parameter difference.
    assert!(text.contains("Test accuracy on 200 images"), "{text}");
    for row in ["all classes"].iter().chain(&tch_cifar::data::CLASSES) {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("  {row:<24}")))
            .unwrap_or_else(|| panic!("no accuracy row for {row}: {text}"));
        assert_eq!(line.matches(" %").count(), 4, "{line}");
    }
    assert!(
        text.contains("A and B predict the same class on "),
        "{text}"
    );
    assert!(text.contains("); A and A' on "), "{text}");
    assert!(
        text.contains("Largest parameter difference after 125 steps: |A-B| "),
        "{text}"
    );
    assert!(text.contains(", |A-A'| "), "{text}");
    assert!(
        text.contains("|A-C| 0;"),
        "A and C run the same kernels: {text}"
    );
    assert!(
        text.contains("Updates skipped on a non-finite loss or gradient: A 0, A' 0, B 0, C 0."),
        "{text}"
    );
    // These networks have learned: their agreement stands without a warning,
    // and the run closes the comparison by naming A and B one function.
    assert!(!text.contains("Warning:"), "{text}");
    assert!(
        text.contains(
            "yardstick for A against B.\nA and B compute the same function (log(softmax(z)) is \
             log_softmax(z) in exact arithmetic): every difference between them above is \
             rounding, as A' shows.\n"
        ),
        "{text}"
    );
    // The probe, its sentence, and the inference answer.
    assert!(text.contains("Stability probe: "), "{text}");
    assert!(text.contains("  logits x10000 "), "{text}");
    assert!(text.contains("  [0, 104] label 0 "), "{text}");
    assert!(
        text.contains("log(softmax) breaks once the logits are scaled by "),
        "{text}"
    );
    assert!(text.contains("stay finite on every input"), "{text}");
    assert!(
        text.contains("At inference, the class is the argmax of the logits"),
        "{text}"
    );

    // The CSV: a header and one row per step, in order.
    let (header, rows) = read_csv(&csv);
    assert_eq!(
        header,
        "dtype,step,epoch,loss_a,loss_a_rev,loss_b,loss_c,max_param_diff_ab,max_param_diff_a_rev"
    );
    assert_eq!(rows.len(), STEPS);
    for (i, (dtype, row)) in rows.iter().enumerate() {
        let step = i + 1;
        assert_eq!(dtype, "f32");
        assert_eq!(row.len(), 8, "{row:?}");
        assert_eq!((row[STEP], row[EPOCH]), (step as f64, 1.0));
        for col in [LOSS_A, LOSS_A_REV, LOSS_B, LOSS_C] {
            assert!(row[col].is_finite(), "step {step}: {row:?}");
        }
        // A and C run the same kernels in the same order: equal to the bit.
        assert_eq!(row[LOSS_A], row[LOSS_C], "step {step}");
        // The divergence every 100 steps and at the last one.
        let recorded = step.is_multiple_of(100) || step == STEPS;
        for col in [PARAM_AB, PARAM_A_REV] {
            assert_eq!(row[col].is_finite(), recorded, "step {step}: {row:?}");
        }
    }
    let rows: Vec<&Vec<f64>> = rows.iter().map(|(_, r)| r).collect();

    // Over the first 50 steps, A's and B's loss curves agree within 1e-5.
    // A and B are the same function, but log(softmax(z)) and log_softmax(z)
    // round differently in float32: at step 0 the losses differ by at most
    // an ulp (2.4e-7 near ln 10 = 2.30) and the gradients by about 1e-8.
    // Every update carries that difference into the weights and momentum
    // SGD feeds it forward, so it grows, the faster the faster the network
    // learns. Measured here: at most 3e-7 over the first 50 steps (1 or 2
    // threads), while the net is still near its initial loss; then 1e-3 by
    // step 100 and 1e-1 by step 120, once this data is being learned fast at
    // lr 0.01. 1e-5 is some 40 ulps, ample room for rounding, and still far
    // below the loss's own movement over these steps (checked below), so
    // the curves coincide as far as any reader can see.
    let first: Vec<&Vec<f64>> = rows.iter().take(50).copied().collect();
    let max_diff = first
        .iter()
        .map(|r| (r[LOSS_A] - r[LOSS_B]).abs())
        .fold(0.0, f64::max);
    assert!(
        max_diff <= 1e-5,
        "|loss_A - loss_B| up to {max_diff} in 50 steps"
    );
    let (lo, hi) = first.iter().fold((f64::MAX, f64::MIN), |(lo, hi), r| {
        (lo.min(r[LOSS_A]), hi.max(r[LOSS_A]))
    });
    assert!(
        hi - lo > 0.05,
        "the loss barely moved ({lo}..{hi}): a vacuous check"
    );

    #[cfg(unix)]
    for path in [&csv, &png] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644, "{}", path.display());
    }
    let png = std::fs::read(&png).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(
        png.len() > 10_000,
        "a near-empty chart: {} bytes",
        png.len()
    );
}

/// The fields every `summary` carries, in either dtype (documented in
/// docs/compare-losses.md).
const SUMMARY_FIELDS: [&str; 31] = [
    "dtype",
    "learned",
    "device",
    "seed",
    "steps",
    "models",
    "test_images",
    "agree_ab",
    "agreement_ab_percent",
    "agree_a_rev",
    "agreement_a_rev_percent",
    "accuracy_gap_ab",
    "accuracy_gap_a_rev",
    "max_loss_diff_ab",
    "max_loss_diff_ab_step",
    "max_loss_diff_a_rev",
    "max_loss_diff_a_rev_step",
    "max_param_diff_ab",
    "max_param_diff_a_rev",
    "max_param_diff_ac",
    "max_abs_weight_a",
    "param_diff_ab",
    "param_diff_a_rev",
    "divergence",
    "init",
    "probe_finding",
    "probe_first_broken_scale_b",
    "inference",
    "train_seconds",
    "seconds",
    "threads",
];

/// Checks one run's events, `start` to `summary`, in `dtype` over `steps`
/// steps with `test` test images, and returns them by name.
fn check_run<'a>(
    events: &'a [serde_json::Value],
    dtype: &str,
    steps: usize,
    test: usize,
) -> std::collections::HashMap<&'a str, &'a serde_json::Value> {
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| {
            e["event"]
                .as_str()
                .unwrap_or_else(|| panic!("no event: {e}"))
        })
        .collect();
    let lines = steps / 25;
    let mut expected = vec!["start", "init"];
    expected.extend(std::iter::repeat_n("loss", lines));
    expected.extend(["test", "probe", "summary"]);
    assert_eq!(kinds, expected);
    let start = &events[0];
    assert_eq!(start["dtype"], dtype);
    for m in ["A", "A_rev", "B", "C"] {
        assert!(start["models"][m]["loss"].is_string(), "{m}: {start}");
    }
    assert_eq!(start["models"]["A_rev"]["reversed_batches"], true);

    let init = &events[1];
    for key in ["loss_a", "loss_a_rev", "loss_b", "loss_c"] {
        assert!(init[key].is_f64(), "{key} in {init}");
    }
    assert!(init["loss_diff_ab"].as_f64().unwrap() <= 1e-6, "{init}");
    assert!(init["max_grad_diff_ab"].as_f64().unwrap() <= 1e-5, "{init}");
    assert!(init["loss_diff_a_rev"].as_f64().unwrap() <= 1e-6, "{init}");
    assert!(
        init["max_grad_diff_a_rev"].as_f64().unwrap() <= 1e-5,
        "{init}"
    );
    assert_eq!(init["loss_diff_ac"], 0.0, "{init}");
    assert_eq!(init["gradients"].as_object().unwrap().len(), 10, "{init}");
    for loss in &events[2..2 + lines] {
        for key in [
            "loss_a",
            "loss_a_rev",
            "loss_b",
            "loss_c",
            "max_loss_diff_ab_so_far",
            "max_loss_diff_a_rev_so_far",
            "max_param_diff_ab",
            "max_param_diff_a_rev",
        ] {
            assert!(loss[key].is_f64(), "{key} in {loss}");
        }
        assert_eq!(loss["non_finite_b"], 0, "{loss}");
    }
    let test_event = &events[2 + lines];
    for key in [
        "agreement_ab_percent",
        "agreement_a_rev_percent",
        "accuracy_a_rev",
    ] {
        assert!(test_event[key].is_f64(), "{key} in {test_event}");
    }
    assert_eq!(test_event["learned"], summary_of(events)["learned"]);
    let probe = &events[3 + lines];
    assert_eq!(probe["dtype"], dtype);
    let cases = probe["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 7, "{probe}");
    for case in cases {
        assert_eq!(case["grad_a"]["finite"], true, "{case}");
        assert_eq!(case["grad_c"]["finite"], true, "{case}");
        assert!(case["loss_a"].is_f64() && case["loss_c"].is_f64(), "{case}");
    }
    let extreme = &cases[4];
    assert_eq!(extreme["scale"], 10000.0);
    assert_eq!(extreme["grad_b"]["finite"], false, "{extreme}");
    let gap = if dtype == "f64" { 746.0 } else { 104.0 };
    assert_eq!(cases[6]["loss_b"], "inf", "{probe}");
    assert_eq!(cases[6]["loss_a"], gap, "{probe}");

    let summary = events.last().unwrap();
    for key in SUMMARY_FIELDS {
        assert!(!summary[key].is_null(), "summary lacks {key}: {summary}");
    }
    assert_eq!(summary["dtype"], dtype);
    assert_eq!(summary["device"], "cpu");
    assert_eq!(summary["steps"], steps);
    assert_eq!(summary["test_images"], test);
    assert_eq!(summary["max_param_diff_ac"], 0.0);
    for m in ["A", "A_rev", "B", "C"] {
        let model = &summary["models"][m];
        let acc = model["accuracy"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=100.0).contains(&acc), "{m}: {model}");
        assert_eq!(model["per_class_accuracy"].as_object().unwrap().len(), 10);
        assert_eq!(model["skipped_steps"], 0, "{m}: {model}");
        assert_eq!(model["total"], test);
    }
    assert_eq!(
        summary["inference"]["argmax_logits_equals_argmax_softmax"],
        test
    );
    for pair in ["ab", "a_rev"] {
        let agree = summary[format!("agreement_{pair}_percent")]
            .as_f64()
            .unwrap();
        assert!((0.0..=100.0).contains(&agree));
        let count = summary[format!("agree_{pair}")].as_u64().unwrap();
        assert!((agree - 100.0 * count as f64 / test as f64).abs() < 1e-9);
    }
    // The divergence series: every 100 steps and the last.
    let d = &summary["divergence"];
    assert_eq!(d["every"], 100);
    let want: Vec<usize> = (1..=steps)
        .filter(|s| s.is_multiple_of(100) || *s == steps)
        .collect();
    assert_eq!(d["step"], serde_json::json!(want), "{d}");
    for key in ["max_param_diff_ab", "max_param_diff_a_rev"] {
        let series = d[key].as_array().unwrap();
        assert_eq!(series.len(), want.len());
        // The last entry is the final difference the summary reports.
        assert_eq!(series.last().unwrap(), &summary[key], "{key}");
    }
    [
        ("start", &events[0]),
        ("init", init),
        ("test", test_event),
        ("probe", probe),
        ("summary", summary),
    ]
    .into_iter()
    .collect()
}

/// The last event of a run, its `summary`.
fn summary_of(events: &[serde_json::Value]) -> &serde_json::Value {
    events.last().expect("events")
}

/// A run too short to learn: every network answers about one class, so
/// they agree on nearly every test image. The output says that this
/// agreement means nothing yet, where the figure alone reads as a proof,
/// and why no running-loss line came.
#[test]
fn an_untrained_run_warns_that_its_agreement_means_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synthetic(&data, 500, 200, 1, None);
    // The tutorial's lr and --log-every, 30 steps.
    let args = [
        "compare-losses",
        "--device",
        "cpu",
        "--data-dir",
        s(&data),
        "--seed",
        "1",
        "--max-steps",
        "30",
        "--threads",
        "1",
    ];
    let out = run(&args);
    let text = ok(&out);
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("A and B predict the same class on "))
        .unwrap_or_else(|| panic!("{text}"));
    let warning = lines[at + 1];
    assert!(
        warning.starts_with("Warning: the networks have not learned yet (test accuracy A "),
        "{text}"
    );
    assert!(
        warning.ends_with("Train longer: --max-steps stopped this run after 30 steps."),
        "{warning}"
    );
    // The sentence on what A against B means is there all the same.
    assert!(
        text.contains("A and B compute the same function (log(softmax(z)) is log_softmax(z)"),
        "{text}"
    );
    let err = stderr(&out);
    assert!(
        err.contains(
            "note: this run prints no running-loss line: one comes every --log-every 2000 \
             mini-batches of an epoch, and it trains at most 30 in one; --log-every 3 prints them"
        ),
        "{err}"
    );

    let json = events(&ok(&run(&[&args[..], &["--json"]].concat())));
    let test = json.iter().find(|e| e["event"] == "test").unwrap();
    assert_eq!(test["learned"], false, "{test}");
    assert_eq!(summary_of(&json)["learned"], false);
}

#[test]
fn json_lines_are_valid_and_end_with_a_complete_summary() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synthetic(&data, 500, 100, 2, None);
    let text = ok(&compare(&data, &["--json"]));
    check_run(&events(&text), "f32", STEPS, 100);
}

/// The point of `--dtype f64`: with float64 arithmetic A, A' and B stay the
/// same network, where float32 rounding has already set them apart. On
/// this data, at lr 0.01, after 200 steps, measured: the largest parameter
/// difference is 1.7e-7 (A-B) and 1.5e-7 (A-A') in float32, against
/// 9.4e-16 and 4.3e-16 in float64.
#[test]
fn float64_keeps_a_a_rev_and_b_the_same_network() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synthetic(&data, 800, 200, 1, None);
    let csv = dir.path().join("both.csv");
    let png = dir.path().join("both.png");
    let text = ok(&compare(
        &data,
        &[
            "--dtype",
            "f32,f64",
            "--json",
            "--csv",
            s(&csv),
            "--plot",
            s(&png),
        ],
    ));
    let all = events(&text);
    let split = all
        .iter()
        .rposition(|e| e["event"] == "start")
        .expect("a second run");
    let f32 = check_run(&all[..split], "f32", 200, 200);
    let f64 = check_run(&all[split..], "f64", 200, 200);
    let diff = |run: &std::collections::HashMap<&str, &serde_json::Value>, key: &str| {
        run["summary"][key].as_f64().unwrap()
    };
    for key in ["max_param_diff_ab", "max_param_diff_a_rev"] {
        let (d32, d64) = (diff(&f32, key), diff(&f64, key));
        assert!(d64 <= 1e-12, "{key}: {d64} in float64");
        // Float32 rounding is 2^29 times coarser: the drift shows.
        assert!(d32 >= 1e-9, "{key}: {d32} in float32");
        assert!(d32 > 1e4 * d64, "{key}: float32 {d32}, float64 {d64}");
    }
    assert_eq!(diff(&f64, "agreement_ab_percent"), 100.0);
    assert_eq!(diff(&f64, "agreement_a_rev_percent"), 100.0);
    // At step 0, in float64, the four losses agree to float64 rounding.
    for key in ["loss_diff_ab", "loss_diff_a_rev"] {
        assert!(
            f64["init"][key].as_f64().unwrap() <= 1e-14,
            "{}",
            f64["init"]
        );
    }
    // float64's exp underflows 7 times further out: B breaks later.
    let broken = |run: &std::collections::HashMap<&str, &serde_json::Value>| {
        run["summary"]["probe_first_broken_scale_b"]
            .as_f64()
            .unwrap()
    };
    assert!(
        broken(&f64) > broken(&f32),
        "B breaks at x{} in float64, x{} in float32",
        broken(&f64),
        broken(&f32)
    );

    // The CSV holds both runs, with the divergence every 100 steps.
    let (header, rows) = read_csv(&csv);
    assert!(header.ends_with(",max_param_diff_ab,max_param_diff_a_rev"));
    assert_eq!(rows.len(), 400);
    for (dtype, rows) in [("f32", &rows[..200]), ("f64", &rows[200..])] {
        let summary = if dtype == "f32" { &f32 } else { &f64 }["summary"];
        for (dt, row) in rows {
            assert_eq!(dt, dtype);
            let step = row[STEP] as usize;
            assert_eq!(
                row[PARAM_AB].is_finite(),
                step.is_multiple_of(100),
                "{row:?}"
            );
        }
        let last = &rows[199].1;
        assert_eq!(
            last[PARAM_AB],
            summary["max_param_diff_ab"].as_f64().unwrap()
        );
        assert_eq!(
            last[PARAM_A_REV],
            summary["max_param_diff_a_rev"].as_f64().unwrap()
        );
    }
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
}

#[test]
fn bad_dtypes_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = compare(dir.path(), &["--dtype", "f16"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    for word in ["--dtype", "f16", "f32", "f64"] {
        assert!(stderr(&out).contains(word), "{word}: {}", stderr(&out));
    }
    fails_with(
        &compare(dir.path(), &["--dtype", "f64,f64"]),
        &["--dtype lists f64 twice"],
    );
}

#[test]
fn bad_output_paths_fail_before_training() {
    let dir = tempfile::tempdir().unwrap();
    // No dataset at all: the output check must come first.
    let csv = dir.path().join("no/dir/losses.csv");
    fails_with(
        &compare(dir.path(), &["--csv", s(&csv)]),
        &["no/dir/losses.csv", "does not exist"],
    );
    let png = dir.path().join("missing/chart.png");
    fails_with(
        &compare(dir.path(), &["--plot", s(&png)]),
        &["missing/chart.png", "does not exist"],
    );
    assert!(!csv.exists() && !png.exists());

    let out = compare(dir.path(), &["--plot", "chart.jpg"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("chart.jpg"), "{}", stderr(&out));
}

/// When A diverges its softmax is NaN, and the closing lines must say so
/// instead of claiming that softmax kept the logits' order.
#[test]
fn a_diverged_run_does_not_claim_the_inference_facts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synthetic(&data, 40, 20, 1, None);
    let text = ok(&run(&[
        "compare-losses",
        "--device",
        "cpu",
        "--data-dir",
        s(&data),
        "--seed",
        "1",
        "--epochs",
        "1",
        "--lr",
        "100000",
    ]));
    assert!(
        text.contains("but this run cannot show it: A's logits overflow"),
        "{text}"
    );
    assert!(!text.contains("softmax keeps their order"), "{text}");
}

/// The training harness's `--max-steps` and SIGINT, as in `train`: the
/// first stops each run early and evaluates it, the second stops it with
/// status 130 (compare-losses saves nothing to resume from).
#[test]
fn max_steps_and_sigint_stop_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synthetic(&data, 500, 200, 1, None);
    let ev = events(&ok(&compare(&data, &["--max-steps", "60", "--json"])));
    let start = ev.iter().find(|e| e["event"] == "start").unwrap();
    assert_eq!(start["steps"], 60);
    let steps: Vec<u64> = ev
        .iter()
        .filter(|e| e["event"] == "loss")
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [25, 50]);
    assert!(ev.iter().any(|e| e["event"] == "test"), "{ev:?}");

    // Each step sleeps 40 ms: 4 s after the first loss line for the signal.
    let mut child = tch_cifar()
        .env("TCH_CIFAR_TEST_STEP_DELAY_MS", "40")
        .args(["compare-losses", "--device", "cpu", "--data-dir", s(&data)])
        .args([
            "--seed",
            "7",
            "--epochs",
            "1",
            "--log-every",
            "25",
            "--threads",
            "1",
        ])
        .arg("--json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.contains(r#""event":"loss""#) {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        assert!(n > 0, "the run ended before a loss line: {seen}");
        seen.push_str(&line);
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    std::io::Read::read_to_string(&mut stdout, &mut seen).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted at epoch 1, step ") && err.contains("nothing was saved"),
        "{err}"
    );
    let last = events(&seen).pop().unwrap();
    assert_eq!(last["event"], "interrupted", "{seen}");
    assert!(last["step"].as_u64().unwrap() < STEPS as u64, "{seen}");
}
