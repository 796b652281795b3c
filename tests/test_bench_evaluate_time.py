"""scripts/bench_evaluate_time.py's table and checks, with two stand-in ``brainfm-evaluate`` executables that write
a metrics.json at once (the real comparison takes minutes: README, "Evaluate any checkpoint")."""

from __future__ import annotations

import json
import sys
import textwrap

from brainfm.bench.evaluate_time import _differences, main

METRICS = {"results": {"pretrained": {"30": {"rank1": 0.952, "mAP": 0.942}}, "fc_fingerprint": {"30": {"rank1": 0.861,
                                                                                                      "mAP": 0.482}}},
           "probe": {"pretrained": {"30": {"acc": 0.956, "balanced_acc": 0.956}}}}


def _fake(path, metrics: dict):
    path.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import pathlib, sys
        out = pathlib.Path(next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("out_dir=")))
        out.mkdir(parents=True)
        (out / "metrics.json").write_text({json.dumps(metrics)!r})
        print("pretrained: embedding 546 windows")
        print("Subject re-identification ...")
        """))
    path.chmod(0o755)
    return str(path)


def test_same_numbers_pass_and_changed_rank1_fails(tmp_path, capsys):
    before = _fake(tmp_path / "before", METRICS)
    assert main(before, _fake(tmp_path / "same", METRICS), str(tmp_path), ["", "window_lengths=[30]"], repeats=1) == 0
    out = capsys.readouterr().out
    assert "| defaults" in out and "| window_lengths=[30]" in out
    assert "defaults: Rank-1 / mAP bit-identical (4 values); subject probe accuracy identical (1 probes)" in out
    assert "    pretrained: embedding 546 windows" in out  # the progress lines, not the tables

    changed = json.loads(json.dumps(METRICS))
    changed["results"]["pretrained"]["30"]["mAP"] = 0.9420000001
    changed["probe"]["pretrained"]["30"]["acc"] = 0.95
    assert main(before, _fake(tmp_path / "changed", changed), str(tmp_path), [""], repeats=1) == 1
    assert "pretrained 30 TRs mAP: 0.942 -> 0.9420000001" in capsys.readouterr().out
    reid, probe = _differences(METRICS, changed)
    assert reid == ["pretrained 30 TRs mAP: 0.942 -> 0.9420000001"]
    assert probe == ["pretrained 30 TRs acc: 0.9560 -> 0.9500"]
