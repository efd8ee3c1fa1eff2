"""The scripts' command lines, in-process: --help and -h name each script's arguments and exit 0, a file
of the other kind (comparison vs training config) says which script takes it, and options that apply
elsewhere say so in one line."""
import sys

import pytest

import analyze
import compare
import export
import sample
from config import UserError, load_config, run_main
from data import prepare
from repo import ROOT, write_comparison

HELP = [  # (entry point, argv after the script, words the usage must name)
    (lambda: sample.generate_samples(sample.parse_args()), [], ["run", "--prompt", "--num_samples", "--temperature", "--device"]),
    (compare.main, [], ["comparison", "--jobs", "--shard", "--report"]),
    (analyze.main, [], ["probe", "diagnostics", "convert", "recentering", "pairs", "--eval_windows"]),
    (analyze.main, ["probe"], ["probe", "diagnostics", "--eval_windows"]),
    (analyze.main, ["diagnostics"], ["diagnostics"]),
    (analyze.main, ["convert"], ["source", "--to", "--out", "--windows"]),
    (analyze.main, ["recentering"], ["folder", "--delta_threshold", "--jobs"]),
    (analyze.main, ["pairs"], ["folder"]),
    (export.main, [], ["run", "out", "AutoTokenizer load with no code of ours."]),
    (prepare.main, [], ["python -m data.prepare", "config", "--workers"]),
]


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("main, argv, names", HELP)
def test_help_names_the_arguments_and_exits_0(main, argv, names, flag, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["script.py", *argv, flag])
    with pytest.raises(SystemExit) as done:
        run_main(lambda: (main(), sys.exit(0)))  # analyze.py prints its usage and returns
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("usage:"), out
    missing = [n for n in names if n not in " ".join(out.split())]  # argparse wraps long lines
    assert not missing, (missing, out)


def test_a_comparison_file_given_to_train_names_compare_py():
    with pytest.raises(UserError) as refused:
        load_config(ROOT / "configs" / "compare_tiny.toml")
    assert "is a comparison file (it has [variants]), not a training config; compare.py takes it" in str(refused.value)


def test_a_training_config_given_to_compare_names_train_py():
    with pytest.raises(UserError) as refused:
        compare.load_comparison(ROOT / "configs" / "default.toml")
    message = str(refused.value)
    assert "is a training config" in message and "train.py takes it: python train.py" in message
    assert "\n" not in message


def test_report_with_nothing_trained_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    path = write_comparison(tmp_path, tmp_path / "cache", {"layernorm": {}, "rmsnorm": {"norm": "rmsnorm"}})
    monkeypatch.setattr(sys, "argv", ["compare.py", str(path), "--report"])
    with pytest.raises(SystemExit) as done:
        run_main(compare.main)
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1, err
    assert "--report: none of the 4 runs of" in err and "has been trained yet" in err
    assert not (tmp_path / "out").exists()  # no empty plots, no summary


def test_a_runs_probe_takes_evaluation_keys_and_names_where_the_others_apply(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["analyze.py", "probe", str(tmp_path), "--block_size=64"])
    with pytest.raises(UserError, match=r"^--block_size: a run keeps its own config; only eval_windows, batch_size "
                                        r"may be set for it \(the other keys apply to a pretrained source\)"):
        analyze.main()
    monkeypatch.setattr(sys, "argv", ["analyze.py", "diagnostics", str(tmp_path), "--eval_windows=8"])
    with pytest.raises(UserError, match="a run's diagnostics are redrawn from its diagnostics.jsonl; --key=value applies to a pretrained source"):
        analyze.main()


def test_diagnostics_of_a_comparison_folder_points_to_its_runs(tmp_path, monkeypatch):
    from study.probe import run_diagnostics
    for variant, lines in (("layernorm", '{"step": 0}\n'), ("rmsnorm", None)):
        run = tmp_path / "runs" / variant / "seed1"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text('{"step": 0}\n')
        if lines:
            (run / "diagnostics.jsonl").write_text(lines)
    with pytest.raises(UserError) as refused:
        run_diagnostics(tmp_path)
    assert f"is a comparison folder; diagnostics are per run, e.g. analyze.py diagnostics " \
           f"{tmp_path / 'runs' / 'layernorm' / 'seed1'} (1 of its 2 runs recorded them" in str(refused.value)
    (tmp_path / "runs" / "layernorm" / "seed1" / "diagnostics.jsonl").unlink()
    with pytest.raises(UserError, match="none of its 2 runs recorded diagnostics; set diagnostics = true"):
        run_diagnostics(tmp_path)
