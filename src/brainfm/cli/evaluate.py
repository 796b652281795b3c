"""``brainfm-evaluate ckpt=<checkpoint or run dir>``: subject re-identification (Rank-1, mAP) of
the pretrained model, the same architecture randomly initialised, and FC fingerprinting, at
several window lengths. Writes ``metrics.json`` and ``reid.png`` and prints a table.
``protocol=few_subject``: decoding accuracy against the number of training subjects
(:mod:`brainfm.eval.few_subject`; ``few_subject.json|csv|png``)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from brainfm.cli.common import exit_on_brainfm_error, tidy_logging
from brainfm.config import config_dir


#: row labels of the built-in methods (other rows: the ``compare`` names)
LABELS = {"pretrained": "pretrained", "random_init": "random init (same model)", "fc_fingerprint": "FC fingerprinting"}


def print_table(report: dict) -> None:
    """One row per method (the checkpoint, its initialisation, FC fingerprinting, compared runs), one column
    per window length: Rank-1 / mAP; then the subject probe, if it ran."""
    from rich.console import Console
    from rich.table import Table

    tr = report["data"].get("tr")
    at = f" at TR {tr:g} s" if isinstance(tr, (int, float)) else ""
    names = list(report["results"])
    lengths = list(report["results"][names[0]])
    first = report["results"][names[0]]

    def window(length: str) -> str:
        return f"{length} TRs ({int(length) * tr:.0f} s)" if isinstance(tr, (int, float)) and tr else f"{length} TRs"

    # titles as plain lines: rich wraps a title at the table's width
    print(f"Subject re-identification ({report['data']['n_subjects']} subjects{at}; gallery: "
          f"{report['protocol']['gallery']}, queries: {report['protocol']['queries']}): Rank-1 / mAP")
    table = Table()
    table.add_column("method")
    for length in lengths:
        table.add_column(window(length), justify="right")
    for n in names:
        table.add_row(LABELS.get(n, n), *(f"{report['results'][n][k]['rank1']:.3f} / {report['results'][n][k]['mAP']:.3f}"
                                          for k in lengths))
    table.add_row("chance", *(f"{first[k]['rank1_chance']:.3f} / {first[k]['mAP_chance']:.3f}" for k in lengths))
    Console().print(table)
    if "probe" in report:
        print(f"{report['data']['n_subjects']}-way subject linear probe (fit on gallery windows, scored on query "
              "windows): accuracy / balanced accuracy")
        probe = Table()
        probe.add_column("method")
        for length in lengths:
            probe.add_column(window(length), justify="right")
        for n in names:
            probe.add_row(LABELS.get(n, n), *(f"{report['probe'][n][k]['acc']:.3f} / {report['probe'][n][k]['balanced_acc']:.3f}"
                                              for k in lengths))
        probe.add_row("chance", *(f"{1 / report['data']['n_subjects']:.3f}" for _ in lengths))
        Console().print(probe)


def run(cfg: DictConfig) -> dict | None:
    protocol = cfg.get("protocol") or "reidentification"
    if protocol == "few_subject":  # decoding accuracy vs training subjects (brainfm.eval.few_subject)
        from brainfm.eval.few_subject import run_from_config

        return run_from_config(cfg)
    if protocol != "reidentification":
        from brainfm.errors import ConfigError

        raise ConfigError(f"protocol={protocol!r} must be 'reidentification' or 'few_subject'")
    from brainfm.eval.protocol import (
        plot_reidentification,
        run_reidentification,
        write_json,
    )
    from brainfm.runs import find_checkpoint

    ckpt = find_checkpoint(cfg.ckpt)
    report = run_reidentification(
        ckpt, window_lengths=list(cfg.window_lengths), gallery_fraction=float(cfg.gallery_fraction),
        stride=cfg.stride, batch_size=int(cfg.batch_size), seed=int(cfg.seed), data_path=cfg.data_path,
        baselines=list(cfg.baselines), probe=bool(cfg.get("probe", True)), trainer=cfg.get("trainer"),
        gallery_runs=cfg.get("gallery_runs"), query_runs=cfg.get("query_runs"),
        data_overrides=OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else None,
        run_fraction=float(cfg.get("run_fraction", 1.0)),
        compare=OmegaConf.to_container(cfg.compare, resolve=True) if cfg.get("compare") else None,
    )
    if report is None:  # not the global rank 0: its windows were embedded for rank 0's report
        return None
    out = Path(cfg.out_dir) if cfg.out_dir else ckpt.parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    report["config"] = OmegaConf.to_container(cfg, resolve=True)
    write_json(out / "metrics.json", report)
    plot_reidentification(report, out / "reid.png")
    print_table(report)
    print(f"wrote {out / 'metrics.json'} and {out / 'reid.png'}")
    return report


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
def _main(cfg: DictConfig) -> None:
    tidy_logging()
    with exit_on_brainfm_error("brainfm-evaluate"):
        run(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
